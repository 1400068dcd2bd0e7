"""``backdoorlab run EXPERIMENT.toml``: plan the grid, compute what is missing, write table and report."""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

from backdoorlab.experiment.cells import check_options, plan_cells
from backdoorlab.experiment.config import load_experiment
from backdoorlab.experiment.display import GridProgress
from backdoorlab.experiment.executors import default_jobs_threads, execute, make_backend
from backdoorlab.experiment.preflight import experiment_inputs, preflight
from backdoorlab.experiment.summary import (
    DETECT_HEAD,
    DETECTION_NOTE,
    HEAD,
    INPUT_DETECT_HEAD,
    INPUT_DETECTION_NOTE,
    INSPECT_HEAD,
    INSPECTION_NOTE,
    detection_rows,
    heatmap_values,
    input_detection_rows,
    inspection_rows,
    summary_rows,
)
from backdoorlab.io import atomic_path, check_out_dir, claim_now, write_json
from backdoorlab.tables import markdown, print_table


def run_experiment(config: str | Path, out: str | Path | None = None, executor: str = "local",
                   jobs: int | None = None, threads: int | None = None, address: str | None = None,
                   dry_run: bool = False, report: bool = True, overwrite: bool = False) -> dict:
    """Plan the grid of ``config``, compute the cells not cached under ``out`` and write the summary.
    ``out`` must be new, empty or an earlier run's folder (resumed; ``overwrite``: started afresh)."""
    # absolute, so workers whose working directory differs (Ray) write to the same place
    root = (Path(out) if out else Path("runs") / Path(config).stem).resolve()
    exp = load_experiment(config)
    cells = plan_cells(exp)
    check_options(cells)  # every cell's command line
    preflight(exp, executor)  # its data, architecture, triggers, given models, layers and labels
    jobs, threads = default_jobs_threads(jobs, threads)
    if executor == "local" and exp.compute.get("device", "cpu").startswith(("cuda", "auto")):
        from backdoorlab.device import gpu_count

        if gpu_count(exp.compute["device"]) and jobs > 1:  # one GPU cell at a time on the device
            print(f"[compute] device {exp.compute['device']}: one cell at a time (--jobs {jobs} -> 1)")
            jobs = 1
    if not dry_run:  # the config is valid: check the folder before any work
        check_out_dir(root, overwrite, "run", in_place=True, resume=True, inputs=experiment_inputs(exp),
                      own=("cells", "logs"))
    n_att = sum(c.kind == "attack" for c in cells)
    n_given = sum(c.kind == "given" for c in cells)
    print(f"experiment {exp.name!r}: {len(exp.attacks)} attack(s) × {len(exp.defenses)} defense(s) × "
          f"{len(exp.seeds)} seed(s) = {len(cells)} cells ({n_att} models to train, "
          + (f"{n_given} given, " if n_given else "")
          + f"{len(cells) - n_att - n_given} defense runs); output {root}/")
    if dry_run:
        from backdoorlab.experiment.cells import finished

        for c in cells:
            state = "cached" if finished(root, c) else "to run"
            print(f"  {c.label:40s} {c.key[:12]}  {state}")
        return {}
    claim_now(root)  # marked (and, with --overwrite, emptied) now that everything is checked
    if Path(config).resolve() != (root / "experiment.toml").resolve():
        with atomic_path(root / "experiment.toml") as tmp:
            shutil.copyfile(config, tmp)
    t0 = time.perf_counter()
    console = GridProgress(cells, root, jobs if executor == "local" else len(cells))

    def say(rec: dict, cached: bool, done: int, total: int) -> None:
        if cached:
            cached_recs.append(rec)
            if len(cached_recs) == done:  # the last cached record: print them once
                console.cached(cached_recs, total)
        else:
            console.finished(rec, done, total)

    cached_recs: list[dict] = []
    if executor == "local":
        print(f"executor local: {jobs} worker process(es) × {threads} torch thread(s)")
    else:
        print(f"executor ray: tasks of {threads} torch thread(s)")
    backend = make_backend(executor, jobs, threads, address)
    try:
        records, errors = execute(cells, root, backend, threads, say, console.started, console.tick)
    finally:
        console.close()
    rows = summary_rows(cells, records)
    detect_rows = detection_rows(cells, records)
    input_rows = input_detection_rows(cells, records)
    inspect_rows = inspection_rows(cells, records)
    seconds = time.perf_counter() - t0
    computed = sum(not r["cached"] for r in records.values())
    desc = (f"{exp.description} " if exp.description else "") + (
        (f"Data {exp.data['source']}, architecture {exp.model['arch']}, " if exp.data.get("source") else "")
        + f"seeds {exp.seeds}. "
        "Clean accuracy on the clean test set and ASR on its poisoned copy (inputs already of the "
        "target label excluded), in %, mean ± sample standard deviation over seeds; Δ acc in "
        "percentage points; robust accuracy (poisoned inputs classified as their true label), DER "
        "(BackdoorBench: [max(0, ΔASR) − max(0, ΔACC) + 1] / 2) and the repair's own time and image "
        "passes. An attack below 50 % ASR is marked \"did not implant\".")
    result = {"kind": "experiment", "name": exp.name, "description": desc, "config_file": str(config),
              "seeds": exp.seeds, "executor": executor, "threads_per_cell": threads,
              "table": {"head": HEAD, "rows": rows},
              "detection_table": {"head": DETECT_HEAD, "rows": detect_rows} if detect_rows else None,
              "input_detection_table": ({"head": INPUT_DETECT_HEAD, "rows": input_rows} if input_rows
                                        else None),
              "inspection_table": {"head": INSPECT_HEAD, "rows": inspect_rows} if inspect_rows else None,
              "cells": [{k: v for k, v in r.items()} for r in records.values()],
              "errors": errors, "computed_cells": computed, "cached_cells": len(records) - computed,
              "seconds": round(seconds, 1)}
    write_json(root / "results.json", result)
    with atomic_path(root / "summary.md") as tmp:
        detectors = (f"\n## Model detectors\n\n{DETECTION_NOTE}\n\n"
                     + markdown(DETECT_HEAD, detect_rows)) if detect_rows else ""
        detectors += (f"\n## Input detectors\n\n{INPUT_DETECTION_NOTE}\n\n"
                      + markdown(INPUT_DETECT_HEAD, input_rows)) if input_rows else ""
        detectors += (f"\n## Data inspectors\n\n{INSPECTION_NOTE}\n\n"
                      + markdown(INSPECT_HEAD, inspect_rows)) if inspect_rows else ""
        tmp.write_text(f"# {exp.name}\n\n{desc}\n\n" + markdown(HEAD, rows) + detectors)
    with atomic_path(root / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEAD)
        w.writerows(rows)
    attacks, defenses, asr, acc = heatmap_values(cells, records)
    if attacks and defenses:
        from backdoorlab.report.heatmap import plot_heatmap

        plot_heatmap(asr, attacks, defenses, "ASR after repair (%)", root / "heatmap_asr.png")
        plot_heatmap(acc, attacks, defenses, "change in clean accuracy (points)",
                     root / "heatmap_accuracy.png", cmap="RdBu", center=0.0, unit="points")
    print()
    for head, body in ((HEAD, rows), (DETECT_HEAD, detect_rows), (INPUT_DETECT_HEAD, input_rows),
                       (INSPECT_HEAD, inspect_rows)):
        if body:
            print_table(head, body)
            print()
    print(f"\n{computed} cell(s) computed, {len(records) - computed} from cache, in {seconds:.0f} s")
    if report:
        from backdoorlab.report.builder import build_report

        md, hp = build_report(root, f"Experiment: {exp.name}")
        print(f"report: {hp}  (also {md.name}, summary.md, summary.csv, results.json)")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return result
