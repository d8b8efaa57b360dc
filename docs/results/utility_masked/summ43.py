"""Stop 43's tables: `python docs/results/utility_masked/summ43.py U43 U42d U41`
(U43: the cvae and cvae>annotated rows on A43 — the default 30 mm labels, byte-identical to A_d30's;
U42d: stop 42's annotated rows on A_d30; U41: stop 41's cvae rows on the 20 mm labels). The paired
rows are bench/utility_compare.py's (its library call, compare_folders)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "platform"))
from cardiomotion.evaluate.compare import Side, compare_folders  # noqa: E402

U43, U42D, U41 = sys.argv[1], sys.argv[2], sys.argv[3]


def rows(folder):
    return [json.loads(line) for line in open(f"{folder}/runs.jsonl")]


def get(rs, scan, arm, k="epe_myo_mm"):
    v = [r[k] for r in rs if r["scan"] == scan and r["arm"] == arm]
    return v[0] if v else float("nan")


def cmp(a, b, arm, barm, n, bn, metric):
    d = compare_folders(Side(Path(a), arm, n, None), Side(Path(b), barm, bn, None), metric=metric)
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], {d['a_won']}/{len(d['per_scan'])}"


u43, u42, u41 = rows(U43), rows(U42D), rows(U41)
print("| held-out scan | annotated | cvae (N 256) | cvae>annotated | cvae − annotated | cvae>annotated − annotated "
      "| stop 41, 20 mm labels: cvae |")
print("|---|---|---|---|---|---|---|")
for s in sorted({r["scan"] for r in u43 if r["arm"] == "cvae"} & {r["scan"] for r in u43 if r["arm"] == "cvae>annotated"}):
    a, c, f = get(u42, s, "annotated"), get(u43, s, "cvae"), get(u43, s, "cvae>annotated")
    print(f"| {s} | {a:.2f} | {c:.2f} | {f:.2f} | {c - a:+.2f} | {f - a:+.2f} | {get(u41, s, 'cvae'):.2f} |")
print()
print("| paired (held-out scans, myocardium EPE / whole-grid EPE / Dice) | myocardium | whole grid | Dice |")
print("|---|---|---|---|")
for a, b, arm, barm, n, bn, label in [
    (U43, U42D, "cvae", "annotated", 256, 43, "cvae − annotated"),
    (U43, U42D, "cvae>annotated", "annotated", 256, 43, "cvae>annotated − annotated"),
    (U43, U43, "cvae>annotated", "cvae", 256, 256, "cvae>annotated − cvae"),
    (U43, U41, "cvae", "cvae", 256, 256, "cvae on 30 mm labels − cvae on 20 mm labels (stop 41)"),
]:
    print(f"| {label} | " + " | ".join(cmp(a, b, arm, barm, n, bn, m) for m in ("epe_myo_mm", "epe_mm", "dice"))
          + " |")
