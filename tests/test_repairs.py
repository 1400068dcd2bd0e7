"""The repair family and the registry: every repair runs through `backdoorlab repair NAME` with the
same numbers as its own command or function; DER, robust accuracy and cost are right."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backdoorlab import cost, registry
from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.models import save_model
from backdoorlab.options import from_mapping
from backdoorlab.poisoned import poisoned_set
from backdoorlab.repairs import DefenderData, der, measure, repair

REPAIRS = ["anp", "clp", "fine-prune", "ft-sam", "guided-prune", "i-bau", "magnitude", "nad", "nc-filter",
           "nc-prune", "nc-unlearn", "prune"]


@pytest.fixture(scope="module")
def files(digits_badnet, tmp_path_factory):
    """The conftest BadNet and its data as files, the way `attack` writes them."""
    clf, art, test = digits_badnet
    d = tmp_path_factory.mktemp("repairs")
    save_model(clf, d / "model.safetensors")
    write_csaw_h5(art["valid"], d / "valid.h5")
    write_csaw_h5(test, d / "test.h5")
    for key, name in (("poisoned_test", "ptest.h5"), ("poisoned_valid", "pvalid.h5")):
        ps, targets = art[key][0]
        write_csaw_h5(ImageSet(ps.images, ps.labels, ps.num_classes, meta={"targets": targets}), d / name)
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def results(path) -> dict:
    return json.loads((path / "results.json").read_text())


def common(files, out) -> list:
    return ["--valid", files / "valid.h5", "--test", files / "test.h5", "--poisoned", files / "ptest.h5",
            "--out", out]


def test_registry_lists_every_repair_with_paper_needs_and_helped_options(capsys):
    names = [m.name for m in registry.methods("repair")]
    assert names == REPAIRS
    for m in registry.methods("repair"):
        assert m.paper and m.summary and set(m.needs) <= set(registry.NEEDS)
        assert all(o["help"] for o in m.describe()["options"])
    code, out, _ = run(capsys, "list", "--json", "--family", "repair")
    assert code == 0
    listed = json.loads(out)
    assert [m["name"] for m in listed] == REPAIRS and {m["family"] for m in listed} == {"repair"}
    code, out, _ = run(capsys, "list", "--json")
    assert {m["family"] for m in json.loads(out)} == set(registry.FAMILIES)


def test_unknown_method_and_bad_toml_options_are_one_line():
    from backdoorlab.errors import BadInput

    with pytest.raises(BadInput, match="known: anp, clp, fine-prune"):
        registry.get("bogus", "repair")
    opts = registry.get("fine-prune").options
    assert from_mapping(opts, {"epochs": 2, "lr": 1e-3}, "t").epochs == 2
    for bad, words in [({"epochs": -1}, "out of range"), ({"epohcs": 2}, "unknown option"),
                       ({"epochs": 1.5}, "integer"), ({"order": "up"}, "one of"),
                       ({"lr": float("nan")}, "out of range"), ({"lr": "x"}, "number")]:
        with pytest.raises(BadInput, match=words):
            from_mapping(opts, bad, "t")


def test_repair_fine_prune_gives_the_fine_prune_commands_numbers(files, capsys, tmp_path):
    assert run(capsys, "fine-prune", files / "model.safetensors", *common(files, tmp_path / "a"))[0] == 0
    code, out, err = run(capsys, "repair", "fine-prune", files / "model.safetensors",
                         *common(files, tmp_path / "b"))
    assert code == 0, err
    old, new = results(tmp_path / "a"), results(tmp_path / "b")
    assert new["after"]["clean_accuracy"] == old["after_finetuning"]["test_accuracy"]
    assert new["after"]["sets"][0]["asr"] == old["after_finetuning"]["asr"]
    assert new["before"]["sets"][0]["asr"] == old["before"]["asr"]
    assert new["details"]["pruned_channels"] == old["pruned_channels"]
    assert "DER" in out and "image passes" in out
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_repair_prune_and_guided_prune_match_the_sweep(files, capsys, tmp_path):
    model = files / "model.safetensors"
    assert run(capsys, "prune", model, *common(files, tmp_path / "sweep"))[0] == 0
    assert run(capsys, "prune", model, *common(files, tmp_path / "gsweep"), "--order", "guided",
               "--guide", files / "pvalid.h5")[0] == 0
    assert run(capsys, "repair", "prune", model, *common(files, tmp_path / "p"))[0] == 0
    assert run(capsys, "repair", "guided-prune", model, *common(files, tmp_path / "g"),
               "--guide", files / "pvalid.h5")[0] == 0
    for sweep, rep in (("sweep", "p"), ("gsweep", "g")):
        th = next(t for t in results(tmp_path / sweep)["sweep"]["thresholds"] if t["drop"] == 4)
        new = results(tmp_path / rep)
        assert th["reached"]
        assert new["details"]["pruned_channels"] == th["pruned_channels"]
        assert new["after"]["clean_accuracy"] == pytest.approx(th["test_accuracy"])
        assert new["after"]["sets"][0]["asr"] == pytest.approx(th["asr"])


def test_repair_magnitude_matches_fine_prune_magnitude(files, capsys, tmp_path):
    model = files / "model.safetensors"
    assert run(capsys, "fine-prune", model, *common(files, tmp_path / "a"), "--magnitude", "0.5",
               "--epochs", "1")[0] == 0
    assert run(capsys, "repair", "magnitude", model, *common(files, tmp_path / "b"), "--sparsity", "0.5",
               "--epochs", "1")[0] == 0
    old, new = results(tmp_path / "a"), results(tmp_path / "b")
    assert new["after"]["clean_accuracy"] == old["after_finetuning"]["test_accuracy"]
    assert new["after"]["sets"][0]["asr"] == old["after_finetuning"]["asr"]


def test_nc_repairs_match_nc_mitigation(digits_badnet):
    """With the true trigger as the 'reversed' one, `repair` gives mitigate()'s numbers."""
    from backdoorlab.defenses.nc_mitigation import mitigate
    from backdoorlab.train import TrainConfig

    clf, art, test = digits_badnet
    mask = np.zeros(test.shape[:2], np.float32)
    mask[-3:, -3:] = 1
    pattern = np.full((*test.shape[:2], test.shape[2]), 255, np.float32)
    triggers = {0: (mask, pattern)}
    ps, targets = art["poisoned_test"][0]
    ps.meta["targets"] = targets
    cfg = TrainConfig(epochs=2, lr=1e-4, batch_size=64, schedule="none", seed=0)
    table, _ = mitigate(clf, art["valid"], test, triggers, [0], ps, methods=("unlearn", "prune", "filter"),
                        cfg=cfg)
    rows = {r.method: r for r in table.methods}
    data = DefenderData(art["valid"], triggers=triggers, trigger_labels=[0])
    sets = [poisoned_set(ps)]
    _, un = repair("nc-unlearn", clf, data, test, sets, {"epochs": 2, "lr": 1e-4, "optimizer": "adam"})
    _, pr = repair("nc-prune", clf, data, test, sets)
    assert un.after.clean_accuracy == rows["unlearning"].clean_accuracy
    assert un.after.asr == rows["unlearning"].asr
    assert pr.after.clean_accuracy == rows["neuron pruning"].clean_accuracy
    assert pr.after.asr == rows["neuron pruning"].asr
    _, fl = repair("nc-filter", clf, data, test, sets)
    assert fl.after.clean_accuracy == rows["input filter"].clean_accuracy
    assert fl.after.asr == rows["input filter"].asr
    assert fl.goodnet["sets"][0]["detection_rate"] == rows["input filter"].detection_rate
    assert pr.passes > 0 and un.passes > 0
    assert un.goodnet is not None and fl.goodnet["clean_flagged"] == rows["input filter"].clean_flagged


