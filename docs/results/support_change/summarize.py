"""The support pilot's table: mean over scans per (cohort, support), the supports worth reading.

    python docs/results/support_change/summarize.py docs/results/support_change/*.jsonl
"""
import sys

import pandas as pd

COLS = {"epe_mm": "whole grid", "epe_myo_mm": "myocardium", "epe_heart_mm": "heart", "epe_rv_wall_mm": "RV wall",
        "epe_far_mm": "> 30 mm from heart", "magnitude_rv_wall": "RV-wall motion / truth", "share": "share of grid"}
KEEP = ["none", "blood20", "blood30", "change10_k3", "change10_k5", "change15_k5", "union5_k3", "union5_k5",
        "union10_k3", "union10_k5"]
d = pd.concat([pd.read_json(p, lines=True) for p in sys.argv[1:]])
for cohort, g in d.groupby("cohort", sort=False):
    t = g.groupby("support")[list(COLS)].mean().loc[KEEP].rename(columns=COLS)
    print(f"\n{cohort}: {g.scan.nunique()} scans, EPE in mm\n")
    print("| support | " + " | ".join(t.columns) + " |")
    print("|---" * (len(t.columns) + 1) + "|")
    for name, row in t.iterrows():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
