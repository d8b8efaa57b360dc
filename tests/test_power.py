"""How many folds and seeds resolve a difference (evaluate/power.py): known parts are recovered
from simulated comparisons, the simulated intervals are utility's own, and the planning
figures meet their normal-theory values where those hold."""
from __future__ import annotations

import numpy as np
import pytest

from cardiomotion.choices import IntervalMethod
from cardiomotion.evaluate.intervals import mean_interval
from cardiomotion.evaluate.power import (Criterion, Spread, resolution, smallest_resolved, spread_of,
                                         tie_read_as_difference)


def _comparison(scans: int, seeds: int, sd_a: float, sd_b: float, tau: float, scan_sd: float, mean: float, seed: int = 0):
    """A compare_folders-style per_scan dict drawn from known parts."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(scans):
        shared = 2.0 + rng.normal(0, scan_sd)
        truth_a = shared + rng.normal(mean, tau)
        out[f"s{s}"] = {"a_seeds": list(truth_a + rng.normal(0, sd_a, seeds)),
                        "b_seeds": list(shared + rng.normal(0, sd_b, seeds))}
    return out


def _spread(tau=0.0, sd=0.0, scan_sd=0.0):
    return Spread(scans=8, seeds_a=1, seeds_b=1, seed_sd_a=sd, seed_sd_b=sd, difference_sd=tau, scan_sd=scan_sd, mean=0.0)


@pytest.mark.parametrize("method", list(IntervalMethod))
def test_the_simulated_intervals_are_utilitys(method, monkeypatch):
    """resolution's paired intervals are the ones mean_interval prints for the same differences."""
    import cardiomotion.evaluate.power as power

    seen = []
    real = power.mean_intervals
    monkeypatch.setattr(power, "mean_intervals", lambda v, *a, **k: seen.append((v, real(v, *a, **k))) or seen[-1][1])
    resolution(_spread(tau=0.1, sd=0.1, scan_sd=0.1), folds=6, seeds=1, delta=0.0, trials=5, method=method)
    differences, bounds = seen[0]
    for row, (lo, hi) in zip(differences, bounds):
        assert (lo, hi) == mean_interval(row, method)[1:]


def test_known_parts_are_recovered():
    est = spread_of(_comparison(600, 3, sd_a=0.12, sd_b=0.10, tau=0.15, scan_sd=0.30, mean=0.05))
    assert (est.scans, est.seeds_a, est.seeds_b) == (600, 3.0, 3.0)
    assert est.seed_sd_a == pytest.approx(0.12, rel=0.06) and est.seed_sd_b == pytest.approx(0.10, rel=0.06)
    assert est.difference_sd == pytest.approx(0.15, rel=0.12)
    assert est.scan_sd == pytest.approx(0.30, rel=0.1)
    assert est.mean == pytest.approx(0.05, abs=0.02)
    # no scan-to-scan variation of the difference: what is left is seed noise, taken out
    flat = spread_of(_comparison(600, 3, sd_a=0.12, sd_b=0.10, tau=0.0, scan_sd=0.30, mean=0.05))
    assert flat.difference_sd < 0.04


def test_a_comparison_without_two_seeds_or_two_scans_is_refused():
    one_seed = _comparison(8, 1, 0.1, 0.1, 0.1, 0.1, 0.0)
    with pytest.raises(ValueError, match="no scan holds two seeds"):
        spread_of(one_seed)
    with pytest.raises(ValueError, match="at least two"):
        spread_of(dict(list(_comparison(8, 2, 0.1, 0.1, 0.1, 0.1, 0.0).items())[:1]))


def test_without_noise_every_difference_is_resolved_and_no_tie_is():
    at = resolution(_spread(), folds=8, seeds=1, delta=0.1, trials=50)
    assert at.halfwidth == pytest.approx(0.0, abs=1e-12) and (at.excludes_zero, at.non_overlapping) == (1.0, 1.0)
    tie = resolution(_spread(), folds=8, seeds=1, delta=0.0, trials=50)
    assert (tie.excludes_zero, tie.non_overlapping) == (0.0, 0.0)


def test_on_many_scans_the_interval_has_its_normal_width_and_level():
    spread = _spread(tau=0.13, sd=0.12, scan_sd=0.2)
    r = resolution(spread, folds=100, seeds=3, delta=0.0, trials=2000)
    want = 1.96 * ((0.13**2 + 2 * 0.12**2 / 3) / 100) ** 0.5
    assert r.halfwidth == pytest.approx(want, rel=0.05)
    assert 0.035 < r.excludes_zero < 0.07  # a tie reads as a difference about 5 % of the time
    # on 4 scans the percentile bootstrap is too narrow: a tie reads as a difference far more often;
    # Student's t keeps its level
    assert resolution(spread, folds=4, seeds=3, delta=0.0, trials=2000, method="percentile").excludes_zero > 0.12
    assert 0.035 < resolution(spread, folds=4, seeds=3, delta=0.0, trials=2000).excludes_zero < 0.07


