"""Reading every phase of a gzipped 4-D NIfTI the way ``prepare`` does (phase by phase through
:func:`cardiomotion.data.read_scan`), with nibabel's ``indexed_gzip`` opener (a dependency: gzip
with an index of seek points) against plain ``gzip`` (the reference path: nibabel without
``indexed_gzip``, which decompresses from the file's start for every phase, so T phases cost
T²/2 phase-reads), side by side in one run on one synthetic scan. Prints JSON: seconds per path,
the ratio, and whether both read the same voxels.

    python bench/nifti_phase_read.py [--shape 256 256 160] [--phases 10] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def read_all(path: Path) -> tuple[float, list[np.ndarray]]:
    from cardiomotion.data import read_scan

    t0 = time.perf_counter()
    scan = read_scan(path)
    phases = [scan.phase(t) for t in range(scan.n_phases)]
    return time.perf_counter() - t0, phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160], help="voxels per phase")
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="runs per path (the best is reported)")
    args = ap.parse_args(argv)
    import nibabel as nib
    import nibabel._compression as compression

    if not compression.HAVE_INDEXED_GZIP:
        print(json.dumps({"error": "indexed_gzip is not installed (a cardiomotion dependency): nothing to compare"}))
        return 1
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 300.0, args.shape).astype(np.int16)  # CT-like noise: compresses as CT does, a little
    data = base[..., None] + (10 * np.arange(args.phases, dtype=np.int16))
    out: dict = {"shape": args.shape, "phases": args.phases, "mb_uncompressed": data.nbytes / 2**20}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.8, 1.0])), str(path))
        out["mb_file"] = path.stat().st_size / 2**20
        seconds, ref = {}, None
        for name, indexed in (("gzip", False), ("indexed_gzip", True)):
            compression.HAVE_INDEXED_GZIP = indexed
            runs = [read_all(path) for _ in range(args.repeats)]
            seconds[name] = min(s for s, _ in runs)
            phases = runs[0][1]
            if ref is None:
                ref = phases
            else:
                out["same_voxels"] = all(np.array_equal(a, b) for a, b in zip(ref, phases))
        compression.HAVE_INDEXED_GZIP = True
    out["seconds"] = seconds
    out["speedup"] = seconds["gzip"] / seconds["indexed_gzip"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
