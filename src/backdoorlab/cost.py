"""What a defense costs besides wall time: image passes.

An *image pass* is one image pushed forward through the network, whole or in part (a training
step counts its forward pass; the pruning sweep's runs of the layers after the pruned one count
too). Defense papers rarely report it; the benchmark tables do. Counted inside `counting()` by a
global forward hook on the networks `Classifier` marks, and by `StagedNet.forward_to` /
`forward_from`; a network nested in another (a GoodNet's two halves) is not counted twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

TOP = "_backdoorlab_top"  # attribute set on a Classifier's network


@dataclass(eq=False)
class Passes:
    images: int = 0


_active: list[Passes] = []
_depth = 0
_handles: list = []


def add(n: int) -> None:
    """Count ``n`` images passed (outside any counted network call)."""
    if _depth == 0:
        for c in _active:
            c.images += n


def _pre(module, args) -> None:
    global _depth
    if getattr(module, TOP, False):
        if _depth == 0 and args and hasattr(args[0], "shape") and args[0].ndim:
            for c in _active:
                c.images += int(args[0].shape[0])
        _depth += 1


def _post(module, args, output) -> None:
    global _depth
    if getattr(module, TOP, False):
        _depth -= 1


@contextlib.contextmanager
def counting() -> Iterator[Passes]:
    """Count the image passes made inside the block (nested blocks each see their own)."""
    global _depth
    c = Passes()
    if not _active:
        _handles[:] = [torch.nn.modules.module.register_module_forward_pre_hook(_pre),
                       torch.nn.modules.module.register_module_forward_hook(_post, always_call=True)]
        _depth = 0
    _active.append(c)
    try:
        yield c
    finally:
        _active.remove(c)  # by identity (eq=False): equal counts are different blocks
        if not _active:
            for h in _handles:
                h.remove()
            _handles.clear()
