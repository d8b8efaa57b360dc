"""Compare two ``cardiomotion utility`` folders scan by scan: one arm of folder A against one arm
of folder B on the held-out scans both scored.

``utility``'s own paired table compares the arms of *one* folder. A question such as "does a
generator trained another way give a better corpus?" needs two folders (each with its own fold
generators) whose estimators met the same held-out scans: the per-scan difference (seed means
first, as ``utility`` does) with a 95 % interval over the shared scans and the scans won.
Rows trained with other estimator settings (steps, lr, network, …) are not comparable and are
refused, as ``utility`` refuses mixing them in one folder; the settings of the folders' corpora
(``generate.temperature``, recorded in each row beside the estimator's) may differ — that is what
two generators' folders are compared for — and are reported (``corpus_settings``). An estimator
setting under study (e.g. ``lr_schedule``) may differ when named in ``vary``, and is reported too;
``Side.seeds`` restricts a side to some estimator seeds, so that a one-seed run is paired with the
same seed of a three-seed folder (same initialisation and batch order, the setting aside).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..choices import IntervalMethod
from ..errors import InputError
from ..layout import UTILITY_RUNS
from .utility_report import LOWER_IS_BETTER, subject_better


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a utility folder's ``runs.jsonl`` and the (arm, N) read from it."""

    folder: Path
    arm: str
    n: int
    seeds: tuple[int, ...] | None = None  # None: every seed

    @property
    def label(self) -> str:
        seeds = "" if self.seeds is None else f"[seeds {','.join(map(str, self.seeds))}]"
        return f"{self.folder.name}:{self.arm}@{self.n}{seeds}"


# what a folder's corpora were made with, recorded beside the estimator settings of every row:
# two folders whose generators differ (the question this module answers) may differ in these
CORPUS_KEYS = ("corpus_temperature",)


def _training(ident: dict | None, vary: Sequence[str] = ()) -> dict | None:
    """The estimator settings of a row, less what its folder's corpora were made with and the
    settings under study (``vary``)."""
    return None if ident is None else {k: v for k, v in ident.items() if k not in CORPUS_KEYS and k not in vary}


