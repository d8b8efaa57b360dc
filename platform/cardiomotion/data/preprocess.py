"""Resampling to the common isotropic grid, centred on the heart.

Every prepared frame lives on the same kind of grid: ``grid`` voxels of ``spacing`` mm, axes
aligned with RAS (affine ``diag(s, s, s)``), centred on the heart. ES and ED of one scan share
the same grid (one world box), so a flow between them needs no extra alignment. Resampling goes
straight from the scan's voxels to the output grid (one interpolation), with a Gaussian
anti-aliasing prefilter along axes that are downsampled.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..orientation import flow_mm_to_vox, flow_vox_to_mm, spacing as voxel_spacing
from .phases import blood_centroid


def grid_affine(center_mm: np.ndarray, grid: tuple[int, int, int], spacing_mm: float) -> np.ndarray:
    """RAS affine (diag(s, s, s)) of a ``grid`` whose centre sits at world ``center_mm``."""
    aff = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    aff[:3, 3] = np.asarray(center_mm, float) - spacing_mm * (np.asarray(grid, float) - 1) / 2.0
    return aff


def heart_center(vol: np.ndarray, affine: np.ndarray, blood_hu: tuple[float, float], mode: str = "heart") -> np.ndarray:
    """World position (mm, (3,)) to centre the crop on.

    ``heart``: centroid of the largest contrast-enhanced blood component (falls back to the
    volume centre when the scan has no voxel in ``blood_hu``); ``volume``: the volume centre.
    """
    idx = None
    if mode == "heart":
        idx = blood_centroid(vol, voxel_spacing(affine), blood_hu)
    if idx is None:
        idx = (np.asarray(vol.shape[:3], float) - 1) / 2.0
    return affine[:3, :3] @ idx + affine[:3, 3]


def _sample_coords(affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    vox = np.linalg.inv(affine) @ out_affine
    ijk = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in out_shape), indexing="ij"), 0)
    return np.einsum("ij,j...->i...", vox[:3, :3], ijk) + vox[:3, 3, None, None, None]


def _antialias_sigma(affine: np.ndarray, out_affine: np.ndarray) -> np.ndarray:
    ratio = voxel_spacing(out_affine).min() / voxel_spacing(affine)
    return np.where(ratio > 1.0, 0.5 * np.sqrt(np.maximum(ratio**2 - 1.0, 0.0)), 0.0)


def resample(
    vol: np.ndarray,
    affine: np.ndarray,
    out_affine: np.ndarray,
    out_shape: tuple[int, int, int],
    *,
    order: int = 1,
    cval: float = -1000.0,
    antialias: bool = True,
) -> np.ndarray:
    """Sample ``vol`` (I, J, K) with voxel→world ``affine`` on the grid (``out_affine``, ``out_shape``).

    Points outside the scan get ``cval`` (HU of air by default). ``order``: 0 nearest (labels),
    1 trilinear, 3 cubic. Returns float32 (or the input dtype for order 0).
    """
    src = vol
    if antialias and order > 0:
        sigma = _antialias_sigma(affine, out_affine)
        if np.any(sigma > 0):
            src = ndimage.gaussian_filter(vol.astype(np.float32), sigma=sigma, mode="nearest")
    coords = _sample_coords(affine, out_affine, out_shape)
    out = ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=cval, prefilter=order > 1)
    return out if order == 0 else out.astype(np.float32)


def resample_flow(
    flow_vox: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int]
) -> np.ndarray:
    """Carry a pull flow (3, I, J, K), voxels of ``affine``'s grid, onto another grid of the same frame.

    The displacement of every world point is kept (interpolated in mm, then expressed in the
    output grid's voxels), so ED_out(x) = ES_out(x + u_out(x)) when ES and ED are resampled onto
    the same output grid. Points outside the source grid take the nearest edge value.
    """
    mm = flow_vox_to_mm(flow_vox.astype(np.float64), affine)
    coords = _sample_coords(affine, out_affine, out_shape)
    out_mm = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in mm], 0)
    return flow_mm_to_vox(out_mm, out_affine).astype(np.float32)
