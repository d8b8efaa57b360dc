"""The ``cardiomotion`` command: one sub-command per stage.

Errors the library raises for bad input become one line on stderr and exit status 2 (the full
traceback with ``--debug``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import CardiomotionError


def _say(msg: str) -> None:
    print(msg, flush=True)


def _load(args) -> "Config":  # noqa: F821
    from .config import load_config

    return load_config(getattr(args, "config", None))


# ---------------------------------------------------------------------------- phantom
def cmd_phantom(args) -> int:
    from tqdm import tqdm

    from .data.phantom import make_cohort

    pc = _load(args).phantom
    n = args.patients or pc.patients
    grid = args.grid or pc.grid
    t0 = time.perf_counter()
    with tqdm(total=n, desc="phantom", unit="patient") as bar:
        folders = make_cohort(args.out, patients=n, grid=grid, spacing_mm=args.spacing or pc.spacing_mm,
                              fov_mm=pc.fov_mm, phases=args.phases or pc.phases,
                              seed=pc.seed if args.seed is None else args.seed,
                              workers=args.workers, on_patient=lambda _p: bar.update(1))
    _say(f"wrote {len(folders)} phantom patients to {Path(args.out).resolve()} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    from .data.prepare import prepare_scans

    cfg = _load(args)
    skipped: list[str] = []
    t0 = time.perf_counter()
    table = prepare_scans(args.scans, args.out, cfg, manifest=args.manifest, on_skip=skipped.append)
    if skipped:
        _say(f"skipped {len(skipped)} scans already prepared")
    _say(f"wrote {table} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .pipeline import run_demo

    cfg = _load(args)
    t0 = time.perf_counter()
    res = run_demo(cfg, args.out, log=_say)
    _say("")
    _say(f"demo finished in {time.perf_counter() - t0:.0f} s. Everything is under {res.out}:")
    _say(f"  phantom cohort   {res.cohort}   (ct.nii.gz, labels.nii.gz, truth/flow_ed_from_es.nii.gz, meta.json)")
    _say(f"  prepared pairs   {res.prepared}   (scans.parquet, <scan>/es.nii.gz, ed.nii.gz)")
    for fig in res.figures:
        _say(f"  figure           {fig}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cardiomotion", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"cardiomotion {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantom", help="write the analytic beating-heart cohort")
    s.add_argument("--out", required=True, help="output folder (one sub-folder per patient)")
    s.add_argument("--patients", type=int, help="number of patients (config phantom.patients)")
    s.add_argument("--grid", type=int, help="voxels per axis (config phantom.grid)")
    s.add_argument("--spacing", type=float, help="voxel size in mm (default: field of view / grid)")
    s.add_argument("--phases", type=int, help="cardiac phases (config phantom.phases, 10)")
    s.add_argument("--seed", type=int, help="cohort seed (config phantom.seed)")
    s.add_argument("--workers", type=int, help="parallel processes (default: all cores)")
    s.add_argument("--config", help="YAML config (configs/default.yaml)")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("prepare", help="resample ES/ED of 4DCT scans to the common grid (Ray Data)")
    s.add_argument("--scans", nargs="+", required=True, help="4-D NIfTI files, per-phase NIfTI/DICOM folders or phantom patient folders")
    s.add_argument("--out", required=True, help="prepared dataset folder")
    s.add_argument("--manifest", help="CSV/JSON with scan_id, es_phase, ed_phase (else detected)")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("demo", help="run the whole pipeline on a phantom cohort")
    s.add_argument("--config", help="YAML config (make demo uses configs/smoke.yaml)")
    s.add_argument("--out", default="demo_output", help="output folder")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CardiomotionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
