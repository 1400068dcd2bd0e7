"""`backdoorlab run`: config checks, content keys, the grid on digits, cache, given models, Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backdoorlab.cli import main
from backdoorlab.errors import BadInput
from backdoorlab.experiment.cells import Cell, plan_cells
from backdoorlab.experiment.config import load_experiment, parse_experiment
from backdoorlab.experiment.run import estimate_left, run_experiment
from backdoorlab.experiment.summary import mean_std, summary_rows

GRID = """
name = "tiny"
seeds = [0]
[data]
source = "digits"
size = 16
train_limit = 1200
test_limit = 300
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
    # seeds multiply the grid
    two = plan_cells(parse_experiment(doc(seeds=[0, 1])))
    assert len(two) == 4 and len({c.key for c in two}) == 4


def test_mean_std():
    assert mean_std([None, None]) is None
    m, s, n = mean_std([0.5, 0.7, None])
    assert (round(m, 6), round(s, 6), n) == (0.6, round(0.1414213562, 6), 2)
    assert mean_std([0.3]) == (0.3, 0.0, 1)


def test_eta_weighs_each_cell_left_by_the_time_of_its_kind():
    took = {"attack": [600.0, 400.0], "prune": [10.0]}
    # 2 trainings at 500 s + 1 sweep at 10 s + a scan never timed, at the mean of all (~336.7 s)
    left = estimate_left(["attack", "attack", "prune", "cleanse"], took, jobs=2)
    assert left == pytest.approx((2 * 500 + 10 + 1010 / 3) / 2)
    assert estimate_left([], took, jobs=1) is None
    assert estimate_left(["attack"], {}, jobs=1) is None


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
    for title in ("## Experiment: tiny", f"## Attack: cells/{attack['dir']}", "## Repair prune: cells/",
                  "## Repair fine-prune: cells/", "## Neural Cleanse: cells/", "## Repair magnitude: cells/",
                  "## Repair guided-prune: cells/", "## Provenance"):
        assert title in md, title
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


def test_a_failing_cell_is_reported_and_the_rest_continue(tmp_path, capsys):
    cfg = write(tmp_path, GRID.replace('kind = "fine-prune"\ndrop = 4', 'kind = "fine-prune"\ndrop = 4\n'
                                       'layer = "conv_9"'))
    res = run_experiment(cfg, tmp_path / "out", jobs=2, threads=1, report=False)
    assert len(res["errors"]) == 1 and "badnets-fp-s0" in res["errors"][0]
    assert "conv_9" in res["errors"][0] and "repair fine-prune failed" in res["errors"][0]
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
    assert "## Detect neural-cleanse: cells/" in md and "heatmap_asr.png" in md
    assert "## Model detectors" in (tmp_path / "out" / "summary.md").read_text()
