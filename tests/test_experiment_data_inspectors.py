"""`backdoorlab run` with data inspectors (Spectral Signatures, Activation Clustering) as defense
kinds of the grid: the attack cells then also write the poisoned training set (and only then is it
part of their key), each inspector cell runs `backdoorlab inspect METHOD` on it and scores its flags
against the poisoned rows the attack recorded, and the summary and report show them in their own
table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_GRID

from backdoorlab.cli import main
from backdoorlab.experiment.cells import plan_cells
from backdoorlab.experiment.config import parse_experiment
from backdoorlab.experiment.run import run_experiment

GRID = """
seeds = [1]
""" + DIGITS_GRID + """[[attack]]
name = "clean"
[[attack]]
name = "badnets"
trigger = "patch:size=3"
target = 0
rate = 0.1
[[defense]]
name = "spectral"
kind = "spectral"
[[defense]]
name = "ac"
kind = "ac"
"""


def write(tmp: Path, text: str) -> Path:
    p = tmp / "exp.toml"
    p.write_text(text)
    return p


def test_inspector_cells_score_their_flags_against_the_attacks_poisoned_rows(tmp_path):
    out = tmp_path / "out"
    res = run_experiment(write(tmp_path, GRID), out, jobs=1, threads=1, report=True)
    assert res["errors"] == []
    assert res["detection_table"] is None and res["input_detection_table"] is None
    assert [r[1] for r in res["table"]["rows"]] == ["none", "none"]  # inspectors are no repair rows
    cells = {c["cell"]["label"]: c for c in res["cells"]}
    att = cells["badnets-s1"]
    model_dir = out / "cells" / att["dir"]
    a = json.loads((model_dir / "results.json").read_text())
    assert a["files"]["train"] == "poisoned_train.h5"
    table = res["inspection_table"]
    assert table["head"][4:8] == ["poisoned samples", "flagged", "precision", "recall"]
    rows = {(r[0], r[1]): r for r in table["rows"]}
    assert set(rows) == {("clean", "spectral"), ("clean", "ac"), ("badnets", "spectral"), ("badnets", "ac")}
    for name in ("spectral", "ac"):
        rec = cells[f"badnets-{name}-s1"]
        r = json.loads((out / "cells" / rec["dir"] / "results.json").read_text())
        assert r["kind"] == "inspect" and r["method"] == name
        assert r["inputs"]["model"] == str(model_dir / "model.safetensors")
        assert r["inputs"]["data"] == str(model_dir / "poisoned_train.h5")
        # the truth is the attack's own poisoned rows: as many as it says it poisoned
        assert r["n_poisoned"] == a["poison"]["count"] > 0
        assert "poisoned_train.h5" in r["truth_source"]
        flagged = np.load(out / "cells" / rec["dir"] / "flagged.npy")
        assert r["n_flagged"] == len(flagged)
        for k in ("precision", "recall", "n_flagged", "n", "n_poisoned"):
            assert rec[k] == r[k], k
        assert rec["inspect_seconds"] == r["cost"]["seconds"]
        assert rec["accuracy"] == att["accuracy"] and rec["asr"] == att["asr"]
        row = rows[("badnets", name)]
        assert row[:5] == ["badnets", name, "1", f"{100 * att['asr']:.2f}", str(r["n_poisoned"])]
        assert row[5] == str(r["n_flagged"])
        pr = [("—" if v is None else f"{100 * v:.2f}") for v in (r["precision"], r["recall"])]
        assert row[6:8] == pr
    # the clean model's training set holds no poison: nothing to find, every flag a clean sample
    clean = json.loads((out / "cells" / cells["clean-spectral-s1"]["dir"] / "results.json").read_text())
    assert clean["n_poisoned"] == 0 and clean["recall"] is None
    summary = (out / "summary.md").read_text()
    assert "## Data inspectors" in summary and "| precision | recall |" in summary
    md = (out / "report.md").read_text()
    assert "## Data inspector spectral: badnets × spectral, seed 1" in md
    assert "## Data inspector ac: badnets × ac, seed 1" in md


def _doc(defenses: list[dict], attacks: list[dict] | None = None) -> dict:
    return {"data": {"source": "digits"}, "model": {"arch": "small_cnn"},
            "attack": attacks or [{"name": "a", "trigger": "patch", "target": 0}], "defense": defenses}


def test_only_grids_with_an_inspector_write_the_training_set_and_key_it():
    plain = {c.label: c for c in plan_cells(parse_experiment(_doc([{"kind": "nad"}]), "x.toml"))}
    insp = {c.label: c for c in plan_cells(parse_experiment(_doc([{"kind": "nad"}, {"kind": "ac"}]),
                                                            "x.toml"))}
    assert "save_train" not in plain["a-s0"].spec
    assert insp["a-s0"].spec["save_train"] is True
    assert plain["a-s0"].key != insp["a-s0"].key
    from backdoorlab.experiment.cells import attack_args

    assert "--save-train" in attack_args(insp["a-s0"]) and "--save-train" not in attack_args(plain["a-s0"])
    assert insp["a-ac-s0"].family == "data-inspector"
    # a grid without inspectors keeps the keys it had (its cached attack models stay valid)
    again = {c.label: c for c in plan_cells(parse_experiment(_doc([{"kind": "nad"}]), "x.toml"))}
    assert again["a-s0"].key == plain["a-s0"].key


def test_a_given_model_needs_its_training_set_for_an_inspector(tmp_path):
    from backdoorlab.errors import BadInput

    given = [{"name": "bd", "model": "m.h5", "arch": "small_cnn", "valid": "v.h5", "test": "t.h5"}]
    with pytest.raises(BadInput, match=r"bd: the data inspector\(s\) spectral need the training set"):
        parse_experiment(_doc([{"kind": "spectral"}], given), "x.toml")
    exp = parse_experiment(_doc([{"kind": "spectral"}], [{**given[0], "train": "train.h5"}]), "x.toml")
    assert exp.attacks[0].given["train"].endswith("train.h5")
    parse_experiment(_doc([{"kind": "nad"}], given), "x.toml")  # no inspector: no training set needed


@pytest.mark.parametrize(("new", "words"), [
    ("eps = 1.5", "unknown option eps for spectral"),
    ("removal_factor = 0", "removal_factor = 0.0 is out of range"),
    ('guide = "poisoned"', "guide is for repairs, not the detector spectral"),
])
def test_bad_inspector_options_are_refused_before_any_cell(tmp_path, capsys, new, words):
    text = GRID.replace('kind = "spectral"\n', f'kind = "spectral"\n{new}\n')
    out = tmp_path / "r"
    code = main(["run", str(write(tmp_path, text)), "--out", str(out), "--jobs", "1"])
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.err
    assert words in lines[0]
    assert "started" not in err.out and not out.exists()


def test_attack_save_train_writes_the_set_inspect_reads_its_truth_from(tmp_path, capsys):
    out = tmp_path / "bd"
    assert main(["attack", "--data", "digits", "--size", "16", "--arch", "small_cnn", "--epochs", "1",
                 "--trigger", "patch:size=3", "--target", "0", "--rate", "0.1", "--train-limit", "600",
                 "--test-limit", "200", "--save-train", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["files"]["train"] == "poisoned_train.h5"
    capsys.readouterr()
    assert main(["inspect", "ac", str(out / "model.safetensors"), "--data", str(out / "poisoned_train.h5"),
                 "--out", str(tmp_path / "ins")]) == 0
    text = capsys.readouterr().out
    assert f"truth:      {res['poison']['count']:,} poisoned rows, from the poisoning record in " \
           "poisoned_train.h5" in text
    r = json.loads((tmp_path / "ins" / "results.json").read_text())
    from backdoorlab.data import load_dataset

    train = load_dataset(str(out / "poisoned_train.h5"))
    assert len(train) == r["n"] == res["settings"]["train_count"]
    # every recorded poisoned row carries the target label (all-to-one, labels changed)
    import h5py

    with h5py.File(out / "poisoned_train.h5", "r") as f:
        rows = f["poisoned_index"][()]
    assert len(rows) == res["poison"]["count"] and set(train.labels[rows].tolist()) == {0}
    # without --save-train the attack writes no training set
    out2 = tmp_path / "bd2"
    assert main(["attack", "--data", "digits", "--size", "16", "--arch", "small_cnn", "--epochs", "1",
                 "--trigger", "patch:size=3", "--target", "0", "--rate", "0.1", "--train-limit", "600",
                 "--test-limit", "200", "--out", str(out2)]) == 0
    assert not (out2 / "poisoned_train.h5").exists()
    assert "train" not in json.loads((out2 / "results.json").read_text())["files"]


def test_a_given_model_with_its_training_set_is_inspected(tmp_path, capsys):
    bd = tmp_path / "bd"
    assert main(["attack", "--data", "digits", "--size", "16", "--arch", "small_cnn", "--epochs", "2",
                 "--trigger", "patch:size=3", "--target", "0", "--rate", "0.1", "--train-limit", "600",
                 "--test-limit", "200", "--save-train", "--out", str(bd)]) == 0
    base = f"""
