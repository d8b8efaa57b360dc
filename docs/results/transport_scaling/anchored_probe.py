"""How far the anchored arm moves its anchors (stop 50): for one fold's generator and transport
pool, the RMS of u − w (the CVAE's added variation) against the RMS of the anchors w, in mm over
the grid, and the folding fraction of u, at several temperatures; the same 64 samples each.

Usage (from the folder holding P, A46_001, the utility folder and the storage root):
python anchored_probe.py U50A phantom_006 u50a.yaml 0,0.5,1,2"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cardiomotion.config import load_config
from cardiomotion.evaluate.utility import AnchoredSource, TransportSource
from cardiomotion.evaluate.utility_estimator import training_arrays as _training_arrays
from cardiomotion.flow.metrics import folding_fraction
from cardiomotion.generate.model import load_networks, resolve_model

out, scan, config, temps = sys.argv[1], sys.argv[2], sys.argv[3], [float(t) for t in sys.argv[4].split(",")]
cfg = load_config(config)
inputs = json.loads((Path(out) / "inputs.json").read_text())
fold = Path(out) / "folds" / scan
rec = torch.load(fold / "transport_pool.pt", map_location="cpu", weights_only=True)
train_ids = json.loads(rec["key"])["train_ids"]
es, _, _ = _training_arrays(inputs["prepared"], inputs["flows"], train_ids)
pool = TransportSource(es, train_ids, rec["flows"].float(), [tuple(p) for p in rec["pairs"]],
                       [tuple(p) for p in rec["dropped"]], cfg.intensity.window)
resolved = resolve_model(json.loads((fold / "generator.json").read_text())["model_uri"], cfg)
model, pyramid = load_networks(resolved.blobs(), "cpu")
spacing = 4.0
idx = list(range(64))
for t in temps:
    src = AnchoredSource(pool, model, pyramid, 64, cfg.seed, t, resolved.window)
    u = torch.cat([src.fields(idx[i:i + 8]) for i in range(0, 64, 8)])
    w = pool.flows[src.anchor[idx]]
    rms = lambda f: float(f.pow(2).sum(1).mean().sqrt()) * spacing  # noqa: E731
    fold_u = float(np.mean([folding_fraction(x) for x in u]))
    print(json.dumps({"scan": scan, "T": t, "anchor_rms_mm": round(rms(w), 3), "added_rms_mm": round(rms(u - w), 3),
                      "added_max_mm": round(float((u - w).norm(dim=1).max()) * spacing, 2),
                      "folding_u": round(fold_u, 5)}))
