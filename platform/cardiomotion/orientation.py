"""The one module that owns orientation and unit conversions.

Conventions (pinned by tests):

* Volumes live in canonical RAS+ voxel order: increasing array index 0, 1, 2 moves towards
  world +x, +y, +z, which RAS+ labels R, A, S: ``nib.aff2axcodes(affine) == ('R', 'A', 'S')``.
* World coordinates are RAS millimetres (NIfTI). DICOM/ITK use LPS; convert with
  :func:`lps_to_ras` / :func:`ras_to_lps`.
* A flow in memory has shape (3, I, J, K) (or (B, 3, I, J, K)), in voxels of its grid,
  channel c = displacement along array axis c. On disk it is RAS millimetres:
  ``u_mm = A[:3, :3] @ u_vox``.
"""
from __future__ import annotations

import numpy as np
import nibabel as nib
from nibabel import orientations as nio

RAS = ("R", "A", "S")
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Axis codes of a voxel-to-world affine, e.g. ('L', 'A', 'S')."""
    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=float)))  # type: ignore[return-value]


def spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (column norms of the 3×3 part), shape (3,)."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Turn a voxel→LPS-world affine (DICOM/ITK) into a voxel→RAS-world affine (NIfTI)."""
    return _LPS_FLIP @ np.asarray(affine_lps, dtype=float)


ras_to_lps = lps_to_ras  # the flip is its own inverse

# Anatomical world spaces of NRRD headers (``space:``), as the sign of each world axis relative to RAS.
_SPACE_SIGNS = {"right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
                "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
                "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}


def space_to_ras(affine: np.ndarray, space: str) -> np.ndarray:
    """Turn a voxel→world affine in a named anatomical ``space`` (NRRD ``space:``: e.g.
    ``left-posterior-superior``, 3D Slicer's default, or ``right-anterior-superior``) into a
    voxel→RAS-world affine.

    Raises:
        ValueError: a space that is not one of RAS, LPS, LAS (their long or short names).
    """
    signs = _SPACE_SIGNS.get(str(space).strip().lower())
    if signs is None:
        raise ValueError(f"unsupported world space {space!r} (expected one of right-anterior-superior, "
                         "left-posterior-superior, left-anterior-superior)")
    return np.diag([*map(float, signs), 1.0]) @ np.asarray(affine, dtype=float)


def _to_ras_transform(affine: np.ndarray) -> np.ndarray:
    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(RAS))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the first three axes of ``array`` to RAS+ (closest canonical).

    Args:
        array: (I, J, K, ...) voxel data; trailing axes (phases, channels) are carried along.
        affine: 4×4 voxel→RAS-mm affine of ``array``.

    Returns:
        (array in RAS voxel order (a view where possible), its 4×4 affine). The world position
        of every voxel is unchanged; only the storage order changes.
    """
    affine = np.asarray(affine, dtype=float)
    transform = _to_ras_transform(affine)
    if np.array_equal(transform, nio.axcodes2ornt(RAS)):
        return array, affine.copy()
    out = nio.apply_orientation(array, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, array.shape[:3])
    return out, new_affine


def canonical_grid(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """Canonical (RAS+) 3-D shape and 4×4 affine of a grid, without touching voxel data."""
    dummy = np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(shape[:3]))
    out, new_affine = to_canonical(dummy, affine)
    return tuple(int(n) for n in out.shape), new_affine  # type: ignore[return-value]


def flow_vox_to_mm(flow: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel-unit flow (3, ...) → RAS-mm flow (3, ...): ``u_mm = A[:3,:3] @ u_vox``."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.einsum("ij,j...->i...", a, flow).astype(flow.dtype, copy=False)


def flow_mm_to_vox(flow_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS-mm flow (3, ...) → voxel-unit flow (3, ...) of the grid with this affine."""
    a_inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.einsum("ij,j...->i...", a_inv, flow_mm).astype(flow_mm.dtype, copy=False)


def flow_to_canonical(flow: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a voxel-unit flow (3, I, J, K) and its grid to RAS+.

    ``nib.as_closest_canonical`` permutes and flips the array but cannot rotate the vectors;
    here the vectors go through world millimetres (orientation-free) and back, so the
    displacement of every world point is preserved.
    """
    flow_mm = flow_vox_to_mm(flow, affine)
    moved, new_affine = to_canonical(np.moveaxis(flow_mm, 0, -1), affine)
    return flow_mm_to_vox(np.ascontiguousarray(np.moveaxis(moved, -1, 0)), new_affine), new_affine
