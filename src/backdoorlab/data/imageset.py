"""`ImageSet`: the one in-memory form of a data set (uint8 NHWC images + int64 labels)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.safe_read import MAX_CLASSES

# meta entries that hold one value per image (kept aligned by `ImageSet.subset`)
PER_IMAGE_META = ("targets", "files", "source_indices")


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)`` with int64 labels ``(N,)``.

    ``labels`` is ``None`` for unlabeled images (e.g. files to classify). ``num_classes`` is the
    class count of the task, which may exceed ``labels.max() + 1`` for a subset. Pixels stay uint8
    until a ``Classifier`` converts them with its own input spec.
    """

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int
    name: str = ""
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        x = self.images
        where = self.name or "data set"
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise BadInput(f"{where}: images must be a 4-D array (N, H, W, C), got shape "
                           f"{getattr(x, 'shape', None)}")
        if x.dtype != np.uint8:
            raise BadInput(f"{where}: images must be uint8 0-255, got {x.dtype}")
        if x.shape[3] not in (1, 3):
            raise BadInput(f"{where}: images must have 1 or 3 channels last, got shape {x.shape}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise BadInput(f"{where}: images of {x.shape[1]}x{x.shape[2]} pixels (shape {x.shape}); "
                           "an image needs at least one pixel")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise BadInput(f"{where}: class count must lie in 1..{MAX_CLASSES:,}, got {self.num_classes}")
        if self.labels is not None:
            y = self.labels
            if y.ndim != 1 or len(y) != len(x):
                raise BadInput(f"{where}: {len(x)} images but labels of shape {y.shape}")
            if y.dtype != np.int64:
                self.labels = y = y.astype(np.int64)
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise BadInput(f"{where}: labels must lie in [0, {self.num_classes - 1}], found "
                               f"{int(y.min())}..{int(y.max())}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape ``(H, W, C)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise BadInput(f"{self.name or 'data set'}: labels are needed but this data has none")
        return self.labels

    def subset(self, index: np.ndarray | slice, name: str | None = None) -> ImageSet:
        """A new ImageSet with the selected rows (index array, boolean mask or slice).

        Per-image entries of ``meta`` (``PER_IMAGE_META``) are sliced along with the images.
        """
        meta = dict(self.meta)
        for key in PER_IMAGE_META:
            if key in meta and len(meta[key]) == len(self.images):
                meta[key] = np.asarray(meta[key])[index]
                if key in ("files", "source_indices"):
                    meta[key] = meta[key].tolist()
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            num_classes=self.num_classes,
            name=self.name if name is None else name,
            class_names=self.class_names,
            meta=meta,
        )

    def split(self, fraction: float, seed: int = 0, stratify: bool = True) -> tuple[ImageSet, ImageSet]:
        """Deterministically split off ``fraction`` of the rows: returns ``(rest, part)``.

        Stratified by label when labels exist, so every class keeps its share.
        """
        if not 0.0 < fraction < 1.0:
            raise BadInput(f"split fraction must be in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        n = len(self)
        if stratify and self.labels is not None:
            part_idx = []
            for c in np.unique(self.labels):
                idx = np.flatnonzero(self.labels == c)
                rng.shuffle(idx)
                k = int(round(len(idx) * fraction))
                part_idx.append(idx[:k])
            part = np.sort(np.concatenate(part_idx)) if part_idx else np.array([], dtype=np.int64)
        else:
            perm = rng.permutation(n)
            part = np.sort(perm[: int(round(n * fraction))])
        mask = np.zeros(n, dtype=bool)
        mask[part] = True
        base = self.name or "data"
        return self.subset(~mask, f"{base}[rest]"), self.subset(mask, f"{base}[split]")

    def take(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random subset of at most ``n`` rows (order kept)."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.subset(idx)

    def label_histogram(self) -> np.ndarray:
        return np.bincount(self.require_labels(), minlength=self.num_classes)
