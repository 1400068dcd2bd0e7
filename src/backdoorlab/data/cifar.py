"""CIFAR-10 "python version" batches (Krizhevsky, 2009): 32x32 RGB images, 10 classes.

The folder ``cifar-10-batches-py`` holds ``data_batch_1`` .. ``data_batch_5`` (train, 50,000 images),
``test_batch`` (10,000) and ``batches.meta``; each batch is a pickled dict with ``data`` (N, 3072) uint8,
each row the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in row-major order,
and ``labels`` (N ints). ``path`` may be that folder, a folder holding it, one batch file, or the
downloaded ``cifar-10-python.tar.gz`` (members are read in memory, nothing is extracted).

These files are pickles, and a pickle can run code. They are read with ``SafeUnpickler``, which
resolves only the few numpy globals that rebuild an array or a dtype and refuses every other global
(``os.system``, ``builtins.eval`` …) with BadInput naming it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput, MissingSplit
from backdoorlab.safe_read import open_regular, read_bytes

NUM_CLASSES = 10
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
MAX_BATCH_BYTES = 512 << 20  # one batch file (the real ones are 31 MB)
_BATCH_NAME = re.compile(r"^(data_batch_\d+|test_batch)$")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles ``bytes`` at protocol <= 2 (``_codecs.encode(s, 'latin1')``), nothing more."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise BadInput(f"pickle: refused _codecs.encode with arguments ({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """How Python 3 pickles ``b""`` at protocol <= 2 (``bytes()``); any argument is refused (``bytes(n)``
    would allocate ``n`` bytes)."""
    if args:
        raise BadInput("pickle: refused bytes() with arguments")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode,
                                           ("__builtin__", "bytes"): _empty_bytes,
                                           ("builtins", "bytes"): _empty_bytes}
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for plain data plus numpy arrays: every global outside a short list is refused.

    Allowed: ``numpy.ndarray``, ``numpy.dtype``, ``numpy[._]core.multiarray._reconstruct`` (arrays,
    protocol <= 4), ``numpy[._]core.numeric._frombuffer`` (arrays, protocol 5) and ``_codecs.encode``
    restricted to latin-1 text (bytes at protocol <= 2), ``bytes()`` without arguments (an empty bytes
    object at protocol <= 2). Python 2 strings are read as bytes.
    """

    def __init__(self, file: io.BufferedIOBase, where: str = "pickle", max_bytes: int = 1 << 30) -> None:
        super().__init__(file, encoding="bytes")
        self.where, self.max_bytes = where, max_bytes
        self._allowed = _allowed_globals()
        # these two allocate an array of a shape the pickle names: bound it by the pickle's own size
        # (real data always comes from its bytes); ``ndarray`` stays usable as _reconstruct's class
        self._ndarray = self._bounded(np.ndarray, lambda a, k: (a[0] if a else k.get("shape"),
                                                               k.get("dtype", a[1] if len(a) > 1 else float)))
        rebuild = {key: fn for key, fn in self._allowed.items() if key[1] == "_reconstruct"}
        for key, fn in rebuild.items():
            self._allowed[key] = self._bounded(fn, lambda a, k: (a[1], a[2]), cls_first=True)
        self._allowed[("numpy", "ndarray")] = self._ndarray

    def _bounded(self, fn: Any, shape_dtype: Any, cls_first: bool = False) -> Any:
        """``fn`` refusing an array of more than ``max_bytes``; ``shape_dtype(args, kwargs)`` finds
        the requested shape and dtype."""
        def make(*args: Any, **kwargs: Any) -> Any:
            if cls_first and args and args[0] is self._ndarray:
                args = (np.ndarray, *args[1:])
            try:
                shape, dtype = shape_dtype(args, kwargs)
            except IndexError:
                raise BadInput(f"{self.where}: malformed array in a pickle") from None
            dims = (shape,) if type(shape) is int else shape
            if not isinstance(dims, tuple) or not all(type(d) is int and d >= 0 for d in dims):
                raise BadInput(f"{self.where}: refused an array of shape {str(shape)[:40]} in a pickle")
            try:
                itemsize = np.dtype(dtype).itemsize
            except TypeError:
                itemsize = 1
            if math.prod(dims) * max(itemsize, 1) > self.max_bytes:
                raise BadInput(f"{self.where}: a pickled array of shape {dims} is larger than the pickle")
            return fn(*args, **kwargs)
        return make

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise BadInput(f"{self.where}: refused to load global {module}.{name} from a pickle (only "
                           "plain data and numpy arrays are allowed)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise BadInput(f"{self.where}: refused a persistent id in a pickle")


def safe_load_pickle(data: bytes, where: str) -> Any:
    """Unpickle ``data`` with ``SafeUnpickler``; corrupt data and refused globals raise BadInput."""
    try:
        return SafeUnpickler(io.BytesIO(data), where, max_bytes=len(data)).load()
    except BadInput:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError … from corrupt data
        raise BadInput(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


def is_cifar10(path: str | os.PathLike) -> bool:
    """True for a ``cifar-10-batches-py`` folder (or its parent), a batch file, or the .tar.gz archive."""
    p = Path(path)
    if p.is_dir():
        return _batch_dir(p) is not None
    if p.is_file():
        if _is_archive_name(p):
            return True
        if _BATCH_NAME.match(p.name):
            try:
                with open_regular(p) as f:
                    return f.read(1) == b"\x80"  # pickle protocol >= 2
            except (BadInput, OSError):
                return False
    return False


def read_cifar10(path: str | os.PathLike, split: str = "train") -> ImageSet:
    """Read the ``split`` ("train": data_batch_1..5, "test": test_batch) of CIFAR-10 at ``path``.

    A single batch file is read whole, whatever ``split`` says.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder")
    if split not in ("train", "test"):
        raise BadInput(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    if p.is_file() and _is_archive_name(p):
        blobs, meta_blob = _from_archive(p, names)
    elif p.is_file():
        blobs, meta_blob = [(str(p), _read_bytes(p))], None
        meta_file = p.parent / "batches.meta"
        if meta_file.is_file():
            meta_blob = (str(meta_file), _read_bytes(meta_file))
        split = "test" if p.name == "test_batch" else "train" if p.name.startswith("data_batch") else split
    else:
        d = _batch_dir(p)
        if d is None:
            raise BadInput(f"{p}: not a CIFAR-10 folder (expected data_batch_1..5, test_batch, batches.meta)")
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            error = MissingSplit if len(missing) == len(names) else BadInput
            raise error(f"{d}: missing CIFAR-10 {split} batch file(s): {', '.join(missing)}")
        blobs = [(str(d / n), _read_bytes(d / n)) for n in names]
        meta_file = d / "batches.meta"
        meta_blob = (str(meta_file), _read_bytes(meta_file)) if meta_file.is_file() else None
    xs, ys = [], []
    for where, blob in blobs:
        x, y = _decode_batch(safe_load_pickle(blob, where), where)
        xs.append(x)
        ys.append(y)
    images = np.concatenate(xs) if len(xs) > 1 else xs[0]
    labels = np.concatenate(ys) if len(ys) > 1 else ys[0]
    class_names = _class_names(*meta_blob) if meta_blob else None
    meta = {"format": "cifar10", "path": str(p), "split": split}
    return ImageSet(images, labels, NUM_CLASSES, name=f"cifar10-{split}", class_names=class_names, meta=meta)


def _is_archive_name(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith((".tar.gz", ".tgz")) and "cifar-10" in n


def _batch_dir(p: Path) -> Path | None:
    for d in (p, p / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
            return d
    return None


def _read_bytes(p: Path) -> bytes:
    return read_bytes(p, MAX_BATCH_BYTES, "CIFAR-10 batch file")


def _from_archive(p: Path, names: list[str]) -> tuple[list[tuple[str, bytes]], tuple[str, bytes] | None]:
    """Batch file contents from the tar.gz archive, read in memory (nothing is written to disk)."""
    found: dict[str, bytes] = {}
    wanted = set(names) | {"batches.meta"}
    try:
        with open_regular(p, "CIFAR-10 archive") as raw, tarfile.open(fileobj=raw, mode="r:gz") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    if m.size > MAX_BATCH_BYTES:
                        raise BadInput(f"{p}: member {m.name} declares {m.size:,} bytes, more than the "
                                       f"{MAX_BATCH_BYTES:,} accepted for a CIFAR-10 batch")
                    f = tar.extractfile(m)
                    if f is not None:
                        found[base] = f.read(m.size)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise BadInput(f"{p}: not a readable .tar.gz archive ({e})") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise BadInput(f"{p}: archive lacks CIFAR-10 batch file(s): {', '.join(missing)}")
    meta = (f"{p}:batches.meta", found["batches.meta"]) if "batches.meta" in found else None
    return [(f"{p}:{n}", found[n]) for n in names], meta


def _get(d: dict, key: str) -> Any:
    return d[key.encode()] if key.encode() in d else d.get(key)


def _decode_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: expected a dict in the CIFAR-10 batch, got {type(obj).__name__}")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        keys = sorted(k.decode(errors="replace") if isinstance(k, bytes) else k if isinstance(k, str)
                      else type(k).__name__ for k in obj)[:20]
        extra = " (CIFAR-100 files are not CIFAR-10)" if _get(obj, "fine_labels") is not None else ""
        raise BadInput(f"{where}: expected keys 'data' and 'labels', found {keys}{extra}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise BadInput(f"{where}: 'data' must be a uint8 array (N, 3072), got {dtype} {shape}")
    # a pickle can share one list many times over (nested references cost a few bytes each), so the
    # labels are checked as a flat sequence of ints before numpy would expand them
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
            raise BadInput(f"{where}: 'labels' must be a list of whole numbers, got {labels.dtype} "
                           f"{labels.shape}")
    elif not isinstance(labels, list | tuple) or not all(type(v) is int for v in labels):
        raise BadInput(f"{where}: 'labels' must be a list of whole numbers")
    if len(labels) != len(data):
        raise BadInput(f"{where}: {len(data)} images but {len(labels)} labels")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise BadInput(f"{where}: 'labels' hold a number beyond 64 bits") from None
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise BadInput(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, found "
                       f"{int(y.min())}..{int(y.max())}")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def _class_names(where: str, blob: bytes) -> list[str] | None:
    obj = safe_load_pickle(blob, where)
    names = _get(obj, "label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != NUM_CLASSES or \
            not all(isinstance(n, bytes | str) for n in names):
        raise BadInput(f"{where}: expected 'label_names' with {NUM_CLASSES} names")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]
