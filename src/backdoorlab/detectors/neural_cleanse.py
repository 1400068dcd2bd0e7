"""Neural Cleanse (Wang et al., IEEE S&P 2019) as a model detector: reverse-engineer, for every
label, the smallest trigger that sends clean images to it; a label whose mask norm is an outlier
below the others (MAD anomaly index > ``threshold``, the paper's 2) is the suspected target. The
scan itself is `backdoorlab.defenses.neural_cleanse` (batched, with a fast pre-screen mode)."""

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
    threshold: float = opt(2.0, "anomaly index above which a label is flagged", low=0)
    auto_threshold: bool = opt(False, "flag only above the index a backdoor-free network exceeds in "
                               "5 % of scans of this shape (instead of threshold)")
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
                   threshold="auto" if o.auto_threshold else o.threshold, suspects=o.suspects,
                   reference_labels=o.reference_labels, screen_steps=o.screen_steps, seed=o.seed)
    res = neural_cleanse(clf, clean, cfg)
    scores = {r.label: r.anomaly_index for r in res.labels if r.anomaly_index is not None}
    top = max(scores.values(), default=None)
    return Detection(scores, list(res.flagged), bool(res.flagged), top, "max anomaly index",
                     res.triggers, {"threshold": res.threshold, "median": res.median, "mad": res.mad,
                                    "null_flag_rate": res.null_flag_rate, "mode": res.mode,
                                    "labels_scanned": len(res.labels)})
