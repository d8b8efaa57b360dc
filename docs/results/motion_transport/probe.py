"""How closely does another scan's motion, transported onto a scan (train/transport.py), match
that scan's own? Scored on the phantom's exact truth, for several demons schedules.

For distinct ordered pairs (i, j) of scans 8-43 only (the utility folds 0-7 hold out scans 0-7; nothing here
looks at them), it registers ES_j onto ES_i and reports, in the target's LV myocardium (mm):

* ``own_annotation``: i's annotated flow against i's truth (what the CVAE trains on now);
* ``raw_truth_j`` / ``transported_truth_j``: j's true motion used as is / transported, against
  i's truth: how far apart two hearts' motions are once their anatomies are put in
  correspondence (the physiological variation transport adds, plus the registration's error);
* ``transported_annotation_j``: j's annotation transported (what transport trains the CVAE on);
* the seconds per registration (one thread).

Usage (from a folder holding the prepared cohort P and the labels A46_001):
    python docs/results/motion_transport/probe.py --prepared P --flows A46_001 --pairs 12 \
        --out docs/results/motion_transport/probe.jsonl
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import nibabel as nib
import torch

from cardiomotion.config import Config
from cardiomotion.data.intensity import hu_to_unit
from cardiomotion.data.phantom import LV_MYO
from cardiomotion.flow.io import read_flow
from cardiomotion.flow.metrics import endpoint_error
from cardiomotion.train.transport import register_frames, transport_flow

SCHEDULES = {"400/200/100": (400, 200, 100), "100/50/25": (100, 50, 25), "40/20/10": (40, 20, 10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--flows", required=True)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    scans = [f"phantom_{n:03d}" for n in range(8, 44)]
    combos = [(i, j) for i in scans for j in scans if i != j]
    picks = [combos[n] for n in rng.choice(len(combos), a.pairs, replace=False)]  # distinct ordered pairs
    lo, hi = Config().intensity.window

    def load(s):
        img = nib.load(f"{a.prepared}/{s}/es.nii.gz")
        es = np.asarray(img.dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(f"{a.prepared}/{s}/es_labels.nii.gz").dataobj)
        truth = read_flow(f"{a.prepared}/{s}/truth_flow.nii.gz")[0]
        ann = read_flow(f"{a.flows}/{s}/flow.nii.gz")[0]
        return hu_to_unit(es, (lo, hi)), lab == LV_MYO, truth, ann, float(img.header.get_zooms()[0])

    def epe(u, v, m, spacing):
        return endpoint_error(u, v, spacing_mm=[spacing] * 3, mask=m).epe_mm

    rows = []
    with open(a.out, "w") as fh:
        for i, j in picks:
            es_i, myo, tr_i, an_i, mm = load(i)
            es_j, _, tr_j, an_j, _ = load(j)
            for name, its in SCHEDULES.items():
                t0 = time.perf_counter()
                p = torch.from_numpy(register_frames(es_i, es_j, mm, iterations=its))[None]
                sec = time.perf_counter() - t0
                carry = lambda u: transport_flow(torch.from_numpy(u)[None], p)[0].numpy()  # noqa: E731
                row = {"target": i, "partner": j, "schedule": name, "seconds": round(sec, 3),
                       "own_annotation": epe(an_i, tr_i, myo, mm), "raw_truth_j": epe(tr_j, tr_i, myo, mm),
                       "transported_truth_j": epe(carry(tr_j), tr_i, myo, mm),
                       "transported_annotation_j": epe(carry(an_j), tr_i, myo, mm)}
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    keys = ("seconds", "own_annotation", "raw_truth_j", "transported_truth_j", "transported_annotation_j")
    print("| schedule | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in SCHEDULES:
        sel = [r for r in rows if r["schedule"] == name]
        print(f"| {name} | " + " | ".join(f"{np.mean([r[k] for r in sel]):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
