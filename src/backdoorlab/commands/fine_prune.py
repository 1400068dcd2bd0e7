"""`backdoorlab fine-prune`: Fine-Pruning (prune, then fine-tune on clean data) and the
unstructured magnitude-pruning variant."""

from __future__ import annotations

import argparse
from pathlib import Path

from backdoorlab.commands.common import (
    LEARNING_RATE,
    POSITIVE,
    SEED,
    add_data_options,
    add_model_options,
    add_out_option,
    add_poisoned_options,
    check_out,
    integer,
    load_data,
    load_model_from_args,
    load_poisoned,
    number,
    poisoned_lines,
    save_model_files,
    scale_hint,
)
from backdoorlab.errors import BadInput
from backdoorlab.tables import markdown, print_table


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def stage_rows(res) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the three stages; one ASR column per poisoned set."""
    stages = [("before", res.before), ("after pruning", res.after_pruning),
              ("after fine-tuning", res.after_finetuning)]
    sets = res.before.asr_sets
    names = [""] if len(sets) <= 1 else [f" {d['name']}" for d in sets]
    head = ["model", "valid acc (%)", "clean test acc (%)", *[f"ASR{n} (%)" for n in names]]
    rows = [[name, _pct(st.valid_accuracy), _pct(st.test_accuracy),
             *([_pct(d["asr"]) for d in st.asr_sets] or ["—"])] for name, st in stages]
    return head, rows


def cmd_fine_prune(args: argparse.Namespace) -> int:
    check_out(args, "fine-prune")  # before any import, loading or training
    from backdoorlab.defenses.fine_pruning import fine_prune
    from backdoorlab.defenses.magnitude_pruning import magnitude_prune
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.train import TrainConfig

    if args.drop is not None and args.fraction is not None:
        raise BadInput("give --drop or --fraction, not both")
    if args.magnitude is not None and (args.drop is not None or args.fraction is not None):
        raise BadInput("--magnitude prunes single weights; --drop/--fraction are for channel pruning")
    valid = load_data(args.valid, args, default_split="train")
    clf = load_model_from_args(args, valid)
    test = load_data(args.test, args) if args.test else None
    poisoned = load_poisoned(args, clf)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                      schedule="none", seed=args.seed)
    print(f"model:      {clf.describe()}")
    for line in poisoned_lines(poisoned):
        print(f"poisoned:   {line}")
    if args.input_scale != "auto":  # one pass over --valid, so the hint comes before the training
        from backdoorlab.evaluation import accuracy

        scale_hint(clf, accuracy(clf, valid), args)
    if args.magnitude is not None:
        pruned, tuned, res = magnitude_prune(clf, valid, test, poisoned, None, args.magnitude,
                                             args.scope, cfg, args.select_fraction, args.seed)
        what = (f"magnitude pruning: {res.pruned_weights:,} of {res.total_weights:,} kernel weights "
                f"({res.sparsity:.0%}, {res.scope})")
        kind = "magnitude-prune"
    else:
        drop = args.drop if args.fraction is None else None
        if drop is None and args.fraction is None:
            drop = 4.0
        pruned, tuned, res = fine_prune(clf, valid, test, poisoned, None, args.layer, drop,
                                        args.fraction, args.drop_unit, args.order, cfg,
                                        args.select_fraction, args.seed)
        what = (f"pruned {len(res.pruned_channels)} of {res.num_channels} channels of {res.layer} "
                f"({res.fraction:.0%})")
        kind = "fine-prune"
    head, rows = stage_rows(res)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        written = [*save_model_files(pruned, tmp, "pruned", args.model),
                   *save_model_files(tuned, tmp, "finetuned", args.model)]
        rules = "".join(f"ASR on {line}.\n" for line in poisoned_lines(poisoned))
        (tmp / "table.md").write_text(f"{what}; fine-tuned {cfg.epochs} epochs on clean validation "
                                      f"data (lr {cfg.lr:g}).\n{rules}\n" + markdown(head, rows))
        write_json(tmp / "results.json", {"kind": kind, **res.to_dict(),
                                          "poisoned_sets": [ps.describe() for ps in poisoned],
                                          "inputs": {"model": args.model, "valid": args.valid,
                                                     "test": args.test, "poisoned": args.poisoned}})
    print(what)
    print_table(head, rows)
    for note in getattr(res, "notes", []):
        print(f"note: {note}")
    print(f"wrote {out}/ ({', '.join(written)}, table.md, results.json)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "fine-prune", help="Fine-Pruning: prune dormant channels, then fine-tune on clean data",
        description="Fine-Pruning (Liu et al., RAID 2018): prune the layer's channels in order of mean "
        "activation on clean validation data (to --drop points of validation accuracy, or a --fraction "
        "of channels), then fine-tune on the clean validation data (a seeded share of it picks the best "
        "epoch). --magnitude S instead zeroes the smallest S share of all kernel weights (unstructured) "
        "and fine-tunes. Test and poisoned data are only reported. Writes pruned and fine-tuned models, "
        "table.md and results.json into --out.")
    p.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    p.add_argument("--valid", required=True, metavar="DATA", help="clean validation data (the defender's)")
    p.add_argument("--test", metavar="DATA", help="clean test data (reported only)")
    add_poisoned_options(p)
    p.add_argument("--layer", help="layer to prune (default: the last conv layer)")
    p.add_argument("--drop", type=number(0, 100, low_open=True),
                   help="prune until validation accuracy drops this much, in --drop-unit (default: 4)")
    p.add_argument("--drop-unit", choices=["points", "relative"], default="points",
                   help="unit of --drop: points = percentage points below the unpruned validation "
                   "accuracy; relative = %% of it")
    p.add_argument("--fraction", type=number(0, 1, low_open=True),
                   help="prune this share of the layer's channels instead")
    p.add_argument("--order", choices=["increasing", "decreasing", "abs", "random"], default="increasing",
                   help="pruning order by mean activation on the validation data (abs = increasing "
                   "mean absolute activation; random uses --seed)")
    p.add_argument("--magnitude", type=number(0, 1, low_open=True, high_open=True),
                   metavar="SPARSITY", help="unstructured magnitude pruning "
                   "to this sparsity (e.g. 0.8) instead of channel pruning")
    p.add_argument("--scope", choices=["global", "layer"], default="global", help="magnitude pruning: "
                   "one threshold for all layers or per layer")
    p.add_argument("--epochs", type=integer(0, 100_000), default=5,
                   help="fine-tuning epochs (0 = prune only)")
    p.add_argument("--lr", type=LEARNING_RATE, default=1e-4, help="fine-tuning learning rate (constant)")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per fine-tuning step")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam, or sgd (momentum 0.9, Nesterov)")
    p.add_argument("--select-fraction", type=number(0, 1, low_open=True),
                   default=0.2, help="share of the validation data that "
                   "picks the best fine-tuning epoch")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the selection share, --order random "
                   "and the fine-tuning batch order")
    add_out_option(p)
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(func=cmd_fine_prune)
