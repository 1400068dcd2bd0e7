"""WaNet warping trigger (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack",
ICLR 2021).

The trigger moves pixels instead of adding a pattern. Once, from a seed, we draw a k x k control
grid of 2-D offsets, each coordinate uniform in [-1, 1]; the grid is divided by its mean absolute
value (so the offsets average 1 in size), multiplied by the strength ``s``, and upsampled to the
image size by bicubic interpolation (corner-aligned, so the four corner control points sit on the
corner pixels). Every image is then resampled at "identity grid + field": output pixel (i, j) reads
the input at a slightly shifted position, with bilinear interpolation (``torch`` ``grid_sample``),
and sampling positions are clipped to the image so none falls outside it. The field is fixed:
every poisoned image, at training and at test time, gets the same warp.

Units: as in the authors' release, the field is applied in ``grid_sample``'s normalised
coordinates (-1 .. 1 across the image) after division by the image side, so a field value ``v``
moves a pixel by ``s * v * (W - 1) / (2 W)`` pixels horizontally (``H`` for the vertical
component), a little less than ``s * v / 2``. With mean |v| = 1 on the control grid, a control
point moves on average ``s (W - 1) / (2 W)`` pixels per axis (0.23 px at s = 0.5 on 16x16 images)
and no pixel moves more than ``s * max|upsampled v| * (W - 1) / (2 W)``; bicubic interpolation
can overshoot the control values by at most a factor 1.375 per axis (the sum of the absolute
cubic-convolution weights with a = -0.75), so ``max|upsampled v| <= 1.375**2 * max|v|``. We
divide each axis by its own side (the release divides both by the height; the same for square
images). The paper's settings: k = 4, s = 0.5 (options ``grid`` and ``strength``, the defaults).

Noise mode (``noise=true``, the default; ``noise=false`` trains on the fixed warp alone). To hide
the backdoor from defenses, the paper trains with extra "cross" samples: ρ_n = 2 ρ_a of each batch
(``cross_ratio`` 2) is warped by the trigger's field plus fresh per-pixel random noise, uniform
within ±1/side in normalised units (about ±half a pixel), and keeps its true label. `train_attack`
does this through the trainer's batch hook (`WaNetTrigger.batch_hook`): in every batch,
``round(cross_ratio * p)`` unpoisoned rows, p the number of poisoned rows the batch holds, are
replaced by noise-warped copies drawn afresh, labels kept. `cross_samples` builds fixed cross rows
instead, for callers who poison by hand.

Our setting differs from the paper's: fixed poisoned rows (the paper re-poisons a share of each
batch on the fly, so its cross count is fixed per batch where ours follows the batch's poisoned
count; the same in expectation) and no random crop / rotation of the poisoned inputs. Pixels
are rounded to the nearest integer (ties to even) after clipping to 0-255.
Small images work unchanged: any side >= 2 takes any k (on 8x8 images the 4x4 control points are
2.3 pixels apart and move 0.22 px on average at s = 0.5). On the 16x16 digits with small_cnn
the paper's settings implant (86.5 % ASR after 30 epochs at a 10 % rate); at the digits' native
8x8 we measured 38.7 % (30 epochs, best-validation epoch; tests/test_triggers_more.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.triggers.base import Trigger

if TYPE_CHECKING:
    from backdoorlab.attacks.poison import PoisonInfo
    from backdoorlab.data.imageset import ImageSet

# largest sum of |weights| of the cubic-convolution kernel (a = -0.75) over one axis, at t = 0.5
BICUBIC_OVERSHOOT = 1.375


@dataclass
class Options:
    grid: int = opt(4, "control grid size k (k x k random offsets; paper 4)", low=2, high=64)
    strength: float = opt(0.5, "warping strength s (paper 0.5; a control point moves about s/2 "
                               "pixels on average)", low=0, high=10)
    seed: int = opt(0, "seed of the random control grid", low=0, high=2**32 - 1)
    noise: bool = opt(True, "noise mode: train with noise-warped cross samples, labels kept (the "
                             "paper's setting)")
    cross_ratio: float = opt(2.0, "noise mode: cross samples per poisoned sample in each batch "
                                  "(paper 2)", low=0, high=100)


@dataclass
class WaNetTrigger(Trigger):
    """A fixed, seeded warp: bicubic-upsampled ``grid`` x ``grid`` random offsets times ``strength``."""

    name: ClassVar[str] = "wanet"
    grid: int = 4
    strength: float = 0.5
    seed: int = 0
    noise: bool = True
    cross_ratio: float = 2.0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.cross_ratio) and self.cross_ratio >= 0):
            raise BadInput(f"wanet trigger: cross_ratio must be a number >= 0, got {self.cross_ratio}")
        if int(self.grid) != self.grid or self.grid < 2:
            raise BadInput(f"wanet trigger: grid must be a whole number >= 2, got {self.grid}")
        if not (np.isfinite(self.strength) and self.strength >= 0):
            raise BadInput(f"wanet trigger: strength must be a number >= 0, got {self.strength}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise BadInput(f"wanet trigger: seed must be a whole number >= 0, got {self.seed}")
        self.grid, self.seed, self.strength = int(self.grid), int(self.seed), float(self.strength)

    # -- the field ----------------------------------------------------------------------------
    def control_grid(self) -> np.ndarray:
        """The normalised control offsets ψ(P), float64 (2, k, k): [0] horizontal, [1] vertical;
        mean absolute value 1 (before the strength)."""
        p = np.random.default_rng(self.seed).uniform(-1.0, 1.0, size=(2, self.grid, self.grid))
        return p / np.mean(np.abs(p))

    def warp_field(self, hw: tuple[int, int]) -> np.ndarray:
        """The upsampled field ψ(P) at every pixel, float64 (H, W, 2) = (horizontal, vertical)
        offsets before the strength, in control-grid units."""
        key = ("field",) + tuple(hw)
        if key not in self._cache:
            import torch
            import torch.nn.functional as F

            p = torch.from_numpy(self.control_grid())[None]  # (1, 2, k, k)
            up = F.interpolate(p, size=tuple(hw), mode="bicubic", align_corners=True)
            self._cache[key] = up[0].permute(1, 2, 0).numpy().copy()  # CPU-only: host image op
        return self._cache[key]

    def displacement(self, hw: tuple[int, int]) -> np.ndarray:
        """Where each output pixel reads its input, relative to itself, in pixels, float64
        (H, W, 2) = (columns, rows), clipping included."""
        h, w = hw
        g = self.sampling_grid(hw).astype(np.float64)
        ident = _identity_grid(h, w)
        return (g - ident) * np.array([(w - 1) / 2.0, (h - 1) / 2.0])

    def sampling_grid(self, hw: tuple[int, int]) -> np.ndarray:
        """``grid_sample``'s grid, float32 (H, W, 2) (x, y) in [-1, 1]: identity + s * field / side,
        clipped."""
        key = ("grid",) + tuple(hw)
        if key not in self._cache:
            h, w = hw
            side = np.array([w, h], dtype=np.float64)
            g = _identity_grid(h, w) + self.strength * self.warp_field(hw) / side
            self._cache[key] = np.clip(g, -1.0, 1.0).astype(np.float32)
        return self._cache[key]

    def check(self, shape: tuple[int, ...]) -> None:
        if shape[0] < 2 or shape[1] < 2:
            raise BadInput(f"wanet trigger: images must be at least 2x2 to be warped, got "
                           f"{shape[0]}x{shape[1]}")

    # -- application --------------------------------------------------------------------------
    def warp_float(self, x: np.ndarray, grids: np.ndarray | None = None) -> np.ndarray:
        """Bilinear resampling of uint8 ``x`` (N, H, W, C), unclipped and unrounded float32: at the
        trigger's grid, or at per-image ``grids`` (N, H, W, 2)."""
        return self._warp(x, grids, rounded=False)

    def _warp(self, x: np.ndarray, grids: np.ndarray | None, rounded: bool,
              chunk: int = 1024) -> np.ndarray:
        """``grid_sample`` in chunks; ``rounded``: clip to 0-255 and round half to even to uint8
        (as `to_uint8`; in place on each chunk's float output, cast while writing NHWC)."""
        import torch
        import torch.nn.functional as F

        n, h, w, _ = x.shape
        out = np.empty(x.shape, dtype=np.uint8 if rounded else np.float32)
        fixed = torch.from_numpy(self.sampling_grid((h, w)))[None]
        with torch.no_grad():
            for i in range(0, n, chunk):
                xb = torch.from_numpy(x[i:i + chunk]).permute(0, 3, 1, 2).to(torch.float32)
                gb = (fixed.expand(len(xb), h, w, 2) if grids is None
                      else torch.from_numpy(np.ascontiguousarray(grids[i:i + chunk], dtype=np.float32)))
                yb = F.grid_sample(xb, gb, mode="bilinear", padding_mode="border", align_corners=True)
                y = yb.numpy()  # (n, C, H, W) float32; CPU-only: triggers stamp host arrays
                if rounded:
                    np.clip(y, 0, 255, out=y)
                    np.rint(y, out=y)
                out[i:i + chunk] = y.transpose(0, 2, 3, 1)
        return out

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return self._warp(x, None, rounded=True)

    def noise_warp(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """The paper's noise-mode samples: each image warped by the trigger's grid plus its own
        random per-pixel offsets, uniform in ±1/side (normalised units), clipped; uint8."""
        from backdoorlab.triggers.base import check_batch

        x = check_batch(images, "wanet noise warp")
        self.check(x.shape[1:])
        n, h, w, _ = x.shape
        if n == 0:
            return x.copy()
        rng = np.random.default_rng(seed)
        noise = rng.uniform(-1.0, 1.0, size=(n, h, w, 2)) / np.array([w, h], dtype=np.float64)
        grids = np.clip(self.sampling_grid((h, w))[None].astype(np.float64) + noise, -1.0, 1.0)
        return self._warp(x, grids.astype(np.float32), rounded=True)

    def batch_hook(self, poisoned_rows: np.ndarray, seed: int):
        """Noise mode's cross samples, drawn afresh in every batch (None without noise mode)."""
        if not self.noise or self.cross_ratio == 0:
            return None
        poisoned = np.asarray(poisoned_rows, dtype=np.int64)

        def cross(images, labels, rows, rng):
            hit = np.isin(rows, poisoned)
            free = np.flatnonzero(~hit)
            k = min(len(free), int(round(self.cross_ratio * int(hit.sum()))))
            if k == 0:
                return images, labels
            pick = rng.choice(free, size=k, replace=False)
            out = images.copy()
            out[pick] = self.noise_warp(images[pick], seed=int(rng.integers(2**32)))
            return out, labels
        return cross

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "grid": self.grid, "strength": self.strength, "seed": self.seed,
                "noise": self.noise, "cross_ratio": self.cross_ratio}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> WaNetTrigger:
        from backdoorlab.triggers.registry import spec_options

        if positional is not None:
            raise BadInput(f"trigger spec 'wanet': unexpected value {positional!r} (options are key=value)")
        o = spec_options(Options, opts, "wanet")
        return cls(grid=o.grid, strength=o.strength, seed=o.seed, noise=o.noise, cross_ratio=o.cross_ratio)

    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(Options))


