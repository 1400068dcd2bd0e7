"""Outlier detection by the median absolute deviation (MAD), as in Neural Cleanse.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019, Sec. IV: a label whose reversed trigger is much smaller than the others' is a
backdoor target. With the trigger L1 norms ``x_i``, ``median = med(x)`` and
``MAD = med(|x_i - median|)``, the anomaly index is

    index_i = (median - x_i) / (1.4826 * MAD)

1.4826 is the consistency constant that makes ``1.4826 * MAD`` estimate the standard deviation of
normally distributed data. The index is *signed*: positive below the median (unusually small
triggers — the suspicious side), negative above it. A label is flagged when its index exceeds the
threshold (the paper uses 2: a single normal value exceeds it with probability 2.3 %).

That 2.3 % is per label. A scan tests every label, so the chance that a network *without* a
backdoor shows at least one flagged label is much larger: `null_flag_rate` estimates it, and the
index the top label of a backdoor-free network exceeds only 5 % of the time, by simulating
normally distributed norms (with 43 labels and threshold 2, about 64 %).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from backdoorlab.errors import BadInput

CONSISTENCY = 1.4826


def median_mad(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(median, MAD)`` of ``values``; MAD is the raw median absolute deviation (unscaled)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise BadInput("MAD: no values to compute a median from")
    if not np.all(np.isfinite(x)):
        raise BadInput("MAD: values must be finite numbers")
    from scipy.stats import median_abs_deviation  # scipy comes with scikit-learn

    return float(np.median(x)), float(median_abs_deviation(x, scale=1.0))


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


@dataclass
class NullFlagRate:
    """What the MAD test does on a network without a backdoor (Gaussian null, Monte Carlo).

    ``rate``: share of simulated backdoor-free scans in which at least one label's anomaly index
    exceeds ``threshold``. ``threshold_5pct``: the index that the most anomalous label exceeds in
    only 5 % of them (a family-wise 5 % threshold). ``draws``: simulated scans.
    """

    rate: float
    threshold: float
    threshold_5pct: float
    draws: int


def _null_tops(n_labels: int, n_reference: int | None, n_suspects: int, draws: int,
               seed: int) -> np.ndarray:
    """Simulated anomaly index of the most anomalous label in ``draws`` backdoor-free scans."""
    n_ref = n_labels if n_reference is None else n_reference
    if n_labels < 1 or not 1 <= n_ref <= n_labels or n_suspects < 0 or draws < 1:
        raise BadInput(f"null_flag_rate: bad sizes (labels {n_labels}, reference {n_ref}, "
                       f"suspects {n_suspects}, draws {draws})")
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((draws, n_ref))
    med = np.median(ref, axis=1)
    mad = np.median(np.abs(ref - med[:, None]), axis=1)
    lowest = ref.min(axis=1)
    others = n_labels - n_ref
    if n_suspects > 0 and others > 0:
        # smallest of `others` normal draws by inversion: Phi(min) = 1 - U**(1/others)
        u = 1.0 - rng.random(draws)  # in (0, 1]
        p = -np.expm1(np.log(u) / others)
        other_min = torch.special.ndtri(torch.from_numpy(p)).numpy()  # CPU-only: host numbers
        lowest = np.minimum(lowest, other_min)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mad > 0, (med - lowest) / (CONSISTENCY * mad),
                        np.where(med > lowest, math.inf, 0.0))


def null_flag_rate(n_labels: int, threshold: float | None = 2.0, n_reference: int | None = None,
                   n_suspects: int = 0, draws: int = 20000, seed: int = 0) -> NullFlagRate:
    """Chance that the MAD test flags at least one of ``n_labels`` labels when none is a backdoor.

    Model: the labels' mask norms are independent normal draws (the natural spread of a clean
    network's norms; on our clean GTSRB model a Shapiro-Wilk test does not reject normality). The
    median and MAD come from ``n_reference`` of them (None: all ``n_labels``, as in full mode).
    With ``n_suspects > 0`` (Neural Cleanse's fast mode) the labels outside the reference sample
    are screened and the most suspicious ones tested too; the simulation assumes the screen finds
    the smallest of them, which can only raise the rate. Deterministic for a given ``seed``.
    ``threshold=None`` uses ``threshold_5pct`` itself as the threshold (rate ≈ 0.05).
    """
    top = _null_tops(n_labels, n_reference, n_suspects, draws, seed)
    thr5 = float(np.quantile(top, 0.95))
    thr = thr5 if threshold is None else float(threshold)
    return NullFlagRate(rate=float(np.mean(top > thr)), threshold=thr, threshold_5pct=thr5,
                        draws=int(draws))


def null_p_value(top_index, n_labels: int, n_reference: int | None = None, n_suspects: int = 0,
                 draws: int = 20000, seed: int = 0):
    """Model-level p-value of a scan: the chance that the most anomalous label of a backdoor-free
    network (the Gaussian null of `null_flag_rate`, same scan shape) has an anomaly index of at
    least ``top_index``. Monte Carlo with the add-one rule, so it is never below 1 / (draws + 1).
    A small value says the label is too anomalous to be the extreme of ``n_labels`` ordinary
    labels — the question the per-label threshold of 2 does not answer. ``top_index`` may be a
    sequence (one p-value each, from the same simulated scans)."""
    x = np.asarray(top_index, dtype=np.float64)
    top = np.sort(_null_tops(n_labels, n_reference, n_suspects, draws, seed))
    exceed = top.size - np.searchsorted(top, np.nan_to_num(x, nan=-math.inf), side="left")
    p = (1 + exceed) / (draws + 1)
    return float(p) if p.ndim == 0 else p.tolist()


def null_note(rate: float, thr5: float, threshold: float, p_value: float | None = None) -> str:
    """One sentence on how often a backdoor-free network would show a flag in this scan (and, given
    ``p_value``, how likely its top index is for such a network)."""
    text = (f"Chance of at least one flag on a network without a backdoor (scan of this shape, "
            f"normally distributed norms): {rate:.0%} at threshold {threshold:.3g}; an index above "
            f"{thr5:.2f} happens by chance in 5 % of such networks.")
    if p_value is not None:
        text += (f" This scan's most anomalous label: p = {p_value:.3g} (model-level; below 0.05 "
                 "= a backdoor at the 5 % level).")
    return text
