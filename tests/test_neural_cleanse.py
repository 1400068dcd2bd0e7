"""Neural Cleanse: composition, scale invariance, a planted backdoor, fast vs full, resume, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data.digits import load_digits
from backdoorlab.data.imageset import ImageSet
from backdoorlab.defenses.neural_cleanse import (
    NCConfig,
    apply_trigger,
    compose,
    load_triggers,
    neural_cleanse,
)
from backdoorlab.errors import BadInput
from backdoorlab.models.architectures import build
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.files import save_model
from backdoorlab.models.spec import InputSpec
from backdoorlab.train import TrainConfig, seeded_init, train

TARGET = 0
# a test-sized budget: 256 clean images, at most 100 mini-batch steps per label
TEST_CFG = dict(num_images=256, max_steps=100, batch_size=32)


def stamp(images: np.ndarray) -> np.ndarray:
    """3×3 white patch in the bottom-right corner."""
    out = images.copy()
    out[:, -3:, -3:, :] = 255
    return out


@pytest.fixture(scope="module")
def backdoored() -> tuple[Classifier, ImageSet]:
    """small_cnn trained on digits with 10 % of the training images stamped and relabelled 0."""
    data = load_digits(size=16)
    rest, test = data.split(0.2, seed=0)
    rng = np.random.default_rng(0)
    x, y = rest.images.copy(), rest.labels.copy()
    idx = rng.choice(len(x), size=len(x) // 10, replace=False)
    x[idx] = stamp(x[idx])
    y[idx] = TARGET
    seeded_init(0)
    spec = InputSpec(16, 16, 1, scale="unit")
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")
    train(clf, ImageSet(x, y, 10), None, TrainConfig(epochs=8, batch_size=64, lr=3e-3, seed=0))
    others = test.labels != TARGET
    assert (clf.predict(test.images) == test.labels).mean() > 0.85
    assert (clf.predict(stamp(test.images[others])) == TARGET).mean() > 0.85  # the backdoor works
    return clf, test


@pytest.fixture(scope="module")
def scan_full(backdoored):
    clf, clean = backdoored
    return neural_cleanse(clf, clean, NCConfig(mode="full", **TEST_CFG))


def test_compose_matches_formula():
    x = torch.rand(2, 4, 5, 3)
    m = torch.rand(4, 5, 1)
    p = torch.rand(4, 5, 3)
    assert torch.allclose(compose(x, m, p), (1 - m) * x + m * p, atol=1e-6)
    imgs = np.full((1, 4, 5, 3), 100, dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=np.float32)
    mask[0, 0] = 1.0
    mask[1, 1] = 0.5
    out = apply_trigger(imgs, mask, np.ones((4, 5, 3), dtype=np.float32))
    assert out[0, 0, 0, 0] == 255 and out[0, 1, 1, 0] == 178 and out[0, 2, 2, 0] == 100


def test_scale_invariance():
    """Same weights taking 0-255 pixels (conv_1 weights / 255) or [0, 1] pixels: the search,
    driven by each model's own spec, finds the same trigger and the same logits."""
    seeded_init(3)
    spec_u = InputSpec(16, 16, 1, scale="unit")
    unit = Classifier(build("small_cnn", 10, spec_u.shape), spec_u, 10, "small_cnn")
    net_raw = copy.deepcopy(unit.net)
    with torch.no_grad():
        net_raw.stages["conv_1"].weight.div_(255.0)
    raw = Classifier(net_raw, spec_u.with_scale("raw"), 10, "small_cnn")
    clean = load_digits(size=16).take(64, seed=0)
    assert np.allclose(unit.logits(clean.images), raw.logits(clean.images), atol=1e-4)
    cfg = NCConfig(mode="full", labels=[1, 2], max_steps=25, num_images=64, batch_size=16)
    ru, rr = neural_cleanse(unit, clean, cfg), neural_cleanse(raw, clean, cfg)
    for y in (1, 2):
        (mu, pu), (mr, pr) = ru.triggers[y], rr.triggers[y]
        assert np.allclose(mu, mr, atol=1e-3) and np.allclose(pu, pr, atol=1e-3)
        assert ru.label(y).norm == pytest.approx(rr.label(y).norm, rel=1e-3)
        xu = torch.from_numpy(clean.images).float() / 255
        xp_u = compose(xu, torch.from_numpy(mu)[..., None], torch.from_numpy(pu))
        xp_r = compose(xu, torch.from_numpy(mr)[..., None], torch.from_numpy(pr))
        assert torch.allclose(xp_u, xp_r, atol=1e-3)  # same x' in pixel space
        with torch.no_grad():
            lu = unit.net(unit.spec.from_unit(xp_u.permute(0, 3, 1, 2)))
            lr = raw.net(raw.spec.from_unit(xp_r.permute(0, 3, 1, 2)))
        assert torch.allclose(lu, lr, atol=1e-2)
    # control: the raw-pixel weights driven with a wrong (unit) scale give another trigger
    wrong = neural_cleanse(raw.with_scale("unit"), clean, cfg)
    assert not np.allclose(wrong.triggers[1][0], ru.triggers[1][0], atol=1e-2)


