"""Field algebra on pull flows: composition, inversion, velocity integration, resizing, smoothing.

Every function takes and returns torch tensors of shape (B, 3, I, J, K) in voxels of their
grid, channel c = displacement along array axis c (docs/design.md), and is differentiable.

A pull field ``u`` stands for the map ``φ_u(x) = x + u(x)`` and acts on an image by
``warp(img, u) = img ∘ φ_u``. Composition therefore reads right-to-left in maps but
left-to-right in warps::

    warp(warp(img, v), u)(x) = img(x + u(x) + v(x + u(x)))      = warp(img, compose(u, v))(x)
    φ_compose(u, v)          = φ_v ∘ φ_u

Values sampled outside the grid use border padding (the flow at the nearest edge voxel).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .warp import Padding, warp
from ..transfer import small_tensor


def _check_flow(u: torch.Tensor, name: str = "flow") -> None:
    if not isinstance(u, torch.Tensor) or u.dim() != 5 or u.shape[1] != 3:
        shape = tuple(u.shape) if hasattr(u, "shape") else type(u).__name__
        raise ValueError(f"{name} must be a tensor (B, 3, I, J, K), got {shape}")


def compose(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pull field of "pull by ``u``, then by ``v``": ``compose(u, v) = u + warp(v, u)``.

    Precisely, ``compose(u, v)(x) = u(x) + v(x + u(x))``, so that
    ``warp(img, compose(u, v)) == warp(warp(img, v), u)`` (up to interpolation error):
    the image is first pulled through ``v`` and the result then through ``u``.
    As maps, ``φ_compose(u, v) = φ_v ∘ φ_u`` with ``φ_u(x) = x + u(x)``.

    Args:
        u: (B, 3, I, J, K) voxels, applied at the output grid.
        v: (B, 3, I, J, K) voxels, sampled at ``x + u(x)`` (trilinear, border padding).
            Either batch size may be 1 and is broadcast.

    Returns:
        (B, 3, I, J, K) voxels.
    """
    _check_flow(u, "u")
    _check_flow(v, "v")
    return u + warp(v, u, padding=Padding.BORDER)


def invert(u: torch.Tensor, iterations: int = 50, tol: float = 1e-4) -> torch.Tensor:
    """Inverse of a pull field by fixed-point iteration ``w ← −warp(u, w)``.

    The fixed point satisfies ``compose(w, u) = w + warp(u, w) = 0`` (φ_u ∘ φ_w = id); for a
    smooth, invertible field with ``|∇u| < 1`` the iteration converges and then also
    ``compose(u, w) ≈ 0`` (φ_w ∘ φ_u = id) away from the borders. Folded fields have no inverse;
    the result is then only a best effort.

    Args:
        u: (B, 3, I, J, K) voxels.
        iterations: maximum number of fixed-point steps.
        tol: stop once the largest update (voxels) falls below this.

    Returns:
        (B, 3, I, J, K) voxels, the inverse field ``w``.
    """
    _check_flow(u, "u")
    w = -u
    for _ in range(iterations):
        w_new = -warp(u, w, padding=Padding.BORDER)
        delta = (w_new - w).detach().abs().max()
        w = w_new
        if float(delta) < tol:
            break
    return w


def integrate_velocity(v: torch.Tensor, steps: int = 7, t: float = 1.0) -> torch.Tensor:
    """Displacement ``exp(t·v)`` of a stationary velocity field, by scaling and squaring.

    ``u = t·v / 2**steps``, then ``steps`` times ``u ← compose(u, u)``. The result is a
    diffeomorphism for smooth ``v`` (no folding); ``exp(−v)`` is its inverse and
    ``t ∈ [0, 1]`` traces the motion from identity (t = 0) to the full field (t = 1).

    Args:
        v: (B, 3, I, J, K) velocity in voxels (per unit time).
        steps: number of squarings (2**steps sub-steps).
        t: time to integrate to.

    Returns:
        (B, 3, I, J, K) displacement in voxels.
    """
    _check_flow(v, "v")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    u = v * (t / 2.0**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def exp(v: torch.Tensor, t: float = 1.0, steps: int = 7) -> torch.Tensor:
    """``exp(t·v)``: alias of :func:`integrate_velocity` with the time first."""
    return integrate_velocity(v, steps=steps, t=t)


def velocity_sequence(v: torch.Tensor, times: Sequence[float], steps: int = 7) -> list[torch.Tensor]:
    """Displacements ``exp(t·v)`` for each ``t`` in ``times`` (e.g. a full ES→ED sequence).

    Returns:
        list of (B, 3, I, J, K) voxel fields, one per time.
    """
    return [integrate_velocity(v, steps=steps, t=float(t)) for t in times]


def upsample_flow(u: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a flow onto a grid of ``size`` voxels covering the same extent.

    Values are interpolated trilinearly with align_corners=True (corner voxel centres coincide)
    and vectors are rescaled per axis by ``(new − 1) / (old − 1)`` so they stay in voxels of the
    new grid (an axis of size 1 keeps its scale). Works for down-sampling too.

    Args:
        u: (B, 3, I, J, K) voxels of the old grid.
        size: (I', J', K') of the new grid.

    Returns:
        (B, 3, I', J', K') voxels of the new grid.
    """
    _check_flow(u, "u")
    size = tuple(int(n) for n in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be three positive ints, got {size}")
    old = tuple(u.shape[2:])
    out = u if size == old else F.interpolate(u, size=size, mode="trilinear", align_corners=True)
    ratio = [(n - 1) / (o - 1) if o > 1 and n > 1 else 1.0 for n, o in zip(size, old)]
    if all(r == 1.0 for r in ratio):
        return out
    scale = small_tensor(ratio, u).view(1, 3, 1, 1, 1)
    return out * scale


def gaussian_smooth(u: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Gaussian filter of every channel of a field, separable, replicate padding (same grid).

    The kernel is exp(−x²/2σ²) on integer offsets |x| ≤ ceil(truncate·σ), normalised to sum 1,
    so a constant field is unchanged and a field linear in the voxel index is unchanged away from
    the border (the kernel is symmetric). ``sigma`` ≤ 0 returns ``u`` itself.

    Args:
        u: (B, C, I, J, K) any channels (a flow: voxels).
        sigma: standard deviation in voxels.

    Returns:
        (B, C, I, J, K), differentiable.
    """
    if u.dim() != 5:
        raise ValueError(f"gaussian_smooth expects (B, C, I, J, K), got {tuple(u.shape)}")
    if sigma <= 0:
        return u
    radius = max(1, math.ceil(truncate * sigma))
    x = torch.arange(-radius, radius + 1, device=u.device, dtype=u.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = u.shape[1]
    out = u
    for axis in range(3):
        n = out.shape[2 + axis]
        r = min(radius, n - 1)  # replicate padding needs r < n; trim the kernel on tiny axes
        kk = k[radius - r: radius + r + 1]
        kk = kk / kk.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kk.numel()
        pad = [0, 0, 0, 0, 0, 0]  # F.pad order: last axis first
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        if r:
            out = F.conv3d(F.pad(out, pad, mode="replicate"), kk.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return out
