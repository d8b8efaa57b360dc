"""ES/ED phases: from a manifest when given, otherwise estimated from the images.

The estimate (documented in the README): in each phase, count the voxels whose HU lies in the
contrast-enhanced blood range inside a sphere of radius ``roi_mm`` around the blood centroid of
the first phase, on ≈3 mm blocks (block means, so that phases of different noise, as under ECG
dose modulation, count alike). The ventricles lose more blood volume in systole than the
atria gain, so ES is the phase of minimum and ED the phase of maximum blood-pool volume. It is
an intensity-based estimate of LV volume, not a segmentation: give a manifest when it matters.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from .scan import Scan


@dataclass(frozen=True)
class PhaseChoice:
    """ES/ED indices and where they came from ('manifest', 'meta' or 'detected')."""

    es_phase: int
    ed_phase: int
    source: str
    blood_ml: tuple[float, ...] | None = None  # per phase, when detected


#: cortical bone, HU: above it (and above the blood range) a voxel is bone to the crop's centring;
#: a bright, noisy blood pool near the blood range's top (low-kV CTA) stays below it
BONE_HU = 1000.0


def _block_step(spacing: np.ndarray, target_mm: float = 3.0) -> np.ndarray:
    """Voxels per step of about ``target_mm`` along each axis, (3,) int, at least 1; ``spacing`` in mm."""
    return np.maximum(1, np.floor(target_mm / np.asarray(spacing, float))).astype(int)


def _strided(vol: np.ndarray, spacing: np.ndarray, target_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Every n-th voxel of ``vol`` (about ``target_mm`` apart) and its spacing (mm): the crop's
    centring (:func:`blood_centroid` smooths it after)."""
    step = _block_step(spacing, target_mm)
    return vol[:: step[0], :: step[1], :: step[2]], spacing * step


