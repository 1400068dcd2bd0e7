"""Unstructured magnitude pruning then fine-tuning (Han et al., "Learning both Weights and
Connections", NeurIPS 2015, used as a backdoor repair baseline): zero the smallest ``sparsity``
share of the kernel weights (one threshold over all layers, or per layer), fine-tune on the
defender's clean data with those weights held at zero."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired
from backdoorlab.repairs._options import TuneOptions


@dataclass
class Options(TuneOptions):
    sparsity: float = opt(0.8, "share of kernel weights set to zero", low=0, high=1, low_open=True,
                          high_open=True)
    scope: str = opt("global", "one magnitude threshold for all layers, or one per layer",
                     choices=("global", "layer"))


@register("magnitude", "repair", Options, paper="Han et al., NeurIPS 2015 (magnitude pruning)",
          summary="zero the smallest weights, then fine-tune on clean data")
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.magnitude_pruning import magnitude_prune

    cfg = o.train_config()
    _, tuned, res = magnitude_prune(clf, data.clean, sparsity=o.sparsity, scope=o.scope, cfg=cfg,
                                    select_fraction=o.select_fraction, seed=o.seed)
    return Repaired(tuned, {"sparsity": res.sparsity, "scope": res.scope,
                            "pruned_weights": res.pruned_weights, "total_weights": res.total_weights,
                            "finetune": res.finetune}, summary=f"sparsity {res.sparsity:.0%}")
