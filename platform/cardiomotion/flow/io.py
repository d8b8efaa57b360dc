"""Flow files: NIfTI, 5-D (I, J, K, 1, 3) float32, intent NIFTI_INTENT_DISPVECT (1006).

Vectors on disk are RAS millimetres (``u_mm = A[:3,:3] @ u_vox``); the grid's affine is stored
as sform and qform. ITK ≥ 5.3.1, SimpleITK and 3D Slicer read such a file as a displacement
field transform. In memory a flow is (3, I, J, K) in voxels of that grid (pull convention).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..fileio import write_nifti
from ..orientation import flow_mm_to_vox, flow_vox_to_mm

NIFTI_INTENT_DISPVECT = 1006


def write_flow(path: str | Path, flow_vox: np.ndarray, affine: np.ndarray) -> Path:
    """Write a voxel-unit pull flow (3, I, J, K) on the grid ``affine`` as a displacement file.

    The file appears atomically (written under a temporary name, then renamed).
    """
    flow_vox = np.asarray(flow_vox)
    if flow_vox.ndim != 4 or flow_vox.shape[0] != 3:
        raise ValueError(f"flow must be (3, I, J, K), got {flow_vox.shape}")
    if not np.all(np.isfinite(flow_vox)):
        raise ValueError("flow holds NaN or inf")
    mm = flow_vox_to_mm(flow_vox.astype(np.float64), affine).astype(np.float32)
    data = np.moveaxis(mm, 0, -1)[:, :, :, None, :]  # (I, J, K, 1, 3)
    return write_nifti(path, data, affine, intent=NIFTI_INTENT_DISPVECT)


def _open(path: Path):
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise InputError(path, "flow file does not exist") from None
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(path, f"not a readable NIfTI flow file ({exc.__class__.__name__}: {exc})") from None


def _check_header(path: Path, img) -> tuple[int, int, int]:
    intent = int(img.header["intent_code"])
    if intent != NIFTI_INTENT_DISPVECT:
        raise InputError(path, f"flow file has intent code {intent}, expected {NIFTI_INTENT_DISPVECT} (displacement vector)")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 5 or shape[3] != 1 or shape[4] != 3:
        raise InputError(path, f"flow file has shape {shape}, expected (I, J, K, 1, 3)")
    return shape[:3]


def check_flow_header(path: str | Path) -> tuple[int, int, int]:
    """Check a displacement file's header only (cheap: no voxel data is read).

    Returns:
        the grid (I, J, K).

    Raises:
        InputError: missing, not a NIfTI file, wrong shape or intent.
    """
    path = Path(path)
    return _check_header(path, _open(path))


def read_flow(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a displacement file written by :func:`write_flow` (or ITK/Slicer).

    Returns:
        (flow (3, I, J, K) float32 in voxels of the file's grid, 4×4 affine).

    Raises:
        InputError: not a NIfTI file, wrong shape or intent, non-finite values.
    """
    path = Path(path)
    img = _open(path)
    _check_header(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated or corrupt voxel data
        raise InputError(path, f"not a readable NIfTI flow file ({exc.__class__.__name__}: {exc})") from None
    if not np.all(np.isfinite(data)):
        raise InputError(path, "flow file holds NaN or inf")
    affine = img.affine
    mm = np.moveaxis(data[:, :, :, 0, :].astype(np.float64), -1, 0)
    return flow_mm_to_vox(mm, affine).astype(np.float32), affine
