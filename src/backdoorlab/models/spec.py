"""`InputSpec`: how a network wants its pixels. It travels with the model, never guessed later."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from backdoorlab.errors import BadInput
from backdoorlab.safe_read import MAX_DIM, check_int

SCALES = {"raw": 1.0, "unit": 1.0 / 255.0}


@dataclass(frozen=True)
class InputSpec:
    """Input contract of a network.

    ``scale``: ``"raw"`` — the network takes pixels 0-255 as floats; ``"unit"`` — pixels/255 in
    [0, 1]. ``mean``/``std`` (per channel, on the scaled values) are applied after scaling when
    given. ``layout`` is the tensor layout the module's ``forward`` takes (``"NCHW"`` for every
    network in this package). ``height``/``width``/``channels`` are the expected image shape (whole
    numbers in 1..4096); ``mean``/``std`` hold one finite number per channel (``std`` positive).
    """

    height: int
    width: int
    channels: int
    scale: str = "unit"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        for key in ("height", "width", "channels"):
            object.__setattr__(self, key, check_int(getattr(self, key), f"input spec: {key}", 1, MAX_DIM))
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is None:
                continue
            if not isinstance(v, tuple | list) or len(v) != self.channels or not all(
                    isinstance(m, int | float) and not isinstance(m, bool) and math.isfinite(m) for m in v) \
                    or (key == "std" and any(m <= 0 for m in v)):
                want = "positive " if key == "std" else ""
                raise BadInput(f"input spec: {key} must hold one finite {want}number per channel "
                               f"({self.channels}), got {str(v)[:80]}")
            object.__setattr__(self, key, tuple(float(m) for m in v))
        if self.scale not in SCALES:
            raise BadInput(f"input scale must be one of {sorted(SCALES)}, got {self.scale!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise BadInput(f"layout must be NCHW or NHWC, got {self.layout!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def factor(self) -> float:
        return SCALES[self.scale]

    def check(self, images: np.ndarray, where: str = "images") -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise BadInput(f"{where}: the model expects images of shape (H, W, C) = {self.shape}, "
                           f"got {tuple(images.shape[1:])}")

    def to_tensor(self, images: np.ndarray | torch.Tensor,
                  channels_last: bool = True) -> torch.Tensor:
        """uint8 NHWC images → the float tensor the module expects."""
        x = torch.as_tensor(images)
        x = x.to(torch.float32)
        if self.factor != 1.0:
            x = x * self.factor
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=torch.float32, device=x.device)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=torch.float32, device=x.device)
        if self.layout == "NCHW":
            # a permuted NHWC buffer *is* channels_last memory; contiguous() would copy it to NCHW
            x = x.permute(0, 3, 1, 2)
            if not channels_last:
                x = x.contiguous()
        return x

    def from_unit(self, x01: torch.Tensor) -> torch.Tensor:
        """Map an NCHW float tensor of pixels in [0, 1] to the module's input (differentiable).

        Used by optimisation-based defenses (Neural Cleanse) that work in pixel space.
        """
        x = x01 * 255.0 * self.factor
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return x

    def with_scale(self, scale: str) -> InputSpec:
        d = asdict(self)
        d["scale"] = scale
        return InputSpec(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "model sidecar") -> InputSpec:
        """The spec a model sidecar stores (see `to_dict`); BadInput naming ``where`` for anything
        malformed."""
        if not isinstance(d, dict) or not all(k in d for k in ("height", "width", "channels")):
            raise BadInput(f"{where}: malformed input spec {str(d)[:200]} (expected height, width, "
                           "channels)")
        try:
            return cls(height=d["height"], width=d["width"], channels=d["channels"],
                       scale=d.get("scale", "unit"), mean=d.get("mean"), std=d.get("std"),
                       layout=d.get("layout", "NCHW"))
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None
        except TypeError as e:  # e.g. an unhashable scale
            raise BadInput(f"{where}: malformed input spec ({e})") from None
