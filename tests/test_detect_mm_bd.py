"""MM-BD (data-free maximum-margin detector): the digits BadNet is flagged, a clean digits model is
not, the margin search reaches the exact optimum of a linear network (an LP) through the model's
own input spec, the order-statistic p-value, and the CLI without --clean."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from backdoorlab.cli import main
from backdoorlab.detectors import detect
from backdoorlab.detectors.mm_bd import (
    Options,
    calibrated_p_value,
    max_margins,
    order_statistic_test,
)
from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.spec import InputSpec

TARGET = 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module (restored afterwards): on a loaded 2-core machine the small
    batches here run many times faster without OpenMP contention. (A session fixture such as
    digits_badnet is built before this one and keeps the default.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean_digits_model(one_thread):
    from backdoorlab.data.digits import load_digits
    from backdoorlab.models.architectures import build
    from backdoorlab.train import TrainConfig, seeded_init, train

    train_data, test = load_digits().split(0.25, seed=3)  # the split digits_badnet uses
    spec = InputSpec(16, 16, 1, "unit")
    seeded_init(0)
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")
    train(clf, train_data, None, TrainConfig(epochs=6, batch_size=64, lr=2e-3, seed=0))
    acc = float((clf.predict(test.images) == test.labels).mean())
    assert acc > 0.85, acc
    return clf


def test_flags_the_badnet_target(digits_badnet):
    clf, _, _ = digits_badnet
    res = detect("mm-bd", clf, None, targets=[TARGET])  # paper-derived defaults, no data
    det = res.detection
    assert det.flagged == [TARGET] and det.backdoored and res.right_target
    assert det.statistic_name == "p-value (max margin under a Gamma null, calibrated)"
    assert det.statistic < 0.05
    cal = det.details["calibration"]  # too extreme for 20 exceedances: every draw was made
    assert cal["draws"] == 200 and det.statistic == (cal["exceedances"] + 1) / 201
    m = det.details["margins"]
    assert len(m) == 10 and max(m) == m[TARGET] == det.scores[TARGET]
    assert m[TARGET] > 1.3 * sorted(m)[-2]  # an outlier, not a near tie
    d = det.details
    assert d["argmax"] == TARGET and d["exponent"] == 9 and d["null_fit"] == "mle"
    assert set(d["null"]) == {"shape", "loc", "scale"}
    # the plug-in p-value reported is the paper's formula on the margins reported
    a, loc, scale = d["null"]["shape"], d["null"]["loc"], d["null"]["scale"]
    want = 1 - stats.gamma.cdf(m[TARGET], a, loc=loc, scale=scale) ** 9
    assert d["plug_in_p_value"] == pytest.approx(want, rel=1e-3, abs=1e-12)
    # cost: every (class, start) input once per step, plus the final evaluation pass
    o = Options()
    assert res.passes == d["input_steps"] <= 10 * o.starts * (o.steps + 1)
    assert res.passes > 10 * o.starts * o.steps // 2


def test_clean_model_not_flagged(clean_digits_model):
    det = detect("mm-bd", clean_digits_model, None).detection
    assert det.flagged == [] and not det.backdoored
    assert det.statistic > 0.05
    assert len(det.scores) == 10 and all(np.isfinite(v) for v in det.scores.values())


def test_ignores_clean_data_and_is_seeded(digits_badnet):
    clf, art, _ = digits_badnet
    o = {"starts": 2, "steps": 15}
    a = detect("mm-bd", clf, art["valid"], o).detection
    b = detect("mm-bd", clf, None, {**o, "chunk": 3}).detection  # other chunking, same starts
    c = detect("mm-bd", clf, None, {**o, "seed": 1}).detection
    assert np.allclose(a.details["margins"], b.details["margins"], rtol=1e-4, atol=1e-4)
    assert a.details["margins"] != c.details["margins"]
    assert any("data-free" in n for n in a.notes) and not any("data-free" in n for n in b.notes)
    floor = [n for n in b.notes if "floor" in n]  # a backdoor no null draw matches
    assert floor and "1/201" in floor[0] and b.statistic == 1 / 201


def _affine(clf: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with logits = A · pixels + c for a linear network, probed through `clf.logits` on
    uint8 images (independent of how the detector maps its variable to the network's input)."""
    shape = clf.spec.shape
    d = int(np.prod(shape))
    c = clf.logits(np.zeros((1, *shape), np.uint8))[0].astype(np.float64)
    eye = np.zeros((d, *shape), np.uint8)
    eye.reshape(d, d)[np.arange(d), np.arange(d)] = 100
    a = (clf.logits(eye).astype(np.float64) - c) / 100.0
    return a.T, c


