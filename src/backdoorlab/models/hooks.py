"""Removable forward hooks that mask a layer's output channels (used while fine-tuning pruned
networks, so pruned channels stay at zero and receive no gradient)."""

from __future__ import annotations

import numpy as np
import torch


class OutputMask:
    """Multiply ``module``'s output channels by a 0/1 mask until ``remove()``.

    ``mask`` entries are 1 (keep) or 0 (pruned); the mask is a host tensor that may be edited in
    place, copied to the output's device and dtype at every pass.
    """

    def __init__(self, module: torch.nn.Module, channels: int, pruned: np.ndarray | None = None):
        self.mask = torch.ones(channels)
        if pruned is not None:
            self.mask[torch.as_tensor(np.asarray(pruned, dtype=bool))] = 0.0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        shape = (1, -1, 1, 1) if output.dim() == 4 else (1, -1)
        return output * self.mask.view(shape).to(output.device, output.dtype)

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> OutputMask:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
