"""Stop 53: which 95 % interval over few held-out scans — the percentile bootstrap (every table up
to stop 52), the expanded percentile bootstrap, or Student's t — measured on the questions the
utility tables ask.

1. How often a true tie reads as a difference (the interval excludes zero; nominally 5 %) over
   n = 3, 4, 8, 16, 44 per-scan differences drawn from three shapes: normal; heavy-tailed
   (Student t, 3 degrees of freedom); skewed (a centred log-normal, σ 0.75). 20 000 simulated
   comparisons per cell, 2000 resamples (seed 0) for the bootstrap methods, as ``utility`` draws them.
2. What each costs in resolution: the smallest true difference the paired interval resolves in
   80 % of comparisons (``power.smallest_resolved``) on stop 38's spread (cvae − annotated,
   `docs/results/utility_8folds_3seeds`), one seed, 8 and 44 folds; and how often a true 0.1 mm is
   resolved.

`python docs/results/interval_method/coverage.py docs/results/utility_8folds_3seeds > docs/results/interval_method/coverage.md`
(about 3 minutes on two cores).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "platform"))
from cardiomotion.choices import IntervalMethod  # noqa: E402
from cardiomotion.evaluate.compare import Side, compare_folders  # noqa: E402
from cardiomotion.evaluate.intervals import mean_intervals  # noqa: E402
from cardiomotion.evaluate.power import resolution, smallest_resolved, spread_of  # noqa: E402

TRIALS, SCANS = 20_000, (3, 4, 8, 16, 44)
METHODS = list(IntervalMethod)


def shapes(rng, shape):
    """Zero-mean per-scan differences of three shapes (the scale does not change the rates)."""
    lognormal = rng.lognormal(0.0, 0.75, shape)
    return {"normal": rng.normal(size=shape), "heavy-tailed (t, 3 df)": rng.standard_t(3, shape),
            "skewed (log-normal, σ 0.75)": lognormal - np.exp(0.75 ** 2 / 2)}


print("### A true tie read as a difference (nominally 5 %)\n")
print("| shape of the per-scan differences | interval | " + " | ".join(f"{n} scans" for n in SCANS) + " |")
print("|---|---|" + "---|" * len(SCANS))
rates = {}
for n in SCANS:
    draws = shapes(np.random.default_rng(n), (TRIALS, n))
    for shape, d in draws.items():
        for m in METHODS:
            lo, hi = mean_intervals(d, m).T
            rates[shape, m, n] = float(((lo > 0) | (hi < 0)).mean())
for shape in shapes(np.random.default_rng(0), (1, 2)):
    for m in METHODS:
        print(f"| {shape} | {m.value} | " + " | ".join(f"{rates[shape, m, n]:.1%}" for n in SCANS) + " |")

folder = sys.argv[1]
cmp = compare_folders(Side(Path(folder), "cvae", 256), Side(Path(folder), "annotated", 43))
spread = spread_of(cmp["per_scan"])
print(f"\n### What each costs: stop 38's spread (τ {spread.difference_sd:.3f} mm, σ {spread.seed_sd_a:.3f} / "
      f"{spread.seed_sd_b:.3f} mm), one seed per arm\n")
print("| interval | folds | paired 95 % half-width (mm) | a true 0.1 mm resolved | smallest resolved in 80 %, paired (mm) |")
print("|---|---|---|---|---|")
for folds in (8, 44):
    for m in METHODS:
        r = resolution(spread, folds, 1, 0.1, method=m)
        print(f"| {m.value} | {folds} | {r.halfwidth:.3f} | {r.excludes_zero:.0%} | "
              f"{smallest_resolved(spread, folds, 1, method=m):.3f} |")
print(f"\n{TRIALS} simulated ties per cell; 1000 simulated comparisons per resolution row.")
