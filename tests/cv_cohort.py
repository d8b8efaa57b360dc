"""A 4-patient smoke cohort for the cv and tune tests, built once per test session.

phantom → prepare (the real stage), then the flows folder is made from the phantom's exact
ground-truth flows plus an untrained, seeded feature pyramid instead of running ``annotate``
(the CVAE only needs flows + a frozen pyramid; the annotation stage has its own tests). Both
test modules call :func:`cohort`; the result is cached under pytest's session base temp dir.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TINY = {
    "prepare": {"spacing_mm": 4.0, "grid": [32, 32, 32]},
    "annotate": {"pwc": {"channels": [8, 16, 32], "estimator_channels": [16, 16], "search_range": 1}},
    "train": {"epochs": 2, "batch_size": 2, "checkpoint_every": 1, "prior_samples": 2, "lr": 2e-3,
              "num_workers": 1, "resources": {"cpus": 0.5}, "max_failures": 1, "augment": {"max_shift": 1}},
    # annotate's pyramid for every fold: these tiny sweeps test the sweep, not the protocol
    # (tests/test_fold_pyramid.py tests the default, per_fold)
    "cv": {"progress_every_s": 1.0, "pyramid": "shared"},
    "ray": {"num_cpus": 2, "dashboard": False},
}


def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """(prepared, flows) of a 4-patient 32³ phantom cohort."""
    import torch

    from cardiomotion.config import load_config
    from cardiomotion.data.phantom import make_cohort
    from cardiomotion.data.prepare import prepare_scans
    from cardiomotion.data.table import read_scan_table
    from cardiomotion.models.pyramid import FeaturePyramid

    root = tmp_path_factory.getbasetemp() / "cv_cohort"
    prepared, flows = root / "prepared", root / "flows"
    if (flows / "feature_pyramid.pt").is_file():
        return prepared, flows
    cfg = load_config(None, {**TINY, "storage_root": str(root / "store")})
    folders = make_cohort(root / "cohort", patients=4, grid=32, workers=1)
    prepare_scans(folders, prepared, cfg)
    for row in read_scan_table(prepared).to_dict("records"):
        dst = flows / str(row["scan_id"]) / "flow.nii.gz"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(prepared / row["truth_flow_path"], dst)
    torch.manual_seed(0)
    FeaturePyramid(channels=cfg.annotate.pwc.channels).save(flows / "feature_pyramid.pt")
    return prepared, flows


def tiny_utility_config(store: Path, arms: list[str], **utility):
    """The tiny `utility` runs' settings (tests/test_utility_run.py): one
    CVAE epoch, corpora of 4 in shards of 4, estimators of 2 steps, ``arms``, the storage root
    ``store``; ``utility`` overrides."""
    from cardiomotion.config import load_config

    return load_config(None, {**TINY, "storage_root": str(store), "train": {**TINY["train"], "epochs": 1},
                              "generate": {"shard_size": 4, "batch_size": 2, "actors": 1, "previews": 0},
                              "utility": {"arms": arms, "sizes": [4], "seeds": 1, "steps": 2, "batch_size": 2,
                                          "demons": False, "bootstrap": 100, "resources": {"cpus": 0.5},
                                          "max_concurrent": 2, **utility}})
