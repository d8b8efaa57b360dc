"""Per-pair refinement (instance optimisation) of a predicted flow against the training loss."""
from __future__ import annotations

import torch

from ..flow.warp import warp
from .losses import photometric_loss, smoothness_loss


def refine_flow(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    flow: torch.Tensor,
    steps: int = 150,
    lr: float = 0.05,
    smooth_weight: float = 0.1,
    alpha: float = 0.85,
) -> torch.Tensor:
    """Optimise a pull flow u so that warp(moving, u) ≈ fixed, starting from ``flow``.

    Loss: photometric(fixed, warp(moving, u)) + smooth_weight · smoothness(u), minimised by Adam
    on u directly (full resolution), the same loss the network was trained with.

    Args:
        fixed, moving: (1, 1, I, J, K) in [0, 1] (ED and ES).
        flow: (1, 3, I, J, K) initial pull flow in voxels.

    Returns:
        (1, 3, I, J, K) refined flow (detached).
    """
    if steps <= 0:
        return flow.detach()
    u = flow.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        loss = photometric_loss(fixed, warp(moving, u), alpha=alpha) + smooth_weight * smoothness_loss(u)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach()
