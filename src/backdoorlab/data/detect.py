"""Format detection and the single entry point `load_dataset`.

A source is ``FORMAT:PATH`` (format forced), a bare ``PATH`` (format detected), or ``digits``.
Each reader lives in its own module and exposes ``is_<fmt>(path) -> bool`` and a reader.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.safe_read import MAX_CLASSES, MAX_DIM, check_int, require_regular_file

# format name -> (module, detector function, reader function); detection tries them in order.
FORMATS: dict[str, tuple[str, str, str]] = {
    "csaw": ("backdoorlab.data.csaw", "is_csaw_h5", "read_csaw_h5"),
    "gtsrb": ("backdoorlab.data.gtsrb", "is_gtsrb", "read_gtsrb"),
    "cifar10": ("backdoorlab.data.cifar", "is_cifar10", "read_cifar10"),
    "mnist": ("backdoorlab.data.mnist", "is_mnist", "read_mnist"),
    "folder": ("backdoorlab.data.folder", "is_class_folder", "read_class_folder"),
    "images": ("backdoorlab.data.folder", "is_image_files", "read_images"),
}


def parse_source(source: str) -> tuple[str | None, str]:
    """Split ``FORMAT:PATH`` into (format, path); a bare path gives (None, path)."""
    if source == "digits":
        return "digits", ""
    head, sep, tail = source.partition(":")
    if sep and (head in FORMATS or head == "digits") and len(head) > 1:
        return head, tail
    return None, source


def detect_format(path: str | Path) -> str:
    """Name the format of ``path`` or raise BadInput listing what was looked for."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder")
    if not p.is_dir():
        require_regular_file(p, "data file")  # a FIFO or device is never opened
    for name, (mod, det, _) in FORMATS.items():
        try:
            detector = getattr(importlib.import_module(mod), det)
        except (ImportError, AttributeError):
            continue
        if detector(p):
            return name
    raise BadInput(f"{p}: unrecognised data format (expected one of: {', '.join(FORMATS)}, "
                   "or 'digits'); force one with FORMAT:PATH")


def load_dataset(source: str, *, format: str | None = None, split: str = "train",
                 size: int | None = None, num_classes: int | None = None, **options) -> ImageSet:
    """Load a data set from ``source`` (see module docstring).

    ``split`` picks train or test where a format holds both (GTSRB, CIFAR-10, MNIST);
    ``size`` resizes images to ``size``×``size`` where the reader supports it (GTSRB default 32,
    digits default 16). Extra ``options`` go to the reader (e.g. ``roi=True`` for GTSRB).
    ``size`` must lie in 1..4096 and ``num_classes`` in 1..10^6; a data set without images is refused.
    """
    fmt, path = parse_source(source)
    fmt = format or fmt
    if size is not None:
        check_int(size, "image size", 1, MAX_DIM)
    if num_classes is not None:
        check_int(num_classes, "class count", 1, MAX_CLASSES)
    if fmt == "digits":
        from backdoorlab.data.digits import load_digits

        return load_digits(size=size or 16, **options)
    if not path:
        raise BadInput(f"data source {source!r}: no path given")
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise BadInput(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)}, digits)")
    if not Path(path).exists():
        raise BadInput(f"{path}: no such file or folder")
    mod, _, reader = FORMATS[fmt]
    read = getattr(importlib.import_module(mod), reader)
    kwargs = dict(options)
    if fmt in ("gtsrb", "cifar10", "mnist"):
        kwargs["split"] = split
    if size is not None and fmt in ("gtsrb", "folder", "images"):
        kwargs["size"] = size
    if num_classes is not None and fmt in ("csaw", "folder"):
        kwargs["num_classes"] = num_classes
    data = read(path, **kwargs)
    if len(data) == 0:
        raise BadInput(f"{path}: the data set holds no images")
    if num_classes is not None and data.num_classes != num_classes:
        if data.labels is not None and len(data.labels) and data.labels.max() >= num_classes:
            raise BadInput(f"{path}: labels reach {int(data.labels.max())}, but {num_classes} "
                           "classes were expected")
        data.num_classes = num_classes
    return data
