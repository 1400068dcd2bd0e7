"""MNIST in its IDX files (LeCun et al., 1998): 28x28 grey digits, 10 classes.

``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (60,000) and ``t10k-images-idx3-ubyte`` /
``t10k-labels-idx1-ubyte`` (10,000), raw or gzipped (``.gz``); the ``train-images.idx3-ubyte``
spelling is accepted too, and so is Fashion-MNIST (same format). An IDX file is a big-endian header —
two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then one 32-bit size per
dimension — followed by the values. ``path`` is the folder (or its ``raw``/``MNIST/raw`` subfolder)
or one images file, whose labels file is looked for beside it.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput, MissingSplit
from backdoorlab.safe_read import open_regular

NUM_CLASSES = 10
_PREFIX = {"train": "train", "test": "t10k"}
MAX_IDX_BYTES = 1 << 31  # one IDX file's values (MNIST's train images: 47 MB)


def _candidates(folder: Path, prefix: str, kind: str) -> list[Path]:
    dims = "idx3" if kind == "images" else "idx1"
    return [folder / f"{prefix}-{kind}{sep}{dims}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]


def _find(folder: Path, prefix: str, kind: str) -> Path | None:
    return next((f for f in _candidates(folder, prefix, kind) if f.is_file()), None)


def _folder(p: Path) -> Path | None:
    for d in (p, p / "raw", p / "MNIST" / "raw"):
        if d.is_dir() and any(_find(d, pre, "images") for pre in _PREFIX.values()):
            return d
    return None


def _is_images_name(p: Path) -> bool:
    n = p.name.lower().removesuffix(".gz")
    return n.endswith(("-images-idx3-ubyte", "-images.idx3-ubyte"))


def is_mnist(path: str | os.PathLike) -> bool:
    """True for a folder holding MNIST images files, or one ``*-images-idx3-ubyte[.gz]`` file."""
    p = Path(path)
    if p.is_dir():
        return _folder(p) is not None
    return p.is_file() and _is_images_name(p)


def read_mnist(path: str | os.PathLike, split: str = "train") -> ImageSet:
    """Read the ``split`` ("train" or "test" = t10k) of MNIST at ``path`` as (N, 28, 28, 1) uint8.

    Given one images file, that file is read whatever ``split`` says.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder")
    if split not in _PREFIX:
        raise BadInput(f"MNIST split must be 'train' or 'test', got {split!r}")
    if p.is_dir():
        d = _folder(p)
        if d is None:
            raise BadInput(f"{p}: no MNIST images file (expected train-images-idx3-ubyte[.gz] or "
                           "t10k-images-idx3-ubyte[.gz])")
        images_file = _find(d, _PREFIX[split], "images")
        if images_file is None:
            raise MissingSplit(f"{d}: no {_PREFIX[split]}-images-idx3-ubyte[.gz] for the {split} split")
    else:
        if not _is_images_name(p):
            raise BadInput(f"{p}: expected an MNIST images file named *-images-idx3-ubyte[.gz]")
        images_file = p
        split = "test" if p.name.startswith("t10k") else "train" if p.name.startswith("train") else split
    labels_file = _labels_beside(images_file)
    n_x, n_y = idx_shape(images_file, ndim=3)[0], idx_shape(labels_file, ndim=1)[0]
    if n_x != n_y:  # checked on the headers, before reading the data
        raise BadInput(f"{images_file}: {n_x} images but {labels_file.name} holds {n_y} labels")
    x = read_idx(images_file, ndim=3)
    y = read_idx(labels_file, ndim=1)
    if len(y) and y.max() >= NUM_CLASSES:
        raise BadInput(f"{labels_file}: labels must lie in 0..{NUM_CLASSES - 1}, found {int(y.max())}")
    meta = {"format": "mnist", "path": str(p), "split": split, "images_file": str(images_file),
            "labels_file": str(labels_file)}
    return ImageSet(x[..., None], y.astype(np.int64), NUM_CLASSES, name=f"mnist-{split}",
                    class_names=[str(i) for i in range(NUM_CLASSES)], meta=meta)


def _labels_beside(images_file: Path) -> Path:
    name = images_file.name
    i = name.rfind("images")
    guess = (name[:i] + "labels" + name[i + 6:]).replace("idx3", "idx1")
    for cand in (guess, guess.removesuffix(".gz"), guess + ".gz"):
        if (images_file.parent / cand).is_file():
            return images_file.parent / cand
    raise BadInput(f"{images_file}: labels file {guess} not found beside it")


def _open_idx(path: Path) -> tuple[IO[bytes], IO[bytes], int]:
    """(file, stream of the IDX bytes (gunzipped if needed), file size) of a regular file."""
    raw = open_regular(path, "IDX file")
    try:
        size = os.fstat(raw.fileno()).st_size
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
    except OSError as e:
        raw.close()
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw), (-1 if gz else size)


def _header(path: Path, f: IO[bytes], ndim: int) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[:2] != b"\x00\x00":
        raise BadInput(f"{path}: not an IDX file (bad magic number {head.hex() or 'none'})")
    if head[2] != 0x08:
        raise BadInput(f"{path}: IDX type 0x{head[2]:02x}, expected 0x08 (unsigned bytes)")
    if head[3] != ndim:
        raise BadInput(f"{path}: IDX file has {head[3]} dimensions, expected {ndim} "
                       f"({'images' if ndim == 3 else 'labels'})")
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise BadInput(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4", count=ndim))
    if ndim == 3 and dims[1:] != (28, 28):
        raise BadInput(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    return dims


def idx_shape(path: Path, ndim: int) -> tuple[int, ...]:
    """The shape an unsigned-byte IDX file (raw or .gz) declares, reading only its header."""
    raw, f, _ = _open_idx(path)
    with raw:
        try:
            return _header(path, f, ndim)
        except (OSError, EOFError, zlib.error) as e:
            raise BadInput(f"{path}: cannot read ({e})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or .gz) with ``ndim`` dimensions; BadInput if it is not one.

    The header's promise is checked against the file size before the data is read (raw files), and a
    gzipped file is decompressed in blocks only up to what the header promises (no gzip bomb)."""
    raw, f, size = _open_idx(path)
    with raw:
        try:
            dims = _header(path, f, ndim)
            n = math.prod(dims)
            head = 4 + 4 * ndim
            if n > MAX_IDX_BYTES:
                raise BadInput(f"{path}: IDX header promises {n:,} bytes for shape {dims}, more than the "
                               f"{MAX_IDX_BYTES:,} accepted")
            if size >= 0 and size - head != n:
                raise BadInput(f"{path}: IDX header promises {n:,} bytes for shape {dims}, file holds "
                               f"{size - head:,}")
            buf = bytearray()
            while len(buf) < n:
                block = f.read(min(n - len(buf), 1 << 24))
                if not block:
                    break
                buf += block
            got, extra = len(buf), f.read(1)
        except (OSError, EOFError, zlib.error) as e:
            raise BadInput(f"{path}: cannot read ({e})") from None
    if got != n or extra:
        raise BadInput(f"{path}: IDX header promises {n:,} bytes for shape {dims}, file holds "
                       f"{'more' if extra else f'{got:,}'}")
    return np.frombuffer(buf, dtype=np.uint8, count=n).reshape(dims)
