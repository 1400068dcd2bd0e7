"""Channel masks applied to weights: a pruned model is an ordinary model of the same architecture.

Pruning a channel (Liu et al., "Fine-Pruning", RAID 2018) means making the layer's output for that
channel identically zero. Here that is done by zeroing weights, so the pruned network saves, loads
and exports like any other:

- ``Conv2d`` / ``Conv2dAct`` / ``Linear`` / ``LinearAct``: the channel's kernel row and bias (the
  activation must map 0 to 0: none, linear, relu, tanh, elu, selu);
- ``ConvBNAct`` (conv without bias → BN → ReLU): the BN gamma and beta of the channel (and the conv
  kernel row), so the block outputs ReLU(0) = 0;
- ``BatchNorm2d`` and BN→ReLU blocks such as PreAct-ResNet's final stage: gamma and beta.

The *measure point* is where the sweep reads and masks activations (e.g. DeepID's conv_3 is measured
at pool_3). The stages between the layer and the point must keep a zero channel zero (pooling,
ReLU, dropout, identity), so masking activations at the point equals zeroing the weights.

A mask is a boolean array over the layer's output channels; ``True`` means *pruned*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.layers import ConvBNAct

ZERO_SAFE_ACTS = (None, "linear", "relu", "tanh", "elu", "selu")
# modules that map an all-zero channel to an all-zero channel, channel by channel
ZERO_PRESERVING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU,
                   nn.Dropout, nn.Dropout2d, nn.Identity)


@dataclass(frozen=True)
class PruneTarget:
    """Where a layer is pruned: ``layer`` (the name the user gave), ``point`` (the stage whose
    output is measured and masked; None = the layer's own output, masked by a forward hook),
    ``weights`` (the module whose weights are zeroed) and ``channels`` (its channel count)."""

    layer: str
    point: str | None
    weights: str
    channels: int


def _bn_of(m: nn.Module) -> nn.BatchNorm2d | None:
    """The BN of a BN→ReLU block (e.g. PreAct-ResNet's final stage), if ``m`` is one."""
    bn = getattr(m, "bn", None)
    if isinstance(bn, nn.BatchNorm2d) and not hasattr(m, "conv") and type(m).__name__ == "PreActFinal":
        return bn
    return None


def channel_count(m: nn.Module) -> int | None:
    """Output channels of a maskable module, or None when its weights cannot realise a mask."""
    if isinstance(m, nn.Conv2d):
        return m.out_channels if getattr(m, "act", None) in ZERO_SAFE_ACTS and m.groups == 1 else None
    if isinstance(m, nn.Linear):
        return m.out_features if getattr(m, "act", None) in ZERO_SAFE_ACTS else None
    if isinstance(m, ConvBNAct):
        return m.out_channels
    if isinstance(m, nn.BatchNorm2d) and m.affine:
        return m.num_features
    bn = _bn_of(m)
    return bn.num_features if bn is not None else None


def _stage_names(clf: Classifier) -> list[str]:
    return list(clf.net.stage_names) if clf.staged and hasattr(clf.net, "stage_names") else []


def resolve_target(clf: Classifier, layer: str | None = None) -> PruneTarget:
    """Decide how ``layer`` (default: ``clf.default_prune_layer()``) is measured and pruned.

    The network's own default pair is trusted (e.g. DeepID: conv_3 measured at pool_3). For another
    stage of a `StagedNet` the measure point is the last of the following zero-preserving stages
    (conv_1 → pool_1); on other staged networks (Keras graphs) it is the layer itself when the
    network can be run from it. Layers nested inside a stage (e.g. DeepID's conv_4) and non-staged
    networks are masked at the layer's own output by a hook.
    """
    from backdoorlab.models.staged import StagedNet

    point: str | None = None
    default_layer = getattr(clf.net, "prune_layer", "") or ""
    if layer is None:
        layer, point = clf.default_prune_layer()
    elif layer == default_layer:
        point = getattr(clf.net, "prune_point", "") or layer
    module = clf.layer(layer)  # BadInput naming the known layers when unknown
    stages = _stage_names(clf)
    if point is None and layer in stages:
        point = layer
        if isinstance(clf.net, StagedNet):
            i = stages.index(layer)
            while i + 1 < len(stages) and isinstance(clf.layer(stages[i + 1]), ZERO_PRESERVING):
                i += 1
            point = stages[i]
    if point is not None and point not in stages:
        point = None
    weights = layer
    n = channel_count(module)
    if n is None and point is not None and point != layer:
        n = channel_count(clf.layer(point))
        weights = point
    if n is None:
        raise BadInput(f"layer {layer!r} ({type(module).__name__}) cannot be pruned by channel: "
                       "expected a conv, dense, conv-BN-ReLU or BN layer whose activation maps 0 to 0")
    return PruneTarget(layer=layer, point=point, weights=weights, channels=int(n))


def as_mask(mask: np.ndarray | list | tuple, channels: int) -> np.ndarray:
    """Validate a pruning mask (bool array, True = pruned) of length ``channels``."""
    m = np.asarray(mask)
    if m.dtype != bool:
        if m.size and not np.isin(m, (0, 1)).all():
            raise BadInput("channel mask must be boolean (True = pruned) or 0/1")
        m = m.astype(bool)
    if m.shape != (channels,):
        raise BadInput(f"channel mask has shape {m.shape}, the layer has {channels} channels")
    return m


def mask_from_channels(channels: int, pruned: list[int] | np.ndarray) -> np.ndarray:
    """A mask of length ``channels`` with the listed channel indices pruned."""
    m = np.zeros(channels, dtype=bool)
    idx = np.asarray(pruned, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= channels):
        raise BadInput(f"channel index out of range for a layer with {channels} channels")
    m[idx] = True
    return m


@torch.no_grad()
def zero_channels(module: nn.Module, mask: np.ndarray) -> None:
    """Zero, in place, the weights that produce the masked output channels of ``module``."""
    param = next(module.parameters(), None)
    idx = torch.from_numpy(np.flatnonzero(mask))
    if idx.numel() == 0:
        return
    if param is not None:
        idx = idx.to(param.device)  # the index where the weights live
    if isinstance(module, nn.Conv2d | nn.Linear):
        module.weight[idx] = 0.0
        if module.bias is not None:
            module.bias[idx] = 0.0
        return
    if isinstance(module, ConvBNAct):
        module.conv.weight[idx] = 0.0
        if module.conv.bias is not None:
            module.conv.bias[idx] = 0.0
        bn = module.bn
    elif isinstance(module, nn.BatchNorm2d):
        bn = module
    else:
        bn = _bn_of(module)
        if bn is None:
            raise BadInput(f"cannot zero channels of {type(module).__name__}")
    bn.weight[idx] = 0.0
    bn.bias[idx] = 0.0


def apply_channel_mask(clf: Classifier, layer: str | None, mask: np.ndarray | list) -> Classifier:
    """A deep copy of ``clf`` whose masked channels of ``layer`` are pruned (weights zeroed).

    ``mask`` is boolean over the layer's output channels, True = pruned. The copy keeps the
    architecture, options and input spec; its provenance records the pruned channels.
    """
    target = resolve_target(clf, layer)
    m = as_mask(mask, target.channels)
    out = clf.copy()
    zero_channels(out.layer(target.weights), m)
    out.provenance["pruned"] = {"layer": target.layer, "weights": target.weights,
                                "channels": [int(i) for i in np.flatnonzero(m)],
                                "of": target.channels}
    return out
