"""`backdoorlab report DIR`: rebuild report.md and report.html from a run folder."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from backdoorlab.report.builder import build_report

    md, hp = build_report(args.dir, args.title)
    print(f"wrote {hp} and {md}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.html / report.md from a run folder",
                       description="Read every results.json in DIR and its sub-folders (attack, prune, "
                       "fine-prune, cleanse, experiment and demo runs) and write DIR/report.md and a "
                       "self-contained DIR/report.html (images embedded).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=cmd_report)
