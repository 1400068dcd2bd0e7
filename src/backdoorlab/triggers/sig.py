"""SIG sinusoidal-signal trigger (Barni, Kallas & Tondi, "A new Backdoor Attack in CNNs by
training set corruption without label poisoning", ICIP 2019).

A clean-label attack: the attacker adds a faint, fixed signal to some training images OF THE TARGET
CLASS only and leaves every label alone; the network learns to associate the signal with that
class, and at test time the same signal added to an image of any other class pulls it to the
target. Poison with `AttackPlan(clean_label=True)` (CLI ``--clean-label``): the poisoning then
draws only target-class images and changes no label; this module only draws the signal.

The signal is a horizontal sinusoid, the same on every row and every channel:

    v(i, j) = delta * sin(2 pi j f / W),   j = 0 .. W-1 the column, W the image width,

added to the pixel values (0-255 scale), clipped to 0-255 and rounded to the nearest integer
(ties to even). ``delta`` is the amplitude in grey levels and ``f`` the number of periods across
the image. Defaults: delta = 20, f = 6, the paper's sinusoid settings as commonly cited for its
MNIST experiments (BackdoorBench's SIG config uses delta = 40, f = 6); the paper also tries a
ramp signal, not implemented here. The paper lets the test-time amplitude differ from the
training one; one trigger here has one amplitude — build a second trigger with another ``delta``
for the test set if you want that. Our digits (16x16, upscaled 8x8, black background, white
strokes) clip half of the signal on most pixels, and a class holds about 120 training images
against MNIST's 6,000: SIG does not implant there (tests/test_triggers_more.py).

Small images: the signal is sampled at W columns, so f = 6 needs W > 12 to be rendered without
aliasing (more than two samples per period). At W = 16 (our digits) a period is 2.7 columns and
the samples still reach ±delta (column 2 has sin = -1, column 6 has +1). At W = 8 (the digits'
native size) f = 6 aliases to f = 2 with the sign flipped (sin(2 pi j 6/8) = -sin(2 pi j 2/8)):
still a fixed pattern of amplitude delta, but a coarser one than the formula suggests.

Speed: the rounded signal is one row of integers, so ``apply`` adds it with saturating uint8
arithmetic, never making a float copy of the batch; if some value of v is exactly half-way
between two integers (ties-to-even would then depend on the pixel), the float route is used.
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
    delta: float = opt(20.0, "amplitude of the sinusoid in grey levels (paper 20)", low=0, high=255)
    freq: float = opt(6.0, "periods across the image width (paper 6)", low=0, high=1000)


@dataclass
class SIGTrigger(Trigger):
    """Add ``delta * sin(2 pi j freq / W)`` to column j of every image (all rows, all channels)."""

    name: ClassVar[str] = "sig"
    delta: float = 20.0
    freq: float = 6.0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.delta) and 0 <= self.delta <= 255):
            raise BadInput(f"sig trigger: delta must be a number in [0, 255], got {self.delta}")
        if not (np.isfinite(self.freq) and self.freq >= 0):
            raise BadInput(f"sig trigger: freq must be a number >= 0, got {self.freq}")
        self.delta, self.freq = float(self.delta), float(self.freq)

    def signal(self, width: int) -> np.ndarray:
        """v for one row, float64 (W,)."""
        j = np.arange(width, dtype=np.float64)
        return self.delta * np.sin(2.0 * np.pi * j * self.freq / width)

    def perturb_float(self, x: np.ndarray) -> np.ndarray:
        """Unclipped, unrounded float64 output x + v."""
        return x + self.signal(x.shape[2])[None, None, :, None]

    def _steps(self, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(up, down) uint8 (W, 1) with up - down = rint(v), or None if some v is a tie."""
        if width not in self._cache:
            v = self.signal(width)
            if np.any(np.abs(v - np.floor(v)) == 0.5):
                self._cache[width] = None
            else:
                r = np.rint(v)
                self._cache[width] = (np.clip(r, 0, 255).astype(np.uint8)[:, None],
                                      np.clip(-r, 0, 255).astype(np.uint8)[:, None])
        return self._cache[width]

    def _apply(self, x: np.ndarray, chunk: int = 1024) -> np.ndarray:
        steps = self._steps(x.shape[2])
        out = np.empty_like(x)
        if steps is None:
            for i in range(0, len(x), chunk):
                out[i:i + chunk] = to_uint8(self.perturb_float(x[i:i + chunk]))
            return out
        _, h, w, c = x.shape
        # rows of W * C values, so the inner loops run over whole rows, not over C = 1 or 3
        up, down = (np.repeat(s[:, 0], c) for s in steps)
        xr, orows = x.reshape(-1, h, w * c), out.reshape(-1, h, w * c)
        tmp = np.empty((min(chunk, len(x)), h, w * c), dtype=np.uint8)
        for i in range(0, len(x), chunk):
            xb, ob = xr[i:i + chunk], orows[i:i + chunk]
            tb = tmp[: len(xb)]
            np.subtract(255, xb, out=tb)  # head-room
            np.minimum(tb, up, out=tb)
            np.add(xb, tb, out=ob)  # x + min(up, 255 - x) <= 255
            np.minimum(ob, down, out=tb)
            np.subtract(ob, tb, out=ob)  # minus min(down, value) >= 0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "delta": self.delta, "freq": self.freq}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> SIGTrigger:
        from backdoorlab.triggers.registry import spec_options

        if positional is not None:
            raise BadInput(f"trigger spec 'sig': unexpected value {positional!r} (options are key=value)")
        o = spec_options(Options, opts, "sig")
        return cls(delta=o.delta, freq=o.freq)

    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(Options))
