"""Generative quality of a motion prior: proper scores and calibration of K prior samples.

A generator is judged as a *distribution*: for one held-out ES frame it yields K prior samples
X₁ … X_K (pull flows (K, 3, I, J, K), voxels) that should look like draws from the motions that
frame can have; the reference y (3, I, J, K) is the annotated flow (on the phantom also the exact
truth). Every distance is the field norm

    ‖a‖ = sqrt( mean over voxels x of |a(x)|² )          (voxels; × spacing → mm)

(the RMS vector length over the grid, or over a mask). With it:

* **energy score** ES = mean_k ‖X_k − y‖ − ½ · mean_{k≠l} ‖X_k − X_l‖. A strictly proper scoring
  rule (Gneiting & Raftery 2007): its expectation is lowest when the samples come from the
  distribution y comes from. The first term alone (mean error) rewards a collapsed prior that
  sits on the conditional mean; the second term pays back exactly the spread a calibrated
  ensemble needs. The pair mean runs over k ≠ l (the "fair" estimator, unbiased for the
  distribution's score at any K ≥ 2), so scores with different K are comparable.
* **best-of-K**: min_k ‖X_k − y‖ (does any sample come close?).
* **spread–skill ratio**: sqrt((K + 1)/K) · spread / skill, spread² = mean over voxels of the
  unbiased ensemble variance summed over the three components, skill = ‖mean_k X_k − y‖. For y
  drawn from the samples' own distribution E[skill²] = (1 + 1/K)·E[spread²], so a calibrated
  ensemble scores 1; < 1 is over-confident (too little spread), > 1 over-dispersed.
* **magnitude ratio**: mean_{k,x} |X_k(x)| / mean_x |y(x)| (1 = samples as strong as the motion).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class EnsembleScore:
    """Scores of K samples against one reference; distances in voxels (field norm)."""

    k: int
    energy_score: float
    mean_error: float  # mean_k ‖X_k − y‖
    mean_pair_distance: float  # mean_{k≠l} ‖X_k − X_l‖ (0 for K = 1)
    best_of_k: float
    skill: float  # ‖mean_k X_k − y‖
    spread: float  # sqrt(mean_x Σ_c var_k X_kc(x)), unbiased variance (0 for K = 1)
    spread_skill: float  # sqrt((K+1)/K) · spread / skill (nan if skill = 0)
    magnitude_ratio: float  # mean |X| / mean |y| (nan if y = 0)

    def to_dict(self, prefix: str = "", spacing_mm: float | None = None) -> dict[str, float]:
        """Flat dict; with ``spacing_mm`` the distances are given in mm too (``*_mm`` keys)."""
        d = asdict(self)
        out: dict[str, float] = {}
        for key, v in d.items():
            out[f"{prefix}{key}" + ("" if key in ("k", "spread_skill", "magnitude_ratio") else "_vox")] = float(v)
            if spacing_mm is not None and key not in ("k", "spread_skill", "magnitude_ratio"):
                out[f"{prefix}{key}_mm"] = float(v) * float(spacing_mm)
        return out


def _as_samples(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() != 5 or t.shape[1] != 3:
        raise ValueError(f"{name} must be (K, 3, I, J, K) flows, got {tuple(t.shape)}")
    return t.detach().double()


def _flatten(t: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(K, 3, I, J, K) → (K, 3·n) over the n voxels of ``mask`` (all voxels without one)."""
    if mask is None:
        return t.reshape(t.shape[0], -1), int(np.prod(t.shape[2:]))
    m = mask.reshape(-1)
    flat = t.reshape(t.shape[0], 3, -1)[:, :, m]
    return flat.reshape(t.shape[0], -1), int(m.sum())


def field_norm(a: Any, mask: Any = None) -> torch.Tensor:
    """‖a‖ = sqrt(mean over voxels of |a(x)|²) of each flow in a batch (B, 3, I, J, K) → (B,), voxels."""
    t = _as_samples(a, "a")
    m = _mask(mask, t)
    flat, n = _flatten(t, m)
    return torch.linalg.vector_norm(flat, dim=1) / math.sqrt(n)


def _mask(mask: Any, t: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask)).to(torch.bool).to(t.device)
    if tuple(m.shape) != tuple(t.shape[2:]):
        raise ValueError(f"mask of shape {tuple(m.shape)} does not fit flows of grid {tuple(t.shape[2:])}")
    if not bool(m.any()):
        raise ValueError("mask selects no voxel")
    return m


def ensemble_score(samples: Any, reference: Any, mask: Any = None) -> EnsembleScore:
    """Energy score, best-of-K, spread–skill and magnitude ratio of K samples against one reference.

    Args:
        samples: (K, 3, I, J, K) prior samples, voxels (tensor or numpy).
        reference: (3, I, J, K) or (1, 3, I, J, K) reference flow, voxels.
        mask: optional boolean (I, J, K): every norm and mean runs over these voxels only.

    Returns:
        :class:`EnsembleScore` (voxels).
    """
    x = _as_samples(samples, "samples")
    y = torch.as_tensor(np.asarray(reference)) if not isinstance(reference, torch.Tensor) else reference
    y = y.detach().double().to(x.device)
    if y.dim() == 4:
        y = y[None]
    if tuple(y.shape[1:]) != tuple(x.shape[1:]) or y.shape[0] != 1:
        raise ValueError(f"reference must be (3, I, J, K) matching samples {tuple(x.shape)}, got {tuple(y.shape)}")
    m = _mask(mask, x)
    xf, n = _flatten(x, m)
    yf, _ = _flatten(y, m)
    k = x.shape[0]
    root_n = math.sqrt(n)
    err = torch.linalg.vector_norm(xf - yf, dim=1) / root_n  # (K,)
    if k > 1:
        pair = torch.cdist(xf[None], xf[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / root_n
        pair_mean = float(pair.sum() / (k * (k - 1)))  # the diagonal is 0: mean over k ≠ l
        var = xf.var(dim=0, unbiased=True)  # (3·n,) per component and voxel
        spread = math.sqrt(float(var.sum()) / n)
    else:
        pair_mean, spread = 0.0, 0.0
    skill = float(torch.linalg.vector_norm(xf.mean(0) - yf[0]) / root_n)
    mag_x = float(torch.linalg.vector_norm(xf.reshape(k, 3, n), dim=1).mean())
    mag_y = float(torch.linalg.vector_norm(yf.reshape(1, 3, n), dim=1).mean())
    return EnsembleScore(
        k=k,
        energy_score=float(err.mean()) - 0.5 * pair_mean,
        mean_error=float(err.mean()),
        mean_pair_distance=pair_mean,
        best_of_k=float(err.min()),
        skill=skill,
        spread=spread,
        spread_skill=math.sqrt((k + 1) / k) * spread / skill if skill > 0 else float("nan"),
        magnitude_ratio=mag_x / mag_y if mag_y > 0 else float("nan"),
    )


__all__ = ["EnsembleScore", "ensemble_score", "field_norm"]
