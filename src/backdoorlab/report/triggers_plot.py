"""Figures for reversed triggers (Neural Cleanse): mask / pattern PNGs, a grid of the smallest
triggers and a plot of the mask norms with the flagged labels marked.

Matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend
switch); single images are written with Pillow. Every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backdoorlab.io import atomic_path

CONSISTENCY = 1.4826


def _upscale(img: np.ndarray, target: int = 160) -> np.ndarray:
    f = max(1, target // max(img.shape[0], img.shape[1]))
    return img.repeat(f, axis=0).repeat(f, axis=1)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(_upscale(img)).save(tmp, format="PNG")


def save_trigger_pngs(folder: str | os.PathLike, label: int, mask: np.ndarray,
                      pattern: np.ndarray) -> list[Path]:
    """Write ``label_<y>_mask.png`` (grey, white = 1), ``label_<y>_pattern.png`` and
    ``label_<y>_masked.png`` (m·p, the trigger as stamped on a black image); mask (H, W) and pattern
    (H, W, C) in [0, 1]. Images are enlarged by an integer factor (nearest neighbour)."""
    folder = Path(folder)
    m = np.asarray(mask, dtype=np.float32)
    p = np.asarray(pattern, dtype=np.float32)
    out = []
    for suffix, img in (("mask", m), ("pattern", p), ("masked", m[..., None] * p)):
        path = folder / f"label_{label}_{suffix}.png"
        _save_png(_to_uint8(img), path)
        out.append(path)
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _savefig(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def plot_trigger_grid(items: Sequence[tuple[int, np.ndarray, np.ndarray, str]],
                      path: str | os.PathLike, title: str = "") -> None:
    """One column per trigger ``(label, mask, pattern, caption)``: rows mask, pattern, m·p."""
    if not items:
        return
    n = len(items)
    fig = _figure(1.6 * n + 0.6, 5.2)
    axes = fig.subplots(3, n, squeeze=False)
    for j, (label, mask, pattern, caption) in enumerate(items):
        m = np.asarray(mask, dtype=np.float32)
        p = np.asarray(pattern, dtype=np.float32)
        grey = p.shape[-1] == 1
        rows = [(m, "gray"), (p[..., 0] if grey else p, "gray" if grey else None),
                ((m[..., None] * p)[..., 0] if grey else m[..., None] * p, "gray" if grey else None)]
        for i, (img, cmap) in enumerate(rows):
            ax = axes[i][j]
            ax.imshow(np.clip(img, 0, 1), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(f"label {label}\n{caption}", fontsize=8)
    for i, name in enumerate(("mask", "pattern", "mask·pattern")):
        axes[i][0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _savefig(fig, path)


def plot_norms(labels: Sequence[int], norms: Sequence[float], flagged: Sequence[int],
               path: str | os.PathLike, median: float | None = None, mad: float | None = None,
               threshold: float = 2.0, title: str = "") -> None:
    """Mask L1 norm per label: sorted bars (≤ 60 labels) or a box plot with every label as a dot
    (more labels); flagged labels in red and named. Dashed line: median; dotted line: the flagging
    boundary ``median − threshold·1.4826·MAD``."""
    ys = np.asarray(labels)
    x = np.asarray(norms, dtype=np.float64)
    flag = np.isin(ys, np.asarray(list(flagged), dtype=ys.dtype if len(ys) else np.int64))
    order = np.argsort(x, kind="stable")
    ys, x, flag = ys[order], x[order], flag[order]
    colors = np.where(flag, "tab:red", "tab:blue")
    boundary = None
    if median is not None and mad is not None:
        boundary = median - threshold * CONSISTENCY * mad
    if len(x) <= 60:
        fig = _figure(max(4.0, 0.22 * len(x) + 1.5), 3.4)
        ax = fig.add_subplot(1, 1, 1)
        pos = np.arange(len(x))
        ax.bar(pos, x, color=colors)
        ax.set_xticks(pos)
        ax.set_xticklabels([str(y) for y in ys], rotation=90, fontsize=7)
        ax.set_xlabel("label (sorted by mask norm)")
        lines = ax.axhline
    else:
        fig = _figure(4.5, 4.0)
        ax = fig.add_subplot(1, 1, 1)
        ax.boxplot(x, widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(x))
        ax.scatter(1 + jitter, x, s=np.where(flag, 28, 6), c=colors, alpha=0.8, linewidths=0)
        for y, v in zip(ys[flag], x[flag], strict=True):
            ax.annotate(str(y), (1.2, v), fontsize=7, color="tab:red")
        ax.set_xticks([1])
        ax.set_xticklabels([f"{len(x)} labels"])
        lines = ax.axhline
    if median is not None:
        lines(median, color="0.3", linestyle="--", linewidth=0.8, label="median")
    if boundary is not None and boundary > 0:
        lines(boundary, color="tab:red", linestyle=":", linewidth=0.8,
              label=f"anomaly index {threshold:g}")
    if median is not None:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("mask L1 norm")
    if title:
        ax.set_title(title, fontsize=9)
    _savefig(fig, path)


def plot_detection_triggers(detection, path: str | os.PathLike, name: str, most: int = 5) -> bool:
    """The reversed triggers of a model detector's answer (a `backdoorlab.detectors.Detection`) as
    one grid: its flagged labels (at most ``most``), or, when it flags none, the three labels it
    scores most suspicious. Returns False (and writes nothing) when it reversed no trigger."""
    triggers, scores = detection.triggers, detection.scores
    if not triggers:
        return False
    flagged = [y for y in detection.flagged if y in triggers][:most]
    labels = flagged or sorted(triggers, key=lambda y: -scores.get(y, float("-inf")))[:3]
    items = [(y, *triggers[y], ("flagged; " if y in flagged else "")
              + (f"score {scores[y]:.3g}" if y in scores else "")) for y in labels]
    which = "flagged labels" if flagged else "most suspicious labels (none flagged)"
    plot_trigger_grid(items, path, title=f"{name}: reversed triggers of the {which}")
    return True
