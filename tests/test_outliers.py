"""MAD outlier test (Neural Cleanse's anomaly index), checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backdoorlab.defenses.outliers import (
    CONSISTENCY,
    anomaly_index,
    detect_outliers,
    median_mad,
    null_flag_rate,
)
from backdoorlab.errors import BadInput


def test_median_mad_by_hand():
    # median 24; |x - 24| = 14 4 2 0 2 4 6 -> sorted 0 2 2 4 4 6 14 -> MAD 4
    assert median_mad([10, 20, 22, 24, 26, 28, 30]) == (24.0, 4.0)
    # even count: median 2.5; deviations 1.5 .5 .5 1.5 -> MAD 1.0
    assert median_mad([4, 1, 3, 2]) == (2.5, 1.0)


def test_anomaly_index_sign_and_value():
    x = [10, 20, 22, 24, 26, 28, 30]
    idx = anomaly_index(x, 24.0, 4.0)
    assert CONSISTENCY == 1.4826
    assert idx[0] == pytest.approx(14 / (1.4826 * 4))  # 2.3607: below the median -> positive
    assert idx[1] == pytest.approx(4 / 5.9304)
    assert idx[3] == 0.0
    assert idx[-1] == pytest.approx(-6 / 5.9304)  # above the median -> negative


def test_flagging_only_small_side():
    values = {0: 10.0, 1: 20.0, 2: 22.0, 3: 24.0, 4: 26.0, 5: 28.0, 6: 60.0}
    # median 24, deviations 14 4 2 0 2 4 36 -> MAD 4; label 6 is far *above*: index -6.07
    res = detect_outliers(values, threshold=2.0, top_k=2)
    assert res.median == 24.0 and res.mad == 4.0
    assert res.flagged == [0]
    assert res.index[6] == pytest.approx(-36 / 5.9304)
    assert res.smallest == [0, 1]
    assert detect_outliers(values, threshold=2.5).flagged == []  # 2.36 < 2.5


def test_flagged_ordered_by_index():
    values = {7: 1.0, 3: 5.0, 1: 40.0, 2: 41.0, 4: 42.0, 5: 43.0, 6: 44.0}
    res = detect_outliers(values, threshold=2.0)
    assert res.flagged == [7, 3]


def test_reference_subset():
    values = {0: 5.0, 1: 30.0, 2: 32.0, 3: 34.0, 4: 1.0}
    res = detect_outliers(values, reference=[1, 2, 3])
    assert res.median == 32.0 and res.mad == 2.0
    assert res.index[0] == pytest.approx(27 / (1.4826 * 2))
    assert res.flagged == [4, 0]
    with pytest.raises(BadInput):
        detect_outliers(values, reference=[1, 99])


def test_zero_mad():
    idx = anomaly_index(np.array([3.0, 3.0, 3.0, 1.0, 5.0]), 3.0, 0.0)
    assert idx[3] == math.inf and idx[4] == -math.inf and idx[0] == 0.0


def test_bad_values():
    with pytest.raises(BadInput):
        median_mad([])
    with pytest.raises(BadInput):
        median_mad([1.0, float("nan")])
    with pytest.raises(BadInput):
        detect_outliers({})


def _brute_null_rate(n: int, n_ref: int | None, n_sus: int, threshold: float, draws: int,
                     seed: int) -> float:
    """Run the real MAD test on simulated backdoor-free scans (normal norms), fast-mode selection
    included: reference = random sample, suspects = the smallest labels overall."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(draws):
        x = rng.standard_normal(n)
        if n_ref is None:
            tested, ref = list(range(n)), None
        else:
            ref = sorted(rng.choice(n, size=n_ref, replace=False).tolist())
            tested = sorted(set(ref) | set(np.argsort(x)[:n_sus].tolist()))
        res = detect_outliers({i: float(x[i]) for i in tested}, threshold, 0, reference=ref)
        hits += bool(res.flagged)
    return hits / draws


def test_null_flag_rate_matches_the_mad_test_full_mode():
    # 43 labels, threshold 2: a backdoor-free network shows a flag in about 64 % of scans
    est = null_flag_rate(43, 2.0, draws=20000, seed=1)
    assert est.rate == pytest.approx(_brute_null_rate(43, None, 0, 2.0, 3000, seed=2), abs=0.035)
    assert 0.55 < est.rate < 0.72
    # the 5 % threshold is where the rate falls to 5 %
    at5 = null_flag_rate(43, est.threshold_5pct, draws=20000, seed=3)
    assert at5.rate == pytest.approx(0.05, abs=0.01)
    assert null_flag_rate(43, 3.0).rate < null_flag_rate(43, 2.5).rate < est.rate


def test_null_flag_rate_matches_the_mad_test_fast_mode():
    est = null_flag_rate(60, 2.0, n_reference=20, n_suspects=5, draws=20000, seed=1)
    brute = _brute_null_rate(60, 20, 5, 2.0, 3000, seed=4)
    assert est.rate == pytest.approx(brute, abs=0.035)
    # testing the screen's suspects against a small reference sample raises the rate
    assert est.rate > null_flag_rate(20, 2.0, draws=20000, seed=1).rate + 0.1


def test_null_flag_rate_bad_sizes():
    with pytest.raises(BadInput):
        null_flag_rate(0)
    with pytest.raises(BadInput):
        null_flag_rate(10, n_reference=11)


def test_null_p_value_is_calibrated_on_backdoor_free_scans():
    from backdoorlab.defenses.outliers import null_flag_rate, null_p_value

    thr5 = null_flag_rate(43, None).threshold_5pct
    assert abs(null_p_value(thr5, 43) - 0.05) < 0.002
    ps = null_p_value([1.0, 2.0, 3.0, 5.0, math.inf], 43)
    assert ps == sorted(ps, reverse=True) and ps[-1] == 1 / 20001 and null_p_value(-1.0, 43) == 1.0
    # scans of backdoor-free networks drawn independently of the null's own simulation: about 5 %
    # of their model-level p-values fall below 0.05
    rng = np.random.default_rng(123)
    tops = []
    for _ in range(2000):
        x = rng.normal(50, 8, 43)
        r = detect_outliers(dict(enumerate(x)))
        tops.append(max(r.index))
    rate = np.mean(np.asarray(null_p_value(tops, 43)) < 0.05)
    assert 0.035 < rate < 0.065
