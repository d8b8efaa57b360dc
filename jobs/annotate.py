"""Ray Job: annotate prepared pairs (PWC-Net on Ray Train, refined ED<-ES flows, feature pyramid).

Example:
  ray job submit --working-dir . -- python jobs/annotate.py --config configs/cluster.yaml

Logs one MLflow run 'annotate': settings, training curves, the quality table, the model and
the frozen feature pyramid.
"""
import sys

from _common import PathFlag, run_job

if __name__ == "__main__":
    sys.exit(run_job("annotate", "annotate", __doc__, [
        PathFlag("--prepared", "prepared dataset folder (from the prepare job)", default="prepared"),
        PathFlag("--out", "annotation folder", default="annotations"),
        PathFlag("--network", "annotation folder of the same prepared set whose trained PWC-Net to reuse "
                              "(same network settings; only annotate.refine* may differ)", optional=True),
    ]))
