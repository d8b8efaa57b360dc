"""Stop 50's anchored-arm table: the transport pool's fields varied by the fold CVAE around each
(anchored) against the same pool alone (transport, stop 49), the same fold CVAEs' corpus (stop 48's
transport-trained `paper` CVAEs, cvae_TR), stop 46's pairs and corpus, held-out scan by scan.

`python docs/results/transport_scaling/summ50a.py docs/results/utility_masked/U46/runs.jsonl
docs/results/motion_transport/U48_runs.jsonl docs/results/transport_arm/U49T_runs.jsonl
docs/results/transport_scaling/U50A_runs.jsonl`. Seed 0, paired with compare_folders
(bench/utility_compare.py's library call)."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utility_masked"))
from rowtools import magnitude_table, one_seed, paired_table, pool, renamed, scan_table  # noqa: E402

base, tr, transport, anchored = sys.argv[1:5]
with tempfile.TemporaryDirectory() as tmp:
    trained = renamed(tr, "cvae", "cvae_TR", tmp)
    arms = ["annotated", "cvae", "cvae_TR", "transport", "anchored"]
    pooled, dirs = pool([base, trained, transport, anchored], arms, tmp)
    pooled, n = one_seed(pooled)
    scans = sorted({r["scan"] for r in pooled["anchored"]})
    print("\n".join(scan_table(pooled, arms, scans)))
    print()
    pairs = (("anchored", "transport"), ("anchored", "cvae_TR"), ("anchored", "annotated"), ("anchored", "cvae"),
             ("transport", "annotated"), ("cvae_TR", "transport"))
    print("\n".join(paired_table(dirs, n, pairs)))
    print()
    print("\n".join(magnitude_table(pooled, arms, scans)))