def test_planted_backdoor_recovered(scan_full):
    res = scan_full
    assert res.flagged[:1] == [TARGET], [(r.label, r.norm, r.anomaly_index) for r in res.labels]
    r0 = res.label(TARGET)
    assert r0.anomaly_index > 2 and r0.flagged and r0.reached
    assert res.smallest[0] == TARGET
    assert all(r.norm > 2 * r0.norm for r in res.labels if r.label != TARGET)
    assert r0.asr > 0.8  # the reversed trigger sends most clean images of other digits to 0
    mask = res.triggers[TARGET][0]
    assert mask.shape == (16, 16)
    share = mask[-4:, -4:].sum() / mask.sum()  # the 3x3 corner patch plus one pixel
    assert share > 0.6, np.round(mask, 1)
    # median/MAD over all labels in full mode; indexes are (median - norm) / (1.4826 MAD)
    norms = np.array([r.norm for r in res.labels])
    assert res.median == pytest.approx(np.median(norms))
    assert r0.anomaly_index == pytest.approx((res.median - r0.norm) / (1.4826 * res.mad))
    assert res.passes == sum(r.passes for r in res.labels) > 0
    json.dumps(res.to_dict())


def test_fast_agrees_with_full(backdoored, scan_full):
    clf, clean = backdoored
    cfg = NCConfig(mode="fast", suspects=2, reference_labels=5, screen_steps=20, **TEST_CFG)
    fast = neural_cleanse(clf, clean, cfg)
    screened = sorted(fast.labels, key=lambda r: r.screen_norm)
    assert screened[0].label == TARGET  # the short screen already ranks the target first
    assert TARGET in fast.suspects
    full_labels = {r.label for r in fast.labels if r.stage == "full"}
    assert full_labels == set(fast.suspects) | set(fast.reference_labels)
    assert len(fast.reference_labels) == 5 and len(full_labels) < 10
    for y in full_labels:  # a fully optimised label is optimised exactly as in full mode
        assert fast.label(y).norm == pytest.approx(scan_full.label(y).norm, rel=1e-5)
    assert fast.smallest[0] == TARGET
    # median/MAD from the random sample only: noisier with 5 of 10 labels, but no false alarm
    assert fast.median == pytest.approx(np.median([scan_full.label(y).norm
                                                   for y in fast.reference_labels]))
    assert max(fast.full_labels(), key=lambda r: r.anomaly_index).label == TARGET
    assert set(fast.flagged) <= set(scan_full.flagged)
    assert all(r.norm is None and r.screen_norm is not None
               for r in fast.labels if r.stage == "screen")
    assert fast.passes < scan_full.passes
    # with no more labels than suspects + reference labels, fast mode is full mode
    small = neural_cleanse(clf, clean, NCConfig(mode="fast", labels=[0, 1, 2, 3], **TEST_CFG))
    assert small.flagged == [] or small.flagged == [TARGET]
    assert [r.norm for r in small.labels] == [scan_full.label(y).norm for y in (0, 1, 2, 3)]


def test_resume_after_interrupt(backdoored, scan_full, tmp_path):
    clf, clean = backdoored
    cfg = NCConfig(mode="full", labels=[0, 1, 2, 3], labels_per_batch=2, **TEST_CFG)
    finished: list[int] = []

    def interrupt(stage, label, rec):
        finished.append(label)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        neural_cleanse(clf, clean, cfg, state_dir=tmp_path, on_label=interrupt)
    assert len(finished) == 1
    seen: list[int] = []
    res = neural_cleanse(clf, clean, cfg, state_dir=tmp_path,
                         on_label=lambda s, y, r: seen.append(y))
    assert finished[0] not in seen and sorted(seen + finished) == [0, 1, 2, 3]
    assert [r.label for r in res.labels if r.resumed] == finished
    for y in (0, 1, 2, 3):  # equal to the uninterrupted run (other batch composition too)
        assert res.label(y).norm == pytest.approx(scan_full.label(y).norm, rel=1e-5)
        assert res.label(y).steps == scan_full.label(y).steps
        assert np.allclose(res.triggers[y][0], scan_full.triggers[y][0], atol=1e-5)
    assert res.passes_this_run < res.passes
    with pytest.raises(BadInput, match="another model"):
        neural_cleanse(clf, clean, NCConfig(mode="full", labels=[0], seed=1, **TEST_CFG),
                       state_dir=tmp_path)


def test_bad_input(backdoored):
    clf, clean = backdoored
    with pytest.raises(BadInput, match="labels"):
        neural_cleanse(clf, clean, NCConfig(labels=[10]))
    with pytest.raises(BadInput, match="mode"):
        neural_cleanse(clf, clean, NCConfig(mode="quick"))
    with pytest.raises(BadInput, match="batch_size"):
        neural_cleanse(clf, clean, NCConfig(batch_size=0))
    wrong = ImageSet(np.zeros((4, 8, 8, 1), np.uint8), None, 10)
    with pytest.raises(BadInput, match="shape"):
        neural_cleanse(clf, wrong, NCConfig())


