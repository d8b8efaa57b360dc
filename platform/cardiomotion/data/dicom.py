"""DICOM 4DCT reader: a folder (searched recursively) of CT series, one per phase.

An image file holds one slice (CT Image Storage) or many (multi-frame: Enhanced CT, Legacy
Converted Enhanced CT); a frame is read as a slice of its own, its position, orientation, pixel
spacing, rescale and cardiac phase taken from its per-frame functional groups, else the shared
ones (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
PixelValueTransformationSequence, CardiacSynchronizationSequence, FrameContentSequence).

Series are grouped by SeriesInstanceUID; a series' cardiac phase (% R-R) is
NominalPercentageOfCardiacPhase (0020,9241) (top level, else anywhere in its sequences), else a
percentage in SeriesDescription ("Cardiac 40%", "40 %", "phase 40"). A series whose slices repeat
positions holds the whole cine (as some scanners export it, in single-frame images or in one
multi-frame file) and is split per image by NominalPercentageOfCardiacPhase, else
TemporalPositionIdentifier or a frame's TemporalPositionIndex, else TriggerTime or a frame's
NominalCardiacTriggerDelayTime (the phases' percentages then unknown); trigger times that differ
a little image to image within a phase are grouped by the wide gaps between them, with a note in
:attr:`Scan.notes`. Slices are ordered by their
position along the slice normal. The header pass reads no pixel data; each phase's pixels are read
when :meth:`Scan.phase` asks for it.

What a study exported from a scanner or PACS holds besides the phases is left out and listed in
:attr:`Scan.left_out`: a second copy of an image (same SOPInstanceUID), images with no place in
space (no ImagePositionPatient or ImageOrientationPatient, for a multi-frame file on one of its
frames: dose reports, screen captures), series
with no cardiac phase that are not on the cine's grid (a calcium score, a non-gated scan; one on
the grid is a phase whose tag is missing: an error), phases of a second cine ordered by another
key, and of several series at one phase all but the one on the grid most phases share, then
the one with the most slices (a thin best-phase reconstruction beside a thick cine).

Array and affine convention (before reorientation to RAS+): a series becomes an array
(Columns, Rows, n_slices) with ``vol[i, j, k] = pixel_array[j, i]`` of slice k, so axis 0
follows the row direction cosine IOP[:3] (step PixelSpacing[1], the column spacing), axis 1
follows the column direction cosine IOP[3:] (step PixelSpacing[0], the row spacing) and axis 2
follows the slice step (IPP difference of consecutive sorted slices). The LPS affine built from
that is turned into RAS with :func:`~cardiomotion.orientation.lps_to_ras`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import InputError, one_line
from ..orientation import canonical_grid, lps_to_ras, to_canonical
from .scan import Scan, ScanFormat, register_reader, scan_id_of

_NOMINAL_PHASE = 0x00209241  # NominalPercentageOfCardiacPhase
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_GRID_ATOL = 1e-3  # mm
_DICOM_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, AttributeError,
                 TypeError, NotImplementedError, RuntimeError)

_PCT_PATTERNS = (
    re.compile(r"(\d+(?:\.\d+)?)\s*%"),
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:pct|percent)\b", re.IGNORECASE),
    re.compile(r"(?<!multi)phase\s*[:=#_-]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE),  # "CardiacPhase 40", not "Multiphase 10"
)
#: what a percentage in a description may instead be the strength of: iterative reconstruction
#: ("ASiR-V 40%", "ASIR 50 %"), not the cardiac phase
_NOT_A_PHASE = re.compile(r"\b(?:asir(?:-v)?|safire|admire|idose\d*|aidr(?:\s*3d)?|dlir|veo|imr)\s*[-:]?\s*$",
                          re.IGNORECASE)


def looks_like_dicom(path: str | Path) -> bool:
    """True for a DICOM Part 10 file (a 128-byte preamble then b"DICM"), or for a file named
    ``.dcm`` or ``.ima``, with no extension, or with a UID's numeric last part, that pydicom parses
    — with ``force`` where it lacks the preamble, as files written before Part 10 or by some
    exporters do — into a dataset that names its SOP class or holds an image (Rows, Columns)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    suffix = path.suffix.lower()
    if suffix not in (".dcm", ".ima", "") and not suffix[1:].isdigit():
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, defer_size=1024,  # garbage lengths: not read
                             specific_tags=["SOPClassUID", "Rows", "Columns"])
        return "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False


def _dcmread(path: Path, **kwargs) -> pydicom.Dataset:
    """``pydicom.dcmread`` with ``force`` (files without the preamble: :func:`looks_like_dicom`),
    and for a file without file meta the transfer syntax it was read in, which pydicom needs to
    decode its pixels."""
    ds = pydicom.dcmread(path, force=True, **kwargs)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


