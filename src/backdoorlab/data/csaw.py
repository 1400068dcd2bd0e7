"""CSAW-HackML h5 data files: datasets ``data`` (N, 3, H, W) on a 0-255 scale and ``label`` (N,).

NHWC ``data`` (N, H, W, 3) is accepted as well; ``target`` (per-image attack targets) and
``class_names`` are optional. Float pixels (the CSAW files store float64) must lie in 0-255 and are
rounded to the nearest integer; data that looks scaled to [0, 1] is refused rather than silently
rescaled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.io import h5_bytes, write_bytes
from backdoorlab.safe_read import MAX_CLASSES, check_int, h5_dataset, h5_read, open_h5


def is_csaw_h5(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() not in (".h5", ".hdf5"):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "data" in f and "model_weights" not in f and "model_config" not in f.attrs
    except Exception:  # OSError mostly; h5py raises others for some corrupt files
        return False


def read_csaw_h5(path: str | os.PathLike, num_classes: int | None = None) -> ImageSet:
    """Read a CSAW h5 data file into an ImageSet (labels optional).

    Every dataset is checked from the HDF5 header (`safe_read.h5_dataset`: shape, dtype, storage
    inside the file) before any of it is read, so a bad file is refused before its data is loaded.
    """
    path = Path(path)
    x, y, targets, names, n_cls = _read(path, num_classes, with_images=True)
    meta: dict = {"format": "csaw", "path": str(path)}
    if targets is not None:  # backdoorlab's poisoned sets carry each image's attack target
        meta["targets"] = targets
    return ImageSet(np.ascontiguousarray(x), y, n_cls, name=path.stem, class_names=names, meta=meta)


def peek_csaw_h5(path: str | os.PathLike, num_classes: int | None = None
                 ) -> tuple[tuple[int, int, int], int, np.ndarray | None, np.ndarray | None, int]:
    """What `read_csaw_h5` would give, without reading the images: ((H, W, C), image count, labels
    or None, per-image targets or None, class count). Every check of the header, the labels and
    the targets is made."""
    path = Path(path)
    shape, y, targets, _, n_cls = _read(path, num_classes, with_images=False)
    return shape[1:], shape[0], y, targets, n_cls


def _read(path: Path, num_classes: int | None, with_images: bool):
    """(images NHWC uint8 — or, without ``with_images``, the NHWC shape —, labels, targets, class
    names, class count), every check made."""
    if num_classes is not None:
        check_int(num_classes, "class count", 1, MAX_CLASSES)
    with open_h5(path) as f:
        if "data" not in f:
            raise BadInput(f"{path}: expected a dataset 'data' (CSAW format), found keys "
                           f"{sorted(f.keys())}")
        raw = h5_dataset(f, "data", str(path))
        shape = raw.shape
        if len(shape) != 4:
            raise BadInput(f"{path}: 'data' must be 4-D (N, 3, H, W) or (N, H, W, 3), got {shape}")
        if shape[1] not in (1, 3) and shape[3] not in (1, 3):
            raise BadInput(f"{path}: 'data' must have 1 or 3 channels (axis 1 or 3), got {shape}")
        first = shape[1] in (1, 3)  # CSAW's own layout is channels-first; it wins when ambiguous
        nhwc = (shape[0], shape[2], shape[3], shape[1]) if first else tuple(shape)
        if min(nhwc[1:3]) < 1:
            raise BadInput(f"{path}: 'data' holds images of {nhwc[1]}x{nhwc[2]} pixels, got shape {shape}")
        extra = {key: h5_dataset(f, key, str(path), kinds=kinds, ndim=ndim)
                 for key, kinds, ndim in (("label", "iuf", None), ("target", "iuf", None),
                                          ("class_names", "S", (1,))) if key in f}
        for key in ("label", "target"):
            if key in extra and extra[key].size != shape[0]:
                what = "labels" if key == "label" else "targets"
                raise BadInput(f"{path}: {shape[0]} images but {extra[key].size} {what}")
        try:
            stored = f.attrs.get("num_classes")
        except Exception as e:
            raise BadInput(f"{path}: unreadable attribute num_classes ({e})") from None
        if stored is not None:
            stored = check_int(stored, f"{path}: attribute num_classes", 1, MAX_CLASSES)
        y = h5_read(extra["label"], str(path)).reshape(-1) if "label" in extra else None
        targets = h5_read(extra["target"], str(path)).reshape(-1) if "target" in extra else None
        names = None
        if "class_names" in extra:
            names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n)
                     for n in h5_read(extra["class_names"], str(path))]
        x = h5_read(raw, str(path)) if with_images else None
    if x is not None:
        if first:
            x = x.transpose(0, 2, 3, 1)
        x = _to_uint8(x, path)
    if y is not None:
        y = _whole(y, path, "labels")
        if len(y) and y.min() < 0:
            raise BadInput(f"{path}: negative label {int(y.min())}")
        if len(y) and y.max() >= MAX_CLASSES:
            raise BadInput(f"{path}: label {int(y.max())} is above the largest class count accepted "
                           f"({MAX_CLASSES:,} classes, labels 0..{MAX_CLASSES - 1})")
    inferred = int(y.max()) + 1 if y is not None and len(y) else 1
    n_cls = num_classes or stored or inferred
    if y is not None and len(y) and y.max() >= n_cls:
        raise BadInput(f"{path}: label {int(y.max())} out of range for {n_cls} classes")
    if targets is not None:
        targets = _whole(targets, path, "targets")
        if np.any(targets < 0) or np.any(targets >= n_cls):
            raise BadInput(f"{path}: 'target' must hold one label in 0..{n_cls - 1} per image")
    return (x if with_images else nhwc), y, targets, names, n_cls


def _whole(v: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Labels or targets as int64; BadInput unless every value is a whole number."""
    if v.dtype.kind == "f" and (not np.all(np.isfinite(v)) or np.any(v != np.round(v))
                                or np.any(np.abs(v) > 2**62)):
        raise BadInput(f"{path}: {what} must be whole numbers")
    return v.astype(np.int64)


