"""What the grid benchmarks (repairs_gtsrb.py, attacks_gtsrb.py) share: their command-line options,
running their experiment file through `backdoorlab run` (optionally for some seeds only), and the
'mean ± sd' cells of their tables."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ms(values: list, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    """'mean ± sd' of the values that are not None (sd only with two or more), '—' for none."""
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    m = scale * statistics.fmean(v)
    sd = f" ± {scale * statistics.stdev(v):.{digits}f}" if len(v) > 1 else ""
    return f"{m:{'+' if sign else ''}.{digits}f}" + sd


def options(description: str, name: str) -> argparse.Namespace:
    """The benchmark's options; ``name`` gives the defaults runs/NAME, benchmarks/NAME.toml with
    '-' as '_', docs/NAME.md."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=str(ROOT / "runs" / name))
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / f"{name.replace('-', '_')}.toml"))
    ap.add_argument("--no-run", action="store_true", help="only tabulate the cells already computed")
    ap.add_argument("--jobs", default="1")
    ap.add_argument("--threads", help="torch threads per cell (default: cores / jobs); 1 leaves a core "
                    "free for other work")
    ap.add_argument("--seeds", help="comma-separated seeds of the grid to run (default: the file's)")
    ap.add_argument("--attacks", help="comma-separated [[attack]] names of the grid to run (default: "
                    "all); the table still reads every attack on record")
    ap.add_argument("--doc", default=str(ROOT / "docs" / f"{name}.md"))
    args = ap.parse_args()
    os.environ.setdefault("BACKDOORLAB_DATA", str(ROOT.parent / "shared" / "data"))
    return args


def planned_keys(config: Path) -> dict[str, str]:
    """label → cache key of every cell ``config`` plans as the file and the code are now (all of its
    seeds)."""
    from backdoorlab.experiment.cells import plan_cells
    from backdoorlab.experiment.config import load_experiment

    return {c.label: c.key for c in plan_cells(load_experiment(config))}


def finished_cells(out: Path, keys: dict[str, str]) -> list[tuple[dict, dict]]:
    """(cell, results) of every finished cell of the run folder ``out`` whose key is the one
    ``keys`` (`planned_keys`) gives its label. A folder left by an earlier revision of a method or
    by other options keeps its old key and is skipped, so it never stands in for the current cell
    of the same label (the folders of one label otherwise sort by key, i.e. at random)."""
    found = []
    for cj in sorted((out / "cells").glob("*/cell.json")):
        cell = json.loads(cj.read_text())["cell"]
        res_p = cj.parent / "results.json"
        if keys.get(cell["label"]) == cell["key"] and res_p.exists():
            found.append((cell, json.loads(res_p.read_text())))
    return found


def drop_stale(rec: dict, keys: dict[str, str], label) -> list[str]:
    """Remove from the record ``rec`` (record key → figures) every entry that carries a cache key
    other than the one its cell (``label(record key)``) has now; entries recorded before keys were
    kept have none and stay. Returns the removed record keys."""
    gone = [k for k, v in rec.items() if v.get("key") and keys.get(label(k), v["key"]) != v["key"]]
    for k in gone:
        del rec[k]
    return gone


def only_attacks(text: str, names: list[str]) -> str:
    """The experiment file's text keeping only the ``[[attack]]`` tables named in ``names`` (a
    table runs from its header to the next header line of any table); everything else is kept as
    written, so the kept cells' cache keys are the full file's."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    found: set[str] = set()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "[[attack]]":
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith("["):
            j += 1
        block = lines[i:j]
        name = next((m.group(1) for x in block if (m := re.match(r'\s*name\s*=\s*"([^"]*)"', x))), "")
        if name in names:
            out.extend(block)
            found.add(name)
        i = j
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"no [[attack]] named {', '.join(missing)} in the grid file")
    return "".join(out)


def run_grid(config: Path, out: Path, jobs: str, seeds: str | None, threads: str | None = None,
             attacks: str | None = None) -> int:
    """`backdoorlab run CONFIG --out OUT` (no report); with ``seeds`` (and/or ``attacks``, names of
    its ``[[attack]]`` tables) on a copy of the file holding only those seeds (attacks), written
    beside it so that its relative paths hold, and removed afterwards. Returns the command's exit
    status."""
    from backdoorlab.cli import main as cli

    run_config = config
    if seeds or attacks:
        text = config.read_text()
        if seeds:
            wanted = [int(x) for x in seeds.split(",")]
            text, n = re.subn(r"(?m)^seeds = \[.*\]$", f"seeds = {wanted}", text)
            if n != 1:
                raise SystemExit(f"{config}: no single 'seeds = [...]' line to replace")
        if attacks:
            text = only_attacks(text, [a.strip() for a in attacks.split(",") if a.strip()])
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, dir=config.parent) as f:
            f.write(text)
        run_config = Path(f.name)
    # a `kill` (SIGTERM) stops the run like Ctrl-C, so that the copy is removed below
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        extra = ["--threads", threads] if threads else []
        return cli(["run", str(run_config), "--out", str(out), "--jobs", jobs, "--no-report", *extra])
    finally:
        if run_config != config:
            run_config.unlink()
