"""Ray Job: leave-one-out cross-validation of the CVAE, folds running concurrently on the cluster.

Example:
  ray job submit --working-dir . -- python jobs/cv.py --config configs/cluster.yaml --folds all

Logs an MLflow parent run with one nested run per fold; writes folds.csv and summary.json.
A rerun continues the sweep without retraining finished folds.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("cv", "cv", __doc__, [
        PathFlag("--prepared", "prepared dataset folder", default="prepared"),
        PathFlag("--flows", "annotation folder (flows + feature pyramid)", default="annotations"),
        PathFlag("--out", "cross-validation folder", default="cv"),
    ]))
