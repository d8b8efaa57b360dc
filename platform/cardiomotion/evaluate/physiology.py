"""Physiology of a (synthetic) ED frame: ejection fraction, longitudinal shortening, myocardial volume.

Given the ES labels of a scan (I, J, K) on the prepared grid (phantom labels: 1 = LV blood pool,
2 = LV myocardium) and a pull flow u (3, I, J, K) voxels with ED(x) = ES(x + u(x)), the ED that
u implies is labelled by pulling the ES labels through u. For a prior sample that ED is
synthetic; for the phantom's exact field it is the real ED, so the same numbers measured on the
truth are the cohort's true values (tests pin this).

* **EF** = 1 − ESV / EDV, ESV = LV blood voxels of the ES labels, EDV = Σ_x of the ES LV-blood
  indicator pulled through u with trilinear interpolation (a partial-volume count, so the EF is
  not quantised to whole voxels).
* **Longitudinal shortening** LS = 1 − L_ES / L_ED along the LV long axis (principal axis of the
  ES LV blood pool + myocardium). The two ends of the ES blood pool (centroids of its 3 % most
  basal and most apical voxels along the axis) are carried to ED by the forward map p + w(p),
  w = u⁻¹ (fixed-point inverse), so the ED length is measured to a fraction of a voxel.
* **Myocardial volume change** = mean over the synthetic ED myocardium of det J(x → x + u(x)) − 1,
  the relative volume change ED → ES of that tissue (0 for an incompressible wall, which the
  phantom's is).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..data.phantom import LV_BLOOD, LV_MYO  # the label convention of the cohort

_END_QUANTILE = 0.03


@dataclass(frozen=True)
class Physiology:
    """Indices of the ED implied by one flow (fractions, not percent)."""

    ef: float
    longitudinal_shortening: float
    myo_volume_change: float
    edv_ml: float
    esv_ml: float

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def _flows(u: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(u)) if not isinstance(u, torch.Tensor) else u
    t = t.detach().float().cpu()
    if t.dim() == 4:
        t = t[None]
    if t.dim() != 5 or t.shape[1] != 3:
        raise ValueError(f"flows must be (3, I, J, K) or (K, 3, I, J, K), got {tuple(t.shape)}")
    return t


def _pulled_indicators(lab: np.ndarray, u: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(label values, each value's ES indicator pulled through each flow (K, L, I, J, K), trilinear)."""
    from ..flow.warp import warp

    values = [int(v) for v in np.unique(lab) if v != 0]
    if not values:
        return values, torch.zeros((u.shape[0], 0, *lab.shape))
    onehot = torch.from_numpy(np.stack([(lab == v) for v in values]).astype(np.float32))[None]
    return values, torch.cat([warp(onehot, u[i:i + 1]) for i in range(u.shape[0])])


def _labels_from(values: list[int], pulled: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Argmax of pulled indicators (background where none exceeds 0.5) → (K, I, J, K) uint8."""
    if not values:
        return np.zeros((pulled.shape[0], *shape), np.uint8)
    best, arg = pulled.max(dim=1)
    return np.where(best.numpy() > 0.5, np.asarray(values, np.uint8)[arg.numpy()], 0).astype(np.uint8)


def synthetic_ed_labels(es_labels: np.ndarray, flow: Any) -> np.ndarray:
    """Labels of the ED a pull flow implies: each label's indicator pulled through the flow
    (trilinear), the largest wins (background where none exceeds 0.5). (I, J, K) uint8 per flow
    of a (3, I, J, K) input, (K, I, J, K) for a batch."""
    batched = (flow.dim() if isinstance(flow, torch.Tensor) else np.ndim(flow)) == 5
    lab = np.asarray(es_labels)
    out = _labels_from(*_pulled_indicators(lab, _flows(flow)), lab.shape)
    return out if batched else out[0]


def long_axis(es_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, unit axis) of the LV (blood + myocardium) in voxel coordinates: its principal axis."""
    pts = np.argwhere(np.isin(es_labels, (LV_BLOOD, LV_MYO))).astype(np.float64)
    if len(pts) < 4:
        raise ValueError("the ES labels hold no LV (labels 1 and 2)")
    c = pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov((pts - c).T))
    return c, vecs[:, -1]


def ejection_fraction(es_labels: np.ndarray, flow: Any) -> float:
    """EF of the ED one pull flow (3, I, J, K) implies, as :func:`physiology` measures it (cheap: no inverse)."""
    from ..flow.warp import warp

    blood = np.asarray(es_labels) == LV_BLOOD
    if not blood.any():
        raise ValueError("the ES labels hold no LV blood pool (label 1)")
    edv = float(warp(torch.from_numpy(blood.astype(np.float32))[None, None], _flows(flow)[:1]).sum())
    return 1.0 - float(blood.sum()) / edv if edv > 0 else float("nan")


