"""Every grid file under benchmarks/ loads and plans its cells with the code as it is: a renamed
option or a typo in a benchmark's TOML is caught here, not an hour into a run."""

import os
from pathlib import Path

import pytest

from backdoorlab.experiment.cells import plan_cells
from backdoorlab.experiment.config import load_experiment

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# tmp*.toml: the one-seed copies grid_bench writes beside a grid file while it runs
FILES = [p for p in sorted(BENCH.glob("*.toml")) + sorted(BENCH.glob("zoo/*.toml"))
         if not p.name.startswith("tmp")]
DATA = os.environ.get("BACKDOORLAB_DATA")


def test_there_are_grid_files():
    assert len(FILES) >= 5


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(BENCH)))
def test_grid_file_plans(path):
    if "BACKDOORLAB_DATA" in path.read_text() and not (DATA and Path(DATA).is_dir()):
        pytest.skip("BACKDOORLAB_DATA is not set to the shared data folder (the file's data source)")
    cells = plan_cells(load_experiment(path))
    assert cells, f"{path.name} plans no cell"
    keys = [c.key for c in cells]
    assert len(set(keys)) == len(keys), "two cells share a cache key"


def test_only_attacks_keeps_the_named_attacks_and_their_keys(tmp_path):
    """`--attacks` runs a copy of the grid file holding some of its [[attack]] tables: the copy
    plans exactly those attacks' cells, each under the full file's cache key (so the cells it
    computes are the full grid's), and an unknown name stops it before any run."""
    import sys

    sys.path.insert(0, str(BENCH))
    from grid_bench import only_attacks

    path = BENCH / "repairs_gtsrb.toml"
    if not (DATA and Path(DATA).is_dir()):
        pytest.skip("BACKDOORLAB_DATA is not set to the shared data folder (the file's data source)")
    full = {c.label: c.key for c in plan_cells(load_experiment(path))}
    copy = tmp_path / "part.toml"  # its data path comes from BACKDOORLAB_DATA, set here
    copy.write_text(only_attacks(path.read_text(), ["sig", "blend"]))
    part = {c.label: c.key for c in plan_cells(load_experiment(copy))}
    assert part and all(full[label] == key for label, key in part.items())
    assert {label.split("-")[0] for label in part} == {"sig", "blend"}
    assert len(part) == len([lb for lb in full if lb.startswith(("sig-", "blend-"))])
    with pytest.raises(SystemExit, match="no-such"):
        only_attacks(path.read_text(), ["sig", "no-such"])
