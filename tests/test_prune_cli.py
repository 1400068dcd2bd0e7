"""`backdoorlab prune` and `backdoorlab classify` on a tiny backdoored digits model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data import ImageSet, load_dataset
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.defenses.goodnet import goodnet_metrics
from backdoorlab.models import Classifier, InputSpec, load_model, save_model
from backdoorlab.models.architectures import small_cnn
from backdoorlab.train import TrainConfig, train

TARGET = 0


def stamp(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, -4:, -4:, :] = 255  # white 4x4 corner patch
    return x


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A BadNet on digits (10 % of training images stamped and relabeled 0), trained briefly,
    with clean validation/test and poisoned test sets as CSAW h5 files."""
    d = tmp_path_factory.mktemp("prune_cli")
    digits = load_dataset("digits")
    rest, test = digits.split(0.25, seed=0)
    tr, valid = rest.split(0.25, seed=1)
    rng = np.random.default_rng(0)
    hit = rng.random(len(tr)) < 0.1
    x, y = tr.images.copy(), tr.labels.copy()
    x[hit], y[hit] = stamp(x[hit]), TARGET
    torch.manual_seed(0)
    clf = Classifier(small_cnn(10, (16, 16, 1)), InputSpec(16, 16, 1), 10, "small_cnn")
    train(clf, ImageSet(x, y, 10), valid, TrainConfig(epochs=3, batch_size=64, lr=3e-3))
    save_model(clf, d / "bd.safetensors")
    write_csaw_h5(valid, d / "valid.h5")
    write_csaw_h5(test, d / "test.h5")
    write_csaw_h5(ImageSet(stamp(test.images), test.labels, 10), d / "poisoned.h5")
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def pruned_dir(files):
    out = files / "out"
    code = main(["prune", str(files / "bd.safetensors"), "--valid", str(files / "valid.h5"), "--test",
                 str(files / "test.h5"), "--poisoned", str(files / "poisoned.h5"), "--target", "0",
                 "--save-format", "keras", "--out", str(out)])
    assert code == 0
    return out


def test_prune_writes_every_output(files, pruned_dir):
    out = pruned_dir
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["layer"] == "conv_2" and res["settings"]["drop_unit"] == "points"
    assert "percentage points" in res["units"]["drop"]
    sweep = res["sweep"]
    assert sweep["measure_point"] == "pool_2" and sweep["num_channels"] == 32
    steps = sweep["steps"]
    assert steps["pruned"] == list(range(33))
    assert len(steps["valid_accuracy"]) == len(steps["asr"]) == 33
    with open(out / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 33 and curve[0]["channel_pruned"] == ""
    assert sorted(int(r["channel_pruned"]) for r in curve[1:]) == list(range(32))
    assert float(curve[5]["valid_acc_pct"]) == pytest.approx(100 * steps["valid_accuracy"][5], abs=0.006)
    png = (out / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "table.md").read_text()
    assert "percentage points below" in md and "| drop |" in md
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["drop_points"] for r in table] == ["0", "2", "4", "10", "30"]
    reached = [t for t in sweep["thresholds"] if t["reached"]]
    assert reached, "the trained model should lose accuracy when pruned"
    valid = load_dataset(str(files / "valid.h5"))
    test = load_dataset(str(files / "test.h5"))
    poisoned = load_dataset(str(files / "poisoned.h5"))
    for t in reached:
        tag = f"drop{t['drop']:g}"
        row = next(r for r in table if r["drop_points"] == f"{t['drop']:g}")
        assert int(row["pruned_channels"]) == t["pruned"] == len(t["pruned_channels"])
        # the saved pruned model reproduces the sweep's numbers
        m = load_model(out / f"pruned_{tag}.safetensors")
        acc = (m.predict(valid.images) == valid.labels).mean()
        assert acc == pytest.approx(t["valid_accuracy"], abs=1e-9)
        assert float(row["valid_acc_pct"]) == pytest.approx(100 * t["valid_accuracy"], abs=0.006)
        # the Keras export holds the same network
        k = load_model(out / f"pruned_{tag}.h5", arch="small_cnn")
        np.testing.assert_allclose(k.logits(test.images[:50]), m.logits(test.images[:50]), atol=1e-5)
        # the GoodNet file gives the table's GoodNet figures
        g = load_model(out / f"goodnet_{tag}.safetensors")
        assert g.arch == "goodnet" and g.num_classes == 11
        gm = goodnet_metrics(g, test, poisoned, target=TARGET)
        assert float(row["goodnet_clean_test_acc_pct"]) == pytest.approx(100 * gm.clean_accuracy, abs=0.006)
        assert float(row["goodnet_asr_pct"]) == pytest.approx(100 * gm.asr, abs=0.006)
        assert float(row["goodnet_detection_rate_pct"]) == pytest.approx(100 * gm.detection_rate, abs=0.006)
        assert t["goodnet"]["detection_rate"] == pytest.approx(gm.detection_rate)


