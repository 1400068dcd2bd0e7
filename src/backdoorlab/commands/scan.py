"""`backdoorlab scan MODEL [--clean DATA]`: the model detectors of the default set (those with a
model-level p-value: MM-BD, Neural Cleanse) whose data needs are met, at their defaults, and one
verdict. ``--detector NAME`` (repeatable) chooses others, e.g. ``abs``, which has no p-value and
is therefore left out of the default set.

The rule (stated in the output, `backdoorlab.detectors.verdict`): the model is reported backdoored
when at least one detector's model-level p-value is below 0.05 divided by the number of detectors
with a p-value run (Bonferroni: at most 5 % false alarms on backdoor-free models when the p-values
are valid), or when a detector without a p-value says so by its own rule;
the suspected target is the label most of those detectors flag (ties: the first detector's, in
registry order). Each detector's own verdict is printed beside it with its statistic, so a user
sees which method says what. Data-free detectors (MM-BD) run without ``--clean``; detectors that
need clean data run only when it is given (the output says which were skipped and why).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backdoorlab.commands.common import (
    LABEL,
    add_data_options,
    add_model_options,
    add_out_option,
    check_out,
    integer,
    load_data,
    load_model_from_args,
)
from backdoorlab.errors import BadInput

REPEATS = integer(1, 100)


def cmd_scan(args: argparse.Namespace) -> int:
    check_out(args, "scan")
    from backdoorlab import registry
    from backdoorlab.detectors import detect_repeated, scan_set, verdict
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.io import atomic_dir, write_json

    wanted = args.detector or scan_set()[0]
    methods = [registry.get(n, "model-detector") for n in wanted]  # unknown names: exit 2 here
    seedless = [m.name for m in methods if "seed" not in m.options.__dataclass_fields__]
    if args.repeats > 1 and seedless:
        raise BadInput(f"--repeats {args.repeats}: {seedless[0]} has no seed option, so its runs "
                       "would all be the same")
    clean = load_data(args.clean, args, default_split="train") if args.clean else None
    clf = load_model_from_args(args, clean if clean is not None and clean.labeled else None)
    if clean is not None:
        check_compatible(clf, clean, "clean data")
    bad = [t for t in args.target or [] if t >= clf.num_classes]
    if bad:
        raise BadInput(f"--target {bad[0]}: out of range for a model with {clf.num_classes} classes")
    runnable, skipped = [], {}
    for m in methods:
        if "clean" in m.needs and clean is None:
            skipped[m.name] = "needs clean data (--clean)"
        else:
            runnable.append(m)
    if not runnable:
        raise BadInput("no detector can run on what was given: "
                       + "; ".join(f"{k} {v}" for k, v in skipped.items()))
    print(f"model:      {clf.describe()}")
    given = f"{len(clean):,} clean images" if clean is not None else "none (data-free detectors only)"
    print(f"data:       {given}")
    results = {}
    for m in runnable:
        times = f", {args.repeats} seeds" if args.repeats > 1 else ""
        print(f"running     {m.name} ({m.paper}{times}) …", flush=True)
        results[m.name] = detect_repeated(m.name, clf, clean, None, args.target, args.repeats)
    ver = verdict(results)
    backdoored, targets = ver.backdoored, ver.targets
    lines = [f"verdict:    {'BACKDOORED' if backdoored else 'no backdoor found'}"
             + (f"; suspected target label(s) {', '.join(map(str, targets))}" if targets else ""),
             f"rule:       {ver.rule}"]
    for name, res in results.items():
        det = res.detection
        stat = "—" if det.statistic is None else f"{det.statistic:.4g}"
        said = ("label " if len(det.flagged) == 1 else "labels ") + ", ".join(map(str, det.flagged)) \
            if det.flagged else "no label"
        sig = "significant" if name in ver.significant else "not significant"
        lines.append(f"  {name:<15} flags {said:<16} {det.statistic_name} {stat} ({sig}); "
                     f"{res.seconds:.1f} s, {res.passes:,} image passes")
        for run in det.details.get("repeats", []) if args.repeats > 1 else []:
            value = run["p_value"] if run["p_value"] is not None else run["statistic"]
            what = "p" if run["p_value"] is not None else "statistic"
            flags = ", ".join(map(str, run["flagged"])) or "none"
            lines.append(f"  {'':<15}   seed {run['seed']}: {what} {value:.4g}, flags {flags}")
    for name, why in skipped.items():
        lines.append(f"  {name:<15} skipped: {why}")
    if args.target:
        hit = bool(targets) and targets[0] in args.target
        lines.append(f"target:     {'right' if hit else 'wrong or none'} (attack target(s) "
                     f"{', '.join(map(str, args.target))})")
    doc = {"kind": "scan", "backdoored": backdoored, "targets": targets, "rule": ver.rule,
           "alpha": ver.alpha, "level": ver.level, "significant": ver.significant,
           "repeats": args.repeats,
           "detectors": {k: v.to_dict() for k, v in results.items()}, "skipped": skipped,
           "inputs": {"model": args.model, "clean": args.clean}}
    out = Path(args.out)
    files = ["results.json", "summary.txt"]
    with atomic_dir(out) as tmp:
        from backdoorlab.defenses.neural_cleanse import write_triggers
        from backdoorlab.report.triggers_plot import plot_detection_triggers

        for name, res in results.items():
            if res.detection.triggers:  # usable as `repair --triggers`, and as a picture
                write_triggers(res.detection.triggers, tmp / f"triggers-{name}.npz")
                plot_detection_triggers(res.detection, tmp / f"triggers-{name}.png", name)
                files += [f"triggers-{name}.npz", f"triggers-{name}.png"]
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        write_json(tmp / "results.json", {**doc, "outputs": files})
    print("\n".join(lines))
    print(f"wrote {out}/ ({', '.join(files)})")
    return 0


def register(sub) -> None:
    from backdoorlab.detectors import scan_set

    default, others = scan_set()
    p = sub.add_parser("scan", help="is a model backdoored? the model detectors that fit the data "
                       "given, one verdict",
                       description="Run the default model detectors whose data needs are met "
                       "(data-free ones without --clean) at their defaults and print one verdict, "
                       "the suspected target label(s) and which detector says what. Default set: "
                       f"{', '.join(default)} (each gives a model-level p-value)"
                       + (f"; also available with --detector: {', '.join(others)}" if others else "")
                       + ".")
    p.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    p.add_argument("--clean", metavar="DATA", help="clean data the defender holds (optional: without "
                   "it only data-free detectors run)")
    p.add_argument("--detector", action="append", metavar="NAME",
                   help="run this detector instead of the default set (repeatable; see "
                   "'backdoorlab list')")
    p.add_argument("--target", action="append", type=LABEL, metavar="LABEL",
                   help="the attack's target, if known (only scores the answer; repeatable)")
    p.add_argument("--repeats", type=REPEATS, default=1, metavar="N",
                   help="run each detector N times (seeds 0 … N-1) and merge: p-value = N/k × the "
                   "k-th smallest, k = ceil(N/2), valid however the runs depend on each other "
                   "(Rüger 1978); flags = labels at least k runs flag. Costs N times the time; "
                   "shows how much the verdict depends on the seed")
    add_out_option(p)
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(func=cmd_scan)
