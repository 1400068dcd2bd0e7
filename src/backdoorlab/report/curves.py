"""Plots of pruning sweeps: accuracy and attack success rate vs the share of channels pruned.

Rendered with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
headless and leaves other users of matplotlib alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from backdoorlab.io import atomic_path

ORDER_LABEL = {"increasing": "increasing mean activation", "decreasing": "decreasing mean activation",
               "abs": "increasing mean |activation|", "random": "random (seeded)"}
UNIT_LABEL = {"points": "percentage points", "relative": "% of the unpruned accuracy"}


def plot_sweep(result, path: str | os.PathLike, title: str | None = None, dpi: int = 120) -> Path:
    """Write a PNG of a `PruneSweepResult`: validation accuracy, clean test accuracy and ASR (in %)
    vs the fraction of channels pruned (in %), with the drop thresholds marked as vertical lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [100.0 * f for f in result.fraction]
    fig = Figure(figsize=(7.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, [100 * v for v in result.valid_accuracy], label="validation accuracy", color="C0",
            lw=1.8)
    if result.test_accuracy is not None:
        ax.plot(x, [100 * v for v in result.test_accuracy], label="clean test accuracy",
                color="C2", lw=1.5, ls="--")
    sets = getattr(result, "poisoned_sets", None) or []
    curves = getattr(result, "asr_sets", None) or ([result.asr] if result.asr is not None else [])
    for i, asr in enumerate(curves):  # one ASR line per poisoned set
        d = sets[i] if i < len(sets) else {"target": result.target, "name": ""}
        which = "per-image targets" if d["target"] is None else f"target {d['target']}"
        name = f"{d['name']}, " if len(curves) > 1 else ""
        ax.plot(x, [100 * v for v in asr], label=f"attack success rate ({name}{which})",
                color=("C3", "C1", "C4", "C5", "C6", "C8")[i % 6], lw=1.8)
    marks = _drop_marks(result)
    for fx, drop, level in marks:
        ax.axvline(fx, color="0.45", lw=0.8, ls=":")
        ax.annotate(f"-{drop:g}", (fx, 101 + 4.5 * level), fontsize=7, ha="center", va="bottom",
                    color="0.3", annotation_clip=False)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    order = ORDER_LABEL.get(result.order, result.order)
    ax.set_xlabel(f"channels of {result.layer} pruned (%), order: {order}")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    # below the axes, so that it never covers a curve
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    unit = UNIT_LABEL.get(result.drop_unit, result.drop_unit)
    ax.set_title(title or f"Pruning sweep of {result.layer} (drops marked in {unit})", fontsize=10,
                 pad=14 + 9 * max((m[2] for m in marks), default=0))
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _drop_marks(result) -> list[tuple[float, float, int]]:
    """(x in %, drop, stacking level) of each reached threshold: a label closer than 4 % of the axis
    to the previous one goes one line higher, so that the labels never overlap."""
    marks, last_x, level = [], -1e9, 0
    for t in result.thresholds:
        if t.reached:
            fx = 100.0 * result.fraction[t.step]
            level = level + 1 if fx - last_x < 4.0 else 0
            marks.append((fx, t.drop, level))
            last_x = fx
    return marks
