"""The 4DCT scan as every reader returns it, and the registry of readers by format.

A reader turns a path into a :class:`Scan`: header facts (canonical RAS affine, the original
affine, phase list) are read eagerly and validated; voxel data is loaded one phase at a time by
:meth:`Scan.phase`, so a 10-phase 512²×300 study never sits in memory whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import InputError
from ..layout import PHANTOM_CT, PHANTOM_LABELS, PHANTOM_META, PHANTOM_TRUTH_FLOW


class ScanFormat(str, Enum):
    """On-disk layouts of a 4DCT study."""

    NIFTI_4D = "nifti4d"  # one 4-D (I, J, K, T) NIfTI file
    NIFTI_PHASES = "nifti_phases"  # a folder of 3-D NIfTI files, one per phase
    DICOM = "dicom"  # a folder of DICOM series, one series per phase
    PHANTOM = "phantom"  # a phantom patient folder (ct.nii.gz + meta.json)
    NRRD = "nrrd"  # one 4-D NRRD (3D Slicer's .seq.nrrd, or .nrrd/.nhdr with a sequence axis)
    METAIMAGE = "metaimage"  # one 4-D MetaImage (.mha, or .mhd + its data file)


@dataclass
class Scan:
    """A multi-phase CT study in canonical RAS voxel order.

    Attributes:
        scan_id: folder name for a folder, file name without extensions for a file.
        source: the path it was read from.
        format: which reader read it.
        affine: 4×4 voxel→RAS-mm affine of the canonical (RAS+) arrays that :meth:`phase` returns.
        original_affine: 4×4 voxel→RAS-mm affine as stored on disk (before reorientation).
        shape: canonical (I, J, K).
        n_phases: number of phases T ≥ 2.
        phase_percent: nominal phase in % of the R-R interval per phase, when known.
        es_phase, ed_phase: indices into the phases, when known (manifest or phantom meta).
        left_out: what the reader found and did not use, one line each (a DICOM study's dose
            report, a series with no cardiac phase, a thicker reconstruction of a phase).
        notes: anything else the reader wants told about the input, one line each (a file that
            does not say its orientation, read with its library's assumed one).
    """

    scan_id: str
    source: Path
    format: ScanFormat
    affine: np.ndarray
    original_affine: np.ndarray
    shape: tuple[int, int, int]
    n_phases: int
    load_phase: Callable[[int], np.ndarray] = field(repr=False)
    phase_percent: Optional[list[float]] = None
    es_phase: Optional[int] = None
    ed_phase: Optional[int] = None
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase(self, t: int) -> np.ndarray:
        """Phase ``t`` as float32 HU, shape (I, J, K), canonical RAS.

        Raises:
            InputError: the phase holds NaN/inf or has the wrong shape.
        """
        if not 0 <= t < self.n_phases:
            raise IndexError(f"{self.source}: phase {t} out of range 0..{self.n_phases - 1}")
        vol = np.asarray(self.load_phase(t), dtype=np.float32)
        if vol.shape != self.shape:
            raise InputError(self.source, f"phase {t} has shape {vol.shape}, expected {self.shape}")
        if not np.all(np.isfinite(vol)):
            raise InputError(self.source, f"phase {t} holds NaN or inf values")
        return vol

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along the canonical axes, shape (3,)."""
        from ..orientation import spacing

        return spacing(self.affine)


Reader = Callable[[Path], Scan]
_READERS: dict[ScanFormat, Reader] = {}


def register_reader(fmt: ScanFormat) -> Callable[[Reader], Reader]:
    """Decorator: register ``func(path) -> Scan`` as the reader of ``fmt``."""

    def deco(func: Reader) -> Reader:
        _READERS[fmt] = func
        return func

    return deco


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def image_file_kind(path: Path) -> str | None:
    """"nifti", "nrrd" or "metaimage" by the file name's extension; None for anything else."""
    name = Path(path).name.lower()
    for kind, suffixes in (("nifti", NIFTI_SUFFIXES), ("nrrd", (".nrrd", ".nhdr")), ("metaimage", (".mha", ".mhd"))):
        if name.endswith(suffixes):
            return kind
    return None


def scan_id_of(path: str | Path) -> str:
    """A scan's id: its folder's name, or its file name without extensions. A DICOM file named by
    its UID (``1.3.12.2.1107.5.1.4.11``), or by the PACS as a modality and a UID
    (``CT.1.3.12.2.1107.5.1.4.11``), keeps its whole name: cut at the first dot, the files of one
    study would share the id ``CT``."""
    path = Path(path)
    if path.name in ("", ".."):  # "." or "..": the folder's own name
        path = path.resolve()
    if path.is_dir():
        return path.name
    name = path.name
    for suf in (".seq.nrrd", ".nii.gz", ".nii", ".dcm", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    if re.fullmatch(r"[0-9.]+", name) or re.fullmatch(r"[A-Za-z]{1,16}\.[0-9]+(\.[0-9]+){2,}", name):
        return name  # a DICOM file named by its UID (after a modality): the name is the id
    return name.split(".")[0] or name


def detect_format(path: str | Path) -> ScanFormat:
    """Which reader a path needs.

    Raises:
        InputError: the path does not exist, is an empty folder, or holds no NIfTI/DICOM data.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_file():
        kind = image_file_kind(path)
        if kind is not None:
            return {"nifti": ScanFormat.NIFTI_4D, "nrrd": ScanFormat.NRRD, "metaimage": ScanFormat.METAIMAGE}[kind]
        from .dicom import looks_like_dicom

        if looks_like_dicom(path):  # one multi-frame file holding the cine
            return ScanFormat.DICOM
        raise InputError(path, "not a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or "
                               "multi-frame DICOM file, and not a scan folder")
    if (path / PHANTOM_CT).is_file() and (path / PHANTOM_META).is_file():
        return ScanFormat.PHANTOM
    if (path / PHANTOM_CT).is_file() and ((path / PHANTOM_LABELS).is_file()
                                          or (path / PHANTOM_TRUTH_FLOW).parent.is_dir()):
        raise InputError(path / PHANTOM_META, "missing: the folder looks like a phantom patient (ct.nii.gz with "
                                             "labels/truth) but has no meta.json (ES/ED, parameters); "
                                             "write it again with `cardiomotion phantom`")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if any(is_nifti(p) for p in files):
        return ScanFormat.NIFTI_PHASES
    from .dicom import looks_like_dicom

    # DICOM exports often nest series in sub-folders: look through the tree (hidden entries skipped).
    nested = (p for p in sorted(path.rglob("*")) if p.is_file()
              and not any(part.startswith(".") for part in p.relative_to(path).parts))
    checked = 0
    for p in nested:
        checked += 1
        if looks_like_dicom(p):
            return ScanFormat.DICOM
        if checked >= 64:
            break
    if checked == 0:
        raise InputError(path, "empty folder: expected a 4DCT as per-phase NIfTI files or DICOM series")
    raise InputError(path, "folder holds neither NIfTI files nor DICOM files")


def read_scan(path: str | Path, fmt: ScanFormat | None = None) -> Scan:
    """Read a 4DCT study (header eagerly, voxels lazily per phase) from any registered format.

    Raises:
        InputError: one line naming the file and the problem.
    """
    from . import dicom, metaimage, nifti, nrrd, phantom_reader  # noqa: F401  (registers the readers)

    path = Path(path)
    fmt = fmt or detect_format(path)
    scan = _READERS[fmt](path)
    if scan.n_phases < 2:
        raise InputError(path, f"a 4DCT needs at least 2 phases, found {scan.n_phases}")
    return scan


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key that orders 'phase2' before 'phase10'."""
    return [int(t) if t.isdigit() else t.lower() for t in _DIGITS.split(name)]
