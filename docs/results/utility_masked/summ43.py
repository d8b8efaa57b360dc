"""Stop 43's tables: `python docs/results/utility_masked/summ43.py U43 U42d U41`
(U43: the cvae and cvae>annotated rows on A43 — the default 30 mm labels, byte-identical to A_d30's;
U42d: stop 42's annotated rows on A_d30; U41: stop 41's cvae rows on the 20 mm labels). The paired
rows are bench/utility_compare.py's (its library call, compare_folders)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rowtools import cmp, get, rows  # noqa: E402

U43, U42D, U41 = sys.argv[1], sys.argv[2], sys.argv[3]


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
