r"""Ray Job: generate a corpus of synthetic (ES, ED_syn, flow) samples (Ray Data, GPU actor pool).

Example:
  ray job submit --working-dir . -- python jobs/generate.py --config configs/cluster.yaml \
      --model models:/cardiomotion-cvae@best --n 100000 --seed 0

--n, --seed and the other sampling flags go to `cardiomotion generate`.
A rerun resumes: finished shards are skipped.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("generate", "generate", __doc__, [
        PathFlag("--model", "trained CVAE: an MLflow model URI (runs:/…, models:/name@alias) or a model folder",
                 uri=True),
        PathFlag("--prepared", "prepared dataset folder (its ES frames condition the samples)", default="prepared"),
        PathFlag("--out", "corpus folder", default="corpus"),
    ]))
