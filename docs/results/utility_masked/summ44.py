"""Stop 44's tables: `python docs/results/utility_masked/summ44.py U42d U43 U44` (utility folders,
or their runs.jsonl files: `docs/results/utility_support/U42d_runs.jsonl
docs/results/utility_masked/U43/runs.jsonl docs/results/utility_masked/U44/runs.jsonl`; the default 30 mm labels, flows byte for byte A_d30's, N 256, seed 0: U42d: stop 42's annotated
rows, folds 0-3; U43: stop 43's cvae and cvae>annotated rows, folds 0-3; U44: this stop's
annotated, cvae and cvae>annotated rows, folds 4-7). The rows of an arm are pooled over the
folders (each fold's rows come from one folder) and paired scan by scan with
bench/utility_compare.py's library call, compare_folders."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rowtools import cmp, get, pool  # noqa: E402

folders = sys.argv[1:]
ARMS = ("annotated", "cvae", "cvae>annotated")
with tempfile.TemporaryDirectory() as tmp:
    pooled, dirs = pool(folders, ARMS, tmp)
    scans = sorted({r["scan"] for r in pooled["cvae"]} & {r["scan"] for r in pooled["annotated"]})
    print("| held-out scan (seed 0) | annotated | cvae (N 256) | cvae>annotated | cvae − annotated "
          "| cvae>annotated − annotated |")
    print("|---|---|---|---|---|---|")
    for s in scans:  # seed 0 per scan (the paired rows below average each scan's seeds first)
        a, c, f = (get([r for r in pooled[arm] if r["seed"] == 0], s, arm) for arm in ARMS)
        print(f"| {s} | {a:.2f} | {c:.2f} | {f:.2f} | {c - a:+.2f} | {f - a:+.2f} |")
    print()
    print("| paired (held-out scans, myocardium EPE / whole-grid EPE / Dice) | myocardium | whole grid | Dice |")
    print("|---|---|---|---|")
    for arm, barm, n, bn in [("cvae", "annotated", 256, 43), ("cvae>annotated", "annotated", 256, 43),
                             ("cvae>annotated", "cvae", 256, 256)]:
        if not pooled[arm] or not pooled[barm]:
            continue
        print(f"| {arm} − {barm} | " + " | ".join(cmp(dirs[arm], dirs[barm], arm, barm, n, bn, m)
                                                for m in ("epe_myo_mm", "epe_mm", "dice")) + " |")

# where a scan has a second estimator seed: how far the two seeds lie apart (batch order and
# initialisation alone), and the paired comparison on those scans with seed 0 alone
twice = {arm: sorted({r["scan"] for r in rs if r["seed"] == 1}) for arm, rs in pooled.items()}
if any(twice.values()):
    print()
    print("| arm | scans with seeds 0 and 1 | mean abs(seed 1 − seed 0), myocardium EPE (mm) |")
    print("|---|---|---|")
    for arm, scans in twice.items():
        if scans:
            d = [abs(get([r for r in pooled[arm] if r["seed"] == 1], s, arm)
                     - get([r for r in pooled[arm] if r["seed"] == 0], s, arm)) for s in scans]
            print(f"| {arm} | {len(scans)} | {sum(d) / len(d):.3f} (max {max(d):.3f}) |")
