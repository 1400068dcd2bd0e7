"""`StagedNet`: a network as an ordered list of named stages.

Defenses need to run a network *up to* a named layer once, keep those activations, and run only
the rest many times (pruning sweeps, Neural Cleanse on features). A stage is any module; nested
named layers (e.g. ``conv_4`` inside DeepID's two-branch head) are still reachable by name.
"""

from __future__ import annotations

import torch
from torch import nn

from backdoorlab import cost


class StagedNet(nn.Module):
    """Run ``stages`` in order. ``prune_layer`` names the default layer for pruning defenses
    (the last convolutional layer) and ``prune_point`` the stage whose output is measured and
    masked for it (e.g. DeepID: conv_3 measured at pool_3)."""

    prune_layer: str = ""
    prune_point: str = ""

    def __init__(self, stages: list[tuple[str, nn.Module]], prune_layer: str = "",
                 prune_point: str = ""):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.prune_layer = prune_layer
        self.prune_point = prune_point or prune_layer

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.stages.values():
            x = m(x)
        return x

    def _index(self, name: str) -> int:
        names = self.stage_names
        if name not in names:
            raise KeyError(f"{name!r} is not a stage of this network (stages: {', '.join(names)})")
        return names.index(name)

    def forward_to(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Output of stage ``name`` (inclusive)."""
        stop = self._index(name)
        cost.add(len(x))
        for i, m in enumerate(self.stages.values()):
            x = m(x)
            if i == stop:
                break
        return x

    def forward_from(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Run the stages after ``name`` on ``h`` (an output of stage ``name``)."""
        start = self._index(name)
        cost.add(len(h))
        for i, m in enumerate(self.stages.values()):
            if i > start:
                h = m(h)
        return h
