"""Guards shared by every reader of untrusted files (issue #17: never a traceback, hang or blow-up).

- Only regular files are opened (after following symlinks): a FIFO, a device (``/dev/zero``) or a
  folder where a file is expected is refused before it is opened for reading, never read.
- Whole-file reads are bounded (`read_bytes`).
- HDF5 datasets are checked from their header before any data is read (`h5_dataset`): links are
  followed only when they are hard links (no soft or external links), external and virtual storage
  is refused, the dtype must be a plain number (or string, where asked), the declared size is
  bounded and must fit the bytes the file actually stores (times a compression ratio that gzip can
  reach), and only HDF5's built-in filters are accepted (no plugin is ever loaded).
- Pictures are decoded by Pillow only under a pixel bound (`open_picture`); decompression bombs,
  unidentified and truncated images raise BadInput.

Every failure is a `BadInput` naming the file (and the dataset), so the CLI prints one line.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from typing import IO, Any

import numpy as np

from backdoorlab.errors import BadInput

MAX_IMAGE_BYTES = 256 << 20  # one image file
MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (8192 x 8192); below Pillow's own 89 M warning
MAX_TEXT_BYTES = 64 << 20  # CSV label files, JSON sidecars
MAX_ARRAY_BYTES = 16 << 30  # one array read from a data file (the CSAW test set is 0.8 GB)
MAX_ELEMENTS = 1 << 28  # one weight tensor, one layer's parameters, a whole model's parameters
MAX_DIM = 4096  # model input height / width / channels
MAX_CLASSES = 10**6
MAX_COMPRESSION = 1100  # declared / stored bytes of a filtered dataset (gzip tops out near 1032)
# HDF5 built-in filters (deflate, shuffle, fletcher32, szip, nbit, scaleoffset) and h5py's lzf
_LINKS = {"SoftLink": "a soft link", "ExternalLink": "an external link (to another file)"}
_H5_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset",
               32000: "lzf"}


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_stat(path: Any, st: os.stat_result, what: str, max_bytes: int | None) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{path}: is {_kind(st.st_mode)}, expected a regular {what}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise BadInput(f"{path}: {st.st_size:,} bytes, more than the {max_bytes:,} accepted for a {what}")
    return st.st_size


def require_regular_file(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> int:
    """Size of ``path`` (symlinks followed); BadInput unless it is an existing regular file of at most
    ``max_bytes``. Call it before handing a path to a library that opens it (h5py, safetensors)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such {what}") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    return _check_stat(path, st, what, max_bytes)


