"""Flow quality measures: Jacobian determinant, folding, endpoint error, MSE.

Inputs are flows in voxels, channel c = displacement along array axis c, either torch tensors
(B, 3, I, J, K) or numpy arrays / tensors (3, I, J, K) (one flow, no batch axis).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


def _as_tensor(u: Any, name: str) -> tuple[torch.Tensor, bool, bool]:
    """(B, 3, I, J, K) tensor, whether the input had a batch axis, whether it was numpy."""
    was_numpy = not isinstance(u, torch.Tensor)
    t = torch.as_tensor(np.asarray(u)) if was_numpy else u
    if t.dim() == 4:
        t, batched = t[None], False
    else:
        batched = True
    if t.dim() != 5 or t.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, I, J, K) or (3, I, J, K), got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t, batched, was_numpy


def _mask(mask: Any, shape: tuple[int, ...], device) -> torch.Tensor:
    """Boolean mask broadcast to ``shape`` = (B, I, J, K); accepts (I,J,K), (B,I,J,K), (B,1,I,J,K)."""
    m = torch.as_tensor(np.asarray(mask)) if not isinstance(mask, torch.Tensor) else mask
    m = m.to(device=device).bool()
    if m.dim() == 5:
        if m.shape[1] != 1:
            raise ValueError(f"mask must have one channel, got {tuple(m.shape)}")
        m = m[:, 0]
    try:
        m = torch.broadcast_to(m, shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(m.shape)} does not fit flows of grid {shape}") from None
    if not bool(m.any()):
        raise ValueError("mask selects no voxel")
    return m


def jacobian_determinant(u: Any) -> Any:
    """Determinant of the Jacobian of the map ``x → x + u(x)`` (voxel units).

    Derivatives are central differences in the interior and one-sided at the grid edges
    (``torch.gradient``). det = 1 means volume preserved, < 1 compression, ≤ 0 folding.

    Args:
        u: (B, 3, I, J, K) tensor, or (3, I, J, K) tensor / numpy array.

    Returns:
        (B, 1, I, J, K) for batched input, (I, J, K) otherwise; numpy if the input was numpy.
    """
    t, batched, was_numpy = _as_tensor(u, "u")
    # d[a][b] = d u_a / d x_b, each (B, I, J, K)
    d = [torch.gradient(t[:, a], dim=(1, 2, 3)) for a in range(3)]
    j = [[d[a][b] + (1.0 if a == b else 0.0) for b in range(3)] for a in range(3)]
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
           - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    det = det[:, None] if batched else det[0]
    return det.detach().cpu().numpy() if was_numpy else det


def folding_fraction(u: Any, mask: Any = None) -> float:
    """Fraction of voxels (inside ``mask``, over the whole batch) where the Jacobian det ≤ 0.

    Args:
        u: (B, 3, I, J, K) or (3, I, J, K) voxels.
        mask: optional boolean (I, J, K), (B, I, J, K) or (B, 1, I, J, K).
    """
    t, _, _ = _as_tensor(u, "u")
    det = jacobian_determinant(t)[:, 0]
    folded = det <= 0
    if mask is None:
        return float(folded.double().mean())
    m = _mask(mask, tuple(det.shape), det.device)
    return float(folded[m].double().mean())


@dataclass(frozen=True)
class EndpointError:
    """Mean endpoint error: in voxels, and in mm when the voxel spacing was given."""

    epe_vox: float
    epe_mm: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def endpoint_error(u_pred: Any, u_true: Any, spacing_mm: Any = None, mask: Any = None) -> EndpointError:
    """True endpoint error: mean over voxels of ``‖u_pred − u_true‖₂``.

    In mm, each component of the difference is first scaled by the spacing of its axis (exact
    for any grid whose axes are orthogonal, including oblique ones: ‖A·d‖ = ‖diag(s)·d‖ when
    A = R·diag(s)). For an isotropic grid ``epe_mm = epe_vox × spacing``.

    Args:
        u_pred, u_true: (B, 3, I, J, K) or (3, I, J, K) voxels, tensors or numpy arrays.
        spacing_mm: optional (3,) voxel size in mm along the array axes.
        mask: optional boolean (I, J, K), (B, I, J, K) or (B, 1, I, J, K): average only there.

    Returns:
        :class:`EndpointError` (``.to_dict()`` gives {"epe_vox": …, "epe_mm": …}).
    """
    p, _, _ = _as_tensor(u_pred, "u_pred")
    q, _, _ = _as_tensor(u_true, "u_true")
    q = q.to(device=p.device)
    diff = (p.double() - q.double())
    m = None if mask is None else _mask(mask, (diff.shape[0], *diff.shape[2:]), diff.device)

    def mean_norm(dv: torch.Tensor) -> float:
        n = torch.linalg.vector_norm(dv, dim=1)
        return float(n[m].mean() if m is not None else n.mean())

    epe_vox = mean_norm(diff)
    epe_mm = None
    if spacing_mm is not None:
        s = torch.as_tensor(np.asarray(spacing_mm, dtype=np.float64), device=diff.device).reshape(-1)
        if s.numel() != 3:
            raise ValueError(f"spacing_mm must have 3 values, got {s.numel()}")
        epe_mm = mean_norm(diff * s.view(1, 3, 1, 1, 1))
    return EndpointError(epe_vox=epe_vox, epe_mm=epe_mm)


def flow_mse(u_pred: Any, u_true: Any, mask: Any = None) -> float:
    """Mean squared error over voxels and the three components (voxels²), as in the paper.

    Only for comparison with the paper; report :func:`endpoint_error` as the error measure.

    Args:
        u_pred, u_true: (B, 3, I, J, K) or (3, I, J, K) voxels, tensors or numpy arrays.
        mask: optional boolean (I, J, K), (B, I, J, K) or (B, 1, I, J, K).
    """
    p, _, _ = _as_tensor(u_pred, "u_pred")
    q, _, _ = _as_tensor(u_true, "u_true")
    sq = (p.double() - q.to(device=p.device).double()) ** 2  # (B, 3, I, J, K)
    if mask is None:
        return float(sq.mean())
    m = _mask(mask, (sq.shape[0], *sq.shape[2:]), sq.device)
    return float(sq.mean(dim=1)[m].mean())


def magnitude_ratio(u: Any, reference: Any, mask: Any = None) -> float:
    """How strong a flow is against a reference: mean_x ‖u(x)‖₂ / mean_x ‖ref(x)‖₂ (over ``mask``).

    1 = as much motion as the reference; an annotation with 0.9 moves the myocardium 10 % less
    than the truth. Unitless: both fields in the same units (voxels of the same grid).

    Args:
        u, reference: (B, 3, I, J, K) or (3, I, J, K), tensors or numpy arrays.
        mask: optional boolean (I, J, K), (B, I, J, K) or (B, 1, I, J, K).

    Returns:
        The ratio; NaN where the reference does not move (or the mask is empty).
    """
    p, _, _ = _as_tensor(u, "u")
    q, _, _ = _as_tensor(reference, "reference")
    q = q.to(device=p.device)
    if p.shape != q.shape:
        raise ValueError(f"u {tuple(p.shape)} and reference {tuple(q.shape)} differ in shape")
    a = torch.linalg.vector_norm(p.double(), dim=1)
    b = torch.linalg.vector_norm(q.double(), dim=1)
    if mask is not None:
        m = _mask(mask, a.shape, a.device)
        a, b = a[m], b[m]
    den = float(b.mean()) if b.numel() else 0.0
    return float(a.mean()) / den if den > 0 else float("nan")


def truth_scores(u: Any, truth: Any, spacing_mm: Any, masks: dict[str, Any] | None = None) -> dict[str, float]:
    """One flow against the exact truth: ``epe_mm`` over the grid, ``folding``, and per named mask
    ``epe_<name>_mm`` and ``magnitude_<name>`` (:func:`magnitude_ratio`); an empty mask is skipped.

    Args:
        u, truth: (3, I, J, K) or (B, 3, I, J, K) flows in voxels.
        spacing_mm: voxel size, one number or (3,), mm.
        masks: name → boolean (I, J, K), e.g. :func:`cardiomotion.data.phantom.region_masks`.
    """
    s = (float(spacing_mm),) * 3 if np.ndim(spacing_mm) == 0 else tuple(float(x) for x in spacing_mm)
    out = {"epe_mm": endpoint_error(u, truth, spacing_mm=s).epe_mm, "folding": folding_fraction(u)}
    for name, m in (masks or {}).items():
        if np.asarray(m).any():
            out[f"epe_{name}_mm"] = endpoint_error(u, truth, spacing_mm=s, mask=m).epe_mm
            out[f"magnitude_{name}"] = magnitude_ratio(u, truth, mask=m)
    return out
