"""`backdoorlab detect METHOD MODEL --clean DATA`: any registered model detector
(`backdoorlab.detectors`): the verdict, the suspected target label(s), the method's statistic and
its cost; ``--target`` (if you know the attack's) only scores the answer."""

from __future__ import annotations

import argparse
from pathlib import Path

from backdoorlab.commands.common import (
    LABEL,
    add_data_options,
    add_model_options,
    add_out_option,
    check_out,
    load_data,
    load_model_from_args,
)
from backdoorlab.errors import BadInput


def cmd_detect(args: argparse.Namespace) -> int:
    check_out(args, "detect")  # before any loading or work
    from backdoorlab import registry
    from backdoorlab.detectors import detect
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.options import from_args

    method = registry.get(args.method, "model-detector")
    opts = from_args(method.options, args)
    clean = load_data(args.clean, args, default_split="train")
    clf = load_model_from_args(args, clean if clean.labeled else None)
    check_compatible(clf, clean, "clean data")
    bad = [t for t in args.target or [] if t >= clf.num_classes]
    if bad:
        raise BadInput(f"--target {bad[0]}: out of range for a model with {clf.num_classes} classes")
    print(f"model:      {clf.describe()}")
    print(f"detector:   {method.name} ({method.paper}) on {len(clean):,} clean images")
    res = detect(method.name, clf, clean, opts, args.target)
    det = res.detection
    top = sorted(det.scores.items(), key=lambda kv: -kv[1])[:5]
    lines = [f"verdict:    {'BACKDOORED' if det.backdoored else 'no backdoor found'}; flagged "
             f"{', '.join(map(str, det.flagged)) or 'no label'}",
             f"statistic:  {det.statistic_name} "
             + ("—" if det.statistic is None else f"{det.statistic:.3f}"),
             "top scores: " + ", ".join(f"label {y} {v:.2f}" for y, v in top)]
    if res.right_target is not None:
        lines.append(f"target:     {'right' if res.right_target else 'wrong or none'} (attack target(s) "
                     f"{', '.join(map(str, res.targets))})")
    lines.append(f"cost:       {res.seconds:.1f} s, {res.passes:,} image passes")
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        if det.triggers:  # the format of `cleanse`: usable as `repair --triggers`
            from backdoorlab.defenses.neural_cleanse import write_triggers

            write_triggers(det.triggers, tmp / "triggers.npz")
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        write_json(tmp / "results.json", {**res.to_dict(), "paper": method.paper,
                                          "inputs": {"model": args.model, "clean": args.clean}})
    print("\n".join(lines))
    for note in det.notes:
        print(f"note: {note}")
    print(f"wrote {out}/ (results.json, summary.txt" + (", triggers.npz" if det.triggers else "") + ")")
    return 0


def register(sub) -> None:
    from backdoorlab import registry
    from backdoorlab.options import add_arguments

    p = sub.add_parser("detect", help="is a model backdoored? any registered model detector "
                       "(see 'backdoorlab list')",
                       description="Run one model detector on a model with the defender's clean data: "
                       "verdict, suspected target label(s), the method's statistic, wall time and "
                       "image passes.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", parser_class=type(p))
    for m in registry.methods("model-detector"):
        q = methods.add_parser(m.name, help=m.summary, description=f"{m.summary}. {m.paper}.")
        q.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
        q.add_argument("--clean", required=True, metavar="DATA", help="clean data the defender holds")
        q.add_argument("--target", action="append", type=LABEL, metavar="LABEL",
                       help="the attack's target, if known (only scores the answer; repeatable)")
        add_arguments(q, m.options)
        add_out_option(q)
        add_model_options(q)
        add_data_options(q)
        q.set_defaults(func=cmd_detect)
