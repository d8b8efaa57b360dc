"""ES/ED phases: from a manifest when given, otherwise estimated from the images.

The estimate (documented in the README): in each phase, count the voxels whose HU lies in the
contrast-enhanced blood range inside a sphere of radius ``roi_mm`` around the blood centroid of
the first phase, at ≈3 mm resolution. The ventricles lose more blood volume in systole than the
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


def _coarse(vol: np.ndarray, spacing: np.ndarray, target_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    step = np.maximum(1, np.floor(target_mm / spacing)).astype(int)
    return vol[:: step[0], :: step[1], :: step[2]], spacing * step


def blood_centroid(vol: np.ndarray, spacing: np.ndarray, blood_hu: tuple[float, float]) -> np.ndarray | None:
    """Voxel index (float, (3,)) of the centroid of the largest blood-HU component, or None."""
    small, sp = _coarse(vol, spacing)
    smooth = ndimage.uniform_filter(small, size=3)
    mask = (smooth >= blood_hu[0]) & (smooth <= blood_hu[1])
    if not mask.any():
        return None
    lab, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    biggest = lab == (1 + int(np.argmax(sizes)))
    c = np.array(ndimage.center_of_mass(biggest))
    return c * (sp / spacing)


def blood_pool_volumes(scan: Scan, blood_hu: tuple[float, float], roi_mm: float = 70.0) -> np.ndarray:
    """Blood-HU volume (ml) per phase inside a sphere around the heart, shape (T,)."""
    spacing = scan.spacing
    first = scan.phase(0)
    center = blood_centroid(first, spacing, blood_hu)
    if center is None:
        raise InputError(scan.source, f"no voxels in the blood HU range {blood_hu}: cannot detect ES/ED; "
                                      "give the phases in a manifest")
    volumes = []
    for t in range(scan.n_phases):
        vol = first if t == 0 else scan.phase(t)
        small, sp = _coarse(vol, spacing)
        idx = np.stack(np.meshgrid(*(np.arange(n) for n in small.shape), indexing="ij"), -1)
        dist = np.sqrt((((idx * sp) - center * spacing) ** 2).sum(-1))
        mask = (small >= blood_hu[0]) & (small <= blood_hu[1]) & (dist <= roi_mm)
        volumes.append(mask.sum() * float(np.prod(sp)) / 1000.0)
    return np.asarray(volumes)


def detect_es_ed(scan: Scan, blood_hu: tuple[float, float]) -> PhaseChoice:
    """ES = phase of minimum, ED = phase of maximum blood-pool volume (see module docstring)."""
    vols = blood_pool_volumes(scan, blood_hu)
    es, ed = int(np.argmin(vols)), int(np.argmax(vols))
    if es == ed:
        raise InputError(scan.source, "blood-pool volume does not change over the phases: cannot detect "
                                      "ES/ED; give the phases in a manifest")
    return PhaseChoice(es, ed, "detected", tuple(float(v) for v in vols))


def read_manifest(path: str | Path) -> dict[str, tuple[int, int]]:
    """ES/ED phase indices per scan id from a CSV (scan_id, es_phase, ed_phase) or JSON file.

    JSON form: ``{"scan_id": {"es_phase": 3, "ed_phase": 0}, ...}``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest does not exist")
    out: dict[str, tuple[int, int]] = {}
    try:
        if path.suffix.lower() == ".json":
            for sid, rec in json.loads(path.read_text()).items():
                out[str(sid)] = (int(rec["es_phase"]), int(rec["ed_phase"]))
        else:
            with path.open(newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheet BOMs
                reader = csv.DictReader(fh, skipinitialspace=True)
                reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
                for line, row in enumerate(reader, start=2):
                    sid = row["scan_id"].strip()
                    if sid in out:
                        raise InputError(path, f"scan id {sid!r} appears twice (line {line} repeats it): "
                                               "give each scan one row")
                    out[sid] = (int(row["es_phase"]), int(row["ed_phase"]))
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
