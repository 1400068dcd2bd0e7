"""`backdoorlab scan`: the combined verdict of the model detectors that fit the data given."""

from __future__ import annotations

from backdoorlab.cli import main
from backdoorlab.detectors import Detection, DetectResult, verdict


def _det(flagged, p=None, backdoored=None):
    return Detection.recorded(flagged, bool(flagged) if backdoored is None else backdoored, p)


def _res(flagged, p=None, backdoored=None):
    return DetectResult("x", {}, _det(flagged, p, backdoored), 0.0, 0, None)


def test_verdict_reads_a_bare_detection_as_its_result():
    # a recorded answer (benchmarks/zoo.py, scan_seeds.py) is combined without a DetectResult
    for args in (([5], 0.001), ([], 0.4), ([2], 0.03), ([6], None), ([], None, False)):
        pairs = [(_res(*args), _det(*args)), (_res([3], 0.01), _det([3], 0.01))]
        whole = verdict({"a": pairs[0][0], "b": pairs[1][0]})
        bare = verdict({"a": pairs[0][1], "b": pairs[1][1]})
        mixed = verdict({"a": pairs[0][1], "b": pairs[1][0]})
        assert whole == bare == mixed


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


def test_merged_p_value_is_n_over_k_times_the_kth_smallest():
    import pytest

    from backdoorlab.detectors import merged_p_value

    assert merged_p_value([0.2]) == 0.2
    assert merged_p_value([0.03, 0.01]) == pytest.approx(0.02)  # k = 1: twice the smaller
    assert merged_p_value([0.2, 0.01, 0.03]) == pytest.approx(0.045)  # k = 2: 3/2 × 0.03
    assert merged_p_value([0.001, 0.002, 0.9, 0.8]) == pytest.approx(0.004)  # k = 2: 4/2 × 0.002
    assert merged_p_value([0.6, 0.7, 0.9]) == 1.0  # capped
    # one seed that happens to be extreme does not carry the merge
    assert merged_p_value([1e-9, 0.4, 0.5]) > 0.5
    with pytest.raises(ValueError):
        merged_p_value([])


def test_merging_keeps_the_level_when_k_of_n_runs_are_small_together():
    """Rüger's bound is sharp: the p-values below share one small event as far as they can.
    With n = 3, k = 2 and level 0.05, the event 'at least 2 of 3 p-values ≤ 0.05 · 2/3' can have
    probability 0.05 exactly (each p-value uniform); the merge must reject on it and no more."""
    import numpy as np

    from backdoorlab.detectors import merged_p_value

    rng = np.random.default_rng(0)
    n, alpha, trials = 3, 0.05, 40_000
    c = alpha * 2 / 3
    # each p-value is uniform on [0, 1]: with probability alpha two of the three (a random pair)
    # are uniform below c and the third uniform above; otherwise all three are uniform above c
    small = rng.random(trials) < alpha
    above = rng.integers(0, n, trials)
    low = rng.random((trials, n)) * c
    high = c + rng.random((trials, n)) * (1 - c)
    ps = np.where(small[:, None] & (np.arange(n)[None, :] != above[:, None]), low, high)
    for j in range(n):  # the marginals are uniform (within Monte Carlo error)
        assert abs(np.mean(ps[:, j] <= c) - c) < 4 * np.sqrt(c / trials)
    rate = np.mean([merged_p_value(list(row)) <= alpha for row in ps])
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert rate >= alpha - 3 * np.sqrt(alpha * (1 - alpha) / trials)  # and the bound is reached
    # the factor n/k is needed: with the pair uniform below alpha on an event of probability
    # 1.5 alpha (marginals still uniform), the bare median rejects 1.5 alpha of the time
    small = rng.random(trials) < 1.5 * alpha
    low = rng.random((trials, n)) * alpha
    high = alpha + rng.random((trials, n)) * (1 - alpha)
    ps = np.where(small[:, None] & (np.arange(n)[None, :] != above[:, None]), low, high)
    for j in range(n):
        assert abs(np.mean(ps[:, j] <= alpha) - alpha) < 4 * np.sqrt(alpha / trials)
    bare = np.mean(np.sort(ps, axis=1)[:, 1] <= alpha)
    assert bare > 1.4 * alpha
    assert np.mean([merged_p_value(list(row)) <= alpha for row in ps]) <= alpha


