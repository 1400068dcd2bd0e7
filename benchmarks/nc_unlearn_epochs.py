"""Diagnosis of Neural Cleanse unlearning, epoch by epoch: held-back figures (what `nc-unlearn`
sees and picks its epoch from) next to test figures (never seen by the repair).

Reads a repair-grid attack cell (model, clean_valid.h5, clean_test.h5, poisoned_test.h5) and its
scan cell (triggers.npz, results.json), runs the same split, stamping and training as
`backdoorlab.defenses.nc_mitigation.unlearn` (seed 0), and prints after every epoch the held-back
clean accuracy and reversed-trigger success, and the test clean accuracy and ASR. The figures of
docs/repairs-gtsrb.md ("Two changes of 2026-12-07") come from it:

    python benchmarks/nc_unlearn_epochs.py runs/repairs-gtsrb/cells/badnets-s0-<key> \\
        runs/repairs-gtsrb/cells/badnets-nc-s0-<key> [--labels 0] [--lr 0.001] [--per-label]

``--labels`` overrides the scan's flagged labels; ``--per-label`` stamps each label's trigger on
its own 20 % of the tuning images instead of splitting 20 % between them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from backdoorlab.data.csaw import read_csaw_h5
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.defenses.fine_pruning import finetune_split
    from backdoorlab.defenses.nc_mitigation import stamped
    from backdoorlab.defenses.neural_cleanse import apply_trigger, load_triggers
    from backdoorlab.models.files import load_model
    from backdoorlab.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attack_cell")
    ap.add_argument("scan_cell")
    ap.add_argument("--labels", help="comma-separated labels (default: the scan's flagged labels)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--share", type=float, default=0.2)
    ap.add_argument("--per-label", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, sc = Path(args.attack_cell), Path(args.scan_cell)
    clf = load_model(a / "model.safetensors")
    valid, test = read_csaw_h5(a / "clean_valid.h5"), read_csaw_h5(a / "clean_test.h5")
    pois = read_csaw_h5(a / "poisoned_test.h5")
    targets_p = np.asarray(pois.meta["targets"])
    count = pois.labels != targets_p  # ASR on inputs whose true label is not the target
    triggers = load_triggers(sc / "triggers.npz")
    labels = ([int(v) for v in args.labels.split(",")] if args.labels
              else json.loads((sc / "results.json").read_text())["flagged"])
    tune, select = finetune_split(valid, 0.2, 0)
    rng = np.random.default_rng(0)
    x = tune.images.copy()
    each = min(args.share, 1 / len(labels)) if args.per_label else args.share / len(labels)
    pick = rng.choice(len(x), size=len(labels) * int(round(each * len(x))), replace=False)
    for i, chunk in enumerate(np.array_split(pick, len(labels))):
        x[chunk] = apply_trigger(x[chunk], *triggers[labels[i]])
    check, targets = stamped(select, triggers, labels)
    tuned = clf.copy()
    print(f"labels {labels}, {len(tune)} tuning / {len(select)} held-back images, "
          f"{len(pick)} stamped, lr {args.lr}")
    print("epoch  held-back acc  held-back trigger ASR  test acc  test ASR")
    epoch = [0]

    def score() -> tuple[float, dict]:
        acc = float((tuned.predict(select.images) == select.labels).mean())
        asr = float((tuned.predict(check.images) == targets).mean())
        t_acc = float((tuned.predict(test.images) == test.labels).mean())
        t_asr = float((tuned.predict(pois.images[count]) == targets_p[count]).mean())
        print(f"{epoch[0]:>5}  {100 * acc:13.1f}  {100 * asr:21.1f}  {100 * t_acc:8.2f}  {100 * t_asr:8.2f}",
              flush=True)
        epoch[0] += 1
        return 0.0, {}

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=64, optimizer="sgd", schedule="none", seed=0)
    train(tuned, ImageSet(x, tune.labels, tune.num_classes, "unlearning"), None, cfg, desc="unlearn",
          score=score)


if __name__ == "__main__":
    main()
