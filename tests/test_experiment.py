"""`backdoorlab run`: config checks, content keys, the grid on digits, cache, given models, Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import DIGITS_GRID

from backdoorlab.cli import main
from backdoorlab.errors import BadInput
from backdoorlab.experiment.cells import Cell, plan_cells
from backdoorlab.experiment.config import load_experiment, parse_experiment
from backdoorlab.experiment.display import estimate_left
from backdoorlab.experiment.run import run_experiment
from backdoorlab.experiment.summary import mean_std, summary_rows

GRID = """
name = "tiny"
seeds = [0]
""" + DIGITS_GRID + """[[attack]]
name = "badnets"
trigger = "patch:size=3"
target = 0
rate = 0.1
[[defense]]
name = "pruning"
kind = "prune"
report_drop = [2, 4]
[[defense]]
name = "fp"
kind = "fine-prune"
drop = 4
epochs = 1
[[defense]]
name = "nc"
kind = "cleanse"
mode = "full"
labels = "0,1,2,3,4"
steps = 20
images = 64
[[defense]]
name = "mag"
kind = "magnitude"
sparsity = 0.3
epochs = 1
[[defense]]
name = "guided"
kind = "guided"
guide = "poisoned"
[[defense]]
name = "guided-nc"
kind = "guided"
guide = "cleanse"
nc_mode = "full"
nc_labels = "0,1,2,3,4"
nc_steps = 20
nc_images = 64
"""


def write(tmp: Path, text: str, name: str = "exp.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def doc(**over) -> dict:
    d = {"data": {"source": "digits"}, "model": {"arch": "small_cnn"},
         "attack": [{"name": "a", "trigger": "patch", "target": 0}],
         "defense": [{"name": "p", "kind": "prune"}]}
    d.update(over)
    return d


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, msg", [
    (doc(attack=[{"name": "a", "trigger": "patch", "targte": 0}]), "unknown key(s) targte"),
    (doc(defense=[{"kind": "prunning"}]), "unknown method 'prunning'"),
        (doc(defense=[{"kind": "prune", "epochs": 3}]), "unknown option epochs for prune"),
        (doc(defense=[{"kind": "prune", "drop": [2, 2]}]), "repeats"),
        (doc(defense=[{"kind": "fine-prune", "guide": "poisoned"}]), "guide is for"),
        (doc(defense=[{"kind": "prune", "nc_steps": 5}]), "runs no Neural Cleanse scan"),
    (doc(defense=[{"kind": "prune", "out": "x"}]), "set by the experiment runner"),
    (doc(defense=[{"kind": "prune", "report_drop": -1}]), "drop = -1.0 is out of range"),
    (doc(seeds=[0, 0]), "seeds repeat"),
    (doc(seeds=[]), "non-empty list"),
    ({"data": {"source": "digits"}, "model": {"arch": "small_cnn"}}, "no [[attack]]"),
    (doc(model={}), "missing 'arch'"),
    (doc(attack=[{"name": "a b"}]), "must be letters"),
    (doc(attack=[{"name": "x"}, {"name": "x"}]), "used twice"),
    (doc(attack=[{"model": "m.h5", "valid": "v.h5"}]), "needs 'test'"),
])
def test_config_errors_name_the_problem(bad, msg):
    with pytest.raises(BadInput, match=None) as e:
        parse_experiment(bad, "x.toml")
    assert msg in str(e.value) and "x.toml" in str(e.value)


def test_config_expands_variables(monkeypatch):
    monkeypatch.setenv("BL_T", "/data/here")
    monkeypatch.delenv("BL_UNSET", raising=False)
    e = parse_experiment(doc(data={"source": "gtsrb:${BL_T}/G", "test": "${BL_UNSET:-/d}/t"}))
    assert e.data["source"] == "gtsrb:/data/here/G" and e.data["test"] == "/d/t"
    with pytest.raises(BadInput, match="BL_UNSET is not set"):
        parse_experiment(doc(data={"source": "${BL_UNSET}/x"}))


def test_keys_change_only_with_what_a_cell_depends_on():
    base = plan_cells(parse_experiment(doc(defense=[{"name": "p", "kind": "prune"},
                                                     {"name": "f", "kind": "fine-prune", "epochs": 2}])))
    assert len(base) == 3 and len({c.key for c in base}) == 3
    same = plan_cells(parse_experiment(doc(defense=[{"name": "p", "kind": "prune"},
                                                     {"name": "f", "kind": "fine-prune", "epochs": 2}])))
    assert [c.key for c in same] == [c.key for c in base]
    # a defense option: only that defense's key moves
    f3 = plan_cells(parse_experiment(doc(defense=[{"name": "p", "kind": "prune"},
                                                   {"name": "f", "kind": "fine-prune", "epochs": 3}])))
    assert [a.key == b.key for a, b in zip(base, f3, strict=True)] == [True, True, False]
    # the training budget: every cell moves (defenses start from the retrained model)
    ep = plan_cells(parse_experiment(doc(train={"epochs": 2}, defense=[
        {"name": "p", "kind": "prune"}, {"name": "f", "kind": "fine-prune", "epochs": 2}])))
    assert all(a.key != b.key for a, b in zip(base, ep, strict=True))
    # renaming changes labels, not keys
    ren = plan_cells(parse_experiment(doc(attack=[{"name": "zz", "trigger": "patch", "target": 0}],
                                          defense=[{"name": "p2", "kind": "prune"},
                                                   {"name": "f", "kind": "fine-prune", "epochs": 2}])))
    assert [c.key for c in ren] == [c.key for c in base] and ren[0].label == "zz-s0"
    # a default spelled out is the same cell; a method whose default changes is a new one
    from backdoorlab import registry
    from backdoorlab.options import infos

    default_epochs = next(i.default for i in infos(registry.get("fine-prune").options) if i.name == "epochs")
    spelled = plan_cells(parse_experiment(doc(defense=[{"name": "p", "kind": "prune"},
                                                       {"name": "f", "kind": "fine-prune"}])))
    explicit = plan_cells(parse_experiment(doc(defense=[{"name": "p", "kind": "prune"},
                                                        {"name": "f", "kind": "fine-prune",
                                                         "epochs": default_epochs}])))
    assert [c.key for c in spelled] == [c.key for c in explicit]
    method = registry.get("fine-prune")
    later = dataclasses.field(default=default_epochs + 1)  # as if a release changed the default
    moved = dataclasses.make_dataclass("Moved", [("epochs", int, later)], bases=(method.options,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._METHODS, "fine-prune", dataclasses.replace(method, options=moved))
        changed = plan_cells(parse_experiment(doc(defense=[{"name": "p", "kind": "prune"},
                                                           {"name": "f", "kind": "fine-prune"}])))
    assert [a.key == b.key for a, b in zip(spelled, changed, strict=True)] == [True, True, False]
    # seeds multiply the grid
    two = plan_cells(parse_experiment(doc(seeds=[0, 1])))
    assert len(two) == 4 and len({c.key for c in two}) == 4


def test_data_fingerprint_follows_content_not_mtime_or_place(tmp_path):
    from backdoorlab.experiment.cells import data_fingerprint

    src = tmp_path / "a" / "G"
    (src / "00000").mkdir(parents=True)
    (src / "00000" / "x.ppm").write_bytes(b"P6 1 1 255 abc")
    (src / "y.csv").write_text("f;1\n")
    first = data_fingerprint(f"gtsrb:{src}")
    # a copy elsewhere with fresh modification times is the same data
    dst = tmp_path / "b" / "G"
    shutil.copytree(src, dst)
    os.utime(dst / "y.csv", (1, 1))
    assert data_fingerprint(f"gtsrb:{dst}") == first
    # one changed byte, or a renamed file, is not
    (dst / "00000" / "x.ppm").write_bytes(b"P6 1 1 255 abd")
    assert data_fingerprint(f"gtsrb:{dst}") != first
    (dst / "00000" / "x.ppm").write_bytes(b"P6 1 1 255 abc")
    assert data_fingerprint(f"gtsrb:{dst}") == first
    (dst / "y.csv").rename(dst / "z.csv")
    assert data_fingerprint(f"gtsrb:{dst}") != first


def test_mean_std():
    assert mean_std([None, None]) is None
    m, s, n = mean_std([0.5, 0.7, None])
    assert (round(m, 6), round(s, 6), n) == (0.6, round(0.1414213562, 6), 2)
    assert mean_std([0.3]) == (0.3, 0.0, 1)


def test_eta_weighs_each_cell_left_by_the_time_of_its_kind():
    took = {"attack": [600.0, 400.0], "prune": [10.0]}
    # 2 trainings at 500 s + 1 sweep at 10 s + a scan never timed, at the mean of all (~336.7 s)
    left, untimed = estimate_left(["attack", "attack", "prune", "cleanse"], took, jobs=2)
    assert left == pytest.approx((2 * 500 + 10 + 1010 / 3) / 2) and untimed == ["cleanse"]
    assert estimate_left([], took, jobs=1) == (None, [])
    assert estimate_left(["attack"], {}, jobs=1) == (None, ["attack"])


def test_multi_trigger_rows_give_every_trigger_and_say_which_one_defenses_score():
    cells, records = [], {}
    for seed, (a1, a2) in enumerate([(0.96, 0.999), (0.94, 0.997)]):
        att = Cell(f"a{seed}", f"two-s{seed}", "attack", "two", None, seed, {}, None)
        fp = Cell(f"f{seed}", f"two-fp-s{seed}", "fine-prune", "two", "fp", seed, {"options": {}}, att.key)
        cells += [att, fp]
        records[att.key] = {"accuracy": 0.97, "asr": a1, "asr_per_trigger": [a1, a2],
                            "triggers": ["patch:size=4", "blend:alpha=0.15"], "detail": ""}
        records[fp.key] = {"accuracy": 0.95, "asr": 0.01, "detail": "10/64 channels"}
    rows = {r[1]: r for r in summary_rows(cells, records)}
    assert rows["none"][4] == "95.00 ± 1.41"
    assert rows["none"][-1] == "ASR per trigger: patch:size=4 95.00 ± 1.41; blend:alpha=0.15 99.80 ± 0.14"
    assert rows["fp"][-1] == "ASR of the first trigger (patch:size=4) only; 10/64 channels"
    # records that carry every set's ASR after the defense give them all
    records["f0"]["asr_per_trigger"], records["f1"]["asr_per_trigger"] = [0.01, 0.5], [0.03, 0.7]
    assert {r[1]: r for r in summary_rows(cells, records)}["fp"][-1] == \
        "ASR per trigger: patch:size=4 2.00 ± 1.41; blend:alpha=0.15 60.00 ± 14.14 (after); 10/64 channels"
    del records["f0"]["asr_per_trigger"], records["f1"]["asr_per_trigger"]
    # a single trigger adds no note
    records["a0"]["asr_per_trigger"] = records["a1"]["asr_per_trigger"] = [0.9]
    assert {r[1]: r for r in summary_rows(cells, records)}["fp"][-1] == "10/64 channels"


# -- running a grid ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    cfg = write(tmp, GRID)
    res = run_experiment(cfg, tmp / "out", jobs=2, threads=1, report=True)
    return tmp, cfg, res


def test_grid_runs_and_writes_table_and_report(grid_run):
    tmp, cfg, res = grid_run
    out = tmp / "out"
    assert res["errors"] == [] and res["computed_cells"] == 9 and res["cached_cells"] == 0
    rows = {(r[0], r[1]): r for r in res["table"]["rows"]}
    assert set(rows) == {("badnets", "none"), ("badnets", "pruning-drop2"),
                         ("badnets", "pruning-drop4"), ("badnets", "fp"), ("badnets", "nc"),
                         ("badnets", "mag"), ("badnets", "guided"),
                         ("badnets", "guided-nc")}
    cells = {c["cell"]["label"]: c for c in res["cells"]}
    attack = cells["badnets-s0"]
    att_res = json.loads((out / "cells" / attack["dir"] / "results.json").read_text())
    # the table's "before" figures are the attack model's own measurements
    assert rows[("badnets", "none")][3] == f"{100 * att_res['clean_accuracy']:.2f}"
    assert rows[("badnets", "none")][4] == f"{100 * att_res['asr'][0]:.2f}"
    def res_of(label: str) -> dict:
        return json.loads((out / "cells" / cells[label]["dir"] / "results.json").read_text())

    # every defense cell is `backdoorlab repair METHOD`; the table shows its "after" figures
    fp = res_of("badnets-fp-s0")
    assert fp["kind"] == "repair" and fp["method"] == "fine-prune"
    assert rows[("badnets", "fp")][5] == f"{100 * fp['after']['clean_accuracy']:.2f}"
    assert rows[("badnets", "fp")][6] == f"{100 * fp['after']['sets'][0]['asr']:.2f}"
    assert rows[("badnets", "fp")][9] == f"{fp['der']:.3f}"
    for drop in (2, 4):
        pr = res_of(f"badnets-pruning-drop{drop}-s0")
        assert pr["method"] == "prune" and pr["options"]["drop"] == drop
        assert rows[("badnets", f"pruning-drop{drop}")][6] == f"{100 * pr['after']['sets'][0]['asr']:.2f}"
    for f in ("summary.md", "summary.csv", "results.json", "report.html", "report.md", "experiment.toml"):
        assert (out / f).is_file(), f
    html = (out / "report.html").read_text()
    assert "Experiment: tiny" in html and "pruning-drop4" in html
    # the report has a section for every kind of run in the grid
    md = (out / "report.md").read_text()
    # (titled "attack × defense, seed N" from each cell's cell.json, not by the hashed folder)
    for title in ("## Experiment: tiny", "## Attack: badnets, seed 0\n", "## Repair prune: badnets × ",
                  "## Repair fine-prune: badnets × ", "## Neural Cleanse: badnets", "## Repair magnitude: "
                  "badnets × ", "## Repair guided-prune: badnets × ", "## Provenance"):
        assert title in md, title
    assert f"## Attack: cells/{attack['dir']}" not in md
    assert len(list((out / "logs").glob("*.log"))) == 9  # 8 cells and the shared Neural Cleanse scan
    mag = res_of("badnets-mag-s0")
    assert mag["method"] == "magnitude" and abs(mag["options"]["sparsity"] - 0.3) < 1e-9
    gd = res_of("badnets-guided-s0")
    assert gd["method"] == "guided-prune" and gd["defender_data"]["poisoned"] > 0
    # Neural Cleanse first (the scan ran with the nc_ / cleanse options), then the repair with the
    # reversed triggers of every flagged label
    for label, method in (("badnets-guided-nc-s0", "guided-prune"), ("badnets-nc-s0", "nc-unlearn")):
        scan_dir = out / "cells" / cells[label]["parent_dir"]
        assert cells[label]["parent_dir"].startswith("badnets-nc-s0-")  # one shared scan cell
        scan = json.loads((scan_dir / "results.json").read_text())
        assert scan["mode"] == "full" and sorted(x["label"] for x in scan["labels"]) == [0, 1, 2, 3, 4]
        if scan["flagged"]:
            r = res_of(label)
            assert r["method"] == method and r["defender_data"]["trigger_labels"] == scan["flagged"]
        else:
            assert cells[label]["detail"] == "no label flagged: model unchanged"


def timeless(table: dict) -> list:
    """The summary rows without the wall-time column (it differs between runs of a cell)."""
    i = table["head"].index("repair s")
    return [r[:i] + r[i + 1:] for r in table["rows"]]


def test_rerun_comes_from_cache_and_a_changed_option_recomputes_one_cell(grid_run):
    tmp, cfg, first = grid_run
    again = run_experiment(cfg, tmp / "out", jobs=2, threads=1, report=False)
    assert again["computed_cells"] == 0 and again["cached_cells"] == 9
    assert again["table"] == first["table"]
    changed = write(tmp, GRID.replace("drop = 4\nepochs = 1", "drop = 4\nepochs = 2"), "exp2.toml")
    third = run_experiment(changed, tmp / "out", jobs=1, threads=1, report=False)
    assert third["computed_cells"] == 1
    assert [c["cell"]["label"] for c in third["cells"] if not c["cached"]] == ["badnets-fp-s0"]


def test_an_interrupted_cell_is_recomputed(grid_run, tmp_path):
    tmp, cfg, first = grid_run
    out = tmp_path / "copy"
    shutil.copytree(tmp / "out", out)
    nc = next(c for c in first["cells"] if c["cell"]["label"] == "badnets-nc-s0")
    (out / "cells" / nc["dir"] / "cell.json").unlink()  # as if killed before it finished
    res = run_experiment(cfg, out, jobs=1, threads=1, report=False)
    assert res["computed_cells"] == 1 and timeless(res["table"]) == timeless(first["table"])


def test_given_model_matches_the_trained_one(grid_run, tmp_path):
    tmp, cfg, first = grid_run
    cells = {c["cell"]["label"]: c for c in first["cells"]}
    d = tmp / "out" / "cells" / cells["badnets-s0"]["dir"]
    given = f"""
