r"""Ray Job: prepare 4DCT scans (ES/ED on the common grid, scans.parquet) with Ray Data.

Example:
  ray job submit --working-dir . -- python jobs/prepare.py --config configs/cluster.yaml \
      --scans '/mnt/cardiomotion/raw/*.nii.gz'

Quote patterns: they are expanded on the cluster, not on the submitting machine.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("prepare", "prepare", __doc__, [
        PathFlag("--scans", "4-D NIfTI files, per-phase NIfTI/DICOM folders or phantom patient folders", many=True),
        PathFlag("--out", "prepared dataset folder", default="prepared"),
        PathFlag("--manifest", "CSV/JSON with scan_id, es_phase, ed_phase", optional=True),
    ], tracking=False))
