"""Neural Cleanse unlearning (Wang et al., IEEE S&P 2019, Section VI.C): fine-tune on the
defender's clean data where a share of the images carry a reversed trigger and keep their true
label, so the network unlearns the shortcut.

The paper stamps 20 % of its fine-tuning images and tunes one epoch on 10 % of the training set;
with the few thousand images a defender usually holds, one epoch moves little, and clean accuracy
swings by several points between epochs. So this runs up to ``epochs`` epochs and keeps the one
(the given model included) with the highest held-back accuracy minus reversed-trigger success on
a held-back share of the clean data (a DER-like trade-off), among those whose held-back accuracy
is not significantly (one-sided binomial test, 5 %) below the given model's minus ``max_drop``
points — on the few dozen images a small defender holds back, one image is several points, so a
fixed cut-off would judge by one image. Ties go to the epoch where the stamped held-back images
give the trigger's target the lowest mean probability. The test data are never looked at.

On a small defender set an epoch is a couple of optimiser steps (136 digits images: 2 at batch
64), so the schedule has a floor, ``min_steps`` (200; GTSRB's 5 % defender set makes 250 in the
default 10 epochs, unchanged by it): unlearning that stops after 20 steps leaves the part of a
patch the reversed trigger does not cover still working (digits BadNets seed 0: test ASR 3.0 %
after 10 epochs, 1.7 % after 100). Revisions: 0 kept the lowest trigger success, i.e. the first
epoch after the trigger fell, the least accurate one; 1 the trade-off above, the earliest of
tied epochs, 10 epochs whatever the data size; 2 the tie rule and the step floor
(benchmarks/nc_unlearn_optimizer.py --compare steps, docs/repairs-gtsrb.md).

The optimiser is SGD with momentum 0.9 at lr 0.01 (the paper names none; SGD 0.01 is what the
other fine-tuning repairs here use after their papers, NAD and FT-SAM). Adam at lr 5e-4, our
earlier default, moves every weight by about the learning rate per step whatever its gradient, and
on a small defender set the stamped images then pull clean accuracy down by 10-15 points before it
recovers while the trigger comes back: on three digits BadNets (small_cnn, 136 defender images;
benchmarks/nc_unlearn_optimizer.py, docs/repairs-gtsrb.md) the kept model had test ASR
46.6 / 14.3 / 14.3 % with Adam against 3.9 / 5.2 / 0.2 % with SGD, at +0.4 / -7.3 / -3.6 against
+0.4 / -2.9 / -1.8 points of clean accuracy. ``optimizer=adam,lr=5e-4`` gives the earlier behaviour."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    share: float = opt(0.2, "share of the tuning images stamped with a reversed trigger (paper: 20 %)",
                       low=0, high=1, low_open=True)
    epochs: int = opt(10, "unlearning epochs (the best one is kept)", low=1, high=100_000)
    min_steps: int = opt(200, "run more epochs when `epochs` make fewer optimiser steps than this (a "
                         "defender set of 100 images makes 2 steps an epoch)", low=0, high=10_000_000)
    lr: float = opt(0.01, "learning rate", low=0, high=10, low_open=True)
    optimizer: str = opt("sgd", "optimizer (sgd: momentum 0.9)", choices=("sgd", "adam"))
    batch_size: int = opt(64, "batch size", low=1)
    select_fraction: float = opt(0.2, "share of the clean data held back to pick the epoch", low=0,
                                 high=1, low_open=True, high_open=True)
    max_drop: float = opt(2.0, "keep only epochs not significantly more than this many points below the "
                          "given model's held-back accuracy", low=0, high=100)
    seed: int = opt(0, "seed", low=0)


@register("nc-unlearn", "repair", Options,
          paper="Wang et al., Neural Cleanse, IEEE S&P 2019 (unlearning, Section VI.C)",
          summary="fine-tune with reversed triggers stamped on clean images, true labels kept",
          needs=("clean", "triggers"), revision=2,
          paper_setting=("1 epoch on 10 % of the training data, 20 % of it stamped with the reversed "
                         "trigger, true labels kept"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.nc_mitigation import unlearn
    from backdoorlab.train import TrainConfig

    labels = data.labels()
    cfg = TrainConfig(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, optimizer=o.optimizer,
                      schedule="none", seed=o.seed)
    model, info = unlearn(clf, data.clean, data.triggers, labels, share=o.share, cfg=cfg, seed=o.seed,
                          select_fraction=o.select_fraction, max_drop=o.max_drop, min_steps=o.min_steps)
    return Repaired(model, info, summary=f"unlearned trigger(s) of {labels}; kept epoch "
                    f"{info['best_epoch']}/{info['epochs']} (held-back trigger ASR "
                    f"{100 * info['select_trigger_asr']:.1f} %)")
