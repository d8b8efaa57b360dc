r"""Ray Job: downstream utility — the same motion estimator trained on each data arm, per fold.

Example:
  ray job submit --working-dir . -- python jobs/utility.py --config configs/cluster.yaml \
      --folds 0-7 --sizes 64,256,1024,4096 --seeds 3

Per fold: the fold's CVAE and its corpus (training scans only), then one Ray Train run per
(arm, N, seed); utility.csv, utility_paired.csv, summary.json and utility.png in --out, an MLflow run.
A rerun trains only the estimators that are missing.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("utility", "utility", __doc__, [
        PathFlag("--prepared", "prepared phantom dataset folder (held-out scans need exact truth)", default="prepared"),
        PathFlag("--flows", "annotation folder (flows + feature pyramid)", default="annotations"),
        PathFlag("--out", "utility experiment folder", default="utility"),
        PathFlag("--generators", "an earlier utility folder made from the same inputs, whose fold CVAEs are reused",
                 optional=True),
    ]))
