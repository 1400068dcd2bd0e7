"""The input-detector family: fitted on the defender's clean data, it gives every input a
suspicion score (larger = more likely backdoored); the decision threshold is chosen on clean
data at a requested false-alarm rate.

A detector is ``fit(clf, clean, opts) -> Scorer`` registered with
`backdoorlab.registry.register(..., family="input-detector")` in its own module of this package.
`calibrate` sets the threshold from clean scores; `evaluate` reports, on clean and poisoned test
inputs, the detection rate at that threshold, the false-alarm rate actually measured and the
AUROC. An `InputFilter` answers "reject" (class N of a GoodNet) for inputs above the threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.models.classifier import Classifier


@dataclass
class Scorer:
    """What a fitted detector returns. ``score(images uint8 NHWC) -> float array (N,)``, larger =
    more suspicious. ``statistic``: what the score is (e.g. "negative mean entropy")."""

    score: Callable[[np.ndarray], np.ndarray]
    statistic: str
    details: dict = field(default_factory=dict)


@dataclass
class InputFilter:
    """A scorer with its threshold: inputs scoring above it are rejected."""

    method: str
    scorer: Scorer
    threshold: float
    far: float  # the false-alarm rate the threshold was chosen for
    n_fit: int = 0          # clean images the detector was fitted on
    n_calibration: int = 0  # held-back clean images the threshold was set on

    def reject(self, images: np.ndarray) -> np.ndarray:
        return self.scorer.score(images) > self.threshold


def calibrate(clean_scores: np.ndarray, far: float) -> float:
    """The threshold above which a share ``far`` of clean inputs lies (their (1 - far) quantile)."""
    from backdoorlab.errors import BadInput

    s = np.asarray(clean_scores, dtype=np.float64).reshape(-1)
    if not 0.0 < far < 1.0:
        raise BadInput(f"false-alarm rate must lie in (0, 1), got {far}")
    if not len(s) or not np.all(np.isfinite(s)):
        raise BadInput("calibration needs finite scores of at least one clean input")
    return float(np.quantile(s, 1.0 - far, method="higher"))


@dataclass
class InputDetectResult:
    method: str
    options: dict
    threshold: float
    far_requested: float
    far_measured: float | None      # share of clean test inputs rejected
    detection_rate: float | None    # share of poisoned test inputs rejected
    auroc: float | None
    n_clean: int
    n_poisoned: int
    seconds: float
    passes: int
    statistic: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "input-detect", **asdict(self),
                "cost": {"seconds": self.seconds, "image_passes": self.passes}}


def resolve_options(name: str, options: Any = None) -> Any:
    """The Options instance of detector ``name``: its defaults (None), a checked mapping, or as
    given."""
    from backdoorlab import registry
    from backdoorlab.options import from_mapping

    method = registry.get(name, "input-detector")
    if options is None:
        return method.options()
    if isinstance(options, dict):
        return from_mapping(method.options, options, f"detect {name}")
    return options


def fit_filter(name: str, clf: Classifier, clean: ImageSet, options: Any = None, far: float = 0.05,
               calibration_fraction: float = 0.2, seed: int = 0) -> InputFilter:
    """Fit detector ``name`` on part of ``clean`` and set its threshold at false-alarm rate ``far``
    on the held-back ``calibration_fraction`` (scores of the images the detector was fitted on
    would be optimistic)."""
    from backdoorlab import registry
    from backdoorlab.errors import BadInput

    method = registry.get(name, "input-detector")
    options = resolve_options(name, options)
    if not 0.0 < far < 1.0:
        raise BadInput(f"false-alarm rate must lie in (0, 1), got {far}")
    if not 0.0 < calibration_fraction < 1.0:
        raise BadInput(f"calibration fraction must lie in (0, 1), got {calibration_fraction}")
    n = len(clean)
    if n < 2:
        raise BadInput(f"{name}: needs at least 2 clean images (some to fit on, some to set the "
                       f"threshold on), got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    k = min(n - 1, max(1, int(round(calibration_fraction * n))))
    cal, fit = clean.subset(np.sort(order[:k])), clean.subset(np.sort(order[k:]))
    scorer = method.run(clf, fit, options)
    return InputFilter(name, scorer, calibrate(scorer.score(cal.images), far), far, len(fit), len(cal))


def evaluate(name: str, clf: Classifier, clean: ImageSet, clean_test: ImageSet | None,
             poisoned_test: Any = None, options: Any = None, far: float = 0.05,
             seed: int = 0, calibration_fraction: float = 0.2) -> InputDetectResult:
    """Fit, calibrate on ``clean``, then score ``clean_test`` and ``poisoned_test``.

    ``poisoned_test``: one set or a list of sets (`ImageSet`, or `backdoorlab.poisoned.PoisonedSet`
    holding only the inputs that count); the detection rate and AUROC are over all their inputs
    together, ``details["per_set"]`` has them per set."""
    from backdoorlab import cost, registry

    method = registry.get(name, "input-detector")
    options = resolve_options(name, options)
    sets = [] if poisoned_test is None else list(poisoned_test) if isinstance(poisoned_test, list | tuple) \
        else [poisoned_test]
    t0 = time.perf_counter()
    with cost.counting() as passes:
        filt = fit_filter(name, clf, clean, options, far, calibration_fraction, seed=seed)
        sc = filt.scorer.score(clean_test.images) if clean_test is not None else None
        per = [filt.scorer.score(p.images) for p in sets]
    sp = np.concatenate(per) if per else None
    per_set = {}
    for i, (p, s) in enumerate(zip(sets, per, strict=True)):
        key = str(getattr(p, "name", "") or f"poisoned#{i + 1}")
        per_set[key if key not in per_set else f"{key}#{i + 1}"] = {
            "n": len(s), "detection_rate": float(np.mean(s > filt.threshold)) if len(s) else None,
            "auroc": auroc(sc, s)}
    details = {**filt.scorer.details, "paper": method.paper,
               "clean_split": {"fitted_on": filt.n_fit, "threshold_set_on": filt.n_calibration}}
    if per_set:
        details["per_set"] = per_set
    return InputDetectResult(
        name, asdict(options), filt.threshold, far,
        None if sc is None or not len(sc) else float(np.mean(sc > filt.threshold)),
        None if sp is None or not len(sp) else float(np.mean(sp > filt.threshold)), auroc(sc, sp),
        0 if sc is None else len(sc), 0 if sp is None else len(sp),
        round(time.perf_counter() - t0, 2), passes.images, filt.scorer.statistic, details)


def auroc(clean_scores: np.ndarray | None, poisoned_scores: np.ndarray | None) -> float | None:
    """Area under the ROC curve of poisoned (positive) vs clean scores; None without both."""
    if clean_scores is None or poisoned_scores is None or not len(clean_scores) \
            or not len(poisoned_scores):
        return None
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(poisoned_scores))]
    return float(roc_auc_score(y, np.r_[clean_scores, poisoned_scores]))