def test_scan_repeats_merges_the_seeds(tmp_path, capsys, digits_badnet):
    import json

    import pytest

    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.detectors import detect, detect_repeated, merged_p_value
    from backdoorlab.models import save_model

    clf, art, _ = digits_badnet
    runs = [detect("mm-bd", clf, None, {"seed": s}) for s in range(3)]
    merged = detect_repeated("mm-bd", clf, None, None, None, 3)
    reps = merged.detection.details["repeats"]
    assert [r["seed"] for r in reps] == [0, 1, 2]
    assert [r["p_value"] for r in reps] == [r.detection.p_value for r in runs]
    assert merged.detection.p_value == pytest.approx(merged_p_value([r.detection.p_value for r in runs]))
    assert merged.passes == sum(r.passes for r in runs)
    one = detect_repeated("mm-bd", clf, None, None, None, 1)
    assert one.detection.p_value == runs[0].detection.p_value and "repeats" not in one.detection.details
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    clean = tmp_path / "clean.h5"
    write_csaw_h5(art["valid"], clean)
    out = tmp_path / "scan"
    assert main(["scan", model, "--detector", "mm-bd", "--repeats", "3", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["repeats"] == 3 and len(doc["detectors"]["mm-bd"]["details"]["repeats"]) == 3
    assert doc["detectors"]["mm-bd"]["p_value"] == pytest.approx(merged.detection.p_value)
    assert "seed 2: p" in (out / "summary.txt").read_text()
    try:
        status = main(["scan", model, "--repeats", "0", "--out", str(tmp_path / "bad")])
    except SystemExit as stop:
        status = stop.code
    assert status == 2 and not (tmp_path / "bad").exists()


def test_detection_trigger_picture_shows_the_flagged_labels_else_the_most_suspicious(tmp_path, monkeypatch):
    import numpy as np

    from backdoorlab.detectors import Detection
    from backdoorlab.report import triggers_plot

    trig = {y: (np.full((4, 4), y / 10, np.float32), np.full((4, 4, 3), 0.5, np.float32)) for y in range(6)}
    scores = {0: 0.1, 1: 3.0, 2: 0.5, 3: 2.0, 4: -1.0, 5: 1.0}
    shown: list = []
    real = triggers_plot.plot_trigger_grid
    monkeypatch.setattr(triggers_plot, "plot_trigger_grid",
                        lambda items, path, title="": shown.append(([i[0] for i in items], title))
                        or real(items, path, title))
    flagged = Detection(scores, [3, 1], True, 0.01, "p", triggers=trig)
    assert triggers_plot.plot_detection_triggers(flagged, tmp_path / "a.png", "nc")
    assert shown[-1][0] == [3, 1] and "flagged labels" in shown[-1][1] and (tmp_path / "a.png").stat().st_size
    none = Detection(scores, [], False, 0.5, "p", triggers=trig)
    assert triggers_plot.plot_detection_triggers(none, tmp_path / "b.png", "nc")
    assert shown[-1][0] == [1, 3, 5] and "none flagged" in shown[-1][1]
    bare = Detection(scores, [1], True, 0.01, "p")  # a detector that reverses no trigger
    assert not triggers_plot.plot_detection_triggers(bare, tmp_path / "c.png", "mm-bd")
    assert not (tmp_path / "c.png").exists()


def test_repeats_refuses_a_seedless_detector_before_any_work(tmp_path, capsys, monkeypatch, digits_badnet):
    import dataclasses

    from backdoorlab import registry
    from backdoorlab.models import save_model

    @dataclasses.dataclass
    class NoSeed:
        steps: int = 1

    clf, _, _ = digits_badnet
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    ran = []
    fake = dataclasses.replace(registry.get("mm-bd"), options=NoSeed, run=lambda *a: ran.append(a))
    monkeypatch.setitem(registry._METHODS, "mm-bd", fake)
    assert main(["scan", model, "--detector", "mm-bd", "--repeats", "2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no seed option" in err[0] and not ran and not (tmp_path / "s").exists()


def test_detect_repeated_merges_flags_triggers_and_p(monkeypatch):
    import dataclasses

    import numpy as np
    import pytest

    from backdoorlab import registry
    from backdoorlab.detectors import Detection, detect_repeated

    @dataclasses.dataclass
    class Opts:
        seed: int = 0

    trig = (np.ones((2, 2), np.float32), np.zeros((2, 2, 1), np.float32))

    def run(clf, clean, o):  # seeds 0 and 1 flag label 1, only seed 0 keeps its trigger
        p = {0: 0.01, 1: 0.02, 2: 0.5}[o.seed]
        return Detection({1: 3.0 - o.seed, 2: 0.5}, [1] if o.seed < 2 else [], o.seed < 2, p, "p",
                         triggers={1: trig} if o.seed == 0 else {}, p_value=p)

    fake = dataclasses.replace(registry.get("mm-bd"), options=Opts, run=run)
    monkeypatch.setitem(registry._METHODS, "mm-bd", fake)
    res = detect_repeated("mm-bd", None, None, None, [1], 3)
    det = res.detection
    assert det.p_value == pytest.approx(1.5 * 0.02) and det.flagged == [1] and det.backdoored
    assert det.details["triggers_from_seed"] == 1 and 1 in det.triggers  # taken from seed 0
    assert det.scores == pytest.approx({1: 2.0, 2: 0.5}) and res.right_target
    assert [r["seed"] for r in det.details["repeats"]] == [0, 1, 2]


def test_report_shows_a_scan(tmp_path, capsys, digits_badnet):
    from backdoorlab.models import save_model

    clf, _, _ = digits_badnet
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    runs = tmp_path / "runs"
    assert main(["scan", model, "--detector", "mm-bd", "--out", str(runs / "scan")]) == 0
    assert main(["report", str(runs)]) == 0
    md = (runs / "report.md").read_text()
    section = md[md.index("## Scan: scan"):]
    assert "Verdict: **backdoored**; suspected target label(s) 0" in section  # mm-bd flags it at 0.05
    assert "| mm-bd | 0 |" in section and "Bonferroni" in section
