"""Guided pruning: prune the channels that backdoored inputs excite most (mean activation on
backdoored minus clean inputs, largest first) to a clean-accuracy drop — the pruning step of
Neural Cleanse's mitigation (Wang et al., IEEE S&P 2019, Section VI.B), here with either backdoored
inputs the defender holds or Neural Cleanse's reversed triggers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired
from backdoorlab.repairs._options import DropOptions


@dataclass
class Options(DropOptions):
    batch_size: int = opt(64, "images per forward batch", low=1)


@register("guided-prune", "repair", Options,
          paper="Wang et al., Neural Cleanse, IEEE S&P 2019 (neuron pruning, Section VI.B)",
          summary="prune the channels backdoored inputs excite most, to a clean-accuracy drop",
          needs=("clean", "backdoored"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.guided_pruning import guided_ranking
    from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels
    from backdoorlab.defenses.pruning import prune_sweep

    backdoored = data.backdoored()
    ranking, _ = guided_ranking(clf, data.clean, backdoored, o.layer)
    sweep = prune_sweep(clf, data.clean, layer=o.layer, order="guided", drops=(o.drop,),
                        drop_unit=o.drop_unit, stop="max_drop", batch_size=o.batch_size, ranking=ranking)
    th = sweep.thresholds[0]
    notes = [] if th.reached else [f"a {o.drop:g} {o.drop_unit} drop was never reached: every channel pruned"]
    mask = th.mask if th.reached else mask_from_channels(sweep.num_channels, sweep.ranking)
    model = apply_channel_mask(clf, sweep.layer, mask)
    return Repaired(model, {"layer": sweep.layer, "pruned_channels": np.flatnonzero(mask).tolist(),
                            "num_channels": sweep.num_channels, "achieved_drop": th.achieved_drop,
                            "backdoored_inputs": len(backdoored)}, notes,
                    f"{int(mask.sum())}/{sweep.num_channels} channels")
