"""The whole pipeline on the embedded phantom cohort (``cardiomotion demo``).

Stages add themselves here as they land: phantom → prepare → (annotate → cv → generate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import Config
from .layout import PREVIEWS, prepared_figure_name
from .tracking import check_reachable, tracking_uri

Log = Callable[[str], None]


@dataclass
class DemoResult:
    """Where the demo wrote everything."""

    out: Path
    cohort: Path
    prepared: Path
    annotations: Path
    tracking_uri: str
    cv: Path | None = None
    corpus: Path | None = None
    cv_table: str = ""
    figures: list[Path] = field(default_factory=list)


def run_demo(cfg: Config, out: str | Path, log: Log = lambda _msg: None) -> DemoResult:
    """Run every available stage on a phantom cohort under ``out`` (resumes where it stopped)."""
    from .annotate import annotate
    from .generate import generate_corpus
    from .train.cv import run_cv
    from .data.phantom import make_cohort
    from .data.prepare import prepare_scans
    from .data.table import load_pair, read_scan_table
    from .evaluate.figures import plot_pair

    out = Path(out).resolve()
    if cfg.storage_root is None:  # keep the demo's MLflow store beside its outputs
        cfg = cfg.model_copy(update={"storage_root": str(out)})
    check_reachable(tracking_uri(cfg))  # an unreachable MLflow server fails now, not after hours
    pc = cfg.phantom
    log(f"phantom: {pc.patients} patients, {pc.grid}³ grid → {out / 'phantom'}")
    folders = make_cohort(out / "phantom", patients=pc.patients, grid=pc.grid, spacing_mm=pc.spacing_mm,
                          fov_mm=pc.fov_mm, phases=pc.phases, seed=pc.seed, rv_contrast=pc.rv_contrast)
    log(f"prepare: {len(folders)} scans → {out / 'prepared'} ({cfg.prepare.grid} voxels of {cfg.prepare.spacing_mm} mm)")
    table_path = prepare_scans(folders, out / "prepared", cfg)
    table = read_scan_table(table_path.parent)
    row = table.iloc[0]
    pair = load_pair(table_path.parent, row)
    figure = plot_pair(pair.es, pair.ed, out / "figures" / prepared_figure_name(row['scan_id']),
                       flow=pair.truth_flow, spacing=[pair.spacing_mm] * 3,
                       title=f"{row['scan_id']}: prepared ES/ED and the true ED←ES flow",
                       center=_lv_center(pair.ed_labels))
    log(f"annotate: PWC-Net + refinement → {out / 'annotations'}")
    annotations = annotate(table_path.parent, out / "annotations", cfg, log=log)
    figures = [figure, *sorted((out / "annotations" / "figures").glob("*.png"))]
    result = DemoResult(out=out, cohort=out / "phantom", prepared=table_path.parent,
                        annotations=annotations.parent, tracking_uri=tracking_uri(cfg), figures=figures)
    if cfg.demo.through == "annotate":
        return result
    log(f"cv: CVAE folds {cfg.demo.folds} concurrently on Ray → {out / 'cv'}")
    cv = run_cv(table_path.parent, annotations.parent, out / "cv", cfg, folds=cfg.demo.folds, log=log)
    done = [r for r in cv.rows if r["status"] == "done"]
    if not done:
        raise RuntimeError(f"no cross-validation fold finished: {cv.failed[0]['error'] if cv.failed else 'unknown'}")
    result.cv, result.cv_table = cv.folds_csv.parent, cv.format_table()
    if cfg.demo.through == "cv":
        return result
    model_uri = f"runs:/{done[0]['run_id']}/model"
    log(f"generate: {cfg.demo.samples} samples from {model_uri} → {out / 'corpus'}")
    manifest = generate_corpus(model_uri, table_path.parent, out / "corpus", n=cfg.demo.samples, cfg=cfg, log=log)
    result.corpus = manifest.parent
    result.figures += sorted((manifest.parent / PREVIEWS).glob("*"))
    return result


def _lv_center(labels: np.ndarray | None):
    if labels is None or not (labels == 1).any():
        return None
    return np.argwhere(labels == 1).mean(0).astype(int).tolist()