def test_prune_relative_unit_and_early_stop(files, capsys, tmp_path):
    out = tmp_path / "rel"
    code, stdout, _ = run(capsys, "prune", files / "bd.safetensors", "--valid", files / "valid.h5",
                          "--drops", "5,20", "--drop-unit", "relative", "--stop", "max_drop",
                          "--order", "random", "--out", out)
    assert code == 0 and "% rel." in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["sweep"]["drop_unit"] == "relative" and "% of" in res["units"]["drop"]
    last = res["sweep"]["thresholds"][-1]
    if last["reached"]:
        assert len(res["sweep"]["steps"]["pruned"]) == last["step"] + 1
    assert not list(out.glob("*.h5"))  # native format only


def _bad(capsys, tmp_path, files, *extra) -> str:
    out = tmp_path / "never"
    code, _, err = run(capsys, "prune", files / "bd.safetensors", "--out", out, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    return lines[0]


def test_prune_bad_input(files, capsys, tmp_path):
    msg = _bad(capsys, tmp_path, files, "--valid", files / "valid.h5", "--layer", "conv_9")
    assert "unknown layer 'conv_9'" in msg
    faces = ImageSet(np.zeros((5, 55, 47, 3), np.uint8), np.zeros(5, np.int64), 10)
    write_csaw_h5(faces, tmp_path / "faces.h5")
    msg = _bad(capsys, tmp_path, files, "--valid", tmp_path / "faces.h5")
    assert "(16, 16, 1)" in msg
    many = ImageSet(np.zeros((5, 16, 16, 1), np.uint8), np.arange(5) * 5, 43)
    write_csaw_h5(many, tmp_path / "many.h5")
    msg = _bad(capsys, tmp_path, files, "--valid", files / "valid.h5", "--test", tmp_path / "many.h5")
    assert "43 classes" in msg or "out of range" in msg
    msg = _bad(capsys, tmp_path, files, "--valid", files / "valid.h5", "--drops", "2,x")
    assert "--drops" in msg


def test_prune_refuses_to_overwrite_a_foreign_folder(files, capsys, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    code, _, err = run(capsys, "prune", files / "bd.safetensors", "--valid", files / "valid.h5",
                       "--out", keep)
    assert code == 2 and "not an earlier prune output" in err
    assert (keep / "thesis.tex").read_text() == "precious"


def test_classify(files, pruned_dir, capsys, tmp_path):
    from PIL import Image

    test = load_dataset(str(files / "test.h5"))
    clf = load_model(files / "bd.safetensors")
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i][..., 0]).save(p)
        paths.append(p)
    code, out, _ = run(capsys, "classify", files / "bd.safetensors", *paths)
    assert code == 0
    lines = [ln.split("\t") for ln in out.strip().splitlines()]
    assert [ln[0] for ln in lines] == [str(p) for p in paths]
    assert [int(ln[1]) for ln in lines] == clf.predict(test.images[:3]).tolist()
    # a CSAW h5 of images, through a GoodNet: class 10 means backdoored
    small = ImageSet(stamp(test.images[:20]), None, 10)
    write_csaw_h5(small, tmp_path / "few.h5")
    g = next(iter(sorted(pruned_dir.glob("goodnet_drop*.safetensors"))))
    code, out, _ = run(capsys, "classify", g, tmp_path / "few.h5", "--json")
    assert code == 0
    answers = json.loads(out)
    assert len(answers) == 20 and answers[3]["image"].endswith("few.h5[3]")
    expect = load_model(g).predict(small.images)
    assert [a["class"] for a in answers] == expect.tolist()
    assert [a["backdoored"] for a in answers] == (expect == 10).tolist()
    # wrong size is refused unless --resize
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "big.png")
    code, _, err = run(capsys, "classify", files / "bd.safetensors", tmp_path / "big.png")
    assert code == 2 and "--resize" in err
    code, out, _ = run(capsys, "classify", files / "bd.safetensors", tmp_path / "big.png", "--resize")
    assert code == 0 and out.count("\n") == 1
