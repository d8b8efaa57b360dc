"""bench/gpu_suite.py: the one GPU measurement command runs end to end on the CPU (``--smoke``)
where only PyTorch and numpy exist, as on the GPU machines (no Ray, MLflow, nibabel, pydantic or
YAML), writes consistent JSON, and skips cleanly without a CUDA device.

Speed is not asserted (the figures are the suite's output, not a test); the arithmetic of its
projections and the pinned default settings are.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.py"
# what the GPU machines lack: importing any of these inside the suite must fail the test
MISSING_ON_GPU_MACHINE = ("ray", "mlflow", "nibabel", "pydantic", "yaml", "pydicom", "SimpleITK",
                          "webdataset")  # tqdm: torch itself may import it

BLOCKER = f"""
import runpy, sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {MISSING_ON_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)")
sys.meta_path.insert(0, _Missing())
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name='__main__')
"""


def _suite(*args: str, blocked: bool = True, script: Path = SUITE) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", BLOCKER, str(script), *args] if blocked else [sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


def _load_suite():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_suite


@pytest.mark.slow
def test_smoke_runs_every_section_without_ray_mlflow_nibabel_pydantic(tmp_path):
    proc = _suite("--smoke", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert doc["status"] == "done" and doc["errors"] == {} and doc["scale"] == "smoke"
    assert json.loads(proc.stdout) == doc
    res = doc["results"]
    assert list(res) == ["train_throughput", "generate_throughput", "cv_wallclock", "annotation", "determinism",
                         "projections"]
    det = res["determinism"]["measured"]  # on the CPU against the CPU: identical by construction
    assert det["cpu_streams_identical"] and det["noise_field_identical"] and det["decode_fp32_max_abs_diff_vox"] == 0

    tr = res["train_throughput"]["measured"]
    assert [g["grid"] for g in tr["grids"]] == [[16, 16, 16], [16, 16, 8]]
    for g in tr["grids"]:
        assert g["reference"]["recipe"] == "fp32, eager, contiguous"
        assert g["project"]["recipe"] == "channels_last_3d"  # what `train` runs on a CPU
        assert g["speedup"] == pytest.approx(g["project"]["samples_per_s"] / g["reference"]["samples_per_s"], rel=1e-2)
    # same initialisation, same data, fp32 on the CPU: the two recipes learn the same thing
    p = tr["parity"]
    assert p["project_val_rec_epe_vox"] == pytest.approx(p["reference_val_rec_epe_vox"], rel=1e-3)

    ge = res["generate_throughput"]["measured"]
    assert ge["bytes_per_sample"] == 16 * 16 * 8 * (2 + 2 + 6)
    for k in ("reference_decode_warp", "decode_warp", "reference_with_writer", "decode_warp_writer_local_disk"):
        r = ge[k]
        assert r["mb_per_s"] == pytest.approx(r["samples_per_s"] * ge["bytes_per_sample"] / 2**20, rel=1e-2)

    cv = res["cv_wallclock"]
    sweep = 44 * 2000 * math.ceil(43 / 16) * 16
    assert sweep == 4_224_000
    assert str(sweep) in cv["projected"]["sweep"]
    assert [r["folds_per_device"] for r in cv["measured"]["packing"]] == [1, 2]
    for r, pr in zip(cv["measured"]["packing"], cv["projected"]["packing"]):
        assert r["measured_samples"] == r["folds_per_device"] * 2 * 2  # N folds × steps × batch
        assert pr["sweep_gpu_h"] == pytest.approx(sweep / r["samples_per_s"] / 3600, abs=1e-3)

    an = res["annotation"]["measured"]
    assert an["epoch"]["pairs"] == 4 and an["epoch"]["steps_per_epoch"] == 2
    assert an["epoch"]["epoch_s"] == pytest.approx(an["epoch"]["step_s"] * 2, rel=1e-2)
    assert an["refine"]["zero_flow_epe_vox"] > 0

    pr = res["projections"]["projected"]
    assert pr["annotation_stage_h"]["value"] == pytest.approx(
        (300 * an["epoch"]["epoch_s"] + 44 * an["refine"]["seconds"]) / 3600, abs=1e-3)
    assert pr["corpus_1m_gpu_h_decode_warp"]["value"] == pytest.approx(
        1e6 / ge["decode_warp"]["samples_per_s"] / 3600, rel=1e-2)
    assert pr["cv_sweep_gpu_h"]["value"] == min(x["sweep_gpu_h"] for x in cv["projected"]["packing"])
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## Training step (measured)" in md and "## Projections" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the suite would run")
def test_without_cuda_the_suite_says_skipped_and_exits_zero(tmp_path):
    proc = _suite("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no CUDA device" in proc.stderr
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert doc["status"] == "skipped" and "results" not in doc


def test_unknown_section_is_refused(tmp_path):
    proc = _suite("--smoke", "--sections", "train_throughput,warp_speed", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown section(s) warp_speed" in proc.stderr


def test_pinned_defaults_equal_the_config_defaults():
    """The suite cannot read the config (no pydantic there): its copies must equal the config's."""
    from cardiomotion.config import load_config
    from cardiomotion.train.settings import StepSettings

    gs = _load_suite()
    cfg = load_config(None)
    assert gs.DEFAULT_STEP == StepSettings.from_config(cfg)
    pwc = cfg.annotate.pwc
    assert gs.DEFAULT_PWC == {"channels": tuple(pwc.channels), "search_range": pwc.search_range,
                              "estimator_channels": tuple(pwc.estimator_channels), "context": pwc.context,
                              "cost_chunk": pwc.cost_chunk}
    a = cfg.annotate
    assert gs.DEFAULT_ANNOTATE == {k: getattr(a, k) for k in gs.DEFAULT_ANNOTATE}
    assert gs.FULL.channels == tuple(pwc.channels) and gs.FULL.batch == cfg.train.batch_size


def test_budgets_bound_the_full_run_under_eight_minutes():
    gs = _load_suite()
    assert set(gs.FULL.budgets_s) == set(gs.SECTIONS)
    assert sum(gs.FULL.budgets_s.values()) + 30 <= 8 * 60  # + start-up; every section fits its steps to its budget
    assert gs.fit_steps(20, 0.5, 5.0) == 10 and gs.fit_steps(20, 0.1, 5.0) == 20 and gs.fit_steps(20, 9.0, 5.0, 2) == 2


@pytest.mark.slow
def test_gpu_profile_smoke_splits_generation_and_profiles_the_step(tmp_path):
    """bench/gpu_profile.py (where the GPU time goes) runs where only PyTorch exists, too."""
    proc = _suite("--smoke", "--out", str(tmp_path), script=REPO / "bench" / "gpu_profile.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_profile.json").read_text())
    blocks = doc["generate"]["blocks"]
    assert [b["batch"] for b in blocks] == [2, 4]
    for b in blocks:  # each part is a positive time; drawing the latents is a small part of the block
        parts = ("decode_block_s", "device_work_s", "latents_cpu_s", "copy_pageable_s")
        assert all(b[k] > 0 for k in parts)
        assert b["latents_cpu_s"] < b["decode_block_s"]
    train = doc["train"]
    assert train["steps"] == 2 and train["step_s_plain"] > 0 and train["top_device_ops"]
