"""BppAttack colour-depth trigger (Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan
Attacks against Deep Neural Networks via Image Quantization and Contrastive Adversarial Learning",
CVPR 2022).

The trigger is a loss of colour depth that people hardly notice: every channel value, 8 bits
(0-255), is squeezed to ``bits`` bits, i.e. replaced by the nearest of L = 2**bits evenly spaced
levels k * 255 / (L - 1), k = 0 .. L-1. Plain quantisation leaves visible bands in smooth areas,
so the paper hides them with Floyd-Steinberg dithering: pixels are visited row by row, left to
right; each is set to its nearest level, and its error (value before minus level) is passed on to
the neighbours not visited yet — 7/16 to the right, 3/16 below-left, 5/16 below, 1/16 below-right
(shares that would fall outside the image are dropped). Each channel is dithered on its own.
Levels are computed in float64 (as in the authors' release, the error is taken against the exact
level, not its rounded value); a value pushed below 0 or above 255 by the errors takes the end
level; the result is rounded to the nearest integer (ties to even). With ``dither=false`` the
trigger is a fixed look-up table (every value to its nearest level, rounded).

Settings: the paper describes the squeeze in bits (d bits out of m = 8); its released code and
BackdoorBench set 8 levels (``squeeze_num = 8``), i.e. d = 3 bits, our default ``bits = 3``.
Dithering is part of the paper's trigger and our default (``dither=true``); the release has a
``--dithering`` flag that is off by default.

Vectorised dithering: a pixel's value depends on its left neighbour and the three pixels above it,
so every pixel of one anti-diagonal "wave" t = 2 * row + column is ready at the same time and all
waves run in order (W + 2 (H - 1) steps instead of H * W), each over every image and channel of
the batch at once. Within a wave the below-left shares are added before the right-hand ones,
which keeps each pixel's sum of incoming errors in the raster order of the sequential algorithm:
the result is bit-identical to dithering each image pixel by pixel.

Negative samples (the paper's contrastive adversarial training, training side). The paper pairs
poisoned inputs with adversarially perturbed negatives so that the network learns this
quantisation pattern, not any small perturbation; its released code (and BackdoorBench) instead
adds *another* training image's quantisation residual (quantised minus original) to a share of the
clean inputs of every batch (``neg_ratio`` 0.2) and keeps their labels. We do the latter, through
the trainer's batch hook (`BppTrigger.batch_hook`): in every batch, ``round(negatives * B)``
unpoisoned rows (B the batch size) get the residual of a randomly drawn training image, clipped to
0-255, labels kept; ``negatives=0`` turns it off. Our poisoning stamps fixed rows, where the
release re-poisons 20 % of each batch on the fly, and we apply no random crop / rotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.triggers.base import Trigger, to_uint8


@dataclass
class Options:
    bits: int = opt(3, "colour depth kept per channel, in bits (release: 8 levels = 3 bits)", low=1, high=8)
    dither: bool = opt(True, "Floyd-Steinberg dithering (the paper's trigger)")
    negatives: float = opt(0.2, "share of each training batch given another image's quantisation "
                                "residual, labels kept (release neg_ratio 0.2; 0 = off)", low=0, high=1)


@dataclass
class BppTrigger(Trigger):
    """Squeeze every channel to ``bits`` bits, with Floyd-Steinberg dithering when ``dither``."""

    name: ClassVar[str] = "bpp"
    bits: int = 3
    dither: bool = True
    negatives: float = 0.2
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.negatives) and 0 <= self.negatives <= 1):
            raise BadInput(f"bpp trigger: negatives must be a share in [0, 1], got {self.negatives}")
        self.negatives = float(self.negatives)
        if int(self.bits) != self.bits or not 1 <= self.bits <= 8:
            raise BadInput(f"bpp trigger: bits must be a whole number in 1..8, got {self.bits}")
        if not isinstance(self.dither, (bool, np.bool_)):
            raise BadInput(f"bpp trigger: dither must be true or false, got {self.dither!r}")
        self.bits, self.dither = int(self.bits), bool(self.dither)

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    def quantize(self, v: np.ndarray) -> np.ndarray:
        """Nearest level (float64) of values ``v`` on the 0-255 scale; out-of-range values take
        the end levels."""
        top = self.levels - 1
        k = np.clip(np.rint(v * (top / 255.0)), 0, top)
        return k * (255.0 / top)

    def table(self) -> np.ndarray:
        """The undithered trigger as a uint8 look-up table (256,)."""
        if "lut" not in self._cache:
            self._cache["lut"] = to_uint8(self.quantize(np.arange(256, dtype=np.float64)))
        return self._cache["lut"]

    def dither_float(self, x: np.ndarray) -> np.ndarray:
        """Floyd-Steinberg dithered levels (float64, unrounded) of uint8 ``x`` (N, H, W, C), by
        anti-diagonal waves over the whole batch (pixel-major layout (H, W, N, C) inside, so one
        pixel of every image and channel is one contiguous block)."""
        _, h, w, _ = x.shape
        buf = np.ascontiguousarray(x.transpose(1, 2, 0, 3), dtype=np.float64)
        for t in range(w + 2 * (h - 1)):
            lo, hi = max(0, (t - w + 2) // 2), min(h - 1, t // 2)  # rows with 0 <= t - 2 row < w
            rows = np.arange(lo, hi + 1)
            cols = t - 2 * rows
            old = buf[rows, cols]  # (m, N, C)
            new = self.quantize(old)
            buf[rows, cols] = new
            err = old - new
            below = rows + 1 < h
            if below.any():
                r, c, e = rows[below] + 1, cols[below], err[below]
                left = c - 1 >= 0  # below-left first: see the module docstring
                buf[r[left], c[left] - 1] += e[left] * (3 / 16)
            right = cols + 1 < w
            if right.any():
                buf[rows[right], cols[right] + 1] += err[right] * (7 / 16)
            if below.any():
                buf[r, c] += e * (5 / 16)
                rr = c + 1 < w
                buf[r[rr], c[rr] + 1] += e[rr] * (1 / 16)
        return buf.transpose(2, 0, 1, 3)

    def _apply(self, x: np.ndarray, chunk: int = 2048) -> np.ndarray:
        if not self.dither:
            return self.table()[x]
        out = np.empty_like(x)
        for i in range(0, len(x), chunk):
            out[i:i + chunk] = to_uint8(self.dither_float(x[i:i + chunk]))
        return out

    def prepare(self, train, target, seed: int) -> None:
        """Keep the clean training images: the negatives borrow their quantisation residuals."""
        self._cache["train"] = train.images

    def residual(self, images: np.ndarray) -> np.ndarray:
        """Quantised minus original, float32 (N, H, W, C), of uint8 ``images``."""
        return self.apply(images).astype(np.float32) - images.astype(np.float32)

    def batch_hook(self, poisoned_rows: np.ndarray, seed: int):
        """The negative samples (see the module docstring); None when ``negatives`` is 0 or
        `prepare` has not seen the training set."""
        source = self._cache.get("train")
        if self.negatives == 0 or source is None or not len(source):
            return None
        poisoned = np.asarray(poisoned_rows, dtype=np.int64)

        def negatives(images, labels, rows, rng):
            free = np.flatnonzero(~np.isin(rows, poisoned))
            k = min(len(free), int(round(self.negatives * len(rows))))
            if k == 0:
                return images, labels
            pick = rng.choice(free, size=k, replace=False)
            donors = source[rng.integers(0, len(source), size=k)]
            out = images.copy()
            out[pick] = to_uint8(images[pick].astype(np.float32) + self.residual(donors))
            return out, labels
        return negatives

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "bits": self.bits, "dither": self.dither, "negatives": self.negatives}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> BppTrigger:
        from backdoorlab.triggers.registry import spec_options

        if positional is not None:
            raise BadInput(f"trigger spec 'bpp': unexpected value {positional!r} (options are key=value)")
        o = spec_options(Options, opts, "bpp")
        return cls(bits=o.bits, dither=o.dither, negatives=o.negatives)

    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(Options))
