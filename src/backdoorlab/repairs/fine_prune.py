"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune dormant channels of the last conv
layer to a clean-accuracy drop (or a share of channels), then fine-tune on the defender's clean
data with the pruned channels held at zero; a seeded share of that data picks the best epoch."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired
from backdoorlab.repairs._options import DropOptions, TuneOptions


@dataclass
class Options(TuneOptions, DropOptions):
    drop: float | None = opt(None, "prune until clean validation accuracy drops this much (default 4 "
                             "when fraction is not given)", low=0, high=100, low_open=True)
    fraction: float | None = opt(None, "prune this share of the channels instead of to a drop", low=0,
                                 high=1, low_open=True)
    order: str = opt("increasing", "channel order", choices=("increasing", "decreasing", "abs", "random"))

    def __post_init__(self) -> None:  # runs when the options are read, before any work
        from backdoorlab.errors import BadInput

        if self.drop is not None and self.fraction is not None:
            raise BadInput("fine-prune: give drop or fraction, not both")


@register("fine-prune", "repair", Options, paper="Liu et al., Fine-Pruning, RAID 2018",
          summary="prune dormant channels, then fine-tune on clean data",
          paper_setting=("prune the last conv layer until validation accuracy drops 4 %, then fine-tune on "
                         "the clean validation data until accuracy stops improving (Liu et al. 2018)"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.fine_pruning import fine_prune

    drop = None if o.fraction is not None else (4.0 if o.drop is None else o.drop)
    cfg = o.train_config()
    _, tuned, res = fine_prune(clf, data.clean, layer=o.layer, drop=drop, fraction=o.fraction,
                               drop_unit=o.drop_unit, order=o.order, cfg=cfg,
                               select_fraction=o.select_fraction, seed=o.seed)
    return Repaired(tuned, {"layer": res.layer, "pruned_channels": res.pruned_channels,
                            "num_channels": res.num_channels, "finetune": res.finetune}, res.notes,
                    f"{len(res.pruned_channels)}/{res.num_channels} channels")
