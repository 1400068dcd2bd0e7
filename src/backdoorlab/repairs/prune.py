"""Pruning defense (Liu, Dolan-Gavitt and Garg, "Fine-Pruning", RAID 2018, Section 4; the
CSAW-HackML lab's pruning step): remove the last conv layer's channels in increasing order of mean
activation on clean validation data until validation accuracy has dropped ``drop``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired
from backdoorlab.repairs._options import DropOptions

ORDERS = ("increasing", "decreasing", "abs", "random")


@dataclass
class Options(DropOptions):
    order: str = opt("increasing", "channel order: mean clean activation increasing (the paper) …",
                     choices=ORDERS)
    seed: int = opt(0, "seed (random order)", low=0)
    batch_size: int = opt(64, "images per forward batch", low=1)


@register("prune", "repair", Options, paper="Liu et al., Fine-Pruning, RAID 2018 (pruning defense)",
          summary="prune dormant channels of the last conv layer to a clean-accuracy drop",
          paper_setting=("last conv layer of DeepID / VGG / AlexNet, pruned in increasing mean activation on"
                         " clean validation data (Liu et al. 2018, Section 4.1)"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels
    from backdoorlab.defenses.pruning import prune_sweep

    sweep = prune_sweep(clf, data.clean, layer=o.layer, order=o.order, drops=(o.drop,),
                        drop_unit=o.drop_unit, stop="max_drop", seed=o.seed, batch_size=o.batch_size)
    th = sweep.thresholds[0]
    notes = []
    if th.reached:
        mask = th.mask
    else:
        mask = mask_from_channels(sweep.num_channels, sweep.ranking)
        notes.append(f"a {o.drop:g} {o.drop_unit} drop was never reached: every channel pruned")
    model = apply_channel_mask(clf, sweep.layer, mask)
    return Repaired(model, {"layer": sweep.layer, "pruned_channels": np.flatnonzero(mask).tolist(),
                            "num_channels": sweep.num_channels, "achieved_drop": th.achieved_drop},
                    notes, f"{int(mask.sum())}/{sweep.num_channels} channels")
