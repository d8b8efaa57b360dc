"""Ray Job: Ray Tune search over the loss weights and learning rate (ASHA), one MLflow run per trial.

Example:
  ray job submit --working-dir . -- python jobs/tune.py --config configs/cluster.yaml --samples 32

Writes best.yaml, a config the cv and train stages accept.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("tune", "tune", __doc__, [
        PathFlag("--prepared", "prepared dataset folder", default="prepared"),
        PathFlag("--flows", "annotation folder (flows + feature pyramid)", default="annotations"),
        PathFlag("--out", "tuning folder", default="tune"),
    ]))