def _settings(picked: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """The distinct values of the estimator settings ``keys`` among ``picked`` rows."""
    seen = {json.dumps({k: (r.get("estimator") or {}).get(k) for k in keys}, sort_keys=True) for r in picked}
    return [json.loads(x) for x in sorted(seen)]


def _scan_values(runs: Path, rows: Sequence[dict], side: Side, metric: str) -> tuple[dict[str, list[float]], list[dict]]:
    """Each held-out scan's scores of ``side`` (one per seed, in row order) and the rows read."""
    picked = [r for r in rows if r.get("arm") == side.arm and r.get("n") == side.n
              and (side.seeds is None or r.get("seed") in side.seeds)]
    per: dict[str, list[float]] = {}
    for r in picked:
        value = r.get(metric)
        if not isinstance(value, (int, float)) or "scan" not in r:
            raise InputError(runs, f"a {side.arm} N {side.n} row has no {metric} score or no scan "
                                   f"(seed {r.get('seed')}): not a finished utility row")
        per.setdefault(r["scan"], []).append(float(value))
    return per, picked


def compare_folders(a: Side, b: Side, metric: str = "epe_myo_mm", n_boot: int = 2000,
                    vary: Sequence[str] = (), method: IntervalMethod | str = IntervalMethod.STUDENT_T) -> dict:
    """A − B per held-out scan scored in both, seed means first.

    Returns a dict: ``a``, ``b`` (labels), ``metric``, ``scans`` (the shared scans, sorted),
    ``per_scan`` ({scan: {"a", "b", "delta", "a_seeds", "b_seeds"}}: the seed means, their difference
    and each side's scores seed by seed, what :func:`~cardiomotion.evaluate.power.spread_of` reads), ``mean``, ``ci_low``, ``ci_high`` (the 95 % interval
    over the shared scans by ``method``, :mod:`~cardiomotion.evaluate.intervals`; ``n_boot``
    resamples for the bootstrap methods), ``interval`` (the method's name), ``a_won`` (scans where A is better: lower, or higher for Dice),
    ``rows_a``/``rows_b`` (rows read per side on the shared scans: seeds × scans),
    ``corpus_settings`` ({"a": [...], "b": [...]}: the distinct corpus settings of each side's rows),
    ``varied_settings`` (the same for the estimator settings named in ``vary``; {} without).

    Raises:
        InputError: a folder has no ``runs.jsonl`` or no row of the asked arm and N, the two share
            no scan, the metric is unknown, or the compared rows were trained with other
            estimator settings (corpus settings and ``vary`` aside).
    """
    from ..fileio import read_json_lines
    from .intervals import mean_interval

    if metric not in LOWER_IS_BETTER:
        raise InputError(None, f"unknown metric {metric!r}; one of {', '.join(LOWER_IS_BETTER)}")
    values, means, picked = {}, {}, {}
    for key, side in (("a", a), ("b", b)):
        runs = Path(side.folder) / UTILITY_RUNS
        if not runs.is_file():
            raise InputError(runs, "missing: not a utility output folder (or nothing finished yet)")
        # read only: a utility run may be appending to this folder
        values[key], picked[key] = _scan_values(runs, read_json_lines(runs, repair=False), side, metric)
        means[key] = {scan: float(np.mean(v)) for scan, v in values[key].items()}
        if not picked[key]:
            seeds = "" if side.seeds is None else f" of seed {', '.join(map(str, side.seeds))}"
            raise InputError(runs, f"has no row of arm {side.arm} at N {side.n}{seeds}")
    unknown = [k for k in vary if not any(k in (r.get("estimator") or {}) for key in picked for r in picked[key])]
    if unknown:
        raise InputError(Path(b.folder) / UTILITY_RUNS, f"no compared row of either folder records the estimator "
                                                        f"setting {', '.join(map(repr, unknown))} named to vary")
    idents = {key: {json.dumps(_training(r.get("estimator"), vary), sort_keys=True) for r in picked[key]}
              for key in ("a", "b")}
    for key, side in (("a", a), ("b", b)):  # within a side even the varied settings must agree
        if len({json.dumps(_training(r.get("estimator")), sort_keys=True) for r in picked[key]}) > 1:
            raise InputError(Path(side.folder) / UTILITY_RUNS, f"its {side.arm} N {side.n} rows were trained "
                                                               f"with different estimator settings among themselves")
    if idents["a"] != idents["b"]:
        raise InputError(Path(b.folder) / UTILITY_RUNS,
                         f"its {b.arm} N {b.n} rows were trained with other estimator settings than "
                         f"{a.label}'s: their scores are not comparable (a setting under study: name it in vary)")
    scans = sorted(set(means["a"]) & set(means["b"]))
    if not scans:
        raise InputError(Path(b.folder) / UTILITY_RUNS, f"shares no held-out scan with {a.label}")
    deltas = [means["a"][s] - means["b"][s] for s in scans]
    mean, lo, hi = mean_interval(deltas, method, n_boot=n_boot)
    return {"a": a.label, "b": b.label, "metric": metric, "scans": scans,
            "per_scan": {s: {"a": means["a"][s], "b": means["b"][s], "delta": d,
                             "a_seeds": values["a"][s], "b_seeds": values["b"][s]} for s, d in zip(scans, deltas)},
            "mean": mean, "ci_low": lo, "ci_high": hi, "interval": IntervalMethod(method).value,
            "a_won": sum(subject_better(metric, d) for d in deltas),
            "corpus_settings": {key: _settings(picked[key], CORPUS_KEYS) for key in ("a", "b")},
            "varied_settings": {key: _settings(picked[key], vary) for key in ("a", "b")} if vary else {},
            "rows_a": len([r for r in picked["a"] if r["scan"] in scans]),
            "rows_b": len([r for r in picked["b"] if r["scan"] in scans])}


__all__ = ["Side", "compare_folders"]
