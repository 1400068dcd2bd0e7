"""Core commands: demo, data info, eval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backdoorlab.commands.common import (
    SEED,
    add_data_options,
    add_model_options,
    add_out_option,
    add_poisoned_options,
    load_data,
    load_model_from_args,
    load_poisoned,
    scale_hint,
)


def cmd_data_info(args: argparse.Namespace) -> int:
    from backdoorlab.data import detect_format, parse_source

    fmt, path = parse_source(args.source)
    fmt = fmt or detect_format(path)
    from backdoorlab.errors import MissingSplit

    try:
        data = load_data(args.source, args, default_split="train")
    except MissingSplit:
        if args.split:  # asked for by name: say it is not there
            raise
        data = load_data(args.source, args, default_split="test")  # the split that is there
        data.meta["note"] = "; ".join(filter(None, [data.meta.get("note"), "no train split here: "
                                                    "this is the test split"]))
    h, w, c = data.shape
    info = {"source": args.source, "format": fmt, "name": data.name, "count": len(data),
            "image_size": [h, w, c], "classes": data.num_classes, "labeled": data.labeled}
    for key in ("split", "layout", "note"):  # reader facts worth showing (see each reader's meta)
        if isinstance(data.meta.get(key), str):
            info[key] = data.meta[key]
    if data.labeled:
        hist = data.label_histogram()
        present = hist[hist > 0]
        info["label_histogram"] = hist.tolist()
        info["classes_present"] = int((hist > 0).sum())
        info["per_class_min"] = int(present.min()) if len(present) else 0
        info["per_class_max"] = int(present.max()) if len(present) else 0
        info["per_class_median"] = float(_median(present)) if len(present) else 0.0
    info["label_convention"] = _convention(data)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"format:      {fmt}" + (f" ({info['layout']} layout)" if "layout" in info else ""))
    if "split" in info:
        print(f"split:       {info['split']}")
    print(f"images:      {len(data):,}")
    print(f"image size:  {h}x{w}x{c} (H x W x C), uint8")
    print(f"classes:     {data.num_classes}")
    if data.labeled:
        print(f"labels:      {info['classes_present']} classes present; per class min "
              f"{info['per_class_min']}, median {info['per_class_median']:g}, max "
              f"{info['per_class_max']}")
    else:
        print("labels:      none (unlabeled images)")
    print(f"as poisoned: {info['label_convention']}")
    if "note" in info:
        print(f"note:        {info['note']}")
    return 0


def _convention(data) -> str:
    """How the ASR would read this file as poisoned data (see `backdoorlab.poisoned`)."""
    from backdoorlab.poisoned import RULES, label_convention

    conv = label_convention(data)
    if conv == "target":
        return (f"every label is {int(data.labels[0])}: read as the attack target (CSAW convention; "
                "--poisoned-labels true overrides)")
    if "targets" in data.meta:
        return "true labels plus per-image attack targets (a backdoorlab poisoned set)"
    return RULES[conv]


def _median(a) -> float:
    import numpy as np

    return float(np.median(a))


def cmd_eval(args: argparse.Namespace) -> int:
    from backdoorlab.evaluation import evaluate

    clean = load_data(args.clean, args, num_classes=None)
    clf = load_model_from_args(args, clean)
    sets = load_poisoned(args, clf)
    res = evaluate(clf, clean, sets, per_class=args.per_class)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print(f"model:           {clf.describe()}")
    print(f"clean accuracy:  {res.clean_accuracy:.2%}  ({res.clean_count:,} images)")
    scale_hint(clf, res.clean_accuracy, args)
    for d in res.poisoned_sets:
        tgt = f"target {d['target']}" if d["target"] is not None else "per-image targets"
        print(f"attack success:  {d['asr']:.2%}  on {d['name']} ({d['counted']:,} of {d['total']:,} "
              f"images, {tgt})")
        print(f"ASR rule:        {d['rule']}")
        for note in d["notes"]:
            print(f"note:            {note}")
    if res.per_class_accuracy is not None:
        print("per-class accuracy:")
        for c, a in enumerate(res.per_class_accuracy):
            if a == a:  # skip classes absent from the data (nan)
                print(f"  {c:5d}  {a:.2%}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from backdoorlab.io import check_out_dir, read_marker

    earlier = read_marker(args.out) if Path(args.out).is_dir() else None
    again = earlier is not None and earlier.get("command") == "demo"  # a demo replaces its own output
    check_out_dir(args.out, args.overwrite or again, "demo", in_place=True)  # before any work
    if again:
        print(f"replacing the earlier demo output in {args.out}")
    from backdoorlab.demo import run_demo

    run_demo(out=Path(args.out) if args.out else None, quick=args.quick, seed=args.seed)
    return 0




def register(sub) -> None:
    d = sub.add_parser("demo", help="the whole story on the embedded digits: attack, detect, repair, report",
                       description="On scikit-learn's bundled digits (no download): train a clean, a "
                       "BadNets and an FTrojan model, run the pruning sweep with GoodNets, Fine-Pruning "
                       "and Neural Cleanse, and write report.html, report.md and results.json.")
    add_out_option(d, required=False, default="backdoorlab-demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="a smaller variant (about a minute)")
    d.add_argument("--seed", type=SEED, default=0, help="seed of the data split, the poisoning and the "
                   "training (the same seed gives the same numbers)")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="inspect data sets", description="Inspect data sets.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=data.__class__)
    info = dsub.add_parser("info", help="format, count, classes, image size, label histogram",
                           description="Describe a data set: SOURCE is PATH, FORMAT:PATH "
                           "(csaw, gtsrb, cifar10, mnist, folder, images) or 'digits'.")
    info.add_argument("source", metavar="SOURCE", help="data set: PATH, FORMAT:PATH or digits")
    add_data_options(info, "which split of a data set that holds both (default: train, or the only "
                           "split there is)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_data_info)

    e = sub.add_parser("eval", help="clean accuracy and attack success rate",
                       description="Clean accuracy of MODEL on --clean data and, with --poisoned "
                       "data (repeatable), one attack success rate (ASR) per poisoned set.")
    e.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    e.add_argument("--clean", required=True, metavar="DATA", help="clean labeled data")
    add_poisoned_options(e, "poisoned data (triggers applied)")
    e.add_argument("--per-class", action="store_true", help="print per-class accuracy")
    e.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(e)
    add_data_options(e)
    e.set_defaults(func=cmd_eval)
