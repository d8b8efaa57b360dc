"""Ray Job: the whole pipeline on the phantom cohort (`cardiomotion demo`) on the cluster.

Example:
  ray job submit --working-dir . -- python jobs/pipeline.py --config configs/cluster.yaml

Writes phantom/, prepared/, annotations/ (and the later stages' folders) under --out, the same
places the single-stage jobs read and write by default.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("pipeline", "demo", __doc__, [
        PathFlag("--out", "output folder", default=""),
    ]))