@dataclass
class _Slice:
    path: Path
    position: np.ndarray  # IPP, LPS mm, (3,)
    orientation: np.ndarray  # IOP, (6,)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int
    columns: int
    phase_tags: dict[str, float | None] = field(default_factory=dict)  # :data:`_PHASE_KEYS` of this image
    frame: int | None = None  # a multi-frame file's frame (0-based), None for a single-frame image
    rescale: tuple[float, float] = (1.0, 0.0)  # a frame's (RescaleSlope, RescaleIntercept)

    @property
    def name(self) -> str:
        """The image as messages name it: its file name, and the frame of a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


@dataclass
class _Series:
    uid: str
    description: str
    first: pydicom.Dataset
    slices: list[_Slice] = field(default_factory=list)
    percent: float | None = None  # cardiac phase, % R-R
    order: float | None = None  # what sorts the phases: the percent, or the key a cine series was split by
    split_by: str | None = None  # that key (:func:`_split_phases`, or :func:`_order_by_shared_tag`), None: a percentage
    by_tag: bool = False  # a series of its own ordered by a per-image key (no percentage known)
    affine: np.ndarray | None = None  # voxel → RAS mm of the (Columns, Rows, n) array

    def label(self) -> str:
        return f"series {self.description!r} (SeriesInstanceUID {self.uid}, e.g. {self.slices[0].path.name})"

    def phase(self) -> str:
        """The phase as the messages name it: "40%", or "TriggerTime 350"."""
        return f"{self.percent:g}%" if self.percent is not None else f"{self.split_by} {self.order:g}"


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    return _numbers(ds.get(keyword), keyword, n, path)


def _numbers(value, keyword: str, n: int, path: Path) -> np.ndarray:
    """``value`` (of ``keyword``) as ``n`` finite floats, else one InputError naming ``path``."""
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(path, f"missing or invalid {keyword} (need {n} numbers, got {value!r})")
    return arr


def _header(path: Path) -> pydicom.Dataset | None:
    """The header of an image file, or None for a file that is not a DICOM image (skipped)."""
    if not looks_like_dicom(path):
        return None
    try:
        ds = _dcmread(path, stop_before_pixels=True)
    except _DICOM_ERRORS as exc:
        raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    meta = getattr(ds, "file_meta", None)
    sop = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop == _DICOMDIR_SOP or "Rows" not in ds:
        return None  # DICOMDIR, structured report, … : not an image
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return None  # scout image
    return ds


def _make_slice(path: Path, ds: pydicom.Dataset) -> _Slice:
    ps = _floats(ds, "PixelSpacing", 2, path)
    return _Slice(path=path, position=_floats(ds, "ImagePositionPatient", 3, path),
                  orientation=_floats(ds, "ImageOrientationPatient", 6, path),
                  pixel_spacing=(float(ps[0]), float(ps[1])), rows=int(ds.Rows), columns=int(ds.Columns),
                  phase_tags=_phase_tags(lambda key: _nominal_percent(ds) if key == _PHASE_KEYS[0] else ds.get(key)))


def n_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames of an image header (1 when absent)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _group_value(ds: pydicom.Dataset, frame: pydicom.Dataset, shared: pydicom.Dataset, sequence: str,
                 keyword: str):
    """``keyword`` of a multi-frame image's frame: from the frame's functional group ``sequence``,
    else the shared group's, else the top level (None when nowhere)."""
    for group in (frame, shared):
        items = group.get(sequence)
        if items and keyword in items[0] and items[0].get(keyword) not in (None, ""):
            return items[0].get(keyword)
    value = ds.get(keyword)
    return None if value in (None, "") else value


