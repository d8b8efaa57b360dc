"""MetaImage readers (ITK's format): ``.mha`` (one file) and ``.mhd`` (header + raw data file).

Read with SimpleITK (ITK's own MetaImage IO, already the project's dependency for the demons
baseline and the warp cross-check). ITK's world is LPS: the header's ``Offset`` (origin),
``ElementSpacing`` and ``TransformMatrix`` (direction cosines, one column per axis) give a
voxel→LPS affine, turned into RAS with :func:`cardiomotion.orientation.lps_to_ras`.
``AnatomicalOrientation`` is informational in ITK and ignored here too. A header without
``TransformMatrix`` is read as ITK reads it (identity directions), with a note in ``Scan.notes``.

A 4DCT is a 4-D image whose fourth axis is the phase (its direction must not mix with space);
a 3-D image is one volume (:func:`read_metaimage_volume`). Arrays come back in canonical RAS+
order as float32; stored values are taken as HU (MetaImage has no rescale slope).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..orientation import canonical_grid, lps_to_ras, to_canonical
from .scan import Scan, ScanFormat, register_reader

METAIMAGE_SUFFIXES = (".mha", ".mhd")


def is_metaimage(path: Path) -> bool:
    return Path(path).name.lower().endswith(METAIMAGE_SUFFIXES)


def _info(path: Path):
    """SimpleITK reader with the header read (no voxels)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("MetaImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"not a readable MetaImage header ({_first_line(exc)})") from None
    return reader


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Description:" in ln or "ERROR" in ln.upper()]
    return (useful or lines or [exc.__class__.__name__])[-1][:200]


#: MetaIO's names for the direction cosines; it reads field names case-sensitively
_DIRECTION_FIELDS = ("TransformMatrix", "Rotation", "Orientation")


def header_fields(path: Path) -> set[str]:
    """Names of the fields of a MetaImage's text header (the lines before ``ElementDataFile``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise InputError(path, f"cannot read the MetaImage header ({exc.strerror or exc})") from None
    text = head.split(b"ElementDataFile", 1)[0].decode("latin-1")
    return {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line}


def orientation_notes(path: Path) -> list[str]:
    """A note when the header has no ``TransformMatrix`` (nor its synonyms): ITK then assumes
    identity directions (the axes along L, P, S) and ignores ``AnatomicalOrientation``."""
    fields = header_fields(path)
    if any(f in fields for f in _DIRECTION_FIELDS):
        return []
    ignored = " (its AnatomicalOrientation ignored, as ITK does)" if "AnatomicalOrientation" in fields else ""
    return [f"{path.name}: MetaImage has no TransformMatrix: orientation unknown, read as ITK's default "
            f"(axes along L, P, S){ignored}; check left/right and head/foot"]


def metaimage_affine(path: Path, size, spacing, origin, direction) -> np.ndarray:
    """4×4 voxel→RAS affine of the first three axes of a MetaImage header.

    Raises:
        InputError: a degenerate grid, or a 4th axis whose direction mixes with space.
    """
    dim = len(size)
    d = np.asarray(direction, dtype=float).reshape(dim, dim)
    if dim == 4 and (not np.allclose(d[:3, 3], 0, atol=1e-6) or not np.allclose(d[3, :3], 0, atol=1e-6)):
        raise InputError(path, "the 4th (phase) axis' direction mixes with space: expected a block-diagonal "
                               "TransformMatrix")
    lps = np.eye(4)
    lps[:3, :3] = d[:3, :3] @ np.diag(np.asarray(spacing, dtype=float)[:3])
    lps[:3, 3] = np.asarray(origin, dtype=float)[:3]
    if not np.all(np.isfinite(lps)) or abs(np.linalg.det(lps[:3, :3])) < 1e-12:
        raise InputError(path, "degenerate geometry (zero or non-finite ElementSpacing / TransformMatrix)")
    return lps_to_ras(lps)


def _voxels(path: Path) -> np.ndarray:
    """All voxels, axes in header order (x fastest first): (I, J, K) or (I, J, K, T)."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path), imageIO="MetaImageIO")
    except RuntimeError as exc:
        raise InputError(path, f"truncated or corrupt MetaImage data ({_first_line(exc)})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{img.GetNumberOfComponentsPerPixel()} components per voxel: expected a "
                               "scalar CT image")
    arr = sitk.GetArrayFromImage(img)  # numpy order: slowest axis first
    return np.transpose(arr, tuple(range(arr.ndim - 1, -1, -1)))


@register_reader(ScanFormat.METAIMAGE)
def read_metaimage_scan(path: Path) -> Scan:
    """A 4DCT from a 4-D MetaImage (I, J, K, T). The voxels are read once, on the first phase
    asked for, and kept for the others.

    Raises:
        InputError: unreadable header or data, a 3-D image, fewer than 2 phases, bad geometry.
    """
    path = Path(path)
    r = _info(path)
    size = r.GetSize()
    if len(size) != 4:
        raise InputError(path, f"{len(size)}-D MetaImage of size {list(size)}: a 4DCT needs a 4-D image "
                               "(the 4th axis the phase) or a folder of per-phase files")
    if r.GetNumberOfComponents() != 1:
        raise InputError(path, f"{r.GetNumberOfComponents()} components per voxel: expected a scalar CT image")
    affine = metaimage_affine(path, size, r.GetSpacing(), r.GetOrigin(), r.GetDirection())
    canon_shape, canon_affine = canonical_grid(tuple(size[:3]), affine)
    cache: dict[str, np.ndarray] = {}

    def load_phase(t: int) -> np.ndarray:
        if "data" not in cache:
            cache["data"] = _voxels(path)
        vol = np.asarray(cache["data"][..., int(t)], dtype=np.float32)
        return np.ascontiguousarray(to_canonical(vol, affine)[0])

    return Scan(scan_id=metaimage_scan_id(path), source=path, format=ScanFormat.METAIMAGE, affine=canon_affine,
                original_affine=affine, shape=canon_shape, n_phases=int(size[3]), load_phase=load_phase,
                notes=orientation_notes(path))


def read_metaimage_volume(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3-D MetaImage: (float32 (I, J, K) in canonical RAS order, its affine, the original affine).

    Raises:
        InputError: unreadable, bad geometry, or not 3-D.
    """
    path = Path(path)
    r = _info(path)
    size = r.GetSize()
    if len(size) != 3:
        raise InputError(path, f"{len(size)}-D MetaImage of size {list(size)}: expected one 3-D frame")
    affine = metaimage_affine(path, size, r.GetSpacing(), r.GetOrigin(), r.GetDirection())
    vol = np.asarray(_voxels(path), dtype=np.float32)
    canon, canon_affine = to_canonical(vol, affine)
    return np.ascontiguousarray(canon), canon_affine, affine


def metaimage_scan_id(path: Path) -> str:
    name = Path(path).name
    for suf in METAIMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name
