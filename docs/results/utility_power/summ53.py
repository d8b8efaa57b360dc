"""The transport pool against the annotated pairs on as many of the 44 folds as have run: stop 46's
annotated rows and stop 49's transport rows (folds 0-7) pooled with the 44-fold run's (folds 8-43,
`run52f.sh`, `u52f44.yaml`: the same estimator, one seed, 1000 steps).

`python docs/results/utility_power/summ53.py docs/results/utility_masked/U46/runs.jsonl
docs/results/transport_arm/U49T_runs.jsonl docs/results/utility_power/U52F44_runs.jsonl
[docs/results/utility_power/U55F44_runs.jsonl]`
→ stdout (Markdown, `summary53.md`) and `summary53.png` beside this script. Seed 0; the scans
where both arms have a row; paired with compare_folders (which refuses rows of other estimator
settings), Student's t and, for comparison, the percentile bootstrap.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "utility_masked"))
sys.path.insert(0, str(HERE.parents[2] / "platform"))
from rowtools import load, one_seed, pool  # noqa: E402
from cardiomotion.evaluate.compare import Side, compare_folders  # noqa: E402
from cardiomotion.evaluate.figures import pyplot, save_figure  # noqa: E402

files = sys.argv[1:]  # stop 55 adds its rows (U55F44_runs.jsonl, rebuilt labels) as a fourth file
arms = ["transport", "annotated"]
with tempfile.TemporaryDirectory() as tmp:
    have = [{r["scan"] for f in files for r in load(f) if r["arm"] == arm and r["seed"] == 0} for arm in arms]
    scans = sorted(set.intersection(*have))
    first8 = [s for s in scans if int(s.split("_")[-1]) < 8]
    later = [s for s in scans if s not in first8]
    subsets = {"first8": first8, "later": later, "all": scans}
    dirs = {}
    for key, subset in subsets.items():  # each subset's rows in folders of their own: compare_folders reads them
        Path(tmp, key).mkdir()
        pooled, dirs[key] = pool(files, arms, Path(tmp, key), subset)
    pooled, n = one_seed(pooled)  # the last pooled: all scans

    def compare(method, key="all"):
        return compare_folders(Side(dirs[key]["transport"], "transport", n["transport"], (0,)),
                               Side(dirs[key]["annotated"], "annotated", n["annotated"], (0,)), method=method)

    print(f"Held-out myocardium EPE, transport − annotated pairs, seed 0, 1000 steps: {len(scans)} scans "
          f"({len(first8)} of folds 0–7, {len(later)} of folds 8–43).\n")
    print("| scans | interval | transport − annotated (mm) | scans transport won |")
    print("|---|---|---|---|")
    for label, key in (("folds 0–7 (stops 46, 49)", "first8"), ("folds 8–43 run so far (stops 53–57)", "later"),
                       ("all", "all")):
        for method in ("student_t", "percentile"):
            if len(subsets[key]) < 2:
                continue
            d = compare(method, key)
            k = len(d["scans"])
            print(f"| {label}: {k} | {method} | {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | "
                  f"{d['a_won']}/{k} |")
    d = compare("student_t")
    deltas = np.array([d["per_scan"][s]["delta"] for s in scans])
    a = np.array([d["per_scan"][s]["a"] for s in scans])
    b = np.array([d["per_scan"][s]["b"] for s in scans])
    planned = (0.130 ** 2 + 0.132 ** 2 + 0.113 ** 2) ** 0.5
    print(f"\nMean myocardium EPE: transport {a.mean():.3f} mm, annotated {b.mean():.3f} mm. The per-scan "
          f"differences spread by {deltas.std(ddof=1):.3f} mm (one seed: τ and both seed noises together); the "
          f"planning table's parts (stop 38, cvae − annotated) give √(τ² + σ_A² + σ_B²) = {planned:.3f} mm.")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    x = np.arange(len(scans))
    ax.bar(x, deltas, color=["C2" if v < 0 else "C3" for v in deltas], width=0.8)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.axhspan(d["ci_low"], d["ci_high"], color="C0", alpha=0.2,
               label=f"mean {d['mean']:+.3f} mm, t 95 % [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    ax.axhline(d["mean"], color="C0", lw=1.2)
    ax.set_xticks(x, [s.split("_")[-1] for s in scans], rotation=90, fontsize=6)
    ax.set_xlabel("held-out scan (phantom_…)")
    ax.set_ylabel("transport − annotated, myocardium\nEPE (mm; red: the pairs better)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, HERE / "summary53.png", dpi=110)