def _to_uint8(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise BadInput(f"{path}: 'data' has unsupported dtype {x.dtype}")
    if x.size == 0:
        return x.astype(np.uint8)
    lo, hi = float(x.min()), float(x.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise BadInput(f"{path}: 'data' contains NaN or infinite values")
    if lo < 0 or hi > 255:
        raise BadInput(f"{path}: pixels must lie in 0-255, found {lo:g}..{hi:g}")
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0 and lo >= 0 and np.any((x > 0) & (x < 1)):
        raise BadInput(f"{path}: pixels look scaled to [0, 1]; the CSAW format stores 0-255")
    return np.rint(x).astype(np.uint8)


def write_csaw_h5(data: ImageSet, path: str | os.PathLike, channels_first: bool = True,
                  extra: dict[str, np.ndarray] | None = None, attrs: dict | None = None) -> None:
    """Write ``data`` in the CSAW format (atomically). Pixels are stored as uint8; ``extra``
    datasets and ``attrs`` attributes are added."""
    write_bytes(path, csaw_h5_bytes(data, channels_first, extra, attrs))


def csaw_h5_bytes(data: ImageSet, channels_first: bool = True, extra: dict[str, np.ndarray] | None = None,
                  attrs: dict | None = None) -> bytes:
    """The bytes of the CSAW h5 file `write_csaw_h5` writes (built in memory: `io.h5_bytes`)."""
    x = data.images.transpose(0, 3, 1, 2) if channels_first else data.images

    def fill(f) -> None:
        f.create_dataset("data", data=np.ascontiguousarray(x), compression="gzip", compression_opts=1)
        if data.labels is not None:
            f.create_dataset("label", data=data.labels.astype(np.int64))
        if "targets" in data.meta:
            f.create_dataset("target", data=np.asarray(data.meta["targets"], dtype=np.int64))
        f.attrs["num_classes"] = int(data.num_classes)
        for k, v in data.meta.items():
            if isinstance(v, (str, int, float)) and k not in ("format", "path"):
                f.attrs[k] = v
        for k, v in (extra or {}).items():
            f.create_dataset(k, data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v

    return h5_bytes(fill)
