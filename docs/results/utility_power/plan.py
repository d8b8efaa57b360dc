"""The planning table (stop 52; Student's t intervals since stop 53): how many held-out scans and seeds resolve a difference between the
corpus and the annotated pairs, from the one comparison with three seeds on all eight folds
(stop 38, `docs/results/utility_8folds_3seeds`: 1000 steps, the labels of that stop).

`python docs/results/utility_power/plan.py docs/results/utility_8folds_3seeds > docs/results/utility_power/plan.md`
— the same figures as `python bench/utility_power.py --a DIR --b DIR --arm cvae --n 256 --b-arm
annotated --b-n 43 --plan-folds 4,8,16,44 --plan-seeds 1,3,10 --interval student_t --figure docs/results/utility_power/plan.png`,
as a Markdown table (and the figure)."""
import json
import subprocess
import sys
from pathlib import Path

folder = sys.argv[1]
bench = Path(__file__).resolve().parents[3] / "bench" / "utility_power.py"
out = json.loads(subprocess.run([sys.executable, str(bench), "--a", folder, "--b", folder, "--arm", "cvae", "--n", "256",
                                 "--b-arm", "annotated", "--b-n", "43", "--delta", "0.1", "--plan-folds", "4,8,16,44",
                                 "--plan-seeds", "1,3,10", "--interval", "student_t", "--figure", str(Path(__file__).with_name("plan.png"))], check=True, capture_output=True, text=True).stdout)
s = out["spread"]
print(f"Spread of `{out['a']}` − `{out['b']}` (held-out myocardium EPE, {s['scans']} scans, "
      f"{s['seeds_a']:.0f} seeds each): seed noise σ cvae {s['seed_sd_a']:.3f} mm, σ annotated {s['seed_sd_b']:.3f} mm; "
      f"the true difference varies over scans by τ {s['difference_sd']:.3f} mm; the annotated arm's scans spread by "
      f"{s['scan_sd']:.3f} mm, and the difference moves with them (correlation "
      f"{s['difference_scan_cov'] / (s['difference_sd'] * s['scan_sd']):+.2f}); mean difference {s['mean']:+.3f} mm. "
      f"Intervals: {out['interval']}.\n")
print("| held-out scans | seeds per arm | estimators per arm | paired 95 % half-width (mm) | a true 0.1 mm resolved | "
      "a tie read as a difference | smallest resolved, paired (mm) | smallest resolved, separate intervals (mm) |")
print("|---|---|---|---|---|---|---|---|")
for p in out["plans"]:
    print(f"| {p['folds']} | {p['seeds']} | {p['folds'] * p['seeds']} | {p['halfwidth']:.3f} | {p['excludes_zero']:.0%} | "
          f"{p['tie_read_as_difference']:.0%} | {p['smallest_resolved_paired']:.3f} | {p['smallest_resolved_separate']:.3f} |")
print(f"\n{out['plans'][0]['trials']} simulated comparisons per row; 'resolved' in {out['power']:.0%} of them.")
