"""--device / --precision: the device path the CPU runs is the one a GPU runs; GPU tests are marked
``gpu`` and skip where no CUDA device is present."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.device import autocast, check_precision, describe, gpu_count, resolve_device
from backdoorlab.errors import BadInput

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


def test_resolve_device_and_precision():
    assert resolve_device("cpu") == torch.device("cpu")
    if not HAS_CUDA and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert resolve_device("auto") == torch.device("cpu")
        assert gpu_count("auto") == 0
    for bad, msg in (("tpu", "expected one of"), ("cuda:x", "cuda:N")):
        with pytest.raises(BadInput, match=msg):
            resolve_device(bad)
    if not HAS_CUDA:
        with pytest.raises(BadInput, match="no CUDA device"):
            resolve_device("cuda:0")
    assert gpu_count("cuda:1") == 1 and gpu_count("cpu") == 0 and gpu_count(None) == 0
    cpu = torch.device("cpu")
    assert check_precision("BF16", cpu) == "bf16"
    with pytest.raises(BadInput, match="needs a GPU"):
        check_precision("fp16", cpu)
    with pytest.raises(BadInput, match="expected one of"):
        check_precision("fp8", cpu)
    assert describe(cpu, "fp32") == "device: cpu, precision fp32"
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_a_missing_device_before_any_work(tmp_path, capsys, digits_badnet):
    from backdoorlab.models import save_model

    clf, _, _ = digits_badnet
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    assert main(["detect", "mm-bd", model, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["attack", "--data", "digits", "--arch", "small_cnn", "--precision", "fp16",
                 "--out", str(tmp_path / "a")]) == 2
    assert "needs a GPU" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_the_device_travels_with_the_classifier(digits_badnet):
    clf, _, test = digits_badnet
    x = test.images[:64]
    ref = clf.logits(x)
    c = clf.copy().to(torch.device("cpu"), "fp32")  # the path a GPU takes, on the CPU
    assert c.device == torch.device("cpu") and c.precision == "fp32"
    assert next(c.net.parameters()).device == c.device
    np.testing.assert_array_equal(c.logits(x), ref)  # fp32 on the CPU: the same numbers
    # copies and rescaled views keep device and precision
    b = clf.copy().to(None, "bf16")
    assert b.copy().precision == "bf16" and b.with_scale("raw").precision == "bf16"


def test_bf16_inference_is_close_to_fp32(digits_badnet):
    clf, art, test = digits_badnet
    b = clf.copy().to(None, "bf16")
    z32, z16 = clf.logits(test.images), b.logits(test.images)
    assert z16.dtype == np.float32  # host arrays stay float32
    agree = float((z32.argmax(1) == z16.argmax(1)).mean())
    assert agree >= 0.98, agree
    scale = np.abs(z32).max()
    assert np.abs(z32 - z16).max() <= 0.05 * scale  # bf16 keeps ~3 significant digits


def test_bf16_training_learns(digits_badnet):
    from backdoorlab.data.digits import load_digits
    from backdoorlab.models.architectures import build
    from backdoorlab.models.classifier import Classifier
    from backdoorlab.models.spec import InputSpec
    from backdoorlab.train import TrainConfig, seeded_init, train

    train_data, test = load_digits().split(0.25, seed=3)
    seeded_init(0)
    spec = InputSpec(*train_data.shape)
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn").to(None, "bf16")
    log = train(clf, train_data, test, TrainConfig(epochs=3, batch_size=64, lr=2e-3, seed=0))
    assert all(np.isfinite(e["loss"]) for e in log.epochs)
    assert log.best_valid_accuracy > 0.8  # fp32 reaches about 0.95 in 3 epochs


def test_run_compute_table(tmp_path):
    from backdoorlab.experiment.cells import plan_cells
    from backdoorlab.experiment.config import parse_experiment

    def doc(**compute):
        d = {"data": {"source": "digits"}, "model": {"arch": "small_cnn"},
             "attack": [{"name": "b", "trigger": "patch", "target": 0}],
             "defense": [{"name": "p", "kind": "prune"}]}
        if compute:
            d["compute"] = compute
        return parse_experiment(d, "x.toml")

    plain, cpu = plan_cells(doc()), plan_cells(doc(device="cpu", precision="fp32"))
    assert [c.key for c in plain] == [c.key for c in cpu]  # the defaults keep the cache keys
    bf = plan_cells(doc(precision="bf16"))
    assert all(c.spec.get("compute") == {"precision": "bf16"} for c in bf)
    assert not set(c.key for c in bf) & set(c.key for c in plain)
    if not HAS_CUDA:
        with pytest.raises(BadInput, match=r"x.toml \[compute\].*no CUDA device"):
            doc(device="cuda")
    with pytest.raises(BadInput, match="unknown"):
        doc(gpus=2)


# -- on a GPU: the same computations within a stated tolerance of the CPU -----------------------

@pytest.mark.gpu
@gpu
def test_gpu_training_matches_cpu():
    from backdoorlab.data.digits import load_digits
    from backdoorlab.models.architectures import build
    from backdoorlab.models.classifier import Classifier
    from backdoorlab.models.spec import InputSpec
    from backdoorlab.train import TrainConfig, seeded_init, train

    train_data, test = load_digits().split(0.25, seed=3)
    accs = []
    for dev in ("cpu", "cuda"):
        seeded_init(0)
        spec = InputSpec(*train_data.shape)
        clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn").to(dev)
        accs.append(train(clf, train_data, test, TrainConfig(epochs=3, seed=0)).best_valid_accuracy)
    assert abs(accs[0] - accs[1]) <= 0.03  # different kernels, same learning


@pytest.mark.gpu
@gpu
def test_gpu_neural_cleanse_label_matches_cpu(digits_badnet):
    from backdoorlab.defenses.neural_cleanse import NCConfig, neural_cleanse

    clf, art, _ = digits_badnet
    cfg = NCConfig(mode="full", labels=[0, 1], max_steps=100, num_images=256)
    cpu = neural_cleanse(clf, art["valid"], cfg)
    gpu_ = neural_cleanse(clf.copy().to("cuda"), art["valid"], cfg)
    for a, b in zip(cpu.labels, gpu_.labels, strict=True):
        assert abs(a.norm - b.norm) <= 0.1 * max(a.norm, 1.0)  # within 10 % of the mask norm


@pytest.mark.gpu
@gpu
def test_gpu_pruning_sweep_and_repair_match_cpu(digits_badnet, badnet):
    from backdoorlab.defenses.pruning import prune_sweep
    from backdoorlab.repairs import repair

    clf, art, test = digits_badnet
    cpu = prune_sweep(clf, art["valid"], test)
    gpu_ = prune_sweep(clf.copy().to("cuda"), art["valid"], test)
    np.testing.assert_allclose(cpu.valid_accuracy, gpu_.valid_accuracy, atol=0.01)
    model, data, test_, poisoned = badnet
    _, a = repair("nad", model, data, test_, poisoned, {"epochs": 2})
    _, b = repair("nad", model.copy().to("cuda"), data, test_, poisoned, {"epochs": 2})
    assert abs(a.after.clean_accuracy - b.after.clean_accuracy) <= 0.03



# -- every family through the device path -------------------------------------------------------
# One model detector (MM-BD), one input detector (STRIP), one data inspector (spectral signatures)
# and the repairs that do not train through `backdoorlab.train.train` (ANP: its own optimisation of
# masks and perturbations; CLP: weights only), each run by one function on a model moved with
# `Classifier.to`. On the CPU an explicit torch.device("cpu") gives the very numbers of the default
# model; on CUDA the numbers are within each test's stated tolerance of the CPU's.

def _mm_bd(clf, art, test) -> dict:
    from backdoorlab.detectors.mm_bd import Options, max_margins

    margins, _ = max_margins(clf, Options(steps=30, starts=2, tol=0))
    return {"margins": margins}


def _strip(clf, art, test) -> dict:
    from backdoorlab.input_detectors import fit_filter

    filt = fit_filter("strip", clf, art["valid"], {"copies": 20})
    return {"scores": filt.scorer.score(test.images[:150]), "threshold": np.array(filt.threshold)}


def _poisoned_training_set(art):
    """The clean validation split plus 15 of its poisoned images labelled with the target (0)."""
    from backdoorlab.data.imageset import ImageSet

    valid, (pv, _) = art["valid"], art["poisoned_valid"][0]
    keep = np.flatnonzero(pv.labels != 0)[:15]
    return ImageSet(np.concatenate([valid.images, pv.images[keep]]),
                    np.concatenate([valid.labels, np.zeros(len(keep), np.int64)]), valid.num_classes,
                    "valid+15 poisoned"), np.arange(len(valid), len(valid) + len(keep))


def _spectral(clf, art, test) -> dict:
    from backdoorlab.inspectors import features, inspect

    data, truth = _poisoned_training_set(art)
    res = inspect("spectral", clf, data, truth=truth)
    return {"features": features(clf, data)[0], "scores": res.inspection.scores,
            "flagged": res.inspection.flagged}


def _anp(clf, art, test) -> dict:
    from backdoorlab.repairs import DefenderData, repair

    _, res = repair("anp", clf, DefenderData(clean=art["valid"]), test, [],
                    {"iterations": 20, "prune_by": "count", "count": 10})
    mask = np.concatenate([np.asarray(v) for v in res.details["mask"].values()])
    pruned = sorted((k, c) for k, cs in res.details["pruned"].items() for c in cs)
    return {"mask": mask, "pruned": np.array(pruned, dtype=object),
            "accuracy": np.array(res.after.clean_accuracy)}


def _clp(clf, art, test) -> dict:
    from backdoorlab.repairs import DefenderData, repair

    model, res = repair("clp", clf, DefenderData(clean=art["valid"]), test, [], {"u": 1.5})
    uclc = np.concatenate([np.asarray(layer["uclc"]) for layer in res.details["layers"]])
    pruned = sorted((k, c) for k, cs in res.details["pruned"].items() for c in cs)
    return {"uclc": uclc, "pruned": np.array(pruned, dtype=object),
            "predictions": model.predict(test.images)}


def _abs(clf, art, test) -> dict:
    from backdoorlab.detectors import detect

    det = detect("abs", clf, art["valid"], {"candidates": 3, "steps": 30}).detection
    c = det.details["candidates"]
    return {"neurons": np.array([x["neuron"] for x in c]), "labels": np.array([x["label"] for x in c]),
            "stimulation": np.array([x["score"] for x in c]), "reasr": np.array([x["reasr"] for x in c])}


FAMILIES = {"abs": _abs, "mm-bd": _mm_bd, "strip": _strip, "spectral": _spectral, "anp": _anp, "clp": _clp}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_runs_on_an_explicit_cpu_device_with_the_same_numbers(digits_badnet, family):
    clf, art, test = digits_badnet
    run = FAMILIES[family]
    explicit = clf.copy().to(torch.device("cpu"), "fp32")
    assert explicit.device == torch.device("cpu") and explicit.precision == "fp32"
    a, b = run(clf, art, test), run(explicit, art, test)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{family}: {key}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_runs_under_bf16_autocast_on_the_cpu(digits_badnet, family):
    """The same functions at ``--precision bf16`` (CPU autocast): they run, and what they decide is
    close to fp32 (bf16 keeps ~3 significant digits; the figures here were measured within a few
    per cent)."""
    clf, art, test = digits_badnet
    run = FAMILIES[family]
    a, b = run(clf, art, test), run(clf.copy().to(None, "bf16"), art, test)
    if family == "abs":  # the first candidate the same, scores within 5 %, its REASR within 5 points
        assert a["labels"][0] == b["labels"][0]
        assert np.abs(a["stimulation"] - b["stimulation"]).max() <= 0.05 * a["stimulation"].max()
        assert abs(a["reasr"][0] - b["reasr"][0]) <= 0.05
    elif family == "mm-bd":
        assert np.argmax(a["margins"]) == np.argmax(b["margins"])
        assert np.abs(a["margins"] - b["margins"]).max() <= 0.05 * np.abs(a["margins"]).max()
    elif family == "strip":
        assert np.abs(a["scores"] - b["scores"]).max() <= 0.05  # bits of mean entropy
    elif family == "spectral":
        assert len(np.intersect1d(a["flagged"], b["flagged"])) >= 0.9 * len(a["flagged"])
    elif family == "anp":
        assert np.abs(a["mask"] - b["mask"]).mean() <= 0.02
    else:  # clp reads the weights only: no autocast anywhere
        np.testing.assert_array_equal(a["uclc"], b["uclc"])


@contextlib.contextmanager
def _no_tf32():
    """CUDA convolutions default to TF32 (10-bit mantissa) on Ampere and later; the comparisons
    with the CPU below turn it off so that the tolerances measure the device path, not TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on_cpu_and_cuda(family, digits_badnet):
    clf, art, test = digits_badnet
    run = FAMILIES[family]
    with _no_tf32():
        return run(clf, art, test), run(clf.copy().to("cuda"), art, test)