def test_needs_are_checked_before_any_work(files, capsys, tmp_path):
    model = files / "model.safetensors"
    for argv, words in [(["nc-unlearn"], "needs --triggers"), (["guided-prune"], "needs --guide"),
                        (["prune", "--guide", files / "pvalid.h5"], "does not use"),
                        (["prune", "--trigger-labels", "0"], "goes with --triggers"),
                        (["prune", "--triggers", files / "t.npz"], "does not use reversed triggers"),
                        (["fine-prune", "--epochs", "-1"], "out of range")]:
        code, _, err = run(capsys, "repair", argv[0], model, *common(files, tmp_path / "o"), *argv[1:])
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o").exists()


def test_der_and_robust_accuracy():
    assert der(0.9, 0.9, 1.0, 0.0) == 1.0          # backdoor gone at no cost
    assert der(0.9, 0.9, 0.8, 0.8) == 0.5          # nothing changed
    assert der(0.9, 0.7, 1.0, 0.0) == pytest.approx(0.9)
    assert der(0.9, 0.9, 0.1, 0.5) == 0.5          # a worse ASR is not rewarded below 0.5 …
    assert der(0.9, 0.95, 1.0, 1.0) == 0.5         # … nor a better accuracy above it
    assert der(0.9, 0.9, None, None) is None
    x = np.zeros((4, 8, 8, 1), np.uint8)
    true = poisoned_set(ImageSet(x, np.array([1, 2, 3, 1]), 4, meta={"targets": np.zeros(4, np.int64)}))
    assert true.robust_from(np.array([1, 2, 0, 0])) == 0.5
    csaw = poisoned_set(ImageSet(x, np.zeros(4, np.int64), 4))  # labels = target: no true labels
    assert csaw.convention == "target" and csaw.robust_from(np.zeros(4)) is None


def test_image_passes_are_counted_once_per_image(digits_badnet):
    clf, _, test = digits_badnet
    with cost.counting() as c:
        clf.predict(test.images[:37], batch_size=16)
        clf.copy().predict(test.images[:5])
    assert c.images == 42
    with cost.counting() as c:
        measure(clf, test.subset(slice(0, 10)), [])
    assert c.images == 10


