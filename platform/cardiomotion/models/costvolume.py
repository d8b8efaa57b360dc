"""Local 3D correlation cost volume of the PWC-Net, memory-bounded in forward and backward.

For features f1, f2 of shape (B, C, I, J, K) and search range r,

    cost[b, d, x] = (1/C) · Σ_c f1[b, c, x] · f2[b, c, x + δ_d],   δ_d ∈ [-r, r]^3,

with f2 zero outside its grid. Offsets are ordered as ``itertools.product(range(-r, r+1),
repeat=3)`` (axis 0 slowest), so channel d = ((δ0+r)·(2r+1) + δ1+r)·(2r+1) + δ2+r; the zero offset
is the middle channel. δ is in voxels of the features' grid, channel c of δ along array axis c.

The computation pads f2 once and reads shifted slices (views) of it, ``chunk`` offsets at a time,
on the features' device. A custom autograd function keeps only f1 and f2 for backward and
recomputes the shifted views there, so neither pass ever holds more than ``chunk`` shifted copies
of f2: peak extra memory ≈ chunk · B · C · I · J · K elements.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def cost_offsets(search_range: int) -> list[tuple[int, int, int]]:
    """The (2r+1)^3 displacement offsets in the order of the cost volume's channels."""
    r = int(search_range)
    return list(itertools.product(range(-r, r + 1), repeat=3))


def _shifted(f2p: torch.Tensor, r: int, off: tuple[int, int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """View of padded f2 such that view[..., x] = f2[..., x + off]."""
    i, j, k = shape
    a, b, c = off
    return f2p[:, :, r + a:r + a + i, r + b:r + b + j, r + c:r + c + k]


class _CostVolumeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1: torch.Tensor, f2: torch.Tensor, r: int, chunk: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(f1, f2)
        ctx.r, ctx.chunk = r, chunk
        b, c = f1.shape[:2]
        shape = tuple(f1.shape[2:])
        offs = cost_offsets(r)
        f2p = F.pad(f2, (r,) * 6)
        out = f1.new_empty((b, len(offs), *shape))
        f1u = f1.unsqueeze(1)
        for s in range(0, len(offs), chunk):
            group = offs[s:s + chunk]
            if len(group) == 1:
                out[:, s] = (f1 * _shifted(f2p, r, group[0], shape)).sum(1)
            else:
                views = torch.stack([_shifted(f2p, r, o, shape) for o in group], dim=1)  # B,n,C,I,J,K
                out[:, s:s + len(group)] = views.mul_(f1u).sum(2)
        return out.div_(c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        f1, f2 = ctx.saved_tensors
        r, chunk = ctx.r, ctx.chunk
        c = f1.shape[1]
        shape = tuple(f1.shape[2:])
        offs = cost_offsets(r)
        g = grad_out / c  # B, D, I, J, K
        need1, need2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_f1 = torch.zeros_like(f1) if need1 else None
        grad_f2p = f2.new_zeros((f2.shape[0], c, *(n + 2 * r for n in shape))) if need2 else None
        f2p = F.pad(f2, (r,) * 6) if need1 else None
        for s in range(0, len(offs), chunk):
            group = offs[s:s + chunk]
            gs = g[:, s:s + len(group)].unsqueeze(2)  # B,n,1,I,J,K
            if need1:
                views = torch.stack([_shifted(f2p, r, o, shape) for o in group], dim=1)
                grad_f1 += views.mul_(gs).sum(1)
            if need2:
                prod = f1.unsqueeze(1) * gs  # B,n,C,I,J,K
                for m, o in enumerate(group):
                    _shifted(grad_f2p, r, o, shape).add_(prod[:, m])
        grad_f2 = None
        if need2:
            grad_f2 = grad_f2p[:, :, r:r + shape[0], r:r + shape[1], r:r + shape[2]].contiguous()
        return grad_f1, grad_f2, None, None


def cost_volume(f1: torch.Tensor, f2: torch.Tensor, search_range: int, chunk: int | None = None) -> torch.Tensor:
    """Correlation of f1 with f2 over displacements in [-r, r]^3, normalised by channels.

    Args:
        f1: (B, C, I, J, K) features of the fixed frame.
        f2: (B, C, I, J, K) features of the moving frame, already warped towards f1.
        search_range: r ≥ 0, in voxels of the features' grid.
        chunk: how many offsets are processed at once (memory ≈ chunk shifted copies of f2);
            None or ≤ 0 means all (2r+1)^3 at once.

    Returns:
        (B, (2r+1)^3, I, J, K) cost, on f1's device, dtype promoted from f1 and f2. Channel order:
        :func:`cost_offsets`.
    """
    if f1.dim() != 5 or f1.shape != f2.shape:
        raise ValueError(f"cost_volume expects two (B,C,I,J,K) tensors of one shape, got "
                         f"{tuple(f1.shape)} and {tuple(f2.shape)}")
    r = int(search_range)
    if r < 0:
        raise ValueError(f"search_range must be ≥ 0, got {search_range}")
    n = (2 * r + 1) ** 3
    chunk = n if chunk is None or chunk <= 0 else min(int(chunk), n)
    dtype = torch.promote_types(f1.dtype, f2.dtype)
    return _CostVolumeFn.apply(f1.to(dtype).contiguous(), f2.to(dtype).contiguous(), r, chunk)


class CostVolume(torch.nn.Module):
    """Module wrapper of :func:`cost_volume` (no parameters)."""

    def __init__(self, search_range: int = 2, chunk: int | None = None):
        super().__init__()
        self.search_range = int(search_range)
        self.chunk = chunk

    @property
    def out_channels(self) -> int:
        return (2 * self.search_range + 1) ** 3

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return cost_volume(f1, f2, self.search_range, self.chunk)

    def extra_repr(self) -> str:
        return f"search_range={self.search_range}, chunk={self.chunk}"
