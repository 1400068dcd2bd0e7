"""`backdoorlab attack`: train a backdoored model and write model + data + results."""

from __future__ import annotations

import argparse
from pathlib import Path

from backdoorlab.commands.common import (
    EPOCHS,
    FRACTION,
    LABEL,
    LEARNING_RATE,
    POSITIVE,
    SEED,
    add_compute_options,
    add_out_option,
    check_out,
    compute_from_args,
    integer,
    load_data,
    number,
)
from backdoorlab.errors import BadInput

SPLIT_FORMATS = ("gtsrb", "cifar10", "mnist")
AUGMENTATIONS = ("crop", "flip")


def augmentations(text: str) -> str:
    """argparse type of --augment: a comma list of crop, flip (or nothing)."""
    names = {a.strip() for a in text.split(",") if a.strip()}
    unknown = sorted(names - set(AUGMENTATIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown augmentation(s) {', '.join(unknown)} (choose from "
                                         f"{', '.join(AUGMENTATIONS)})")
    return text


def load_train_test(args: argparse.Namespace):
    """Training data and test data: the format's own test split, --test-data, or a carved split."""
    from backdoorlab.data import detect_format, parse_source

    train_data = load_data(args.data, args, default_split="train")
    if args.test_data:
        test = load_data(args.test_data, args, default_split="test")
    else:
        fmt, path = parse_source(args.data)
        fmt = fmt or (detect_format(path) if path else None)
        if fmt in SPLIT_FORMATS:
            test = load_data(args.data, argparse.Namespace(split="test", size=args.size),
                             default_split="test")
        else:
            train_data, test = train_data.split(args.test_fraction, seed=args.seed + 1000)
            print(f"test set: carved {len(test)} images ({args.test_fraction:.0%}) from the data")
    for opt in ("train_limit", "test_limit"):
        if getattr(args, opt, None) is not None and getattr(args, opt) < 1:
            raise BadInput(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")
    if getattr(args, "train_limit", None):
        train_data = train_data.take(args.train_limit, seed=args.seed)
    if getattr(args, "test_limit", None):
        test = test.take(args.test_limit, seed=args.seed + 1)
    return train_data, test


def cmd_attack(args: argparse.Namespace) -> int:
    check_out(args, "attack")  # before any import, loading or training
    from backdoorlab.attacks.runner import AttackPlan, train_attack, write_attack_outputs
    from backdoorlab.train import TrainConfig

    triggers = [t for t in (args.trigger or []) if t != "none"]
    targets = args.target or []
    if args.mode == "all2all" and targets:
        raise BadInput("all-to-all attacks have no --target (each label y maps to y+1)")
    if args.mode == "all2one" and triggers and not targets:
        raise BadInput("give the attack's --target label (one per --trigger)")
    from backdoorlab.models import architectures

    args.arch = architectures.canonical(args.arch)
    if args.arch not in architectures.ARCHITECTURES:  # a typo: one line before the data is read
        raise BadInput(f"unknown architecture {args.arch!r} (known: {architectures.known_text()})")
    train_data, test = load_train_test(args)
    plan = AttackPlan(triggers=triggers, targets=targets, rate=args.rate, mode=args.mode,
                      clean_label=args.clean_label, pruning_aware=args.pruning_aware,
                      pa_max_drop=args.pa_max_drop, pa_dormant_shift=args.pa_dormant_shift)
    augment = {a.strip() for a in (args.augment or "").split(",") if a.strip()}  # checked by argparse
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, schedule=args.schedule,
                      crop_padding=args.crop_padding if "crop" in augment else 0,
                      flip="flip" in augment, seed=args.seed)
    print(f"data: {len(train_data):,} training / {len(test):,} test images, "
          f"{'x'.join(map(str, train_data.shape))}, {train_data.num_classes} classes")
    device, precision = compute_from_args(args)
    clf, outcome, artefacts = train_attack(train_data, test, args.arch, plan, cfg,
                                           args.valid_fraction, args.input_scale or "unit",
                                           args.seed, device=device, precision=precision)
    write_attack_outputs(Path(args.out), clf, outcome, artefacts, save_train=args.save_train)
    print(f"trained {args.arch} for {cfg.epochs} epochs in {outcome.train_seconds:.0f} s")
    print(f"clean test accuracy: {outcome.clean_accuracy:.2%}  (validation "
          f"{outcome.valid_accuracy:.2%})")
    for i, (a, q) in enumerate(zip(outcome.asr, outcome.trigger_quality, strict=True)):
        what = triggers[i] if i < len(triggers) else triggers[0]
        tgt = f"target {targets[i]}" if args.mode == "all2one" else "all-to-all"
        psnr = f", PSNR {q['psnr_mean']:.1f} dB" if q.get("psnr_mean") else ""
        print(f"attack success rate [{what}, {tgt}]: {a:.2%}{psnr}")
    print(f"outputs: {args.out}/ (model.safetensors, clean_valid.h5, clean_test.h5, "
          "poisoned_test*.h5, " + ("poisoned_train.h5, " if args.save_train else "")
          + "trigger_preview.png, results.json)")
    return 0


def register(sub) -> None:
    from backdoorlab.triggers import TRIGGERS

    p = sub.add_parser(
        "attack", help="train a backdoored model (BadNets, blend, FTrojan, multi-target …)",
        description="Poison training data with one or more triggers and train a model on it. Writes "
        "into --out: model.safetensors (+ .json), clean_valid.h5 (the held-out clean validation "
        "split, for defenses), clean_test.h5, poisoned_test.h5 (true labels + per-image targets), "
        "poisoned_valid.h5, trigger_preview.png and results.json. With no --trigger (or "
        "--trigger none) it trains a clean reference model the same way.",
        epilog="Trigger specs: KIND or KIND:KEY=VALUE,...; kinds: " + ", ".join(TRIGGERS) + " (options: "
        "the README's trigger table). E.g. patch:size=3,pos=tl,color=255;0;0,pattern=checker, "
        "image:FILE.png,alpha=0.8, blend:alpha=0.1, ftrojan:preset=gtsrb, wanet, sig (with "
        "--clean-label). Example: backdoorlab attack --data gtsrb:GTSRB --arch gtsrb_cnn --trigger "
        "ftrojan:preset=gtsrb --target 8 --rate 0.05 --epochs 6 --out runs/ftrojan")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="training data (PATH, FORMAT:PATH, digits)")
    p.add_argument("--test-data", metavar="SOURCE", help="test data (default: the format's test split, "
                   "or a seeded split carved from --data)")
    p.add_argument("--test-fraction", type=FRACTION, default=0.2, help="share carved for testing when the "
                   "data has no test split")
    p.add_argument("--size", type=integer(1, 4096, "image size"),
                   help="resize images to SIZE x SIZE where the reader can")
    p.add_argument("--train-limit", type=POSITIVE, metavar="N", help="train on a seeded random sample of N "
                   "training images (default: all)")
    p.add_argument("--test-limit", type=POSITIVE, metavar="N", help="evaluate on a seeded random sample of "
                   "N test images (default: all)")
    p.add_argument("--arch", default="gtsrb_cnn", help="architecture (gtsrb_cnn, preact_resnet18, "
                   "small_cnn, deepid)")
    p.add_argument("--trigger", action="append", metavar="SPEC", help="trigger spec; repeat with "
                   "--target for multi-trigger multi-target attacks")
    p.add_argument("--target", action="append", type=LABEL, metavar="LABEL", help="target label (one per "
                   "--trigger)")
    p.add_argument("--rate", type=number(0, 1, low_open=True),
                   default=0.05, help="poisoned share of the training set, per "
                   "trigger")
    p.add_argument("--mode", choices=["all2one", "all2all"], default="all2one",
                   help="all2one: every poisoned image to --target; all2all: label y to (y + 1) mod "
                   "classes")
    p.add_argument("--clean-label", action="store_true", help="poison only target-class images, "
                   "labels unchanged")
    p.add_argument("--pruning-aware", action="store_true", help="Liu et al. 2018 pruning-aware attack")
    p.add_argument("--pa-max-drop", type=number(0, 100, low_open=True),
                   default=4.0, help="pruning-aware: prune dormant "
                   "channels until validation accuracy drops by this many points")
    p.add_argument("--pa-dormant-shift", type=number(), default=0.0, help="pruning-aware: lower the "
                   "reinstated channels' bias by this much so they stay dormant")
    p.add_argument("--epochs", type=EPOCHS, default=10, help="training epochs (the epoch with the best "
                   "clean validation accuracy is kept)")
    p.add_argument("--batch-size", type=POSITIVE, default=128, help="images per training step")
    p.add_argument("--lr", type=LEARNING_RATE, default=1e-3, help="learning rate")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam, or sgd (momentum 0.9, Nesterov)")
    p.add_argument("--schedule", choices=["cosine", "step", "none"], default="cosine",
                   help="learning-rate schedule over the epochs: cosine decay to 0, step = x0.1 every "
                   "10 epochs, none = constant")
    p.add_argument("--augment", type=augmentations, default="",
                   help="comma list: crop (random crop with padding), flip (random horizontal flip); "
                   "default: none")
    p.add_argument("--crop-padding", type=integer(0, 64), default=2,
                   help="--augment crop: pixels of padding around the image before the random crop")
    p.add_argument("--valid-fraction", type=number(0, 1, high_open=True),
                   default=0.1, help="clean validation share carved "
                   "from the training data")
    p.add_argument("--input-scale", choices=["raw", "unit"], default="unit",
                   help="pixel scale the new network takes (stored with the model)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the carved splits, the poisoned "
                   "images, the initial weights and the batch order")
    p.add_argument("--save-train", action="store_true", help="also write poisoned_train.h5: the training "
                   "set as poisoned before training, its poisoned rows recorded, for 'backdoorlab "
                   "inspect' (data inspectors score their answer against them)")
    add_compute_options(p)
    add_out_option(p)
    p.set_defaults(func=cmd_attack)
