"""Networks: the PWC-Net feature pyramid, the 3D PWC-Net of the annotation stage (and the CVAE)."""
from __future__ import annotations

from .costvolume import CostVolume, cost_offsets, cost_volume
from .pwcnet import PWCNet3D, PWCOutput, resize_flow
from .pyramid import FeaturePyramid

__all__ = ["CostVolume", "FeaturePyramid", "PWCNet3D", "PWCOutput", "cost_offsets", "cost_volume", "resize_flow"]
