"""`backdoorlab run EXPERIMENT.toml`: an attacks × defenses × seeds grid, cached, local or on Ray."""

from __future__ import annotations

import argparse

from backdoorlab.commands.common import POSITIVE, add_out_option


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backdoorlab.experiment.run import run_experiment

    args.out = args.out or str(Path("runs") / Path(args.config).stem)  # where --json finds results.json
    res = run_experiment(args.config, args.out, args.executor, args.jobs, args.threads, args.address,
                         args.dry_run, report=not args.no_report, overwrite=args.overwrite)
    return 2 if res.get("errors") else 0


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run an experiment grid (attacks x defenses x seeds) from a TOML file",
        description="Train every attack model of the experiment file for every seed, apply every "
        "defense to each, and write summary.md / summary.csv (clean accuracy and ASR before and "
        "after each defense, mean ± std over seeds), results.json and report.html into --out. "
        "Each finished cell is kept under its content hash (cells/<name>-<hash>/): a re-run "
        "recomputes only the cells whose options or inputs changed, and an interrupted run (Ctrl-C) "
        "resumes from the finished cells.",
        epilog="Examples: examples/*.toml. The file format is documented in docs/experiments.md.")
    p.add_argument("config", metavar="EXPERIMENT.toml", help="experiment file (docs/experiments.md)")
    add_out_option(p, required=False, help="output folder (default runs/<file name>)", resumable=True)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes or a Ray cluster (pip install 'backdoorlab[ray]')")
    p.add_argument("--jobs", type=POSITIVE, help="local: cells run at once (default: cores / threads)")
    p.add_argument("--threads", type=POSITIVE, help="torch threads per cell (default: cores / jobs; keep it "
                   "the same to reproduce numbers exactly)")
    p.add_argument("--address", help="ray: cluster address (default: start a local Ray instance)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and which are cached, run nothing")
    p.add_argument("--no-report", action="store_true", help="skip report.html / report.md")
    p.set_defaults(func=cmd_run)
