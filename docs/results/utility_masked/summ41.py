"""Stop 41's tables: `python docs/results/utility_masked/summ41.py U41 U40d`
(U41: the cvae and cvae>annotated rows on A_d40; U40d: the annotated rows on A_d, byte-identical flows;
stop 38's seed-0 rows from docs/results/utility_8folds_3seeds). The paired rows are
bench/utility_compare.py's (its library call, compare_folders)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rowtools import cmp, get, rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
U41, U40D = sys.argv[1], sys.argv[2]
U2 = str(ROOT / "docs/results/utility_8folds_3seeds")


u41, u40, u2 = rows(U41), rows(U40D), [r for r in rows(U2) if r["seed"] == 0]
print("| held-out scan | annotated | cvae (N 256) | cvae>annotated | cvae − annotated | cvae>annotated − annotated "
      "| stop 38, unmasked labels: annotated / cvae |")
print("|---|---|---|---|---|---|---|")
for s in sorted({r["scan"] for r in u41 if r["arm"] == "cvae"} & {r["scan"] for r in u41 if r["arm"] == "cvae>annotated"}):
    a, c, f = get(u40, s, "annotated"), get(u41, s, "cvae"), get(u41, s, "cvae>annotated")
    print(f"| {s} | {a:.2f} | {c:.2f} | {f:.2f} | {c - a:+.2f} | {f - a:+.2f} | {get(u2, s, 'annotated'):.2f} / "
          f"{get(u2, s, 'cvae'):.2f} |")
print()
for a, b, arm, barm, n, bn, seeds, label in [
    (U41, U40D, "cvae", "annotated", 256, 43, None, "cvae − annotated"),
    (U41, U40D, "cvae>annotated", "annotated", 256, 43, None, "cvae>annotated − annotated"),
    (U41, U41, "cvae>annotated", "cvae", 256, 256, None, "cvae>annotated − cvae"),
    (U41, U2, "cvae", "cvae", 256, 256, (0,), "cvae on these labels − cvae on unmasked ones (stop 38)"),
]:
    print(f"| {label} | " + " | ".join(cmp(a, b, arm, barm, n, bn, m, seeds) for m in ("epe_myo_mm", "epe_mm", "dice"))
          + " |")
