"""Stop 46's tables, labels refined with the incompressibility term downstream:
`python docs/results/utility_masked/summ46.py docs/results/utility_support/U42d_runs.jsonl
docs/results/utility_masked/U43/runs.jsonl docs/results/utility_masked/U44/runs.jsonl
docs/results/utility_masked/U46/runs.jsonl` — the first three hold the rows on stop 41's default
labels (A43: annotated from U42d (folds 0-3) and U44 (4-7), cvae from U43 (0-3) and U44 (4-7)),
the last the rows of this stop on the labels with λ 0.001 (A46_001), whose arms are named
"annotated46" and "cvae46" here. Seed 0 only (the one seed U46 ran), N 256, paired scan by scan
with compare_folders."""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rowtools import cmp, get, load, magnitude_table, one_seed, pool  # noqa: E402

ARMS = ("annotated", "cvae", "annotated46", "cvae46")
#: (subject, other, their N): what each paired row asks
PAIRS = [("annotated46", "annotated", 43, 43), ("cvae46", "cvae", 256, 256), ("cvae46", "annotated46", 256, 43),
         ("cvae", "annotated", 256, 43)]
*old, new = sys.argv[1:]
with tempfile.TemporaryDirectory() as tmp:
    renamed = Path(tmp) / "new_runs.jsonl"
    renamed.write_text("".join(json.dumps({**r, "arm": r["arm"] + "46"}) + "\n" for r in load(new)))
    pooled, dirs = pool(old + [str(renamed)], ARMS, tmp)
    pooled, _ = one_seed(pooled)
    scans = sorted({r["scan"] for r in pooled["annotated46"]})
    print("| held-out scan (seed 0, myocardium EPE mm) | " + " | ".join(ARMS) + " | annotated46 − annotated |")
    print("|---" * (len(ARMS) + 2) + "|")
    for s in scans:
        v = {arm: get(pooled[arm], s, arm) for arm in ARMS}
        print(f"| {s} | " + " | ".join(f"{v[a]:.2f}" for a in ARMS) + f" | {v['annotated46'] - v['annotated']:+.2f} |")
    print()
    print("| paired over the held-out scans (seed 0) | myocardium EPE | whole-grid EPE | Dice |")
    print("|---|---|---|---|")
    for arm, other, n, on in PAIRS:
        print(f"| {arm} − {other} | " + " | ".join(cmp(dirs[arm], dirs[other], arm, other, n, on, m, seeds=[0])
                                                 for m in ("epe_myo_mm", "epe_mm", "dice")) + " |")
    print()
    print("\n".join(magnitude_table(pooled, ARMS, scans)))
