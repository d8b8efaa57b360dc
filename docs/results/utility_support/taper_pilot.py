"""Stop 42's one-off pilot of the support's taper (kept beside its rows, not a bench): the taper is
``cardiomotion.annotate.support.TAPER_SHARE`` × the margin, a module constant, patched here.

    python docs/results/utility_support/taper_pilot.py WASHOUT_PREPARED OPACIFIED_PREPARED OUT.jsonl

Scans 0-7 of each prepared cohort (stop 41's ``WP`` and ``P``), the default refinement from zero
flow made once per scan (``bench/refine_sweep.refine_scan``'s cache) and weighted by every
(margin, taper) below, scored against the exact truth as the refine bench scores.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "platform"))
import torch  # noqa: E402

import cardiomotion.annotate.support as sup  # noqa: E402
import refine_sweep as rs  # noqa: E402
from cardiomotion.data.table import load_pair, read_scan_table  # noqa: E402

torch.set_num_threads(1)
rows = [json.loads(line) for line in open(ROOT / "docs/results/refine_sweep/washout_0-7.jsonl")]
template = next(r["setting"] for r in rows if r["setting"].get("support_mm") == 30.0)  # stop 41's default
cohorts = {"washout": sys.argv[1], "opacified": sys.argv[2]}
combos = [(20.0, 0.5), (30.0, 0.5), (25.0, 0.2), (30.0, 1 / 6), (30.0, 1 / 3), (35.0, 1 / 7)]  # (margin, share)
with open(sys.argv[3], "a") as out:
    for name, prep in cohorts.items():
        table = read_scan_table(prep)
        by_id = {str(r["scan_id"]): r for _, r in table.iterrows()}
        for scan in sorted(by_id)[:8]:
            pair, cache = load_pair(prep, by_id[scan]), {}
            for margin, share in combos:
                sup.TAPER_SHARE = share
                row = rs.refine_scan(pair, {**template, "support_mm": margin}, cache)
                out.write(json.dumps({"cohort": name, "scan": scan, "margin": margin, "taper_mm": margin * share,
                                      **row}) + "\n")
                out.flush()
