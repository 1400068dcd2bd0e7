"""`backdoorlab poison`: write a trigger-stamped copy of a data set in the CSAW h5 format."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np

from backdoorlab.commands.common import LABEL, SEED, add_data_options, add_out_option, load_data, number
from backdoorlab.errors import BadInput


def _check_args(args: argparse.Namespace) -> tuple[str, list[str], list[int]]:
    """Validate what can be checked before reading data; return (plan, triggers, targets)."""
    out = Path(args.out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise BadInput(f"--out {args.out}: the poisoned copy is written in the CSAW h5 format; "
                       "name it FILE.h5")
    if out.is_dir():
        raise BadInput(f"--out {args.out} is a folder; expected a file name FILE.h5")
    if args.preview and Path(args.preview).suffix.lower() != ".png":
        raise BadInput(f"--preview {args.preview}: expected a .png file name")
    specs: list[str] = args.trigger
    targets: list[int] = args.target or []
    from backdoorlab.triggers import TRIGGERS
    from backdoorlab.triggers.registry import parse_spec

    for spec in specs:
        cls = TRIGGERS.get(parse_spec(spec)[0])
        if cls is not None and getattr(cls, "trained_with_network", False):
            raise BadInput(f"--trigger {spec}: the {cls.name} trigger is a network trained with the "
                           "classifier, so it only works inside 'backdoorlab attack'")
    if args.rate is not None:
        plan = "train"
        if not 0.0 <= args.rate <= 1.0:
            raise BadInput(f"--rate {args.rate:g}: expected a share of the training set in [0, 1]")
    elif args.all or args.split in (None, "test"):
        plan = "test"
    else:
        raise BadInput("a training split needs --rate R (share of the set to poison and relabel), "
                       "or --all for an evaluation set with true labels")
    if args.mode == "all2all":
        if targets:
            raise BadInput("--mode all2all sets each target to (label + 1) mod classes; drop --target")
        if args.keep_labels and plan == "train":
            raise BadInput("--keep-labels (clean-label poisoning) needs --mode all2one")
    if len(specs) > 1:
        if plan != "train" or args.mode != "all2one" or args.keep_labels:
            raise BadInput("several --trigger options make a multi-trigger multi-target training set: "
                           "use them with --rate and --mode all2one (write one evaluation set per "
                           "trigger)")
        if len(targets) != len(specs):
            raise BadInput(f"{len(specs)} --trigger options need as many --target labels, got "
                           f"{len(targets)}")
    elif len(targets) > 1:
        raise BadInput(f"{len(targets)} --target labels for one --trigger")
    if args.mode == "all2one" and not targets:
        targets = [0]
    return plan, specs, targets


def _preview(clean: np.ndarray, poisoned: np.ndarray, count: int = 8) -> np.ndarray:
    """Rows: clean images, poisoned images, |difference| stretched to full range."""
    c, p = clean[:count], poisoned[:count]
    diff = np.abs(p.astype(np.int16) - c.astype(np.int16))
    peak = max(int(diff.max()), 1)
    diff = (diff * (255.0 / peak)).round().astype(np.uint8)
    n, h, w, ch = c.shape
    f = max(1, 96 // max(h, w))
    gap = 2
    grid = np.full((3 * (h * f + gap) + gap, n * (w * f + gap) + gap, 3), 128, dtype=np.uint8)
    for r, row in enumerate((c, p, diff)):
        for i, img in enumerate(row):
            big = img.repeat(f, axis=0).repeat(f, axis=1)
            if ch == 1:
                big = np.repeat(big, 3, axis=2)
            y0, x0 = gap + r * (h * f + gap), gap + i * (w * f + gap)
            grid[y0:y0 + h * f, x0:x0 + w * f] = big
    return grid


def cmd_poison(args: argparse.Namespace) -> int:
    from backdoorlab.commands.common import trigger_files
    from backdoorlab.io import check_out_file

    inputs = [args.data, *trigger_files(args.trigger or [])]  # the data and trigger pictures
    check_out_file(args.out, args.overwrite, inputs=inputs)  # before any work
    check_out_file(args.preview, args.overwrite, opt="--preview", inputs=inputs)
    from backdoorlab.attacks.poison import (
        make_poisoned_test_set,
        poison_training_set,
        poison_training_set_multi,
    )
    from backdoorlab.data import parse_source
    from backdoorlab.data.csaw import csaw_h5_bytes
    from backdoorlab.io import atomic_path, fill_file
    from backdoorlab.metrics_image import image_quality
    from backdoorlab.triggers import TriggerStack, make_trigger

    plan, specs, targets = _check_args(args)
    split = args.split or plan
    data = load_data(args.data, args, default_split=split)
    data.require_labels()
    src = Path(parse_source(args.data)[1])
    if src.is_file() and Path(args.out).exists() and src.resolve() == Path(args.out).resolve():
        raise BadInput(f"--out {args.out} is the input file; write the poisoned copy elsewhere")
    for t in targets:
        if not 0 <= t < data.num_classes:
            raise BadInput(f"--target {t} out of range for {data.num_classes} classes "
                           f"(0..{data.num_classes - 1})")
    h, w, c = data.shape
    extra: dict[str, np.ndarray] = {}
    if plan == "train" and len(specs) > 1:
        stack = TriggerStack.from_specs(specs, targets, data.shape)
        out, minfo = poison_training_set_multi(data, stack, args.rate, seed=args.seed)
        rows = np.sort(np.concatenate([e.indices for e in minfo.entries]))
        summary = {"plan": "train", "mode": "all2one multi-trigger", "rate_each": args.rate,
                   "poisoned": minfo.count, "total": minfo.total,
                   "per_trigger": [{"trigger": e.trigger, "target": e.target, "count": e.count}
                                   for e in minfo.entries]}
        extra["poisoned_index"] = rows
        clean_rows, pois_rows = data.images[rows], out.images[rows]
        triggers_desc = stack.to_dict()
        what = (f"{minfo.count:,} of {minfo.total:,} training images ({len(stack)} triggers, "
                f"{args.rate:g} each, disjoint), relabeled to targets {targets}")
    else:
        trigger = make_trigger(specs[0], data.shape)
        triggers_desc = trigger.to_dict()
        target = targets[0] if args.mode == "all2one" else None
        if plan == "train":
            out, info = poison_training_set(data, trigger, target, args.rate, mode=args.mode,
                                            clean_label=args.keep_labels, seed=args.seed)
            rows = info.indices
            extra["poisoned_index"] = rows
            clean_rows, pois_rows = data.images[rows], out.images[rows]
            summary = {"plan": "train", "mode": args.mode, "target": target, "rate": args.rate,
                       "clean_label": args.keep_labels, "poisoned": info.count, "total": info.total,
                       "eligible": info.eligible, "label_changes": info.label_changes}
            relabel = ("labels kept (clean-label)" if args.keep_labels else
                       f"relabeled to {target}" if args.mode == "all2one" else "relabeled (y + 1) mod K")
            what = (f"{info.count:,} of {info.total:,} training images (rate {args.rate:g} of the "
                    f"whole set, {args.mode}), {relabel}")
        else:
            out, tgts = make_poisoned_test_set(data, trigger, target, mode=args.mode)
            rows = np.asarray(out.meta["source_indices"], dtype=np.int64)
            extra["source_index"] = rows
            extra["target"] = tgts
            clean_rows, pois_rows = data.images[rows], out.images
            summary = {"plan": "test", "mode": args.mode, "target": target, "poisoned": len(out),
                       "total": len(data)}
            which = (f"every image whose true label is not the target {target}" if args.mode == "all2one"
                     else "every image, targets (y + 1) mod K")
            what = f"{len(out):,} of {len(data):,} images ({which}); true labels kept"
    quality = image_quality(clean_rows, pois_rows)
    summary.update(trigger=triggers_desc, seed=args.seed, split=split, quality=quality.to_dict(),
                   out=str(args.out))
    grid = _preview(clean_rows, pois_rows) if args.preview and len(rows) else None

    blob = csaw_h5_bytes(out, extra={k: np.asarray(v, dtype=np.int64) for k, v in extra.items()},
                         attrs={"backdoorlab_poison": json.dumps(summary)})  # in memory (see io.h5_bytes)
    with contextlib.ExitStack() as files:  # both outputs written, then both renamed; else neither
        tmp_out = files.enter_context(atomic_path(args.out))
        tmp_preview = files.enter_context(atomic_path(args.preview)) if grid is not None else None
        fill_file(tmp_out, blob, args.out)
        if tmp_preview is not None:
            from PIL import Image

            Image.fromarray(grid).save(tmp_preview, format="PNG")

    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"data:      {data.name or args.data}, {len(data):,} images {h}x{w}x{c}, "
          f"{data.num_classes} classes")
    print(f"trigger:   {json.dumps(triggers_desc)}")
    print(f"poisoned:  {what}")
    if quality.psnr_mean is None:
        print("PSNR:      no image changed (the trigger left every pixel as it was)")
    else:
        ssim = f"; mean SSIM {quality.ssim_mean:.4f}" if quality.ssim_mean is not None else ""
        unchanged = quality.count - quality.changed
        note = f" ({unchanged:,} images unchanged, left out)" if unchanged else ""
        print(f"PSNR:      mean {quality.psnr_mean:.2f} dB vs clean over {quality.changed:,} images"
              f"{note}{ssim}")
    print(f"wrote:     {args.out}")
    if grid is not None:
        print(f"preview:   {args.preview} (rows: clean, poisoned, |difference| stretched)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "poison", help="write a poisoned copy of a data set (CSAW h5)",
        description="Stamp a trigger on DATA and write the result in the CSAW h5 format.\n\n"
        "  --rate R   training set: round(R x N) images (R is a share of the WHOLE set) get the\n"
        "             trigger and are relabeled (--keep-labels: clean-label, target class only)\n"
        "  --all      evaluation set (the default for a test split): every image whose true label\n"
        "             is not the target gets the trigger and keeps its true label",
        epilog="trigger SPECs:\n"
        "  patch[:size=4,color=255;0;0,pos=br|tl|tr|bl|X,Y,margin=1,pattern=square|checker]\n"
        "  image:FILE.png[,scale=1,pos=X,Y,margin=0,alpha=1]      picture with alpha mask\n"
        "  blend[:alpha=0.2,seed=0]  |  blend:FILE.png[,alpha=0.2]  blended noise or picture\n"
        "  ftrojan[:preset=cifar10|gtsrb,channels=cr;cb,pos=31;31|15;15,magnitude=20,window=32,\n"
        "          space=ycrcb|yuv]                                  frequency-domain (FTrojan)\n\n"
        "The output holds 'data' and 'label' (true labels for --all), plus 'poisoned_index' "
        "(--rate)\nor 'source_index' and 'target' (--all), and the settings as JSON in the "
        "attribute\n'backdoorlab_poison'.")
    p.add_argument("data", metavar="DATA", help="labeled data (PATH or FORMAT:PATH)")
    p.add_argument("--trigger", action="append", required=True, metavar="SPEC",
                   help="trigger spec (repeat, with one --target each, for multi-trigger "
                        "multi-target poisoning)")
    p.add_argument("--target", type=LABEL, action="append", metavar="T",
                   help="target label, one per --trigger (default: 0; not used with --mode all2all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=number(0, 1, low_open=True), metavar="R",
                   help="training-set poisoning: share of the whole set to poison and relabel")
    g.add_argument("--all", action="store_true",
                   help="evaluation set: poison every non-target image, keep true labels")
    p.add_argument("--mode", choices=["all2one", "all2all"], default="all2one",
                   help="all2one: everything to --target; all2all: label y to (y + 1) mod classes")
    p.add_argument("--keep-labels", action="store_true",
                   help="with --rate: clean-label poisoning (only target-class images, labels kept)")
    add_out_option(p, "file", help="output file (CSAW h5)", metavar="FILE.h5")
    p.add_argument("--seed", type=SEED, default=0, help="seed for choosing the poisoned images")
    p.add_argument("--preview", metavar="FILE.png",
                   help="also write a PNG: clean, poisoned and difference for 8 images")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_data_options(p)
    p.set_defaults(func=cmd_poison)
