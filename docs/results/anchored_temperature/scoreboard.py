"""Every training set measured on the stop 46 labels (A46, rebuilt as A46_001 at stop 49), on one
table: each arm's held-out myocardium EPE paired scan by scan with the annotated pairs (stop 46) and
with the transport pool (stop 49), over the scans the arm was run on. Seed 0, 1000 estimator steps
unless the row says otherwise, the u46a estimator; paired with compare_folders
(bench/utility_compare.py's library call), Student's t intervals over the scans since stop 53.

`python docs/results/anchored_temperature/scoreboard.py` (the row files are the repository's own,
listed below) → `scoreboard.md`."""
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
sys.path.insert(0, str(RESULTS / "utility_masked"))
from rowtools import cmp, load, one_seed, pool, renamed  # noqa: E402

# (name here, rows file under docs/results, arm in that file, what it is, stop)
ENTRIES = [
    ("annotated", "utility_masked/U46/runs.jsonl", "annotated", "the 43 real pairs, annotated flows", "46"),
    ("cvae", "utility_masked/U46/runs.jsonl", "cvae", "corpus of the fold CVAE (linear KL, T 2), N 256", "46"),
    ("cvae>annotated", "utility_masked/U46/runs.jsonl", "cvae>annotated", "that corpus, then the pairs (fine-tuned)", "46"),
    ("cvae_T1", "utility_masked/U47/T1_runs.jsonl", "cvae", "the same generators sampled at T 1", "47"),
    ("cvae_T0", "utility_masked/U47/T0_runs.jsonl", "cvae", "… at T 0 (the decoder's mean motion)", "47"),
    ("cvae_cyclical", "utility_masked/U47/R_runs.jsonl", "cvae", "the default recipe (cyclical KL, T 2.5)", "47"),
    ("cvae_TR", "motion_transport/U48_runs.jsonl", "cvae", "CVAE trained on the transport pool (paper loss), T 2", "48–49"),
    ("cvae_TR_elbo", "motion_transport/U48E_runs.jsonl", "cvae", "… with the elbo loss (β 0.1), T 2", "48"),
    ("cvae_TR_elbo_T1", "motion_transport/U48ET1_runs.jsonl", "cvae", "… elbo, T 1", "48"),
    ("transport", "transport_arm/U49T_runs.jsonl", "transport", "no generator: own + 4 carried motions, N 215", "49"),
    ("transport_k16", "transport_scaling/U50K16_runs.jsonl", "transport", "… 16 carried motions, N 731", "50"),
    ("anchored_T2", "transport_scaling/U50A_runs.jsonl", "anchored", "the pool varied by cvae_TR around each field, T 2, N 256", "50"),
    ("anchored_T0.5", "transport_scaling/U50A05_runs.jsonl", "anchored", "… T 0.5", "50–51"),
    ("anchored_T0.25", "anchored_temperature/U51A025_runs.jsonl", "anchored", "… T 0.25", "51"),
    ("annotated_2000", "anchored_temperature/U51S2000_runs.jsonl", "annotated", "the pairs, 2000 steps", "51–52"),
    ("transport_2000", "anchored_temperature/U51S2000_runs.jsonl", "transport", "the pool (k 4), 2000 steps", "51–52"),
]

with tempfile.TemporaryDirectory() as tmp:
    present = [e for e in ENTRIES if (RESULTS / e[1]).is_file()]
    files = [renamed(RESULTS / path, arm, name, tmp) for name, path, arm, _, _ in present]
    names = [e[0] for e in present]
    pooled, dirs = pool(files, names, tmp)
    pooled, n = one_seed(pooled)
    print("| training set (fold's training scans only) | stop | scans | mean myocardium EPE (mm; over its own scans) "
          "| − annotated pairs (paired over its scans) | − transport pool |")
    print("|---|---|---|---|---|---|")
    for name, _, _, what, stop in present:
        rs = pooled[name]
        cells = [cmp(dirs[name], dirs[ref], name, ref, n[name], n[ref], "epe_myo_mm", seeds=[0],
                     vary=("steps",), method="student_t")
                 if ref != name else "—" for ref in ("annotated", "transport")]
        mean = sum(r["epe_myo_mm"] for r in rs) / len(rs)
        print(f"| `{name}`: {what} | {stop} | {len(rs)} | {mean:.2f} | " + " | ".join(cells) + " |")
