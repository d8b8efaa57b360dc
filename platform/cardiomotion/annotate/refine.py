"""Per-pair refinement (instance optimisation) of a predicted flow.

The refined field is ``u = u0 + s · (G_σ * w)``: the starting flow ``u0`` (the network's
prediction, or zero flow: ``annotate.refine_start``) plus a Gaussian-filtered correction ``w`` that
Adam optimises, weighted by an optional support ``s`` in [0, 1] (1 when not given;
:mod:`.support`: where the heart may move the tissue). Optimising ``u`` voxel by voxel (the obvious choice) lets
Adam — which moves every coordinate by about its step size whatever the gradient's size — push
the flow around inside textureless tissue on nothing but image noise; filtering the correction
makes each step a smooth field (the role of the Gaussian in demons), so motion seen at edges
spreads into the wall. On the phantom this is what turns refinement from a loss into a gain in
the myocardium (README, results).
"""
from __future__ import annotations

import torch

from ..choices import Similarity
from ..flow.metrics import jacobian_determinant
from ..flow.ops import gaussian_smooth
from ..flow.warp import warp
from ..models.pwcnet import resize_flow
from ..train.losses import downsample_to, photometric_loss, smoothness_loss


def _image_term(fixed, warped, similarity: Similarity, alpha: float, window: int) -> torch.Tensor:
    if similarity is Similarity.MSE:
        return (fixed - warped).pow(2).mean()
    return photometric_loss(fixed, warped, alpha=alpha, window=window)


def volume_change(u: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """The tissue-weighted mean of (det J − 1)² of the map x → x + u(x): 0 where the flow keeps
    every tissue voxel's volume (an incompressible material), growing with compression or
    expansion.

    Args:
        u: (1, 3, I, J, K) pull flow in voxels (isotropic grid: det J needs no spacing).
        tissue: (1, 1, I, J, K) weight ≥ 0, not all zero.
    """
    change = (jacobian_determinant(u) - 1.0).pow(2)
    return (tissue * change).sum() / tissue.sum().clamp_min(1e-12)


def _optimise(fixed, moving, u0, steps, lr, smooth_weight, similarity, alpha, sigma, edge_weight,
              support, volume_weight=0.0, tissue=None) -> torch.Tensor:
    u0 = u0.detach()
    w = torch.zeros_like(u0, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    window = min(7, max(1, min(fixed.shape[2:]) // 2 * 2 - 1))

    def correction(w):
        c = gaussian_smooth(w, sigma)
        return c if support is None else support * c

    for _ in range(steps):
        u = u0 + correction(w)
        loss = (_image_term(fixed, warp(moving, u), similarity, alpha, window)
                + smooth_weight * smoothness_loss(u, image=fixed, edge_weight=edge_weight))
        if volume_weight and tissue is not None:
            loss = loss + volume_weight * volume_change(u, tissue)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return u0 + correction(w)


def refine_flow(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    flow: torch.Tensor,
    steps: int = 300,
    lr: float = 0.2,
    smooth_weight: float = 0.001,
    similarity: Similarity | str = Similarity.MSE,
    alpha: float = 0.85,
    sigma: float = 3.0,
    levels: int = 3,
    edge_weight: float = 0.0,
    support: torch.Tensor | None = None,
    volume_weight: float = 0.0,
    tissue: torch.Tensor | None = None,
) -> torch.Tensor:
    """Optimise a pull flow u so that warp(moving, u) ≈ fixed, starting from ``flow``.

    Loss: similarity(fixed, warp(moving, u)) + smooth_weight · smoothness(u) (first-order, l2;
    edge-aware with ``edge_weight`` > 0: each forward difference weighted by
    exp(−edge_weight·|fixed's forward difference across the same voxel pair|),
    :func:`~cardiomotion.train.losses.smoothness_loss` — the pull flow lives on the fixed grid),
    minimised by Adam over a Gaussian-filtered correction (module docstring), coarse to fine:
    ``levels`` resolutions (each half the next; ``steps`` per level), so large residual motion is
    caught on the coarse grid and detail on the full one.

    Args:
        fixed, moving: (1, 1, I, J, K) in [0, 1] (ED and ES).
        flow: (1, 3, I, J, K) initial pull flow in voxels.
        similarity: ``"mse"`` or ``"ssim_l1"`` (with ``alpha`` the SSIM share).
        sigma: std of the correction's Gaussian filter, voxels of each level (0: none).
        edge_weight: λ of the edge-aware smoothness (0: plain first-order smoothness).
        support: (1, 1, I, J, K) weight in [0, 1] of the correction per voxel (None: 1 everywhere;
            :func:`~cardiomotion.annotate.support.motion_support`), area-averaged to each level's
            grid. Where it and its coarse levels' neighbours are 0 the flow stays the starting flow.
        volume_weight: λ of the incompressibility term λ · :func:`volume_change` (0: none).
        tissue: (1, 1, I, J, K) weight ≥ 0 of the voxels whose volume the term holds (the ED soft
            tissue: :func:`~cardiomotion.annotate.stage.pair_tissue`), area-averaged to each level's
            grid; None: no term whatever ``volume_weight``.

    Returns:
        (1, 3, I, J, K) refined flow (detached), voxels of the full grid.
    """
    similarity = Similarity(similarity)
    if support is not None and (support.shape[0] != 1 or support.shape[1] != 1
                                or tuple(support.shape[2:]) != tuple(fixed.shape[2:])):
        raise ValueError(f"the support must be (1, 1, {', '.join(map(str, fixed.shape[2:]))}), "
                         f"got {tuple(support.shape)}")
    if tissue is not None and (tissue.shape[0] != 1 or tissue.shape[1] != 1
                               or tuple(tissue.shape[2:]) != tuple(fixed.shape[2:])):
        raise ValueError(f"the tissue must be (1, 1, {', '.join(map(str, fixed.shape[2:]))}), "
                         f"got {tuple(tissue.shape)}")
    if volume_weight < 0:
        raise ValueError(f"the volume term's weight must be >= 0, got {volume_weight}")
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
        s = None if support is None else downsample_to(support.to(fixed), size)
        t = None if tissue is None else downsample_to(tissue.to(fixed), size)
        u = _optimise(f, m, resize_flow(u, size), steps, lr, smooth_weight, similarity, alpha, sigma,
                      edge_weight, s, volume_weight, t)
    return resize_flow(u, full)
