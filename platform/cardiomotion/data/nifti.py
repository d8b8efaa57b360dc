"""NIfTI 4DCT readers: one 4-D (I, J, K, T) file, or a folder of 3-D files, one per phase.

Headers are read and validated eagerly (shape, affine, truncation); voxels are read one phase at
a time. Every phase comes back as float32 HU (scl_slope/scl_inter applied as nibabel does),
shape (I, J, K), in canonical RAS+ voxel order (:func:`cardiomotion.orientation.to_canonical`).
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from ..errors import InputError
from ..orientation import canonical_grid, to_canonical
from .scan import Scan, ScanFormat, is_nifti, natural_key, register_reader, scan_id_of

# What nibabel/gzip/numpy raise on a corrupt, truncated or non-NIfTI file.
NIBABEL_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error,
                  struct.error, MemoryError)

_AFFINE_ATOL = 1e-3  # mm: per-phase files must share their grid to this tolerance


def load_nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load`` with a truncation check; any failure becomes an InputError naming ``path``.

    The check is cheap: an uncompressed file must be at least header + data long; a gzip file's
    trailer records its uncompressed size (mod 2**32), and only when that disagrees with the
    header is the stream decompressed once to confirm.
    """
    try:
        img = _nib_load(path)
    except NIBABEL_ERRORS as exc:
        raise InputError(path, f"not a readable NIfTI file ({_describe(exc)})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    header = img.header
    try:
        n_bytes = int(np.prod(img.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
        expected = int(getattr(img.dataobj, "offset", header.get_data_offset())) + n_bytes
        _check_length(path, expected)
    except InputError:
        raise
    except NIBABEL_ERRORS as exc:
        raise InputError(path, f"truncated or corrupt NIfTI file ({_describe(exc)})") from exc
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "degenerate affine (zero or non-finite voxel size / direction)")
    return img


def _nib_load(path: Path):
    """``nib.load(path)``, reading the file of that very name when its ``.nii`` is of mixed case.

    nibabel rebuilds the name from its suffix, in lower case unless the suffix is all upper case,
    so for ``case.Nii.gz`` it looks for ``case.nii.gz``. Such a file is opened as named, by the
    class its header sniffs as (NIfTI-1 or NIfTI-2).
    """
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    ext = name[-4:]
    if ext in (ext.lower(), ext.upper()):
        return nib.load(str(path))
    with ImageOpener(str(path)) as fh:  # gzip or not, by the suffix in any case
        sniff = fh.read(540)
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        if klass.header_class.may_contain_header(sniff):
            return klass.from_file_map({"image": nib.FileHolder(filename=str(path))})
    raise ImageFileError("no NIfTI-1 or NIfTI-2 header")


def orientation_unknown(img: nib.Nifti1Image) -> bool:
    """True when the header states no orientation: qform_code and sform_code both 0."""
    return int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0


def orientation_note(names: str) -> str:
    """The note on NIfTI file(s) ``names`` that state no orientation (:func:`orientation_unknown`)."""
    return (f"{names}: NIfTI qform_code and sform_code are both 0: orientation unknown, read as nibabel's "
            "fallback (voxel sizes along -x,+y,+z, centred on the volume); check left/right and head/foot")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_length(path: Path, expected: int) -> None:
    """Raise InputError if the file holds fewer than ``expected`` (uncompressed) bytes."""
    if not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        if size < expected:
            raise InputError(path, f"truncated NIfTI file: {size} bytes, header needs {expected}")
        return
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        isize = struct.unpack("<I", fh.read(4))[0]
    if isize == expected % 2**32:
        return
    # Trailer disagrees: truncated, multi-member or padded. Decompress once to know.
    total = 0
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            total += len(chunk)
    if total < expected:
        raise InputError(path, f"truncated NIfTI file: {total} bytes of data, header needs {expected}")


def read_nifti_data(path: Path, img: nib.Nifti1Image, index: tuple = ()) -> np.ndarray:
    """Voxels of ``img`` (optionally ``dataobj[(:, :, :) + index]``) as float32, scaled."""
    try:
        sl = (slice(None),) * 3 + index
        vol = np.asarray(img.dataobj[sl], dtype=np.float32)
    except NIBABEL_ERRORS as exc:
        raise InputError(path, f"truncated or corrupt NIfTI data ({_describe(exc)})") from exc
    return vol.reshape(vol.shape[:3])


@register_reader(ScanFormat.NIFTI_4D)
def read_nifti_4d(path: Path) -> Scan:
    """Read a single 4-D NIfTI (I, J, K, T) as a T-phase scan.

    Raises:
        InputError: unreadable/truncated file, not 4-D, or a single phase.
    """
    path = Path(path)
    img = load_nifti(path)
    shape = img.shape
    if len(shape) == 3:
        raise InputError(path, "3-D image: a 4DCT needs a 4-D (I,J,K,T) file or a folder of per-phase files")
    if len(shape) != 4:
        raise InputError(path, f"{len(shape)}-D image of shape {shape}: a 4DCT needs a 4-D (I,J,K,T) file")
    n_phases = int(shape[3])
    if n_phases < 2:
        raise InputError(path, f"single phase (shape {shape}): a 4DCT needs at least 2 phases along axis 3")
    original = np.asarray(img.affine, dtype=float)
    canon_shape, canon_affine = canonical_grid(shape, original)

    def load_phase(t: int) -> np.ndarray:
        vol = read_nifti_data(path, img, (int(t),))
        return np.ascontiguousarray(to_canonical(vol, original)[0])

    return Scan(scan_id=scan_id_of(path), source=path, format=ScanFormat.NIFTI_4D,
                affine=canon_affine, original_affine=original, shape=canon_shape,
                n_phases=n_phases, load_phase=load_phase,
                notes=[orientation_note(path.name)] if orientation_unknown(img) else [])


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _strip_nifti_suffix(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def phase_percents_from_names(names: list[str]) -> list[float] | None:
    """The last number in each file name (without .nii/.nii.gz) as % R-R, e.g. 'ct_40pct' → 40.

    None unless every name has one, all lie in [0, 100] and all differ.
    """
    values = []
    for name in names:
        found = _NUMBER.findall(_strip_nifti_suffix(name))
        if not found:
            return None
        values.append(float(found[-1]))
    if any(not 0 <= v <= 100 for v in values) or len(set(values)) != len(values):
        return None
    return values


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """3-D shape of a per-phase file; trailing singleton axes (I, J, K, 1) are accepted."""
    if len(shape) < 3:
        raise InputError(path, f"{len(shape)}-D image of shape {shape}: a phase must be a 3-D volume")
    extra = shape[3:]
    if any(n != 1 for n in extra):
        raise InputError(path, f"{len(shape)}-D image of shape {shape} in a per-phase folder: "
                               "each file must hold one 3-D phase (pass a 4-D file on its own)")
    return tuple(int(n) for n in shape[:3])  # type: ignore[return-value]


@register_reader(ScanFormat.NIFTI_PHASES)
def read_nifti_phases(path: Path) -> Scan:
    """Read a folder of 3-D NIfTI files (one per phase, natural sort of names) as a scan; a folder
    holding one 4-D NIfTI file is that file's scan (:func:`read_nifti_4d`), named by the folder.

    Raises:
        InputError: no NIfTI files, an unreadable/truncated/4-D file, or a file whose shape or
        affine differs from the first (phase 0), each naming the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "not a folder: expected a folder of per-phase 3-D NIfTI files")
    files = sorted((p for p in path.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(path, "no NIfTI files (.nii or .nii.gz) in folder")
    first = load_nifti(files[0])
    if len(files) == 1:
        if len(first.shape) == 4 and first.shape[3] >= 2:  # a case folder holding its one 4-D file
            scan = read_nifti_4d(files[0])
            scan.scan_id = scan_id_of(path)  # the folder given names the scan
            return scan
        raise InputError(path, f"single phase: only {files[0].name} (shape {first.shape}); a 4DCT needs at "
                               "least 2 phase files, or one 4-D file")
    shape0 = _spatial_shape(files[0], first.shape)
    affine0 = np.asarray(first.affine, dtype=float)
    unknown = [files[0].name] if orientation_unknown(first) else []
    for f in files[1:]:
        img = load_nifti(f)
        if orientation_unknown(img):
            unknown.append(f.name)
        shape = _spatial_shape(f, img.shape)
        if shape != shape0:
            raise InputError(f, f"shape {shape} differs from phase 0 {shape0} ({files[0].name})")
        if not np.allclose(img.affine, affine0, atol=_AFFINE_ATOL):
            raise InputError(f, f"affine differs from phase 0 ({files[0].name}): the phases must share one grid")
    canon_shape, canon_affine = canonical_grid(shape0, affine0)
    notes = []  # one note for the scan: all its files, or those that state no orientation
    if len(unknown) == len(files):
        notes.append(orientation_note(f"all {len(files)} phase files ({unknown[0]} to {unknown[-1]})"))
    elif unknown:
        notes.append(orientation_note(f"{', '.join(unknown)} ({len(unknown)} of {len(files)} phase files)"))

    def load_phase(t: int) -> np.ndarray:
        f = files[int(t)]
        img = first if t == 0 else load_nifti(f)
        vol = read_nifti_data(f, img)
        return np.ascontiguousarray(to_canonical(vol, affine0)[0])

    return Scan(scan_id=scan_id_of(path), source=path, format=ScanFormat.NIFTI_PHASES,
                affine=canon_affine, original_affine=affine0, shape=canon_shape,
                n_phases=len(files), load_phase=load_phase,
                phase_percent=phase_percents_from_names([f.name for f in files]), notes=notes)
