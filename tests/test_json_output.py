"""``--json`` on every command that writes a results.json (docs/json.md): stdout is that file exactly
and nothing else, the usual lines go to stderr; Keras-imported models come out as Keras weights too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.models import save_model


@pytest.fixture(scope="module")
def files(digits_badnet, tmp_path_factory):
    clf, art, test = digits_badnet
    d = tmp_path_factory.mktemp("json")
    save_model(clf, d / "model.safetensors")
    write_csaw_h5(art["valid"], d / "valid.h5")
    write_csaw_h5(test, d / "test.h5")
    ps, targets = art["poisoned_test"][0]
    write_csaw_h5(ImageSet(ps.images, ps.labels, ps.num_classes, meta={"targets": targets}), d / "ptest.h5")
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [
    ["repair", "magnitude", "{d}/model.safetensors", "--valid", "{d}/valid.h5", "--epochs", "1"],
    ["fine-prune", "{d}/model.safetensors", "--valid", "{d}/valid.h5", "--poisoned", "{d}/ptest.h5",
     "--epochs", "1"],
    ["prune", "{d}/model.safetensors", "--valid", "{d}/valid.h5", "--poisoned", "{d}/ptest.h5",
     "--drops", "4"],
    ["detect", "mm-bd", "{d}/model.safetensors", "--steps", "20", "--starts", "2"],
    ["scan", "{d}/model.safetensors", "--detector", "mm-bd"],
], ids=["repair", "fine-prune", "prune", "detect", "scan"])
def test_json_prints_exactly_the_results_file(files, tmp_path, capsys, argv):
    out = tmp_path / "out"
    args = [a.replace("{d}", str(files)) for a in argv] + ["--out", str(out)]
    code, plain, err = run(capsys, *args)
    assert code == 0, err
    assert "wrote" in plain
    code, printed, err = run(capsys, *args, "--json", "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert json.loads(printed) == json.loads((tmp_path / "again" / "results.json").read_text())
    assert "wrote" in err  # the usual lines moved to stderr


def test_json_after_a_failure_prints_nothing(files, tmp_path, capsys):
    code, printed, err = run(capsys, "repair", "magnitude", files / "model.safetensors", "--valid",
                             files / "missing.h5", "--json", "--out", tmp_path / "o")
    assert code == 2 and printed == "" and err.count("\n") == 1


def test_fine_prune_of_a_keras_model_writes_keras_weights(csaw_dir, tmp_path, capsys):
    import h5py

    from backdoorlab.models import load_model

    bd = csaw_dir / "sunglasses_bd_weights.h5"
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (40, 55, 47, 3), dtype=np.uint8), rng.integers(0, 1283, 40), 1283)
    write_csaw_h5(clean, tmp_path / "valid.h5")
    code, out, err = run(capsys, "fine-prune", bd, "--arch", "deepid", "--valid", tmp_path / "valid.h5",
                         "--fraction", "0.1", "--epochs", "1", "--out", tmp_path / "fp")
    assert code == 0, err
    assert "finetuned.h5 (Keras weights)" in out and "pruned.h5 (Keras weights)" in out
    with h5py.File(tmp_path / "fp" / "finetuned.h5") as f, h5py.File(bd) as g:
        assert list(f.attrs["layer_names"]) == list(g.attrs["layer_names"])
    a = load_model(tmp_path / "fp" / "finetuned.safetensors")
    b = load_model(tmp_path / "fp" / "finetuned.h5", arch="deepid")
    assert np.array_equal(a.predict(clean.images), b.predict(clean.images))
