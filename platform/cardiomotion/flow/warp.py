"""Warping by a pull field (docs/design.md convention).

A flow ``u`` of shape (B, 3, I, J, K), in voxels of the grid it lives on, channel c =
displacement along array axis c, defines ``warp(src, u)(x) = src(x + u(x))``. With ``src`` the
ES frame and ``u`` the ED←ES pull field, ``warp(ES, u) ≈ ED``.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from ..transfer import small_tensor


class Interp(str, Enum):
    """Interpolation modes of :func:`warp`."""

    LINEAR = "bilinear"  # trilinear for 5-D input in grid_sample's naming
    NEAREST = "nearest"


class Padding(str, Enum):
    """How samples outside the grid are filled. BORDER by default: zero is not air in HU."""

    BORDER = "border"
    ZEROS = "zeros"
    REFLECTION = "reflection"


def identity_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid, shape (1, 3, I, J, K), channel c = index along axis c."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def _normalised_grid(flow: torch.Tensor) -> torch.Tensor:
    """Absolute sample positions x + u(x) in grid_sample's [-1, 1] (x, y, z) = (K, J, I) order."""
    shape = flow.shape[2:]
    pos = identity_grid(tuple(shape), device=flow.device, dtype=flow.dtype) + flow
    scale = small_tensor([2.0 / max(n - 1, 1) for n in shape], flow)
    pos = pos * scale.view(1, 3, 1, 1, 1) - 1.0
    # (B, 3, I, J, K) -> (B, I, J, K, 3) with the last axis reversed to (k, j, i).
    return pos.permute(0, 2, 3, 4, 1).flip(-1)


def warp(
    image: torch.Tensor,
    flow: torch.Tensor,
    mode: Interp | str = Interp.LINEAR,
    padding: Padding | str = Padding.BORDER,
) -> torch.Tensor:
    """Pull-warp ``image`` by ``flow``: out(x) = image(x + flow(x)).

    Args:
        image: (B, C, I, J, K) volume(s) on the grid the flow points into.
        flow: (B, 3, I, J, K) displacement in voxels, channel c along array axis c. B may be 1
            for either argument and is broadcast.
        mode: trilinear (default) or nearest.
        padding: border (default), zeros or reflection for samples that fall outside.

    Returns:
        (B, C, I, J, K) warped volume, same dtype as ``flow``.
    """
    if image.dim() != 5 or flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"warp expects image (B,C,I,J,K) and flow (B,3,I,J,K), got "
                         f"{tuple(image.shape)} and {tuple(flow.shape)}")
    if image.shape[2:] != flow.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} != flow grid {tuple(flow.shape[2:])}")
    b = max(image.shape[0], flow.shape[0])
    grid = _normalised_grid(flow)
    if grid.shape[0] != b:
        grid = grid.expand(b, *grid.shape[1:])
    if image.shape[0] != b:
        image = image.expand(b, *image.shape[1:])
    mode = Interp(mode).value
    padding = Padding(padding).value
    return F.grid_sample(image.to(flow.dtype), grid, mode=mode, padding_mode=padding, align_corners=True)
