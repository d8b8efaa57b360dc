"""Annotation quality against a classical peer: zero flow, demons, and the project's annotation.

For every scan of a prepared dataset that has a ground-truth flow (the phantom), register ES to
ED with multi-resolution demons (cardiomotion.evaluate.baseline.demons_flow) and measure the
true endpoint error (voxels and mm) against the truth, overall, in the heart (labels > 0) and in
the myocardium (label 2), for: zero flow, demons, and, with --annotations DIR, the annotation
stage's DIR/<scan_id>/flow.nii.gz. Also the folding fraction and the wall time per pair.
Prints one JSON document to stdout.

    python bench/annotation_baseline.py --prepared DIR [--annotations ANNOT_DIR] [--iterations N]
                                        [--figure PNG]

With --figure, a box plot of the per-scan myocardium EPE (overall EPE without labels) of zero
flow, demons and the annotation — and, where ANNOT_DIR/annotations.parquet records it, the
network's flow before refinement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from cardiomotion.data.table import load_pair, read_scan_table
from cardiomotion.errors import InputError
from cardiomotion.evaluate.baseline import DemonsSettings, default_iterations, demons_flow
from cardiomotion.flow import endpoint_error, folding_fraction, read_flow

LABEL_MYOCARDIUM = 2


def _device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} logical cores); SimpleITK demons on the CPU"


def _errors(u: np.ndarray, truth: np.ndarray, spacing: float, labels: np.ndarray | None) -> dict:
    s = (spacing, spacing, spacing)
    out: dict[str, float | None] = {}
    regions = {"": None}
    if labels is not None:
        regions["_heart"] = labels > 0
        regions["_myo"] = labels == LABEL_MYOCARDIUM
    for suffix, mask in regions.items():
        if mask is not None and not mask.any():
            out[f"epe{suffix}_vox"] = out[f"epe{suffix}_mm"] = None
            continue
        e = endpoint_error(u, truth, spacing_mm=s, mask=mask)
        out[f"epe{suffix}_vox"] = e.epe_vox
        out[f"epe{suffix}_mm"] = e.epe_mm
    out["folding_fraction"] = folding_fraction(u)
    return out


def _summary(per_scan: list[dict]) -> dict:
    methods: dict[str, list[dict]] = {}
    for rec in per_scan:
        for name, res in rec["methods"].items():
            methods.setdefault(name, []).append(res)
    summary = {}
    for name, results in methods.items():
        keys = [k for k in results[0] if isinstance(results[0][k], (int, float))]
        row: dict[str, float | int] = {"n_scans": len(results)}
        for k in keys:
            vals = [r[k] for r in results if isinstance(r.get(k), (int, float))]
            if vals:
                row[f"{k}_mean"] = float(np.mean(vals))
                row[f"{k}_std"] = float(np.std(vals))
        summary[name] = row
    return summary


def _has_truth(row) -> bool:
    v = row.get("truth_flow_path")
    return isinstance(v, str) and bool(v)


def run(prepared: Path, annotations: Path | None, settings: DemonsSettings, threads: int | None) -> dict:
    table = read_scan_table(prepared)
    per_scan = []
    grid = None
    for _, row in table.iterrows():
        if not _has_truth(row):
            continue
        pair = load_pair(prepared, row)
        truth, labels, s = pair.truth_flow, pair.ed_labels, pair.spacing_mm
        grid = {"shape": list(pair.es.shape), "spacing_mm": s}
        rec: dict = {"scan_id": pair.scan_id, "methods": {}}

        zero = np.zeros_like(truth)
        rec["methods"]["zero"] = {**_errors(zero, truth, s, labels), "seconds": 0.0}

        t0 = time.perf_counter()
        u = demons_flow(pair.es, pair.ed, s, iterations=settings.iterations,
                        smoothing_sigma=settings.smoothing_sigma, levels=settings.levels,
                        method=settings.method, update_sigma=settings.update_sigma,
                        max_step_voxels=settings.max_step_voxels, window_hu=settings.window_hu,
                        threads=threads)
        dt = time.perf_counter() - t0
        rec["methods"]["demons"] = {**_errors(u, truth, s, labels), "seconds": dt}

        if annotations is not None:
            path = annotations / pair.scan_id / "flow.nii.gz"
            if path.is_file():
                ann, _ = read_flow(path)
                if ann.shape != truth.shape:
                    raise SystemExit(f"{path}: annotation grid {ann.shape[1:]} != prepared grid {truth.shape[1:]}")
                rec["methods"]["annotation"] = _errors(ann, truth, s, labels)
            else:
                rec["annotation_missing"] = str(path)
        per_scan.append(rec)
        key = "epe_myo_mm" if labels is not None else "epe_mm"
        print(f"{pair.scan_id}: {key} zero {rec['methods']['zero'][key]:.3f} "
              f"demons {rec['methods']['demons'][key]:.3f} ({dt:.1f} s)", file=sys.stderr)
    if not per_scan:
        raise SystemExit(f"{prepared}: no scan has a ground-truth flow (phantom scans have one)")
    result = {
        "device": _device(),
        "prepared": str(prepared),
        "annotations": None if annotations is None else str(annotations),
        "grid": grid,
        "demons_settings": settings.to_dict(),
        "per_scan": per_scan,
        "summary": _summary(per_scan),
    }
    annotated = [r for r in per_scan if "annotation" in r["methods"]]
    if annotated and len(annotated) < len(per_scan):
        # Like-for-like comparison: every method over only the scans that have an annotation.
        result["summary_annotated_scans"] = _summary(annotated)
    return result


def figure(result: dict, annotations: Path | None, path: Path) -> Path:
    """The per-scan error of each method as a box plot (see the module docstring)."""
    from cardiomotion.evaluate.figures import plot_error_comparison

    scans = [r for r in result["per_scan"] if "annotation" in r["methods"]] or result["per_scan"]
    key = "epe_myo_mm" if scans[0]["methods"]["zero"].get("epe_myo_mm") is not None else "epe_mm"
    errors = {"zero flow": [r["methods"]["zero"][key] for r in scans],
              "demons": [r["methods"]["demons"][key] for r in scans]}
    table = annotations / "annotations.parquet" if annotations is not None else None
    if table is not None and table.is_file() and "annotation" in scans[0]["methods"]:
        import pandas as pd

        df = pd.read_parquet(table).set_index("scan_id")
        net_col = f"{key}_net"  # the annotate table: epe_myo_mm_net, epe_mm_net
        if net_col in df.columns and all(r["scan_id"] in df.index for r in scans):
            errors["PWC-Net"] = [float(df.loc[r["scan_id"], net_col]) for r in scans]
    if "annotation" in scans[0]["methods"]:
        errors["annotation"] = [r["methods"]["annotation"][key] for r in scans]
    region = "myocardium" if key == "epe_myo_mm" else "whole grid"
    grid = result["grid"] or {}
    title = (f"{len(scans)} phantom scans, {'×'.join(map(str, grid.get('shape', [])))} at "
             f"{grid.get('spacing_mm', '?')} mm: EPE in the {region}")
    return plot_error_comparison(errors, path, ylabel=f"EPE {region} (mm)", title=title)


def main(argv: list[str] | None = None) -> int:
    d = DemonsSettings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, type=Path, help="prepared dataset folder (scans.parquet)")
    ap.add_argument("--annotations", type=Path, default=None,
                    help="annotation folder with <scan_id>/flow.nii.gz (cardiomotion annotate --out)")
    ap.add_argument("--iterations", type=int, nargs="+", default=None,
                    help="demons iterations per pyramid level, coarse to fine (one value: every "
                         "level; default 100 at the finest, doubling per coarser level)")
    ap.add_argument("--smoothing", type=float, default=d.smoothing_sigma,
                    help="displacement-field Gaussian std, voxels of each level")
    ap.add_argument("--update-smoothing", type=float, default=d.update_sigma,
                    help="update-field Gaussian std (fluid-like), 0 = off")
    ap.add_argument("--levels", type=int, default=d.levels, help="pyramid levels")
    ap.add_argument("--max-step", type=float, default=d.max_step_voxels, help="max update step, voxels")
    ap.add_argument("--method", choices=["diffeomorphic", "symmetric"], default=d.method)
    ap.add_argument("--window", type=float, nargs=2, default=list(d.window_hu), metavar=("LO", "HI"),
                    help="HU window clipped and scaled to [0, 1]")
    ap.add_argument("--threads", type=int, default=None, help="SimpleITK threads")
    ap.add_argument("--figure", type=Path, default=None, help="also write this PNG: per-scan EPE by method")
    args = ap.parse_args(argv)
    if args.levels < 1:
        ap.error("--levels must be ≥ 1")
    if args.iterations is None:
        iterations = default_iterations(args.levels)
    else:
        iterations = args.iterations[0] if len(args.iterations) == 1 else tuple(args.iterations)
    if not isinstance(iterations, int) and len(iterations) != args.levels:
        ap.error(f"--iterations: {len(iterations)} values for {args.levels} levels")
    settings = DemonsSettings(method=args.method, iterations=iterations,
                              smoothing_sigma=args.smoothing, update_sigma=args.update_smoothing,
                              levels=args.levels, max_step_voxels=args.max_step,
                              window_hu=(args.window[0], args.window[1]))
    try:
        result = run(args.prepared, args.annotations, settings, args.threads)
    except InputError as exc:  # missing/inconsistent prepared data or a bad flow file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.figure is not None:
        result["figure"] = str(figure(result, args.annotations, args.figure))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
