"""Neural Cleanse neuron pruning (Wang et al., IEEE S&P 2019, Section VI.B): prune the channels of
the last conv layer that the reversed trigger excites most until the reversed trigger stops working
on the defender's clean images (success ≤ ``stop_asr``) or clean accuracy has dropped ``max_drop``
points."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    stop_asr: float = opt(0.05, "stop once the reversed trigger succeeds on at most this share", low=0,
                          high=1)
    max_drop: float = opt(10.0, "never prune past this clean-accuracy drop (points)", low=0, high=100,
                          low_open=True)
    layer: str | None = opt(None, "layer to prune (default: the last conv layer)")


@register("nc-prune", "repair", Options,
          paper="Wang et al., Neural Cleanse, IEEE S&P 2019 (neuron pruning, Section VI.B)",
          summary="prune the channels reversed triggers excite until the trigger stops working",
          needs=("clean", "triggers"),
          paper_setting=("prune second-to-last-layer neurons ranked by activation on reversed-trigger images"
                         " until the trigger stops working (Wang et al. 2019, Section VI.B)"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.nc_mitigation import prune_by_trigger

    labels = data.labels()
    model, info = prune_by_trigger(clf, data.clean, data.triggers, labels, layer=o.layer,
                                   stop_asr=o.stop_asr, max_drop=o.max_drop)
    return Repaired(model, {"labels": labels, **info},
                    summary=f"{len(info['pruned_channels'])} channels; stopped by {info['stopped_by']}")
