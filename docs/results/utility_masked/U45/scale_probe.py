"""Stop 45's offline probe: does one global scale mend the annotations' under-stated motion?

`python docs/results/utility_masked/U45/scale_probe.py PREPARED FLOWS [N]` (here P and A43 of
/work/exp/c44, N 16: the first 16 scans). Per scan: the truth's mean myocardial motion over the
annotation's; the scale s in 0.80…1.60 (step 0.05) that minimises the image error of
warp(ES, s·u) against ED where the annotation moves (> 0.25 voxel), or over the whole grid
(both truth-free); and the s that minimises the myocardium EPE of s·u against the truth."""
import sys

import numpy as np
import torch

from cardiomotion.data.intensity import hu_to_unit
from cardiomotion.data.phantom import LV_MYO
from cardiomotion.data.table import load_pair, read_scan_table
from cardiomotion.flow.io import read_flow
from cardiomotion.flow.warp import warp
from cardiomotion.layout import flow_path

prepared, flows = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
window = (-200.0, 800.0)  # intensity.window's default
scales = np.round(np.arange(0.8, 1.61, 0.05), 2)
found = []
print("scan truth/annotation s*(image, moving region) s*(image, grid) s*(myocardium EPE)")
for row in read_scan_table(prepared).to_dict("records")[:n]:
    pair = load_pair(prepared, row, with_truth=True)
    u = torch.from_numpy(np.asarray(read_flow(flow_path(flows, row["scan_id"]))[0], np.float32))[None]
    es = hu_to_unit(torch.from_numpy(pair.es)[None, None], window)
    ed = hu_to_unit(torch.from_numpy(pair.ed)[None, None], window)
    myo = torch.from_numpy(pair.ed_labels == LV_MYO)
    truth = torch.from_numpy(np.asarray(pair.truth_flow, np.float32))
    moving = u[0].norm(dim=0) > 0.25
    region, grid, epe = [], [], []
    for s in scales:
        r = (warp(es, s * u) - ed)[0, 0] ** 2
        region.append(float(r[moving].mean()))
        grid.append(float(r.mean()))
        epe.append(float((s * u[0] - truth).norm(dim=0)[myo].mean()))
    ratio = float(truth.norm(dim=0)[myo].mean() / u[0].norm(dim=0)[myo].mean())
    found.append((ratio, *(scales[int(np.argmin(x))] for x in (region, grid, epe))))
    print(row["scan_id"], *(f"{v:.3f}" for v in found[-1]), flush=True)
print("mean", *(f"{v:.3f}" for v in np.mean(found, axis=0)))
