"""`backdoorlab report DIR`: rebuild report.md and report.html from a run folder."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backdoorlab.errors import BadInput
    from backdoorlab.io import read_marker
    from backdoorlab.report.builder import build_report

    d = Path(args.dir)
    if not d.is_dir():
        raise BadInput(f"{d}: no such folder")
    ours = read_marker(d) is not None or (d / "results.json").is_file()
    mine = [n for n in ("report.md", "report.html") if (d / n).exists()]
    if mine and not ours:  # never replace a user's own report files
        raise BadInput(f"{d}: is not a backdoorlab output and holds {' and '.join(mine)}; they are "
                       "never replaced")
    md, hp = build_report(args.dir, args.title)
    print(f"wrote {hp} and {md}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.html / report.md from a run folder",
                       description="Read every results.json in DIR and its sub-folders (attack, prune, "
                       "fine-prune, cleanse, experiment and demo runs) and write DIR/report.md and a "
                       "self-contained DIR/report.html (images embedded).")
    p.add_argument("dir", metavar="DIR", help="a run folder (of run, attack, prune, cleanse, demo …)")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=cmd_report)