@pytest.mark.gpu
@gpu
def test_gpu_mm_bd_matches_cpu(digits_badnet):
    cpu, gpu_ = _on_cpu_and_cuda("mm-bd", digits_badnet)
    # 30 Adam steps from the same (host-drawn) starts: the same target, every class's margin
    # within 5 % of the largest margin
    assert np.argmax(cpu["margins"]) == np.argmax(gpu_["margins"])
    assert np.abs(cpu["margins"] - gpu_["margins"]).max() <= 0.05 * np.abs(cpu["margins"]).max()


@pytest.mark.gpu
@gpu
def test_gpu_abs_matches_cpu(digits_badnet):
    cpu, gpu_ = _on_cpu_and_cuda("abs", digits_badnet)
    # stimulation is inference only: the same candidate neurons and labels, scores within 0.1 %;
    # the 30-step reversal of the first (the target's) neuron within 5 points of REASR
    np.testing.assert_array_equal(cpu["neurons"], gpu_["neurons"])
    np.testing.assert_array_equal(cpu["labels"], gpu_["labels"])
    np.testing.assert_allclose(gpu_["stimulation"], cpu["stimulation"], rtol=1e-3)
    assert abs(cpu["reasr"][0] - gpu_["reasr"][0]) <= 0.05


@pytest.mark.gpu
@gpu
def test_gpu_strip_matches_cpu(digits_badnet):
    cpu, gpu_ = _on_cpu_and_cuda("strip", digits_badnet)
    # inference only, the same overlay draws: scores (minus mean entropy, bits) within 0.01 bit
    np.testing.assert_allclose(gpu_["scores"], cpu["scores"], rtol=0, atol=0.01)
    assert abs(float(gpu_["threshold"]) - float(cpu["threshold"])) <= 0.01


