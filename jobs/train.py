"""Ray Job: train the CVAE on one leave-one-out fold (Ray Train TorchTrainer, tracked in MLflow).

Example:
  ray job submit --working-dir . -- python jobs/train.py --config configs/cluster.yaml --fold 7

Scan 7 (scan-id order) is held out. The run's model is logged as runs:/<run_id>/model; rerunning
the same fold resumes from its last checkpoint. Use jobs/cv.py for every fold at once.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("train", "train", __doc__, [
        PathFlag("--prepared", "prepared dataset folder", default="prepared"),
        PathFlag("--flows", "annotation folder (flows + feature pyramid)", default="annotations"),
    ]))