[[attack]]
name = "handed"
model = "{bd / 'model.safetensors'}"
valid = "{bd / 'clean_valid.h5'}"
test = "{bd / 'clean_test.h5'}"
poisoned = "{bd / 'poisoned_test.h5'}"
target = 0
train = "TRAIN"
[[defense]]
kind = "spectral"
"""
    # a training set that does not fit the model, or is missing, is refused before any cell
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.data.imageset import ImageSet

    wrong = tmp_path / "wrong.h5"
    write_csaw_h5(ImageSet(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64), 10, "w"), wrong)
    for train, words in ((wrong, "the model expects images of shape"), (tmp_path / "nope.h5", "nope.h5")):
        code = main(["run", str(write(tmp_path, base.replace("TRAIN", str(train)))), "--out",
                     str(tmp_path / "bad"), "--jobs", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], err
        assert not (tmp_path / "bad").exists()
    res = run_experiment(write(tmp_path, base.replace("TRAIN", str(bd / "poisoned_train.h5"))),
                         tmp_path / "out", jobs=1, threads=1, report=False)
    assert res["errors"] == []
    (row,) = res["inspection_table"]["rows"]
    a = json.loads((bd / "results.json").read_text())
    assert row[:2] == ["handed", "spectral"] and row[4] == str(a["poison"]["count"])
