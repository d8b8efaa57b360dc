"""Stop 43's one-off pilot (kept beside its rows, not a bench): supports other than the blood pool,
applied to the plain (support-free) refined flows of a cohort, scored against the exact truth as
``bench/refine_sweep.py`` scores (README, "A support grown from where the frames differ").

    python docs/results/support_change/support_pilot.py PREPARED PLAIN_FLOWS COHORT OUT.jsonl [SCANS]

Supports (weight in [0, 1] on the ED grid, cosine taper over half the margin, as annotate.support):
  blood<m>        distance to the blood pool (annotate's support), margin m mm
  change<m>_k<k>  distance to the voxels where the frames differ: |G_1 * (ED - ES)| > k robust sd
  union<m>_k<k>   max(blood20, change<m>_k<k>)
"""
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "platform"))
import refine_sweep as rs  # noqa: E402
from cardiomotion.annotate.support import blood_pool, support_weight  # noqa: E402
from cardiomotion.data.table import load_pair, read_scan_table  # noqa: E402
from cardiomotion.flow.io import read_flow  # noqa: E402

BLOOD = (200.0, 800.0)


def change_region(es, ed, sigma_vox=1.0, k=5.0):
    d = ndimage.gaussian_filter(ed.astype(np.float64) - es.astype(np.float64), sigma_vox)
    sd = 1.4826 * np.median(np.abs(d - np.median(d)))
    return np.abs(d) > k * max(sd, 1e-6)


def dist(region, spacing):
    return ndimage.distance_transform_edt(~region, sampling=spacing)


prep, plain, cohort, out_path = sys.argv[1:5]
n = int(sys.argv[5]) if len(sys.argv) > 5 else 44
table = read_scan_table(prep)
rows = {str(r["scan_id"]): r for _, r in table.iterrows()}
with open(out_path, "a") as out:
    for scan in sorted(rows)[:n]:
        pair = load_pair(prep, rows[scan])
        u, _ = read_flow(Path(plain) / scan / "flow.nii.gz")
        s = pair.spacing_mm
        pool = blood_pool(pair.es, BLOOD) | blood_pool(pair.ed, BLOOD)
        d_blood = dist(pool, s)
        supports = {"none": np.ones(pair.ed.shape, np.float32)}
        for m in (20.0, 30.0):
            supports[f"blood{m:g}"] = support_weight(d_blood, m)
        for sig, k in ((1.0, 5.0), (1.0, 3.0)):
            ch = change_region(pair.es, pair.ed, sig, k)
            d_ch = dist(ch, s)
            for m in (5.0, 10.0, 15.0, 20.0):
                w = support_weight(d_ch, m)
                supports[f"change{m:g}_k{k:g}"] = w
                supports[f"union{m:g}_k{k:g}"] = np.maximum(w, supports["blood20"])
        for name, w in supports.items():
            row = rs.score(u * w[None], pair.truth_flow, s, pair.ed_labels)
            row.update(cohort=cohort, scan=scan, support=name, share=float((w > 0).mean()))
            out.write(json.dumps(row) + "\n")
        out.flush()
        print(scan, flush=True)
