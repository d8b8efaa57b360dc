"""Intervals of a mean over held-out scans (evaluate/intervals.py): Student's t against SciPy's
own one-sample interval, the percentile bootstrap against a direct reading of its definition (the
resamples every table up to stop 52 drew), the expanded bootstrap as the percentile one at its
widened level, and each method's rate of ties read as differences."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cardiomotion.choices import IntervalMethod
from cardiomotion.evaluate.intervals import mean_interval, mean_intervals


def _percentile_reference(v, n_boot=2000, level=0.95, seed=0):
    """The percentile bootstrap written out: resample the scans, take the means' quantiles."""
    v = np.asarray(v, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def test_student_t_is_scipys_one_sample_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, lo, hi = mean_interval(values, IntervalMethod.STUDENT_T)
    want = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert mean == 2.5 and (lo, hi) == pytest.approx((want.low, want.high), rel=1e-12)
    # by hand: t(3, 0.975) = 3.1824, s = 1.2910, half-width 3.1824 · 1.2910 / 2 = 2.0543
    assert hi - mean == pytest.approx(2.0543, abs=1e-4)
    rows = np.random.default_rng(1).normal(size=(5, 9))
    for row, (lo, hi) in zip(rows, mean_intervals(rows, "student_t", level=0.9)):
        want = stats.ttest_1samp(row, 0.0).confidence_interval(0.9)
        assert (lo, hi) == pytest.approx((want.low, want.high), rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 8, 9, 44])
def test_the_percentile_rows_are_the_definitions_resamples_to_the_bit(n):
    """Every row of the vectorised call, chunked or not, gives the bounds of one direct reading —
    the tables up to stop 52 recompute unchanged with ``interval: percentile``."""
    rows = np.random.default_rng(n).normal(size=(7, n))
    got = mean_intervals(rows, IntervalMethod.PERCENTILE, n_boot=3000, seed=4)
    for row, bounds in zip(rows, got):
        assert tuple(bounds) == _percentile_reference(row, n_boot=3000, seed=4)
    _, lo, hi = mean_interval(list(rows[0]) + [float("nan")], "percentile", n_boot=3000, seed=4)
    assert (lo, hi) == tuple(got[0])


def test_a_large_table_is_formed_in_chunks_with_the_same_bounds(monkeypatch):
    import cardiomotion.evaluate.intervals as intervals

    rows = np.random.default_rng(2).normal(size=(10, 6))
    whole = mean_intervals(rows, "percentile", n_boot=500)
    monkeypatch.setattr(intervals, "_CHUNK", 500 * 6 * 3)  # three rows per chunk, the last one short
    assert np.array_equal(mean_intervals(rows, "percentile", n_boot=500), whole)


def test_expanded_is_the_percentile_bootstrap_at_the_widened_level():
    # n 8: α′/2 = Φ(−√(8/7) · t(7, 0.975)) = Φ(−2.5279) = 0.00574
    rows = np.random.default_rng(6).normal(size=(4, 8))
    widened = 1 - 2 * stats.norm.cdf(-np.sqrt(8 / 7) * stats.t.ppf(0.975, 7))
    assert widened == pytest.approx(1 - 2 * 0.00574, abs=1e-5)
    assert np.allclose(mean_intervals(rows, "expanded"), mean_intervals(rows, "percentile", level=widened), rtol=0, atol=1e-12)
    assert np.all(np.diff(mean_intervals(rows, "expanded"), axis=1) > np.diff(mean_intervals(rows, "percentile"), axis=1))


@pytest.mark.parametrize("method", list(IntervalMethod))
def test_degenerate_inputs(method):
    assert mean_interval([2.0], method) == (2.0, 2.0, 2.0)  # one scan: nothing to measure the spread with
    assert mean_interval([3.0] * 8, method) == (3.0, 3.0, 3.0)
    assert all(np.isnan(x) for x in mean_interval([float("nan")], method))
    m, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0, float("nan")], method)
    assert m == 2.5 and lo < 2.5 < hi
    _, lo2, hi2 = mean_interval([2.4, 2.5, 2.5, 2.6], method)
    assert hi2 - lo2 < hi - lo  # less spread between scans, a narrower interval
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], method, level=1.0)
    with pytest.raises(ValueError, match="IntervalMethod"):
        mean_interval([], "bca")


def test_over_four_scans_only_student_t_reads_a_tie_as_a_difference_at_its_level():
    ties = np.random.default_rng(0).normal(size=(4000, 4))
    rate = {m: float(((b[:, 0] > 0) | (b[:, 1] < 0)).mean()) for m in IntervalMethod
            for b in [mean_intervals(ties, m)]}
    assert 0.035 < rate[IntervalMethod.STUDENT_T] < 0.065
    assert 0.16 < rate[IntervalMethod.PERCENTILE] < 0.24
    assert 0.09 < rate[IntervalMethod.EXPANDED] < 0.16
