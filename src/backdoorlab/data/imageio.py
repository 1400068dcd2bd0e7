"""Shared image decoding and resizing for the file-based readers; everything returns uint8 HWC.

Decoding: binary 8-bit PGM/PPM (P5/P6, e.g. the GTSRB files) is parsed with numpy directly (header
regex + ``np.frombuffer``), several times faster than Pillow; every other format goes through Pillow.
Grey images come back with 1 channel, everything else with 3: alpha is discarded (RGBA -> RGB,
LA -> L), palette and CMYK images are converted to RGB, 16-bit grey is scaled to 8 bits, and a JPEG's
EXIF orientation is applied. Only regular files of at most ``MAX_IMAGE_BYTES`` holding at most
``MAX_IMAGE_PIXELS`` pixels are decoded (`backdoorlab.safe_read`): a FIFO, a device or a
decompression bomb is refused with BadInput, never read.

Resizing: Pillow's bilinear filter. When shrinking, Pillow widens the filter to the source footprint
of each output pixel, so downscaling averages (no aliasing) rather than sampling 4 pixels.

``load_images`` reads many files with a small thread pool (file reads release the GIL) and returns
one ``(N, H, W, C)`` array.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.safe_read import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, open_picture, read_bytes

# file name endings the folder readers treat as images (Pillow decodes all but the PNM fast path)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pnm", ".bmp", ".tif", ".tiff",
                              ".webp"})

_SEP = rb"(?:\s|#[^\r\n]*[\r\n])+"  # whitespace and comment lines between header fields
_PNM_HEADER = re.compile(rb"P([56])" + _SEP + rb"(\d+)" + _SEP + rb"(\d+)" + _SEP + rb"(\d+)\s")

# Box = (x1, y1, x2, y2, ref_w, ref_h): an inclusive pixel box given in a ref_w x ref_h frame.
Box = tuple[float, float, float, float, float, float]


def is_image_name(path: str | os.PathLike) -> bool:
    """True if the file name ends in one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def parse_pnm(buf: bytes) -> np.ndarray | None:
    """Decode binary 8-bit PGM (P5) / PPM (P6) bytes to uint8 HWC; ``None`` if not that format.

    Raises ValueError for a truncated or malformed file of that format. The result may be a
    read-only view of ``buf``.
    """
    if buf[:2] not in (b"P5", b"P6"):
        return None
    m = _PNM_HEADER.match(buf)
    if m is None:
        raise ValueError("malformed PNM header")
    c = 3 if m.group(1) == b"6" else 1
    w, h, maxval = int(m.group(2)), int(m.group(3)), int(m.group(4))
    if maxval > 255:
        return None  # 16-bit samples: leave to Pillow
    if w < 1 or h < 1 or maxval < 1:
        raise ValueError(f"bad PNM header values (width {w}, height {h}, maxval {maxval})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"a {w}x{h} image, more than the {MAX_IMAGE_PIXELS:,} pixels accepted")
    n = w * h * c
    if len(buf) - m.end() < n:
        raise ValueError(f"truncated PNM data ({len(buf) - m.end()} of {n} bytes)")
    img = np.frombuffer(buf, dtype=np.uint8, count=n, offset=m.end()).reshape(h, w, c)
    if maxval != 255:
        img = ((img.astype(np.uint32) * 255 + maxval // 2) // maxval).clip(0, 255).astype(np.uint8)
    return img


def _decode_pil(buf: bytes, where: str) -> np.ndarray:
    from PIL import ImageOps

    with open_picture(buf, where) as im:
        if im.format == "JPEG":
            im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode in ("1", "L", "LA"):
            return np.asarray(im.convert("L"))[..., None]
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(im).astype(np.float64)
            top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
            return np.rint(a.clip(0, top) * (255.0 / top)).astype(np.uint8)[..., None]
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return np.asarray(im.convert("RGB"))


def decode_image(buf: bytes, where: str = "image") -> np.ndarray:
    """Decode image file bytes to uint8 HWC (C = 1 for grey, else 3).

    Raises BadInput for an image above ``MAX_IMAGE_PIXELS`` or one Pillow cannot decode, and
    ValueError for a malformed PNM."""
    img = parse_pnm(buf)
    return img if img is not None else _decode_pil(buf, where)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read and decode one image file; BadInput naming the file if it is missing, not a regular file,
    larger than ``MAX_IMAGE_BYTES`` or undecodable."""
    buf = read_bytes(path, MAX_IMAGE_BYTES, "image file")
    try:
        return decode_image(buf, str(path))
    except BadInput:
        raise
    except Exception as e:  # malformed PNM, conversions of odd modes
        raise BadInput(f"{path}: not a decodable image ({type(e).__name__}: {e})") from None


def crop_box(img: np.ndarray, box: Box) -> np.ndarray:
    """Crop an inclusive pixel box given in a ``ref_w`` x ``ref_h`` frame, scaled to ``img``'s size.

    The box covers columns ``x1..x2`` and rows ``y1..y2`` of the reference frame, i.e. the pixel
    edges ``[x1, x2 + 1)``; those edges are scaled by ``img_w / ref_w`` (rows likewise), rounded,
    and clipped to the image (at least one pixel is kept).
    """
    x1, y1, x2, y2, ref_w, ref_h = box
    h, w = img.shape[:2]
    sx, sy = w / ref_w, h / ref_h
    c0 = min(max(int(round(x1 * sx)), 0), w - 1)
    r0 = min(max(int(round(y1 * sy)), 0), h - 1)
    c1 = min(max(int(round((x2 + 1) * sx)), c0 + 1), w)
    r1 = min(max(int(round((y2 + 1) * sy)), r0 + 1), h)
    return img[r0:r1, c0:c1]


def resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize uint8 HWC ``img`` to ``size`` (an int for a square, or ``(height, width)``), bilinear.

    Returns ``img`` itself when it already has that size.
    """
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    if img.shape[0] == h and img.shape[1] == w:
        return img
    grey = img.shape[2] == 1
    pil = Image.fromarray(np.ascontiguousarray(img[..., 0] if grey else img))
    out = np.asarray(pil.resize((w, h), Image.BILINEAR))
    return out[..., None] if grey else out


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Grey (C=1) to RGB by repetition when ``channels`` is 3; an RGB image asked for C=1 is an error."""
    if img.shape[2] == channels:
        return img
    if img.shape[2] == 1 and channels == 3:
        return np.repeat(img, 3, axis=2)
    raise ValueError(f"cannot turn a {img.shape[2]}-channel image into {channels} channels")


def default_workers() -> int:
    return max(1, min(8, 2 * (os.cpu_count() or 1)))


def load_images(paths: Sequence[str | os.PathLike], *, size: int | tuple[int, int] | None = None,
                boxes: Sequence[Box] | None = None, channels: int | None = None,
                workers: int | None = None, where: str = "") -> np.ndarray:
    """Read, decode, optionally crop (``boxes``) and resize many files into one uint8 ``(N, H, W, C)``.

    ``channels`` None means 1 if every image is grey, else 3 (grey ones repeated). Without ``size``
    all images must already share one size, else BadInput naming two that differ. ``where`` names the
    data set in messages. Files are read by ``workers`` threads (default ``2 * cores``, at most 8).
    """
    n = len(paths)
    if boxes is not None and len(boxes) != n:
        raise ValueError("boxes must match paths")
    if n == 0:
        raise BadInput(f"{where or 'data set'}: no image files")

    def one(i: int) -> np.ndarray:
        img = read_image(paths[i])
        if boxes is not None:
            img = crop_box(img, boxes[i])
        if size is not None:
            img = resize(img, size)
        if channels == 3:
            img = to_channels(img, 3)
        elif channels == 1 and img.shape[2] != 1:
            raise BadInput(f"{paths[i]}: expected a grey image, found {img.shape[2]} channels")
        return img

    # with size and channels known, write straight into the result (no list of N arrays to stack)
    if size is not None and channels is not None:
        h, w = (size, size) if isinstance(size, int) else size
        out: np.ndarray | None = np.empty((n, h, w, channels), dtype=np.uint8)
    else:
        out = None

    def chunk(lo: int, hi: int) -> list[np.ndarray]:
        if out is None:
            return [one(i) for i in range(lo, hi)]
        for i in range(lo, hi):
            out[i] = one(i)
        return []

    workers = workers or default_workers()
    step = max(64, min(1024, n // (4 * workers) + 1))
    spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if workers == 1 or len(spans) == 1:
        parts = [chunk(lo, hi) for lo, hi in _progress(spans, where, n)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(chunk, lo, hi) for lo, hi in spans]
            try:
                parts = [f.result() for f in _progress(futures, where, n, spans)]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    if out is not None:
        return out
    imgs = [img for part in parts for img in part]
    if channels is None:
        c = 1 if all(img.shape[2] == 1 for img in imgs) else 3
        if c == 3:
            imgs = [to_channels(img, 3) for img in imgs]
    first = imgs[0].shape
    for i, img in enumerate(imgs):
        if img.shape != first:
            raise BadInput(f"{where or 'data set'}: images differ in size ({paths[0]} is "
                           f"{first[1]}x{first[0]}, {paths[i]} is {img.shape[1]}x{img.shape[0]}); "
                           "pass a size to resize them")
    return np.stack(imgs)


def _progress(items: list, where: str, total: int, spans: list | None = None):
    """Yield ``items`` (chunks or futures) with a progress bar counted in images."""
    from backdoorlab.progress import enabled, progress

    if not enabled() or total < 2000:
        yield from items
        return
    spans = spans or items
    bar = progress(iter(range(total)), desc=f"reading {where}".strip(), total=total, unit="img")
    for item, (lo, hi) in zip(items, spans, strict=True):
        yield item
        for _ in range(hi - lo):
            next(bar, None)
