"""Stop 47's table, the corpus of the stop-46 fold CVAEs (labels with lambda 0.001, A46_001)
sampled at other prior temperatures: `python docs/results/utility_masked/summ47.py
docs/results/utility_masked/U46/runs.jsonl T1=docs/results/utility_masked/U47/T1_runs.jsonl
T0=docs/results/utility_masked/U47/T0_runs.jsonl` — the first file holds stop 46's rows
(annotated, cvae at T 2; a cvae>annotated arm is paired too where the file has one); each
LABEL=FILE after it the cvae rows of a run at another temperature, named "cvae_LABEL" here.
Seed 0, N 256, paired scan by scan with compare_folders."""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rowtools import load, magnitude_table, one_seed, paired_table, pool, scan_table  # noqa: E402

base, *more = sys.argv[1:]
others = [m.split("=", 1) for m in more]
with tempfile.TemporaryDirectory() as tmp:
    sources = [base]
    for label, path in others:
        renamed = Path(tmp) / f"{label}.jsonl"
        renamed.write_text("".join(json.dumps({**r, "arm": f"cvae_{label}"}) + "\n" for r in load(path)
                                   if r["arm"] == "cvae"))
        sources.append(str(renamed))
    arms = ["annotated", "cvae", "cvae>annotated"] + [f"cvae_{label}" for label, _ in others]
    pooled, dirs = pool(sources, arms, tmp)
    pooled, _ = one_seed(pooled)
    arms = [a for a in arms if pooled[a]]
    scans = sorted({r["scan"] for r in pooled["annotated"]})
    print("\n".join(scan_table(pooled, arms, scans)))
    print()
    n = {a: (43 if a == "annotated" else 256) for a in arms}
    pairs = [(a, "annotated") for a in arms if a != "annotated"] + [(a, "cvae") for a in arms
                                                                     if a not in ("annotated", "cvae")]
    print("\n".join(paired_table(dirs, n, pairs)))
    print()
    print("\n".join(magnitude_table(pooled, arms, scans)))