[[attack]]
name = "handed"
model = "{d / 'model.safetensors'}"
valid = "{d / 'clean_valid.h5'}"
test = "{d / 'clean_test.h5'}"
poisoned = "{d / 'poisoned_test.h5'}"
[[defense]]
name = "pruning"
kind = "prune"
report_drop = [2, 4]
"""
    res = run_experiment(write(tmp_path, given), tmp_path / "out", jobs=1, threads=1, report=False)
    rows = {r[1]: r for r in res["table"]["rows"]}
    trained = {r[1]: r for r in first["table"]["rows"]}
    assert rows["none"][3:5] == trained["none"][3:5]
    assert rows["pruning-drop4"][3:8] == trained["pruning-drop4"][3:8]


def test_cli_bad_config_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "no such experiment file" in capsys.readouterr().err
    bad = write(tmp_path, "name = [unclosed")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err and len(err.strip().splitlines()) == 1
    missing = write(tmp_path, GRID.replace('source = "digits"', 'source = "gtsrb:/nonexistent/G"'), "m.toml")
    assert main(["run", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["run", str(write(tmp_path, GRID)), "--out", str(tmp_path / "afile")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_option_typos_are_caught_before_any_training(tmp_path, capsys):
    cfg = write(tmp_path, GRID.replace('kind = "fine-prune"\ndrop = 4', 'kind = "fine-prune"\ndorp = 4'))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "fp" in err and "dorp" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "cells").exists()


def test_a_failing_cell_is_reported_and_the_rest_continue(boom, tmp_path, capsys):
    """A cell that fails only while it runs (every input was checked up front) is reported; the
    other cells finish."""
    cfg = write(tmp_path, GRID.replace('name = "fp"\nkind = "fine-prune"\ndrop = 4\nepochs = 1',
                                       'name = "fp"\nkind = "boom"'))
    res = run_experiment(cfg, tmp_path / "out", jobs=2, threads=1, report=False)
    assert len(res["errors"]) == 1 and "badnets-fp-s0" in res["errors"][0]
    assert "failed while running" in res["errors"][0] and "repair boom failed" in res["errors"][0]
    rows = {r[1]: r for r in res["table"]["rows"]}
    assert rows["fp"][-1] == "failed" and rows["nc"][2] == "1"


def test_ray_executor_gives_the_local_table(grid_run, tmp_path):
    pytest.importorskip("ray")
    tmp, cfg, first = grid_run
    res = run_experiment(cfg, tmp_path / "ray", executor="ray", threads=1, report=False)
    assert res["errors"] == [] and res["computed_cells"] == 9
    assert timeless(res["table"]) == timeless(first["table"])


def test_example_configs_parse():
    root = Path(__file__).resolve().parents[1] / "examples"
    files = sorted(root.glob("*.toml"))
    assert len(files) >= 4
    for f in files:
        e = load_experiment(f)
        assert e.attacks and e.defenses, f


def test_a_model_detector_gets_its_own_table_and_the_grid_its_heatmaps(tmp_path):
    cfg = write(tmp_path, """
