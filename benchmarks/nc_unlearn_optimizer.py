"""Neural Cleanse unlearning on the digits demo's BadNets: two settings of `unlearn` side by side.

For each seed: the demo's data split and BadNets model (small_cnn, 4x4 patch -> 0, 10 %, 20
epochs; the defender holds the 136-image clean validation split), a Neural Cleanse scan of label
0 (full mode, 300 steps, 500 images), then `unlearn` with each optimiser, the epoch kept by its own
rule (held-back clean data and the reversed trigger only). Prints test clean accuracy and test
ASR (the true trigger) of each kept model, and the held-back figures per epoch; writes the table
between its markers in docs/repairs-gtsrb.md.

    nice python benchmarks/nc_unlearn_optimizer.py [--compare optimizer|steps] [--seeds 0,1,2] [--quick]

``--compare optimizer`` (default): SGD 0.01 (today's default) against Adam 5e-4, 10 epochs and
no step floor, as measured when SGD became the default. ``--compare steps``: the default SGD with
``min_steps=0`` (10 epochs: 20 optimiser steps on the 106 tuning images) against the default
``min_steps=200`` (100 epochs), both with today's epoch rule (revision 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from doc_section import replace_section

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = {
    "optimizer": ("unlearning optimiser", {
        "adam 5e-4 (earlier default)": (dict(optimizer="adam", lr=5e-4), dict(min_steps=0)),
        "sgd 0.01, momentum 0.9 (default)": (dict(optimizer="sgd", lr=1e-2), dict(min_steps=0))}),
    "steps": ("schedule (sgd 0.01)", {
        "10 epochs = 20 steps (min_steps 0)": (dict(optimizer="sgd", lr=1e-2), dict(min_steps=0)),
        ">= 200 steps = 100 epochs (default)": (dict(optimizer="sgd", lr=1e-2), dict(min_steps=200))}),
}


def main() -> None:
    from backdoorlab.attacks.poison import attack_success
    from backdoorlab.attacks.runner import AttackPlan, train_attack
    from backdoorlab.data.digits import load_digits
    from backdoorlab.defenses.nc_mitigation import unlearn
    from backdoorlab.defenses.neural_cleanse import NCConfig, neural_cleanse
    from backdoorlab.evaluation import accuracy
    from backdoorlab.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="optimizer")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="8 training epochs, 60 NC steps (the quick demo)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "repairs-gtsrb.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # small batches: one thread is faster on a shared 2-core machine
    column, settings = COMPARISONS[args.compare]
    begin, end = f"<!-- nc-{args.compare}:begin -->", f"<!-- nc-{args.compare}:end -->"
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        train_data, test = load_digits(size=32, rgb=True).split(0.25, seed=seed)
        cfg = TrainConfig(epochs=8 if args.quick else 20, batch_size=64, lr=2e-3, seed=seed)
        plan = AttackPlan(triggers=["patch:size=4"], targets=[0], rate=0.10)
        clf, out, art = train_attack(train_data, test, "small_cnn", plan, cfg, 0.1, "unit", seed)
        valid = art["valid"]
        ps, targets = art["poisoned_test"][0]
        nc = neural_cleanse(clf, valid, NCConfig(mode="full", max_steps=60 if args.quick else 300,
                                                 num_images=500, labels=[0], seed=seed))
        print(f"seed {seed}: BadNets clean {out.clean_accuracy:.3f}, ASR {out.asr[0]:.3f}, "
              f"{len(valid)} defender images", flush=True)
        for name, (s, u) in settings.items():
            tc = TrainConfig(epochs=10, batch_size=64, schedule="none", seed=0, **s)
            model, info = unlearn(clf, valid, {0: nc.triggers[0]}, [0], cfg=tc, seed=0, **u)
            acc, asr = accuracy(model, test), attack_success(model, ps, targets)
            held = ", ".join(f"{e['select_accuracy']:.2f}/{e['select_trigger_asr']:.2f}"
                             for e in info["per_epoch"])
            print(f"  {name}: kept epoch {info['best_epoch']}, test clean {acc:.3f} "
                  f"({100 * (acc - out.clean_accuracy):+.1f} pts), ASR {asr:.3f}; held-back acc/trigger ASR "
                  f"per epoch: {held}", flush=True)
            rows.append(f"| {seed} | {100 * out.clean_accuracy:.1f} / {100 * out.asr[0]:.1f} | {name} | "
                        f"{info['best_epoch']} | {100 * acc:.1f} ({100 * (acc - out.clean_accuracy):+.1f}) | "
                        f"{100 * asr:.1f} |")
    body = "\n".join([begin, "", f"| seed | BadNets clean / ASR (%) | {column} | kept epoch | "
                      "clean after (%, pts) | ASR after (%) |", "|---|---|---|---|---|---|", *rows, "", end])
    print(body)
    if not args.quick:
        replace_section(Path(args.doc), body, begin, end)


if __name__ == "__main__":
    main()
