"""Stop 49's table: the transport arm (no generator) against stop 46's pairs and corpus and stop 48's
transport-trained corpus, held-out scan by scan.

`python docs/results/transport_arm/summ49.py docs/results/utility_masked/U46/runs.jsonl
docs/results/motion_transport/U48_runs.jsonl docs/results/transport_arm/U49T_runs.jsonl` — the first
file holds stop 46's annotated and cvae rows, the second stop 48's cvae rows (transport with the
`paper` loss, named cvae_TR here), the third the transport rows. Seed 0, paired with
compare_folders (bench/utility_compare.py's library call)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utility_masked"))
from rowtools import magnitude_table, one_seed, paired_table, pool, renamed, scan_table  # noqa: E402

base, tr, transport = sys.argv[1:4]
with tempfile.TemporaryDirectory() as tmp:
    trained = renamed(tr, "cvae", "cvae_TR", tmp)
    arms = ["annotated", "cvae", "cvae_TR", "transport"]
    pooled, dirs = pool([base, trained, transport], arms, tmp)
    pooled, n = one_seed(pooled)
    scans = sorted({r["scan"] for r in pooled["transport"]})
    print("\n".join(scan_table(pooled, arms, scans)))
    print()
    pairs = (("transport", "annotated"), ("transport", "cvae"), ("transport", "cvae_TR"), ("cvae", "annotated"))
    print("\n".join(paired_table(dirs, n, pairs)))
    print()
    print("\n".join(magnitude_table(pooled, arms, scans)))
    seconds = [r["transport_s"] for r in pooled["transport"] if "transport_s" in r]
    dropped = [r.get("transport_dropped", 0) for r in pooled["transport"]]
    print(f"\ntransport pools: {len(seconds)} rows, {sum(dropped)} pairs dropped, "
          f"{min(seconds):.0f}–{max(seconds):.0f} s to register or read")
