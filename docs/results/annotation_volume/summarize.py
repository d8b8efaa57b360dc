"""Stop 46's tables: annotate's quality table of annotation folders, on the scans the utility folds
do not hold out (phantom_008 … phantom_043) and on all scans, against a reference folder, plus the
RV wall's EPE and motion against the truth (from the flows: the tissue a right heart without
contrast puts in the incompressibility term's range).

`python docs/results/annotation_volume/summarize.py PREPARED REFERENCE FOLDER...` (here
/work/exp/c44/P with A43 and A46_0003, A46_001, A46_003, A46_01: the same network, refinements with
λ 0 / 0.0003 / 0.001 / 0.003 / 0.01; and WP44 with AW30, AW46_001, AW46_003, the cohort with an
unopacified right heart). Markdown on stdout."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cardiomotion.data.phantom import RV_WALL
from cardiomotion.data.table import load_pair, read_scan_table
from cardiomotion.flow.io import read_flow
from cardiomotion.layout import flow_path

prepared, ref, folders = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
cols = {"epe_myo_mm_refined": "myocardium EPE (mm)", "epe_heart_mm_refined": "heart EPE",
        "epe_mm_refined": "whole grid EPE", "rv_wall_epe": "RV wall EPE",
        "magnitude_myo_refined": "myocardial motion / truth's", "rv_wall_magnitude": "RV-wall motion / truth's",
        "folding_refined": "folding"}
rows = {str(r["scan_id"]): r for r in read_scan_table(prepared).to_dict("records")}
pairs = {}


def rv_wall(folder: Path, scan: str) -> tuple[float, float]:
    if scan not in pairs:
        pairs[scan] = load_pair(prepared, rows[scan], with_truth=True)
    p = pairs[scan]
    wall = p.ed_labels == RV_WALL
    u = np.asarray(read_flow(flow_path(folder, scan))[0], np.float64)[:, wall]
    t = np.asarray(p.truth_flow, np.float64)[:, wall]
    epe = float(np.linalg.norm(u - t, axis=0).mean() * p.spacing_mm)
    return epe, float(np.linalg.norm(u, axis=0).mean() / np.linalg.norm(t, axis=0).mean())


tables = {}
for f in [ref] + folders:
    d = pd.read_parquet(f / "annotations.parquet").set_index("scan_id")
    d["rv_wall_epe"], d["rv_wall_magnitude"] = zip(*(rv_wall(f, s) for s in d.index))
    tables[f] = d
base = tables[ref]
for scans in ("8-43", "all"):
    print(f"\nscans {scans}\n")
    print("| folder | " + " | ".join(cols.values()) + " | myocardium better than the reference |")
    print("|---" * (len(cols) + 2) + "|")
    for f, d in tables.items():
        ids = [i for i in d.index if scans == "all" or int(str(i)[-3:]) >= 8]
        x = d.loc[ids]
        diff = x["epe_myo_mm_refined"] - base.loc[ids, "epe_myo_mm_refined"]
        cells = [f"{x[c].mean():.3f} ({x[c].std():.2f})" if "epe" in c else f"{x[c].mean():.4f}" for c in cols]
        print(f"| {f.name} | " + " | ".join(cells) + f" | {(diff < 0).sum()}/{len(ids)} ({diff.mean():+.3f}) |")
