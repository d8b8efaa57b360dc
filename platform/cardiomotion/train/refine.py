"""Per-pair refinement (instance optimisation) of a predicted flow against the training loss."""
from __future__ import annotations

import torch

from ..flow.warp import warp
from ..models.pwcnet import resize_flow
from .losses import downsample_to, photometric_loss, smoothness_loss


def gaussian_smooth(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of a field (B, C, I, J, K), σ in voxels, replicate borders."""
    if sigma <= 0:
        return u
    radius = max(1, int(round(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=u.dtype, device=u.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = u.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(c, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        u = torch.nn.functional.conv3d(torch.nn.functional.pad(u, pad, mode="replicate"), weight, groups=c)
    return u


def _optimise(fixed, moving, flow, steps, lr, smooth_weight, alpha, field_sigma) -> torch.Tensor:
    u = flow.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    window = min(7, max(1, min(fixed.shape[2:]) // 2 * 2 - 1))
    for _ in range(steps):
        loss = (photometric_loss(fixed, warp(moving, u), alpha=alpha, window=window)
                + smooth_weight * smoothness_loss(u))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if field_sigma > 0:  # diffusion-like regularisation, as in demons: carries motion into flat regions
            with torch.no_grad():
                u.copy_(gaussian_smooth(u, field_sigma))
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
    field_sigma: float = 0.0,
) -> torch.Tensor:
    """Optimise a pull flow u so that warp(moving, u) ≈ fixed, starting from ``flow``.

    Loss: photometric(fixed, warp(moving, u)) + smooth_weight · smoothness(u) — the loss the
    network was trained with — minimised by Adam on u directly, coarse to fine: ``levels``
    resolutions (each half the next; ``steps`` per level), so large residual motion is caught
    on the coarse grid and detail on the full one. With ``field_sigma`` > 0 the field is
    Gaussian-smoothed (σ voxels) after every step, a diffusion-like regulariser that carries
    motion from edges into the flat blood pool and myocardium.

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
        u = _optimise(f, m, resize_flow(u, size), steps, lr, smooth_weight, alpha, field_sigma)
    return resize_flow(u, full)
