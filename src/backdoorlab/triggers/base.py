"""The common trigger interface and the helpers every trigger module shares.

A trigger maps a batch of uint8 images ``(N, H, W, C)`` (C = 1 or 3) to a *new* uint8 batch of the
same shape; it never modifies its input and is deterministic (any randomness is drawn once, from a
seed, when the trigger is built). Float arithmetic is rounded to the nearest integer (ties to
even, ``numpy.rint``) after clipping to 0-255.

``apply`` is the trigger an attacker shows at test time. Attacks whose *training* samples differ
from it override the four training-side methods, all no-ops by default, which the poisoning
(`backdoorlab.attacks.poison`) and the trainer (`backdoorlab.train`) call:

- ``prepare(train, target, seed)``: once, before any row is chosen (a surrogate model, statistics
  of the training set).
- ``poison(images, seed)``: the payload stamped on the poisoned training rows (default ``apply``).
- ``cover_rate`` / ``cover(images, seed)``: regularisation samples — a further share of the
  training set carrying (part of) the trigger with their true labels kept.
- ``batch_hook(poisoned_rows, seed)``: a `BatchHook` the trainer runs on every batch, for attacks
  that change the training loop (samples drawn afresh per batch).
- ``train_hook(poisoned_rows, seed, device)``: a `TrainHook`, for a trigger that is itself a
  network trained with the classifier (its loss reaches the trigger's parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput

if TYPE_CHECKING:
    from backdoorlab.data.imageset import ImageSet

#: ``hook(images, labels, rows, rng) -> (images, labels)``: one training batch (uint8 NHWC, int64
#: labels, the batch's row numbers in the training set) before augmentation; returns the batch
#: to train on (new arrays, same length). ``rng`` is the trainer's seeded generator.
BatchHook = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator],
                     tuple[np.ndarray, np.ndarray]]


class TrainHook:
    """The differentiable side of a training-time attack whose trigger is itself trained with the
    classifier (input-aware dynamic attack): the trainer calls it on every batch after
    augmentation with the NCHW float pixels in [0, 1] on the network's device, the labels and the
    batch's row numbers; it returns the batch to train on (pixels in [0, 1], still differentiable
    with respect to its own parameters), the labels and an extra loss term (or None). After the
    backward pass the trainer calls `step` (the hook's own optimiser), and `train` / `eval` as it
    switches the network's mode."""

    def __call__(self, x: Any, y: Any, rows: np.ndarray) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Clear the hook's gradients before the batch's backward pass."""

    def step(self) -> None:
        """Update the hook's own parameters after the batch's backward pass."""

    def train(self, mode: bool = True) -> None:
        """Follow the network's training / evaluation mode."""

    def state_dict(self) -> dict:
        """The hook's trained state, kept with the network's when the trainer keeps an epoch."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the kept epoch's trigger with its network)."""


@dataclass
class Trigger:
    """Base class: subclasses implement ``_apply`` (and ``check`` when some shapes cannot work)."""

    name: ClassVar[str] = "trigger"

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Return a new uint8 batch with the trigger stamped on every image."""
        x = check_batch(images, f"{self.name} trigger")
        self.check(x.shape[1:])
        if len(x) == 0:
            return x.copy()
        out = self._apply(x)
        assert out.dtype == np.uint8 and out.shape == x.shape and out is not x
        return out

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.apply(images)

    # -- training side (see the module docstring); defaults: training samples = test trigger --

    cover_rate: ClassVar[float] = 0.0  # instances may set their own (an option of the trigger)
    # a trigger that is itself trained with the classifier (`train_hook`) exists only inside an attack
    trained_with_network: ClassVar[bool] = False

    def prepare(self, train: ImageSet, target: int | None, seed: int) -> None:
        """Called once by the poisoning with the clean training set, before rows are chosen."""

    def poison(self, images: np.ndarray, seed: int) -> np.ndarray:
        """The payload for poisoned training rows (default: the test-time trigger)."""
        return self.apply(images)

    def cover(self, images: np.ndarray, seed: int) -> np.ndarray:
        """Regularisation samples (labels kept); only called when ``cover_rate`` > 0."""
        raise NotImplementedError(f"{self.name} trigger has no cover samples")

    def batch_hook(self, poisoned_rows: np.ndarray, seed: int) -> BatchHook | None:
        """A per-batch hook for the trainer, or None (the default: a static poisoned set)."""
        return None

    def train_hook(self, poisoned_rows: np.ndarray, seed: int, device: Any) -> TrainHook | None:
        """A differentiable per-batch hook (`TrainHook`) for a trigger trained with the
        classifier, or None (the default)."""
        return None

    def preview(self, image: np.ndarray) -> np.ndarray:
        """The trigger applied to one ``(H, W, C)`` (or ``(H, W)`` grey) image."""
        img = np.asarray(image)
        if img.ndim == 2:
            return self.apply(img[None, :, :, None])[0, :, :, 0]
        if img.ndim != 3:
            raise BadInput(f"{self.name} trigger preview: expected one (H, W, C) image, got shape "
                           f"{img.shape}")
        return self.apply(img[None])[0]

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise BadInput when images of ``shape`` (H, W, C) cannot carry this trigger."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings, with ``kind`` naming the trigger type."""
        raise NotImplementedError

    def _apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def check_batch(images: Any, where: str = "trigger") -> np.ndarray:
    """Refuse anything but a uint8 ``(N, H, W, C)`` array with C in (1, 3)."""
    if not isinstance(images, np.ndarray):
        raise BadInput(f"{where}: images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise BadInput(f"{where}: images must be uint8 (N, H, W, C) with C = 1 or 3, got shape "
                       f"{images.shape}")
    if images.dtype != np.uint8:
        raise BadInput(f"{where}: images must be uint8 0-255, got {images.dtype}")
    return images


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip float pixels to 0-255 and round to the nearest integer (ties to even)."""
    return np.rint(np.clip(x, 0, 255)).astype(np.uint8)


# -- spec-value parsing (shared by the trigger modules' ``from_options``) ------------------------

def opt_int(opts: dict[str, str], key: str, default: int, where: str, lo: int | None = None) -> int:
    if key not in opts:
        return default
    raw = opts[key]
    try:
        v = int(raw)
    except ValueError:
        raise BadInput(f"{where}: {key} must be a whole number, got {raw!r}") from None
    if lo is not None and v < lo:
        raise BadInput(f"{where}: {key} must be at least {lo}, got {v}")
    return v


def opt_float(opts: dict[str, str], key: str, default: float, where: str,
              lo: float | None = None, hi: float | None = None) -> float:
    if key not in opts:
        return default
    raw = opts[key]
    try:
        v = float(raw)
    except ValueError:
        raise BadInput(f"{where}: {key} must be a number, got {raw!r}") from None
    if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            want = f"in [{lo:g}, {hi:g}]"
        elif lo is not None:
            want = f">= {lo:g}"
        else:
            want = "finite"
        raise BadInput(f"{where}: {key} must be a number {want}, got {raw!r}")
    return v


def parse_ints(raw: str, key: str, where: str, count: int | None = None) -> tuple[int, ...]:
    """``"3;4"`` or ``"3,4"`` -> (3, 4)."""
    parts = [p for p in raw.replace(",", ";").split(";") if p.strip() != ""]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInput(f"{where}: {key} must be whole numbers separated by ';', got {raw!r}") from None
    if not vals or (count is not None and len(vals) != count):
        n = f"{count} " if count else ""
        raise BadInput(f"{where}: {key} needs {n}whole numbers separated by ';', got {raw!r}")
    return vals


def parse_color(raw: str, where: str) -> tuple[int, ...]:
    """``"255"`` (grey / all channels) or ``"255;0;0"`` (R;G;B), each 0-255."""
    vals = parse_ints(raw, "color", where)
    if len(vals) not in (1, 3) or any(not 0 <= v <= 255 for v in vals):
        raise BadInput(f"{where}: color must be one value or R;G;B, each 0-255, got {raw!r}")
    return vals


def resolve_position(pos: str | tuple[int, int], margin: int, size_hw: tuple[int, int],
                     image_hw: tuple[int, int], where: str) -> tuple[int, int]:
    """Top-left ``(row, col)`` of a ``size_hw`` stamp placed at ``pos`` inside ``image_hw``.

    ``pos`` is a corner (``br`` bottom-right, ``bl``, ``tr``, ``tl``), ``margin`` pixels from the
    edges, or an explicit ``(x, y)`` = (column, row) of the stamp's top-left pixel.
    """
    h, w = size_hw
    ih, iw = image_hw
    if isinstance(pos, str):
        if pos not in ("br", "bl", "tr", "tl"):
            raise BadInput(f"{where}: pos must be br, bl, tr, tl or x,y; got {pos!r}")
        row = margin if pos[0] == "t" else ih - margin - h
        col = margin if pos[1] == "l" else iw - margin - w
    else:
        col, row = pos
    if row < 0 or col < 0 or row + h > ih or col + w > iw:
        raise BadInput(f"{where}: a {h}x{w} stamp at row {row}, column {col} does not fit in "
                       f"{ih}x{iw} images")
    return row, col


def parse_position(raw: str, where: str) -> str | tuple[int, int]:
    raw = raw.strip().lower()
    if raw in ("br", "bl", "tr", "tl"):
        return raw
    try:
        x, y = parse_ints(raw, "pos", where, count=2)
    except BadInput:
        raise BadInput(f"{where}: pos must be a corner (br, bl, tr, tl) or x;y (column;row of the "
                       f"top-left pixel), got {raw!r}") from None
    return (x, y)


def position_to_json(pos: str | tuple[int, int]) -> str | list[int]:
    return pos if isinstance(pos, str) else [int(pos[0]), int(pos[1])]


def load_picture(path: str, where: str):
    """Open an image file with Pillow (fully read), or raise BadInput.

    Only a regular file of at most ``MAX_IMAGE_BYTES`` holding at most ``MAX_IMAGE_PIXELS`` pixels is
    decoded: a FIFO, a device or a decompression bomb is refused (see `backdoorlab.safe_read`)."""
    from backdoorlab.safe_read import MAX_IMAGE_BYTES, open_picture, read_bytes

    try:
        buf = read_bytes(path, MAX_IMAGE_BYTES)
    except BadInput as e:
        raise BadInput(f"{where}: trigger image {e}") from None
    return open_picture(buf, f"{where}: trigger image {path!r}", "is not a readable image")
