"""How many held-out scans (folds) and estimator seeds resolve a difference between two utility arms.

A paired utility comparison (``OUT/utility_paired.csv``, :func:`~cardiomotion.evaluate.compare.compare_folders`)
averages each held-out scan's difference A − B over its estimator seeds, then bootstraps the mean
over the scans. Two things spread that mean:

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
does not). :func:`resolution` then simulates the comparison ``utility`` would make on F scans with S
seeds — normal scores with those parts, the same percentile bootstrap (2000 resamples, seed 0, as
:func:`~cardiomotion.evaluate.utility.bootstrap_ci`) — and returns the median half-width of the
paired interval, how often it excludes zero when the true mean difference is ``delta`` (at 0: how
often a tie reads as a difference), and how often the two arms' own intervals do not overlap (the
stricter reading of "non-overlapping 95 % intervals").
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

import numpy as np


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
    per-scan score; ``mean``: the mean per-scan difference A − B."""

    scans: int
    seeds_a: float
    seeds_b: float
    seed_sd_a: float
    seed_sd_b: float
    difference_sd: float
    scan_sd: float
    mean: float


@dataclass(frozen=True)
class Resolution:
    """What a comparison on ``folds`` held-out scans with ``seeds`` seeds per arm resolves, by
    simulation (``trials`` comparisons): ``halfwidth`` the median half-width of the paired 95 %
    interval; ``excludes_zero`` the share of intervals that exclude zero when the true mean
    difference is ``delta``; ``non_overlapping`` the share where the two arms' own 95 % intervals
    over scans do not overlap."""

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
            per seed (``compare_folders(...)["per_scan"]``).

    Raises:
        ValueError: fewer than two scans, a scan without a score of an arm, or no scan with two
            seeds of an arm (its seed noise is unknown).
    """
    scans = sorted(per_scan)
    if len(scans) < 2:
        raise ValueError(f"{len(scans)} scan(s): the spread over scans needs at least two")
    a = [list(map(float, per_scan[s]["a_seeds"])) for s in scans]
    b = [list(map(float, per_scan[s]["b_seeds"])) for s in scans]
    if any(not x for x in a + b):
        raise ValueError("a scan without a score of one arm")
    try:
        var_a, var_b = _pooled_variance(a), _pooled_variance(b)
    except ValueError as exc:
        raise ValueError(f"{exc} (each arm needs two seeds on some scan)") from None
    na, nb = np.array([len(x) for x in a], float), np.array([len(x) for x in b], float)
    ma, mb = np.array([np.mean(x) for x in a]), np.array([np.mean(x) for x in b])
    diff = ma - mb
    tau2 = float(np.var(diff, ddof=1)) - float(np.mean(var_a / na + var_b / nb))
    scan2 = float(np.var(mb, ddof=1)) - float(np.mean(var_b / nb))
    return Spread(scans=len(scans), seeds_a=float(na.mean()), seeds_b=float(nb.mean()),
                  seed_sd_a=var_a ** 0.5, seed_sd_b=var_b ** 0.5, difference_sd=max(tau2, 0.0) ** 0.5,
                  scan_sd=max(scan2, 0.0) ** 0.5, mean=float(diff.mean()))


def bootstrap_intervals(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap intervals of the mean of each row of ``values`` (trials, scans), with
    the resamples :func:`~cardiomotion.evaluate.utility.bootstrap_ci` draws for ``scans`` values
    (the same ``seed``: every row meets the same resamples, as every arm of a utility table does).
    Returns (trials, 2): low, high."""
    values = np.asarray(values, dtype=np.float64)
    f = values.shape[1]
    if f == 1:
        return np.repeat(values, 2, axis=1)
    idx = np.random.default_rng(seed).integers(0, f, size=(n_boot, f))
    onehot = np.zeros((n_boot, f))
    np.add.at(onehot, (np.arange(n_boot)[:, None], idx), 1.0 / f)
    means = values @ onehot.T  # (trials, n_boot): each resample's mean
    a = (1 - level) / 2
    return np.quantile(means, [a, 1 - a], axis=1).T


