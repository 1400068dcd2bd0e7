"""`backdoorlab scan`: the combined verdict of the model detectors that fit the data given."""

from __future__ import annotations

from types import SimpleNamespace

from backdoorlab.cli import main
from backdoorlab.detectors import verdict


def _res(flagged, p=None, backdoored=None):
    return SimpleNamespace(detection=SimpleNamespace(
        flagged=flagged, p_value=p, backdoored=bool(flagged) if backdoored is None else backdoored))


def test_verdict_votes_then_detector_order():
    v = verdict({"a": _res([], 0.5), "b": _res([], 0.3)})
    assert (v.backdoored, v.targets, v.significant) == (False, [], [])
    assert verdict({"a": _res([3], 0.001), "b": _res([], 0.4)}).targets == [3]
    # label 5 is flagged by both significant detectors: it leads; then a's own order
    assert verdict({"a": _res([2, 5], 0.001), "b": _res([5], 0.002)}).targets == [5, 2]
    # a tie in votes goes to the first detector's first flag
    assert verdict({"a": _res([7], 0.001), "b": _res([1], 0.001)}).targets == [7, 1]


def test_verdict_is_bonferroni_over_the_detectors_run():
    # p = 0.03 is significant alone (0.05) but not beside a second detector (0.025)
    assert verdict({"a": _res([4], 0.03)}).backdoored
    two = verdict({"a": _res([4], 0.03), "b": _res([], 0.9)})
    assert not two.backdoored and two.targets == [] and two.level == 0.025
    assert "0.025" in two.rule
    # a detector without a p-value counts by its own verdict
    assert verdict({"a": _res([6], None), "b": _res([], 0.9)}).targets == [6]
    assert not verdict({"a": _res([], None, False)}).backdoored
    # ... and is not part of the Bonferroni divisor: p = 0.03 beside it is tested at 0.05
    mixed = verdict({"a": _res([], None, False), "b": _res([4], 0.03)})
    assert mixed.level == 0.05 and mixed.significant == ["b"] and mixed.targets == [4]
    assert "a (no p-value)" in mixed.rule


def test_scan_refuses_before_any_work(tmp_path, capsys, digits_badnet):
    from backdoorlab.models import save_model

    clf, _, _ = digits_badnet
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    assert main(["scan", model, "--detector", "bogus", "--out", str(tmp_path / "a")]) == 2
    assert "unknown model-detector method 'bogus'" in capsys.readouterr().err
    # Neural Cleanse needs clean data: without --clean nothing is left to run
    assert main(["scan", model, "--detector", "neural-cleanse", "--out", str(tmp_path / "b")]) == 2
    assert "needs clean data" in capsys.readouterr().err
    assert main(["scan", model, "--target", "10", "--out", str(tmp_path / "c")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
