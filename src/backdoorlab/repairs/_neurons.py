"""The prunable neurons of a network, for the repairs that prune across every layer (ANP, CLP).

A leading underscore: the registry does not load this module as a method.

A *neuron group* is one layer's output channels (conv) or units (dense) that can be switched off
exactly, excluding the network's output layer (the last conv/dense layer a forward pass calls):

- a BatchNorm layer (any BN, as Adversarial Neuron Pruning masks every BN of its networks);
  when the BN reads a conv or dense layer's output directly, the group stands for that layer's
  channels and the layer gets no group of its own (with batch statistics a mask on the conv would
  be normalised away). Switched off by zeroing the BN's gamma and beta: output exactly 0.
- every other conv / dense layer: switched off by zeroing the channel's kernel row and bias; its
  fused activation must map 0 to 0 (none, linear, relu, relu6, tanh, elu, selu, swish,
  softsign).

Which layer feeds which is read from one forward pass of a blank image (not data, not counted as
an image pass) on a copy of the network, by the identity of the tensors passed between modules,
so it works for any architecture (staged networks, Keras graphs, plain modules). In a Keras graph
the activation layers that follow a group are checked too (a sigmoid after a zeroed channel would
output 0.5): such groups are skipped, and listed with the reason.

`verify_zero` runs a pruned network once on noise images and checks every pruned channel is
exactly 0 where its activation has been applied (the module with the fused activation, the
conv-BN-ReLU block, the Keras activation layer), so a pruned neuron is really off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from backdoorlab import cost

# activations with f(0) = 0
ZERO_SAFE_ACTS = (None, "linear", "relu", "relu6", "tanh", "elu", "selu", "swish", "silu", "softsign")
_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Group:
    """One layer's prunable neurons. ``path``: the module (in ``net.named_modules()``) that carries
    the mask and is zeroed; ``kind``: "bn", "conv" or "linear"; ``source``: for a BN, the conv or
    dense layer whose output it reads directly (None: it reads something else, e.g. a residual sum);
    for a conv/dense group, its own path. ``post``: the module whose output is the neuron after its
    activation (checked by `verify_zero`)."""

    name: str
    path: str
    kind: str
    size: int
    source: str | None
    post: str


@dataclass
class Neurons:
    groups: list[Group]
    skipped: dict[str, str] = field(default_factory=dict)  # layer name → why it cannot be pruned
    output: str = ""  # name of the output layer (never pruned)

    @property
    def total(self) -> int:
        return sum(g.size for g in self.groups)


@contextlib.contextmanager
def uncounted(net: nn.Module) -> Iterator[None]:
    """Forward passes of ``net`` inside the block are not counted as image passes (structural
    probes and checks, not part of the method)."""
    had = getattr(net, cost.TOP, False)
    setattr(net, cost.TOP, False)
    try:
        yield
    finally:
        setattr(net, cost.TOP, had)


def display_names(net: nn.Module) -> dict[str, str]:
    """Module path → the name shown to users (stage paths without ``stages.``; Keras names)."""
    keras = getattr(net, "keys", None)
    inverse = {f"stages.{k}": n for n, k in keras.items()} if isinstance(keras, dict) else {}
    out = {}
    for path, _ in net.named_modules():
        out[path] = inverse.get(path) or path.removeprefix("stages.")
    return out


def _size(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.num_features


def _trace(clf, net: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(conv/dense/BN paths in call order, BN path → path of the layer whose output it reads)."""
    kinds = (nn.Conv2d, nn.Linear, _BN)
    calls: list[str] = []
    produced: dict[int, str] = {}
    reads: dict[str, str] = {}
    keep: list[torch.Tensor] = []  # holds every output alive, so tensor ids are never reused
    handles = []

    def hook(path):
        def fn(module, inputs, output):
            if path not in calls:
                calls.append(path)
                if isinstance(module, _BN) and inputs and id(inputs[0]) in produced:
                    reads[path] = produced[id(inputs[0])]
            if isinstance(output, torch.Tensor) and not isinstance(module, _BN):
                produced[id(output)] = path
                keep.append(output)
        return fn

    for path, m in net.named_modules():
        if isinstance(m, kinds):
            handles.append(m.register_forward_hook(hook(path)))
    h, w, c = clf.spec.shape
    x = clf.to_tensor(np.zeros((1, h, w, c), np.uint8))
    was = net.training
    net.eval()
    try:
        with torch.no_grad(), uncounted(net):
            net(x)
    finally:
        for hd in handles:
            hd.remove()
        net.train(was)
    return calls, reads


