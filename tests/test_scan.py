"""`backdoorlab scan`: the combined verdict of the model detectors that fit the data given."""

from __future__ import annotations

from types import SimpleNamespace

from backdoorlab.cli import main
from backdoorlab.commands.scan import combine


def _res(flagged):
    return SimpleNamespace(detection=SimpleNamespace(flagged=flagged))


def test_combine_votes_then_detector_order():
    assert combine({"a": _res([]), "b": _res([])}) == (False, [])
    assert combine({"a": _res([3]), "b": _res([])}) == (True, [3])
    # label 5 is flagged by both detectors: it leads; then a's own order
    assert combine({"a": _res([2, 5]), "b": _res([5])}) == (True, [5, 2])
    # a tie in votes goes to the first detector's first flag
    assert combine({"a": _res([7]), "b": _res([1])}) == (True, [7, 1])


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
