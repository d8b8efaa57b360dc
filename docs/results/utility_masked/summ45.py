"""Stop 45's tables, the transductive arms: `python docs/results/utility_masked/summ45.py
docs/results/utility_support/U42d_runs.jsonl docs/results/utility_masked/U43/runs.jsonl
docs/results/utility_masked/U44/runs.jsonl` (the default 30 mm labels, N 256; annotated rows from
U42d (folds 0-3) and U44 (4-7), cvae rows from U43 (0-3) and U44 (4-7), the target and
annotated+target rows of this stop from U43 and U44 — the same fold CVAEs). Each arm's rows are
pooled over the files and paired scan by scan with compare_folders (seeds averaged first)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rowtools import cmp, get, pool  # noqa: E402

ARMS = ("annotated", "cvae", "target", "annotated+target")
#: (subject, other, their N): what each paired row asks
PAIRS = [("target", "annotated", 256, 43), ("annotated+target", "annotated", 256, 43),
         ("target", "cvae", 256, 256), ("annotated+target", "target", 256, 256)]
with tempfile.TemporaryDirectory() as tmp:
    pooled, dirs = pool(sys.argv[1:], ARMS, tmp)
    scans = sorted({r["scan"] for r in pooled["target"]})
    print("| held-out scan (seed 0, myocardium EPE mm) | " + " | ".join(ARMS)
          + " | target − cvae | annotated+target − annotated |")
    print("|---" * (len(ARMS) + 3) + "|")
    for s in scans:
        v = {arm: get([r for r in pooled[arm] if r["seed"] == 0], s, arm) for arm in ARMS}
        print(f"| {s} | " + " | ".join(f"{v[a]:.2f}" for a in ARMS)
              + f" | {v['target'] - v['cvae']:+.2f} | {v['annotated+target'] - v['annotated']:+.2f} |")
    print()
    print("| paired over the held-out scans (seeds averaged per scan) | myocardium EPE | whole-grid EPE | Dice |")
    print("|---|---|---|---|")
    for arm, other, n, on in PAIRS:
        print(f"| {arm} − {other} | " + " | ".join(cmp(dirs[arm], dirs[other], arm, other, n, on, m)
                                                 for m in ("epe_myo_mm", "epe_mm", "dice")) + " |")
    mag = {arm: [r["magnitude_myo"] for r in pooled[arm] if "magnitude_myo" in r and r["scan"] in scans]
           for arm in ARMS}  # on the scans the target arms were scored on
    print()
    print("| arm | rows | mean magnitude_myo (estimate / truth motion in the myocardium) |")
    print("|---|---|---|")
    for arm, m in mag.items():
        print(f"| {arm} | {len(m)} | {sum(m) / len(m):.3f} |")