def _keras_followers(net: nn.Module, path: str) -> tuple[str | None, str]:
    """For a module of a Keras graph: (why its zeroed channels would not stay 0 through the
    activation layers that follow it — through dropout and pooling too —, or None; the path of the
    last such activation layer when they form a single chain, else ``path``)."""
    from backdoorlab.models.keras_graph import KerasActivation, KerasAvgPool2D, KerasMaxPool2D, KerasReLU

    inverse = {f"stages.{k}": n for n, k in net.keys.items()}
    node = inverse.get(path)
    if node is None:
        return None, path
    post, chain, frontier = path, True, [node]
    while frontier:
        cur = frontier.pop()
        nxt = [n for n in net.order if cur in net.inputs[n]]
        chain = chain and len(nxt) == 1
        for n in nxt:
            m = net.module(n)
            if isinstance(m, KerasActivation):
                if m.act not in ZERO_SAFE_ACTS:
                    return f"followed by activation {m.act!r} (maps 0 to a non-zero value)", path
            elif isinstance(m, KerasReLU):
                if not (m.threshold <= 0 or m.negative_slope == 0):
                    return "followed by a ReLU layer that maps 0 to a non-zero value", path
            elif not isinstance(m, nn.Dropout | KerasMaxPool2D | KerasAvgPool2D):
                continue
            frontier.append(n)
            if chain and isinstance(m, KerasActivation | KerasReLU):
                post = f"stages.{net.keys[n]}"
    return None, post


def find(clf, net: nn.Module | None = None) -> Neurons:
    """The prunable neuron groups of ``clf`` (its network, or ``net``, a copy of it), in call order."""
    from backdoorlab.models.architectures import PreActFinal
    from backdoorlab.models.keras_graph import KerasGraph
    from backdoorlab.models.layers import ConvBNAct

    net = clf.net if net is None else net
    calls, reads = _trace(clf, net)
    modules = dict(net.named_modules())
    names = display_names(net)
    layers = [p for p in calls if isinstance(modules[p], nn.Conv2d | nn.Linear)]
    if not layers:
        return Neurons([], {}, "")
    output = layers[-1]
    out_at = calls.index(output)
    read_by_bn = set(reads.values())
    parents = {p: p.rsplit(".", 1)[0] if "." in p else "" for p in calls}
    groups: list[Group] = []
    skipped: dict[str, str] = {}
    for i, path in enumerate(calls):
        m = modules[path]
        if path == output or i > out_at:
            continue
        if isinstance(m, _BN):
            if m.weight is None or m.bias is None:
                skipped[names[path]] = "batch norm without gamma/beta (affine=False)"
                continue
            source = reads.get(path)
            parent = modules.get(parents[path])
            post = parents[path] if isinstance(parent, ConvBNAct | PreActFinal) else path
            kind = "bn"
        else:
            if path in read_by_bn:
                continue  # its channels are the BN's group
            act = getattr(m, "act", None)
            if act not in ZERO_SAFE_ACTS:
                skipped[names[path]] = f"fused activation {act!r} maps 0 to a non-zero value"
                continue
            source, post = path, path
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        if isinstance(net, KerasGraph):
            why, post_k = _keras_followers(net, path)
            if why:
                skipped[names[path]] = why
                continue
            if post == path:
                post = post_k
        groups.append(Group(names[path], path, kind, _size(m), source, post))
    return Neurons(groups, skipped, names[output])


@torch.no_grad()
def zero(net: nn.Module, group: Group, channels: np.ndarray | list[int]) -> None:
    """Switch off ``channels`` of ``group`` in ``net`` (in place): BN gamma and beta, or the
    conv/dense kernel rows and biases."""
    m = dict(net.named_modules())[group.path]
    idx = torch.as_tensor(np.asarray(channels, dtype=np.int64), device=m.weight.device)
    if idx.numel() == 0:
        return
    m.weight[idx] = 0.0
    if m.bias is not None:
        m.bias[idx] = 0.0


def verify_zero(clf, pruned: dict[str, np.ndarray], groups: list[Group], seed: int = 0,
                n: int = 4) -> None:
    """Run ``clf`` on ``n`` noise images and check every pruned channel (``pruned``: group path →
    channel indices) is exactly 0 after its activation; RuntimeError otherwise (a bug)."""
    net = clf.net
    modules = dict(net.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    todo = [g for g in groups if len(pruned.get(g.path, ())) > 0]
    for g in todo:
        def fn(module, inputs, output, post=g.post):
            seen[post] = output.detach()
        handles.append(modules[g.post].register_forward_hook(fn))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *clf.spec.shape), dtype=np.uint8)
    was = net.training
    net.eval()
    try:
        with torch.no_grad(), uncounted(net):
            net(clf.to_tensor(x))
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    for g in todo:
        out = seen.get(g.post)
        if out is None:
            continue  # the layer is not reached by a forward pass
        idx = torch.as_tensor(np.asarray(pruned[g.path], dtype=np.int64), device=out.device)
        vals = out.index_select(1, idx)
        if torch.count_nonzero(vals):
            raise RuntimeError(f"pruned channels of {g.name} are not zero after the activation "
                               f"({float(vals.abs().max()):g})")