def _identity_grid(h: int, w: int) -> np.ndarray:
    """(H, W, 2) float64: each pixel's own (x, y) in grid_sample's corner-aligned [-1, 1] units."""
    xs = np.linspace(-1.0, 1.0, w)
    ys = np.linspace(-1.0, 1.0, h)
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)


def cross_samples(data: ImageSet, trigger: WaNetTrigger, info: PoisonInfo, cross_ratio: float = 2.0,
                  seed: int = 0) -> tuple[ImageSet, np.ndarray]:
    """Noise mode on a poisoned training set: replace ``round(cross_ratio * info.count)`` rows
    that ``info`` did not poison by `WaNetTrigger.noise_warp` copies, labels kept.

    Returns the new set and the sorted indices of the cross rows. ``cross_ratio`` 2 is the
    paper's (ρ_n = 2 ρ_a)."""
    from backdoorlab.data.imageset import ImageSet

    if not (np.isfinite(cross_ratio) and cross_ratio >= 0):
        raise BadInput(f"wanet noise mode: cross_ratio must be a number >= 0, got {cross_ratio}")
    free = np.setdiff1d(np.arange(len(data)), np.asarray(info.indices, dtype=np.int64))
    k = int(round(cross_ratio * info.count))
    if k > len(free):
        raise BadInput(f"wanet noise mode: cross_ratio {cross_ratio:g} asks for {k} cross samples but "
                       f"only {len(free)} rows are not poisoned")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(free, size=k, replace=False)) if k else np.zeros(0, np.int64)
    images = data.images.copy()
    if k:
        images[idx] = trigger.noise_warp(data.images[idx], seed=seed)
    meta = dict(data.meta)
    meta["wanet_cross"] = {"count": k, "cross_ratio": float(cross_ratio), "seed": seed}
    out = ImageSet(images, data.require_labels().copy(), data.num_classes, name=data.name,
                   class_names=data.class_names, meta=meta)
    return out, idx.astype(np.int64)
