"""Trigger preview images: clean inputs above, triggered inputs below and their amplified
difference (which shows invisible triggers), as a labelled figure or a raw grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.io import atomic_path


def preview_grid(images: np.ndarray, triggers: list, count: int = 6, upscale: int = 4) -> np.ndarray:
    """A uint8 RGB grid: row 0 clean; then per trigger the triggered images and |diff| × 10."""
    x = images[:count]
    rows = [x]
    for trig in triggers:
        p = trig.apply(x)
        rows.append(p)
        diff = np.abs(p.astype(np.int16) - x.astype(np.int16)) * 10
        rows.append(np.clip(diff, 0, 255).astype(np.uint8))
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    if grid.shape[2] == 1:
        grid = np.repeat(grid, 3, axis=2)
    return grid.repeat(upscale, axis=0).repeat(upscale, axis=1)


def _trigger_name(trig) -> str:
    text = str(trig)
    return text if len(text) <= 48 else text[:45] + "…"


def save_trigger_preview(data: ImageSet, triggers: list, path: Path, count: int = 6,
                         names: list[str] | None = None) -> None:
    """A labelled figure: one column per image, a gap between images, and rows named on the left —
    clean, then per trigger the triggered images and their amplified difference. ``names``: one
    row label per trigger (e.g. its spec and target; default: the trigger's own description)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = data.images[:count]
    rows: list[tuple[str, np.ndarray]] = [("clean", x)]
    for i, trig in enumerate(triggers):
        p = trig.apply(x)
        diff = np.clip(np.abs(p.astype(np.int16) - x.astype(np.int16)) * 10, 0, 255).astype(np.uint8)
        name = names[i] if names else _trigger_name(trig)
        rows += [(f"triggered\n{name}", p), ("difference × 10", diff)]
    n = len(x)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1.8, 1.35 * len(rows)), squeeze=False,
                             gridspec_kw={"wspace": 0.08, "hspace": 0.18})
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c]
            ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
