"""Unstructured magnitude pruning with fine-tuning (the seed-002 variant of Fine-Pruning; Han et
al., "Learning both Weights and Connections", NeurIPS 2015).

The smallest-magnitude weights of every conv and dense kernel (biases and batch-norm parameters
untouched) are set to zero until ``sparsity`` of those weights are zero — globally across layers
by default, or per layer — and the network is fine-tuned on clean validation data with the zeros
re-imposed after every optimiser step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from backdoorlab.data.imageset import ImageSet
from backdoorlab.defenses.fine_pruning import StagedResult, finetune_split, measure
from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier
from backdoorlab.poisoned import poisoned_sets
from backdoorlab.train import TrainConfig, train


@dataclass
class MagnitudePruneResult(StagedResult):
    sparsity: float
    scope: str
    pruned_weights: int
    total_weights: int


def kernels(net: nn.Module) -> list[torch.Tensor]:
    """The conv and dense kernels of ``net`` (what magnitude pruning acts on)."""
    return [m.weight for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@torch.no_grad()
def magnitude_masks(net: nn.Module, sparsity: float, scope: str = "global") -> list[torch.Tensor]:
    """Boolean keep-masks, one per kernel, zeroing the ``sparsity`` share of smallest |w| (each on
    its kernel's device)."""
    if not 0 <= sparsity < 1:
        raise BadInput(f"sparsity must be in [0, 1), got {sparsity}")
    ws = kernels(net)
    if scope == "global":
        flat = torch.cat([w.abs().flatten() for w in ws])
        k = int(round(sparsity * flat.numel()))
        if k == 0:
            return [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in ws]
        cut = torch.kthvalue(flat, k).values
        masks = [(w.abs() > cut).contiguous() for w in ws]  # logical (not channels_last) order
        # ties at the cut: keep exactly numel - k weights overall by pruning ties in order
        excess = sum(int((~m).sum()) for m in masks) - k
        if excess < 0:
            for w, m in zip(ws, masks, strict=True):
                ties = (w.abs() == cut) & m
                idx = ties.flatten().nonzero().flatten()[: -excess]
                m.view(-1)[idx] = False
                excess += len(idx)
                if excess >= 0:
                    break
        return masks
    if scope == "layer":
        out = []
        for w in ws:
            k = int(round(sparsity * w.numel()))
            m = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            if k:
                m.view(-1)[w.abs().flatten().argsort()[:k]] = False
            out.append(m)
        return out
    raise BadInput(f"scope must be global or layer, got {scope!r}")


@torch.no_grad()
def apply_masks(net: nn.Module, masks: list[torch.Tensor]) -> None:
    for w, m in zip(kernels(net), masks, strict=True):
        w.mul_(m)


def magnitude_prune(clf: Classifier, valid: ImageSet, test: ImageSet | None = None,
                    poisoned=None, target: int | list[int] | None = None,
                    sparsity: float = 0.8, scope: str = "global", cfg: TrainConfig | None = None,
                    select_fraction: float = 0.2,
                    seed: int = 0, poisoned_labels: str = "auto"
                    ) -> tuple[Classifier, Classifier, MagnitudePruneResult]:
    """Prune to ``sparsity`` then fine-tune on clean validation data. Returns
    (pruned model, fine-tuned model, result); ``poisoned`` as in `fine_prune`."""
    t0 = time.perf_counter()
    sets = poisoned_sets(poisoned, target, poisoned_labels, num_classes=clf.num_classes)
    cfg = cfg or TrainConfig(epochs=5, lr=1e-4, batch_size=64, schedule="none", seed=seed)

    pruned = clf.copy()
    masks = magnitude_masks(pruned.net, sparsity, scope)
    apply_masks(pruned.net, masks)
    pruned.provenance["magnitude_pruned"] = {"sparsity": sparsity, "scope": scope}
    tuned = pruned.copy()
    tune, select = finetune_split(valid, select_fraction, seed)
    log = train(tuned, tune, select, cfg, desc="fine-tune", after_step=lambda: apply_masks(tuned.net, masks))
    apply_masks(tuned.net, masks)
    total = sum(m.numel() for m in masks)
    res = MagnitudePruneResult(
        sparsity=sparsity, scope=scope, pruned_weights=int(sum(int((~m).sum()) for m in masks)),
        total_weights=int(total), before=measure(clf, valid, test, sets),
        after_pruning=measure(pruned, valid, test, sets),
        after_finetuning=measure(tuned, valid, test, sets), finetune=log.to_dict(),
        settings={"train": asdict(cfg), "select_fraction": select_fraction, "seed": seed},
        seconds=round(time.perf_counter() - t0, 2))
    return pruned, tuned, res
