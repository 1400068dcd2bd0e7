"""The grid's heatmaps: attack × defense of the ASR after each repair and of the change in clean
accuracy it costs (means over seeds), rendered with matplotlib's Agg canvas (no pyplot)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from backdoorlab.io import atomic_path


def plot_heatmap(values: list[list[float | None]], rows: list[str], cols: list[str], title: str,
                 path: str | os.PathLike, cmap: str = "Reds", center: float | None = None,
                 unit: str = "%") -> Path:
    """Write a PNG of ``values[i][j]`` (None: not computed) with the number in every cell."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = np.array([[math.nan if v is None else v for v in r] for r in values], dtype=float)
    fig = Figure(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.55 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = a[np.isfinite(a)]
    vmin, vmax = 0.0, 100.0  # shares in %
    if center is not None and finite.size:
        span = max(1e-9, float(np.abs(finite - center).max()))
        vmin, vmax = center - span, center + span
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            text = "—" if not np.isfinite(a[i, j]) else f"{a[i, j]:.1f}"
            shade = im.cmap(im.norm(a[i, j])) if np.isfinite(a[i, j]) else (1, 1, 1, 1)
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5  # white text on dark cells
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=unit)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
