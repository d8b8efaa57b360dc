"""Per-pair refinement (instance optimisation) of a predicted flow against the training loss."""
from __future__ import annotations

import torch

from ..flow.warp import warp
from ..models.pwcnet import resize_flow
from .losses import downsample_to, photometric_loss, smoothness_loss


def _optimise(fixed, moving, flow, steps, lr, smooth_weight, alpha) -> torch.Tensor:
    u = flow.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    window = min(7, max(1, min(fixed.shape[2:]) // 2 * 2 - 1))
    for _ in range(steps):
        loss = (photometric_loss(fixed, warp(moving, u), alpha=alpha, window=window)
                + smooth_weight * smoothness_loss(u))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach()


def refine_flow(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    flow: torch.Tensor,
    steps: int = 150,
    lr: float = 0.05,
    smooth_weight: float = 0.1,
    alpha: float = 0.85,
    levels: int = 2,
) -> torch.Tensor:
    """Optimise a pull flow u so that warp(moving, u) ≈ fixed, starting from ``flow``.

    Loss: photometric(fixed, warp(moving, u)) + smooth_weight · smoothness(u) — the loss the
    network was trained with — minimised by Adam on u directly, coarse to fine: ``levels``
    resolutions (each half the next; ``steps`` per level), so large residual motion is caught
    on the coarse grid and detail on the full one.

    Args:
        fixed, moving: (1, 1, I, J, K) in [0, 1] (ED and ES).
        flow: (1, 3, I, J, K) initial pull flow in voxels.

    Returns:
        (1, 3, I, J, K) refined flow (detached), voxels of the full grid.
    """
    if steps <= 0:
        return flow.detach()
    full = tuple(fixed.shape[2:])
    u = flow.detach()
    for level in range(levels - 1, -1, -1):
        size = tuple(max(1, n // 2**level) for n in full)
        if min(size) < 8:
            continue
        f = downsample_to(fixed, size) if level else fixed
        m = downsample_to(moving, size) if level else moving
        u = _optimise(f, m, resize_flow(u, size), steps, lr, smooth_weight, alpha)
    return resize_flow(u, full)