def test_a_saved_input_filter_loads_again_and_classify_marks_class_n(files, capsys, tmp_path):
    from backdoorlab.defenses.neural_cleanse import write_triggers
    from backdoorlab.models import load_model

    mask = np.zeros((16, 16), np.float32)
    mask[-3:, -3:] = 1
    write_triggers({0: (mask, np.full((16, 16, 1), 1.0, np.float32))}, tmp_path / "t.npz")
    code, _, err = run(capsys, "repair", "nc-filter", files / "model.safetensors",
                       *common(files, tmp_path / "f"), "--triggers", tmp_path / "t.npz")
    assert code == 0, err
    flt = load_model(tmp_path / "f" / "model.safetensors")
    assert flt.arch == "nc_filter" and flt.num_classes == 11
    code, out, _ = run(capsys, "classify", tmp_path / "f" / "model.safetensors", files / "ptest.h5")
    marked = [ln for ln in out.splitlines() if ln.endswith("\tbackdoored")]
    assert code == 0 and marked and all(ln.split("\t")[1] == "10" for ln in marked)


def test_a_keras_model_is_repaired_into_keras_weights_too(csaw_dir, tmp_path, capsys):
    """A CSAW BadNet (Keras weights file) comes out of `repair` as safetensors and as Keras weights
    in the file's own layout, which load back to the same predictions."""
    import h5py

    from backdoorlab.models import load_model

    bd = csaw_dir / "sunglasses_bd_weights.h5"
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (40, 55, 47, 3), dtype=np.uint8), rng.integers(0, 1283, 40), 1283)
    write_csaw_h5(clean, tmp_path / "valid.h5")
    code, out, err = run(capsys, "repair", "magnitude", bd, "--arch", "deepid",
                         "--valid", tmp_path / "valid.h5", "--epochs", "0", "--out", tmp_path / "r")
    assert code == 0, err
    assert "model.h5 (Keras weights)" in out
    with h5py.File(tmp_path / "r" / "model.h5") as f, h5py.File(bd) as g:
        assert list(f.attrs["layer_names"]) == list(g.attrs["layer_names"])
    a = load_model(tmp_path / "r" / "model.safetensors")
    b = load_model(tmp_path / "r" / "model.h5", arch="deepid")
    assert np.array_equal(a.predict(clean.images), b.predict(clean.images))


def test_trigger_labels_default_to_the_scan_beside_the_file(files, capsys, tmp_path):
    from backdoorlab.defenses.neural_cleanse import write_triggers

    mask = np.zeros((16, 16), np.float32)
    mask[-3:, -3:] = 1
    pattern = np.full((16, 16, 1), 1.0, np.float32)
    scan = tmp_path / "scan"
    scan.mkdir()
    write_triggers({y: (mask, pattern) for y in (0, 3, 5)}, scan / "triggers.npz")

    def labels_used(res: dict | None, name: str) -> tuple[int, list | None, str]:
        if res is None:
            (scan / "results.json").unlink(missing_ok=True)
        else:
            (scan / "results.json").write_text(json.dumps(res))
        code, out, err = run(capsys, "repair", "nc-prune", files / "model.safetensors",
                             *common(files, tmp_path / name), "--triggers", scan / "triggers.npz")
        used = results(tmp_path / name)["defender_data"]["trigger_labels"] if code == 0 else None
        return code, used, out + err

    # flagged 3 and 0 (most anomalous first); only 0's calibrated p-value is small: 0 alone
    code, used, text = labels_used({"flagged": [3, 0], "label_p_values": {"0": 0.01, "3": 0.4}}, "a")
    assert code == 0 and used == [0] and "label(s) 0 of the scan's flags (3, 0)" in text
    # no flag with a small p-value: the most anomalous flagged label alone
    assert labels_used({"flagged": [3, 0], "label_p_values": {"0": 0.3, "3": 0.2}}, "b")[1] == [3]
    # `detect neural-cleanse` keeps the p-values in its details; a detector without p-values (abs)
    # flags by its own rule, and all its flags are used
    assert labels_used({"flagged": [5, 3], "details": {"label_p_values": {"5": 0.001, "3": 0.01}}},
                       "b2")[1] == [5, 3]
    code, used, text = labels_used({"flagged": [3, 5]}, "b3")
    assert used == [3, 5] and "no p-values on record" in text
    # without the scan's results: every label in the file, said so
    code, used, text = labels_used(None, "c")
    assert code == 0 and used == [0, 3, 5] and "every label in it (3)" in text
    # the scan flagged nothing: one line, exit 2, nothing written
    code, used, text = labels_used({"flagged": [], "label_p_values": {}}, "d")
    assert code == 2 and "flagged no label" in text and not (tmp_path / "d").exists()
    # --trigger-labels still decides
    code, _, err = run(capsys, "repair", "nc-prune", files / "model.safetensors",
                       *common(files, tmp_path / "e"), "--triggers", scan / "triggers.npz",
                       "--trigger-labels", "5")
    assert code == 0 and results(tmp_path / "e")["defender_data"]["trigger_labels"] == [5]
