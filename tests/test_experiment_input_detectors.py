"""`backdoorlab run` with an input detector (STRIP) as a defense kind of the grid: its cell runs
`backdoorlab detect METHOD` on the attack model, the summary reads its results.json, bad options stop
the run before any cell, and the experiment package dispatches by family, never by method name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import DIGITS_GRID

from backdoorlab import registry
from backdoorlab.cli import main
from backdoorlab.experiment.run import run_experiment

GRID = """
seeds = [1]
""" + DIGITS_GRID + """[[attack]]
name = "badnets"
trigger = "patch:size=3"
target = 0
rate = 0.1
[[defense]]
name = "strip"
kind = "strip"
copies = 20
far = 0.1
"""


def write(tmp: Path, text: str) -> Path:
    p = tmp / "exp.toml"
    p.write_text(text)
    return p


def test_an_input_detector_cell_reports_what_detect_measured(tmp_path):
    out = tmp_path / "out"
    res = run_experiment(write(tmp_path, GRID), out, jobs=1, threads=1, report=True)
    assert res["errors"] == []
    assert [r[1] for r in res["table"]["rows"]] == ["none"]  # a detector is not a repair row
    assert res["detection_table"] is None
    table = res["input_detection_table"]
    assert table["head"][4:8] == ["FAR requested", "detection rate", "FAR measured", "AUROC"]
    (row,) = table["rows"]
    rec = next(c for c in res["cells"] if c["cell"]["label"] == "badnets-strip-s1")
    att = next(c for c in res["cells"] if c["cell"]["label"] == "badnets-s1")
    r = json.loads((out / "cells" / rec["dir"] / "results.json").read_text())
    assert r["kind"] == "input-detect" and r["method"] == "strip"
    # the attack model with its clean validation split (fit + threshold), clean test and poisoned test
    model_dir = out / "cells" / att["dir"]
    assert r["inputs"] == {"model": str(model_dir / "model.safetensors"),
                           "clean": str(model_dir / "clean_valid.h5"),
                           "test": str(model_dir / "clean_test.h5"),
                           "poisoned": [str(model_dir / "poisoned_test.h5")]}
    assert r["options"]["copies"] == 20 and r["options"]["seed"] == 1  # the cell's seed
    assert r["far_requested"] == 0.1
    # the summary holds the command's own figures
    for k in ("detection_rate", "far_measured", "far_requested", "auroc"):
        assert rec[k] == r[k] and 0.0 <= rec[k] <= 1.0, k
    assert rec["detect_seconds"] == r["cost"]["seconds"]
    assert rec["image_passes"] == r["cost"]["image_passes"] > 0
    assert rec["accuracy"] == att["accuracy"] and rec["asr"] == att["asr"]  # the model's, before
    assert "detects" in rec["detail"] and f"{r['auroc']:.3f}" in rec["detail"]
    assert row[:4] == ["badnets", "strip", "1", f"{100 * att['asr']:.2f}"]
    assert row[4:8] == ["10.00", f"{100 * r['detection_rate']:.2f}", f"{100 * r['far_measured']:.2f}",
                        f"{r['auroc']:.3f}"]
    assert "## Input detectors" in (out / "summary.md").read_text()
    md = (out / "report.md").read_text()
    assert "## Input detector strip: badnets × strip, seed 1" in md and "| FAR requested |" in md


@pytest.mark.parametrize(("old", "new", "words"), [
    ("far = 0.1", "far = 1.5", "far: 1.5 is out of range (expected (0, 1))"),
    ("far = 0.1", "calibration = 0", "calibration: 0 is out of range"),
    ("far = 0.1", "copeis = 3", "unknown option copeis for strip"),
    ("copies = 20", "copies = 0", "copies = 0 is out of range"),
    ("far = 0.1", 'guide = "poisoned"', "guide is for repairs, not the detector strip"),
    ("far = 0.1", 'test = "x.h5"', "test is set by the experiment runner"),
])
def test_bad_input_detector_options_are_refused_before_any_cell(tmp_path, capsys, old, new, words):
    assert old in GRID
    out = tmp_path / "r"
    code = main(["run", str(write(tmp_path, GRID.replace(old, new))), "--out", str(out), "--jobs", "1"])
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.err
    assert words in lines[0] and "(strip)" in lines[0]
    assert "started" not in err.out and not out.exists()


def test_the_experiment_package_names_no_input_detector():
    """Cells, config, summary and preflight go by the registry family, never by a method's name (a
    method name as a word: `str.strip()` calls are not the STRIP detector)."""
    names = [m.name for m in registry.methods("input-detector")]
    assert "strip" in names
    src = Path(__file__).resolve().parents[1] / "src" / "backdoorlab" / "experiment"
    files = sorted(src.glob("*.py"))
    assert files
    for f in files:
        text = f.read_text(encoding="utf-8")
        for name in names:
            hits = re.findall(rf"(?<![.\w]){re.escape(name)}(?![\w(])", text, flags=re.IGNORECASE)
            assert not hits, f"{f.name} names the input detector {name!r}"


def test_far_is_checked_by_detect_and_a_list_of_rates_is_an_axis():
    from backdoorlab.commands.detect import INPUT_DETECT_OPTIONS
    from backdoorlab.experiment.cells import plan_cells
    from backdoorlab.experiment.config import family_options, parse_experiment

    assert family_options("input-detector") is INPUT_DETECT_OPTIONS  # one definition, CLI and file
    exp = parse_experiment({"data": {"source": "digits"}, "model": {"arch": "small_cnn"},
                            "attack": [{"name": "a", "trigger": "patch", "target": 0}],
                            "defense": [{"name": "s", "kind": "strip", "copies": 20, "far": [0.01, 0.05]},
                                        {"kind": "mm-bd"}]}, "x.toml")
    assert [(d.name, d.options, d.family_options) for d in exp.defenses][:2] == [
        ("s-far0.01", {"copies": 20}, {"far": 0.01}), ("s-far0.05", {"copies": 20}, {"far": 0.05})]
    cells = {c.label: c for c in plan_cells(exp)}
    assert cells["a-s-far0.01-s0"].family == "input-detector"
    assert cells["a-mm-bd-s0"].spec == {"method": "mm-bd", "options": {}, "family": "model-detector"}
    assert cells["a-s0"].family is None


def test_the_family_options_defaults_are_part_of_the_key():
    """far and calibration spelled out at their defaults give the same cell; another value, another
    cell (so a default moved by a release is computed again, not read stale from the cache)."""
    from backdoorlab.commands.detect import INPUT_DETECT_OPTIONS
    from backdoorlab.experiment.cells import plan_cells
    from backdoorlab.experiment.config import parse_experiment

    def key(**fam) -> str:
        exp = parse_experiment({"data": {"source": "digits"}, "model": {"arch": "small_cnn"},
                                "attack": [{"name": "a", "trigger": "patch", "target": 0}],
                                "defense": [{"name": "s", "kind": "strip", **fam}]}, "x.toml")
        return {c.label: c for c in plan_cells(exp)}["a-s-s0"].key

    defaults = {k: kw["default"] for k, kw in INPUT_DETECT_OPTIONS.items()}
    assert key() == key(**defaults) == key(far=defaults["far"])
    assert key(far=0.01) != key() and key(calibration=0.3) != key()


def _keys(*kinds: str) -> dict:
    """label → cache key of a digits grid with one patch attack and these defenses."""
    from backdoorlab.experiment.cells import plan_cells
    from backdoorlab.experiment.config import parse_experiment

    exp = parse_experiment({"data": {"source": "digits"}, "model": {"arch": "small_cnn"},
                            "attack": [{"name": "a", "trigger": "patch", "target": 0}],
                            "defense": [{"kind": k} for k in kinds]}, "x.toml")
    return {c.label: c.key for c in plan_cells(exp)}


def _only_changed(before: dict, after: dict, label: str) -> bool:
    """Whether ``label``'s key changed and no other one did."""
    return after[label] != before[label] and \
        {k: v for k, v in after.items() if k != label} == {k: v for k, v in before.items() if k != label}


