"""Stop 51's anchored-arm temperature table: the transport pool's fields varied by the fold CVAE
around each (u = w + D(μ + T·ε) − D(μ)) at several T, against the pool alone (transport, stop 49)
and stop 46's pairs, held-out scan by scan.

`python docs/results/anchored_temperature/summ51.py docs/results/utility_masked/U46/runs.jsonl
docs/results/transport_arm/U49T_runs.jsonl T2=docs/results/transport_scaling/U50A_runs.jsonl
T0.5=docs/results/transport_scaling/U50A05_runs.jsonl T0.25=docs/results/anchored_temperature/U51A025_runs.jsonl`
— the first file holds stop 46's annotated rows, the second the transport rows, each LABEL=FILE
anchored rows (named anchored_LABEL here), in the order the temperature falls. The scans: those
every anchored file holds (every arm and pair over them). Seed 0, paired with compare_folders
(bench/utility_compare.py's library call)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utility_masked"))
from rowtools import load, magnitude_table, one_seed, paired_table, pool, renamed, scan_table  # noqa: E402

base, transport, *labelled = sys.argv[1:]
if not labelled or not all("=" in item for item in labelled):
    sys.exit("usage: summ51.py ANNOTATED_ROWS TRANSPORT_ROWS LABEL=ANCHORED_ROWS [LABEL=ANCHORED_ROWS ...]")
with tempfile.TemporaryDirectory() as tmp:
    files, names = [base, transport], []
    for item in labelled:
        label, path = item.split("=", 1)
        names.append(f"anchored_{label}")
        files.append(renamed(path, "anchored", names[-1], tmp))
    arms = ["annotated", "transport", *names]
    scans = sorted(set.intersection(*({r["scan"] for r in load(f) if r["seed"] == 0} for f in files[2:])))
    pooled, dirs = pool(files, arms, tmp, scans)  # every comparison over the same scans
    pooled, n = one_seed(pooled)
    print("\n".join(scan_table(pooled, arms, scans)))
    print()
    pairs = [(a, b) for a in names for b in ("transport", "annotated")]
    pairs += [(names[i + 1], a) for i, a in enumerate(names[:-1])] + [("transport", "annotated")]
    print("\n".join(paired_table(dirs, n, pairs)))
    print()
    print("\n".join(magnitude_table(pooled, arms, scans)))
