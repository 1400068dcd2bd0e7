"""Adaptive-Patch trigger (Qi, Xie, Li, Mahloujifar & Mittal, "Revisiting the Assumption of Latent
Separability for Backdoor Defenses", ICLR 2023).

The patch counterpart of Adaptive-Blend (`adap_blend`): a patch cannot be cut into pieces and stay
a patch, so the trigger is a *set* of ``patches`` distinct small patches at different places, and
the training samples carry only part of the set:

- the patches are ``size`` x ``size`` random colour patterns — every channel of every pixel 0 or
  255, drawn by ``numpy.random.default_rng(seed)``, redrawn until each patch is non-constant and
  differs from the others — placed ``margin`` pixels from the corners, in the order bottom-right,
  top-left, top-right, bottom-left (so 1 to 4 patches);
- payload samples (poisoned rows, relabeled to the target) carry ``per_sample`` of them (default
  one), chosen at random for each image, blended at the training opacity ``train_alpha``:
  ``out = round((1 - a) * x + a * patch)`` on the patch's pixels (float32, ties to even), every
  other pixel unchanged;
- regularisation ("cover") samples, a further ``cover_rate`` share of the training set, get the
  same (their own random patches) and KEEP their true labels;
- at test time (`apply`) ALL patches are stamped at ``test_alpha`` (default 1: pasted).

The random choice of patches is drawn by ``numpy.random.default_rng([seed, call seed, stream])``
(stream 0 payload, 1 cover): deterministic for a seed, different for payload and cover rows.

``size = 0`` (the default) sizes the patches to the images: ``max(2, round(3 * min(H, W) / 16))``
pixels, i.e. 2 on 8x8, 3 on 16x16 (the digits), 6 on 32x32 (CIFAR-10, GTSRB); an explicit size
must be at least 2 (a 1-pixel grey patch cannot be non-constant). Two or more patches need images
of at least ``2 * (size + margin)`` pixels each way (one patch: ``size + margin``); smaller images
are refused by `check` (BadInput).

Settings, the paper's (CIFAR-10, the authors' release) next to ours:

- patches: four different trigger pictures (two small corner logos, a BadNets-like patch and a
  square pattern; black pixels of a picture are not planted) — ours: four seeded random binary
  colour patterns at the four corners, every pixel planted (no pictures ship with backdoorlab);
- training samples: each payload / regularisation sample carries exactly one of the four
  triggers, each trigger on an equal share of the rows — ours: ``per_sample = 1`` random patch per
  row (equal shares on average, not exactly), and more per row if asked;
- opacity: the training triggers are blended at an opacity of their own (0.5, 0.2, 0.5, 0.3) —
  ours: one ``train_alpha = 0.5`` for every patch;
- test time: the release's CIFAR-10 configuration pastes two triggers at opacity 1 (one of the
  training pictures and another at a position not used in training; GTSRB: two training
  pictures) — ours: all ``patches`` at ``test_alpha = 1``, at their training positions;
- rates: 0.3 % payload samples and 0.6 % regularisation samples (150 + 300 of 50,000; GTSRB
  0.5 % + 1 %) — our ``cover_rate = 0.006`` is the paper's CIFAR-10 value; it is a share of the
  whole training set, so scale it with the poisoning ``--rate`` you use (the paper's ratio is
  2 regularisation : 1 payload).

On the 16x16 digits (small_cnn, 10 % payload rate, 30 epochs; tests/test_triggers_adaptive.py)
the paper's trigger settings implant: ASR 100 %, clean 98.2 % with the default cover rate (7
cover rows); with the paper's 2:1 ratio (``cover_rate=0.2``) ASR 100 %, clean 97.3 %, and one
patch at the training opacity fires on 13 % of the test images instead of 40 %. At the digits'
native 8x8 (2x2 patches, one run each): ASR 100 % and 99.5 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.triggers.adap_blend import _unit, _whole, random_subsets, seed_words
from backdoorlab.triggers.base import Trigger, check_batch, to_uint8

PAYLOAD, COVER = 0, 1  # random streams of the patch draws
CORNERS = ("br", "tl", "tr", "bl")


@dataclass
class Options:
    patches: int = opt(4, "how many distinct patches, at the corners br, tl, tr, bl (paper 4)", low=1, high=4)
    size: int = opt(0, "patch side in pixels, at least 2; 0 = about 3/16 of the shorter image side",
                    low=0, high=256)
    margin: int = opt(1, "pixels between a patch and the image edges", low=0, high=256)
    per_sample: int = opt(1, "patches planted on each payload / cover sample, chosen at random (paper 1)",
                          low=1, high=4)
    train_alpha: float = opt(0.5, "opacity of the patches on payload and cover samples (paper 0.2-0.5)",
                             low=0, high=1)
    test_alpha: float = opt(1.0, "opacity of all the patches at test time (paper 1)", low=0, high=1)
    cover_rate: float = opt(0.006, "share of the training set given patches with their labels kept "
                                   "(paper 0.006 on CIFAR-10, twice its poisoning rate)", low=0, high=1)
    seed: int = opt(0, "seed of the patch patterns and of the random choice of patches", low=0,
                    high=2**32 - 1)


@dataclass
class AdaptivePatchTrigger(Trigger):
    """``patches`` seeded random patches at the corners: all at ``test_alpha`` (`apply`),
    ``per_sample`` random ones at ``train_alpha`` on payload and cover samples.

    ``cover_rate`` is keyword-only (it overrides the base class's class attribute; as an ordinary
    field it would come first in the constructor)."""

    name: ClassVar[str] = "adap-patch"
    patches: int = 4
    size: int = 0
    margin: int = 1
    per_sample: int = 1
    train_alpha: float = 0.5
    test_alpha: float = 1.0
    seed: int = 0
    cover_rate: float = field(default=0.006, kw_only=True)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = "adap-patch trigger"
        for key, lo in (("patches", 1), ("size", 0), ("margin", 0), ("per_sample", 1), ("seed", 0)):
            setattr(self, key, _whole(getattr(self, key), key, where, lo))
        if self.patches > len(CORNERS):
            raise BadInput(f"{where}: patches must be a whole number in 1..{len(CORNERS)} (one per "
                           f"corner), got {self.patches}")
        if self.size == 1:
            raise BadInput(f"{where}: size must be 0 (automatic) or at least 2, got 1")
        if self.per_sample > self.patches:
            raise BadInput(f"{where}: per_sample ({self.per_sample}) cannot exceed patches "
                           f"({self.patches})")
        for key in ("train_alpha", "test_alpha", "cover_rate"):
            setattr(self, key, _unit(getattr(self, key), key, where))

    # -- layout --

    def side(self, shape: tuple[int, ...]) -> int:
        """The patch side for images of ``shape`` (``size``, or the automatic one when 0)."""
        return self.size or max(2, int(round(3 * min(shape[0], shape[1]) / 16)))

    def check(self, shape: tuple[int, ...]) -> None:
        h, w = shape[:2]
        s = self.side(shape)
        need = (s + self.margin) * (2 if self.patches > 1 else 1)
        if h < need or w < need:
            many = f"{self.patches} patches" if self.patches > 1 else "a patch"
            raise BadInput(f"adap-patch trigger: {many} of {s}x{s} pixels, {self.margin} from the "
                           f"corners, need images of at least {need}x{need} pixels, got {h}x{w}")

    def layout(self, shape: tuple[int, ...]) -> list[tuple[int, int, np.ndarray]]:
        """``(row, col, stamp)`` of every patch for images of ``shape`` (H, W, C); stamps are
        (s, s, C) uint8."""
        key = tuple(int(v) for v in shape)
        if key not in self._cache:
            self.check(key)
            h, w, c = key
            s, m = self.side(key), self.margin
            rng = np.random.default_rng(seed_words(self.seed))
            stamps: list[np.ndarray] = []
            while len(stamps) < self.patches:  # s >= 2: at least 14 candidates for 4 patches
                p = rng.integers(0, 2, size=(s, s, c), dtype=np.uint8) * np.uint8(255)
                if p.min() != p.max() and not any(np.array_equal(p, q) for q in stamps):
                    stamps.append(p)
            out = []
            for corner, stamp in zip(CORNERS, stamps, strict=False):
                row = m if corner[0] == "t" else h - m - s
                col = m if corner[1] == "l" else w - m - s
                out.append((row, col, stamp))
            self._cache[key] = out
        return self._cache[key]

    def stamp(self, x: np.ndarray, chosen: np.ndarray, alpha: float) -> np.ndarray:
        """Blend patch j at ``alpha`` on the images where ``chosen[:, j]`` (N, patches) bool."""
        out = x.copy()
        a = np.float32(alpha)
        for j, (row, col, p) in enumerate(self.layout(x.shape[1:])):
            rows = np.flatnonzero(chosen[:, j])
            if not len(rows):
                continue
            s = p.shape[0]
            region = out[rows, row:row + s, col:col + s, :].astype(np.float32)
            out[rows, row:row + s, col:col + s, :] = to_uint8((np.float32(1.0) - a) * region
                                                              + a * p.astype(np.float32))
        return out

    def draw_patches(self, n: int, seed: int, stream: int) -> np.ndarray:
        """(n, patches) bool: the patches each of ``n`` training images carries."""
        rng = np.random.default_rng(seed_words(self.seed, seed, stream))
        return random_subsets(rng, n, self.patches, self.per_sample)

    def partial(self, images: np.ndarray, seed: int, stream: int) -> np.ndarray:
        """Payload (``stream`` 0) or cover (1) samples: ``per_sample`` random patches at
        ``train_alpha``."""
        x = check_batch(images, f"{self.name} trigger")
        self.check(x.shape[1:])
        if len(x) == 0:
            return x.copy()
        return self.stamp(x, self.draw_patches(len(x), seed, stream), self.train_alpha)

    # -- the Trigger interface --

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return self.stamp(x, np.ones((len(x), self.patches), dtype=bool), self.test_alpha)

    def poison(self, images: np.ndarray, seed: int) -> np.ndarray:
        return self.partial(images, seed, PAYLOAD)

    def cover(self, images: np.ndarray, seed: int) -> np.ndarray:
        return self.partial(images, seed, COVER)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "patches": self.patches, "size": self.size, "margin": self.margin,
                "per_sample": self.per_sample, "train_alpha": self.train_alpha,
                "test_alpha": self.test_alpha, "cover_rate": self.cover_rate, "seed": self.seed}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> AdaptivePatchTrigger:
        from backdoorlab.triggers.registry import spec_options

        if positional is not None:
            raise BadInput(f"trigger spec 'adap-patch': unexpected value {positional!r} (options are "
                           "key=value)")
        o = spec_options(Options, opts, "adap-patch")
        return cls(patches=o.patches, size=o.size, margin=o.margin, per_sample=o.per_sample,
                   train_alpha=o.train_alpha, test_alpha=o.test_alpha, cover_rate=o.cover_rate, seed=o.seed)

    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(Options))
