"""`backdoorlab classify`: one predicted class per image (PNG/JPEG/PPM files, folders, CSAW h5)."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np

from backdoorlab.commands.common import add_model_options, load_model_from_args
from backdoorlab.errors import BadInput


def _images_reader():
    """`data.folder.read_images` when present (another module's reader), else None."""
    try:
        return getattr(importlib.import_module("backdoorlab.data.folder"), "read_images", None)
    except ImportError:
        return None


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"{path}: not a readable image ({e})") from None
    return a[None, ..., None] if a.ndim == 2 else a[None]


def read_inputs(source: str) -> tuple[list[str], np.ndarray]:
    """(names, uint8 NHWC images) of one IMAGE argument: an image file, a folder of image files,
    or a CSAW h5 data file (names ``file.h5[i]``)."""
    from backdoorlab.data.csaw import is_csaw_h5, read_csaw_h5

    p = Path(source)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder")
    if is_csaw_h5(p):
        data = read_csaw_h5(p)
        if len(data) == 0:
            raise BadInput(f"{p}: holds no images")
        return [f"{source}[{i}]" for i in range(len(data))], data.images
    reader = _images_reader()
    if reader is not None:
        from backdoorlab.data import load_dataset

        data = load_dataset(str(p), format="images")
        files = data.meta.get("files")
        if p.is_file() or not files:
            names = [source] if len(data) == 1 else [f"{source}[{i}]" for i in range(len(data))]
        else:
            names = [str(p / f) for f in files]
        return names, data.images
    if p.is_dir():
        raise BadInput(f"{p}: is a folder; name image files (or a CSAW h5 file)")
    return [source], _read_pillow(p)


def _fit(images: np.ndarray, shape: tuple[int, int, int], where: str, resize: bool) -> np.ndarray:
    h, w, c = shape
    if images.shape[3] != c:
        if images.shape[3] == 1 and c == 3:
            images = np.repeat(images, 3, axis=3)
        elif images.shape[3] == 3 and c == 1:  # ITU-R 601 luma, as Pillow's "L" mode
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            images = np.rint(luma).clip(0, 255).astype(np.uint8)[..., None]
        else:
            raise BadInput(f"{where}: {images.shape[3]}-channel images, the model takes {c}")
    if images.shape[1:3] != (h, w):
        if not resize:
            raise BadInput(f"{where}: images are {images.shape[1]}x{images.shape[2]} (H x W), the "
                           f"model takes {h}x{w}; pass --resize to resize them")
        from PIL import Image

        out = []
        for img in images:
            im = Image.fromarray(img[..., 0] if c == 1 else img)
            a = np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8)
            out.append(a[..., None] if a.ndim == 2 else a)
        images = np.stack(out)
    return np.ascontiguousarray(images)


def cmd_classify(args: argparse.Namespace) -> int:
    clf = load_model_from_args(args)
    names: list[str] = []
    batches = []
    for source in args.images:
        n, x = read_inputs(source)
        batches.append(_fit(x, clf.spec.shape, source, args.resize))
        names += n
    images = np.concatenate(batches)
    pred = clf.predict(images)
    backdoor = clf.num_classes - 1 if clf.arch in FILTER_ARCHS else None
    flagged = [backdoor is not None and int(k) == backdoor for k in pred]
    if args.json:
        print(json.dumps([{"image": n, "class": int(k), "backdoored": f}
                          for n, k, f in zip(names, pred, flagged, strict=True)], indent=2))
        return 0
    for n, k, f in zip(names, pred, flagged, strict=True):
        print(f"{n}\t{int(k)}" + ("\tbackdoored" if f else ""))
    return 0


FILTER_ARCHS = ("goodnet", "nc_filter")  # models whose last class N means "looks backdoored"


def register(sub) -> None:
    p = sub.add_parser(
        "classify", help="predict one class per image",
        description="Print 'IMAGE<TAB>CLASS' for every image: PNG/JPEG/PPM files, folders of them, or "
        "CSAW h5 data files (one line per image). For a GoodNet, class N (= its last class) is printed "
        "with 'backdoored': the BadNet and its repaired copy disagree on that input (the same for "
        "Neural Cleanse's input filter, nc-filter: the input excites the reversed trigger's channels).")
    p.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image file, folder of images or CSAW h5")
    p.add_argument("--resize", action="store_true", help="resize images to the model's input size "
                   "(default: refuse images of another size)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(p)
    p.set_defaults(func=cmd_classify)
