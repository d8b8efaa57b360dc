"""The report of a ``cardiomotion utility`` folder: its rows (one per estimator, ``OUT/runs.jsonl``)
and references (zero flow, demons) summarised per (arm, N) — the marginal table with 95 %
intervals over held-out scans (``utility.interval``) (``OUT/utility.csv``), the scan-by-scan paired comparisons
(``OUT/utility_paired.csv``), their text forms, and the figure (``OUT/utility.png``).

Everything here is a pure function of the rows and ``utility.interval``: the committed tables of
``docs/results/`` are recomputed from their ``runs.jsonl`` by the same calls — those made up to
stop 52 with ``utility.interval: percentile`` (their ``summary.json`` predates the key).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..choices import IntervalMethod
from ..config import Config, UtilityArm

METRICS = ("epe_mm", "epe_myo_mm", "dice", "folding")  # the scores arms are compared on, scan by scan
# every score a row holds: the metrics and the estimate's motion against the truth's in the
# myocardium (a calibration, not better when lower or higher: summarised, never paired)
SCORES = (*METRICS, "magnitude_myo")


def summarize(rows: Sequence[dict], refs: Sequence[dict], cfg: Config) -> list[dict[str, Any]]:
    """Per (arm, N, metric): mean over seeds per test scan, then the mean over scans with a
    95 % interval by ``utility.interval``; references (zero, demons) as arms with N = 0. ``seed_sd`` is the
    seed-to-seed spread the interval does not show: per scan the standard deviation over the
    estimator seeds (ddof 1), averaged over the scans with two or more seeds (None with one)."""
    from collections import Counter

    from .intervals import mean_interval

    runs = Counter((r["arm"], int(r["n"])) for r in rows) + Counter((r["arm"], 0) for r in refs)
    groups = _per_scan_rows(rows, refs)
    out: list[dict[str, Any]] = []
    for (arm, n), by_scan in sorted(_means(groups).items()):
        for m in SCORES:
            if m not in METRICS and not any(m in v for v in by_scan.values()):
                continue  # a score added later: rows made before it lack it
            mean, lo, hi = mean_interval([v.get(m, float("nan")) for v in by_scan.values()], cfg.utility.interval,
                                         n_boot=cfg.utility.bootstrap, seed=cfg.seed)
            sds = [float(np.std(v, ddof=1)) for xs in groups[(arm, n)].values() if len(v := _scores(xs, m)) > 1]
            out.append({"arm": arm, "n": n, "metric": m, "mean": mean, "ci_low": lo, "ci_high": hi,
                        "scans": len(by_scan), "runs": runs[(arm, n)],
                        "seed_sd": float(np.mean(sds)) if sds else None})
    return out


def per_scan_means(rows: Sequence[dict], refs: Sequence[dict]) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    """(arm, N) → held-out scan → metric → mean over the estimator seeds (references: N = 0)."""
    return _means(_per_scan_rows(rows, refs))


def _per_scan_rows(rows: Sequence[dict], refs: Sequence[dict]) -> dict[tuple[str, int], dict[str, list[dict]]]:
    """(arm, N) → held-out scan → its rows, one per estimator seed (references: N = 0)."""
    groups: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], int(r["n"])), {}).setdefault(r["scan"], []).append(r)
    for r in refs:
        groups.setdefault((r["arm"], 0), {}).setdefault(r["scan"], []).append(r)
    return groups


def _scores(xs: Sequence[dict], m: str) -> list[float]:
    """The scores ``m`` of the rows ``xs`` (a missing or NaN score: left out)."""
    return [float(x[m]) for x in xs if x.get(m) is not None and x[m] == x[m]]


def _means(groups: dict[tuple[str, int], dict[str, list[dict]]]) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    return {key: {scan: {m: float(np.mean(v)) for m in SCORES if (v := _scores(xs, m))} for scan, xs in by_scan.items()}
            for key, by_scan in groups.items()}


def arm_of(name: str) -> UtilityArm | None:
    """The data arm named ``name``; None for a reference (zero, demons)."""
    return UtilityArm._value2member_map_.get(name)


LOWER_IS_BETTER = {"epe_mm": True, "epe_myo_mm": True, "dice": False, "folding": True}


def subject_better(metric: str, delta: float) -> bool:
    """Whether a per-scan difference subject − other favours the subject: lower EPE and folding,
    higher Dice (the scans-won count of the paired tables)."""
    return delta < 0 if LOWER_IS_BETTER[metric] else delta > 0


#: the generated arms compared with another generated arm (besides every arm without one): those
#: that add the annotated pairs, or the held-out anatomy, to what they are compared with
AGAINST = {UtilityArm.MIXED: UtilityArm.CVAE, UtilityArm.FINETUNE: UtilityArm.CVAE,
           UtilityArm.TARGET: UtilityArm.CVAE, UtilityArm.ANNOTATED_TARGET: UtilityArm.TARGET,
           UtilityArm.ANCHORED: UtilityArm.CVAE}


def comparison_pairs(keys: Sequence[tuple[str, int]]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """The (subject, other) pairs of (arm, N) keys that :func:`paired_differences` compares (and
    the figure's per-scan panel draws): every generated arm (cvae, cvae+annotated, cvae>annotated,
    target, annotated+target, anchored) at N against each arm without a generator — the real-data arms, the
    references (zero, demons), and ``random`` at the same N —, each arm of :data:`AGAINST` against
    its arm there at the same N, ``transport`` (exactly labelled pairs without a generator) against
    each arm without a generator but ``random``, and the scaling question: every synthetic arm at
    its largest N against the same arm at each smaller N."""
    keys = sorted(set(keys))
    largest: dict[str, int] = {}
    for arm, n in keys:
        largest[arm] = max(n, largest.get(arm, n))
    pairs: list[tuple[tuple[str, int], tuple[str, int]]] = []
    for subj in keys:
        sa = arm_of(subj[0])
        if sa is None:
            continue
        for other in keys:
            oa = arm_of(other[0])
            if other == subj:
                continue
            if oa is sa and sa.synthetic:
                if subj[1] == largest[subj[0]] and other[1] < subj[1]:
                    pairs.append((subj, other))  # scaling: does a larger corpus of the same arm help?
                continue
            if not sa.generated and sa is not UtilityArm.TRANSPORT:
                continue
            if sa is UtilityArm.TRANSPORT and oa is not None and (oa.generated or oa is UtilityArm.RANDOM):
                continue  # the generated arms are compared with it; random is another question
            if oa is not None and oa.synthetic and other[1] != subj[1]:
                continue  # synthetic arms are compared at the same corpus size
            if oa is not None and oa.generated and AGAINST.get(sa) is not oa:
                continue  # among generated arms only those of AGAINST, once
            pairs.append((subj, other))
    return pairs


def paired_differences(rows: Sequence[dict], refs: Sequence[dict], cfg: Config) -> list[dict[str, Any]]:
    """The pairs of :func:`comparison_pairs`, scan by scan.

    Arms are scored on the same held-out scans, so the question "does arm A beat arm B" (a corpus
    arm against another arm; an arm's largest N against its smaller N) is answered by the per-scan
    difference (seed means), not by whether two marginal intervals overlap: ``delta`` = subject −
    other, its mean over the scans both were scored on with a 95 % interval by ``utility.interval`` (pairs kept), and ``wins`` = scans where the subject is better (lower EPE and
    folding, higher Dice).
    """
    from .intervals import mean_interval

    per = per_scan_means(rows, refs)
    pairs = comparison_pairs(list(per))
    out: list[dict[str, Any]] = []
    for subj, other in pairs:
        for m in METRICS:
            scans = sorted(s for s in per[subj] if s in per[other] and m in per[subj][s] and m in per[other][s])
            if not scans:
                continue
            d = [per[subj][s][m] - per[other][s][m] for s in scans]
            mean, lo, hi = mean_interval(d, cfg.utility.interval, n_boot=cfg.utility.bootstrap, seed=cfg.seed)
            wins = sum(subject_better(m, x) for x in d)
            out.append({"arm": subj[0], "n": subj[1], "vs_arm": other[0], "vs_n": other[1], "metric": m,
                        "delta": mean, "ci_low": lo, "ci_high": hi, "wins": int(wins), "scans": len(scans)})
    return out


def format_paired(rows: Sequence[dict], metric: str = "epe_myo_mm", n_boot: int = 2000, seed: int = 0,
                  method: IntervalMethod | str = IntervalMethod.STUDENT_T) -> str:
    """The paired comparison of ``metric`` as a text table: subject − other [95 % interval], wins;
    below it, how often an interval by ``method`` over that many scans excludes zero for a true tie
    (:func:`~cardiomotion.evaluate.power.tie_read_as_difference` with the intervals' ``n_boot``
    resamples and ``seed``: the run's ``utility.interval``, ``utility.bootstrap`` and ``seed``;
    near 5 % for ``student_t``, above it over few scans for ``percentile``)."""
    from .power import tie_read_as_difference

    picked = [r for r in rows if r["metric"] == metric]
    if not picked:
        return ""
    lines = [f"{'arm':<16}{'N':>6}  {'vs':<16}{'N':>6}  {'delta ' + metric:>32}{'wins':>9}"]
    for r in picked:
        cell = f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"{r['arm']:<16}{r['n']:>6}  {r['vs_arm']:<16}{(str(r['vs_n']) if r['vs_n'] else '–'):>6}  "
                     f"{cell:>32}{str(r['wins']) + '/' + str(r['scans']):>9}")
    counts = sorted({int(r["scans"]) for r in picked if int(r["scans"]) > 1})
    if counts:
        method = IntervalMethod(method)
        rates = ", ".join(f"{tie_read_as_difference(n, n_boot=n_boot, seed=seed, method=method):.0%} over {n} scans"
                          for n in counts)
        lines.append(f"({method.value} intervals exclude zero for a true tie {rates}; nominally 5 %: "
                     f"bench/utility_power.py plans folds and seeds)")
    return "\n".join(lines)


def format_table(rows: Sequence[dict], metrics: Sequence[str] = ("epe_myo_mm", "epe_mm", "dice", "folding")) -> str:
    """The summary as a text table: one line per (arm, N), mean [95 % interval] per metric."""
    keyed: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["arm"], r["n"]), {})[r["metric"]] = r
    head = f"{'arm':<16}{'N':>6}  " + "".join(f"{m:>26}" for m in metrics) + f"{'scans':>7}"
    lines = [head]
    for (arm, n), by in sorted(keyed.items(), key=lambda kv: (kv[0][1] == 0, kv[0][0], kv[0][1])):
        cells = []
        for m in metrics:
            r = by.get(m)
            cells.append(f"{'–':>26}" if r is None or r["mean"] != r["mean"] else
                         f"{r['mean']:>10.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]".rjust(26))
        scans = next(iter(by.values()))["scans"]
        lines.append(f"{arm:<16}{(str(n) if n else '–'):>6}  " + "".join(cells) + f"{scans:>7}")
    return "\n".join(lines)


TABLE_COLUMNS = ("arm", "n", "metric", "mean", "ci_low", "ci_high", "scans", "runs", "seed_sd")
PAIRED_COLUMNS = ("arm", "n", "vs_arm", "vs_n", "metric", "delta", "ci_low", "ci_high", "wins", "scans")


def utility_figure(rows: Sequence[dict], path: Path, metric: str = "epe_myo_mm",
                   per_scan: dict[tuple[str, int], dict[str, dict[str, float]]] | None = None) -> Path:
    """Held-out ``metric`` against corpus size N per arm (95 % intervals by ``utility.interval``); real arms and
    references as horizontal lines. With ``per_scan`` (:func:`per_scan_means`) and a corpus arm,
    a second panel pairs the held-out scans: the corpus arm at its largest N against each arm
    :func:`comparison_pairs` compares it with (its own smaller N included), one point per scan
    (below the diagonal: the corpus arm's error is lower)."""
    from .figures import pyplot, save_figure

    plt = pyplot()
    subject = None
    if per_scan:
        # cvae at its largest N, else the mixed arm's, else the fine-tuned arm's, else the target
        # arms', else the anchored arm's (one order, whatever order the rows came in)
        preference = (UtilityArm.ANCHORED, UtilityArm.ANNOTATED_TARGET, UtilityArm.TARGET, UtilityArm.FINETUNE,
                      UtilityArm.MIXED, UtilityArm.CVAE)
        corpus = sorted((k for k in per_scan if (a := arm_of(k[0])) is not None and a.generated),
                        key=lambda k: (preference.index(arm_of(k[0])), k[1]))
        subject = corpus[-1] if corpus else None
    if subject is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.4), gridspec_kw={"width_ratios": [1.35, 1]})
    sel = [r for r in rows if r["metric"] == metric]
    arms = sorted({r["arm"] for r in sel})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({r["n"] for r in sel if (a := arm_of(r["arm"])) is not None and a.synthetic})
    for i, arm in enumerate(arms):
        pts = sorted((r for r in sel if r["arm"] == arm), key=lambda r: r["n"])
        c = colors[i % len(colors)]
        member = arm_of(arm)
        if member is not None and member.synthetic and sizes:
            x = [r["n"] for r in pts]
            y = [r["mean"] for r in pts]
            err = [[r["mean"] - r["ci_low"] for r in pts], [r["ci_high"] - r["mean"] for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=c, label=arm)
        else:
            r = pts[0]
            ax.axhline(r["mean"], color=c, ls="--" if member is None else "-.", lw=1.2, label=f"{arm}")
            if sizes and r["ci_high"] > r["ci_low"]:
                ax.axhspan(r["ci_low"], r["ci_high"], color=c, alpha=0.08)
    if sizes:
        ax.set_xscale("log", base=2)
    rest = [r for r in sel if r["arm"] != "zero" and r["mean"] == r["mean"]]
    zero = [r for r in sel if r["arm"] == "zero" and r["mean"] == r["mean"]]
    if metric != "dice" and rest and zero:
        z = zero[0]
        # arms no better than zero flow (random fields on their plateau) must not set the scale
        learned = [r for r in rest if r["mean"] < z["ci_low"]]
        if learned:
            top = max(max(r["ci_high"], r["mean"]) for r in learned)
            bottom = min(min(r["ci_low"], r["mean"]) for r in learned)
            if z["mean"] > top + (top - bottom) + 0.5:  # zero flow would squash the arms: note it instead
                y_top = top + 0.3 * (top - bottom + 0.1)
                ax.set_ylim(max(0.0, bottom - 0.15 * (top - bottom + 0.1)), y_top)
                above = [f"zero flow {z['mean']:.2f}"] + [  # exactly what the axis leaves out
                    r["arm"] + (f" (N {r['n']})" if r["n"] else "") + f" {r['mean']:.2f}"
                    for r in rest if r["mean"] > y_top]
                ax.text(0.02, 0.03, "above the plot: " + ", ".join(above), transform=ax.transAxes,
                        va="bottom", fontsize=8, color="0.3")
    ax.set_xlabel("training samples N (synthetic arms)")
    names = {"epe_myo_mm": "myocardium EPE (mm)", "epe_mm": "EPE (mm)", "dice": "Dice (LV blood, LV myo)",
             "folding": "folding fraction"}
    ax.set_ylabel(f"held-out {names.get(metric, metric)}")
    ax.set_title("Downstream utility: the same estimator on each data arm")
    ax.legend(fontsize=8, ncol=2)
    if subject is not None:
        mine = per_scan[subject]
        lo, hi = np.inf, -np.inf
        # the pairs the table compares with the subject; (mixed, cvae) and (fine-tuned, cvae) drawn
        # with the subject cvae on y, so their deltas have the table's opposite sign
        pairs = comparison_pairs(list(per_scan))
        paired_with = {o for s, o in pairs if s == subject} | {s for s, o in pairs if o == subject}
        markers = "osD^vP*X"
        # another arm worse than zero flow on its worst scan (a diverged estimator) would stretch the
        # axis over nothing: it is named under the axis instead
        zero_vals = [v[metric] for v in per_scan.get(("zero", 0), {}).values() if metric in v]
        cap = 1.05 * max(zero_vals) if zero_vals and metric in ("epe_mm", "epe_myo_mm") else np.inf
        off: list[str] = []
        for i, arm in enumerate(arms):
            others = sorted(k for k in paired_with if k[0] == arm and k[0] != "zero")
            for j, k in enumerate(others):  # the subject's own smaller N: one marker per N
                both = [(sc, per_scan[k][sc][metric], mine[sc][metric]) for sc in sorted(mine)
                        if sc in per_scan[k] and metric in per_scan[k][sc] and metric in mine[sc]]
                off += [f"{arm}" + (f" (N {k[1]})" if k[1] else "") + f" on {sc}: {x:.2f}" for sc, x, _ in both if x > cap]
                pts = [(x, y) for _, x, y in both if x <= cap]  # the subject's own scores always set the scale
                if not pts:
                    continue
                x, y = np.asarray(pts).T
                lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
                bx.scatter(x, y, s=22, color=colors[i % len(colors)], marker=markers[j % len(markers)],
                           label=f"vs {arm}" + (f" (N {k[1]})" if k[1] else ""))
        if np.isfinite(lo):
            pad = 0.05 * (hi - lo or 1.0)
            bx.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, ls=":")
            bx.set_xlim(lo - pad, hi + pad)
            bx.set_ylim(lo - pad, hi + pad)
            bx.set_aspect("equal")
        bx.set_xlabel(f"other arm: {names.get(metric, metric)}"
                      + "".join(f"\n{line}" for line in (["off the axis (worse than zero flow):"] + off if off else [])))
        bx.set_ylabel(f"{subject[0]} (N {subject[1]}): {names.get(metric, metric)}")
        bx.set_title(f"Per held-out scan ({len(mine)}): below the diagonal\n{subject[0]} is better", fontsize=10)
        if bx.get_legend_handles_labels()[0]:  # a run of one arm has no other arm to plot against
            bx.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