def _shared_group(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A multi-frame image's shared functional groups (an empty dataset when it has none)."""
    items = ds.get("SharedFunctionalGroupsSequence")
    return items[0] if items else pydicom.Dataset()


def _is_localizer(frame: pydicom.Dataset, shared: pydicom.Dataset) -> bool:
    """Whether a multi-frame image's frame is a localizer (scout): FrameType (0008,9007) of its
    frame-type functional group (CT Image Frame Type, MR Image Frame Type, …), else the shared
    one's, says LOCALIZER — a MIXED image may hold one beside its stack."""
    for group in (frame, shared):
        for element in group:
            if element.keyword.endswith("FrameTypeSequence") and element.value:
                kinds = element.value[0].get("FrameType")
                if kinds:
                    return "LOCALIZER" in [str(v).upper() for v in kinds]
    return False


def _frame_slices(path: Path, ds: pydicom.Dataset) -> list[_Slice] | None:
    """Every frame of a multi-frame image as a :class:`_Slice`, localizer frames skipped as a
    scout image is (None: a frame has no position or orientation, so the file has no place in
    space)."""
    n = n_frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        if ds.get("ImagePositionPatient") is not None:  # one position for every frame: no stack to build
            raise InputError(path, f"multi-frame DICOM ({n} frames) without per-frame functional groups "
                                   "(PerFrameFunctionalGroupsSequence) is not supported: convert it to NIfTI "
                                   "first (e.g. dcm2niix)")
        return None
    if len(per_frame) != n:
        raise InputError(path, f"multi-frame DICOM with NumberOfFrames {n} but {len(per_frame)} "
                               "PerFrameFunctionalGroupsSequence items")
    shared = _shared_group(ds)
    out = []
    for i, item in enumerate(per_frame):
        if _is_localizer(item, shared):
            continue

        def value(sequence: str, keyword: str):
            return _group_value(ds, item, shared, sequence, keyword)

        ipp = value("PlanePositionSequence", "ImagePositionPatient")
        iop = value("PlaneOrientationSequence", "ImageOrientationPatient")
        if ipp is None or iop is None:
            return None
        try:
            ps = _numbers(value("PixelMeasuresSequence", "PixelSpacing"), "PixelSpacing", 2, path)
            position = _numbers(ipp, "ImagePositionPatient", 3, path)
            orientation = _numbers(iop, "ImageOrientationPatient", 6, path)
        except InputError as exc:
            raise InputError(path, f"frame {i + 1}: {exc.problem}") from None
        try:
            slope = float(value("PixelValueTransformationSequence", "RescaleSlope") or 1.0)
            intercept = float(value("PixelValueTransformationSequence", "RescaleIntercept") or 0.0)
        except (TypeError, ValueError) as exc:
            raise InputError(path, f"frame {i + 1}: invalid RescaleSlope/RescaleIntercept ({exc})") from exc
        tags = _phase_tags(lambda key: value(_FRAME_GROUPS[key], key) if key in _FRAME_GROUPS else ds.get(key))
        out.append(_Slice(path=path, position=position, orientation=orientation,
                          pixel_spacing=(float(ps[0]), float(ps[1])), rows=int(ds.Rows), columns=int(ds.Columns),
                          phase_tags=tags, frame=i, rescale=(slope, intercept)))
    return out


#: per-image keys that tell the phases of a cine exported as one series apart, in the order tried
#: (a multi-frame image's frame keeps TemporalPositionIndex and NominalCardiacTriggerDelayTime)
_PHASE_KEYS = ("NominalPercentageOfCardiacPhase", "TemporalPositionIdentifier", "TemporalPositionIndex",
               "TriggerTime", "NominalCardiacTriggerDelayTime")
#: the functional group a multi-frame image's frame keeps each of :data:`_PHASE_KEYS` in (the
#: others: the top level, the same for every frame)
_FRAME_GROUPS = {"NominalPercentageOfCardiacPhase": "CardiacSynchronizationSequence",
                 "TemporalPositionIndex": "FrameContentSequence",
                 "NominalCardiacTriggerDelayTime": "CardiacSynchronizationSequence"}


def _phase_tags(get: Callable[[str], object]) -> dict[str, float | None]:
    """:data:`_PHASE_KEYS` of one image (or frame) as numbers, each read by ``get(key)`` (None
    where absent or not a number)."""
    out: dict[str, float | None] = {}
    for key in _PHASE_KEYS:
        try:
            value = get(key)
            out[key] = None if value in (None, "") else float(value)
        except (TypeError, ValueError):
            out[key] = None
    return out


#: per-image keys in ms, which may differ a little image to image within one phase (each slice's
#: trigger delay in its own heartbeat): grouped by the gaps between their values when no value is
#: shared (:func:`_time_groups`)
_TIME_KEYS = ("TriggerTime", "NominalCardiacTriggerDelayTime")


def _time_groups(values: list[float], where: np.ndarray) -> tuple[list[list[int]], float] | None:
    """The images (indices) of a one-series cine grouped into phases by a time key whose values
    differ a little within a phase, and the widest group's spread (the key's unit): as many groups
    as a position repeats at most, cut at the widest gaps between the sorted values, in ascending
    order of value. None unless every group has at least 2 slices, each position at most once, and
    every cut is more than twice as wide as the widest group's spread (values spread evenly, one per
    image, have no such gaps and are not split)."""
    n_phases = max(Counter(where.tolist()).values())
    order = np.argsort(np.asarray(values, float), kind="stable")
    v = np.asarray(values, float)[order]
    gaps = np.diff(v)
    if n_phases < 2 or len(gaps) < n_phases - 1:
        return None
    cuts = np.sort(np.argsort(gaps, kind="stable")[::-1][: n_phases - 1])
    groups = np.split(order, cuts + 1)
    spread = max(float(np.ptp(np.asarray(values, float)[g])) for g in groups)
    if gaps[cuts].min() <= 2 * spread:
        return None
    if any(len(g) < 2 or len(set(where[g].tolist())) != len(g) for g in groups):
        return None
    return [g.tolist() for g in groups], spread


def _split_phases(s: _Series, notes: list[str] | None = None) -> list[_Series]:
    """A series that holds several phases (its slices repeat positions: some scanners export a
    cine as one series): one series per value of the first of :data:`_PHASE_KEYS` that every
    slice carries and that splits it into stacks of as many slices with no repeated position, in
    the key's order (the percent known when the key is NominalPercentageOfCardiacPhase). Failing
    that, a time key (:data:`_TIME_KEYS`) whose values differ a little within a phase groups the
    images by the gaps between them (:func:`_time_groups`), each phase ordered by its median and
    a line in ``notes`` saying so. The series itself when no position repeats or nothing splits it
    (the geometry check then names the repeated positions)."""
    ori = s.slices[0].orientation
    normal = np.cross(ori[:3], ori[3:])
    where = np.round([float(np.dot(sl.position, normal)) for sl in s.slices], 3)
    if len(set(where.tolist())) == len(where):
        return [s]

    def parts_of(groups: list[tuple[float, list[int]]], key: str) -> list[_Series]:
        parts = []
        for v, idx in sorted(groups):
            part = _Series(uid=s.uid, description=s.description, first=s.first,
                           slices=[s.slices[i] for i in idx], order=v, split_by=key)
            part.percent = v if key == _PHASE_KEYS[0] else None
            parts.append(part)
        return parts

    tagged = {key: [sl.phase_tags.get(key) for sl in s.slices] for key in _PHASE_KEYS}
    for key, values in tagged.items():
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        groups: dict[float, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
        stacks = [where[g].tolist() for g in groups.values()]
        # a key that splits a cine gives stacks of at least 2 slices, each position once (a value
        # per image, as TriggerTime can be, gives one-slice "phases" instead: not this key); the
        # stacks may reach differently far (:func:`_cut_to_shared_slices`)
        if any(len(st) < 2 or len(set(st)) != len(st) for st in stacks):
            continue
        return parts_of(list(groups.items()), key)
    for key in _TIME_KEYS:
        values = tagged[key]
        if any(v is None for v in values) or not (grouped := _time_groups(values, where)):
            continue
        found, spread = grouped
        # the cuts are wider than any group's spread: the medians increase strictly
        medians = [float(np.median([values[i] for i in g])) for g in found]
        if notes is not None:
            notes.append(f"{s.label()}: one series of {len(found)} phases whose {key} differs image to image "
                         f"(by up to {spread:g} ms within a phase): each phase is the images grouped by the gaps "
                         f"between those values, at {key} {', '.join(f'{m:g}' for m in medians)} (medians)")
        return parts_of(list(zip(medians, found)), key)
    return [s]


#: the per-image keys a series of its own may be ordered by when it states no percentage
_TAG_PHASES = ", ".join(_PHASE_KEYS[1:])


def _order_by_shared_tag(series: list[_Series]) -> None:
    """Order series of their own, none of which states a percentage, by the first of the
    per-image :data:`_PHASE_KEYS` (TemporalPositionIdentifier, TemporalPositionIndex, TriggerTime,
    NominalCardiacTriggerDelayTime) that each carries with one value on all its images and that
    tells at least two of them apart: anonymised studies often lose the series description, and
    many scanners write no (0020,9241). Leaves them unordered when no key does."""
    for key in _PHASE_KEYS[1:]:
        values = []
        for s in series:
            own = {sl.phase_tags.get(key) for sl in s.slices}
            values.append(own.pop() if len(own) == 1 else None)
        if None not in values and len(set(values)) >= 2:
            for s, v in zip(series, values):
                s.order, s.split_by, s.by_tag = v, key, True
            return


def _nominal_percent(ds: pydicom.Dataset) -> float | None:
    """NominalPercentageOfCardiacPhase at top level, else the first one in any sequence."""
    if _NOMINAL_PHASE in ds and ds[_NOMINAL_PHASE].value not in (None, ""):
        return float(ds[_NOMINAL_PHASE].value)
    for elem in ds.iterall():
        if elem.tag == _NOMINAL_PHASE and elem.value not in (None, ""):
            return float(elem.value)
    return None


def percent_from_description(text: str) -> float | None:
    """A cardiac phase in % R-R from a series description: 'Cardiac 40%', '40 %', 'phase 40'; a
    percentage that follows an iterative reconstruction's name is its strength ('ASiR-V 40%'),
    skipped."""
    text = text or ""
    for pattern in _PCT_PATTERNS:
        for m in pattern.finditer(text):
            if not _NOT_A_PHASE.search(text[: m.start()]):
                return float(m.group(1))
    return None


def _grid_key(s: _Series) -> tuple:
    """A series' grid (after :func:`_series_geometry`) as a hashable key: its array shape and
    its affine to 0.01 mm."""
    return (s.slices[0].columns, s.slices[0].rows, len(s.slices), tuple(np.round(s.affine, 2).ravel().tolist()))


def _series_geometry(folder: Path, s: _Series) -> None:
    """Sort the slices along the normal, validate them, and set ``s.affine`` (RAS)."""
    ref = s.slices[0]
    for sl in s.slices[1:]:
        if (sl.rows, sl.columns) != (ref.rows, ref.columns):
            raise InputError(sl.path, f"{sl.rows}x{sl.columns} pixels differ from {ref.rows}x{ref.columns} "
                                      f"of {ref.name} in the same series")
        if not np.allclose(sl.orientation, ref.orientation, atol=1e-4) or \
                not np.allclose(sl.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise InputError(sl.path, f"ImageOrientationPatient/PixelSpacing differ from {ref.name} "
                                      "in the same series")
    row_cos, col_cos = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 1e-3:
        raise InputError(ref.path, f"degenerate ImageOrientationPatient {ref.orientation.tolist()}")
    s.slices.sort(key=lambda sl: float(np.dot(sl.position, normal)))
    n = len(s.slices)
    if n < 2:
        raise InputError(folder, f"{s.label()} has {n} slice: a phase needs at least 2 slices")
    positions = np.stack([sl.position for sl in s.slices])
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    if (gaps < 1e-4).any():  # name the duplicates themselves, wherever they sit in the stack
        i = int(np.flatnonzero(gaps < 1e-4)[0])
        a, b = s.slices[i], s.slices[i + 1]
        same = int((gaps < 1e-4).sum())
        raise InputError(a.path, f"{s.label()}: {a.name} and {b.name} share ImagePositionPatient "
                                 f"{np.round(a.position, 3).tolist()}"
                                 + (f" ({same} duplicated positions in all)" if same > 1 else "")
                                 + " (several phases in one series, with no NominalPercentageOfCardiacPhase, "
                                   "TemporalPositionIdentifier or TriggerTime per image to tell them apart?)")
    # the step fitted to every position (least squares along the index), not the first gap alone:
    # positions stored rounded (IPP with 2 decimals) put a first gap's error into every later slice
    index = np.arange(n, dtype=float)[:, None]
    step = ((index - index.mean()) * (positions - positions.mean(0))).sum(0) / ((index - index.mean()) ** 2).sum()
    origin = positions.mean(0) - index.mean() * step
    step_len = float(np.linalg.norm(step))
    expected = origin + index * step
    if not np.allclose(positions, expected, atol=1e-3 + 0.01 * step_len):
        raise InputError(folder, f"{s.label()}: slices are not evenly spaced along one line "
                                 "(missing slices or variable spacing)")
    row_sp, col_sp = ref.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_sp
    lps[:3, 1] = col_cos * row_sp
    lps[:3, 2] = step
    lps[:3, 3] = origin
    s.affine = lps_to_ras(lps)


def _collect(folder: Path, left_out: list[str] | None = None) -> dict[str, _Series]:
    """The image series of a folder (or of one multi-frame file) by SeriesInstanceUID (a
    multi-frame image's frames are slices of its series). A second copy of an image (its
    SOPInstanceUID seen before) and an image without ImagePositionPatient or
    ImageOrientationPatient (a multi-frame image: on one of its frames) are left out and counted
    in ``left_out`` (one line each kind)."""
    series: dict[str, _Series] = {}
    files = [folder] if folder.is_file() else sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    seen: set[str] = set()
    copies: list[Path] = []
    placeless: list[Path] = []
    for path in files:
        ds = _header(path)
        if ds is None:
            continue
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen:
            copies.append(path)
            continue
        seen.add(sop)
        if n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            slices = _frame_slices(path, ds)
        elif ds.get("ImagePositionPatient") is None or ds.get("ImageOrientationPatient") is None:
            slices = None
        else:
            slices = [_make_slice(path, ds)]
        if slices is None:
            placeless.append(path)  # no place in space (a dose report, a screen capture)
            continue
        if not slices:
            continue  # a multi-frame image of localizer frames only: a scout
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise InputError(path, "DICOM image without SeriesInstanceUID")
        s = series.get(uid)
        if s is None:
            s = series[uid] = _Series(uid=uid, description=str(ds.get("SeriesDescription", "") or ""), first=ds)
        s.slices.extend(slices)
    if left_out is not None:
        if copies:
            left_out.append(f"{len(copies)} second {'copy' if len(copies) == 1 else 'copies'} of images already "
                            f"read (same SOPInstanceUID), e.g. {copies[0]}")
        if placeless:
            left_out.append(f"{len(placeless)} {'image' if len(placeless) == 1 else 'images'} with no position or "
                            f"orientation in space (a dose report or screen capture?), e.g. {placeless[0]}")
    return series


def _slice_hu(path: Path) -> np.ndarray:
    """One slice's HU, float64 (Rows, Columns): pydicom's pixel data with RescaleSlope and
    RescaleIntercept applied; for a compressed transfer syntax none of pydicom's installed
    decoders takes (JPEG Lossless and JPEG-LS, the usual PACS compressions, need plugins pydicom
    does not bring), GDCM's (:func:`_gdcm_frames`)."""
    ds = None
    try:
        ds = _dcmread(path)
        pixels = ds.pixel_array
    except _DICOM_ERRORS as exc:
        pixels = _gdcm_frames(path, ds, [0], exc)[0]
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float64) * slope + intercept


def _frames_hu(path: Path, frames: list[_Slice]) -> list[np.ndarray]:
    """HU of some frames of one multi-frame image, float64 (Rows, Columns) each, in the order
    given: each frame decoded alone (pydicom reads only that frame's bytes) and rescaled by its
    own RescaleSlope and RescaleIntercept; for a compressed transfer syntax none of pydicom's
    installed decoders takes, GDCM's (:func:`_gdcm_frames`)."""
    from pydicom.pixels import iter_pixels

    wanted = sorted({sl.frame for sl in frames})
    try:
        decoded = dict(zip(wanted, iter_pixels(path, indices=wanted)))
    except _DICOM_ERRORS as exc:
        try:
            ds = _dcmread(path)
        except _DICOM_ERRORS:
            ds = None
        try:  # a file without the preamble: pydicom decodes it from the dataset read with force
            decoded = dict(zip(wanted, iter_pixels(ds, indices=wanted))) if ds is not None else None
        except _DICOM_ERRORS:
            decoded = None
        if decoded is None:
            decoded = _gdcm_frames(path, ds, wanted, exc)
    return [decoded[sl.frame].astype(np.float64) * sl.rescale[0] + sl.rescale[1] for sl in frames]


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (pydicom's decoder errors span several)."""
    return f"{type(exc).__name__}: {one_line(str(exc))}"


#: what a frame's pixel description needs (HighBit, when absent, is BitsStored − 1)
_PIXEL_KEYS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation")


def _gdcm_frames(path: Path, ds: pydicom.Dataset | None, wanted: list[int], exc: BaseException) -> dict[int, np.ndarray]:
    """Stored values (Rows, Columns) of frames ``wanted`` (0-based) of a compressed image (one
    frame or many, ``ds`` read whole) that pydicom cannot decode (``exc``: why not), by SimpleITK's
    GDCM: each frame's compressed bytes are written alone into a minimal single-frame image (the
    same pixel description and transfer syntax, MONOCHROME2, no rescale) and decoded there, so
    that every frame keeps its own rescale and place (GDCM's multi-frame reading gives one rescale
    per file) and the values are those pydicom would give (GDCM inverts MONOCHROME1 itself).

    Raises:
        InputError: one line naming the file: the file is not compressed (pydicom's error stands),
            its pixel data or pixel description is missing, or GDCM cannot decode it either.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate, get_frame

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ds is None or syntax is None or not syntax.is_compressed:
        raise InputError(path, f"cannot read pixel data ({_one_line(exc)})") from exc
    missing = [key for key in ("PixelData", *_PIXEL_KEYS) if key not in ds]
    if missing:
        raise InputError(path, f"cannot read pixel data ({syntax.name}): no {', '.join(missing)} "
                               "(a truncated file?)") from exc
    out: dict[int, np.ndarray] = {}
    k = wanted[0]
    try:
        import tempfile

        import SimpleITK as sitk

        with tempfile.TemporaryDirectory(prefix="cardiomotion-frame-") as tmp:
            for k in wanted:
                meta = FileMetaDataset()
                meta.TransferSyntaxUID = syntax
                meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
                meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
                one = Dataset()
                one.file_meta = meta
                one.SOPClassUID, one.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
                one.Modality = "CT"
                for key in _PIXEL_KEYS:
                    setattr(one, key, ds[key].value)
                one.HighBit = int(ds.get("HighBit", int(ds.BitsStored) - 1))
                one.PhotometricInterpretation = "MONOCHROME2"
                one.PixelData = encapsulate([get_frame(ds.PixelData, k, number_of_frames=n_frames(ds))])
                one["PixelData"].VR = "OB"
                frame_file = Path(tmp) / f"{k}.dcm"
                one.save_as(frame_file, enforce_file_format=True)
                pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(frame_file)))
                out[k] = pixels.reshape(pixels.shape[-2:])
    except Exception as gdcm_exc:  # noqa: BLE001 - neither decoder reads it: one error naming both
        frame = f"frame {k + 1}: " if n_frames(ds) > 1 else ""
        raise InputError(path, f"{frame}cannot read pixel data ({syntax.name}: pydicom: {_one_line(exc)}; "
                               f"GDCM: {_one_line(gdcm_exc)})") from exc
    return out


def _load_series(s: _Series) -> np.ndarray:
    """HU of a series, float32 (Columns, Rows, n_slices) in sorted slice order."""
    ref = s.slices[0]
    vol = np.empty((ref.columns, ref.rows, len(s.slices)), dtype=np.float32)

    def put(k: int, hu: np.ndarray) -> None:
        sl = s.slices[k]
        if hu.shape != (ref.rows, ref.columns):
            frame = "" if sl.frame is None else f"frame {sl.frame + 1}: "
            raise InputError(sl.path, f"{frame}pixel data of shape {hu.shape}, expected ({ref.rows}, {ref.columns})")
        vol[:, :, k] = hu.T

    frames: dict[Path, list[int]] = {}  # a multi-frame image's slices, read together
    for k, sl in enumerate(s.slices):
        if sl.frame is None:
            put(k, _slice_hu(sl.path))
        else:
            frames.setdefault(sl.path, []).append(k)
    for path, ks in frames.items():
        for k, hu in zip(ks, _frames_hu(path, [s.slices[k] for k in ks])):
            put(k, hu)
    return vol


#: phases are cut to the slices they share only when those are at least this share of the longest
#: phase's slices (a few slices more or less at either end, not stacks that barely overlap)
MIN_SHARED_SLICES = 0.9


def _cut_to_shared_slices(folder: Path, series: list[_Series], left_out: list[str]) -> None:
    """Phases whose stacks differ only in how far they reach along the slice normal (the same
    pixels, orientation, pixel spacing and slice step, their slices on one lattice, sharing at
    least :data:`MIN_SHARED_SLICES` of the longest stack): each is cut, in place, to the slices
    every phase has, without resampling; what is cut is left out and named in ``left_out``.
    Phases that differ otherwise are left as they are (the grid check refuses them)."""
    ref = series[0]
    pixels = (ref.slices[0].columns, ref.slices[0].rows)
    step = ref.affine[:3, 2]
    first: list[int] = []  # the index of each phase's first slice in the first phase's lattice
    for s in series:
        if (s.slices[0].columns, s.slices[0].rows) != pixels or \
                not np.allclose(s.affine[:3, :3], ref.affine[:3, :3], atol=_GRID_ATOL):
            return
        shift = s.affine[:3, 3] - ref.affine[:3, 3]
        m = float(np.dot(shift, step) / np.dot(step, step))
        if np.linalg.norm(shift - round(m) * step) > _GRID_ATOL:  # off the lattice, or moved in plane
            return
        first.append(round(m))
    lo = max(first)
    hi = min(m + len(s.slices) for m, s in zip(first, series))  # one past the last shared slice
    if hi - lo < MIN_SHARED_SLICES * max(len(s.slices) for s in series):
        return  # stacks that barely overlap: not one cine cut short
    if all(m == lo and len(s.slices) == hi - lo for m, s in zip(first, series)):
        return  # nothing to cut
    for m, s in zip(first, series):
        keep = s.slices[lo - m:hi - m]
        if len(keep) < len(s.slices):
            left_out.append(f"{s.label()} at {s.phase()}: {len(s.slices) - len(keep)} of its {len(s.slices)} "
                            f"slices, beyond the {hi - lo} slices every phase has")
            s.slices = keep
            _series_geometry(folder, s)


def _check_source(path: Path, expected: str) -> None:
    """A reader's input is a folder or one multi-frame DICOM file; anything else is one
    InputError (a single-frame image: its folder is the input; a file of localizer frames only is
    named as such)."""
    if path.is_dir():
        return
    if path.is_file() and looks_like_dicom(path):
        ds = _header(path)
        if ds is None:
            raise InputError(path, "not a CT image (a localizer, a DICOMDIR or a report): expected a folder "
                                   "of DICOM series or one multi-frame DICOM file")
        if n_frames(ds) < 2:
            raise InputError(path, "a single-frame DICOM image: give the folder that holds its series")
        shared = _shared_group(ds)
        frames = ds.get("PerFrameFunctionalGroupsSequence") or [pydicom.Dataset()]
        if all(_is_localizer(frame, shared) for frame in frames):
            raise InputError(path, "a localizer (scout) image only: give the cine's images")
        return
    raise InputError(path, f"not a folder: expected {expected} (or one multi-frame DICOM file)")


@register_reader(ScanFormat.DICOM)
def read_dicom(path: Path) -> Scan:
    """Read a folder of DICOM series (one per cardiac phase), or one multi-frame DICOM file that
    holds the whole cine, as a scan sorted by phase %.

    Raises:
        InputError: no DICOM images, a series without phase information when fewer than two
        have it or on the cine's grid, two series at one phase on equally shared grids with as
        many slices, uneven slices, or phases on different grids (names the file/series) — but
        phases that differ only in how far their stacks reach along the slice normal are cut to
        the slices they share (:func:`_cut_to_shared_slices`).
    """
    folder = Path(path)
    _check_source(folder, "a folder of DICOM series, one per phase")
    left_out: list[str] = []
    notes: list[str] = []
    series = [part for s in _collect(folder, left_out).values() for part in _split_phases(s, notes)]
    if not series:
        raise InputError(folder, "no DICOM image files found (searched recursively)")
    for s in series:
        if s.split_by is None:  # a series per phase: its phase from its header or description
            pct = _nominal_percent(s.first)
            s.percent = s.order = percent_from_description(s.description) if pct is None else pct
    own = [s for s in series if s.split_by is None]
    if own and all(s.order is None for s in own):  # no percentage anywhere: a per-image key they share
        _order_by_shared_tag(own)
    phased = [s for s in series if s.order is not None]
    unphased = [s for s in series if s.order is None]
    if len(phased) < 2 and unphased:
        raise InputError(folder, f"{unphased[0].label()}: no cardiac phase: neither NominalPercentageOfCardiacPhase "
                                 f"(0020,9241), a percentage in SeriesDescription, nor {_TAG_PHASES} shared by "
                                 "its images")
    # one cine: the phases ordered by one key (percentages, or the per-image key a series was
    # split by) — the key that orders the most phases; series ordered by another are left out
    kinds: dict[str, list[_Series]] = {}
    for s in phased:
        kinds.setdefault(s.split_by or "%", []).append(s)
    kind = max(kinds, key=lambda k: (len({s.order for s in kinds[k]}), k == "%"))
    for k, group in kinds.items():
        if k != kind:
            left_out.extend(f"{s.label()} at {s.phase()}: a phase of another cine than the one read "
                            f"(ordered by {k if k != '%' else 'percentage'})" for s in group)
    series = kinds[kind]
    for s in series:
        _series_geometry(folder, s)
    shared = Counter(_grid_key(s) for s in series)  # how many series share each grid
    # several series at one phase (a thin and a thick reconstruction): the one on the grid most
    # series share, then the one with the most slices
    series.sort(key=lambda s: (s.order, -shared[_grid_key(s)], -len(s.slices)))
    kept: list[_Series] = []
    for s in series:
        if kept and kept[-1].order == s.order:
            first = kept[-1]
            if (shared[_grid_key(s)], len(s.slices)) == (shared[_grid_key(first)], len(first.slices)):
                raise InputError(folder, f"duplicate cardiac phase {s.phase()}: {first.label()} and "
                                         f"{s.label()} have as many slices; keep one of them in the folder")
            left_out.append(f"{s.label()} at {s.phase()}: another reconstruction of the phase ({len(s.slices)} "
                            f"slices) than {first.label()}'s ({len(first.slices)} slices), "
                            + ("on the grid more phases share" if shared[_grid_key(first)] > shared[_grid_key(s)]
                               else "more slices"))
            continue
        kept.append(s)
    series = kept
    cine_grid = Counter(_grid_key(s) for s in series).most_common(1)[0][0]
    # a series ordered by a per-image key off the cine's grid (a gated calcium score has a
    # TriggerTime too) is not part of the cine, as a series without any phase there is not
    for s in [s for s in series if s.by_tag and _grid_key(s) != cine_grid]:
        left_out.append(f"{s.label()} at {s.phase()}: not on the cine's grid (not part of the cine)")
        series.remove(s)
    # a series without a phase on the cine's grid is a phase whose tag is missing; elsewhere (a
    # calcium score, a non-gated scan) it is not part of the cine
    for s in unphased:
        try:
            _series_geometry(folder, s)
            on_grid = _grid_key(s) == cine_grid
        except InputError:
            on_grid = False
        if on_grid:
            raise InputError(folder, f"{s.label()}: no cardiac phase: neither NominalPercentageOfCardiacPhase "
                                     "(0020,9241) nor a percentage in SeriesDescription, on the grid of the "
                                     "cine's phases (a phase whose tag is missing?)")
        left_out.append(f"{s.label()}: no cardiac phase, and not on the cine's grid (not part of the cine)")
    _cut_to_shared_slices(folder, series, left_out)
    ref = series[0]
    ref_shape = (ref.slices[0].columns, ref.slices[0].rows, len(ref.slices))
    for s in series[1:]:
        shape = (s.slices[0].columns, s.slices[0].rows, len(s.slices))
        if shape != ref_shape or not np.allclose(s.affine, ref.affine, atol=_GRID_ATOL):
            raise InputError(folder, f"{s.label()} at {s.phase()}: grid (shape {shape}) differs from "
                                     f"{ref.label()} (shape {ref_shape}); all phases must share one grid")
    original = ref.affine
    canon_shape, canon_affine = canonical_grid(ref_shape, original)

    def load_phase(t: int) -> np.ndarray:
        return np.ascontiguousarray(to_canonical(_load_series(series[int(t)]), original)[0])

    return Scan(scan_id=scan_id_of(folder), source=folder, format=ScanFormat.DICOM,
                affine=canon_affine, original_affine=original, shape=canon_shape,
                n_phases=len(series), load_phase=load_phase,
                phase_percent=[s.percent for s in series] if all(s.percent is not None for s in series) else None,
                left_out=left_out, notes=notes)


def read_dicom_volume(path: Path, left_out: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One 3-D DICOM series (a folder holding exactly one series, or one multi-frame file): (float32
    HU (I, J, K) in canonical RAS order, its affine, the original affine). What the folder holds
    besides the series and cannot place (second copies, images with no position: a dose report)
    is left out and named in ``left_out``, as :func:`read_dicom` does.

    Raises:
        InputError: no DICOM images, several series (name the phase to use), bad geometry, a
            single-frame image given as a file.
    """
    folder = Path(path)
    _check_source(folder, "a folder holding one DICOM series")
    series = list(_collect(folder, left_out).values())
    if not series:
        raise InputError(folder, "no DICOM image files found (searched recursively)")
    if len(series) > 1:
        labels = "; ".join(s.label() for s in series[:3])
        raise InputError(folder, f"{len(series)} DICOM series ({labels}{' …' if len(series) > 3 else ''}): "
                                 "a single frame needs a folder holding exactly one series")
    s = series[0]
    _series_geometry(folder, s)
    canon, affine = to_canonical(_load_series(s), s.affine)
    return np.ascontiguousarray(canon), affine, s.affine