@pytest.mark.parametrize("scale", ["unit", "raw"])
def test_max_margin_of_a_linear_network_matches_the_lp(scale):
    """For logits linear in the pixels, max over pixels in [0, 255] of logit_k - max_j logit_j is
    a linear programme; the detector's search must reach (not exceed) its optimum for every k."""
    from scipy.optimize import linprog

    torch.manual_seed(0)
    spec = InputSpec(3, 4, 2, scale, mean=(0.4, 0.6) if scale == "unit" else (100.0, 120.0),
                     std=(0.2, 0.3) if scale == "unit" else (50.0, 70.0))
    k = 5
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, k))
    if scale == "raw":
        with torch.no_grad():
            net[1].weight.mul_(0.1)
    clf = Classifier(net, spec, k, channels_last=False)
    a, c = _affine(clf)
    d = a.shape[1]
    margins, sched = max_margins(clf, Options(starts=2, steps=300, lr=0.02, tol=0))
    for y in range(k):
        # maximise t subject to t <= (a_y - a_j) p + c_y - c_j for all j != y, 0 <= p <= 255
        rows = [np.r_[-(a[y] - a[j]), 1.0] for j in range(k) if j != y]
        rhs = [c[y] - c[j] for j in range(k) if j != y]
        lp = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.array(rows), b_ub=np.array(rhs),
                     bounds=[(0, 255)] * d + [(None, None)], method="highs")
        assert lp.status == 0
        best = -lp.fun
        assert margins[y] <= best + 1e-3 * max(1.0, abs(best))  # attained by a valid image
        assert margins[y] >= best - 0.02 * max(1.0, abs(best)), (y, margins[y], best)
    assert sched["input_steps"] == k * 2 * 301


def test_p_value_math():
    rng = np.random.default_rng(0)
    null = rng.gamma(6.0, 2.0, size=43) + 5.0
    plain = order_statistic_test(null)
    assert plain["p_value"] > 0.2 and plain["argmax"] == int(np.argmax(null))
    outlier = np.append(null, null.max() * 2.5)
    res = order_statistic_test(outlier)
    assert res["argmax"] == 43 and res["p_value"] < 1e-4
    a, loc, scale = (res["null"][key] for key in ("shape", "loc", "scale"))
    assert res["p_value"] == pytest.approx(1 - stats.gamma.cdf(outlier[43], a, loc=loc,
                                                               scale=scale) ** 43, rel=1e-6)
    # a null with a known Gamma fit: the p-value is 1 - F(r_max)^(K-1), K - 1 = 43 null draws
    a0, loc0, scale0 = stats.gamma.fit(null)
    r = float(stats.gamma.ppf(1 - 0.01 / 43, a0, loc=loc0, scale=scale0))  # p ~ 0.01
    assert order_statistic_test(np.append(null, r))["p_value"] == pytest.approx(
        1 - (1 - 0.01 / 43) ** 43, rel=1e-4)
    # the tail is kept: no rounding to 0 before the p-value is tiny
    far = order_statistic_test(np.append(null, null.max() * 6))
    assert 0.0 <= far["p_value"] < 1e-12
    # a constant null, and too few classes
    assert order_statistic_test([3.0, 3.0, 3.0, 9.0])["p_value"] == 0.0
    assert order_statistic_test([3.0, 3.0, 3.0, 3.0])["p_value"] == 1.0
    with pytest.raises(BadInput):
        order_statistic_test([1.0, 2.0, 3.0])


@pytest.mark.slow
def test_calibrated_p_value_has_its_size_under_the_null_and_the_plug_in_does_not():
    """40 backdoor-free "models" of K = 10 classes whose margins are exact Gamma draws: the
    calibrated p-value falls below 0.25 about a quarter of the time (binomial(40, 0.25): ≥ 18
    with probability 0.004), the paper's plug-in value far more often (its fit to the 9 smallest
    of 10 values understates the tail)."""
    rng = np.random.default_rng(7)
    plug, cal = 0, 0
    for i in range(40):
        res = order_statistic_test(rng.gamma(5.0, 2.0, size=10) + 3.0)
        p, _ = calibrated_p_value(res, 10, 60, seed=i)
        plug += res["p_value"] < 0.25
        cal += p < 0.25
    assert cal <= 17, cal
    assert plug >= 20, plug


