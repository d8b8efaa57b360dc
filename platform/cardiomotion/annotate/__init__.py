"""The annotate stage: ground-truth flows of the prepared pairs (docs/design.md, "Stage map").

- :mod:`.pwc` — unsupervised training of the 3-D PWC-Net on the prepared pairs (a Ray Train job);
- :mod:`.refine` — per-pair instance optimisation of a predicted flow;
- :mod:`.stage` — the stage itself (:func:`annotate`: train, annotate every pair on Ray, the
  table and figures) and the per-fold networks of strict leave-one-out (:func:`train_fold_pyramid`).

The stage's names load on first use, so the training epoch (:mod:`.pwc`) and the refinement
import where only PyTorch is installed (the GPU suite's machines).
"""
from __future__ import annotations

__all__ = ["annotate", "annotate_scan", "check_prepared", "summarize", "train_fold_pyramid"]


def __getattr__(name: str):
    if name in __all__ or name in ("MODEL_FILE", "PYRAMID_FILE", "QUALITY_FILE"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