def resolution(spread: Spread, folds: int, seeds: int, delta: float, trials: int = 1000, seed: int = 0) -> Resolution:
    """Simulate ``trials`` utility comparisons on ``folds`` scans with ``seeds`` seeds per arm when the
    true mean difference A − B is ``delta`` and the parts of the spread are ``spread``'s.

    Each scan: a shared score b ~ N(0, scan_sd²), a true difference ~ N(delta, τ²), each arm's seed
    mean with noise ~ N(0, σ²/seeds); intervals as :func:`bootstrap_intervals` draws them."""
    if folds < 1 or seeds < 1 or trials < 1:
        raise ValueError(f"folds, seeds and trials must be positive, got {folds}, {seeds}, {trials}")
    rng = np.random.default_rng(seed)
    shape = (trials, folds)
    shared = rng.normal(0.0, spread.scan_sd, shape)
    b = shared + rng.normal(0.0, spread.seed_sd_b / seeds ** 0.5, shape)
    a = shared + rng.normal(delta, spread.difference_sd, shape) + rng.normal(0.0, spread.seed_sd_a / seeds ** 0.5, shape)
    paired = bootstrap_intervals(a - b)
    own_a, own_b = bootstrap_intervals(a), bootstrap_intervals(b)
    apart = (own_a[:, 0] > own_b[:, 1]) | (own_b[:, 0] > own_a[:, 1])
    excludes = (paired[:, 0] > 0) | (paired[:, 1] < 0)
    return Resolution(folds=folds, seeds=seeds, delta=float(delta),
                      halfwidth=float(np.median((paired[:, 1] - paired[:, 0]) / 2)),
                      excludes_zero=float(excludes.mean()), non_overlapping=float(apart.mean()), trials=trials)


def smallest_resolved(spread: Spread, folds: int, seeds: int, power: float = 0.8,
                      criterion: Criterion = Criterion.PAIRED, trials: int = 1000, seed: int = 0,
                      rel_tol: float = 0.01) -> float:
    """The smallest true mean difference (same unit as ``spread``, within ``rel_tol`` of it) that ``criterion``
    resolves in at least ``power`` of :func:`resolution`'s simulated comparisons (bisection; the same
    random draws at every difference, so the share grows with it)."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    criterion = Criterion(criterion)

    def share(delta: float) -> float:
        r = resolution(spread, folds, seeds, delta, trials, seed)
        return r.excludes_zero if criterion is Criterion.PAIRED else r.non_overlapping

    lo, hi = 0.0, max(spread.difference_sd, spread.seed_sd_a, spread.seed_sd_b, spread.scan_sd, 1e-3)
    while share(hi) < power:
        lo, hi = hi, 2 * hi
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if share(mid) >= power else (mid, hi)
    return hi

def plan_figure(plans: Sequence[Mapping], path, delta: float | None = None, unit: str = "mm"):
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


def tie_read_as_difference(scans: int, level: float = 0.95, trials: int = 4000, seed: int = 1) -> float:
    """How often ``utility``'s percentile bootstrap interval over ``scans`` per-scan differences
    excludes zero when there is no difference (normal differences; the rate depends on ``scans``
    alone, not their spread). Nominally 1 − ``level``; over few scans the interval is too narrow."""
    if scans < 2:
        return float("nan")
    draws = np.random.default_rng(seed).normal(size=(trials, scans))
    bounds = bootstrap_intervals(draws, level=level)
    return float(((bounds[:, 0] > 0) | (bounds[:, 1] < 0)).mean())



__all__ = ["Criterion", "Resolution", "Spread", "bootstrap_intervals", "plan_figure", "resolution", "smallest_resolved", "spread_of", "tie_read_as_difference"]
