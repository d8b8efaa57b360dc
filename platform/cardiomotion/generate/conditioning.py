"""The frames a corpus is conditioned on: the ES frames of a prepared folder, checked against the
model they are to be decoded with."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..layout import SCAN_TABLE
from .model import ResolvedModel, load_networks


def load_frames(prepared_dir: str | Path) -> dict[str, Any]:
    """The ES frames of a prepared dataset: {"scan_ids" (sorted), "es" (n, I, J, K) int16 HU,
    "affines" (n, 4, 4), "es_sha256" (of each frame's int16 voxels and affine), "spacing_mm"}.

    Raises:
        InputError: no scan table, unreadable frames, or frames on different grids.
    """
    import nibabel as nib

    from ..data.table import read_scan_table

    prepared = Path(prepared_dir).resolve()
    table = read_scan_table(prepared)
    if len(table) == 0:
        raise InputError(prepared / SCAN_TABLE, "holds no scans")
    rows = sorted(table.to_dict("records"), key=lambda r: str(r["scan_id"]))
    ids, frames, affines, shas = [], [], [], []
    for row in rows:
        path = prepared / row["es_path"]
        try:
            img = nib.load(str(path))
            vol = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:
            raise InputError(path, f"unreadable ES frame ({exc.__class__.__name__}: {exc})") from None
        if vol.ndim != 3 or not np.all(np.isfinite(vol)):
            raise InputError(path, f"ES frame must be a finite 3-D volume, got shape {vol.shape}")
        if frames and vol.shape != frames[0].shape:
            raise InputError(path, f"grid {vol.shape} differs from {frames[0].shape} of {ids[0]}")
        es = np.clip(np.round(vol), -32768, 32767).astype(np.int16)
        aff = np.asarray(img.affine, dtype=np.float64)
        h = hashlib.sha256(es.tobytes())
        h.update(np.round(aff, 6).tobytes())
        ids.append(str(row["scan_id"]))
        frames.append(es)
        affines.append(aff)
        shas.append(h.hexdigest())
    spacing = float(np.sqrt((affines[0][:3, :3] ** 2).sum(0))[0])
    provenance = [{k: (None if row.get(k) is None or row.get(k) != row.get(k) else str(row[k]))
                   for k in ("source", "format", "phases_from")} for row in rows]  # NaN → None
    return {"scan_ids": ids, "es": np.stack(frames), "affines": np.stack(affines), "es_sha256": shas,
            "spacing_mm": spacing, "prepared": str(prepared), "provenance": provenance}


def check_model_fits(resolved: ResolvedModel, frames: dict[str, Any], prepared: Path) -> None:
    grid = tuple(int(n) for n in frames["es"].shape[1:])
    if tuple(resolved.grid) != grid:
        raise InputError(resolved.uri, f"model grid {list(resolved.grid)} does not match the prepared data's "
                                       f"grid {list(grid)} ({prepared}); use the prepared data the model was trained on")
    spacing = resolved.meta.get("spacing_mm")
    if spacing is not None and abs(float(spacing) - frames["spacing_mm"]) > 1e-3 * float(spacing):
        raise InputError(resolved.uri, f"model spacing {spacing} mm does not match the prepared data's "
                                       f"{frames['spacing_mm']:g} mm ({prepared})")
    model, _ = load_networks(resolved.blobs())
    try:
        model.check_grid(grid)
    except ValueError as exc:
        raise InputError(resolved.uri, str(exc)) from None
