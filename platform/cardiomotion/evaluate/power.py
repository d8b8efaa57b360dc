"""How many held-out scans (folds) and estimator seeds resolve a difference between two utility arms.

A paired utility comparison (``OUT/utility_paired.csv``, :func:`~cardiomotion.evaluate.compare.compare_folders`)
averages each held-out scan's difference A − B over its estimator seeds, then forms an interval of
the mean over the scans. Two things spread that mean:

- each estimator's **seed noise** within a scan, σ_A and σ_B (mm): its initialisation and batch
  order; more seeds shrink it;
- how much the **true difference varies from scan to scan**, τ (mm): an arm may suit one anatomy
  better than another; only more held-out scans shrink it.

With F scans and S seeds per arm and scan::

    var(mean difference) = (τ² + σ_A²/S + σ_B²/S) / F

:func:`spread_of` estimates the parts from a comparison that holds at least two seeds of each arm
on some scan (σ: the within-scan sample variances pooled over scans; τ: the variance of the
per-scan differences less their seed part, floored at 0 — the method of moments of a one-way
random-effects model). It also estimates the spread of arm B's own per-scan scores over the scans
(the scan effect both arms share, which the paired difference cancels and an arm's own interval
does not) and how the difference moves with it (their covariance: an arm that helps hard scans
more). The two arms' seed noises are taken as independent (arms that share a seed share an
initialisation and batch order; at stop 38 their correlation was 0.08). :func:`resolution` then
simulates the comparison ``utility`` would make on F scans with S seeds — normal scores with those
parts, intervals by the same method as ``utility``'s (``utility.interval``,
:func:`~cardiomotion.evaluate.intervals.mean_intervals`) — and returns the median half-width of the
paired interval, how often it excludes zero on the side of a true mean difference ``delta`` (at 0,
on either side: how often a tie reads as a difference), and how often the two arms' own intervals
do not overlap (the stricter reading of "non-overlapping 95 % intervals").
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from enum import Enum
from typing import Mapping, Sequence

import numpy as np

from ..choices import IntervalMethod
from .intervals import mean_intervals


class Criterion(str, Enum):
    """When a comparison resolves a difference: its paired interval excludes zero (``paired``, what
    ``utility_paired.csv`` reads), or the two arms' own intervals over scans do not overlap
    (``separate``, the stricter reading)."""

    PAIRED = "paired"
    SEPARATE = "separate"


@dataclass(frozen=True)
class Spread:
    """The parts of a paired comparison's spread, in the metric's unit (mm for EPE).

    ``scans``: held-out scans both arms scored; ``seeds_a``/``seeds_b``: their mean number of seeds
    per scan; ``seed_sd_a``/``seed_sd_b``: one estimator's seed-to-seed standard deviation within a
    scan; ``difference_sd`` (τ): the standard deviation over scans of the true per-scan difference
    A − B (seed noise taken out); ``scan_sd``: the standard deviation over scans of arm B's true
    per-scan score; ``difference_scan_cov``: the covariance over scans of the true difference and
    B's true score (unit²; positive: A loses more on the scans B finds hard); ``mean``: the mean
    per-scan difference A − B."""

    scans: int
    seeds_a: float
    seeds_b: float
    seed_sd_a: float
    seed_sd_b: float
    difference_sd: float
    scan_sd: float
    mean: float
    difference_scan_cov: float = 0.0


@dataclass(frozen=True)
class Resolution:
    """What a comparison on ``folds`` held-out scans with ``seeds`` seeds per arm resolves, by
    simulation (``trials`` comparisons), in the metric's unit (mm for EPE): ``halfwidth`` the median
    half-width of the paired 95 % interval; ``excludes_zero`` the share of paired intervals that
    exclude zero on the side of the true mean difference ``delta`` (either side when it is 0);
    ``non_overlapping`` the share where the two arms' own 95 % intervals over scans do not overlap
    (A's above B's for a positive ``delta``, below for a negative one, either way at 0)."""

    folds: int
    seeds: int
    delta: float
    halfwidth: float
    excludes_zero: float
    non_overlapping: float
    trials: int


def _pooled_variance(per_scan: Sequence[Sequence[float]]) -> float:
    """The within-scan sample variances pooled over scans (weighted by their degrees of freedom)."""
    num = den = 0.0
    for v in per_scan:
        if len(v) > 1:
            num += float(np.var(v, ddof=1)) * (len(v) - 1)
            den += len(v) - 1
    if den == 0:
        raise ValueError("no scan holds two seeds of this arm: its seed noise cannot be estimated")
    return num / den


def spread_of(per_scan: Mapping[str, Mapping[str, Sequence[float]]]) -> Spread:
    """The spread of a paired comparison from its scores seed by seed.

    Args:
        per_scan: {scan: {"a_seeds": [...], "b_seeds": [...]}} — each arm's scores on that scan, one
            per seed (``compare_folders(...)["per_scan"]``). Non-finite scores are left out (as
            ``utility``'s tables leave them out); a scan left without a score of an arm is dropped.

    Raises:
        ValueError: fewer than two scans with scores of both arms, or no scan with two seeds of an
            arm (its seed noise is unknown).
    """
    a, b = [], []
    for scan in sorted(per_scan):
        sa = [float(v) for v in per_scan[scan]["a_seeds"] if np.isfinite(v)]
        sb = [float(v) for v in per_scan[scan]["b_seeds"] if np.isfinite(v)]
        if sa and sb:
            a.append(sa)
            b.append(sb)
    if len(a) < 2:
        raise ValueError(f"{len(a)} scan(s) with finite scores of both arms: the spread over scans needs at least two")
    try:
        var_a, var_b = _pooled_variance(a), _pooled_variance(b)
    except ValueError as exc:
        raise ValueError(f"{exc} (each arm needs two seeds on some scan)") from None
    na, nb = np.array([len(x) for x in a], float), np.array([len(x) for x in b], float)
    ma, mb = np.array([np.mean(x) for x in a]), np.array([np.mean(x) for x in b])
    diff = ma - mb
    # E[sample var of the per-scan differences] = τ² + mean(σ_A²/n_A + σ_B²/n_B); B's seed noise
    # enters the difference with a minus sign, so cov(diff, B's mean) = cov(true) − mean(σ_B²/n_B)
    tau2 = float(np.var(diff, ddof=1)) - float(np.mean(var_a / na + var_b / nb))
    scan2 = float(np.var(mb, ddof=1)) - float(np.mean(var_b / nb))
    cov = float(np.cov(diff, mb, ddof=1)[0, 1]) + float(np.mean(var_b / nb))
    tau, scan_sd = max(tau2, 0.0) ** 0.5, max(scan2, 0.0) ** 0.5
    cov = float(np.clip(cov, -tau * scan_sd, tau * scan_sd))  # a correlation within [−1, 1]
    return Spread(scans=len(a), seeds_a=float(na.mean()), seeds_b=float(nb.mean()), seed_sd_a=var_a ** 0.5,
                  seed_sd_b=var_b ** 0.5, difference_sd=tau, scan_sd=scan_sd, mean=float(diff.mean()),
                  difference_scan_cov=cov)


def _check_plan(folds: int, seeds: int, trials: int) -> None:
    if folds < 2 or seeds < 1 or trials < 1:
        raise ValueError(f"folds must be at least 2 (one scan has no interval), seeds and trials positive; "
                         f"got {folds}, {seeds}, {trials}")


def resolution(spread: Spread, folds: int, seeds: int, delta: float, trials: int = 1000, seed: int = 0,
               n_boot: int = 2000, method: IntervalMethod | str = IntervalMethod.STUDENT_T) -> Resolution:
    """Simulate ``trials`` utility comparisons on ``folds`` scans with ``seeds`` seeds per arm when the
    true mean difference A − B is ``delta`` and the parts of the spread are ``spread``'s.

    Each scan: B's true score b ~ N(0, scan_sd²); the true difference ~ N(delta, τ²), drawn jointly
    with b at their covariance; each arm's seed mean with noise ~ N(0, σ²/seeds); intervals by
    ``method`` as :func:`~cardiomotion.evaluate.intervals.mean_intervals` forms them (``n_boot``
    resamples, seed 0, for the bootstrap methods)."""
    _check_plan(folds, seeds, trials)
    rng = np.random.default_rng(seed)
    shape = (trials, folds)
    z_scan, z_diff = rng.normal(size=shape), rng.normal(size=shape)
    shared = spread.scan_sd * z_scan
    slope = spread.difference_scan_cov / spread.scan_sd if spread.scan_sd > 0 else 0.0  # cov / sd_b
    rest = max(spread.difference_sd ** 2 - slope ** 2, 0.0) ** 0.5
    difference = delta + slope * z_scan + rest * z_diff
    b = shared + rng.normal(0.0, spread.seed_sd_b / seeds ** 0.5, shape)
    a = shared + difference + rng.normal(0.0, spread.seed_sd_a / seeds ** 0.5, shape)
    paired = mean_intervals(a - b, method, n_boot=n_boot)
    own_a, own_b = mean_intervals(a, method, n_boot=n_boot), mean_intervals(b, method, n_boot=n_boot)
    above, below = own_a[:, 0] > own_b[:, 1], own_a[:, 1] < own_b[:, 0]
    positive, negative = paired[:, 0] > 0, paired[:, 1] < 0
    if delta > 0:
        excludes, apart = positive, above
    elif delta < 0:
        excludes, apart = negative, below
    else:
        excludes, apart = positive | negative, above | below
    return Resolution(folds=folds, seeds=seeds, delta=float(delta),
                      halfwidth=float(np.median((paired[:, 1] - paired[:, 0]) / 2)),
                      excludes_zero=float(excludes.mean()), non_overlapping=float(apart.mean()), trials=trials)


def smallest_resolved(spread: Spread, folds: int, seeds: int, power: float = 0.8,
                      criterion: Criterion = Criterion.PAIRED, trials: int = 1000, seed: int = 0,
                      rel_tol: float = 0.01, n_boot: int = 2000,
                      method: IntervalMethod | str = IntervalMethod.STUDENT_T) -> float:
    """The smallest positive true mean difference (the metric's unit, within ``rel_tol`` of it) that
    ``criterion`` resolves in at least ``power`` of :func:`resolution`'s simulated comparisons
    (bisection over the same random draws at every difference, so the share grows with it)."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    _check_plan(folds, seeds, trials)
    parts = (spread.difference_sd, spread.seed_sd_a, spread.seed_sd_b, spread.scan_sd)
    if not all(np.isfinite(parts)):
        raise ValueError(f"the spread has non-finite parts: {parts}")
    criterion = Criterion(criterion)

    def share(delta: float) -> float:
        r = resolution(spread, folds, seeds, delta, trials, seed, n_boot, method)
        return r.excludes_zero if criterion is Criterion.PAIRED else r.non_overlapping

    lo, hi = 0.0, max(*parts, 1e-3)
    for _ in range(60):  # a difference far above the noise is always resolved: doubling ends
        if share(hi) >= power:
            break
        lo, hi = hi, 2 * hi
    for _ in range(60):  # bounded: a noise-free spread resolves any difference, and halves towards 0
        if hi - lo <= max(rel_tol * hi, 1e-9):
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if share(mid) >= power else (mid, hi)
    return hi


def plan_figure(plans: Sequence[Mapping], path: str | Path, delta: float | None = None, unit: str = "mm") -> Path:
    """The smallest difference resolved against the number of held-out scans, a line per seed count:
    solid the paired interval, dashed the two arms' separate intervals; ``plans`` are dicts with
    ``folds``, ``seeds``, ``smallest_resolved_paired`` and ``smallest_resolved_separate``
    (``bench/utility_power.py``'s), ``delta`` drawn as a horizontal line. Writes a PNG; returns its path."""
    from .figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, seeds in enumerate(sorted({p["seeds"] for p in plans})):
        rows = sorted((p for p in plans if p["seeds"] == seeds), key=lambda p: p["folds"])
        folds = [p["folds"] for p in rows]
        name = f"{seeds} seed{'s' if seeds > 1 else ''}"
        ax.plot(folds, [p["smallest_resolved_paired"] for p in rows], "o-", color=f"C{i}", label=f"{name}, paired interval")
        ax.plot(folds, [p["smallest_resolved_separate"] for p in rows], "s--", color=f"C{i}", alpha=0.6,
                label=f"{name}, separate intervals")
    if delta is not None:
        ax.axhline(delta, color="0.3", lw=0.8, ls=":", label=f"{delta:g} {unit}")
    ax.set_xscale("log")
    ticks = sorted({p["folds"] for p in plans})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("held-out scans (folds)")
    ax.set_ylabel(f"smallest difference resolved ({unit})")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


@lru_cache(maxsize=64)
def tie_read_as_difference(scans: int, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                           trials: int = 4000, method: IntervalMethod | str = IntervalMethod.STUDENT_T) -> float:
    """How often an interval by ``method`` (the bootstrap ones: ``n_boot`` resamples drawn with
    ``seed``) over ``scans`` per-scan differences excludes zero when there is no difference (normal
    differences; the rate depends on ``scans`` alone, not on their spread). Nominally 1 − ``level``,
    and exactly so for Student's t (returned without simulating); the percentile bootstrap's is
    higher over few scans (too narrow). NaN below two scans."""
    if scans < 2:
        return float("nan")
    if IntervalMethod(method) is IntervalMethod.STUDENT_T:
        return 1.0 - level
    draws = np.random.default_rng(seed + 1).normal(size=(trials, scans))
    bounds = mean_intervals(draws, method, level=level, n_boot=n_boot, seed=seed)
    return float(((bounds[:, 0] > 0) | (bounds[:, 1] < 0)).mean())


__all__ = ["Criterion", "Resolution", "Spread", "plan_figure", "resolution", "smallest_resolved",
           "spread_of", "tie_read_as_difference"]
