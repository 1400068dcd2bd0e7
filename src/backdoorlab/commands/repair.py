"""`backdoorlab repair NAME MODEL …`: any registered repair (`backdoorlab.repairs`), with its
options as flags, measured before and after on the user's test and poisoned data."""

from __future__ import annotations

import argparse
from pathlib import Path

from backdoorlab.commands.common import (
    add_data_options,
    add_model_options,
    add_out_option,
    add_poisoned_options,
    check_out,
    load_data,
    load_model_from_args,
    load_poisoned,
    poisoned_lines,
    save_model_files,
)
from backdoorlab.errors import BadInput
from backdoorlab.tables import markdown, print_table


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def repair_rows(res) -> tuple[list[str], list[list[str]]]:
    """Head and rows: clean accuracy, ASR and robust accuracy before and after the repair."""
    names = [s["name"] for s in res.before.sets]
    multi = len(names) > 1
    head = ["model", f"clean {res.before.data} acc (%)"]
    for n in names:
        sfx = f" {n}" if multi else ""
        head += [f"ASR{sfx} (%)", f"robust acc{sfx} (%)"]
    rows = []
    for label, f in (("before", res.before), ("after " + res.method, res.after)):
        cells = [label, _pct(f.clean_accuracy)]
        for s in f.sets:
            cells += [_pct(s["asr"]), _pct(s["robust_accuracy"])]
        rows.append(cells)
    return head, rows


def repair_notes(res) -> str:
    """The lines under the table: DER, cost, the GoodNet figures and the method's own summary."""
    multi = len(res.before.sets) > 1
    der = ", ".join("—" if d is None else f"{d:.3f}" for d in res.der_sets) or "— (no poisoned data)"
    text = f"DER {der}; cost {res.seconds:.1f} s, {res.passes:,} image passes"
    g = res.goodnet
    if g:
        det = ", ".join(f"{100 * s['detection_rate']:.2f} %" + (f" of {s['name']}" if multi else "")
                        for s in g["sets"])
        text += (f"\nGoodNet (class N = backdoored): clean accuracy {100 * g['clean_accuracy']:.2f} %, "
                 f"{100 * g['clean_flagged']:.2f} % of clean inputs flagged"
                 + (f"; detects {det} of the poisoned inputs" if det else ""))
    return text + (f"\n{res.summary}" if res.summary else "") + "\n"


def _scan_labels(npz: Path, triggers: dict) -> list[int]:
    """The labels to repair with when ``--trigger-labels`` is not given: `repair_labels` of the
    scan whose results.json sits beside ``npz`` (``backdoorlab cleanse`` writes both), else every
    label in the file."""
    import json

    from backdoorlab.defenses.neural_cleanse import REPAIR_LABEL_TEXT, scan_p_values, scan_repair_labels

    res_path = npz.parent / "results.json"
    try:
        res = json.loads(res_path.read_text(encoding="utf-8")) if res_path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{res_path}: not readable as the scan's results ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("flagged"), list):
        labels = sorted(triggers)
        print(f"triggers:   no scan results beside {npz}: using every label in it ({len(labels)})")
        return labels
    labels = scan_repair_labels(res)
    if not labels:
        raise BadInput(f"{res_path}: the scan flagged no label, so there is no trigger to repair with "
                       "(name labels with --trigger-labels to repair anyway)")
    flagged = ", ".join(map(str, res["flagged"]))
    rule = REPAIR_LABEL_TEXT if scan_p_values(res) else "no p-values on record: all of them"
    print(f"triggers:   label(s) {', '.join(map(str, labels))} of the scan's flags ({flagged}): {rule} "
          "(--trigger-labels to choose)")
    return labels


def _parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--trigger-labels: expected labels separated by commas, got {text!r}") from None