def test_calibration_stops_early_floors_and_can_be_turned_off():
    rng = np.random.default_rng(0)
    null = rng.gamma(6.0, 2.0, size=42) + 5.0
    plain = order_statistic_test(null)  # nothing unusual: stops after 20 exceedances, quickly
    p, info = calibrated_p_value(plain, 42, 1000, seed=0)
    assert info["exceedances"] == 20 and info["draws"] < 200 and p == pytest.approx(20 / info["draws"])
    far = order_statistic_test(np.append(null, null.max() * 6))  # no draw is as extreme
    p, info = calibrated_p_value(far, 43, 50, seed=0)
    assert info == {"draws": 50, "exceedances": 0, "method": "Monte Carlo"} and p == 1 / 51
    assert calibrated_p_value(far, 43, 0, seed=0)[0] == far["p_value"]  # off: the paper's value
    assert calibrated_p_value(far, 43, 50, seed=3) == calibrated_p_value(far, 43, 50, seed=3)


def test_cli_without_clean_data(tmp_path, digits_badnet, capsys):
    from backdoorlab.models.files import save_model

    clf, _, _ = digits_badnet
    model = save_model(clf, tmp_path / "m.safetensors")
    out = tmp_path / "d"
    assert main(["detect", "mm-bd", str(model), "--steps", "20", "--starts", "2",
                 "--target", str(TARGET), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weights alone" in printed and "verdict:" in printed
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "mm-bd" and r["inputs"]["clean"] is None
    assert r["statistic_name"] == "p-value (max margin under a Gamma null, calibrated)"
    assert r["options"]["steps"] == 20 and len(r["scores"]) == 10
    assert r["flagged"] == [TARGET] and r["right_target"] is True
    assert r["cost"]["image_passes"] == r["details"]["input_steps"] > 0
    for bad in (["--alpha", "2"], ["--steps", "0"], ["--optimizer", "lbfgs"]):
        with pytest.raises(SystemExit) as e:  # refused by argparse: one line, status 2
            main(["detect", "mm-bd", str(model), *bad, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and not (tmp_path / "bad").exists()
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: argument {bad[0]}") and "\n" not in err
    with pytest.raises(BadInput, match="alpha"):  # the same check for options given as a mapping
        detect("mm-bd", clf, None, {"alpha": 2})


def test_too_few_classes_refused():
    spec = InputSpec(2, 2, 1, "unit")
    clf = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), spec, 3,
                     channels_last=False)
    with pytest.raises(BadInput, match="at least 4 classes"):
        detect("mm-bd", clf, None)


def test_list_says_it_needs_no_data(capsys):
    assert main(["list", "--family", "model-detector"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.strip().startswith("mm-bd "))
    assert lines[i + 1].rstrip().endswith("needs no data (the model alone)")


def test_run_cell_passes_no_clean_data_to_a_data_free_detector():
    from pathlib import Path

    from backdoorlab.experiment.cells import Cell, detect_args

    files = {"model": "m.safetensors", "clean_valid": "v.h5"}
    pres = {"files": files, "target": [0]}
    args = {}
    for method in ("mm-bd", "neural-cleanse"):
        cell = Cell("k" * 16, f"x-{method}", "detect", "a", method, 0,
                    {"method": method, "options": {}, "family": "model-detector"}, "p")
        args[method] = detect_args(cell, Path("parent"), Path("out"), pres)
    assert "--clean" not in args["mm-bd"]
    assert args["neural-cleanse"][args["neural-cleanse"].index("--clean") + 1] == str(
        Path("parent") / "v.h5")


def test_detect_writes_the_reversed_triggers_as_npz_and_picture(digits_badnet, tmp_path, capsys):
    """A detector that reverses triggers (Neural Cleanse) leaves them in --out as triggers.npz
    (for `repair --triggers`) and triggers.png; one that makes none (MM-BD) writes neither."""
    import numpy as np
    from PIL import Image

    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.defenses.neural_cleanse import load_triggers
    from backdoorlab.models import save_model

    clf, art, _ = digits_badnet
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    clean = tmp_path / "clean.h5"
    write_csaw_h5(art["valid"], clean)
    nc = tmp_path / "nc"
    assert main(["detect", "neural-cleanse", model, "--clean", str(clean), "--steps", "30",
                 "--out", str(nc)]) == 0
    assert "triggers.npz, triggers.png" in capsys.readouterr().out
    trig = load_triggers(nc / "triggers.npz")
    assert trig and all(m.shape == clf.spec.shape[:2] for m, _ in trig.values())
    picture = np.asarray(Image.open(nc / "triggers.png"))
    assert picture.shape[0] > 0 and picture.std() > 0  # not a blank image
    mm = tmp_path / "mm"
    assert main(["detect", "mm-bd", model, "--steps", "5", "--starts", "1", "--out", str(mm)]) == 0
    assert not (mm / "triggers.png").exists() and not (mm / "triggers.npz").exists()
