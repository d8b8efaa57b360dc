"""Leave-one-out folds over a prepared dataset and its annotations.

Fold K holds out scan K (scans in scan-id order) and trains on the others. Inputs are checked
before any Ray work: prepared table and files, one flow per scan, the frozen pyramid.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

from ..layout import ES_FILE, FLOW_FILE, PYRAMID_FILE, SCAN_TABLE, fold_pyramid_path


@dataclass(frozen=True)
class FoldPlan:
    """What a fold trains and validates on (checked, absolute paths)."""

    fold: int
    prepared: Path
    flows: Path
    scan_ids: tuple[str, ...]  # all scans, sorted
    val_id: str
    grid: tuple[int, int, int]
    spacing_mm: float
    pyramid: Path  # the frozen pyramid that conditions this fold's CVAE (cv.pyramid)
    pyramid_protocol: str = "shared"

    @property
    def train_ids(self) -> tuple[str, ...]:
        return tuple(s for s in self.scan_ids if s != self.val_id)


def plan_fold(prepared_dir: str | Path, flows_dir: str | Path, fold: int, pyramid: str = "shared") -> FoldPlan:
    """Check the inputs of fold ``fold`` and describe it.

    ``pyramid``: ``"shared"`` — annotate's pyramid, which must exist; ``"per_fold"`` — the pyramid
    of a network trained without the held-out scan (``flows/fold_pyramids/<scan>/``), made by
    :func:`cardiomotion.annotate.train_fold_pyramid` if it is not there yet.

    Raises:
        InputError: missing/inconsistent prepared data (scans on different grids), a scan
            without a flow or with a flow file of the wrong intent, shape or grid (checked from
            the headers), no pyramid, or a fold index outside 0..N−1.
    """
    from ..data.table import check_prepared_identity, read_scan_table
    from ..flow.io import check_flow_header

    prepared = Path(prepared_dir).resolve()
    flows = Path(flows_dir).resolve()
    table = read_scan_table(prepared)
    ids = tuple(sorted(str(s) for s in table.scan_id))
    if len(ids) < 2:
        raise InputError(prepared / SCAN_TABLE, f"leave-one-out needs at least 2 scans, found {len(ids)}")
    if not 0 <= fold < len(ids):
        raise InputError(None, f"fold {fold} is out of range: {prepared} has {len(ids)} scans (folds 0..{len(ids) - 1})")
    if pyramid not in ("shared", "per_fold"):
        raise InputError("cv.pyramid", f"must be shared or per_fold, got {pyramid!r}")
    if pyramid == "shared" and not (flows / PYRAMID_FILE).is_file():
        raise InputError(flows / PYRAMID_FILE, "missing: run `cardiomotion annotate` to make the frozen pyramid")
    check_prepared_identity(prepared, flows)
    rows = table.set_index(table.scan_id.astype(str))
    first = rows.loc[ids[0]]
    grid = tuple(int(n) for n in first["shape"])
    spacing = float(first["spacing_mm"])
    for sid in ids:
        shape = tuple(int(n) for n in rows.loc[sid, "shape"])
        if shape != grid or float(rows.loc[sid, "spacing_mm"]) != spacing:
            raise InputError(prepared / SCAN_TABLE, f"scan {sid} is on a {shape} grid at "
                             f"{float(rows.loc[sid, 'spacing_mm'])} mm, scan {ids[0]} on {grid} at {spacing} mm: "
                             "prepare every scan with the same settings")
        path = flows / sid / FLOW_FILE
        if not path.is_file():
            raise InputError(path, f"missing: no annotated flow for scan {sid}")
        flow_grid = check_flow_header(path)  # header only: intent, 5-D shape
        if flow_grid != grid:
            raise InputError(path, f"flow grid {flow_grid} differs from the prepared grid {grid} of scan {sid}")
    pyr = flows / PYRAMID_FILE if pyramid == "shared" else fold_pyramid_path(flows, ids[fold])
    return FoldPlan(fold, prepared, flows, ids, ids[fold], grid, spacing, pyr, pyramid)


def readable(path: Path, read):
    """``read()``, with a damaged file (truncated gzip, corrupt NIfTI body) reported as the
    :class:`InputError` naming ``path`` — not as a crash that Ray Train would retry."""
    import zlib

    try:
        return read()
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(path, f"unreadable ({exc.__class__.__name__}: {exc})") from None


def load_samples(plan: FoldPlan, scan_ids: tuple[str, ...] | list[str], window) -> tuple[torch.Tensor, torch.Tensor]:
    """ES images (N, 1, I, J, K) in [0, 1] and their annotated flows (N, 3, I, J, K), voxels."""
    import nibabel as nib

    from ..data.intensity import hu_to_unit
    from ..flow.io import read_flow

    images, flows = [], []
    for sid in scan_ids:
        es_path = plan.prepared / sid / ES_FILE
        es = readable(es_path, lambda: np.asarray(nib.load(str(es_path)).dataobj, dtype=np.float32))
        flow, _ = readable(plan.flows / sid / FLOW_FILE, lambda: read_flow(plan.flows / sid / FLOW_FILE))
        if flow.shape[1:] != es.shape:
            raise InputError(plan.flows / sid / FLOW_FILE, f"flow grid {flow.shape[1:]} differs from ES grid {es.shape}")
        images.append(hu_to_unit(es, window))
        flows.append(flow)
    return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(flows))
