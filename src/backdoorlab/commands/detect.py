"""`backdoorlab detect METHOD MODEL --clean DATA`: any registered model detector
(`backdoorlab.detectors`): the verdict, the suspected target label(s), the method's statistic and
its cost; ``--target`` (if you know the attack's) only scores the answer.

An input detector (`backdoorlab.input_detectors`, e.g. ``strip``) is a METHOD too:
``detect strip MODEL --clean DATA [--test CLEAN] [--poisoned P …] [--far 0.05]`` fits it on part of
--clean, sets its threshold at the false-alarm rate --far on the held-back rest, and reports on the
given test data the detection rate on poisoned inputs, the false-alarm rate measured on clean ones
and the AUROC."""

from __future__ import annotations

import argparse
from pathlib import Path

from backdoorlab.commands.common import (
    FRACTION,
    LABEL,
    add_data_options,
    add_model_options,
    add_out_option,
    add_poisoned_options,
    check_out,
    load_data,
    load_model_from_args,
    load_poisoned,
    poisoned_lines,
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
    clean = load_data(args.clean, args, default_split="train") if args.clean else None
    clf = load_model_from_args(args, clean if clean is not None and clean.labeled else None)
    if clean is not None:
        check_compatible(clf, clean, "clean data")
    bad = [t for t in args.target or [] if t >= clf.num_classes]
    if bad:
        raise BadInput(f"--target {bad[0]}: out of range for a model with {clf.num_classes} classes")
    print(f"model:      {clf.describe()}")
    print(f"detector:   {method.name} ({method.paper}) on "
          + (f"{len(clean):,} clean images" if clean is not None else "the weights alone (no data)"))
    res = detect(method.name, clf, clean, opts, args.target)
    det = res.detection
    top = sorted(det.scores.items(), key=lambda kv: -kv[1])[:5]
    flags = (f"label{'s' if len(det.flagged) > 1 else ''} {', '.join(map(str, det.flagged))}"
             if det.flagged else "no label")
    lines = [f"verdict:    {'BACKDOORED' if det.backdoored else 'no backdoor found'}; flagged {flags}",
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
            from backdoorlab.report.triggers_plot import plot_detection_triggers

            write_triggers(det.triggers, tmp / "triggers.npz")
            plot_detection_triggers(det, tmp / "triggers.png", args.method)
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        write_json(tmp / "results.json", {**res.to_dict(), "paper": method.paper,
                                          "revision": method.revision,
                                          "inputs": {"model": args.model, "clean": args.clean}})
    print("\n".join(lines))
    for note in det.notes:
        print(f"note: {note}")
    print(f"wrote {out}/ (results.json, summary.txt"
          + (", triggers.npz, triggers.png" if det.triggers else "") + ")")
    return 0


# the options `detect` gives every input detector besides the method's own; they are also keys of
# an input detector's [[defense]] table in `backdoorlab run`, checked there with these same types
INPUT_DETECT_OPTIONS: dict[str, dict] = {
    "far": {"type": FRACTION, "default": 0.05, "metavar": "RATE",
            "help": "false-alarm rate the threshold is set at, in (0, 1)"},
    "calibration": {"type": FRACTION, "default": 0.2, "metavar": "FRACTION",
                    "help": "share of --clean held back to set the threshold on"},
}


def _rate(v: float | None, n: int, what: str) -> str:
    return "—" if v is None else f"{v:.2%} of {n:,} {what}"


def cmd_input_detect(args: argparse.Namespace) -> int:
    check_out(args, "detect")  # before any loading or work
    from backdoorlab import registry
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.input_detectors import evaluate
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.options import from_args

    method = registry.get(args.method, "input-detector")
    opts = from_args(method.options, args)
    clean = load_data(args.clean, args, default_split="train")
    clf = load_model_from_args(args, clean if clean.labeled else None)
    check_compatible(clf, clean, "clean data")
    test = None
    if args.test:
        test = load_data(args.test, args)
        check_compatible(clf, test, "clean test data")
    sets = load_poisoned(args, clf)
    print(f"model:      {clf.describe()}")
    print(f"detector:   {method.name} ({method.paper}) on {len(clean):,} clean images; threshold at "
          f"{args.far:.1%} false alarms on a held-back {args.calibration:.0%} of them")
    for line in poisoned_lines(sets):
        print(line)
    res = evaluate(method.name, clf, clean, test, sets, opts, args.far,
                   seed=int(getattr(opts, "seed", 0) or 0), calibration_fraction=args.calibration)
    split = res.details.get("clean_split", {})
    lines = [f"statistic:  {res.statistic}; threshold {res.threshold:.4g} (fitted on "
             f"{split.get('fitted_on', 0):,} clean images, set on {split.get('threshold_set_on', 0):,})",
             f"false alarms: {_rate(res.far_measured, res.n_clean, 'clean test inputs rejected')} "
             f"(requested {res.far_requested:.1%})" if test is not None else
             "false alarms: — (give --test clean test data to measure them)",
             f"detection:  {_rate(res.detection_rate, res.n_poisoned, 'poisoned inputs rejected')}"
             if sets else "detection:  — (give --poisoned data to measure it)"]
    per_set = res.details.get("per_set", {})
    if len(per_set) > 1:
        lines += [f"  {name}: {_rate(v['detection_rate'], v['n'], 'rejected')}"
                  + ("" if v["auroc"] is None else f", AUROC {v['auroc']:.3f}")
                  for name, v in per_set.items()]
    lines += [f"AUROC:      {'—' if res.auroc is None else f'{res.auroc:.4f}'}",
              f"cost:       {res.seconds:.1f} s, {res.passes:,} image passes"]
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        write_json(tmp / "results.json", {
            **res.to_dict(), "paper": method.paper, "calibration_fraction": args.calibration,
            "poisoned_sets": [ps.describe() for ps in sets],
            "inputs": {"model": args.model, "clean": args.clean, "test": args.test,
                       "poisoned": list(args.poisoned or [])}})
    print("\n".join(lines))
    print(f"wrote {out}/ (results.json, summary.txt)")
    return 0


def register(sub) -> None:
    from backdoorlab import registry
    from backdoorlab.options import add_arguments

    p = sub.add_parser("detect", help="is a model backdoored? which inputs are? any registered model "
                       "or input detector (see 'backdoorlab list')",
                       description="Run one model detector on a model with the defender's clean data: "
                       "verdict, suspected target label(s), the method's statistic, wall time and "
                       "image passes. Or one input detector: fitted on the clean data, threshold at "
                       "a false-alarm rate, detection rate, measured false alarms and AUROC on "
                       "test data.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", parser_class=type(p))
    for m in registry.methods("model-detector"):
        q = methods.add_parser(m.name, help=m.summary, description=f"{m.summary}. {m.paper}.")
        q.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
        needs_clean = "clean" in m.needs
        q.add_argument("--clean", required=needs_clean, metavar="DATA",
                       help="clean data the defender holds" + ("" if needs_clean else
                                                               " (optional: the method is data-free)"))
        q.add_argument("--target", action="append", type=LABEL, metavar="LABEL",
                       help="the attack's target, if known (only scores the answer; repeatable)")
        add_arguments(q, m.options)
        add_out_option(q)
        add_model_options(q)
        add_data_options(q)
        q.set_defaults(func=cmd_detect)
    for m in registry.methods("input-detector"):
        q = methods.add_parser(m.name, help=f"(input detector) {m.summary}",
                               description=f"{m.summary}. {m.paper}. Fitted on --clean, threshold at "
                               "--far false alarms on a held-back part of it; --test (clean) and "
                               "--poisoned data give the false alarms measured, the detection rate "
                               "and the AUROC.")
        q.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
        q.add_argument("--clean", required=True, metavar="DATA",
                       help="clean data the defender holds (fit + threshold)")
        q.add_argument("--test", metavar="CLEAN_TEST", help="clean test data: the false-alarm rate "
                       "measured on it")
        add_poisoned_options(q, "poisoned test data: the detection rate measured on it")
        for key, kw in INPUT_DETECT_OPTIONS.items():
            q.add_argument("--" + key, **kw)
        add_arguments(q, m.options)
        add_out_option(q)
        add_model_options(q)
        add_data_options(q)
        q.set_defaults(func=cmd_input_detect)
