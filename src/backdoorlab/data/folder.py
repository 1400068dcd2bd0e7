"""Plain image files: a folder of class subfolders (labeled), or loose image files (unlabeled).

Class folder: ``ROOT/<class>/**/*.png|jpg|ppm|bmp…``. Classes are the subfolder names sorted (as
numbers when every name is a whole number, so ``2`` comes before ``10``); label ``i`` is the ``i``-th
name, and the names are kept as ``class_names``. Hidden folders (``.*``) and ``__MACOSX`` are skipped;
an empty subfolder still counts as a class (so labels match a sibling split that has it).

Loose images: one image file, or a folder whose image files (not recursive) are read in name order,
without labels — what ``classify`` consumes.

Both keep the files (relative to ``path``) in ``meta["files"]`` in image order. Images are 1-channel
only if every one is grey, else RGB; alpha is dropped (see ``imageio``). With ``size`` every image is
resized to ``size`` x ``size``; without it they must already share one size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backdoorlab.data.imageio import IMAGE_EXTENSIONS, is_image_name, load_images
from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput

_EXTS = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


def _skip(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _class_dirs(p: Path) -> list[Path]:
    dirs = [e for e in p.iterdir() if e.is_dir() and not _skip(e.name)]
    if dirs and all(d.name.isdigit() for d in dirs):
        return sorted(dirs, key=lambda d: (int(d.name), d.name))
    return sorted(dirs, key=lambda d: d.name)


def _images_in(d: Path, recursive: bool) -> list[Path]:
    """Image files in ``d`` (and below it if ``recursive``), sorted by relative path.

    Every non-folder entry with an image name counts, so that a FIFO or device among them is refused
    by `read_image` rather than silently skipped."""
    if not recursive:
        return sorted((e for e in d.iterdir() if not e.is_dir() and is_image_name(e) and not _skip(e.name)),
                      key=lambda e: e.name)
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not _skip(x)]
        found += [Path(root) / f for f in files if is_image_name(f) and not _skip(f)]
    return sorted(found, key=lambda f: f.relative_to(d).as_posix())


def _has_image(d: Path, recursive: bool) -> bool:
    for _root, dirs, files in os.walk(d):
        if any(is_image_name(f) and not _skip(f) for f in files):
            return True
        if not recursive:
            return False
        dirs[:] = [x for x in dirs if not _skip(x)]
    return False


def is_class_folder(path: str | os.PathLike) -> bool:
    """True for a folder with no loose images whose subfolders (some of them) hold image files."""
    p = Path(path)
    if not p.is_dir() or _has_image(p, recursive=False):
        return False
    try:
        return any(_has_image(d, recursive=True) for d in _class_dirs(p))
    except OSError:
        return False


def is_image_files(path: str | os.PathLike) -> bool:
    """True for one image file, or a folder holding image files directly."""
    p = Path(path)
    if p.is_file():
        return is_image_name(p)
    return p.is_dir() and _has_image(p, recursive=False)


def read_class_folder(path: str | os.PathLike, size: int | None = None,
                      num_classes: int | None = None) -> ImageSet:
    """Read a folder of class subfolders as a labeled ImageSet (see module docstring)."""
    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"{p}: no such folder" if not p.exists() else f"{p}: is a file, expected a folder "
                       "of class subfolders")
    _check_size(size)
    classes = _class_dirs(p)
    if not classes:
        raise BadInput(f"{p}: no class subfolders (expected ROOT/<class>/<image files>)")
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, d in enumerate(classes):
        found = _images_in(d, recursive=True)
        if not found:
            empty.append(d.name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise BadInput(f"{p}: the class subfolders hold no image files ({_EXTS})")
    if num_classes is not None and num_classes < len(classes):
        raise BadInput(f"{p}: {len(classes)} class subfolders but {num_classes} classes were given")
    x = load_images(files, size=size, where=str(p))
    meta = {"format": "folder", "path": str(p), "files": [f.relative_to(p).as_posix() for f in files]}
    if empty:
        meta["empty_classes"] = empty
    loose = _has_image(p, recursive=False)
    if loose:
        meta["note"] = "image files directly in the folder were ignored (they belong to no class)"
    return ImageSet(x, np.asarray(labels, dtype=np.int64), num_classes or len(classes), name=p.name,
                    class_names=[d.name for d in classes], meta=meta)


def read_images(path: str | os.PathLike, size: int | None = None, num_classes: int | None = None) -> ImageSet:
    """Read one image file, or the image files of a folder (name order), as an unlabeled ImageSet."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder")
    _check_size(size)
    if not p.is_dir():  # one file (`read_image` refuses a FIFO or device)
        files, base = [p], p.parent
    else:
        files, base = _images_in(p, recursive=False), p
        if not files:
            raise BadInput(f"{p}: no image files ({_EXTS}) in this folder")
    x = load_images(files, size=size, where=str(p))
    meta = {"format": "images", "path": str(p), "files": [f.relative_to(base).as_posix() for f in files]}
    return ImageSet(x, None, num_classes or 1, name=p.name if p.is_dir() else p.stem, meta=meta)


def _check_size(size: int | None) -> None:
    if size is not None and size < 1:
        raise BadInput(f"image size must be positive, got {size}")