def cmd_repair(args: argparse.Namespace) -> int:
    check_out(args, "repair")  # before any loading or work
    from backdoorlab import registry
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.options import from_args
    from backdoorlab.repairs import DefenderData, repair

    method = registry.get(args.method, "repair")
    opts = from_args(method.options, args)
    uses_inputs = "backdoored" in method.needs or "poisoned" in method.needs
    uses_triggers = "backdoored" in method.needs or "triggers" in method.needs
    if args.guide and not uses_inputs:
        raise BadInput(f"--guide: {method.name} does not use backdoored inputs")
    if args.triggers and not uses_triggers:
        raise BadInput(f"--triggers: {method.name} does not use reversed triggers")
    if args.trigger_labels and not args.triggers:
        raise BadInput("--trigger-labels picks reversed triggers: it goes with --triggers")
    if "triggers" in method.needs and not args.triggers:
        raise BadInput(f"{method.name} needs --triggers (triggers.npz from 'backdoorlab cleanse')")
    if "backdoored" in method.needs and not (args.guide or args.triggers):
        raise BadInput(f"{method.name} needs --guide (backdoored inputs you hold) or --triggers "
                       "(triggers.npz from 'backdoorlab cleanse')")
    labels = _parse_labels(args.trigger_labels)
    valid = load_data(args.valid, args, default_split="train")
    clf = load_model_from_args(args, valid)
    from backdoorlab.evaluation import check_compatible

    check_compatible(clf, valid, "clean validation data")
    test = load_data(args.test, args) if args.test else None
    if test is not None:
        check_compatible(clf, test, "clean test data")
    poisoned = load_poisoned(args, clf)
    guide = load_data(args.guide, args, default_split="train") if args.guide else None
    triggers = None
    if args.triggers:
        from backdoorlab.defenses.neural_cleanse import load_triggers

        triggers = load_triggers(args.triggers)
        if labels is None:
            labels = _scan_labels(Path(args.triggers), triggers)
        missing = [y for y in labels or [] if y not in triggers]
        if missing:
            raise BadInput(f"--trigger-labels: {args.triggers} has no reversed trigger for {missing} "
                           f"(has {sorted(triggers)})")
    data = DefenderData(valid, guide, triggers, labels)
    print(f"model:      {clf.describe()}")
    print(f"repair:     {method.name} ({method.paper}) on {len(valid):,} clean images"
          + (f" + {len(guide):,} backdoored" if guide is not None else "")
          + (f" + reversed triggers of {data.labels()}" if triggers else ""))
    for line in poisoned_lines(poisoned):
        print(f"poisoned:   {line}")
    model, res = repair(method.name, clf, data, test, poisoned, opts)
    head, rows = repair_rows(res)
    notes = repair_notes(res)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        written = save_model_files(model, tmp, "model", args.model, clf.num_classes)
        (tmp / "table.md").write_text(f"{method.name}: {method.summary} ({method.paper}).\n\n"
                                      + markdown(head, rows) + "\n" + notes)
        write_json(tmp / "results.json", {**res.to_dict(), "paper": method.paper,
                                          "poisoned_sets": [ps.describe() for ps in poisoned],
                                          "inputs": {"model": args.model, "valid": args.valid,
                                                     "test": args.test, "poisoned": args.poisoned,
                                                     "guide": args.guide, "triggers": args.triggers}})
    print_table(head, rows)
    print(notes, end="")
    for note in res.notes:
        print(f"note: {note}")
    print(f"wrote {out}/ ({', '.join(written)}, table.md, results.json)")
    return 0


def register(sub) -> None:
    from backdoorlab import registry
    from backdoorlab.options import add_arguments

    p = sub.add_parser("repair", help="repair a model with any registered method (see 'backdoorlab list')",
                       description="Run one repair on a model with the defender's clean data; "
                       "report clean accuracy, ASR and robust accuracy before and after, DER, wall "
                       "time and image passes. Test and poisoned data are only measured.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", parser_class=type(p))
    for m in registry.methods("repair"):
        q = methods.add_parser(m.name, help=m.summary, description=f"{m.summary}. {m.paper}. Needs: "
                               + ", ".join(registry.NEEDS[n] for n in m.needs) + ".")
        q.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
        q.add_argument("--valid", required=True, metavar="DATA", help="clean labelled data the defender "
                       "holds (the method sees only this)")
        q.add_argument("--test", metavar="DATA", help="clean labelled test data (measured only)")
        add_poisoned_options(q)
        q.add_argument("--guide", metavar="DATA", help="backdoored inputs the defender holds (methods "
                       "that assume them)")
        q.add_argument("--triggers", metavar="NPZ", help="reversed triggers (triggers.npz of "
                       "'backdoorlab cleanse')")
        q.add_argument("--trigger-labels", metavar="LABELS", help="labels whose reversed triggers to "
                       "use (default: of the labels the scan beside the file flagged, those with a "
                       "calibrated p-value <= 0.05, else the most anomalous one; without the scan's "
                       "results.json, every label in the file)")
        add_arguments(q, m.options)
        add_out_option(q)
        add_model_options(q)
        add_data_options(q)
        q.set_defaults(func=cmd_repair)
