"""GTSRB, the German Traffic Sign Recognition Benchmark (Stallkamp et al., IJCNN 2011): 43 classes.

Two on-disk layouts are read:

- official: ``Final_Training/Images/000NN/*.ppm`` with labels in each folder's ``GT-000NN.csv`` and
  ``Final_Test/Images/*.ppm`` with labels in ``GT-final_test.csv`` (``;``-separated, columns
  Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId). If only the unlabeled
  ``GT-final_test.test.csv`` is there, the test images load without labels (``meta["note"]`` says so).
  ``path`` may be the GTSRB folder, a folder holding it, ``Final_Training``, ``Final_Training/Images``,
  ``Final_Test`` or ``Final_Test/Images``.
- Kaggle: ``Train.csv`` / ``Test.csv`` (``,``-separated, with ``Path`` relative to the folder,
  ``ClassId``, and the same Width/Height/Roi columns) beside ``Train/`` and ``Test/``.

Images are resized to ``size`` x ``size`` (bilinear, see ``imageio``); those already that size are
kept as they are. ``roi=True`` first crops the sign's bounding box from the CSV: its inclusive pixel
coordinates refer to the original Width x Height, so for a stored image of another size (e.g. the
32x32 copies) the box is scaled to the stored size.

Every image path a CSV names must lie inside the data folder (after resolving ``..`` and symlinks);
one that points elsewhere is refused with BadInput naming the CSV and its line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backdoorlab.data.imageio import Box, load_images
from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput, MissingSplit
from backdoorlab.safe_read import MAX_TEXT_BYTES, read_bytes

NUM_CLASSES = 43

# the meaning of each ClassId (German road signs)
CLASS_NAMES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for trucks", "right of way at next crossing", "priority road", "yield", "stop",
    "no vehicles", "trucks prohibited", "no entry", "general caution", "dangerous curve left",
    "dangerous curve right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice/snow", "wild animals crossing", "end of all limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left", "keep right",
    "keep left", "roundabout mandatory", "end of no passing", "end of no passing for trucks",
]

_ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "Width", "Height")


@dataclass
class _Plan:
    """What to read for one split: files, labels (or None), ROI boxes (or None)."""

    layout: str
    files: list[str] = field(default_factory=list)
    labels: list[int] | None = field(default_factory=list)
    boxes: list[Box] | None = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    note: str = ""
    root: str = ""  # resolved data root: every image path from a CSV must stay inside it
    _dirs: dict[str, bool] = field(default_factory=dict)  # folder -> resolves inside root

    def inside(self, file: str) -> bool:
        """True if ``file`` resolves (``..`` and symlinks) to a path inside ``root``."""
        head = os.path.dirname(file)
        ok = self._dirs.get(head)
        if ok is None:
            ok = self._dirs[head] = _within(self.root, os.path.realpath(head))
        if ok and os.path.islink(file):
            return _within(self.root, os.path.realpath(file))
        return ok and os.path.basename(file) not in ("", ".", "..")


def _within(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def is_gtsrb(path: str | os.PathLike) -> bool:
    """True if ``path`` is a GTSRB folder in the official or the Kaggle layout (cheap checks only)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return _has_layout(p) or ((p / "GTSRB").is_dir() and _has_layout(p / "GTSRB"))


def _has_layout(p: Path) -> bool:
    return bool(_train_dir(p) or _test_dir(p) or _kaggle_csv(p, "train") or _kaggle_csv(p, "test"))


