"""What a data source holds — image shape, class count, labels — read from its metadata only.

`peek_dataset` answers for `backdoorlab run`, which checks every cell's inputs before it starts
(a bad file must cost no training): the format is detected as `load_dataset` does it, a CSAW h5
file is checked from its HDF5 header and its label array (the images are not read), an MNIST file
from its IDX header; GTSRB, CIFAR-10 and the digits have a fixed shape and class count. A folder
of images gives its class count (the subfolders) but not its shape, which would need every file:
``shape`` is then None and the checks that need it wait for the cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backdoorlab.data.detect import FORMATS, detect_format, parse_source
from backdoorlab.errors import BadInput
from backdoorlab.safe_read import MAX_CLASSES, MAX_DIM, check_int


@dataclass(frozen=True)
class DataInfo:
    source: str
    format: str
    shape: tuple[int, int, int] | None  # (H, W, C) as `load_dataset` would return it; None: unknown
    num_classes: int | None             # None: unknown
    labeled: bool | None                # None: unknown
    max_label: int | None = None        # the largest label, where the labels were read
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)   # where read
    targets: np.ndarray | None = field(default=None, repr=False, compare=False)  # per-image targets

    def label_stand_in(self, name: str = ""):
        """An `ImageSet` of 1x1 black images with this data's labels and targets, for the checks
        that read only those (`backdoorlab.poisoned.poisoned_set`); None when they were not read."""
        from backdoorlab.data.imageset import ImageSet

        if self.labels is None or self.num_classes is None:
            return None
        meta = {} if self.targets is None else {"targets": self.targets}
        return ImageSet(np.zeros((len(self.labels), 1, 1, 1), np.uint8), self.labels, self.num_classes,
                        name=name or Path(self.source).stem, meta=meta)


def peek_dataset(source: str, split: str = "train", size: int | None = None,
                 num_classes: int | None = None) -> DataInfo:
    """The `DataInfo` of ``source`` as ``load_dataset(source, split=split, size=size)`` would read
    it; `BadInput` for what `load_dataset` would refuse from the same metadata (missing file,
    unknown format, corrupt header, labels out of range …)."""
    fmt, path = parse_source(source)
    if size is not None:
        check_int(size, "image size", 1, MAX_DIM)
    if num_classes is not None:
        check_int(num_classes, "class count", 1, MAX_CLASSES)
    if fmt == "digits":
        side = 8 * max(1, (size or 16) // 8)  # as `load_digits` upscales
        return DataInfo(source, "digits", (side, side, 1), num_classes or 10, True, 9)
    if not path:
        raise BadInput(f"data source {source!r}: no path given")
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise BadInput(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)}, digits)")
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{path}: no such file or folder")
    if fmt == "csaw":
        from backdoorlab.data.csaw import peek_csaw_h5

        shape, n, labels, targets, k = peek_csaw_h5(p, num_classes)
        if n == 0:
            raise BadInput(f"{path}: the data set holds no images")
        top = int(labels.max()) if labels is not None and len(labels) else None
        return DataInfo(source, fmt, shape, k, labels is not None, top, labels, targets)
    if fmt == "gtsrb":
        from backdoorlab.data.gtsrb import NUM_CLASSES

        side = size or 32
        return DataInfo(source, fmt, (side, side, 3), NUM_CLASSES, None)
    if fmt == "cifar10":
        return DataInfo(source, fmt, (32, 32, 3), 10, True)
    if fmt == "mnist":
        return DataInfo(source, fmt, _mnist_shape(p, split), 10, True)
    if fmt == "folder":
        from backdoorlab.data.folder import _class_dirs

        if not p.is_dir():
            raise BadInput(f"{p}: is a file, expected a folder of class subfolders")
        classes = _class_dirs(p)
        if not classes:
            raise BadInput(f"{p}: no class subfolders (expected ROOT/<class>/<image files>)")
        if num_classes is not None and num_classes < len(classes):
            raise BadInput(f"{p}: {len(classes)} class subfolders but {num_classes} classes were given")
        return DataInfo(source, fmt, None, num_classes or len(classes), True, len(classes) - 1)
    return DataInfo(source, fmt, None, num_classes or 1, False)  # loose images: unlabeled


def _mnist_shape(p: Path, split: str) -> tuple[int, int, int] | None:
    from backdoorlab.data import mnist

    if p.is_dir():
        d = mnist._folder(p)
        f = mnist._find(d, mnist._PREFIX.get(split, "train"), "images") if d is not None else None
    else:
        f = p
    if f is None:
        return None  # the reader names what is missing
    _, h, w = mnist.idx_shape(f, ndim=3)
    return (h, w, 1)
