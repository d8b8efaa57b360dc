"""Where the refinement may move tissue: a soft region around the contrast-enhanced heart.

The refinement's correction is Gaussian-filtered with σ in voxels *of each level*, so at the
coarse levels one step of it spans nearly the whole volume; where the intensity window leaves the
tissue without texture (lung and air both clip to 0) nothing in the image term holds it still,
and the heart's motion is carried there (README, "Where the annotations' whole-grid error
lives": 6.7× the truth's motion > 30 mm from the heart). Within one cardiac acquisition the body
does not move between phases; what moves is the heart and what touches it. The support confines
the correction to that region without a segmentation: the contrast-enhanced blood pool (the
voxels in ``prepare.blood_hu`` — the same intensity assumption ``prepare`` centres the crop and
detects ES/ED with), grown by a margin in millimetres that has to cover the walls and what moves
with them, then faded to zero over half as far again.

    weight(d) = 1                                   d ≤ margin
              = ½ (1 + cos(π (d − margin) / taper)) margin < d < margin + taper,  taper = margin / 2
              = 0                                   beyond

with ``d`` the distance (mm) to the blood pool of ES or ED (their union: the pull field lives on
the ED grid and points into ES).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: the taper's length as a share of the margin
TAPER_SHARE = 0.5


def blood_pool(volume_hu: np.ndarray, blood_hu: tuple[float, float]) -> np.ndarray:
    """The largest face-connected component of the voxels whose HU lies in ``blood_hu``.

    Args:
        volume_hu: (I, J, K) HU.
        blood_hu: (low, high) HU of contrast-enhanced blood.

    Returns:
        (I, J, K) bool; all False when no voxel lies in the range.
    """
    mask = (volume_hu >= blood_hu[0]) & (volume_hu <= blood_hu[1])
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def support_weight(distance_mm: np.ndarray, margin_mm: float) -> np.ndarray:
    """The support's weight at each distance (mm) from the blood pool (module docstring), float32."""
    if margin_mm <= 0:
        raise ValueError(f"the support's margin must be positive, got {margin_mm} mm")
    taper = TAPER_SHARE * margin_mm
    t = np.clip((np.asarray(distance_mm, dtype=np.float64) - margin_mm) / taper, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def motion_support(es_hu: np.ndarray, ed_hu: np.ndarray, spacing_mm: float | tuple[float, float, float],
                   blood_hu: tuple[float, float], margin_mm: float) -> np.ndarray | None:
    """The refinement's support for one pair: weight in [0, 1] per voxel of the ED grid.

    Args:
        es_hu, ed_hu: (I, J, K) HU on the same grid.
        spacing_mm: voxel size (mm), one value or one per axis.
        blood_hu: (low, high) HU of contrast-enhanced blood.
        margin_mm: distance from the blood pool within which the correction is free (> 0).

    Returns:
        (I, J, K) float32, or None when neither frame has a voxel in ``blood_hu`` (no heart to
        confine the motion to: the caller refines over the whole volume).
    """
    if es_hu.shape != ed_hu.shape:
        raise ValueError(f"ES {es_hu.shape} and ED {ed_hu.shape} must share one grid")
    pool = blood_pool(es_hu, blood_hu) | blood_pool(ed_hu, blood_hu)
    if not pool.any():
        return None
    distance = ndimage.distance_transform_edt(~pool, sampling=spacing_mm)
    return support_weight(distance, margin_mm)
