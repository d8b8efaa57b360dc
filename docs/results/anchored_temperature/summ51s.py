"""Stop 51's estimator-budget table: the transport pool (stop 49) and the annotated pairs trained
for 2000 Adam steps instead of 1000, held-out scan by scan.

`python docs/results/anchored_temperature/summ51s.py docs/results/utility_masked/U46/runs.jsonl
docs/results/transport_arm/U49T_runs.jsonl docs/results/anchored_temperature/U51S2000_runs.jsonl`
— the first file holds stop 46's annotated rows (1000 steps), the second stop 49's transport rows
(1000 steps), the third both arms at 2000 steps (named transport_2000 and annotated_2000 here). The
scans: those the 2000-step file holds for both arms (every arm and pair over them). Seed 0, paired with compare_folders
(bench/utility_compare.py's library call)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utility_masked"))
from rowtools import load, magnitude_table, one_seed, paired_table, pool, renamed, scan_table  # noqa: E402

base, transport, longer = sys.argv[1:4]
with tempfile.TemporaryDirectory() as tmp:
    steps = {r["steps"] for r in load(longer)}
    assert steps == {2000}, f"{longer}: steps {steps}"
    files = [base, transport] + [renamed(longer, arm, f"{arm}_2000", tmp) for arm in ("transport", "annotated")]
    arms = ["annotated", "transport", "annotated_2000", "transport_2000"]
    done = [{r["scan"] for r in load(longer) if r["arm"] == arm and r["seed"] == 0} for arm in ("transport", "annotated")]
    scans = sorted(set.intersection(*done))
    pooled, dirs = pool(files, arms, tmp, scans)  # every comparison over the same scans
    pooled, n = one_seed(pooled)
    print("\n".join(scan_table(pooled, arms, scans)))
    print()
    pairs = (("transport_2000", "annotated_2000"), ("transport", "annotated"), ("annotated_2000", "annotated"),
             ("transport_2000", "transport"))
    print("\n".join(paired_table(dirs, n, pairs, vary=("steps",))))
    print()
    print("\n".join(magnitude_table(pooled, arms, scans)))
    for arm in ("annotated_2000", "transport_2000"):
        rs = pooled[arm]
        losses = ", ".join(format(r["final_loss"], ".3f") for r in rs)
        seconds = [r["train_s"] for r in rs]
        print(f"\n{arm}: final training loss {losses}; {min(seconds):.0f}–{max(seconds):.0f} s to train")
