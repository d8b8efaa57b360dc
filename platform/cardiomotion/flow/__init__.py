"""Flow fields: warping, flow files (NIfTI intent 1006), field algebra and quality measures."""
from __future__ import annotations

from .metrics import EndpointError, endpoint_error, flow_mse, folding_fraction, jacobian_determinant, magnitude_ratio
from .ops import compose, exp, gaussian_smooth, integrate_velocity, invert, upsample_flow, velocity_sequence
from .warp import Interp, Padding, identity_grid, warp

__all__ = [
    "NIFTI_INTENT_DISPVECT",
    "EndpointError",
    "Interp",
    "Padding",
    "compose",
    "endpoint_error",
    "exp",
    "flow_mse",
    "folding_fraction",
    "gaussian_smooth",
    "identity_grid",
    "integrate_velocity",
    "invert",
    "jacobian_determinant",
    "magnitude_ratio",
    "read_flow",
    "upsample_flow",
    "velocity_sequence",
    "warp",
    "write_flow",
]


def __getattr__(name: str):
    """The flow-file names load nibabel on first use, so the field algebra and the warp import
    where only PyTorch is installed (the GPU suite's machines)."""
    if name in ("NIFTI_INTENT_DISPVECT", "read_flow", "write_flow"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
