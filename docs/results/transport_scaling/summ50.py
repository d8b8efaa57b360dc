"""Stop 50's table: the transport arm with 16 partners (N 731) against 4 partners (N 215, stop 49),
stop 46's pairs and stop 46's corpus, held-out scan by scan.

`python docs/results/transport_scaling/summ50.py docs/results/utility_masked/U46/runs.jsonl
docs/results/transport_arm/U49T_runs.jsonl docs/results/transport_scaling/U50K16_runs.jsonl [more k rows...]`
— the first file holds stop 46's annotated and cvae rows, the others transport rows (named
transport_k<k> here by their N = 43·(1 + k)). Seed 0, paired with compare_folders
(bench/utility_compare.py's library call)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utility_masked"))
from rowtools import load, magnitude_table, one_seed, paired_table, pool, renamed, scan_table  # noqa: E402

base, *moved = sys.argv[1:]
with tempfile.TemporaryDirectory() as tmp:
    files, names = [base], []
    for path in moved:
        n = next(r["n"] for r in load(path) if r["arm"] == "transport")
        name = f"transport_k{n // 43 - 1}"
        files.append(renamed(path, "transport", name, tmp))
        names.append(name)
    arms = ["annotated", "cvae", *names]
    pooled, dirs = pool(files, arms, tmp)
    pooled, n = one_seed(pooled)
    scans = sorted(set.intersection(*({r["scan"] for r in pooled[a]} for a in names)))
    print("\n".join(scan_table(pooled, arms, scans)))
    print()
    pairs = [(a, b) for a in names for b in ("annotated", "cvae")]
    pairs += [(b, a) for i, a in enumerate(names) for b in names[i + 1:]]
    print("\n".join(paired_table(dirs, n, pairs)))
    print()
    print("\n".join(magnitude_table(pooled, arms, scans)))
    for name in names:
        rows = pooled[name]
        seconds = [r["transport_s"] for r in rows if "transport_s" in r]
        registered = [r["transport_registered"] for r in rows if "transport_registered" in r]
        print(f"\n{name}: {len(rows)} rows, {sum(r.get('transport_dropped', 0) for r in rows)} pairs dropped, "
              f"{min(seconds):.0f}–{max(seconds):.0f} s to register or read"
              + (f", {sum(registered)} pairs registered ({registered})" if registered else ""))
