"""Pruning-aware attack (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018, Section 3.2).

The attacker anticipates a pruning defense: (1) train a clean model; (2) prune the channels of
the last convolutional layer that are dormant on clean data (increasing mean activation), here
until clean validation accuracy has dropped by ``max_drop`` percentage points; (3) fine-tune the
pruned model on the poisoned training set, so the backdoor must live in the channels a defender
keeps; (4) reinstate the pruned channels (their clean weights return). A defender who prunes
dormant channels first now removes decoys and leaves the backdoor in place.

Reinstated channels add back their clean-model contribution, which the fine-tuned layers never
saw; on small networks this can weaken the backdoor (measured: ``valid_asr_pruned`` vs
``valid_asr_final`` in the returned info). ``dormant_shift`` (our option, default 0 = plain
reinstatement) lowers the reinstated channels' bias (batch-norm shift) by that amount so they stay
near-dormant.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from backdoorlab.data.imageset import ImageSet
from backdoorlab.evaluation import accuracy
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.hooks import OutputMask
from backdoorlab.train import TrainConfig, train


def channel_mean_activation(clf: Classifier, data: ImageSet, layer: str) -> np.ndarray:
    """Mean of ``layer``'s output per channel over images and positions."""
    act = clf.activations(data.images, layer)
    axes = (0, 2, 3) if act.ndim == 4 else (0,)
    return act.mean(axis=axes)


def _lower_bias(module: torch.nn.Module, channels: list[int], shift: float) -> None:
    bias = module.bn.bias if hasattr(module, "bn") else getattr(module, "bias", None)
    if bias is None:
        raise ValueError(f"{type(module).__name__} has no bias to lower")
    with torch.no_grad():
        bias[channels] -= shift


def pruning_aware_attack(clf: Classifier, clean_train: ImageSet, poisoned_train: ImageSet,
                         valid: ImageSet, cfg: TrainConfig, max_drop: float = 4.0,
                         finetune_epochs: int | None = None, probe: tuple | None = None,
                         dormant_shift: float = 0.0) -> tuple[dict, dict]:
    """Train ``clf`` in place with the pruning-aware attack; returns (training log, attack info).

    ``max_drop`` is in percentage points of clean validation accuracy. ``probe`` = (poisoned
    validation set, targets) measures the ASR before and after reinstatement.
    """
    from backdoorlab.attacks.poison import attack_success

    layer, _ = clf.default_prune_layer()
    clean_log = train(clf, clean_train, valid, cfg, desc="pruning-aware: clean")
    base = accuracy(clf, valid)
    sample = clean_train.take(2000, seed=cfg.seed)
    means = channel_mean_activation(clf, sample, layer)
    order = np.argsort(means, kind="stable")  # dormant first
    hook = OutputMask(clf.layer(layer), len(means))
    pruned: list[int] = []
    try:
        for c in order:
            hook.mask[c] = 0.0
            if (base - accuracy(clf, valid)) * 100 > max_drop:
                hook.mask[c] = 1.0  # keep the last channel that broke the budget
                break
            pruned.append(int(c))
        pruned_acc = accuracy(clf, valid)
        ft_cfg = replace(cfg, epochs=finetune_epochs or max(1, cfg.epochs // 2), keep_best=False)
        ft_log = train(clf, poisoned_train, valid, ft_cfg, desc="pruning-aware: poison")
        asr_pruned = attack_success(clf, *probe) if probe else None
    finally:
        hook.remove()  # reinstate the pruned channels
    if dormant_shift and pruned:
        _lower_bias(clf.layer(layer), pruned, dormant_shift)
    info = {"layer": layer, "pruned_channels": pruned, "channels": int(len(means)),
            "max_drop_points": max_drop, "valid_accuracy_clean": base,
            "valid_accuracy_pruned": pruned_acc, "valid_accuracy_final": accuracy(clf, valid),
            "finetune_epochs": ft_cfg.epochs, "dormant_shift": dormant_shift,
            "valid_asr_pruned": asr_pruned,
            "valid_asr_final": attack_success(clf, *probe) if probe else None}
    log = {"clean": clean_log.to_dict(), "finetune": ft_log.to_dict()}
    return log, info