def physiology(es_labels: np.ndarray, flows: Any, spacing_mm: float = 1.0) -> list[Physiology]:
    """EF, longitudinal shortening and myocardial volume change of the ED each flow implies.

    Args:
        es_labels: (I, J, K) labels of the ES frame on the flows' grid (1 LV blood, 2 LV myocardium).
        flows: (3, I, J, K) or (K, 3, I, J, K) pull flows ED←ES, voxels.
        spacing_mm: isotropic voxel size (for the volumes in ml).

    Returns:
        one :class:`Physiology` per flow.
    """
    from ..flow.metrics import jacobian_determinant
    from ..flow.ops import invert

    lab = np.asarray(es_labels)
    u = _flows(flows)
    if tuple(u.shape[2:]) != lab.shape:
        raise ValueError(f"labels of shape {lab.shape} do not fit flows of grid {tuple(u.shape[2:])}")
    blood = lab == LV_BLOOD
    if not blood.any():
        raise ValueError("the ES labels hold no LV blood pool (label 1)")
    voxel_ml = float(spacing_mm) ** 3 / 1000.0
    esv = float(blood.sum())
    centre, axis = long_axis(lab)
    pts = np.argwhere(blood).astype(np.float64)
    t = (pts - centre) @ axis
    lo, hi = np.quantile(t, [_END_QUANTILE, 1.0 - _END_QUANTILE])
    ends = np.stack([pts[t <= lo].mean(0), pts[t >= hi].mean(0)])  # (2, 3) ES voxel coordinates
    length_es = abs(float((ends[1] - ends[0]) @ axis))

    values, pulled = _pulled_indicators(lab, u)  # once: the synthetic-ED labels and the EDV
    ed_labels = _labels_from(values, pulled, lab.shape)  # (K, I, J, K)
    edvs = pulled[:, values.index(LV_BLOOD)].flatten(1).sum(1)  # partial-volume LV blood count
    det = jacobian_determinant(u)[:, 0].numpy()  # (K, I, J, K)
    w = invert(u)  # forward map ES → ED: p + w(p)
    out = []
    for i in range(u.shape[0]):
        edv = float(edvs[i])
        w_ends = _sample(w[i], ends)
        length_ed = abs(float(((ends[1] + w_ends[1]) - (ends[0] + w_ends[0])) @ axis))
        myo = ed_labels[i] == LV_MYO
        out.append(Physiology(
            ef=1.0 - esv / edv if edv > 0 else float("nan"),
            longitudinal_shortening=1.0 - length_es / length_ed if length_ed > 0 else float("nan"),
            myo_volume_change=float(det[i][myo].mean()) - 1.0 if myo.any() else float("nan"),
            edv_ml=edv * voxel_ml, esv_ml=esv * voxel_ml))
    return out


def _sample(field: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of a field (3, I, J, K) at voxel coordinates ``points`` (P, 3) → (P, 3)."""
    from scipy.ndimage import map_coordinates

    f = field.numpy()
    return np.stack([map_coordinates(f[c], points.T, order=1, mode="nearest") for c in range(3)], axis=1)


def cohort_ejection_fractions(prepared_dir) -> list[float]:
    """EF of every prepared scan that carries ES labels and an exact truth flow (phantoms),
    measured as :func:`physiology` measures samples (reads only those two files per scan)."""
    from pathlib import Path

    import nibabel as nib

    from ..data.table import read_scan_table
    from ..flow.io import read_flow

    d = Path(prepared_dir)
    out = []
    for row in read_scan_table(d).to_dict("records"):
        lab_rel, truth_rel = row.get("es_labels_path"), row.get("truth_flow_path")
        if isinstance(lab_rel, str) and lab_rel and isinstance(truth_rel, str) and truth_rel:
            lab = np.asarray(nib.load(str(d / lab_rel)).dataobj, dtype=np.uint8)
            out.append(ejection_fraction(lab, read_flow(d / truth_rel)[0]))
    return out


def summarize_physiology(items: list[Physiology]) -> dict[str, float]:
    """Mean, std, min and max of each index over samples (keys ``<index>_mean`` …)."""
    out: dict[str, float] = {}
    for key in ("ef", "longitudinal_shortening", "myo_volume_change"):
        v = np.asarray([getattr(p, key) for p in items], dtype=np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        out.update({f"{key}_mean": float(v.mean()), f"{key}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    f"{key}_min": float(v.min()), f"{key}_max": float(v.max())})
    return out


__all__ = ["LV_BLOOD", "LV_MYO", "Physiology", "cohort_ejection_fractions", "ejection_fraction", "long_axis", "physiology", "summarize_physiology",
           "synthetic_ed_labels"]
