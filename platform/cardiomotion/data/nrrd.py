"""NRRD readers (3D Slicer's format): ``.nrrd``, detached-header ``.nhdr`` and 4-D sequences ``.seq.nrrd``.

Read with pynrrd (a maintained, pure-Python implementation of the NRRD spec: attached and
detached headers, raw/gzip/bzip2 encodings, every field Slicer writes). Geometry comes from the
header alone:

* ``space:`` names the world space — Slicer writes ``left-posterior-superior`` (LPS), others
  ``right-anterior-superior``; :func:`cardiomotion.orientation.space_to_ras` turns it into RAS;
* ``space directions:`` gives each spatial axis' step vector in that space (a column of the
  voxel→world matrix: spacing and direction together, oblique allowed), ``none`` for a
  non-spatial axis; ``space origin:`` the world position of voxel (0, 0, 0).

A 4DCT is one file with three spatial axes and one non-spatial axis of ``kinds`` ``list``,
``time`` or ``domain`` (Slicer's sequences put it first: ``list``), each index along it one
phase; a 3-D file is one volume (:func:`read_nrrd_volume`, for a single ES frame). Arrays come
back in canonical RAS+ order (:func:`cardiomotion.orientation.to_canonical`) as float32; NRRD has
no rescale slope, so stored values are taken as HU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..orientation import canonical_grid, space_to_ras, to_canonical
from .scan import Scan, ScanFormat, register_reader, scan_id_of

NRRD_SUFFIXES = (".nrrd", ".nhdr")
_PHASE_KINDS = ("list", "time", "domain", "point", "vector")  # a non-spatial axis that indexes phases


def is_nrrd(path: Path) -> bool:
    return Path(path).name.lower().endswith(NRRD_SUFFIXES)


@dataclass(frozen=True)
class NrrdGeometry:
    """What an NRRD header says about its grid.

    Attributes:
        spatial_axes: indices (in file axis order) of the three spatial axes.
        phase_axis: index of the non-spatial axis, or None for a 3-D volume.
        shape: sizes of the spatial axes (file order).
        affine: 4×4 voxel→RAS-mm affine of the spatial axes (file order, before canonical reordering).
    """

    spatial_axes: tuple[int, int, int]
    phase_axis: int | None
    shape: tuple[int, int, int]
    affine: np.ndarray
    n_phases: int


def _header(path: Path) -> dict:
    import nrrd

    try:
        return nrrd.read_header(str(path))
    except Exception as exc:  # pynrrd raises NRRDError, OSError, ValueError, UnicodeDecodeError …
        raise InputError(path, f"not a readable NRRD header ({exc.__class__.__name__}: {exc})") from None


def nrrd_geometry(path: Path, header: dict) -> NrrdGeometry:
    """The grid of an NRRD header (3 spatial axes, at most one non-spatial axis).

    Raises:
        InputError: no anatomical ``space``, missing/degenerate ``space directions``, or a
        dimension other than 3 or 4.
    """
    dim = int(header.get("dimension", 0))
    sizes = [int(s) for s in np.atleast_1d(header.get("sizes", []))]
    if dim not in (3, 4) or len(sizes) != dim:
        raise InputError(path, f"{dim}-D NRRD of sizes {sizes}: expected a 3-D volume or a 4-D sequence")
    space = header.get("space")
    if space is None:
        raise InputError(path, "no 'space' field: the NRRD has no anatomical orientation (expected e.g. "
                               "'space: left-posterior-superior', as 3D Slicer writes)")
    dirs = header.get("space directions")
    if dirs is None:
        raise InputError(path, "no 'space directions' field: voxel size and orientation are unknown")
    dirs = np.asarray(dirs, dtype=float)
    if dirs.shape != (dim, 3):
        raise InputError(path, f"'space directions' has shape {dirs.shape}, expected {dim} vectors of 3")
    spatial = [a for a in range(dim) if np.all(np.isfinite(dirs[a]))]
    other = [a for a in range(dim) if a not in spatial]
    if len(spatial) != 3:
        raise InputError(path, f"{len(spatial)} spatial axes in 'space directions' (expected 3; "
                               "'none' marks the sequence axis)")
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * dim)]
    if other and kinds[other[0]] not in _PHASE_KINDS:
        raise InputError(path, f"axis {other[0]} has kind {kinds[other[0]]!r}: a 4DCT sequence axis is "
                               f"one of {', '.join(_PHASE_KINDS)}")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise InputError(path, f"'space origin' {origin.tolist()} is not a finite 3-vector")
    affine_space = np.eye(4)
    affine_space[:3, :3] = dirs[spatial].T  # columns: world step of each spatial axis
    affine_space[:3, 3] = origin
    if abs(np.linalg.det(affine_space[:3, :3])) < 1e-12:
        raise InputError(path, "degenerate 'space directions' (zero voxel size or parallel axes)")
    try:
        affine = space_to_ras(affine_space, space)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    return NrrdGeometry(tuple(spatial), other[0] if other else None,  # type: ignore[arg-type]
                        tuple(sizes[a] for a in spatial), affine,  # type: ignore[arg-type]
                        sizes[other[0]] if other else 1)


def _load(path: Path) -> np.ndarray:
    import nrrd

    try:
        data, _ = nrrd.read(str(path), index_order="F")  # axis order of the header ("sizes")
    except Exception as exc:
        raise InputError(path, f"truncated or corrupt NRRD data ({exc.__class__.__name__}: {exc})") from None
    return data


def _spatial_first(data: np.ndarray, geom: NrrdGeometry) -> np.ndarray:
    """Data with the three spatial axes first (file order), then the phase axis if any."""
    order = list(geom.spatial_axes) + ([geom.phase_axis] if geom.phase_axis is not None else [])
    return np.transpose(data, order)


@register_reader(ScanFormat.NRRD)
def read_nrrd_scan(path: Path) -> Scan:
    """A 4DCT from a 4-D NRRD (Slicer ``.seq.nrrd``, or any ``.nrrd``/``.nhdr`` with one non-spatial axis).

    Headers are read eagerly; the voxels are read once, on the first phase asked for (NRRD data
    is one stream), and kept for the other phases.

    Raises:
        InputError: unreadable header or data, no orientation, a 3-D file, fewer than 2 phases.
    """
    path = Path(path)
    geom = nrrd_geometry(path, _header(path))
    if geom.phase_axis is None:
        raise InputError(path, "3-D NRRD: a 4DCT needs a 4-D sequence (e.g. 3D Slicer's .seq.nrrd) or a "
                               "folder of per-phase files")
    canon_shape, canon_affine = canonical_grid(geom.shape, geom.affine)
    cache: dict[str, np.ndarray] = {}

    def load_phase(t: int) -> np.ndarray:
        if "data" not in cache:
            cache["data"] = _spatial_first(_load(path), geom)
        vol = np.asarray(cache["data"][..., int(t)], dtype=np.float32)
        return np.ascontiguousarray(to_canonical(vol, geom.affine)[0])

    return Scan(scan_id=nrrd_scan_id(path), source=path, format=ScanFormat.NRRD, affine=canon_affine,
                original_affine=geom.affine, shape=canon_shape, n_phases=geom.n_phases, load_phase=load_phase)


def read_nrrd_volume(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3-D NRRD volume: (float32 array (I, J, K) in canonical RAS order, its affine, the original affine).

    Raises:
        InputError: unreadable, no orientation, or not 3-D.
    """
    path = Path(path)
    geom = nrrd_geometry(path, _header(path))
    if geom.phase_axis is not None:
        raise InputError(path, f"4-D NRRD ({geom.n_phases} along axis {geom.phase_axis}): expected one 3-D frame")
    vol = np.asarray(_spatial_first(_load(path), geom), dtype=np.float32)
    canon, affine = to_canonical(vol, geom.affine)
    return np.ascontiguousarray(canon), affine, geom.affine


def nrrd_scan_id(path: Path) -> str:
    """``patient7.seq.nrrd`` → ``patient7``; ``a.nhdr`` → ``a``."""
    name = Path(path).name
    for suf in (".seq.nrrd", ".nrrd", ".seq.nhdr", ".nhdr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return scan_id_of(path)
