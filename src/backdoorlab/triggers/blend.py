"""Blended trigger (Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning", 2017: blended injection strategy).

Every pixel is mixed with a whole-image pattern:

    out = round((1 - alpha) * x + alpha * pattern),

computed in float32 and rounded to the nearest integer (ties to even). The pattern is either
seeded uniform noise (each value drawn from 0..255 with ``numpy.random.default_rng(seed)``) or a
picture resized to the image size (Pillow, bilinear; converted to grey for 1-channel images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import Trigger, load_picture, opt_float, opt_int, to_uint8


def noise_pattern(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded uniform noise, uint8 of ``shape`` (H, W, C)."""
    return np.random.default_rng(seed).integers(0, 256, size=tuple(shape), dtype=np.uint8)


@dataclass
class BlendTrigger(Trigger):
    """Mix images with ``pattern`` (H, W, C) uint8 at opacity ``alpha`` in [0, 1]."""

    name: ClassVar[str] = "blend"
    pattern: np.ndarray = field(repr=False)
    alpha: float = 0.2
    source: str = ""  # "noise" or the picture's file name (recorded in to_dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        p = np.asarray(self.pattern)
        if p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] not in (1, 3):
            raise BadInput(f"blend trigger: pattern must be uint8 (H, W, C), got {p.dtype} {p.shape}")
        if not 0.0 <= self.alpha <= 1.0:
            raise BadInput(f"blend trigger: alpha must be in [0, 1], got {self.alpha}")
        self.pattern = p

    @classmethod
    def noise(cls, image_shape: tuple[int, ...], alpha: float = 0.2, seed: int = 0) -> BlendTrigger:
        return cls(noise_pattern(image_shape, seed), alpha, source="noise", seed=seed)

    @classmethod
    def from_file(cls, path: str, image_shape: tuple[int, ...], alpha: float = 0.2) -> BlendTrigger:
        from PIL import Image

        h, w, c = image_shape
        im = load_picture(path, "blend trigger").convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        p = np.asarray(im, dtype=np.uint8).reshape(h, w, c).copy()
        return cls(p, alpha, source=str(path))

    def check(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != self.pattern.shape:
            raise BadInput(f"blend trigger: pattern is {'x'.join(map(str, self.pattern.shape))} "
                           f"(H x W x C) but the images are {'x'.join(map(str, shape))}")

    def _apply(self, x: np.ndarray) -> np.ndarray:
        a = np.float32(self.alpha)
        mixed = (np.float32(1.0) - a) * x.astype(np.float32) + a * self.pattern.astype(np.float32)
        return to_uint8(mixed)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.name, "alpha": self.alpha, "pattern": self.source or "array",
                             "shape": list(self.pattern.shape)}
        if self.seed is not None:
            d["seed"] = self.seed
        return d

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> BlendTrigger:
        where = "trigger spec 'blend'"
        alpha = opt_float(opts, "alpha", 0.2, where, lo=0.0, hi=1.0)
        path = positional or opts.get("file")
        if path:
            if "seed" in opts:
                raise BadInput(f"{where}: seed applies to the noise pattern, not to a picture")
            return cls.from_file(path, image_shape, alpha)
        return cls.noise(tuple(image_shape), alpha, opt_int(opts, "seed", 0, where, lo=0))

    options: ClassVar[tuple[str, ...]] = ("file", "alpha", "seed")
