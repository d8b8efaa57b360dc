"""CVAE fold training: 2-worker gloo DDP, MLflow run, checkpoints and resume, input checks."""
from __future__ import annotations

import mlflow
import pytest
import torch

from cardiomotion.config import load_config
from cardiomotion.errors import ConfigError, InputError

TINY = {
    "prepare": {"spacing_mm": 4.0, "grid": [32, 32, 32]},
    "annotate": {"pwc": {"channels": [8, 16, 32], "estimator_channels": [16, 16], "search_range": 1},
                 "epochs": 2, "checkpoint_every": 2, "refine_steps": 10, "refine_levels": 1},
    "train": {"epochs": 6, "batch_size": 2, "checkpoint_every": 2, "prior_samples": 2, "lr": 2e-3,
              # No augmentation here: with one step per epoch, random zooms and shifts change the
              # target's size more than 6 steps of training change the fit, and this test checks
              # that training lowers the loss (augmentation has its own tests).
              "num_workers": 2, "augment": {"max_shift": 1, "p": 0.0}},
    "cv": {"pyramid": "shared"},  # the fold's pyramid protocol has its own tests (test_fold_pyramid.py)
    "ray": {"num_cpus": 2, "dashboard": False},
}


@pytest.fixture(scope="module")
def fold_inputs(tmp_path_factory, ray_session):
    """The shared 4-patient 32³ phantom cohort (tests/cv_cohort.py: prepared, its exact flows as
    the annotations, a seeded pyramid) and this module's settings. The annotate stage that would
    make such inputs has its own tests; here only fold training is under test."""
    from cv_cohort import cohort

    prepared, flows = cohort(tmp_path_factory)
    root = tmp_path_factory.mktemp("cvae")
    (root / "prepared").symlink_to(prepared, target_is_directory=True)
    (root / "flows").symlink_to(flows, target_is_directory=True)
    cfg = load_config(None, {**TINY, "storage_root": str(root / "store")})
    return root, cfg


def _history(cfg, run_id, key):
    from cardiomotion.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, key)


@pytest.mark.slow
def test_two_worker_fold_trains_logs_and_survives_a_worker_failure(fold_inputs):
    from cardiomotion.models.cvae import MotionCVAE
    from cardiomotion.models.pyramid import FeaturePyramid
    from cardiomotion.tracking import tracking_uri
    from cardiomotion.train.cvae import train_fold
    from cardiomotion.train.fold import load_samples, plan_fold

    root, cfg = fold_inputs
    # A worker process is killed (SIGKILL) at epoch 3, after the epoch-1 checkpoint; the group
    # must restart and resume.
    seen: list[int] = []
    res = train_fold(root / "prepared", root / "flows", 1, cfg, fail_at_epoch=3,
                     on_epoch=lambda epoch, _loss: seen.append(epoch))
    assert res.val_id == "phantom_001"
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run = client.get_run(res.run_id)
    assert run.data.params["fold"] == "1" and run.data.params["val_scan"] == "phantom_001"
    loss = _history(cfg, res.run_id, "train_loss")
    steps = sorted({m.step for m in loss})
    assert steps == list(range(6))  # every epoch logged, the ones after the failure too
    assert seen == steps  # the progress callback: each epoch once, in order, across the restart
    # The injected failure fires only in an attempt that started without a checkpoint, so finishing
    # at all proves the restart resumed from one; epochs 0-1 (before the epoch-1 checkpoint) were
    # not trained again.
    all_steps = [m.step for m in loss]
    assert all_steps.count(0) == 1 and all_steps.count(1) == 1
    for key in ("train_loss", "train_mse", "train_kl", "val_loss", "val_kl", "val_epe_rec_vox", "val_epe_rec_mm",
                "val_epe_prior_vox", "val_epe_prior_mm", "val_mse_rec"):
        assert _history(cfg, res.run_id, key), key
    rec_mm = _history(cfg, res.run_id, "val_epe_rec_mm")[-1].value
    rec_vox = _history(cfg, res.run_id, "val_epe_rec_vox")[-1].value
    assert rec_mm == pytest.approx(4.0 * rec_vox, rel=1e-6)  # 4 mm voxels
    arts = {a.path for a in client.list_artifacts(res.run_id, "model")}
    assert {"model/cvae.pt", "model/feature_pyramid.pt", "model/model.json"} <= arts
    local = mlflow.artifacts.download_artifacts(f"{res.model_uri}/cvae.pt", tracking_uri=tracking_uri(cfg))
    model = MotionCVAE.load(local)  # rebuilds from the file alone, weights_only=True
    assert model.config()["channels"] == [8, 16, 32]
    assert sorted(a.path for a in client.list_artifacts(res.run_id, "figures")) == [
        "figures/fold_001.png", "figures/fold_001_ef.png"]  # slices, and the EF histogram of the samples
    # the prior scored as a distribution after training (train.eval_samples samples), physiology too
    m = res.metrics
    assert m["prior_k"] == cfg.train.eval_samples
    assert m["prior_energy_score_vox"] <= m["prior_mean_error_vox"] and m["prior_best_of_k_vox"] <= m["prior_mean_error_vox"]
    assert m["prior_energy_score_mm"] == pytest.approx(4.0 * m["prior_energy_score_vox"])
    assert 0.3 < m["truth_ef"] < 0.8 and m["prior_ef_min"] <= m["prior_ef_mean"] <= m["prior_ef_max"]
    assert "final_prior_energy_score_vox" in run.data.metrics or "final_prior_energy_score_vox" in \
        client.get_run(res.run_id).data.metrics
    # Training lowered the loss. The flow head starts at zero, so the untrained model's
    # reconstruction error on the training scans is exactly the zero-flow error; the trained
    # one's (z = μ, no sampling noise, unlike the logged per-epoch loss) must be clearly lower.
    plan = plan_fold(root / "prepared", root / "flows", 1)
    es, flow = load_samples(plan, list(plan.train_ids), cfg.intensity.window)
    pyramid = FeaturePyramid.load(root / "flows" / "feature_pyramid.pt").eval()
    model.eval()
    with torch.no_grad():
        feats = pyramid(es)
        mu, _ = model.encode(flow, es, feats)
        mse_rec = float(((model.decode(mu, es, feats) - flow) ** 2).mean())
    assert mse_rec < 0.9 * float((flow ** 2).mean())


