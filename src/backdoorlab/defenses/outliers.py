"""Outlier detection by the median absolute deviation (MAD), as in Neural Cleanse.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019, Sec. IV: a label whose reversed trigger is much smaller than the others' is a
backdoor target. With the trigger L1 norms ``x_i``, ``median = med(x)`` and
``MAD = med(|x_i - median|)``, the anomaly index is

    index_i = (median - x_i) / (1.4826 * MAD)

1.4826 is the consistency constant that makes ``1.4826 * MAD`` estimate the standard deviation of
normally distributed data. The index is *signed*: positive below the median (unusually small
triggers — the suspicious side), negative above it. A label is flagged when its index exceeds the
threshold (the paper uses 2: a normal value exceeds it with probability below 5 %).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from backdoorlab.errors import BadInput

CONSISTENCY = 1.4826


def median_mad(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(median, MAD)`` of ``values``; MAD is the raw median absolute deviation (unscaled)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise BadInput("MAD: no values to compute a median from")
    if not np.all(np.isfinite(x)):
        raise BadInput("MAD: values must be finite numbers")
    med = float(np.median(x))
    return med, float(np.median(np.abs(x - med)))


def anomaly_index(values: Sequence[float] | np.ndarray, median: float, mad: float) -> np.ndarray:
    """Signed anomaly index ``(median - x) / (1.4826 * MAD)`` per value.

    With ``MAD == 0`` (at least half the values equal the median) any value below the median is
    infinitely anomalous: +inf below, -inf above, 0 at the median.
    """
    x = np.asarray(values, dtype=np.float64)
    diff = median - x
    if mad > 0:
        return diff / (CONSISTENCY * mad)
    out = np.zeros_like(x)
    out[diff > 0] = math.inf
    out[diff < 0] = -math.inf
    return out


@dataclass
class OutlierResult:
    """MAD outlier test over labelled values.

    ``median``/``mad`` come from the reference values (all values unless a reference subset was
    given); ``index[i]`` is the signed anomaly index of ``values[i]``; ``flagged`` lists the keys
    whose index exceeds ``threshold``, most anomalous first; ``smallest`` the ``top_k`` keys with
    the smallest values (smallest first).
    """

    keys: list[int]
    values: list[float]
    index: list[float]
    median: float
    mad: float
    threshold: float
    flagged: list[int]
    smallest: list[int]
    reference: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def detect_outliers(values: dict[int, float], threshold: float = 2.0, top_k: int = 3,
                    reference: Sequence[int] | None = None) -> OutlierResult:
    """MAD test on ``values`` (label → L1 norm).

    ``reference``: the labels whose values estimate the median and MAD (default: all). Neural
    Cleanse's fast mode passes a random sample of labels here, so that labels picked *because*
    they looked small do not bias the estimate.
    """
    if not values:
        raise BadInput("outlier test: no values")
    if threshold < 0 or not math.isfinite(threshold):
        raise BadInput(f"anomaly threshold must be a finite non-negative number, got {threshold}")
    keys = sorted(values)
    x = np.array([values[k] for k in keys], dtype=np.float64)
    ref = list(keys) if reference is None else sorted(set(int(r) for r in reference))
    missing = [r for r in ref if r not in values]
    if missing:
        raise BadInput(f"outlier test: reference labels {missing[:5]} have no value")
    if not ref:
        raise BadInput("outlier test: empty reference set")
    med, mad = median_mad([values[r] for r in ref])
    idx = anomaly_index(x, med, mad)
    flagged = [keys[i] for i in np.argsort(-idx, kind="stable") if idx[i] > threshold]
    order = np.argsort(x, kind="stable")
    smallest = [keys[i] for i in order[: max(0, top_k)]]
    return OutlierResult(keys=keys, values=x.tolist(), index=idx.tolist(), median=med, mad=mad,
                         threshold=float(threshold), flagged=flagged, smallest=smallest,
                         reference=ref)
