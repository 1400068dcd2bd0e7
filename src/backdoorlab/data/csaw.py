"""CSAW-HackML h5 data files: datasets ``data`` (N, 3, H, W) on a 0-255 scale and ``label`` (N,).

NHWC ``data`` (N, H, W, 3) is accepted as well. Float pixels (the CSAW files store float64) must
lie in 0-255 and are rounded to the nearest integer; data that looks scaled to [0, 1] is refused
rather than silently rescaled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.io import atomic_path


def is_csaw_h5(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() not in (".h5", ".hdf5"):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "data" in f and "model_weights" not in f and "model_config" not in f.attrs
    except OSError:
        return False


def read_csaw_h5(path: str | os.PathLike, num_classes: int | None = None) -> ImageSet:
    """Read a CSAW h5 data file into an ImageSet (labels optional)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise BadInput(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "data" not in f:
            raise BadInput(f"{path}: expected a dataset 'data' (CSAW format), found keys "
                           f"{sorted(f.keys())}")
        raw = f["data"]
        if not hasattr(raw, "shape"):
            raise BadInput(f"{path}: 'data' is a group, expected an array")
        try:
            x = np.asarray(raw[()])
            y = np.asarray(f["label"][()]) if "label" in f else None
            names = None
            if "class_names" in f:
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["class_names"][()]]
            stored_classes = int(f.attrs["num_classes"]) if "num_classes" in f.attrs else None
            targets = np.asarray(f["target"][()]).reshape(-1) if "target" in f else None
        except (OSError, KeyError, ValueError) as e:
            raise BadInput(f"{path}: corrupt HDF5 content ({e})") from None
    if x.ndim != 4:
        raise BadInput(f"{path}: 'data' must be 4-D (N, 3, H, W) or (N, H, W, 3), got {x.shape}")
    if x.shape[1] in (1, 3):  # CSAW's own layout is channels-first; it wins when ambiguous
        x = x.transpose(0, 2, 3, 1)
    elif x.shape[3] not in (1, 3):
        raise BadInput(f"{path}: 'data' must have 1 or 3 channels (axis 1 or 3), got {x.shape}")
    x = _to_uint8(x, path)
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise BadInput(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
        if not np.all(np.isfinite(y.astype(np.float64))) or np.any(y != np.round(y)):
            raise BadInput(f"{path}: labels must be whole numbers")
        y = y.astype(np.int64)
        if len(y) and y.min() < 0:
            raise BadInput(f"{path}: negative label {int(y.min())}")
    inferred = int(y.max()) + 1 if y is not None and len(y) else 1
    n_cls = num_classes or stored_classes or inferred
    if y is not None and len(y) and y.max() >= n_cls:
        raise BadInput(f"{path}: label {int(y.max())} out of range for {n_cls} classes")
    meta: dict = {"format": "csaw", "path": str(path)}
    if targets is not None:  # backdoorlab's poisoned sets carry each image's attack target
        if targets.shape[0] != x.shape[0] or np.any(targets < 0) or np.any(targets >= n_cls):
            raise BadInput(f"{path}: 'target' must hold one label in 0..{n_cls - 1} per image")
        meta["targets"] = targets.astype(np.int64)
    return ImageSet(np.ascontiguousarray(x), y, n_cls, name=path.stem, class_names=names, meta=meta)


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


def write_csaw_h5(data: ImageSet, path: str | os.PathLike, channels_first: bool = True) -> None:
    """Write ``data`` in the CSAW format (atomically). Pixels are stored as uint8."""
    import h5py

    x = data.images.transpose(0, 3, 1, 2) if channels_first else data.images
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=np.ascontiguousarray(x), compression="gzip",
                             compression_opts=1)
            if data.labels is not None:
                f.create_dataset("label", data=data.labels.astype(np.int64))
            if "targets" in data.meta:
                f.create_dataset("target", data=np.asarray(data.meta["targets"], dtype=np.int64))
            f.attrs["num_classes"] = int(data.num_classes)
            for k, v in data.meta.items():
                if isinstance(v, (str, int, float)) and k not in ("format", "path"):
                    f.attrs[k] = v