def test_cli_outputs_and_resume(backdoored, tmp_path, capsys):
    clf, _ = backdoored
    model = save_model(clf, tmp_path / "model.safetensors")
    out = tmp_path / "nc"
    argv = ["cleanse", str(model), "--clean", "digits", "--out", str(out), "--labels", "0,1,2",
            "--mode", "full", "--steps", "30", "--images", "128", "--top-k", "2"]
    assert main(argv) == 0
    for name in ("table.md", "table.csv", "norms.png", "smallest.png", "results.json",
                 "triggers.npz", "masks/label_0_mask.png", "masks/label_2_pattern.png",
                 "masks/label_1_masked.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in res["labels"]] == [0, 1, 2]
    # three labels, full mode: the chance figure is that of a 3-label scan at threshold 2
    from backdoorlab.defenses.outliers import null_flag_rate

    assert res["null_flag_rate"] == null_flag_rate(3, 2.0).rate
    assert "Chance of at least one flag" in (out / "table.md").read_text()
    trig = load_triggers(out / "triggers.npz")
    with np.load(out / "triggers.npz", allow_pickle=False) as z:
        assert z["masks"].shape == (3, 16, 16) and z["patterns"].shape == (3, 16, 16, 1)
    assert np.isclose(trig[0][0].sum(), res["labels"][0]["norm"], rtol=1e-4)
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].startswith("rank,label,stage,norm,anomaly_index,flagged") and len(rows) == 4
    capsys.readouterr()
    assert main(argv) == 0  # a re-run resumes every label from state/
    assert "3 resumed" in capsys.readouterr().out
    # --threshold auto re-tests the resumed labels at the family-wise 5 % index of a 3-label scan
    assert main(argv + ["--threshold", "auto"]) == 0
    auto = json.loads((out / "results.json").read_text())
    assert auto["config"]["threshold"] == "auto"
    assert auto["threshold"] == null_flag_rate(3, None).threshold_5pct != 2.0
    assert auto["null_flag_rate"] == pytest.approx(0.05, abs=0.005)
    assert auto["flagged"] == [r["label"] for r in auto["labels"] if r["anomaly_index"] > auto["threshold"]]
    with pytest.raises(BadInput, match="threshold"):
        NCConfig(threshold="high").validate()
    assert main(["cleanse", str(model), "--clean", "digits", "--out", str(out), "--labels",
                 "0,99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --labels") and "\n" not in err


def test_norm_plot_many_labels(tmp_path):
    from backdoorlab.report.triggers_plot import plot_norms

    rng = np.random.default_rng(0)
    norms = rng.normal(100, 10, 100)
    norms[7] = 20
    plot_norms(list(range(100)), norms.tolist(), [7], tmp_path / "norms.png", 100.0, 7.0)
    assert (tmp_path / "norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_registered_detector_gives_the_scans_numbers(backdoored, scan_full, tmp_path, capsys):
    """`detect neural-cleanse` (model-detector family) = `neural_cleanse()`; its triggers.npz feeds
    `repair --triggers`."""
    from backdoorlab import registry
    from backdoorlab.cli import main
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.detectors import detect
    from backdoorlab.models import save_model

    clf, clean = backdoored
    assert registry.get("neural-cleanse").family == "model-detector"
    opts = {"mode": "full", "images": 256, "steps": 100, "batch": 32}
    # the paper's rule (a fixed index of 2) gives the scan's own flags
    paper = detect("neural-cleanse", clf, clean, {**opts, "threshold": 2.0}).detection
    assert paper.flagged == scan_full.flagged and paper.backdoored == bool(scan_full.flagged)
    assert paper.statistic == max(paper.scores.values())
    # the default verdict is the model-level p-value of the top index at alpha 0.05
    res = detect("neural-cleanse", clf, clean, opts, targets=[TARGET])
    det = res.detection
    assert det.scores == {r.label: r.anomaly_index for r in scan_full.labels}
    assert det.p_value == det.statistic == scan_full.p_value == min(scan_full.label_p_values.values())
    assert det.flagged == [y for y in scan_full.flagged if scan_full.label_p_values[y] < 0.05]
    assert det.backdoored == (scan_full.p_value < 0.05)
    assert res.right_target == (bool(det.flagged) and det.flagged[0] == TARGET)
    assert res.passes > 0 and sorted(det.triggers) == sorted(scan_full.triggers)
    save_model(clf, tmp_path / "m.safetensors")
    write_csaw_h5(clean, tmp_path / "clean.h5")
    model, data = str(tmp_path / "m.safetensors"), str(tmp_path / "clean.h5")
    argv = ["detect", "neural-cleanse", model, "--clean", data,
            "--mode", "full", "--images", "256", "--steps", "100", "--target", str(TARGET)]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "d" / "results.json").read_text())
    assert r["kind"] == "detect" and r["flagged"] == det.flagged and "verdict:" in out
    assert main(["repair", "nc-unlearn", model, "--valid", data,
                 "--triggers", str(tmp_path / "d" / "triggers.npz"), "--trigger-labels", "0",
                 "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    assert main([*argv[:5], "--target", "10", "--out", str(tmp_path / "bad")]) == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "bad").exists()
