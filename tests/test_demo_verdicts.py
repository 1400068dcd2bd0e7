"""The demo's verdicts follow the issue's bar: removed = ASR <= 2 % at <= 2 points of accuracy."""

from backdoorlab.demo import _labels, _repair_row, _verdicts


def res(before_acc, after_acc, asr, seconds=3.0, der=0.9):
    return {"before": {"clean_accuracy": before_acc, "sets": [{"asr": 0.99}]},
            "after": {"clean_accuracy": after_acc, "sets": [{"asr": asr}]},
            "der": der, "cost": {"seconds": seconds}}


def test_repair_rows_and_verdicts():
    assert _repair_row("a", res(0.95, 0.94, 0.02))[-1] == "removes the backdoor"
    assert _repair_row("a", res(0.95, 0.90, 0.01))[-1] == "removes it, at 5.0 pts of accuracy"
    assert _repair_row("a", res(0.95, 0.95, 0.30))[-1].startswith("weak: the backdoor partly stays")
    assert _repair_row("a", res(0.95, 0.95, 0.90))[-1] == "weak: the backdoor stays (ASR 90.0 %)"
    # a weak repair that also costs accuracy says so (FT-SAM on the demo's 136 images: -31 points)
    assert (_repair_row("a", res(0.96, 0.647, 0.466))[-1]
            == "weak: the backdoor partly stays (ASR 46.6 %; costs 31.3 pts of accuracy)")
    assert _labels([]) == "none" and _labels([0]) == "label 0" and _labels([0, 4]) == "labels 0, 4"
    models = {"badnets": {"asr": 0.99}, "ftrojan": {"asr": 0.04}}
    v = _verdicts(models, {"clean": [], "badnets": [0]},
                  {"x": res(0.95, 0.945, 0.01, 7), "y": res(0.95, 0.95, 0.5)})
    assert v[0] == "clean: Neural Cleanse flagged no label (no false alarm)."
    assert "found by Neural Cleanse (label 0; the attack's target); removed by x (best: x, ASR 1.0 %" in v[1]
    assert v[2].startswith("ftrojan: not implanted") and "--quick" not in v[2]
    v = _verdicts(models, {"clean": [], "badnets": [0]}, {}, quick=True)
    assert "not implanted" in v[2] and "--quick trains it like the others" in v[2]
    assert "--quick" not in _verdicts({"badnets": {"asr": 0.99}, "ftrojan": {"asr": 0.99}},
                                      {"clean": [], "badnets": [0]}, {}, quick=True)[2]
    v = _verdicts(models, {"clean": [3], "badnets": []}, {"y": res(0.95, 0.95, 0.5)})
    assert "a false alarm" in v[0] and "missed by Neural Cleanse; not removed by any repair" in v[1]