def test_seeds_cannot_take_out_the_scan_to_scan_part_folds_can():
    spread = _spread(tau=0.13, sd=0.12)
    many_seeds = resolution(spread, folds=8, seeds=1000, delta=0.0, trials=1000).halfwidth
    assert many_seeds > 0.9 * 2.365 * 0.13 / 8**0.5 * 0.9  # the floor τ sets: t(7) · τ/√8, s's median below τ
    assert resolution(spread, folds=32, seeds=1, delta=0.0, trials=1000).halfwidth < many_seeds
    # with no scan-to-scan part, seeds shrink the interval as 1/√S
    noise_only = _spread(sd=0.12)
    ratio = (resolution(noise_only, 8, 1, 0.0, trials=1000).halfwidth
             / resolution(noise_only, 8, 4, 0.0, trials=1000).halfwidth)
    assert ratio == pytest.approx(2.0, rel=0.08)


def test_the_smallest_resolved_difference_meets_normal_theory():
    spread = _spread(tau=0.1)
    got = smallest_resolved(spread, folds=100, seeds=1, power=0.8)
    assert got == pytest.approx((1.96 + 0.8416) * 0.1 / 100**0.5, rel=0.08)
    # the arms' own intervals carry the shared scan spread the paired one cancels: a larger difference
    shared = _spread(tau=0.1, scan_sd=0.3)
    assert smallest_resolved(shared, 100, 1, 0.8, Criterion.SEPARATE) > 2 * smallest_resolved(shared, 100, 1, 0.8)
    with pytest.raises(ValueError, match="power"):
        smallest_resolved(spread, 8, 1, power=1.0)


def test_a_percentile_interval_reads_a_tie_as_a_difference_too_often_over_few_scans_student_t_does_not():
    assert 0.15 < tie_read_as_difference(4, method="percentile") < 0.25
    assert 0.09 < tie_read_as_difference(8, method="percentile") < 0.14
    assert 0.04 < tie_read_as_difference(60, method="percentile") < 0.065
    assert tie_read_as_difference(8, level=0.99, method="percentile") < tie_read_as_difference(8, method="percentile")
    for scans in (3, 4, 8, 60):  # Student's t over normal differences: exactly the level
        assert tie_read_as_difference(scans) == pytest.approx(0.05)
        assert 0.035 < tie_read_as_difference(scans, method="expanded", trials=4000) < (0.3 if scans < 8 else 0.075)


def test_unequal_seed_counts_and_missing_scores_are_handled():
    """1–4 seeds per scan (the method of moments weighs each scan's seed part by its own count);
    NaN scores are left out, as utility's tables leave them out."""
    rng = np.random.default_rng(5)
    per_scan = {}
    for s in range(800):
        shared = 2.0 + rng.normal(0, 0.3)
        truth_a = shared + rng.normal(0.05, 0.15)
        per_scan[f"s{s}"] = {"a_seeds": list(truth_a + rng.normal(0, 0.12, 1 + s % 4)),
                             "b_seeds": list(shared + rng.normal(0, 0.10, 1 + (s // 4) % 4))}
    est = spread_of(per_scan)
    assert est.seeds_a == pytest.approx(2.5) and est.seeds_b == pytest.approx(2.5)
    assert est.seed_sd_a == pytest.approx(0.12, rel=0.06) and est.seed_sd_b == pytest.approx(0.10, rel=0.06)
    assert est.difference_sd == pytest.approx(0.15, rel=0.12)
    per_scan["s0"] = {"a_seeds": [float("nan")], "b_seeds": [2.0]}  # no finite score of A: the scan is dropped
    per_scan["s1"]["a_seeds"] = [float("nan"), *per_scan["s1"]["a_seeds"]]
    assert spread_of(per_scan).scans == 799 and np.isfinite(spread_of(per_scan).difference_sd)


def test_a_difference_that_moves_with_the_scan_is_recovered_and_widens_the_arms_own_intervals():
    rng = np.random.default_rng(7)
    per_scan = {}
    for s in range(1000):
        b = rng.normal(0, 0.3)
        diff = 0.5 * b + rng.normal(0, 0.1)  # A loses more on the scans B finds hard
        per_scan[f"s{s}"] = {"a_seeds": list(2 + b + diff + rng.normal(0, 0.1, 2)), "b_seeds": list(2 + b + rng.normal(0, 0.1, 2))}
    est = spread_of(per_scan)
    assert est.difference_scan_cov == pytest.approx(0.5 * 0.3**2, rel=0.15)
    assert est.difference_sd == pytest.approx((0.15**2 + 0.1**2) ** 0.5, rel=0.1)
    apart = smallest_resolved(est, 44, 1, 0.8, Criterion.SEPARATE, trials=300)
    independent = smallest_resolved(Spread(**{**est.__dict__, "difference_scan_cov": 0.0}), 44, 1, 0.8,
                                    Criterion.SEPARATE, trials=300)
    assert apart > independent  # A's own scores spread more than B's: its interval is wider


def test_resolved_means_on_the_true_differences_side_and_one_scan_is_no_plan():
    spread = _spread(tau=0.13, sd=0.12)
    up, down = resolution(spread, 4, 1, 0.1, trials=2000), resolution(spread, 4, 1, -0.1, trials=2000)
    both = resolution(spread, 4, 1, 0.0, trials=2000)
    assert up.excludes_zero == pytest.approx(down.excludes_zero, abs=0.04)
    assert 0.035 < both.excludes_zero < 0.065  # either side at 0: 5 % (one side alone would be 2.5 %)
    with pytest.raises(ValueError, match="at least 2"):
        resolution(spread, 1, 1, 0.1)
    # a noise-free spread resolves any difference: the bisection ends (near 0) instead of halving forever
    assert smallest_resolved(_spread(), 8, 1) < 1e-3
