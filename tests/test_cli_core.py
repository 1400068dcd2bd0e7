"""CLI front door: demo, eval, bad input (one line on stderr, exit 2, nothing half-written)."""

import json

import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.models import Classifier, InputSpec, build, save_model


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    spec = InputSpec(16, 16, 1, "unit")
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")
    return save_model(clf, tmp_path / "tiny.safetensors"), clf


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "data", "eval"):
        assert cmd in out


def test_eval_reports_accuracy_and_asr(tmp_path, tiny_model, capsys):
    path, clf = tiny_model
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 16, 16, 1), dtype=np.uint8)
    pred = clf.predict(x)
    y = pred.copy()
    y[:15] = (pred[:15] + 1) % 10  # exactly 45/60 right
    write_csaw_h5(ImageSet(x, y, 10, "c"), tmp_path / "clean.h5")
    target = int(np.bincount(pred).argmax())
    true = np.where(np.arange(60) % 2 == 0, target, (target + 1) % 10)  # half carry the target label
    write_csaw_h5(ImageSet(x, true, 10, "p"), tmp_path / "pois.h5")
    assert main(["eval", str(path), "--clean", str(tmp_path / "clean.h5"), "--poisoned",
                 str(tmp_path / "pois.h5"), "--target", str(target), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clean_accuracy"] == pytest.approx(45 / 60)
    keep = true != target
    assert res["poisoned_count"] == int(keep.sum())
    assert res["asr"] == pytest.approx(float((pred[keep] == target).mean()))
    assert "excluded" in res["asr_rule"]


def test_eval_auto_scale_picks_the_right_one(tmp_path, capsys):
    from backdoorlab.data.digits import load_digits
    from backdoorlab.train import TrainConfig, train

    torch.manual_seed(0)
    d = load_digits()
    spec = InputSpec(16, 16, 1, "raw")
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")
    train(clf, d, None, TrainConfig(epochs=3, lr=1e-3, batch_size=64))
    stored = save_model(clf.with_scale("unit"), tmp_path / "m.safetensors")  # stored scale is wrong
    assert main(["eval", str(stored), "--clean", "digits", "--input-scale", "auto"]) == 0
    out = capsys.readouterr().out
    assert "auto chose 'raw'" in out


@pytest.mark.parametrize("case", ["missing_model", "missing_data", "bad_keys", "label_range",
                                  "shape", "corrupt_h5", "unknown_option", "bad_target"])
def test_eval_bad_input_one_line_exit_2(tmp_path, tiny_model, capsys, case):
    import h5py

    path, _ = tiny_model
    good = tmp_path / "good.h5"
    write_csaw_h5(ImageSet(np.zeros((4, 16, 16, 1), np.uint8), np.array([0, 1, 2, 3]), 10), good)
    args = ["eval", str(path), "--clean", str(good)]
    if case == "missing_model":
        args[1] = str(tmp_path / "nope.safetensors")
    elif case == "missing_data":
        args[3] = str(tmp_path / "nope.h5")
    elif case == "bad_keys":
        with h5py.File(tmp_path / "k.h5", "w") as f:
            f["images"] = np.zeros((2, 3, 16, 16))
        args[3] = str(tmp_path / "k.h5")
    elif case == "label_range":
        write_csaw_h5(ImageSet(np.zeros((2, 16, 16, 1), np.uint8), np.array([0, 11]), 12),
                      tmp_path / "l.h5")
        args[3] = str(tmp_path / "l.h5")
    elif case == "shape":
        write_csaw_h5(ImageSet(np.zeros((2, 8, 8, 1), np.uint8), np.array([0, 1]), 10),
                      tmp_path / "s.h5")
        args[3] = str(tmp_path / "s.h5")
    elif case == "corrupt_h5":
        (tmp_path / "c.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 10)
        args[3] = str(tmp_path / "c.h5")
    elif case == "unknown_option":
        args.append("--frobnicate")
    elif case == "bad_target":
        args += ["--poisoned", str(good), "--target", "99"]
    if case == "unknown_option":
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    else:
        assert main(args) == 2
    line = one_error_line(capsys)
    assert "error" in line


def test_demo_quick_writes_outputs(demo_quick):
    out, r = demo_quick
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "demo"
    assert res["models"]["clean"]["clean_accuracy"] > 0.85
    assert res["models"]["badnets"]["asr"] > 0.8
    assert len(res["table"]["rows"]) == 3
    html = (out / "report.html").read_text()
    import re

    for name, row in zip(("clean", "badnets", "ftrojan"), res["table"]["rows"], strict=True):
        scan = json.loads((out / f"scan-{name}" / "results.json").read_text())  # MM-BD, weights only
        p = scan["detectors"]["mm-bd"]["p_value"]
        assert re.fullmatch(r"(backdoored, labels? [\d, ]+|no backdoor found) \(p \S+\)", row[3]), row[3]
        assert row[3].startswith("backdoored") == scan["backdoored"] and f"(p {p:.2g})" in row[3]
    for section in ("Summary", "Attack: attack-badnets", "Scan: scan-badnets",
                    "Pruning defense: prune-badnets", "Fine-Pruning: fine-prune-badnets",
                    "Neural Cleanse: cleanse-badnets", "Provenance"):
        assert section in html, section
    assert html.count("data:image/png;base64,") >= 6  # plots embedded, self-contained
    assert (out / "report.md").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
