"""Losses: unsupervised PWC-Net losses (SSIM/L1 photometric, smoothness) and the CVAE's KL term.

Volumes are (B, C, I, J, K) with intensities in [0, 1]; flows are (B, 3, I, J, K) in voxels of
their grid (docs/design.md conventions).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..flow.warp import warp


def _window_1d(size: int, kind: str, sigma: float, device, dtype) -> torch.Tensor:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"SSIM window must be a positive odd size, got {size}")
    if kind == "gaussian":
        x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
        w = torch.exp(-0.5 * (x / sigma) ** 2)
    elif kind == "box":
        w = torch.ones(size, device=device, dtype=dtype)
    else:
        raise ValueError(f"SSIM window kind must be 'gaussian' or 'box', got {kind!r}")
    return w / w.sum()


def _local_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable local mean of (N, C, I, J, K) with 1-D window w, replicate padding (same grid)."""
    c = x.shape[1]
    p = (w.numel() - 1) // 2
    if p:
        x = F.pad(x, (p,) * 6, mode="replicate")
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = w.numel()
        x = F.conv3d(x, w.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return x


def ssim3d(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 7,
    kind: str = "gaussian",
    sigma: float = 1.5,
    data_range: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Local structural similarity of two 3D volumes.

    Local statistics use a separable window of ``window`` voxels per axis (Gaussian with
    ``sigma`` voxels, or a box), replicate padding at the border; constants C1 = (0.01·L)²,
    C2 = (0.03·L)² with L = ``data_range``.

    Args:
        x, y: (B, C, I, J, K), intensities in [0, data_range].
        reduction: 'mean' → scalar mean SSIM; 'none' → per-voxel map (B, C, I, J, K).

    Returns:
        SSIM in [-1, 1]; 1 where x and y agree.
    """
    if x.shape != y.shape or x.dim() != 5:
        raise ValueError(f"ssim3d expects two (B,C,I,J,K) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(dtype)
    w = _window_1d(int(window), kind, float(sigma), x.device, dtype)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    n = x.shape[0]
    # One conv pass for the five local moments.
    stats = _local_mean(torch.cat([x, y, x * x, y * y, x * y], dim=0), w)
    mx, my, mxx, myy, mxy = stats.split(n, dim=0)
    vx = mxx - mx * mx
    vy = myy - my * my
    cxy = mxy - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    if reduction == "mean":
        return ssim.mean()
    if reduction == "none":
        return ssim
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _masked_mean(m: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return m.mean()
    mask = mask.to(m.dtype).expand_as(m)
    return (m * mask).sum() / mask.sum().clamp_min(1e-8)


def photometric_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    alpha: float = 0.85,
    mask: torch.Tensor | None = None,
    window: int = 7,
) -> torch.Tensor:
    """SSIM/L1 mix (Godard et al. 2017) between the fixed volume and the warped moving one.

    Per voxel: alpha · clamp((1 − SSIM)/2, 0, 1) + (1 − alpha) · |fixed − warped|, averaged over
    voxels, channels and batch (over the voxels where ``mask`` > 0, weighted by it, if given).
    Both terms lie in [0, 1] for intensities in [0, 1]; 0 iff the volumes agree.

    Args:
        fixed, warped: (B, C, I, J, K) in [0, 1].
        mask: optional weights broadcastable to (B, C, I, J, K), e.g. (B, 1, I, J, K).
    """
    dssim = ((1.0 - ssim3d(fixed, warped, window=window, reduction="none")) / 2).clamp(0.0, 1.0)
    per_voxel = alpha * dssim + (1.0 - alpha) * (fixed - warped).abs()
    return _masked_mean(per_voxel, mask)


def smoothness_loss(flow: torch.Tensor, penalty: str = "l2", image: torch.Tensor | None = None,
                    edge_weight: float = 0.0) -> torch.Tensor:
    """First-order smoothness of a flow (B, 3, I, J, K), in voxels² (l2) or voxels (l1).

    Forward differences d_a u_c(x) = u_c(x + e_a) − u_c(x) along each axis a; the loss is
    Σ_a mean_{b, c, x}(d_a u_c²) ('l2') or Σ_a mean(|d_a u_c|) ('l1'): summed over the three axes,
    averaged over batch, components and voxels. A constant flow gives 0; u_0 = s·i (a ramp along
    axis 0, other components 0) gives s²/3 (l2) or |s|/3 (l1).

    Edge-aware (``image`` given and ``edge_weight`` λ > 0): each difference is weighted by
    exp(−λ·|d_a image(x)|), the image's own forward difference across the same voxel pair, so the
    flow may change across an intensity edge (a moving wall against still tissue) at a lower price
    than inside uniform tissue (the first-order form of Jonschkowski et al. 2020's edge-aware
    smoothness). ``image``: (B, 1, I, J, K) on the flow's grid, intensities in [0, 1] (so λ = 10
    prices a jump across a 0.3 edge at e^−3 ≈ 5 %); λ = 0 is the plain loss.
    """
    if flow.dim() != 5:
        raise ValueError(f"smoothness_loss expects (B,3,I,J,K), got {tuple(flow.shape)}")
    if penalty not in ("l2", "l1"):
        raise ValueError(f"penalty must be 'l2' or 'l1', got {penalty!r}")
    if edge_weight < 0:
        raise ValueError(f"edge_weight must be >= 0, got {edge_weight}")
    aware = edge_weight > 0
    if aware and image is None:
        raise ValueError("edge-aware smoothness (edge_weight > 0) needs the image")
    if aware and (image.dim() != 5 or image.shape[1] != 1 or image.shape[2:] != flow.shape[2:]
                  or image.shape[0] not in (1, flow.shape[0])):
        raise ValueError(f"edge-aware smoothness needs an image (B or 1, 1, I, J, K) on the flow's grid "
                         f"{(flow.shape[0], 1, *flow.shape[2:])}, got {tuple(image.shape)}")
    total = flow.new_zeros(())
    for axis in (2, 3, 4):
        if flow.shape[axis] < 2:
            continue
        d = torch.diff(flow, dim=axis)
        d = d.pow(2) if penalty == "l2" else d.abs()
        if aware:
            d = d * torch.exp(-edge_weight * torch.diff(image, dim=axis).abs())
        total = total + d.mean()
    return total


def downsample_to(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Area-average a volume (B, C, I, J, K) to grid ``size`` (avg pool for integer factors).

    Voxel-centre convention, matching the PWC-Net's flow resizing.
    """
    size = tuple(int(n) for n in size)
    if tuple(volume.shape[2:]) == size:
        return volume
    return F.adaptive_avg_pool3d(volume, size)


def pwc_unsupervised_loss(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    flows_per_level: Sequence[torch.Tensor],
    weights_per_level: Sequence[float],
    smooth_weight: float,
    alpha: float = 0.85,
    mask: torch.Tensor | None = None,
    window: int = 7,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-level unsupervised loss of a pull-flow network.

    For each level k with flow u_k (B, 3, i, j, k) in voxels of its grid: fixed and moving are
    area-averaged to that grid, moving is pulled by u_k, and
    L_k = photometric(fixed_k, warp(moving_k, u_k)) + smooth_weight · smoothness(u_k);
    total = Σ_k weights_per_level[k] · L_k.

    Args:
        fixed, moving: (B, 1, I, J, K) in [0, 1]; fixed = ED, moving = ES.
        flows_per_level: flows in any order (e.g. PWCOutput.levels, optionally + [output.flow]).
        weights_per_level: one weight per flow.
        mask: optional (B, 1, I, J, K) weights on the full grid, area-averaged per level.

    Returns:
        (total, components) — components holds detached scalars: 'photometric' and 'smoothness'
        (weighted sums over levels), and 'photometric/level{k}', 'smoothness/level{k}' per level
        (k = index in ``flows_per_level``).
    """
    if len(flows_per_level) != len(weights_per_level):
        raise ValueError(f"{len(flows_per_level)} flows but {len(weights_per_level)} weights")
    if not flows_per_level:
        raise ValueError("pwc_unsupervised_loss needs at least one flow")
    total = fixed.new_zeros(())
    photo_sum = fixed.new_zeros(())
    smooth_sum = fixed.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for k, (flow, w) in enumerate(zip(flows_per_level, weights_per_level)):
        size = tuple(flow.shape[2:])
        fixed_k = downsample_to(fixed, size)
        moving_k = downsample_to(moving, size)
        mask_k = downsample_to(mask, size) if mask is not None else None
        photo = photometric_loss(fixed_k, warp(moving_k, flow), alpha=alpha, mask=mask_k,
                                 window=min(window, _largest_odd(min(size))))
        smooth = smoothness_loss(flow)
        total = total + w * (photo + smooth_weight * smooth)
        photo_sum = photo_sum + w * photo.detach()
        smooth_sum = smooth_sum + w * smooth.detach()
        parts[f"photometric/level{k}"] = photo.detach()
        parts[f"smoothness/level{k}"] = smooth.detach()
    parts["photometric"] = photo_sum
    parts["smoothness"] = smooth_sum
    parts["total"] = total.detach()
    return total, parts


def _largest_odd(n: int) -> int:
    return max(1, n if n % 2 else n - 1)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, σ²) ‖ N(0, 1)) averaged over all latent elements (batch included).

    Per element 0.5·(σ² + μ² − 1) − log σ with σ² = exp(logvar), i.e.
    0.5·(exp(logvar) + μ² − 1 − logvar). Exactly 0 for mu = 0, logvar = 0.
    """
    return (0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)).mean()


def kl_elements(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-element KL(N(mu, σ²) ‖ N(0, 1)) = 0.5·(exp(logvar) + μ² − 1 − logvar), nats, shape of ``mu``."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """KL of a (B, C, …) latent map summed over its elements, averaged over the batch (nats per sample).

    With ``free_bits`` λ > 0 each channel's KL (summed over its spatial map, batch-averaged) counts
    as max(λ, KL_c) (Kingma et al. 2016): a channel below λ nats is not pushed further towards the
    prior, so the encoder can keep some information in every channel instead of collapsing it.
    """
    per_channel = kl_elements(mu, logvar).flatten(2).sum(2).mean(0)  # (C,)
    if free_bits > 0:
        per_channel = per_channel.clamp_min(float(free_bits))
    return per_channel.sum()


def cvae_loss(recipe: str, flow_pred: torch.Tensor, flow: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
              w_rec: float = 0.95, w_kl: float = 0.05, beta: float = 0.1, kl_factor: float = 1.0,
              free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CVAE training loss; returns (loss, mse, kl), mse and kl as plain means for logging.

    Shapes: flows (B, 3, I, J, K) voxels; mu, logvar (B, C, h, w, d). With N_f = 3·I·J·K flow
    elements and N_z = C·h·w·d latent elements per sample:

    * ``paper``: w_rec · mean(squared error) + kl_factor · w_kl · KL_fb / N_z — the paper's
      weighted means. Read as an ELBO it assumes a decoder noise 2σ² = (w_kl/w_rec)·N_f/N_z
      voxels² (σ ≈ 1.1 voxels for the 32³ smoke CVAE, as large as the motion itself).
    * ``elbo``: [Σ squared error + kl_factor · β · KL_fb] / N_f — the negative ELBO of a Gaussian
      decoder with 2σ² = β voxels², divided by N_f so the gradient scale (and clipping) stays
      that of a mean.

    KL_fb is :func:`kl_per_sample` with ``free_bits``; ``kl`` returned is the plain per-element
    mean (nats), comparable across recipes.
    """
    mse = ((flow_pred.float() - flow.float()) ** 2).mean()
    mu, logvar = mu.float(), logvar.float()
    kl_mean = kl_elements(mu, logvar).mean()
    kl_sample = kl_per_sample(mu, logvar, free_bits)
    if recipe == "paper":
        n_z = mu[0].numel()
        loss = w_rec * mse + kl_factor * w_kl * kl_sample / n_z
    elif recipe == "elbo":
        n_f = flow[0].numel()
        loss = mse + kl_factor * beta * kl_sample / n_f
    else:
        raise ValueError(f"recipe must be 'paper' or 'elbo', got {recipe!r}")
    return loss, mse, kl_mean


__all__ = [
    "cvae_loss",
    "downsample_to",
    "kl_elements",
    "kl_per_sample",
    "kl_standard_normal",
    "photometric_loss",
    "pwc_unsupervised_loss",
    "smoothness_loss",
    "ssim3d",
]
