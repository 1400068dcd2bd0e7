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


def test_verdicts_say_what_mm_bd_found_from_the_weights():
    def scan(backdoored, targets, p):
        return {"backdoored": backdoored, "targets": targets, "detectors": {"mm-bd": {"p_value": p}}}

    models = {"badnets": {"asr": 0.99}, "ftrojan": {"asr": 0.95}}
    v = _verdicts(models, {"clean": [], "badnets": [0]}, {},
                  scans={"clean": scan(False, [], 0.15), "badnets": scan(True, [0], 4.2e-11),
                         "ftrojan": scan(False, [], 0.21)})
    assert v[0].endswith("MM-BD, from the weights alone, found no backdoor (p 0.15).")
    assert v[1].endswith("MM-BD, from the weights alone, flags label 0 (p 4.2e-11).")
    assert v[2].endswith("found no backdoor (p 0.21) — a miss.")  # implanted, yet not found
    v = _verdicts(models, {"clean": [], "badnets": [0]}, {}, scans={"clean": scan(True, [4], 0.01)})
    assert v[0].endswith("flags label 4 (p 0.01) — a false alarm.") and "MM-BD" not in v[1]