def _block_means(vol: np.ndarray, spacing: np.ndarray, target_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """``vol`` (I, J, K) averaged over blocks of about ``target_mm`` (float32; the voxels past the last
    whole block dropped) and the block size in voxels, (3,) int. Means, not every n-th voxel: a
    strided pick keeps each voxel's noise, and under ECG dose modulation, where the phases differ in
    noise, noisy myocardium (~130 HU) crosses into the blood range in the noisy phases only."""
    step = np.minimum(_block_step(spacing, target_mm), np.asarray(vol.shape))  # thinner than a block along an axis: one block there
    n = np.asarray(vol.shape) // step
    cut = vol[: n[0] * step[0], : n[1] * step[1], : n[2] * step[2]]
    blocks = cut.reshape(n[0], step[0], n[1], step[1], n[2], step[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32), step


def _block_centres_mm(shape: tuple[int, ...], step: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Centres (mm from voxel 0's centre) of the blocks of :func:`_block_means`, (I', J', K', 3)."""
    idx = np.stack(np.meshgrid(*(np.arange(k) for k in shape), indexing="ij"), -1)
    return (idx * step + (step - 1) / 2.0) * spacing


def blood_centroid(vol: np.ndarray, spacing: np.ndarray, blood_hu: tuple[float, float]) -> np.ndarray | None:
    """Voxel index (float, (3,)) of the centroid of the largest blood-HU component, or None.

    Bone is cut out first: cortical bone is denser than blood (above ``blood_hu`` and
    :data:`BONE_HU`), and where it
    and its ~3 mm surroundings are left in, the smoothing joins the descending aorta to the
    vertebrae, whose cancellous bone lies in the blood range, and the spine pulls the centroid
    ~25 mm behind the heart (a synthetic chest in ``tests/test_prepare.py``). Only dense voxels
    with dense neighbours count as bone (noise above the range is scattered), so a scan without
    any, as the phantom, is centred as before."""
    small, sp = _strided(vol, spacing)
    smooth = ndimage.uniform_filter(small, size=3)
    mask = (smooth >= blood_hu[0]) & (smooth <= blood_hu[1])
    dense = small > max(blood_hu[1], BONE_HU)
    if dense.any():
        dense &= ndimage.convolve(dense.astype(np.uint8), np.ones((3, 3, 3), np.uint8), mode="constant") >= 4
        mask &= ~ndimage.binary_dilation(dense)
    if not mask.any():
        return None
    lab, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    biggest = lab == (1 + int(np.argmax(sizes)))
    c = np.array(ndimage.center_of_mass(biggest))
    return c * (sp / spacing)


def _hu_hint(vol: np.ndarray, blood_hu: tuple[float, float]) -> str:
    """``"; <note>"`` when ``vol`` does not look like HU (:func:`~cardiomotion.data.intensity.hu_note`),
    else ``""``: the likelier cause of a failed detection."""
    from .intensity import hu_note

    note = hu_note(vol, blood_hu)
    return f"; {note}" if note else ""


def blood_pool_volumes(scan: Scan, blood_hu: tuple[float, float], roi_mm: float = 70.0) -> np.ndarray:
    """Blood-HU volume (ml) per phase inside a sphere around the heart, shape (T,)."""
    spacing = scan.spacing
    first = scan.phase(0)
    center = blood_centroid(first, spacing, blood_hu)
    if center is None:
        raise InputError(scan.source, f"no voxels in the blood HU range {blood_hu}: cannot detect ES/ED; "
                                      f"give the phases in a manifest{_hu_hint(first, blood_hu)}")
    volumes = []
    for t in range(scan.n_phases):
        vol = first if t == 0 else scan.phase(t)
        small, step = _block_means(vol, spacing)
        dist = np.sqrt(((_block_centres_mm(small.shape, step, spacing) - center * spacing) ** 2).sum(-1))
        mask = (small >= blood_hu[0]) & (small <= blood_hu[1]) & (dist <= roi_mm)
        volumes.append(mask.sum() * float(np.prod(step * spacing)) / 1000.0)
    return np.asarray(volumes)


def detect_es_ed(scan: Scan, blood_hu: tuple[float, float]) -> PhaseChoice:
    """ES = phase of minimum, ED = phase of maximum blood-pool volume (see module docstring)."""
    vols = blood_pool_volumes(scan, blood_hu)
    es, ed = int(np.argmin(vols)), int(np.argmax(vols))
    if es == ed:
        raise InputError(scan.source, "blood-pool volume does not change over the phases: cannot detect "
                                      f"ES/ED; give the phases in a manifest{_hu_hint(scan.phase(0), blood_hu)}")
    return PhaseChoice(es, ed, "detected", tuple(float(v) for v in vols))


def _phase_index(value, path: Path, sid: str, name: str) -> int:
    """A manifest's phase index: an int, or a number or string that is a whole number ("3", 3.0);
    not a JSON ``true``."""
    try:
        f = float(str(value).strip())
    except ValueError:
        raise InputError(path, f"{sid}: {name} {value!r} is not a phase index") from None
    if not f.is_integer():
        raise InputError(path, f"{sid}: {name} {value!r} is not a whole number (a phase index from 0, "
                               "not a percentage of the cycle)")
    return int(f)


def _json_records(data) -> list[dict]:
    """The per-scan records of a JSON manifest in any of its three forms: ``{scan_id: {es_phase,
    ed_phase}}``, a list of ``{scan_id, es_phase, ed_phase}`` (pandas ``orient="records"``), or
    columns ``{"scan_id": {...}, "es_phase": {...}, "ed_phase": {...}}`` (pandas' default)."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise TypeError("not a JSON object or list")
    columns = ("scan_id", "es_phase", "ed_phase")
    if set(columns) <= set(data) and all(isinstance(data[c], (dict, list)) for c in columns):
        cols = {c: (list(data[c].values()) if isinstance(data[c], dict) else data[c]) for c in columns}
        if len({len(v) for v in cols.values()}) != 1:
            raise ValueError("the columns scan_id, es_phase, ed_phase differ in length")
        return [dict(zip(columns, row)) for row in zip(*(cols[c] for c in columns))]
    return [{"scan_id": sid, **rec} for sid, rec in data.items()]


def read_manifest(path: str | Path) -> dict[str, tuple[int, int]]:
    """ES/ED phase indices (from 0, in the scan's phase order) per scan id, from a CSV (columns
    scan_id, es_phase, ed_phase; comma, semicolon or tab separated) or a JSON file.

    JSON forms: ``{"scan_id": {"es_phase": 3, "ed_phase": 0}, ...}``, a list of records
    ``[{"scan_id": ..., "es_phase": 3, "ed_phase": 0}, ...]``, or pandas' column layout.

    Raises:
        InputError: the file is missing or unreadable, a column is missing, a scan is listed twice,
            or a phase is not a whole number.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest does not exist")
    records: list[tuple[str, object]] = []  # (where, record)
    try:
        if path.suffix.lower() == ".json":
            records = [(f"record {i}", rec) for i, rec in enumerate(_json_records(json.loads(path.read_text())), 1)]
        else:
            with path.open(newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheet BOMs
                text = fh.read()
            first = text.splitlines()[0] if text.strip() else ""
            delimiter = max(",;\t", key=first.count) if first else ","
            reader = csv.DictReader(text.splitlines(), delimiter=delimiter, skipinitialspace=True)
            reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
            records = [(f"line {line}", row) for line, row in enumerate(reader, start=2)]
        out: dict[str, tuple[int, int]] = {}
        for where, rec in records:
            if not isinstance(rec, dict):
                raise TypeError(f"{where} is not a record")
            sid = str(rec["scan_id"]).strip()
            if sid in out:
                raise InputError(path, f"scan id {sid!r} appears twice ({where} repeats it): give each scan one row")
            out[sid] = (_phase_index(rec["es_phase"], path, sid, "es_phase"),
                        _phase_index(rec["ed_phase"], path, sid, "ed_phase"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(path, f"manifest needs scan_id, es_phase, ed_phase per scan ({exc.__class__.__name__}: {exc})") from None
    return out


def choose_phases(scan: Scan, blood_hu: tuple[float, float], manifest: dict[str, tuple[int, int]] | None = None) -> PhaseChoice:
    """Manifest entry, else the reader's (phantom meta.json), else detection."""
    if manifest and scan.scan_id in manifest:
        es, ed = manifest[scan.scan_id]
        source = "manifest"
    elif scan.es_phase is not None and scan.ed_phase is not None:
        es, ed, source = scan.es_phase, scan.ed_phase, "meta"
    else:
        return detect_es_ed(scan, blood_hu)
    for name, t in (("es_phase", es), ("ed_phase", ed)):
        if not 0 <= t < scan.n_phases:
            raise InputError(scan.source, f"{source} {name} = {t} is outside the scan's phases 0..{scan.n_phases - 1}")
    if es == ed:
        raise InputError(scan.source, f"{source} gives the same phase {es} for ES and ED")
    return PhaseChoice(es, ed, source)
