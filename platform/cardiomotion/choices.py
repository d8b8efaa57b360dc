"""Closed choices shared by the configuration and the modules that act on them.

Plain enums without dependencies: ``config.py`` (pydantic) and the PyTorch-only modules
(``models.cvae``, ``annotate.refine``, which the GPU suite imports without pydantic) both import
them from here, so each choice is defined once.
"""
from __future__ import annotations

from enum import Enum


class OutputKind(str, Enum):
    """What the CVAE decoder head predicts (``train.model.output``)."""

    DISPLACEMENT = "displacement"  # the pull displacement u itself (the paper)
    VELOCITY = "velocity"  # a stationary velocity v; u = exp(v) (scaling and squaring)


class Similarity(str, Enum):
    """Image term of the per-pair refinement (``annotate.refine_similarity``)."""

    MSE = "mse"  # mean squared intensity difference (intensities in [0, 1])
    SSIM_L1 = "ssim_l1"  # the network's training loss: alpha·(1 − SSIM)/2 + (1 − alpha)·L1


class SupportMode(str, Enum):
    """How the refinement's support (``annotate.refine_support_mode``) acts on the flow."""

    MASK = "mask"  # the delivered flow is weighted by the support after the refinement
    CONFINE = "confine"  # the optimised correction is weighted by it during the refinement


class IntervalMethod(str, Enum):
    """How a 95 % interval of a mean over held-out scans is formed (``utility.interval``;
    :mod:`cardiomotion.evaluate.intervals`)."""

    PERCENTILE = "percentile"  # percentile bootstrap of the mean: the project's intervals up to stop 52
    EXPANDED = "expanded"  # the percentile bootstrap at quantiles widened for small samples (Hesterberg 2015)
    STUDENT_T = "student_t"  # mean ± t(n − 1) · s / √n
