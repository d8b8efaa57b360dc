"""Random-weight models and synthetic prepared data for tests and benchmarks (no training).

:func:`make_random_model_dir` writes a model folder exactly like a trained model artifact
(``cvae.pt``, ``feature_pyramid.pt``, ``model.json``) with random weights whose decoder head is
rescaled so prior samples are flows of a few voxels (an untrained head outputs ~0);
:func:`make_synthetic_prepared` writes a prepared dataset (``scans.parquet`` + ES/ED NIfTI) of
heart-like blobs in HU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..layout import CVAE_FILE, ED_FILE, ES_FILE, MODEL_META, PYRAMID_FILE, scan_file


def make_random_model_dir(dst: str | Path, grid: Sequence[int] = (32, 32, 32), channels: Sequence[int] = (8, 16, 32),
                          latent_channels: int | None = 4, spacing_mm: float = 4.0,
                          window: tuple[float, float] = (-200.0, 800.0), flow_std: float = 1.5,
                          output: str = "displacement", seed: int = 0) -> Path:
    """Write a random-weight model folder; prior samples have a flow std of about ``flow_std`` voxels."""
    from ..fileio import write_json
    from ..models.cvae import MotionCVAE
    from ..models.pyramid import FeaturePyramid

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    grid = tuple(int(n) for n in grid)
    pyramid = FeaturePyramid(1, channels).eval()
    model = MotionCVAE(channels=channels, cond_channels=channels, latent_channels=latent_channels,
                       output=output).eval()
    with torch.no_grad():
        es = torch.rand((1, 1, *grid), generator=torch.Generator().manual_seed(seed))
        z = torch.randn((1, *model.latent_shape(grid)), generator=torch.Generator().manual_seed(seed + 1))
        std = float(model.decode(z, es, pyramid(es)).std())
        scale = flow_std / max(std, 1e-12)
        if output == "velocity":
            scale = min(scale, 0.5 * flow_std / max(std, 1e-12))
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale)
    model.save(dst / CVAE_FILE)
    pyramid.save(dst / PYRAMID_FILE)
    write_json(dst / MODEL_META, {
        "kind": "cardiomotion-cvae", "fold": None, "val_scan": None, "train_scans": [],
        "grid": list(grid), "spacing_mm": float(spacing_mm), "intensity_window": list(window),
        "output": output, "pyramid": pyramid.config(), "cvae": model.config(), "seed": seed,
        "flow_convention": "pull field on the ED grid, voxels: ED(x) = ES(x + u(x))",
        "note": "random weights (cardiomotion.generate.synthetic), not a trained model",
    })
    return dst


def _heart(grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid], indexing="ij"))
    c = np.asarray(grid, np.float32)[:, None, None, None] / 2 + rng.uniform(-2, 2, (3, 1, 1, 1)).astype(np.float32)
    r = np.asarray(grid, np.float32).min() * np.asarray([0.18, 0.18, 0.3])[:, None, None, None] * rng.uniform(0.85, 1.15)
    d = np.sqrt((((idx - c) / r) ** 2).sum(0))
    body = np.sqrt((((idx - np.asarray(grid, np.float32)[:, None, None, None] / 2) /
                     (np.asarray(grid, np.float32)[:, None, None, None] * 0.45)) ** 2).sum(0))
    vol = np.where(body < 1, -100.0, -800.0).astype(np.float32)  # fat inside the body, lung outside
    vol[d < 1.45] = 110.0  # myocardium
    vol[d < 1.0] = 400.0  # blood pool
    vol = gaussian_filter(vol, 0.7) + rng.normal(0, 12, vol.shape).astype(np.float32)
    return vol


def make_synthetic_prepared(dst: str | Path, n_scans: int = 3, grid: Sequence[int] = (32, 32, 32),
                            spacing_mm: float = 4.0, seed: int = 0) -> Path:
    """Write a prepared dataset of ``n_scans`` heart-like ES frames (int16 HU, ED = ES); returns the folder."""
    from ..data.table import write_scan_table
    from ..fileio import write_nifti

    dst = Path(dst)
    rng = np.random.default_rng(seed)
    grid = tuple(int(n) for n in grid)
    aff = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    aff[:3, 3] = -np.asarray(grid) * spacing_mm / 2
    records = []
    for s in range(n_scans):
        sid = f"synthetic_{s:03d}"
        es = np.clip(np.round(_heart(grid, rng)), -1024, 3000).astype(np.int16)
        write_nifti(dst / sid / ES_FILE, es, aff)
        write_nifti(dst / sid / ED_FILE, es, aff)
        records.append({"scan_id": sid, "source": "synthetic", "format": "synthetic", "es_phase": 0, "ed_phase": 0,
                        "phases_from": "synthetic", "n_phases": 1, "spacing_mm": float(spacing_mm),
                        "shape": list(grid), "center_mm": [0.0, 0.0, 0.0], "original_affine": "",
                        "es_path": scan_file(sid, ES_FILE), "ed_path": scan_file(sid, ED_FILE),
                        "truth_flow_path": None, "labels_path": None})
    write_scan_table(dst, records)
    return dst
