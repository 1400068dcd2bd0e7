"""FTrojan frequency-domain trigger (T. Wang et al., "An Invisible Black-box Backdoor
Attack through Frequency Domain", ECCV 2022).

Each image goes from RGB to YCrCb (or YUV) in floating point; each chosen chroma channel is cut
into non-overlapping ``window`` x ``window`` blocks, each block is transformed by an orthonormal
2-D DCT-II, ``magnitude`` is added to the coefficient at every given ``(u, v)`` (row frequency,
column frequency), and the block goes back through the inverse DCT and the inverse colour
transform; pixels are then clipped to 0-255 and rounded to the nearest integer (ties to even).
The authors' settings: channels Cr and Cb, positions (31, 31) and (15, 15), magnitude 20, one 32x32
window, for CIFAR-10 (preset ``cifar10``, the default); position (31, 31) with magnitude 50 for
GTSRB (preset ``gtsrb``).

Colour spaces (ITU-R BT.601 on 0-255 pixels): ``ycrcb`` as OpenCV defines it, Y = 0.299 R +
0.587 G + 0.114 B, Cr = 0.713 (R - Y) + 128, Cb = 0.564 (B - Y) + 128; ``yuv``: the same Y,
U = 0.492 (B - Y), V = 0.877 (R - Y). The inverse transform is the exact matrix inverse, so
with magnitude 0 the trigger is the identity. Grey (1-channel) images: the single channel is the
luminance and is perturbed directly; ``channels`` and ``space`` do not apply. When the image size
is not a multiple of ``window``, only the full windows from the top-left corner are perturbed.

Speed: DCT and colour transform are linear, so adding ``magnitude`` at (u, v) of a channel's
block equals adding ``magnitude * outer(D[u], D[v])`` (D the DCT matrix) to that block in the
spatial domain, and the whole trigger is one fixed RGB pattern ``delta`` (float64, computed once
per image shape). ``apply`` returns clip(rint(pixel + delta)) for the whole batch, using that for
whole-number pixels this is pixel + rint(delta) (saturating uint8 arithmetic, no float copy of
the batch). ``apply_dct`` runs the explicit batched matrix DCT (D @ X @ D.T over all images and
windows at once, float32) and gives the same pixels up to float32 rounding (at most 1 grey level).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import Trigger, check_batch, opt_float, opt_int, parse_ints, to_uint8

_Y = (0.299, 0.587, 0.114)
# rows: the space's channels as linear maps of (R, G, B); offsets added after the map
SPACES: dict[str, tuple[np.ndarray, np.ndarray, tuple[str, str, str]]] = {
    "ycrcb": (
        np.array([_Y,
                  [0.713 * (1 - _Y[0]), -0.713 * _Y[1], -0.713 * _Y[2]],
                  [-0.564 * _Y[0], -0.564 * _Y[1], 0.564 * (1 - _Y[2])]]),
        np.array([0.0, 128.0, 128.0]),
        ("y", "cr", "cb"),
    ),
    "yuv": (
        np.array([_Y,
                  [-0.492 * _Y[0], -0.492 * _Y[1], 0.492 * (1 - _Y[2])],
                  [0.877 * (1 - _Y[0]), -0.877 * _Y[1], -0.877 * _Y[2]]]),
        np.zeros(3),
        ("y", "u", "v"),
    ),
}

PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"channels": (1, 2), "positions": ((31, 31), (15, 15)), "magnitude": 20.0, "window": 32},
    "gtsrb": {"channels": (1, 2), "positions": ((31, 31),), "magnitude": 50.0, "window": 32},
}


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` (n, n), float64: coefficients = D @ x @ D.T."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


@dataclass
class FTrojanTrigger(Trigger):
    """Add ``magnitude`` at DCT ``positions`` of ``channels`` (indices into ``space``) per window."""

    name: ClassVar[str] = "ftrojan"
    channels: tuple[int, ...] = (1, 2)
    positions: tuple[tuple[int, int], ...] = ((31, 31), (15, 15))
    magnitude: float = 20.0
    window: int = 32
    space: str = "ycrcb"
    preset: str | None = None  # recorded only
    _delta: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = "ftrojan trigger"
        if self.space not in SPACES:
            raise BadInput(f"{where}: space must be one of {', '.join(SPACES)}, got {self.space!r}")
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or any(not 0 <= c <= 2 for c in self.channels) or \
                len(set(self.channels)) != len(self.channels):
            raise BadInput(f"{where}: channels must be distinct indices 0-2 of "
                           f"{'/'.join(SPACES[self.space][2])}, got {self.channels}")
        if self.window < 1:
            raise BadInput(f"{where}: window must be >= 1, got {self.window}")
        self.positions = tuple((int(u), int(v)) for u, v in self.positions)
        if not self.positions:
            raise BadInput(f"{where}: give at least one (u, v) position")
        for u, v in self.positions:
            if not (0 <= u < self.window and 0 <= v < self.window):
                raise BadInput(f"{where}: position ({u}, {v}) lies outside a {self.window}x"
                               f"{self.window} window (each index must be 0..{self.window - 1})")
        if not np.isfinite(self.magnitude):
            raise BadInput(f"{where}: magnitude must be a finite number, got {self.magnitude}")

    # -- colour space -------------------------------------------------------------------------
    def to_space(self, rgb: np.ndarray) -> np.ndarray:
        """RGB float (..., 3) -> the trigger's colour space (same dtype)."""
        m, off, _ = SPACES[self.space]
        return rgb @ m.T.astype(rgb.dtype) + off.astype(rgb.dtype)

    def from_space(self, s: np.ndarray) -> np.ndarray:
        """Inverse of `to_space` (exact matrix inverse)."""
        m, off, _ = SPACES[self.space]
        return (s - off.astype(s.dtype)) @ np.linalg.inv(m).T.astype(s.dtype)

    # -- geometry -----------------------------------------------------------------------------
    def check(self, shape: tuple[int, ...]) -> None:
        h, w = shape[0], shape[1]
        if self.window > h or self.window > w:
            raise BadInput(f"ftrojan trigger: window {self.window} does not fit in {h}x{w} images "
                           "(give window=N with N <= the image side and positions below N)")

    def _touched(self, c: int) -> tuple[int, ...]:
        return (0,) if c == 1 else self.channels

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """The additive RGB (or grey) perturbation, float64 (H, W, C), for images of ``shape``."""
        key = tuple(shape)
        if key not in self._delta:
            self.check(key)
            h, w, c = key
            n = self.window
            d = dct_matrix(n)
            block = sum(np.outer(d[u], d[v]) for u, v in self.positions) * float(self.magnitude)
            nh, nw = h // n, w // n
            s = np.zeros((h, w, c))
            for ch in self._touched(c):
                s[: nh * n, : nw * n, ch] = np.tile(block, (nh, nw))
            if c == 3:  # a pure change in the space maps back through the linear part only
                s = s @ np.linalg.inv(SPACES[self.space][0]).T
            self._delta[key] = s
        return self._delta[key]

    # -- application --------------------------------------------------------------------------
    def perturb_float(self, images: np.ndarray) -> np.ndarray:
        """Unclipped, unrounded float64 output (spatial-pattern route): images + `delta`."""
        x = check_batch(images, "ftrojan trigger")
        return x + self.delta(x.shape[1:])

    def perturb_float_dct(self, images: np.ndarray) -> np.ndarray:
        """Unclipped float32 output by the explicit batched DCT (all images and windows at once)."""
        x = check_batch(images, "ftrojan trigger")
        self.check(x.shape[1:])
        _, h, w, c = x.shape
        n = self.window
        nh, nw = h // n, w // n
        d = dct_matrix(n).astype(np.float32)
        s = x.astype(np.float32)
        if c == 3:
            s = self.to_space(s)
        chans = list(self._touched(c))
        # (N, nh, n, nw, n, k) -> (N, nh, nw, k, n, n): windows as the trailing matrix axes
        blocks = s[:, : nh * n, : nw * n, chans].reshape(len(x), nh, n, nw, n, len(chans))
        blocks = blocks.transpose(0, 1, 3, 5, 2, 4)
        coef = d @ blocks @ d.T
        for u, v in self.positions:
            coef[..., u, v] += np.float32(self.magnitude)
        back = d.T @ coef @ d
        s[:, : nh * n, : nw * n, chans] = back.transpose(0, 1, 4, 2, 5, 3).reshape(
            len(x), nh * n, nw * n, len(chans))
        return self.from_space(s) if c == 3 else s

    def _steps(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        """(up, down) uint8 (H, W, C) with up - down = rint(delta), or None when some delta value
        is exactly half-way between integers (then pixel + rint(delta) may differ from
        rint(pixel + delta) under ties-to-even, and the float route is used)."""
        key = ("steps",) + tuple(shape)
        if key not in self._delta:
            d = self.delta(shape)
            if np.any(np.abs(d - np.floor(d)) == 0.5):
                self._delta[key] = None
            else:
                r = np.clip(np.rint(d), -255, 255)
                self._delta[key] = (np.clip(r, 0, 255).astype(np.uint8),
                                    np.clip(-r, 0, 255).astype(np.uint8))
        return self._delta[key]

    def _apply(self, x: np.ndarray, chunk: int = 256) -> np.ndarray:
        """clip(rint(x + delta)) for integer pixels x, computed as x + rint(delta) with saturating
        uint8 arithmetic, in cache-sized chunks (no float copy of the batch)."""
        out = np.empty_like(x)
        steps = self._steps(x.shape[1:])
        if steps is None:
            for i in range(0, len(x), chunk):
                out[i:i + chunk] = to_uint8(self.perturb_float(x[i:i + chunk]))
            return out
        up, down = steps
        tmp = np.empty((min(chunk, len(x)),) + x.shape[1:], dtype=np.uint8)
        for i in range(0, len(x), chunk):
            xb, ob = x[i:i + chunk], out[i:i + chunk]
            tb = tmp[: len(xb)]
            np.subtract(255, xb, out=tb)  # head-room
            np.minimum(tb, up, out=tb)
            np.add(xb, tb, out=ob)  # x + min(up, 255 - x) <= 255
            np.minimum(ob, down, out=tb)
            np.subtract(ob, tb, out=ob)  # minus min(down, value) >= 0
        return out

    def apply_dct(self, images: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """Same result as `apply` (within float rounding), through the explicit batched DCT."""
        x = check_batch(images, "ftrojan trigger")
        self.check(x.shape[1:])
        out = np.empty_like(x)
        for i in range(0, len(x), chunk):
            out[i:i + chunk] = to_uint8(self.perturb_float_dct(x[i:i + chunk]))
        return out

    def to_dict(self) -> dict[str, Any]:
        names = SPACES[self.space][2]
        d: dict[str, Any] = {"kind": self.name, "space": self.space,
                             "channels": [names[c] for c in self.channels],
                             "positions": [list(p) for p in self.positions],
                             "magnitude": self.magnitude, "window": self.window}
        if self.preset:
            d["preset"] = self.preset
        return d

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> FTrojanTrigger:
        where = "trigger spec 'ftrojan'"
        if positional is not None:
            raise BadInput(f"{where}: unexpected value {positional!r} (options are key=value)")
        preset = opts.get("preset", "cifar10").lower()
        if preset not in PRESETS:
            raise BadInput(f"{where}: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        kw = dict(PRESETS[preset])
        space = opts.get("space", "ycrcb").lower()
        if space not in SPACES:
            raise BadInput(f"{where}: space must be one of {', '.join(SPACES)}, got {space!r}")
        kw["space"] = space
        if "channels" in opts:
            kw["channels"] = tuple(_channel_index(t, space, where)
                                   for t in opts["channels"].replace(",", ";").split(";") if t)
        if "pos" in opts:
            kw["positions"] = tuple(parse_ints(p, "pos", where, count=2)
                                    for p in opts["pos"].split("|") if p.strip())
        kw["magnitude"] = opt_float(opts, "magnitude", kw["magnitude"], where)
        kw["window"] = opt_int(opts, "window", kw["window"], where, lo=1)
        return cls(preset=preset if "preset" in opts else None, **kw)

    options: ClassVar[tuple[str, ...]] = ("preset", "channels", "pos", "magnitude", "window", "space")


def _channel_index(token: str, space: str, where: str) -> int:
    names = SPACES[space][2]
    t = token.strip().lower()
    if t in names:
        return names.index(t)
    if t in ("0", "1", "2"):
        return int(t)
    raise BadInput(f"{where}: channel {token!r} is not one of {', '.join(names)} (space {space})")
