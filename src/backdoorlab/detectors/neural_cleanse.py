"""Neural Cleanse (Wang et al., IEEE S&P 2019) as a model detector: reverse-engineer, for every
label, the smallest trigger that sends clean images to it; a label whose mask norm is an outlier
below the others (MAD anomaly index) is the suspected target. The scan itself is
`backdoorlab.defenses.neural_cleanse` (batched, with a fast pre-screen mode).

The verdict is calibrated: the paper flags any label above index 2, a per-label rule that on a
backdoor-free 43-label network fires 64 % of the time (`outliers.null_flag_rate`). Here the model
is reported backdoored when the top label's index is improbable as the extreme of this many
ordinary labels (``p_value`` < ``alpha``, Gaussian null of the norms, `outliers.null_p_value`),
and the flagged labels are those whose own index passes that test. ``threshold`` restores the
paper's rule (flag above a fixed index; ``backdoored`` = any flag)."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.detectors import Detection
from backdoorlab.options import opt
from backdoorlab.registry import register


@dataclass
class Options:
    mode: str = opt("fast", "full = optimise every label; fast = screen, then optimise the suspects "
                    "and a random reference sample", choices=("fast", "full"))
    labels: str = opt("all", "labels to scan: all, or e.g. 0,3,5 / 10-19")
    steps: int | None = opt(None, "cap on optimisation steps per label (default: the paper's budget)",
                            low=1)
    batch: int = opt(32, "images per label per step", low=1)
    images: int = opt(1000, "clean images used (a seeded sample; 0 = all)", low=0)
    alpha: float = opt(0.05, "flag when the chance of so anomalous a label on a backdoor-free network "
                       "(model-level p-value) is below this", low=0, high=1, low_open=True, high_open=True)
    threshold: float | None = opt(None, "instead of alpha, the paper's rule: flag every label whose "
                                  "anomaly index exceeds this (the paper: 2)", low=0)
    suspects: int = opt(10, "fast mode: labels fully optimised from the screen", low=0)
    reference_labels: int = opt(32, "fast mode: random labels for the median and MAD", low=1)
    screen_steps: int = opt(40, "fast mode: steps of the screen round", low=1)
    seed: int = opt(0, "seed", low=0)


@register("neural-cleanse", "model-detector", Options,
          paper="Wang et al., Neural Cleanse, IEEE S&P 2019",
          summary="smallest reversed trigger per label; MAD outlier labels are flagged")
def run(clf, clean, o: Options) -> Detection:
    from backdoorlab.defenses.neural_cleanse import NCConfig, neural_cleanse
    from backdoorlab.options import parse_labels

    cfg = NCConfig(mode=o.mode, labels=parse_labels(o.labels, clf.num_classes), max_steps=o.steps,
                   batch_size=o.batch, num_images=o.images or None,
                   threshold=2.0 if o.threshold is None else o.threshold, suspects=o.suspects,
                   reference_labels=o.reference_labels, screen_steps=o.screen_steps, seed=o.seed)
    res = neural_cleanse(clf, clean, cfg)
    scores = {r.label: r.anomaly_index for r in res.labels if r.anomaly_index is not None}
    top = max(scores.values(), default=None)
    details = {"median": res.median, "mad": res.mad, "mode": res.mode, "labels_scanned": len(res.labels),
               "max_anomaly_index": top, "null_index_5pct": res.null_threshold_5pct,
               "label_p_values": {str(k): v for k, v in res.label_p_values.items()}}
    if o.threshold is not None:  # the paper's per-label rule
        details.update(rule=f"anomaly index > {o.threshold:g}", threshold=o.threshold,
                       null_flag_rate=res.null_flag_rate)
        return Detection(scores, list(res.flagged), bool(res.flagged), top, "max anomaly index",
                         res.triggers, details, p_value=res.p_value)
    flagged = sorted((y for y, p in res.label_p_values.items() if p < o.alpha),
                     key=lambda y: (res.label_p_values[y], -scores.get(y, 0.0), y))
    details.update(rule=f"model-level p-value < {o.alpha:g}", alpha=o.alpha)
    p = res.p_value if res.p_value is not None else 1.0
    return Detection(scores, flagged, p < o.alpha, p, STATISTIC_NAME, res.triggers, details, p_value=p)


STATISTIC_NAME = "p-value (top anomaly index under a Gaussian null)"
