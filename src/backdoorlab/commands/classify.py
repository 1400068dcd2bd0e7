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


def _filter_options(method, pairs: list[str] | None):
    """The input detector's options from repeated ``--filter-option KEY=VALUE``."""
    from backdoorlab.triggers.registry import spec_options

    opts: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise BadInput(f"--filter-option {pair!r}: expected KEY=VALUE")
        if key.strip() in opts:
            raise BadInput(f"--filter-option {key.strip()}: given twice")
        opts[key.strip()] = value
    return spec_options(method.options, opts, method.name, where=f"--filter {method.name}")


def _check_filter_args(args: argparse.Namespace):
    """The --filter method and its options, or None; every mistake refused before loading."""
    from backdoorlab import registry

    if args.filter is None:
        for flag, v in (("--clean", args.clean), ("--filter-option", args.filter_option)):
            if v:
                raise BadInput(f"{flag} only applies with --filter METHOD (an input detector)")
        return None
    method = registry.get(args.filter, "input-detector")
    if not args.clean:
        raise BadInput(f"--filter {args.filter}: give --clean DATA, the clean images it is fitted "
                       "and calibrated on")
    return method, _filter_options(method, args.filter_option)


def cmd_classify(args: argparse.Namespace) -> int:
    want_filter = _check_filter_args(args)
    clean = None
    if want_filter is not None:
        from backdoorlab.commands.common import load_data

        clean = load_data(args.clean, args, default_split="train")
    clf = load_model_from_args(args, clean if clean is not None and clean.labeled else None)
    if clean is not None:
        from backdoorlab.evaluation import check_compatible

        check_compatible(clf, clean, "--clean data")
    names: list[str] = []
    batches = []
    for source in args.images:
        n, x = read_inputs(source)
        batches.append(_fit(x, clf.spec.shape, source, args.resize))
        names += n
    images = np.concatenate(batches)
    suspicion = None
    if want_filter is not None:  # GoodNet-style: a rejected input answers class N
        from backdoorlab.input_detectors import fit_filter

        method, opts = want_filter
        filt = fit_filter(method.name, clf, clean, opts, args.far, args.calibration,
                          seed=int(getattr(opts, "seed", 0) or 0))
        suspicion = filt.scorer.score(images)
        rejected = suspicion > filt.threshold
        pred = np.where(rejected, clf.num_classes, clf.predict(images))
        backdoor = clf.num_classes
        import sys

        print(f"filter: {method.name} ({filt.scorer.statistic}) fitted on {filt.n_fit:,} clean images, "
              f"threshold {filt.threshold:.4g} set at {filt.far:.1%} false alarms on {filt.n_calibration:,}; "
              f"class {backdoor} = rejected as backdoored ({int(rejected.sum())} of {len(images)})",
              file=sys.stderr)
    else:
        pred = clf.predict(images)
        backdoor = clf.num_classes - 1 if clf.arch in FILTER_ARCHS else None
    flagged = [backdoor is not None and int(k) == backdoor for k in pred]
    if args.json:
        rows = [{"image": n, "class": int(k), "backdoored": f}
                for n, k, f in zip(names, pred, flagged, strict=True)]
        if suspicion is not None:
            for r, s in zip(rows, suspicion, strict=True):
                r["suspicion"] = float(s)
        print(json.dumps(rows, indent=2))
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
        "Neural Cleanse's input filter, nc-filter: the input excites the reversed trigger's channels). "
        "With --filter METHOD --clean DATA any input detector (e.g. strip) becomes that filter for any "
        "model: inputs it rejects at the --far false-alarm rate answer class N.")
    p.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image file, folder of images or CSAW h5")
    p.add_argument("--resize", action="store_true", help="resize images to the model's input size "
                   "(default: refuse images of another size)")
    p.add_argument("--json", action="store_true", help="print JSON")
    from backdoorlab import registry
    from backdoorlab.commands.common import add_data_options

    g = p.add_argument_group("input filter (GoodNet-style: rejected inputs answer class N)")
    g.add_argument("--filter", choices=[m.name for m in registry.methods("input-detector")],
                   metavar="METHOD", help="an input detector (see 'backdoorlab list') fitted on --clean; "
                   "an input it rejects gets class N (= the model's number of classes) and 'backdoored'")
    g.add_argument("--clean", metavar="DATA", help="clean data the defender holds: the filter is fitted "
                   "on it and its threshold set on a held-back part")
    from backdoorlab.commands.detect import INPUT_DETECT_OPTIONS

    for key, kw in INPUT_DETECT_OPTIONS.items():  # the same --far and --calibration as `detect`
        g.add_argument("--" + key, **kw)
    g.add_argument("--filter-option", action="append", metavar="KEY=VALUE",
                   help="an option of the filter's method (as in 'backdoorlab detect METHOD --help'); "
                   "repeatable")
    add_data_options(p, "which split of --clean data to use when it holds both (default: train)")
    add_model_options(p)
    p.set_defaults(func=cmd_classify)