def _uninterrupted(root, cfg, fold: int, epochs: int) -> tuple[list[float], float]:
    """Fold ``fold`` trained ``epochs`` epochs straight through in this process, as the single-rank
    Ray Train loop trains it (same seeding, initial weights, epoch function and validation; no Ray):
    (train_loss per epoch, val_epe_rec_vox after the last epoch)."""
    import math

    from cardiomotion.models.pyramid import FeaturePyramid
    from cardiomotion.train.cvae import build_cvae, train_epoch, validate
    from cardiomotion.train.fold import load_samples, plan_fold
    from cardiomotion.train.recipe import StepRecipe

    tc = cfg.train
    plan = plan_fold(root / "prepared", root / "flows", fold, cfg.cv.pyramid.value)
    recipe = StepRecipe.for_device("cpu", bf16=tc.bf16, channels_last=tc.channels_last)
    torch.manual_seed(cfg.seed)
    es, flow = load_samples(plan, list(plan.train_ids), cfg.intensity.window)
    es_v, flow_v = load_samples(plan, [plan.val_id], cfg.intensity.window)
    pyramid = recipe.place(FeaturePyramid.load(plan.pyramid).eval().requires_grad_(False), "cpu")
    model = recipe.place(build_cvae(cfg, pyramid.config()), "cpu")
    opt = recipe.optimizer(model.parameters(), tc.lr, "cpu")
    steps = max(1, math.ceil(len(plan.train_ids) / tc.batch_size))
    losses = [train_epoch(model, pyramid, opt, es, flow, cfg, e, steps=steps, device="cpu", recipe=recipe)["train_loss"]
              for e in range(epochs)]
    val = validate(model, pyramid, es_v, flow_v, plan.spacing_mm, tc.prior_samples, cfg.seed, "cpu",
                   temperature=cfg.generate.temperature)
    return losses, val["val_epe_rec_vox"]


@pytest.mark.slow
def test_rerun_resumes_from_the_checkpoint(fold_inputs):
    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    short = cfg.model_copy(deep=True)
    short.train.epochs = 2
    short.train.num_workers = 1
    first = train_fold(root / "prepared", root / "flows", 0, short, name="resume_me")
    longer = short.model_copy(deep=True)
    longer.train.epochs = 4
    second = train_fold(root / "prepared", root / "flows", 0, longer, name="resume_me", run_id=first.run_id)
    resumed = {m.step: m.value for m in _history(cfg, second.run_id, "train_loss")}
    assert sorted(resumed) == [0, 1, 2, 3]  # epochs 0-1 were not trained again
    # Resuming is exact: an epoch is a pure function of (seed, epoch, rank) — batches,
    # augmentation and the reparameterisation noise — so 2 + 2 epochs in two Ray Train runs equal
    # 4 straight ones (here trained in this process, which also pins the worker loop to the epoch
    # function it is built from).
    straight, straight_epe = _uninterrupted(root, longer, 0, 4)
    assert straight == pytest.approx([resumed[k] for k in range(4)], rel=1e-5)
    assert straight_epe == pytest.approx(second.metrics["val_epe_rec_vox"], rel=1e-5)