seeds = [0]
[data]
source = "digits"
test_fraction = 0.25
[model]
arch = "small_cnn"
[train]
epochs = 6
batch_size = 64
lr = 3e-3
[[attack]]
name = "badnets"
trigger = "patch:size=3"
target = 0
rate = 0.1
[[defense]]
name = "nc"
kind = "neural-cleanse"
mode = "full"
steps = 60
images = 200
[[defense]]
name = "pr"
kind = "prune"
""")
    res = run_experiment(cfg, tmp_path / "out", jobs=1, threads=1, report=True)
    assert res["errors"] == []
    assert [r[1] for r in res["table"]["rows"]] == ["none", "pr"]  # the detector is not a repair row
    det = res["detection_table"]
    assert det["head"][4:6] == ["flagged as backdoored", "right target"]
    (row,) = det["rows"]
    cell = next(c for c in res["cells"] if c["cell"]["label"] == "badnets-nc-s0")
    r = json.loads((tmp_path / "out" / "cells" / cell["dir"] / "results.json").read_text())
    assert r["kind"] == "detect" and r["targets"] == [0]
    assert row[4] == f"{int(r['backdoored'])}/1" and row[5] == f"{int(bool(r['right_target']))}/1"
    for f in ("heatmap_asr.png", "heatmap_accuracy.png"):
        assert (tmp_path / "out" / f).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Detect neural-cleanse: badnets × " in md and "heatmap_asr.png" in md
    assert "## Model detectors" in (tmp_path / "out" / "summary.md").read_text()


# -- every input checked before a cell runs or the output folder is touched (issue #17) ---------

TINY = """
seeds = [0]
[data]
source = "digits"
[model]
arch = "small_cnn"
[train]
epochs = 1
[[attack]]
name = "badnets"
trigger = "patch:size=4"
target = 0
rate = 0.1
[[defense]]
name = "pruning"
kind = "prune"
"""

GIVEN = """
[[attack]]
name = "handed"
model = "{d}/model.safetensors"
valid = "{d}/clean_valid.h5"
test = "{d}/clean_test.h5"
poisoned = "{d}/poisoned_test.h5"
[[defense]]
name = "pruning"
kind = "prune"
"""


@pytest.fixture(scope="module")
def handed(tmp_path_factory):
    """An untrained small_cnn on 16x16 digits with clean and poisoned data files (a model handed
    over), a 32x32 data file and a corrupt one."""
    import numpy as np
    import torch

    from backdoorlab.data import ImageSet, load_dataset
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.models import Classifier, InputSpec, build, save_model

    d = tmp_path_factory.mktemp("handed")
    torch.manual_seed(0)
    save_model(Classifier(build("small_cnn", 10, (16, 16, 1)), InputSpec(16, 16, 1), 10, "small_cnn"),
               d / "model.safetensors")
    digits = load_dataset("digits")
    write_csaw_h5(digits.take(100, seed=0), d / "clean_valid.h5")
    write_csaw_h5(digits.take(100, seed=1), d / "clean_test.h5")
    poisoned = digits.take(100, seed=2)
    write_csaw_h5(poisoned, d / "untargeted.h5")  # true labels, no per-image targets
    poisoned.meta["targets"] = np.zeros(len(poisoned), np.int64)
    write_csaw_h5(poisoned, d / "poisoned_test.h5")
    write_csaw_h5(ImageSet(np.zeros((20, 32, 32, 1), np.uint8), np.arange(20) % 10, 10), d / "x32.h5")
    (d / "bad.h5").write_bytes(np.random.default_rng(0).bytes(3000))
    (d / "bad.safetensors").write_bytes(np.random.default_rng(1).bytes(3000))
    (d / "bad.json").write_bytes((d / "model.json").read_bytes())
    return d


PREFLIGHT = [  # (experiment text builder key, old, new, words of the one error line)
    ("tiny", 'trigger = "patch:size=4"', 'trigger = "bogus"', "unknown kind 'bogus'"),
    ("tiny", 'trigger = "patch:size=4"', 'trigger = "patch:size=0"', "size must be at least 1"),
    ("tiny", 'trigger = "patch:size=4"', 'trigger = 5', "trigger must be a string"),
    ("tiny", 'trigger = "patch:size=4"', 'trigger = "image:nope.png"', "nope.png"),
    ("tiny", "target = 0", "target = 99", "target label 99 out of range for 10 classes"),
    ("tiny", "target = 0", 'target = "zero"', "target must be a label"),
    ("tiny", "target = 0", "target = [0, 1]", "1 trigger(s) but 2 target(s)"),
    ("tiny", "rate = 0.1", 'rate = 0.1\nmode = "all2all"', "all-to-all attacks have no target"),
    ("tiny", "epochs = 1", "epochs = false", "epochs takes a value, not false"),
    ("tiny", "epochs = 1", "epochs = [1, 2]", "epochs takes one value"),
    ("tiny", "epochs = 1", 'epochs = 1\naugment = "bogus"', "unknown augmentation(s) bogus"),
    ("tiny", 'source = "digits"', 'source = "{d}/bad.h5"', "unrecognised data format"),
    ("tiny", 'source = "digits"', 'source = "digits"\ntest = "{d}/x32.h5"',
     "training images are (16, 16, 1) but test images (32, 32, 1)"),
    ("tiny", 'arch = "small_cnn"', 'arch = "bogus"', "unknown architecture 'bogus'"),
    ("tiny", 'arch = "small_cnn"', "arch = 5", "arch must be a string"),
    ("tiny", 'arch = "small_cnn"', 'arch = "deepid"', "needs inputs of at least 31x31"),
    ("tiny", 'kind = "prune"', 'kind = "prune"\nlayer = "bogus"', "unknown layer 'bogus'"),
    ("tiny", 'kind = "prune"', 'kind = "fine-prune"\ndrop = 4\nfraction = 0.5',
     "give drop or fraction, not both"),
    ("tiny", 'kind = "prune"', 'kind = "cleanse"\nthreshold = nan', "--threshold: nan is out of range"),
    ("tiny", 'kind = "prune"', 'kind = "cleanse"\ncheck_every = 0', "--check-every: 0 is out of range"),
    ("tiny", 'kind = "prune"', 'kind = "cleanse"\nlabels = "99"', "[99] out of range"),
    ("tiny", 'trigger = "patch:size=4"\ntarget = 0\n', "", "guide = \"poisoned\" needs the attack's"),
    ("given", 'model = "{d}/model.safetensors"', 'model = "{d}/bad.safetensors"', "corrupt safetensors"),
    ("given", 'valid = "{d}/clean_valid.h5"', 'valid = "{d}/x32.h5"', "the model expects images of shape"),
    ("given", 'poisoned = "{d}/poisoned_test.h5"', 'poisoned = "{d}/poisoned_test.h5"\ntarget = 99',
     "target label 99 out of range"),
    ("given", 'poisoned = "{d}/poisoned_test.h5"', 'poisoned = "{d}/poisoned_test.h5"\ntarget = "zero"',
     "target must be a label"),
    ("given", 'poisoned = "{d}/poisoned_test.h5"', 'poisoned = "{d}/untargeted.h5"',
     "give the attack's target (the file has no per-image targets)"),
    ("given", 'poisoned = "{d}/poisoned_test.h5"', 'poisoned = "{d}/poisoned_test.h5"\narch = "bogus"',
     "unknown architecture 'bogus'"),
    ("given", 'poisoned = "{d}/poisoned_test.h5"', 'poisoned = "{d}/poisoned_test.h5"\ninput_scale = "bogus"',
     "input_scale must be raw or unit"),
]


@pytest.mark.parametrize(("base", "old", "new", "words"), PREFLIGHT,
                         ids=[f"{b}:{n.splitlines()[-1] if n else 'no trigger'}" for b, _, n, _ in PREFLIGHT])
def test_bad_inputs_are_refused_before_any_cell_and_before_the_folder(handed, tmp_path, capsys, base, old,
                                                                    new, words):
    text = TINY if base == "tiny" else GIVEN
    if base == "tiny" and new == "":  # a clean model with a repair guided by its poisoned images
        text = text.replace('kind = "prune"', 'kind = "guided-prune"')
    assert old in text
    cfg = write(tmp_path, text.replace(old, new).replace("{d}", str(handed)))
    out = tmp_path / "r"
    capsys.readouterr()
    code = main(["run", str(cfg), "--out", str(out), "--jobs", "1"])
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.err
    assert words in lines[0]
    assert "started" not in err.out and not out.exists()


def test_the_keras_model_handed_over_must_fit_the_data(handed, csaw_dir, tmp_path, capsys):
    text = GIVEN.replace('model = "{d}/model.safetensors"',
                         f'model = "{csaw_dir / "sunglasses_bd_weights.h5"}"\narch = "deepid"')
    cfg = write(tmp_path, text.replace("{d}", str(handed)))
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(55, 47, 3), got (16, 16, 1)" in err[0]
    assert not (tmp_path / "r").exists()


def test_ray_missing_is_refused_before_the_folder(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["run", str(write(tmp_path, TINY)), "--out", str(tmp_path / "r"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs Ray" in err[0] and not (tmp_path / "r").exists()


def _earlier_run(root: Path) -> Path:
    root.mkdir()
    (root / ".backdoorlab").write_text('{"tool": "backdoorlab", "version": "x", "command": "run"}')
    return root


def test_overwrite_never_deletes_an_input_of_the_experiment(handed, tmp_path, capsys):
    """--overwrite refuses an earlier run folder that holds the data, a handed-over model or a
    trigger picture the experiment reads (replacing the folder would delete them)."""
    import numpy as np
    from PIL import Image

    r = _earlier_run(tmp_path / "r")
    shutil.copy(handed / "clean_valid.h5", r / "train.h5")
    shutil.copytree(handed, r / "atk")
    Image.fromarray(np.full((3, 3, 4), 255, np.uint8)).save(r / "trig.png")
    cases = [TINY.replace('source = "digits"', f'source = "{r / "train.h5"}"'),
             TINY.replace('source = "digits"', f'source = "csaw:{r / "train.h5"}"'),
             GIVEN.replace("{d}", str(r / "atk")),
             TINY.replace('trigger = "patch:size=4"', f'trigger = "image:{r / "trig.png"}"')]
    before = sorted((p.relative_to(r).as_posix(), p.stat().st_size) for p in r.rglob("*"))
    for i, text in enumerate(cases):
        cfg = write(tmp_path, text, f"exp{i}.toml")
        assert main(["run", str(cfg), "--out", str(r), "--overwrite", "--jobs", "1"]) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the input" in err[0], err
        assert sorted((p.relative_to(r).as_posix(), p.stat().st_size) for p in r.rglob("*")) == before


BOOM = '''
from dataclasses import dataclass
import errno

from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.registry import register


@dataclass
class Options:
    disk_full: bool = opt(False, "fail as on a full disk")


@register("boom", "repair", Options, paper="a test", summary="fails when it runs")
def run(clf, data, o):
    if o.disk_full:
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere/model.safetensors")
    raise BadInput("boom: failed while running")
'''


@pytest.fixture
def boom(tmp_path, monkeypatch):
    """A repair that fails only once it runs (a plugin: worker processes load it too)."""
    from backdoorlab import registry

    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "boom.py").write_text(BOOM)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(plugin))
    monkeypatch.setattr(registry, "_loaded", set())
    yield
    registry._METHODS.pop("boom", None)
    import sys

    sys.modules.pop("backdoorlab_methods.boom", None)


def test_a_full_disk_stops_the_grid_with_one_line(boom, handed, tmp_path, capsys):
    text = GIVEN.replace("{d}", str(handed)) + '\n[[defense]]\nname = "b"\nkind = "boom"\ndisk_full = true\n'
    assert main(["run", str(write(tmp_path, text)), "--out", str(tmp_path / "r"), "--jobs", "1"]) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full"), err


def test_a_grid_finishes_seed_by_seed_and_defenses_before_new_trainings(tmp_path):
    """With one worker, the cells of seed 0 (defenses of a finished model first) run before any
    training of seed 1, whatever the order of the file; never more cells at once than workers."""
    from backdoorlab.experiment.executors import execute

    class OneWorker:
        jobs = 1

        def __init__(self):
            self.order, self.live, self.most = [], 0, 0

        def submit(self, cell, root, parent_dir, threads):
            self.order.append(cell["label"])
            self.live += 1
            self.most = max(self.most, self.live)
            return cell["label"]

        def wait_any(self, handles, timeout=None):
            self.live -= 1
            return handles[:1]

        def result(self, h):
            return {"dir": h}

        def close(self, cancel=False, handles=None):
            pass

    def cell(label, seed, parent=None):
        return Cell(label, label, "attack" if parent is None else "prune", "a", None, seed, {}, parent)

    cells = [cell("a-s0", 0), cell("b-s0", 0), cell("a-s1", 1), cell("a-prune-s0", 0, "a-s0"),
             cell("b-prune-s0", 0, "b-s0"), cell("a-prune-s1", 1, "a-s1")]
    backend = OneWorker()
    records, errors = execute(cells, tmp_path, backend, 1)
    assert not errors and len(records) == 6 and backend.most == 1
    assert backend.order == ["a-s0", "a-prune-s0", "b-s0", "b-prune-s0", "a-s1", "a-prune-s1"]
