"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune dormant channels of the last conv
layer to a clean-accuracy drop (or a share of channels), then fine-tune on the defender's clean
data with the pruned channels held at zero; a seeded share of that data picks the best epoch."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    drop: float | None = opt(4.0, "prune until clean validation accuracy drops this much", low=0,
                             high=100, low_open=True)
    fraction: float | None = opt(None, "prune this share of the channels instead of to a drop", low=0,
                                 high=1, low_open=True)
    drop_unit: str = opt("points", "points below the unpruned accuracy, or relative %",
                         choices=("points", "relative"))
    layer: str | None = opt(None, "layer to prune (default: the last conv layer)")
    order: str = opt("increasing", "channel order", choices=("increasing", "decreasing", "abs", "random"))
    epochs: int = opt(5, "fine-tuning epochs", low=0, high=100_000)
    lr: float = opt(1e-4, "fine-tuning learning rate", low=0, high=10, low_open=True)
    batch_size: int = opt(64, "fine-tuning batch size", low=1)
    optimizer: str = opt("adam", "optimizer", choices=("adam", "sgd"))
    select_fraction: float = opt(0.2, "share of the clean data that picks the best epoch", low=0, high=1,
                                 low_open=True, high_open=True)
    seed: int = opt(0, "seed", low=0)


@register("fine-prune", "repair", Options, paper="Liu et al., Fine-Pruning, RAID 2018",
          summary="prune dormant channels, then fine-tune on clean data")
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.fine_pruning import fine_prune
    from backdoorlab.errors import BadInput
    from backdoorlab.train import TrainConfig

    drop = None if o.fraction is not None else o.drop
    if drop is None and o.fraction is None:
        raise BadInput("fine-prune: give drop or fraction")
    cfg = TrainConfig(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, optimizer=o.optimizer,
                      schedule="none", seed=o.seed)
    _, tuned, res = fine_prune(clf, data.clean, layer=o.layer, drop=drop, fraction=o.fraction,
                               drop_unit=o.drop_unit, order=o.order, cfg=cfg,
                               select_fraction=o.select_fraction, seed=o.seed)
    return Repaired(tuned, {"layer": res.layer, "pruned_channels": res.pruned_channels,
                            "num_channels": res.num_channels, "finetune": res.finetune}, res.notes,
                    f"{len(res.pruned_channels)}/{res.num_channels} channels")
