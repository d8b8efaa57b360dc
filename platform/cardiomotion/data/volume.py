"""One 3-D CT frame from any supported format, as one small interface (array + geometry).

``generate --frames`` conditions a trained model on single-phase scans: a 3-D NIfTI file, an NRRD
or MetaImage file, a folder holding one DICOM series, or one multi-frame DICOM file. Each reader
returns the voxels in canonical RAS+ order (float32 HU) with their affine; :func:`read_volume`
picks the reader by the path. Orientation is handled by :mod:`cardiomotion.orientation` inside each
reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from ..errors import InputError
from .scan import image_file_kind


class VolumeFormat(str, Enum):
    """On-disk formats of a single 3-D frame."""

    NIFTI = "nifti"
    NRRD = "nrrd"
    METAIMAGE = "metaimage"
    DICOM = "dicom"  # a folder holding exactly one series, or one multi-frame file


@dataclass(frozen=True)
class Volume:
    """A 3-D frame.

    Attributes:
        frame_id: the file name without extensions, or the folder's name.
        source: the path it was read from.
        format: which reader read it.
        array: (I, J, K) float32 HU, canonical RAS+ order.
        affine: 4×4 voxel→RAS-mm affine of ``array``.
        original_affine: the affine as stored on disk (before reorientation).
        left_out: what the reader found beside the frame and did not use, one line each (a
            DICOM folder's dose report, second copies of its images).
        notes: anything else the reader wants told, one line each (a file that does not say its
            orientation, read with its library's assumed one), as :attr:`Scan.notes`.
    """

    frame_id: str
    source: Path
    format: VolumeFormat
    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    left_out: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def volume_format(path: str | Path) -> VolumeFormat:
    """The format of a frame path, from its name (or a folder: DICOM).

    Raises:
        InputError: the path does not exist or has no supported extension.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        return VolumeFormat.DICOM
    kind = image_file_kind(path)
    if kind is not None:
        return VolumeFormat(kind)
    from .dicom import looks_like_dicom

    if looks_like_dicom(path):  # one multi-frame file (read_dicom_volume refuses a single slice)
        return VolumeFormat.DICOM
    raise InputError(path, "not a 3-D frame: expected NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage "
                           "(.mha, .mhd), a folder holding one DICOM series or a multi-frame DICOM file")


def frame_id_of(path: str | Path) -> str:
    """``a/p12.nii.gz`` → ``p12``; ``a/p12.seq.nrrd`` → ``p12``; a folder → its name; any other
    name whole. Unlike :func:`~cardiomotion.data.scan.scan_id_of`, which cuts an unknown name
    other than a UID at its first dot: a frames folder keeps the ids it was prepared with."""
    path = Path(path)
    if path.is_dir():
        return path.name
    name = path.name
    for suf in (".nii.gz", ".seq.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _read_nifti(path: Path, notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ..orientation import to_canonical
    from .nifti import load_nifti, orientation_note, orientation_unknown, read_nifti_data

    img = load_nifti(path)
    if orientation_unknown(img):
        notes.append(orientation_note(path.name))
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"{len(img.shape)}-D image of shape {img.shape}: expected one 3-D frame")
    vol = read_nifti_data(path, img, (0,) if len(img.shape) == 4 else ())
    original = np.asarray(img.affine, dtype=float)
    canon, affine = to_canonical(vol, original)
    return np.ascontiguousarray(canon), affine, original


def read_volume(path: str | Path) -> Volume:
    """Read one 3-D frame (NIfTI, NRRD, MetaImage, a one-series DICOM folder or a multi-frame
    DICOM file).

    Raises:
        InputError: one line naming the file and the problem (unreadable, not 3-D, no
            orientation, NaN/inf voxels).
    """
    from .dicom import read_dicom_volume
    from .metaimage import orientation_notes, read_metaimage_volume
    from .nrrd import read_nrrd_volume

    path = Path(path)
    fmt = volume_format(path)
    left_out: list[str] = []
    notes: list[str] = []
    reader = {VolumeFormat.NIFTI: lambda p: _read_nifti(p, notes), VolumeFormat.NRRD: read_nrrd_volume,
              VolumeFormat.METAIMAGE: read_metaimage_volume,
              VolumeFormat.DICOM: lambda p: read_dicom_volume(p, left_out)}[fmt]
    array, affine, original = reader(path)
    if fmt is VolumeFormat.METAIMAGE:
        notes += orientation_notes(path)
    if not np.all(np.isfinite(array)):
        raise InputError(path, "holds NaN or inf values")
    return Volume(frame_id_of(path), path, fmt, np.asarray(array, dtype=np.float32), affine, original,
                  tuple(left_out), tuple(notes))
