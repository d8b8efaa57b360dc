"""Single 3-D frames prepared as ES frames for a trained model (``generate --frames``).

A trained CVAE needs only an ES-like frame to generate, so any single-phase cardiac CT can
condition a corpus. Each frame (:func:`cardiomotion.data.volume.read_volume`: NIfTI, NRRD,
MetaImage, a one-series DICOM folder or a multi-frame DICOM file) is prepared as ``prepare``
prepares an ES frame: a box of the model's grid and voxel size (from its ``model.json``) centred on
the heart, one anti-aliased resampling, stored as int16 HU
(:func:`cardiomotion.data.prepare.prepare_scan`). The one difference: ``prepare`` centres the box
on the ED frame's blood pool and crops ES with it; a lone frame has no ED, so the box is centred on
the frame's own blood pool.

The result is a prepared folder (``scans.parquet`` with ``phases_from = "frame"``, the source
path and format of each frame, ``<id>/es.nii.gz``) that ``generate`` reads like any other;
preparation runs on Ray Data, resumes (finished frames are kept) and holds a folder lock.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..config import Config, PrepareConfig
from ..errors import InputError
from ..fileio import atomic_dir, exclusive_lock, write_json, write_nifti
from ..layout import ES_FILE, scan_file
from .prepare import config_fingerprint, guarded_row, plan_scans, raise_row_errors, reader_notes, store_as
from .preprocess import grid_affine, heart_center, resample
from .table import RECORD, read_record, write_scan_table
from .volume import Volume, frame_id_of, read_volume, volume_format

PHASES_FROM = "frame"  # scans.parquet's phases_from for a prepared single frame


def frame_settings(cfg: PrepareConfig, grid, spacing_mm: float) -> PrepareConfig:
    """``prepare`` settings with the model's grid and voxel size."""
    # a tuple, as the field holds it (model_copy does not validate; a list makes pydantic warn on dump)
    return cfg.model_copy(update={"grid": tuple(int(n) for n in grid), "spacing_mm": float(spacing_mm)})


def prepare_frame(vol: Volume, frame_id: str, out_dir: Path, cfg: PrepareConfig) -> dict:
    """Prepare one frame into ``out_dir/<frame_id>/es.nii.gz``; returns its scan-table record
    (with ``notes``, what its reader left out or noted and intensities that do not look like HU,
    when there are any: not a column of the table)."""
    center = heart_center(vol.array, vol.affine, tuple(cfg.blood_hu), cfg.center.value)
    grid = tuple(cfg.grid)
    out_aff = grid_affine(center, grid, cfg.spacing_mm)
    es = resample(vol.array, vol.affine, out_aff, grid, cval=cfg.pad_hu)
    record = {
        "scan_id": frame_id, "source": str(vol.source), "format": vol.format.value, "es_phase": None,
        "ed_phase": None, "phases_from": PHASES_FROM, "n_phases": 1, "spacing_mm": float(cfg.spacing_mm),
        "shape": list(grid), "center_mm": [float(c) for c in center],
        "original_affine": json.dumps(np.asarray(vol.original_affine).tolist()),
        "es_path": scan_file(frame_id, ES_FILE), "ed_path": None, "truth_flow_path": None, "labels_path": None,
        "es_labels_path": None,
    }
    from .intensity import hu_note

    notes = reader_notes(vol.left_out, vol.notes)
    if hu := hu_note(vol.array, tuple(cfg.blood_hu)):
        notes.append(hu)
    if notes:  # in prepared.json, not the table
        record["notes"] = notes
    with atomic_dir(out_dir / frame_id) as tmp:
        write_nifti(tmp / ES_FILE, store_as(es, cfg.dtype), out_aff)
        write_json(tmp / RECORD, {"record": record, "fingerprint": config_fingerprint(cfg)})
    return record


def _frame_row(row: dict) -> dict:
    """Ray Data UDF: prepare one frame; failures come back as data (:func:`guarded_row`)."""
    cfg = PrepareConfig.model_validate_json(row["cfg"])
    return guarded_row(row, lambda: prepare_frame(read_volume(row["path"]), row["scan_id"], Path(row["out"]), cfg))


def plan_frames(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(frame id, path) of each frame, checked on the driver: paths exist with a known format,
    ids are unique (files named alike in different folders are named by their folders,
    :func:`~cardiomotion.data.prepare.distinct_ids`; the same file twice is refused, naming it)."""
    paths = [Path(p).expanduser() for p in paths]
    for path in paths:
        volume_format(path)  # a missing path or an unknown format: refused before any work
    return plan_scans(paths, id_of=frame_id_of)


def prepare_frames(paths: Iterable[str | Path], out_dir: str | Path, cfg: Config, grid, spacing_mm: float,
                   log: Callable[[str], None] = lambda _m: None) -> Path:
    """Prepare single frames for a model of ``grid`` and ``spacing_mm`` into ``out_dir``; returns
    the path of its ``scans.parquet``.

    What a frame's reader left out (a DICOM folder's dose report) or noted (an orientation the
    file does not state) is logged as ``note: <id>: …`` on every run and kept in its
    ``prepared.json``.

    A frame already prepared there from the same source with the same settings is kept; a frame
    id prepared from another source, or the folder holding frames that were not asked for, is
    refused (a corpus' frames never change under it).

    Raises:
        InputError: a missing or unreadable frame, duplicate ids, a folder of other frames.
        StageFailed: the file system refused a write; finished frames are kept.
    """
    out = Path(out_dir).resolve()
    pcfg = frame_settings(cfg.prepare, grid, spacing_mm)
    fingerprint = config_fingerprint(pcfg)
    items = plan_frames(paths)
    wanted = {fid for fid, _ in items}
    with exclusive_lock(out, "frames"):
        if out.is_dir():
            stray = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in wanted
                           and read_record(p) is not None)
            if stray:
                raise InputError(out, f"holds other prepared frames ({', '.join(stray[:3])}"
                                      f"{' …' if len(stray) > 3 else ''}); a corpus' frames never change: "
                                      "use another --out")
        done, todo = [], []
        for fid, path in items:
            rec = read_record(out / fid)
            if rec is not None:
                if rec.get("fingerprint") != fingerprint or rec["record"].get("source") != str(path):
                    raise InputError(out / fid, f"was prepared from {rec['record'].get('source')} with these or "
                                                f"other settings, not from {path}; use another --out")
                done.append(rec["record"])
                continue
            todo.append({"scan_id": fid, "path": str(path), "out": str(out), "cfg": pcfg.model_dump_json()})
        log(f"frames: {len(items)} frames → {out} ({len(done)} already prepared, {len(todo)} to prepare; grid "
            f"{list(pcfg.grid)} at {pcfg.spacing_mm:g} mm)")
        if todo:
            from ..raycluster import init_ray

            ray = init_ray(cfg.ray)
            rows = ray.data.from_items(todo, override_num_blocks=len(todo)).map(_frame_row, num_cpus=1).take_all()
            raise_row_errors(rows, "frames")
            done.extend(json.loads(r["record"]) for r in rows)
        for record in sorted(done, key=lambda r: r["scan_id"]):  # on every run, as prepare's notes
            for line in record.get("notes") or []:
                log(f"note: {record['scan_id']}: {line}")
        return write_scan_table(out, done)
