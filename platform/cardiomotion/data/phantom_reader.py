"""Reader of a phantom patient folder: ``ct.nii.gz`` (4-D) plus ES/ED from ``meta.json``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import InputError
from ..layout import PHANTOM_CT, PHANTOM_META
from .scan import Scan, ScanFormat, read_scan, register_reader


@register_reader(ScanFormat.PHANTOM)
def read_phantom(path: Path) -> Scan:
    """A phantom patient folder as a :class:`Scan` with ``es_phase``/``ed_phase`` from meta.json."""
    meta_path = path / PHANTOM_META
    try:
        meta = json.loads(meta_path.read_text())
        es, ed = int(meta["es_phase"]), int(meta["ed_phase"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(meta_path, f"not a valid phantom meta.json ({exc.__class__.__name__}: {exc})") from None
    scan = read_scan(path / PHANTOM_CT, ScanFormat.NIFTI_4D)
    for name, t in (("es_phase", es), ("ed_phase", ed)):
        if not 0 <= t < scan.n_phases:
            raise InputError(meta_path, f"{name} = {t} is outside the scan's phases 0..{scan.n_phases - 1}")
    percent = meta.get("phase_percent")
    return dataclasses.replace(
        scan,
        scan_id=path.name,
        source=path,
        format=ScanFormat.PHANTOM,
        es_phase=es,
        ed_phase=ed,
        phase_percent=[float(p) for p in percent] if percent else None,
    )