@pytest.mark.slow
def test_a_fold_trains_with_transported_motions(fold_inputs):
    """train.transport_partners 1: fold 0's three training scans each gain one partner's motion
    (three registrations, logged), and the registered pairs land
    in the storage root's pair cache, the one every fold of that root reads. That a second fold
    registers only the pairs the first did not have is the cache's own test
    (test_transport.py::test_a_pair_cache_gives_the_same_pool_and_registers_each_pair_once_across_folds):
    a second Ray Train fit here costs about 90 s of a test worker for that end-to-end read alone."""
    from cardiomotion.layout import transport_pairs_dir
    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    moved = cfg.model_copy(deep=True)
    moved.train.epochs = 1
    moved.train.num_workers = 1
    moved.train.transport_partners = 1
    res = train_fold(root / "prepared", root / "flows", 0, moved, name="transported")
    assert [m.value for m in _history(cfg, res.run_id, "transport_pairs")] == [3.0]
    assert [m.value for m in _history(cfg, res.run_id, "transport_registered")] == [3.0]
    assert _history(cfg, res.run_id, "transport_seconds")[0].value > 0
    assert sorted({m.step for m in _history(cfg, res.run_id, "train_loss")}) == [0]
    cache = transport_pairs_dir(root / "store")
    assert len(list(cache.glob("*.pt"))) == 3


@pytest.mark.slow
@pytest.mark.parametrize("fold", [-1, 4, 99])
def test_fold_out_of_range_is_refused(fold_inputs, fold):
    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    with pytest.raises(InputError, match=rf"fold {fold} is out of range: .* has 4 scans"):
        train_fold(root / "prepared", root / "flows", fold, cfg)


@pytest.mark.slow
def test_a_gpu_asked_of_a_cluster_without_one_is_refused_before_training(fold_inputs, tmp_path):
    """``train.resources.use_gpu: true`` on a GPU-less cluster: one clear error, no Ray Train
    run started (Ray would otherwise wait for a GPU forever)."""
    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    gpu = cfg.model_copy(deep=True)
    gpu.train.resources.use_gpu = True
    gpu.storage_root = str(tmp_path / "store")
    with pytest.raises(InputError, match="train.resources.use_gpu: is true but the Ray cluster has no GPU"):
        train_fold(root / "prepared", root / "flows", 1, gpu, name="gpu_refused")
    assert not list((tmp_path / "store").rglob("gpu_refused*"))


@pytest.mark.slow
def test_missing_flow_is_refused(fold_inputs, tmp_path):
    import shutil

    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    flows = tmp_path / "flows"
    shutil.copytree(root / "flows", flows, ignore=shutil.ignore_patterns("ray_train"))
    (flows / "phantom_002" / "flow.nii.gz").unlink()
    with pytest.raises(InputError, match="phantom_002/flow.nii.gz: missing: no annotated flow"):
        train_fold(root / "prepared", flows, 0, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("intent", r"phantom_002/flow.nii.gz: flow file has intent code 0, expected 1006"),
    ("grid", r"phantom_002/flow.nii.gz: flow grid \(16, 16, 16\) differs from the prepared grid \(32, 32, 32\)"),
])
def test_bad_flow_file_is_refused_before_training(fold_inputs, tmp_path, damage, message):
    """Checked from the headers in plan_fold, before any Ray work (not inside a worker)."""
    import shutil

    import nibabel as nib
    import numpy as np

    from cardiomotion.flow.io import write_flow
    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    flows = tmp_path / "flows"
    shutil.copytree(root / "flows", flows, ignore=shutil.ignore_patterns("ray_train"))
    path = flows / "phantom_002" / "flow.nii.gz"
    if damage == "intent":
        img = nib.load(str(path))
        hdr = img.header.copy()
        hdr.set_intent(0)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, hdr), str(path))
    else:
        write_flow(path, np.zeros((3, 16, 16, 16), np.float32), np.diag([8.0, 8.0, 8.0, 1.0]))
    with pytest.raises(InputError, match=message):
        train_fold(root / "prepared", flows, 0, cfg, name="never_runs")
    from cardiomotion.config import storage_root

    assert not (storage_root(cfg) / "ray_results" / "never_runs").exists()


@pytest.mark.slow
def test_truncated_flow_found_in_the_worker_is_one_input_error_not_a_retried_crash(fold_inputs, tmp_path):
    """The header is intact (the driver's checks pass); the body is cut, so only the Ray Train
    worker finds it. The loop returns the bad input instead of raising (Ray Train retries
    exceptions, and a retry reads the same file), and the driver raises it as itself."""
    import shutil

    from cardiomotion.train.cvae import train_fold

    root, cfg = fold_inputs
    flows = tmp_path / "flows"
    shutil.copytree(root / "flows", flows, ignore=shutil.ignore_patterns("ray_train"))
    path = flows / "phantom_002" / "flow.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"phantom_002/flow.nii.gz: (not a readable NIfTI flow file|unreadable) \(") as info:
        train_fold(root / "prepared", flows, 0, cfg, name="truncated_flow")
    assert type(info.value) is InputError


@pytest.mark.parametrize("override, message", [
    ({"train": {"w_kl": -0.1}}, "train.w_kl"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"bogus": 1}}, "train.bogus: unknown key"),
    ({"prepare": {"grid": [40, 40, 40]}}, r"prepare.grid \[40, 40, 40\] must be divisible by 2\^5"),
])
def test_bad_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)
