"""Stop 46's probe: does an incompressibility term in annotate's refinement recover the in-wall motion?

`python docs/results/annotation_volume/probe.py PREPARED OUT.jsonl WEIGHTS FIRST:LAST [LOW,HIGH]`
(e.g. P of /work/exp/c44, weights 0,0.1,1, scans 0:12, tissue 0,200 HU). Per scan and weight λ:
annotate's default refinement (zero start, the 30 mm support, mask mode; `Config()`) with
λ · mean over the ED tissue (HU in [LOW, HIGH]) of (det J − 1)² added to its loss
(`refine_flow(volume_weight=λ, tissue=...)`), scored against the phantom's exact truth: EPE in the
myocardium, the heart and the grid, and the myocardium's error split into radial, circumferential
and longitudinal (the LV's principal axis, as U46/component_probe.py). One JSON row per line."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cardiomotion.annotate.refine import refine_flow
from cardiomotion.annotate.stage import Refinement, pair_support
from cardiomotion.config import Config
from cardiomotion.data.intensity import hu_to_unit
from cardiomotion.data.phantom import region_masks
from cardiomotion.data.table import load_pair, read_scan_table
from cardiomotion.flow.metrics import jacobian_determinant

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utility_masked" / "U46"))
from component_probe import split  # noqa: E402

prepared, out = sys.argv[1], sys.argv[2]
weights = [float(w) for w in sys.argv[3].split(",")]
first, last = (int(v) for v in sys.argv[4].split(":"))
low, high = (float(v) for v in (sys.argv[5] if len(sys.argv) > 5 else "0,200").split(","))
torch.set_num_threads(1)
cfg = Config()
ref = Refinement.from_config(cfg)


def components(u, truth, lab, h):
    t, a = split(lab, truth, u)
    return np.sqrt(((a - t) ** 2).mean(0) * h * h).tolist()


for row in read_scan_table(prepared).to_dict("records")[first:last]:
    pair = load_pair(prepared, row, with_truth=True)
    fixed = torch.from_numpy(hu_to_unit(pair.ed, cfg.intensity.window))[None, None]
    moving = torch.from_numpy(hu_to_unit(pair.es, cfg.intensity.window))[None, None]
    support, _ = pair_support(pair, ref)
    tissue = torch.from_numpy(((pair.ed >= low) & (pair.ed <= high)).astype(np.float32))[None, None]
    truth = np.asarray(pair.truth_flow, np.float64)
    masks = region_masks(pair.ed_labels)
    h = float(pair.spacing_mm)
    for w in weights:
        t0 = time.perf_counter()
        u = refine_flow(fixed, moving, torch.zeros(1, 3, *fixed.shape[2:]), steps=ref.steps, lr=ref.lr,
                        smooth_weight=ref.smooth_weight, alpha=ref.alpha, similarity=ref.similarity,
                        sigma=ref.sigma, levels=ref.levels, edge_weight=ref.edge_weight,
                        volume_weight=w, tissue=tissue)
        if support is not None:
            u = support * u
        un = u[0].numpy().astype(np.float64)
        err = np.linalg.norm(un - truth, axis=0) * h
        det = jacobian_determinant(un)
        rec = {"scan": row["scan_id"], "weight": w, "tissue_hu": [low, high],
               "epe_myo": float(err[masks["myo"]].mean()), "epe_heart": float(err[masks["heart"]].mean()),
               "epe_grid": float(err.mean()),
               "err_rad_circ_long": components(un, truth, pair.ed_labels, h),
               "det_dev_myo": float(np.abs(det - 1)[masks["myo"]].mean()),
               "truth_det_dev_myo": float(np.abs(jacobian_determinant(truth) - 1)[masks["myo"]].mean()),
               "tissue_share": float(tissue.mean()), "seconds": time.perf_counter() - t0}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