def open_regular(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> IO[bytes]:
    """Open a regular file for binary reading; never blocks on a FIFO, never reads a device.

    The type is checked before opening and again on the open descriptor (no race)."""
    require_regular_file(path, what, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        _check_stat(path, os.fstat(fd), what, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see `open_regular`)."""
    with open_regular(path, what, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:  # the file grew while we read it
        raise BadInput(f"{path}: more than the {max_bytes:,} bytes accepted for a {what}")
    return data


# -- HDF5 ---------------------------------------------------------------------------------------

def open_h5(path: str | os.PathLike, what: str = "file"):
    """Open a regular HDF5 file read-only (h5py.File); BadInput if it is not one."""
    import h5py

    require_regular_file(path, what)
    try:
        return h5py.File(path, "r")
    except Exception as e:  # OSError mostly; h5py raises others for some corrupt superblocks
        raise BadInput(f"{path}: not a readable HDF5 file ({e})") from None


def h5_get(parent, name: str, where: str):
    """The group or dataset ``name`` (a ``/``-separated path) under ``parent``, following hard links
    only: a soft or external link (which can pull in another file) is refused; a missing name too."""
    import h5py

    obj = parent
    for part in (p for p in str(name).split("/") if p):
        try:
            link = obj.get(part, getlink=True) if isinstance(obj, h5py.Group) else None
            if link is None:
                raise BadInput(f"{where}: no {name!r} in the file")
            if not isinstance(link, h5py.HardLink):
                kind = _LINKS.get(type(link).__name__, type(link).__name__)
                raise BadInput(f"{where}: {name!r} is {kind}; only objects stored in the file itself "
                               "are read")
            obj = obj[part]
        except BadInput:
            raise
        except Exception as e:
            raise BadInput(f"{where}: corrupt HDF5 object {name!r} ({type(e).__name__}: {e})") from None
    return obj


def _dtype_ok(dt: np.dtype, kinds: str) -> bool:
    import h5py

    if dt.fields is not None or dt.subdtype is not None:
        return False
    if dt.kind in "OS":  # strings: fixed-length bytes or variable-length str
        return "S" in kinds and (dt.kind == "S" or h5py.check_string_dtype(dt) is not None)
    return dt.kind in kinds and dt.itemsize <= 8


def h5_dataset(parent, name: str, where: str, *, kinds: str = "iuf", ndim: tuple[int, ...] | None = None,
               max_bytes: int = MAX_ARRAY_BYTES):
    """The dataset ``name`` under ``parent``, checked from its HDF5 header only (nothing is read).

    ``kinds``: accepted numpy dtype kinds (``i`` ``u`` ``f`` ``b`` ``c``; ``S`` = strings); compound,
    array, reference and opaque types are always refused. ``ndim``: accepted ranks. Refused: soft and
    external links, external or virtual storage, non-built-in filters, a declared size above
    ``max_bytes``, and one the stored bytes cannot hold (unwritten space reads as fill values, so a
    tiny file could otherwise declare gigabytes).
    """
    import h5py

    ds = h5_get(parent, name, where)
    if not isinstance(ds, h5py.Dataset):
        raise BadInput(f"{where}: {name!r} is a group, expected an array")
    try:
        virtual, external = ds.is_virtual, ds.external
        dt, shape = ds.dtype, ds.shape
        plist = ds.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        stored, file_size = ds.id.get_storage_size(), ds.file.id.get_filesize()
    except Exception as e:  # unsupported HDF5 types raise TypeError, corrupt headers OSError …
        raise BadInput(f"{where}: unreadable header of {name!r} ({type(e).__name__}: {e})") from None
    if virtual or external:
        kind = "virtual" if virtual else "external"
        raise BadInput(f"{where}: {name!r} keeps its data in other files ({kind} storage); only data "
                       "inside the file is read")
    if not _dtype_ok(dt, kinds):
        raise BadInput(f"{where}: {name!r} has dtype {dt}, expected {_kinds_text(kinds)}")
    if shape is None:
        raise BadInput(f"{where}: {name!r} holds no array (empty dataspace)")
    if ndim is not None and len(shape) not in ndim:
        want = " or ".join(map(str, ndim))
        raise BadInput(f"{where}: {name!r} has shape {shape}, expected {want} dimensions")
    unknown = [f for f in filters if f not in _H5_FILTERS]
    if unknown:
        raise BadInput(f"{where}: {name!r} uses HDF5 filter(s) {unknown}; only built-in filters are read")
    declared = math.prod(shape) * dt.itemsize
    if declared > max_bytes:
        raise BadInput(f"{where}: {name!r} declares shape {shape} {dt} ({declared:,} bytes), more than the "
                       f"{max_bytes:,} accepted")
    ratio = MAX_COMPRESSION if filters else 1
    if stored > file_size or declared > stored * ratio:
        raise BadInput(f"{where}: {name!r} declares shape {shape} {dt} ({declared:,} bytes) but the file "
                       f"stores {stored:,} bytes of it (file size {file_size:,})")
    return ds


def _kinds_text(kinds: str) -> str:
    names = {"f": "float", "i": "int", "u": "unsigned int", "b": "bool", "c": "complex", "S": "string"}
    return " or ".join(names[k] for k in kinds if k in names) + " values"


def h5_read(ds, where: str) -> np.ndarray:
    """The whole dataset ``ds`` (checked by `h5_dataset`) as an array; BadInput on a read error."""
    try:
        return np.asarray(ds[()])
    except Exception as e:  # OSError (corrupt chunks, failed filters) and friends
        raise BadInput(f"{where}: cannot read {ds.name!r} ({type(e).__name__}: {e})") from None


def check_weight(a: np.ndarray, where: str) -> np.ndarray:
    """Refuse a weight that is not a finite float16/32/64 array (``where`` names the layer/tensor)."""
    if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4, 8):
        raise BadInput(f"{where}: weights must be float16/32/64, got {a.dtype}")
    if not np.isfinite(a).all():
        raise BadInput(f"{where}: weights contain NaN or infinite values")
    return a


def check_int(v: Any, what: str, lo: int = 1, hi: int | None = None) -> int:
    """``v`` as an int in ``[lo, hi]``; a whole float (``10.0``) and a one-element array are accepted,
    a bool, a fraction, a string or anything else is refused."""
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0]
    if isinstance(v, float | np.floating) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer) or v < lo \
            or (hi is not None and v > hi):
        bound = f"{lo}..{hi:,}" if hi is not None else f">= {lo}"
        raise BadInput(f"{what} must be a whole number in {bound}, got {v!r}")
    return int(v)


# -- pictures -----------------------------------------------------------------------------------

def check_pixels(width: int, height: int, where: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInput(f"{where}: a {width}x{height} image, more than the {MAX_IMAGE_PIXELS:,} pixels "
                       "accepted (a decompression bomb?)")


def open_picture(buf: bytes, where: str, bad: str = "not a decodable image"):
    """Decode image file bytes with Pillow, fully loaded, under the pixel bound; else BadInput
    (``bad`` words the failure to decode)."""
    from PIL import Image

    # Pillow warns (above its own limit) before it errs: make that warning an error (a warning would
    # print a second line); re-added when a test harness has reset the filters
    if ("error", None, Image.DecompressionBombWarning, None, 0) not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    try:
        im = Image.open(io.BytesIO(buf))
        check_pixels(im.width, im.height, where)
        im.load()
        return im
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(f"{where}: image too large, refused as a decompression bomb ({e})") from None
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError …
        raise BadInput(f"{where}: {bad} ({type(e).__name__}: {e})") from None