@pytest.mark.gpu
@gpu
def test_gpu_spectral_matches_cpu(digits_badnet):
    cpu, gpu_ = _on_cpu_and_cuda("spectral", digits_badnet)
    scale = float(np.abs(cpu["features"]).max())
    # penultimate features within 0.1 % of their largest value; at least 95 % of the flagged rows
    # the same (rows right at a class's cut-off may swap)
    np.testing.assert_allclose(gpu_["features"], cpu["features"], rtol=0, atol=1e-3 * scale)
    assert len(np.intersect1d(cpu["flagged"], gpu_["flagged"])) >= 0.95 * len(cpu["flagged"])


@pytest.mark.gpu
@gpu
def test_gpu_anp_and_clp_match_cpu(digits_badnet):
    cpu, gpu_ = _on_cpu_and_cuda("anp", digits_badnet)
    # 20 mask steps: masks within 0.02 on average (0.1 at most), 8 of the 10 pruned neurons the
    # same, clean accuracy after within 3 points
    d = np.abs(cpu["mask"] - gpu_["mask"])
    assert d.mean() <= 0.02 and d.max() <= 0.1
    same = {tuple(p) for p in cpu["pruned"]} & {tuple(p) for p in gpu_["pruned"]}
    assert len(same) >= 8
    assert abs(float(cpu["accuracy"]) - float(gpu_["accuracy"])) <= 0.03
    cpu, gpu_ = _on_cpu_and_cuda("clp", digits_badnet)
    # CLP reads the weights only (float64, on the host): the same bounds and channels exactly
    np.testing.assert_array_equal(cpu["uclc"], gpu_["uclc"])
    assert [tuple(p) for p in cpu["pruned"]] == [tuple(p) for p in gpu_["pruned"]]
    assert np.mean(cpu["predictions"] == gpu_["predictions"]) >= 0.99

def test_the_first_line_says_the_device(tmp_path, capsys, digits_badnet):
    from backdoorlab.models import save_model

    clf, _, _ = digits_badnet
    model = str(save_model(clf, tmp_path / "m.safetensors"))
    assert main(["detect", "mm-bd", model, "--precision", "bf16", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == "device: cpu, precision bf16"
    assert main(["detect", "mm-bd", model, "--out", str(tmp_path / "p")]) == 0  # the defaults: silent
    assert "device:" not in capsys.readouterr().err
