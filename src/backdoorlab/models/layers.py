"""Small building blocks shared by the architectures (Keras-compatible semantics)."""

from __future__ import annotations

import torch
from torch import nn


class Conv2dAct(nn.Conv2d):
    """A Conv2d with an optional fused activation, like a Keras Conv2D(activation=...).

    Parameters stay named ``weight``/``bias`` so Keras kernels map onto it directly.
    """

    def __init__(self, *args, act: str | None = "relu", **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return activate(y, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


class LinearAct(nn.Linear):
    """A Linear layer with an optional fused activation, like a Keras Dense(activation=...)."""

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(super().forward(x), self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


class ConvBNAct(nn.Module):
    """conv → batch norm → ReLU, addressed as one named layer."""

    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class KerasFlatten(nn.Module):
    """Flatten NCHW activations in Keras' (H, W, C) order, so Keras dense kernels fit unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return x.reshape(x.shape[0], -1)


_FUNCTIONS = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": nn.functional.elu,
    "selu": nn.functional.selu,
    "softplus": nn.functional.softplus,
    "softsign": nn.functional.softsign,
    "swish": nn.functional.silu,
    "silu": nn.functional.silu,
    "relu6": nn.functional.relu6,
    "exponential": torch.exp,
}
ACTIVATIONS = (None, "linear", "softmax", *_FUNCTIONS)


def activate(y: torch.Tensor, act: str | None) -> torch.Tensor:
    """Apply a Keras activation by name (``None``/``linear`` = identity; softmax over dim 1, the
    channel axis in NCHW and the feature axis of (N, F))."""
    if act is None or act == "linear":
        return y
    if act == "softmax":  # final layers drop it (networks here return logits); mid-graph keeps it
        return torch.softmax(y, dim=1)
    fn = _FUNCTIONS.get(act)
    if fn is None:
        raise ValueError(f"unsupported activation {act!r}")
    return fn(y)
