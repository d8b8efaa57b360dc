"""Stop 42's tables: the annotated arm on 30 mm against 20 mm support labels, on the opacified cohort
(U42d against U40d) and on the cohort with an unopacified right heart (UW30 against UW20); every
comparison is bench/utility_compare.py's (its library call, compare_folders), scan by scan, seed 0.

    python docs/results/utility_support/summ42.py EXP   # EXP: the folder holding U40d U42d UW20 UW30
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "platform"))
from cardiomotion.evaluate.compare import Side, compare_folders  # noqa: E402

EXP = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
METRICS = ("epe_myo_mm", "epe_mm", "dice")


def rows(folder: str) -> dict:
    out = {}
    for line in open(EXP / folder / "runs.jsonl"):
        r = json.loads(line)
        if r["arm"] == "annotated" and r["seed"] == 0:
            out[r["scan"]] = r
    return out


def compare(a: str, b: str, metric: str) -> str:
    d = compare_folders(Side(EXP / a, "annotated", 43, (0,)), Side(EXP / b, "annotated", 43, (0,)), metric=metric,
                        method="percentile")  # the stop's table: percentile bootstrap intervals
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], {d['a_won']}/{len(d['per_scan'])}"


folders = {"opacified, 20 mm": "U40d", "opacified, 30 mm": "U42d", "unopacified RV, 20 mm": "UW20",
           "unopacified RV, 30 mm": "UW30"}
have = {k: rows(v) for k, v in folders.items() if (EXP / v / "runs.jsonl").is_file()}
scans = sorted(set.intersection(*(set(r) for r in have.values())))
print("| annotated arm, seed 0 | " + " | ".join(scans) + " | mean |")
print("|---|" + "---|" * (len(scans) + 1))
for metric in METRICS:
    for name, rs in have.items():
        vals = [rs[s][metric] for s in scans]
        fmt = "{:.3f}" if metric == "dice" else "{:.2f}"
        print(f"| {metric}: {name} | " + " | ".join(fmt.format(v) for v in vals) + " | " + fmt.format(sum(vals) / len(vals)) + " |")
print()
print("| 30 mm − 20 mm, per scan | " + " | ".join(METRICS) + " |")
print("|---|---|---|---|")
for label, a, b in (("opacified", "U42d", "U40d"), ("unopacified RV", "UW30", "UW20"),
                    ("unopacified − opacified, 20 mm", "UW20", "U40d"), ("unopacified − opacified, 30 mm", "UW30", "U42d")):
    if (EXP / a / "runs.jsonl").is_file() and (EXP / b / "runs.jsonl").is_file():
        print(f"| {label} | " + " | ".join(compare(a, b, m) for m in METRICS) + " |")