def test_a_method_revision_changes_only_that_methods_keys(monkeypatch):
    """Raising a method's ``revision`` (its code now computes something else at the same options)
    gives its cells new keys and leaves every other cell's key as it was; revision 0 adds nothing
    to the key, so caches made before revisions existed stay valid."""
    import dataclasses

    from backdoorlab import registry
    from backdoorlab.experiment import cells

    seen: list[dict] = []
    real = cells.digest
    monkeypatch.setattr(cells, "digest", lambda o: seen.append(o) or real(o))
    before = _keys("neural-cleanse", "fine-prune")
    assert registry.get("neural-cleanse").revision == 0
    defenses = [o["defense"] for o in seen if o.get("kind") == "defense"]
    assert len(defenses) == 2 and all("revision" not in d for d in defenses)  # revision 0: no field
    nc = registry.get("neural-cleanse")
    monkeypatch.setitem(registry._METHODS, "neural-cleanse", dataclasses.replace(nc, revision=1))
    assert _only_changed(before, _keys("neural-cleanse", "fine-prune"), "a-neural-cleanse-s0")


def test_the_repair_label_rule_keys_only_the_repairs_that_use_a_scan(monkeypatch):
    """The cells that repair with a scan's reversed triggers carry the version of the rule that
    picks their labels (`repair_labels`): a new rule computes them again, and no other cell."""
    from backdoorlab.defenses import neural_cleanse

    before = _keys("nc-unlearn", "fine-prune")
    monkeypatch.setattr(neural_cleanse, "REPAIR_LABEL_RULE", neural_cleanse.REPAIR_LABEL_RULE + 1)
    assert _only_changed(before, _keys("nc-unlearn", "fine-prune"), "a-nc-unlearn-s0")
