"""Trigger preview images: clean inputs above, triggered inputs below (and the amplified
difference for invisible triggers)."""

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


def save_trigger_preview(data: ImageSet, triggers: list, path: Path, count: int = 6) -> None:
    from PIL import Image

    grid = preview_grid(data.images, triggers, count)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
