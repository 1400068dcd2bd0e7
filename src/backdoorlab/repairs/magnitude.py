"""Unstructured magnitude pruning then fine-tuning (Han et al., "Learning both Weights and
Connections", NeurIPS 2015, used as a backdoor repair baseline): zero the smallest ``sparsity``
share of the kernel weights (one threshold over all layers, or per layer), fine-tune on the
defender's clean data with those weights held at zero."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    sparsity: float = opt(0.8, "share of kernel weights set to zero", low=0, high=1, low_open=True,
                          high_open=True)
    scope: str = opt("global", "one magnitude threshold for all layers, or one per layer",
                     choices=("global", "layer"))
    epochs: int = opt(5, "fine-tuning epochs", low=0, high=100_000)
    lr: float = opt(1e-4, "fine-tuning learning rate", low=0, high=10, low_open=True)
    batch_size: int = opt(64, "fine-tuning batch size", low=1)
    optimizer: str = opt("adam", "optimizer", choices=("adam", "sgd"))
    select_fraction: float = opt(0.2, "share of the clean data that picks the best epoch", low=0, high=1,
                                 low_open=True, high_open=True)
    seed: int = opt(0, "seed", low=0)


@register("magnitude", "repair", Options, paper="Han et al., NeurIPS 2015 (magnitude pruning)",
          summary="zero the smallest weights, then fine-tune on clean data")
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.magnitude_pruning import magnitude_prune
    from backdoorlab.train import TrainConfig

    cfg = TrainConfig(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, optimizer=o.optimizer,
                      schedule="none", seed=o.seed)
    _, tuned, res = magnitude_prune(clf, data.clean, sparsity=o.sparsity, scope=o.scope, cfg=cfg,
                                    select_fraction=o.select_fraction, seed=o.seed)
    return Repaired(tuned, {"sparsity": res.sparsity, "scope": res.scope,
                            "pruned_weights": res.pruned_weights, "total_weights": res.total_weights,
                            "finetune": res.finetune}, summary=f"sparsity {res.sparsity:.0%}")