def read_gtsrb(path: str | os.PathLike, split: str = "train", size: int | None = 32,
               roi: bool = False) -> ImageSet:
    """Read the ``split`` ("train" or "test") of GTSRB at ``path`` as 43-class uint8 RGB images.

    A path that is itself one split's folder (``Final_Test``, ``Final_Training/Images`` …) is read
    whatever ``split`` says (``meta["note"]`` records it). ``size=None`` keeps the stored size (all
    images must then share it).
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such folder")
    if split not in ("train", "test"):
        raise BadInput(f"GTSRB split must be 'train' or 'test', got {split!r}")
    if size is not None and size < 1:
        raise BadInput(f"image size must be positive, got {size}")
    if not _has_layout(p) and (p / "GTSRB").is_dir():
        p = p / "GTSRB"
    own = _own_split(p)
    note = ""
    if own is not None and own != split:
        note = f"{p.name} holds only the {own} split: read it (split {split!r} ignored)"
        split = own
    plan = _plan(p, split, roi)
    if not plan.files:
        raise BadInput(f"{p}: the GTSRB {split} split lists no images ({', '.join(plan.sources)})")
    x = load_images(plan.files, size=size, boxes=plan.boxes if roi else None, channels=3,
                    where=f"GTSRB {split} ({p})")
    y = None if plan.labels is None else np.asarray(plan.labels, dtype=np.int64)
    meta = {"format": "gtsrb", "path": str(p), "layout": plan.layout, "split": split, "roi": roi,
            "labels_from": ", ".join(plan.sources)}
    if plan.note or note:
        meta["note"] = "; ".join(n for n in (note, plan.note) if n)
    return ImageSet(x, y, NUM_CLASSES, name=f"gtsrb-{split}", class_names=list(CLASS_NAMES), meta=meta)


# --- locating the layout ------------------------------------------------------------------------

def _train_dir(p: Path) -> Path | None:
    """The official ``Final_Training/Images`` folder reachable from ``p``, if any."""
    for d in (p / "Final_Training" / "Images", p / "Images", p):
        if d.is_dir() and _has_class_csv(d):
            return d
    return None


def _has_class_csv(d: Path) -> bool:
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.name.isdigit() and e.is_dir() and os.path.isfile(
                        os.path.join(e.path, f"GT-{e.name}.csv")):
                    return True
    except OSError:
        return False
    return False


def _test_dir(p: Path) -> Path | None:
    """The official ``Final_Test/Images`` folder reachable from ``p``, if any."""
    for d in (p / "Final_Test" / "Images", p / "Images", p):
        if not d.is_dir():
            continue
        if (d / "GT-final_test.test.csv").is_file() or (d / "GT-final_test.csv").is_file():
            return d
        if d.name == "Images" and (d.parent / "GT-final_test.csv").is_file():
            return d
    return None


def _own_split(p: Path) -> str | None:
    """"train"/"test" when ``p`` is itself Final_Training(/Images) or Final_Test(/Images), else None."""
    tr, te = _train_dir(p), _test_dir(p)
    if tr in (p, p / "Images") and te is None:
        return "train"
    if te in (p, p / "Images") and tr is None:
        return "test"
    return None


def _kaggle_csv(p: Path, split: str) -> Path | None:
    f = p / ("Train.csv" if split == "train" else "Test.csv")
    return f if f.is_file() else None


def _plan(p: Path, split: str, roi: bool) -> _Plan:
    plan = _Plan("official", root=os.path.realpath(p))
    if split == "train":
        d = _train_dir(p)
        if d is not None:
            return _plan_official_train(plan, d, roi)
    else:
        d = _test_dir(p)
        if d is not None:
            return _plan_official_test(plan, d, p, roi)
    k = _kaggle_csv(p, split)
    if k is not None:
        plan.layout = "kaggle"
        return _plan_kaggle(plan, p, k, roi)
    other = "test" if split == "train" else "train"
    have = bool(_train_dir(p) if other == "train" else _test_dir(p)) or _kaggle_csv(p, other) is not None
    expected = ("Final_Training/Images/000NN/GT-000NN.csv or Train.csv" if split == "train"
                else "Final_Test/Images with GT-final_test.csv or Test.csv")
    hint = f"; only the {other} split is here" if have else ""
    raise MissingSplit(f"{p}: GTSRB {split} split not found (expected {expected}){hint}")


# --- CSV reading --------------------------------------------------------------------------------

def _read_csv(path: Path) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """Header column index and (line number, row) pairs of a ``;``- or ``,``-separated CSV file."""
    try:
        text = read_bytes(path, MAX_TEXT_BYTES, "CSV file").decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: cannot read CSV ({e})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise BadInput(f"{path}: empty CSV file, expected a header row")
    delim = ";" if ";" in lines[0] else ","
    try:
        rows = [(i, r) for i, r in enumerate(csv.reader(lines, delimiter=delim), start=1)
                if r and any(c.strip() for c in r)]
    except csv.Error as e:  # NUL bytes, oversized fields
        raise BadInput(f"{path}: malformed CSV ({e})") from None
    cols = {name.strip(): i for i, name in enumerate(rows[0][1])}
    return cols, rows[1:]


def _need(cols: dict[str, int], names: tuple[str, ...] | list[str], path: Path) -> None:
    missing = [n for n in names if n not in cols]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(cols) or 'none'})")


def _int(row: list[str], cols: dict[str, int], name: str, path: Path, line: int) -> int:
    try:
        return int(row[cols[name]].strip())
    except (IndexError, ValueError):
        got = row[cols[name]] if cols[name] < len(row) else "nothing"
        raise BadInput(f"{path}: line {line}: {name} must be a whole number, got {got!r}") from None


def _label(row: list[str], cols: dict[str, int], path: Path, line: int) -> int:
    c = _int(row, cols, "ClassId", path, line)
    if not 0 <= c < NUM_CLASSES:
        raise BadInput(f"{path}: line {line}: ClassId {c} out of range 0..{NUM_CLASSES - 1}")
    return c


def _box(row: list[str], cols: dict[str, int], path: Path, line: int) -> Box:
    x1, y1, x2, y2, w, h = (_int(row, cols, n, path, line) for n in _ROI_COLUMNS)
    if w < 1 or h < 1 or not (0 <= x1 <= x2 and 0 <= y1 <= y2):
        raise BadInput(f"{path}: line {line}: bad ROI ({x1},{y1})-({x2},{y2}) for a {w}x{h} image")
    return (x1, y1, x2, y2, w, h)


def _add_rows(plan: _Plan, csv_path: Path, base: Path, name_col: str, roi: bool, labeled: bool) -> None:
    cols, rows = _read_csv(csv_path)
    _need(cols, [name_col] + (["ClassId"] if labeled else []) + (list(_ROI_COLUMNS) if roi else []),
          csv_path)
    plan.sources.append(str(csv_path))
    for i, row in rows:
        if cols[name_col] >= len(row) or not row[cols[name_col]].strip():
            raise BadInput(f"{csv_path}: line {i}: no {name_col}")
        name = row[cols[name_col]].strip()
        file = os.path.join(base, name)
        if not plan.inside(file):
            raise BadInput(f"{csv_path}: line {i}: {name_col} {name!r} points outside the data folder "
                           f"{plan.root}")
        plan.files.append(file)
        if labeled:
            plan.labels.append(_label(row, cols, csv_path, i))  # type: ignore[union-attr]
        if roi:
            plan.boxes.append(_box(row, cols, csv_path, i))  # type: ignore[union-attr]


def _plan_official_train(plan: _Plan, d: Path, roi: bool) -> _Plan:
    class_dirs = sorted((e for e in d.iterdir() if e.is_dir() and e.name.isdigit()),
                        key=lambda e: int(e.name))
    for cd in class_dirs:
        f = cd / f"GT-{cd.name}.csv"
        if not f.is_file():
            raise BadInput(f"{cd}: missing label file GT-{cd.name}.csv")
        _add_rows(plan, f, cd, "Filename", roi, labeled=True)
    return plan


def _plan_official_test(plan: _Plan, d: Path, root: Path, roi: bool) -> _Plan:
    for f in (d / "GT-final_test.csv", d.parent / "GT-final_test.csv", root / "GT-final_test.csv"):
        if f.is_file():
            _add_rows(plan, f, d, "Filename", roi, labeled=True)
            return plan
    f = d / "GT-final_test.test.csv"
    plan.labels = None
    plan.note = (f"test labels not found: only {f.name} (no ClassId) is present; put GT-final_test.csv "
                 f"(from GTSRB_Final_Test_GT.zip) in {d.parent} to get labels")
    _add_rows(plan, f, d, "Filename", roi, labeled=False)
    return plan


def _plan_kaggle(plan: _Plan, root: Path, f: Path, roi: bool) -> _Plan:
    cols, _ = _read_csv(f)
    _need(cols, ["Path"], f)
    labeled = "ClassId" in cols
    if not labeled:
        plan.labels = None
        plan.note = f"{f.name} has no ClassId column: images loaded without labels"
    _add_rows(plan, f, root, "Path", roi, labeled=labeled)
    return plan
