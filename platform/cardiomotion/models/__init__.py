"""Networks: the PWC-Net feature pyramid, the 3D PWC-Net of the annotation stage, the CVAE."""
from __future__ import annotations

from .costvolume import CostVolume, cost_offsets, cost_volume
from .cvae import CVAEOutput, MotionCVAE, OutputKind
from .pwcnet import PWCNet3D, PWCOutput, resize_flow
from .pyramid import FeaturePyramid

__all__ = ["CVAEOutput", "CostVolume", "FeaturePyramid", "MotionCVAE", "OutputKind", "PWCNet3D", "PWCOutput",
           "cost_offsets", "cost_volume", "resize_flow"]
