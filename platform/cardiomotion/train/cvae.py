"""CVAE training of one leave-one-out fold as a Ray Train job, tracked in MLflow.

Loss (:func:`cardiomotion.train.losses.cvae_loss`, ``train.recipe``): ``paper`` = w_rec · MSE +
w_kl(epoch) · KL per latent element; ``elbo`` = [Σ squared error + β(epoch) · Σ KL] / flow elements
(a Gaussian decoder of noise 2σ² = β voxels²); the KL weight follows ``train.kl_schedule``
(linear warm-up over ``kl_warmup_epochs`` or cyclical) and ``train.free_bits``. Each step
augments (ES, u) jointly, then computes the frozen pyramid of the augmented ES under no_grad.
The step runs as :class:`~cardiomotion.train.recipe.StepRecipe` says: on GPU bf16 autocast,
channels_last_3d, fused Adam; on CPU fp32 with channels_last_3d, gloo. Adam with gradient clipping.
Validation on the held-out scan each ``val_every`` epochs: EPE (voxels and mm) of the posterior
reconstruction (z = μ) and of ``prior_samples`` prior samples (z ~ N(0, I)), plus the MSE the
paper reports. Rank 0 logs everything to the MLflow run the driver opened. Checkpoints every
``checkpoint_every`` epochs; after a worker failure the group restarts from the last one.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .checkpoint import load_state, raise_input_error, report_with_checkpoint, resume, unwrap
from .recipe import StepRecipe
from .settings import StepSettings, step_settings
from ..transfer import to_device

if TYPE_CHECKING:  # the step functions need no config (and so no pydantic): StepSettings is enough
    from ..config import Config

from ..layout import CVAE_FILE as MODEL_FILE, MODEL_META, PYRAMID_FILE, fold_ef_figure_name, fold_figure_name


def build_cvae(cfg: Config | StepSettings, pyramid_config: dict[str, Any]):
    """The CVAE mirroring the frozen pyramid (its channels per level and how it halves grids)."""
    from ..models.cvae import MotionCVAE

    chans = list(pyramid_config["channels"])
    m = step_settings(cfg).model
    return MotionCVAE(channels=chans, cond_channels=chans, latent_channels=m.latent_channels,
                      output=m.output, integration_steps=m.integration_steps,
                      aligned=bool(pyramid_config.get("aligned", False)))


def kl_factor(cfg: Config | StepSettings, epoch: int) -> float:
    """The KL schedule's factor in [0, 1] at ``epoch`` (0-based), applied to w_kl (paper) or β (elbo).

    linear: min(1, (epoch + 1) / kl_warmup_epochs), 1 without warm-up. cyclical (Fu et al. 2019):
    the epochs split into ``kl_cycles`` equal cycles; in each the factor ramps 0 → 1 over the first
    half and stays at 1 for the second.
    """
    t = step_settings(cfg)
    if t.kl_schedule == "cyclical":
        period = t.epochs / t.kl_cycles
        pos = (epoch % period) / period if period > 0 else 1.0
        return min(1.0, (pos + 1.0 / max(period, 1.0)) / 0.5)
    if t.kl_warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / t.kl_warmup_epochs)


def kl_weight(cfg: Config | StepSettings, epoch: int) -> float:
    """The effective KL weight at ``epoch``: factor × w_kl (paper) or factor × β (elbo)."""
    t = step_settings(cfg)
    return kl_factor(t, epoch) * (t.w_kl if t.recipe == "paper" else t.beta)


def step_loss(cfg: Config | StepSettings, flow_pred, flow, mu, logvar, factor: float):
    """(loss, mse, kl) of one batch as ``train.recipe`` says (see :func:`~cardiomotion.train.losses.cvae_loss`)."""
    from ..train.losses import cvae_loss

    t = step_settings(cfg)
    return cvae_loss(t.recipe, flow_pred, flow, mu, logvar, w_rec=t.w_rec, w_kl=t.w_kl, beta=t.beta,
                     kl_factor=factor, free_bits=t.free_bits)


@torch.no_grad()
def validate(model, pyramid, es: torch.Tensor, flow: torch.Tensor, spacing_mm: float, n_prior: int,
             seed: int, device, temperature: float = 1.0) -> dict[str, float]:
    """Held-out metrics of pairs (es (N,1,…), flow (N,3,…) voxels): the reconstruction (z = μ) and
    ``n_prior`` prior samples (z ~ N(0, T²·I), T = ``temperature`` as the corpus is drawn; z drawn from a CPU generator seeded ``seed``, so the same
    latents on any device) scored as an ensemble against the annotated flow
    (:func:`cardiomotion.evaluate.generative.ensemble_score`; means over the N pairs)."""
    from ..evaluate.generative import ensemble_score
    from ..flow.metrics import folding_fraction
    from ..train.losses import kl_standard_normal

    model.eval()
    es, flow = es.to(device), flow.to(device)
    feats = pyramid(es)
    mu, logvar = model.encode(flow, es, feats)
    rec = model.decode(mu, es, feats).float()
    gen = torch.Generator().manual_seed(seed)
    samples = torch.stack([model.sample(es, feats, temperature=temperature, generator=gen).float()
                           for _ in range(n_prior)])  # (K, N, 3, …)
    epe_p = float(torch.linalg.vector_norm(samples - flow[None], dim=2).mean())
    scores = [ensemble_score(samples[:, n].cpu(), flow[n].cpu()) for n in range(flow.shape[0])]

    def mean_of(key: str) -> float:
        return float(sum(getattr(sc, key) for sc in scores) / len(scores))

    epe_rec = float(torch.linalg.vector_norm(rec - flow, dim=1).mean())
    epe_zero = float(torch.linalg.vector_norm(flow, dim=1).mean())
    energy = mean_of("energy_score")
    model.train()
    return {
        "val_epe_rec_vox": epe_rec, "val_epe_rec_mm": epe_rec * spacing_mm,
        "val_epe_prior_vox": epe_p, "val_epe_prior_mm": epe_p * spacing_mm,
        "val_epe_zero_vox": epe_zero, "val_epe_zero_mm": epe_zero * spacing_mm,
        "val_mse_rec": float(((rec - flow) ** 2).mean()),
        "val_kl": float(kl_standard_normal(mu.float(), logvar.float())),
        "val_prior_magnitude_vox": float(torch.linalg.vector_norm(samples, dim=2).mean()),
        "val_folding_rec": folding_fraction(rec),  # fraction of voxels with Jacobian det <= 0
        "val_folding_prior": folding_fraction(samples.flatten(0, 1)),
        # diversity: mean distance of a prior sample's vector from the samples' mean vector
        "val_prior_spread_vox": float(torch.linalg.vector_norm(samples - samples.mean(0, keepdim=True), dim=2).mean()),
        # the generator as a distribution (field norms, voxels): a proper score and calibration
        "val_energy_vox": energy, "val_energy_mm": energy * spacing_mm,
        "val_best_of_k_vox": mean_of("best_of_k"),
        "val_spread_skill": mean_of("spread_skill"),
        "val_magnitude_ratio": mean_of("magnitude_ratio"),
    }


def validation_loss(cfg: Config | StepSettings, model, grid, mse: float, kl: float, epoch: int) -> float:
    """The training objective on held-out numbers (plain means ``mse`` and ``kl`` per element)."""
    t = step_settings(cfg)
    w = kl_weight(t, epoch)
    if t.recipe == "paper":
        return t.w_rec * mse + w * kl
    n_z = math.prod(unwrap(model).latent_shape(grid))
    return mse + w * kl * n_z / (3 * math.prod(grid))


def epoch_generators(seed: int, epoch: int, rank: int, device) -> tuple[torch.Generator, torch.Generator]:
    """(gen, noise_gen) of one epoch of one rank, both seeded from (seed, epoch, rank).

    ``gen`` is a CPU generator: the batch indices, the augmentation parameters and the
    reparameterisation noise ε drawn from it are the same numbers on every device. ``noise_gen``
    draws the per-voxel intensity-noise field on the training device: a (B, 1, I, J, K) field
    drawn on the CPU every step would cost a host→device copy of the whole batch, and CUDA and
    CPU generators give different streams, so on a GPU that one field differs from a CPU run
    with the same seed. On the CPU both are the same generator (one stream, as before).
    """
    s = int(seed) * 100_003 + int(epoch) * 101 + int(rank)
    gen = torch.Generator().manual_seed(s)
    device = torch.device(device)
    return gen, (gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(s))


def train_epoch(model, pyramid, opt, es_all: torch.Tensor, flow_all: torch.Tensor, cfg: Config | StepSettings,
                epoch: int, *,
                steps: int, device, recipe: StepRecipe | None = None, rank: int = 0) -> dict[str, float]:
    """One epoch: ``steps`` Adam steps on random batches of (es_all (N,1,I,J,K), flow_all (N,3,I,J,K)
    voxels; on the CPU or already on ``device``). Each batch moves to ``device`` first and is
    augmented there jointly (a CUDA generator on a GPU), then the frozen pyramid runs under
    no_grad, the loss of ``train.recipe`` (:func:`step_loss`), clipping, the optimizer step — all as ``recipe``
    says (default: the reference fp32 recipe). Returns the epoch means of train_loss, train_mse,
    train_kl and the KL weight used. ``cfg`` may be the config or its :class:`StepSettings`."""
    from ..train.augment import augment

    recipe = recipe or StepRecipe.reference()
    tc = step_settings(cfg)
    device = torch.device(device)
    aug_cfg = tc.augment
    gen, noise_gen = epoch_generators(tc.seed, epoch, rank, device)
    w_kl = kl_weight(tc, epoch)
    factor = kl_factor(tc, epoch)
    sums = torch.zeros(3, device=device)  # loss, mse, kl: summed on the device (no host sync per step)
    for _ in range(steps):
        idx = to_device(torch.randint(0, len(es_all), (tc.batch_size,), generator=gen), es_all.device)
        es, flow = augment(to_device(es_all[idx], device), to_device(flow_all[idx], device), aug_cfg, gen,
                           noise_generator=noise_gen)
        es, flow = recipe.batch(es), recipe.batch(flow)
        with recipe.autocast(device):
            with torch.no_grad():
                feats = pyramid(es)
            out = model(flow, es, feats, generator=gen)  # ε from the CPU stream: a pure function of (seed, epoch, rank)
        loss, mse, kl = step_loss(tc, out.flow, flow, out.mu, out.logvar, factor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sums += torch.stack([loss.detach(), mse.detach(), kl.detach()])
    loss_mean, mse_mean, kl_mean = (sums / steps).tolist()
    return {"train_loss": loss_mean, "train_mse": mse_mean, "train_kl": kl_mean, "kl_weight": w_kl}


def _die(why: str) -> None:
    """Kill this worker process outright (SIGKILL: no exception, no cleanup), as a crashed or
    OOM-killed node would; Ray Train sees a dead worker and restarts the group."""
    import os
    import signal
    import sys

    print(why, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def transported_samples(plan, train_ids: list[str], mine: list[str], cfg, es_mine: torch.Tensor,
                        flow_mine: torch.Tensor,
                        cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The samples a CVAE trains on with ``train.transport_partners``: its own pairs (``es_mine``
    (n, 1, I, J, K) conditioning frames, ``flow_mine`` (n, 3, I, J, K) pull fields in voxels, the
    samples of ``mine``: a Ray Train rank's share, or a tune trial's whole fold), then each of those
    ES frames with the motions of ``train.transport_partners`` other training scans carried onto it
    (:func:`~cardiomotion.train.transport.transport_pool`; the partners come from ``train_ids``, the
    fold's training scans, never the held-out one), as (m, 1, I, J, K) frames and (m, 3, I, J, K)
    fields. ``cache_dir``: the storage root's :class:`~cardiomotion.train.transport.PairCache`
    (pairs another fold or stage registered are read, not registered again). Also returns metrics
    for the run: the fold's transported pairs (all ranks), the dropped and newly registered pairs of
    ``mine`` and the seconds its pool took."""
    import time

    from .fold import load_samples
    from .transport import PairCache, partners, transport_pool

    targets = list(dict.fromkeys(mine))
    if mine == list(train_ids):
        es, flow = es_mine, flow_mine  # one rank holds every training scan: nothing to load again
    else:
        es, flow = load_samples(plan, train_ids, cfg.intensity.window)
    t0 = time.monotonic()
    k, seed = cfg.train.transport_partners, cfg.seed
    pool = transport_pool(es, flow, train_ids, targets, k, seed, plan.spacing_mm,
                          cache=PairCache(cache_dir) if cache_dir else None)
    made = {"transport_pairs": float(sum(map(len, partners(train_ids, k, seed).values()))),
            "transport_dropped": float(len(pool.dropped)), "transport_registered": float(pool.registered),
            "transport_seconds": time.monotonic() - t0}
    return pool.es, pool.flow, made


def cvae_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker loop (``train_loop_per_worker``) of one fold."""
    import ray.train
    import ray.train.torch

    from ..models.pyramid import FeaturePyramid
    from ..tracking import log_metrics_to
    from ..config import Config
    from ..errors import InputError
    from ..train.fold import FoldPlan, load_samples
    from .checkpoint import INPUT_ERROR_KEY, input_error_on_any_rank

    cfg = Config.model_validate(config["cfg"])
    tc = cfg.train
    plan = FoldPlan(**{**config["plan"], "prepared": Path(config["plan"]["prepared"]),
                       "flows": Path(config["plan"]["flows"]), "scan_ids": tuple(config["plan"]["scan_ids"]),
                       "grid": tuple(config["plan"]["grid"]), "pyramid": Path(config["plan"]["pyramid"])})
    from ..raycluster import quiet_train_worker

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    recipe = StepRecipe.for_device(device, bf16=tc.bf16, channels_last=tc.channels_last)
    recipe.setup()
    torch.manual_seed(cfg.seed)

    train_ids = list(plan.train_ids)
    mine = [train_ids[i % len(train_ids)] for i in range(rank, max(len(train_ids), world), world)]
    bad: InputError | None = None
    try:
        es_all, flow_all = load_samples(plan, mine, cfg.intensity.window)
        es_val, flow_val = load_samples(plan, [plan.val_id], cfg.intensity.window)
    except InputError as exc:
        bad = exc
    found = input_error_on_any_rank(bad, world)
    if found is not None:  # returned, not raised: Ray Train must not retry bad input
        return {INPUT_ERROR_KEY: found}

    pyramid = FeaturePyramid.load(plan.pyramid, map_location=device).eval()
    pyramid.requires_grad_(False)
    recipe.place(pyramid, device)
    model = recipe.place(build_cvae(cfg, pyramid.config()), device)
    model = ray.train.torch.prepare_model(model)
    opt = recipe.optimizer(model.parameters(), tc.lr, device)

    start, ckpt = resume(model, opt, device)
    if tc.transport_partners and start < tc.epochs:  # other training scans' motions carried onto these ES frames
        es_all, flow_all, made = transported_samples(plan, train_ids, mine, cfg, es_all, flow_all,
                                                     config.get("transport_cache"))
        if rank == 0 and ckpt is None:  # logged once, by the attempt that starts the fold
            log_metrics_to(config.get("tracking_uri"), config.get("run_id"), made, 0)

    if device.type == "cuda":  # training data lives on the GPU: no host→device copy per step
        es_all, flow_all = es_all.to(device), flow_all.to(device)

    fail_at = config.get("fail_at_epoch")  # test hook: die once, before the first restart

    steps = max(1, math.ceil(len(train_ids) / (tc.batch_size * world)))
    metrics: dict[str, float] = {}
    for epoch in range(start, tc.epochs):
        if fail_at is not None and epoch == fail_at and ckpt is None:
            _die(f"injected failure at epoch {epoch} (test hook): the worker process kills itself")
        metrics = train_epoch(model, pyramid, opt, es_all, flow_all, cfg, epoch, steps=steps, device=device,
                              recipe=recipe, rank=rank)
        last = epoch == tc.epochs - 1
        if rank == 0 and (last or (epoch + 1) % tc.val_every == 0):
            with recipe.autocast(device):
                val = validate(unwrap(model), pyramid, es_val, flow_val, plan.spacing_mm, tc.prior_samples,
                               cfg.seed, device, temperature=cfg.generate.temperature)
            val["val_loss"] = validation_loss(cfg, model, plan.grid, val["val_mse_rec"], val["val_kl"], epoch)
            metrics.update(val)
        if rank == 0:
            log_metrics_to(config.get("tracking_uri"), config.get("run_id"), metrics, epoch)
        if last or (epoch + 1) % tc.checkpoint_every == 0:
            report_with_checkpoint({**metrics, "epoch": epoch}, model, opt, epoch, rank)
    return metrics


# ------------------------------------------------------------------------------- driver side
from dataclasses import dataclass, field  # noqa: E402


@dataclass
class FoldResult:
    """What a finished fold produced."""

    fold: int
    val_id: str
    run_id: str
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    figure: Path | None = None


def check_fold_inputs(prepared_dir, flows_dir, fold: int, cfg: Config):
    """All checks that must pass before any Ray work; returns (plan, pyramid config). With
    ``cv.pyramid: per_fold`` and the fold's pyramid not trained yet, the config is the one
    ``annotate.pwc`` will give it."""
    from ..errors import InputError
    from ..models.pyramid import load_checkpoint
    from .fold import plan_fold

    plan = plan_fold(prepared_dir, flows_dir, fold, cfg.cv.pyramid.value)
    if not plan.pyramid.is_file() and plan.pyramid_protocol == "per_fold":
        pyr = {"channels": list(cfg.annotate.pwc.channels)}
    else:
        try:
            pyr = load_checkpoint(plan.pyramid, "feature_pyramid")["config"]
        except Exception as exc:
            raise InputError(plan.pyramid, f"not a feature-pyramid checkpoint ({exc})") from None
    div = 2 ** len(pyr["channels"])
    if any(n % div for n in plan.grid):
        raise InputError(plan.prepared, f"grid {plan.grid} is not divisible by 2^levels = {div} of the pyramid")
    return plan, pyr


def save_model_dir(model, plan, pyramid_config: dict, cfg: Config, dst: Path) -> Path:
    """The model artifact: cvae.pt + feature_pyramid.pt + model.json (all the generator needs)."""
    import shutil

    from ..fileio import write_json

    dst.mkdir(parents=True, exist_ok=True)
    model.save(dst / MODEL_FILE)
    shutil.copy2(plan.pyramid, dst / PYRAMID_FILE)
    write_json(dst / MODEL_META, {
        "kind": "cardiomotion-cvae", "fold": plan.fold, "val_scan": plan.val_id,
        "train_scans": list(plan.train_ids), "grid": list(plan.grid), "spacing_mm": plan.spacing_mm,
        "intensity_window": list(cfg.intensity.window), "output": cfg.train.model.output.value,
        "pyramid": pyramid_config, "pyramid_protocol": plan.pyramid_protocol, "cvae": model.config(), "seed": cfg.seed,
        "flow_convention": "pull field on the ED grid, voxels: ED(x) = ES(x + u(x))",
    })
    return dst


def fold_figure(model, pyramid, es: torch.Tensor, flow: torch.Tensor, plan, cfg: Config, dst: Path) -> Path:
    """Held-out ES (1, 1, I, J, K), its annotated flow (1, 3, I, J, K), the reconstruction and a prior
    sample (orthogonal slices)."""
    import numpy as np

    from ..evaluate.figures import plot_orthogonal
    from ..flow.warp import warp

    model = model.eval()
    with torch.no_grad():
        feats = pyramid(es)
        mu, _ = model.encode(flow, es, feats)
        rec = model.decode(mu, es, feats)
        sample = model.sample(es, feats, generator=torch.Generator().manual_seed(cfg.seed))
        ed_syn = warp(es, sample)
    s = plan.spacing_mm

    def mag(u):
        return np.sqrt((u[0].numpy() ** 2).sum(0)) * s

    hi = float(max(mag(flow).max(), 1e-3))
    rows = [("held-out ES", es[0, 0].numpy()), ("|u| annotated (mm)", mag(flow)),
            ("|u| reconstructed (mm)", mag(rec)), ("|u| prior sample (mm)", mag(sample)),
            ("warp(ES, sample)", ed_syn[0, 0].numpy())]
    return plot_orthogonal(rows, dst, spacing=(s, s, s), windows=[(0, 1), (0, hi), (0, hi), (0, hi), (0, 1)],
                           cmaps=["gray", "viridis", "viridis", "viridis", "gray"],
                           title=f"fold {plan.fold}: held-out {plan.val_id}")


def prior_report(model, pyramid, es: torch.Tensor, flow: torch.Tensor, plan, cfg: Config, dst_dir: Path):
    """Score ``train.eval_samples`` prior samples of the held-out scan, drawn at the corpus'
    ``generate.temperature`` (:func:`cardiomotion.evaluate.
    prior.evaluate_prior`: against its annotated flow and, on a phantom, its exact truth and the
    physiology of every synthetic ED) and draw the EF histogram against the cohort's true EFs
    (every prepared scan's truth field, measured the same way). ``es``/``flow``: the held-out pair
    as :func:`~cardiomotion.train.fold.load_samples` gives it. Returns (metrics, figure or None)."""
    from ..data.table import load_pair, read_scan_table
    from ..evaluate.figures import plot_ef_histogram
    from ..evaluate.physiology import cohort_ejection_fractions
    from ..evaluate.prior import evaluate_prior

    table = read_scan_table(plan.prepared)
    row = next(r for r in table.to_dict("records") if str(r["scan_id"]) == plan.val_id)
    pair = load_pair(plan.prepared, row, with_truth=True)
    rep = evaluate_prior(model.eval(), pyramid, es, flow, plan.spacing_mm, k=cfg.train.eval_samples,
                         seed=cfg.seed, truth=pair.truth_flow, es_labels=pair.es_labels,
                         temperature=cfg.generate.temperature)
    figure = None
    if rep.samples_physiology:
        figure = plot_ef_histogram([p.ef for p in rep.samples_physiology], cohort_ejection_fractions(plan.prepared),
                                   dst_dir / fold_ef_figure_name(plan.fold),
                                   truth_ef=rep.truth_physiology.ef if rep.truth_physiology else None,
                                   title=f"fold {plan.fold}: held-out {plan.val_id}, synthetic-ED EF")
    return rep.metrics, figure


def train_fold(
    prepared_dir: str | Path,
    flows_dir: str | Path,
    fold: int,
    cfg: Config,
    *,
    name: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    fail_at_epoch: int | None = None,
    log=lambda _m: None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FoldResult:
    """Train leave-one-out fold ``fold`` (scan ``fold`` held out) with a Ray Train TorchTrainer.

    Checks every input before Ray starts. Re-running with the same ``name`` (default
    ``fold_<K>``) under the same storage root resumes from the last checkpoint; pass the
    previous ``run_id`` to continue its MLflow run. Returns the run id and ``runs:/<id>/model``.
    ``on_epoch(epoch, train_loss)`` is called once per finished epoch (for progress bars).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .. import tracking
    from ..config import storage_root
    from ..layout import transport_pairs_dir
    from ..raycluster import init_ray, stage_gpu, train_logging

    plan, pyr = check_fold_inputs(prepared_dir, flows_dir, fold, cfg)
    uri = tracking.setup(cfg)
    init_ray(cfg.ray)
    use_gpu = stage_gpu(cfg.train.resources, ray, "train.resources.use_gpu")  # refused before any work
    if plan.pyramid_protocol == "per_fold":  # strict leave-one-out: a pyramid fitted without the held-out scan
        from ..annotate import train_fold_pyramid
        from ..models.pyramid import load_checkpoint

        train_fold_pyramid(plan.prepared, plan.flows, plan.val_id, cfg, log=log)
        pyr = load_checkpoint(plan.pyramid, "feature_pyramid")["config"]
    tc = cfg.train
    name = name or f"fold_{fold:03d}"
    resources = tc.resources.bundle(use_gpu)
    params = {"train": tc.model_dump(mode="json"), "fold": fold, "val_scan": plan.val_id,
              "n_train": len(plan.train_ids), "grid": list(plan.grid), "spacing_mm": plan.spacing_mm,
              "prepared": str(plan.prepared), "flows": str(plan.flows), "seed": cfg.seed,
              "pyramid_protocol": plan.pyramid_protocol}
    if run_id is not None:  # resuming: log params only into a run created empty (cv creates its fold runs)
        import mlflow

        params = None if mlflow.MlflowClient(uri).get_run(run_id).data.params else params
    train_key = str(storage_root(cfg) / "ray_results" / name)  # what a rerun resumes
    if run_id is None:  # a standalone rerun: an earlier attempt killed outright never ended its run
        tracking.supersede_running(cfg, "train_run", train_key)
    with tracking.start_run(cfg, name, params=params, run_id=run_id, parent_run_id=parent_run_id,
                            tags={"stage": "train", "fold": str(fold), "train_run": train_key}) as run:
        log(f"train: fold {fold} (held out {plan.val_id}), {len(plan.train_ids)} training scans, "
            f"{tc.epochs} epochs, run {run.info.run_id}")
        plan_dict = {**plan.__dict__, "prepared": str(plan.prepared), "flows": str(plan.flows),
                     "scan_ids": list(plan.scan_ids), "grid": list(plan.grid), "pyramid": str(plan.pyramid)}
        trainer = TorchTrainer(
            cvae_train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan_dict, "run_id": run.info.run_id,
                               "tracking_uri": uri, "fail_at_epoch": fail_at_epoch,
                               "transport_cache": str(transport_pairs_dir(storage_root(cfg)))},
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=str(storage_root(cfg) / "ray_results"),
                                 failure_config=FailureConfig(max_failures=tc.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 logging_config=train_logging()),
        )
        with tracking.watch_metric(uri, run.info.run_id, "train_loss", on_epoch):
            result = trainer.fit()
        raise_input_error(result)
        if result.checkpoint is None:
            raise RuntimeError(f"fold {fold} finished without a checkpoint: {result.error}")
        model = build_cvae(cfg, pyr)
        state = load_state(result.checkpoint)
        model.load_state_dict(state["model"])
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = save_model_dir(model, plan, pyr, cfg, Path(tmp) / "model")
            import mlflow

            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            from ..models.pyramid import FeaturePyramid
            from .fold import load_samples

            es_val, flow_val = load_samples(plan, [plan.val_id], cfg.intensity.window)  # once, for both
            pyramid = FeaturePyramid.load(plan.pyramid).eval()
            figure = fold_figure(model, pyramid, es_val, flow_val, plan, cfg, Path(tmp) / fold_figure_name(fold))
            prior_metrics, ef_figure = prior_report(model, pyramid, es_val, flow_val, plan, cfg, Path(tmp))
            metrics.update(prior_metrics)
            import shutil

            for fig in (figure, ef_figure):
                if fig is None:
                    continue
                mlflow.log_artifact(str(fig), artifact_path="figures")
                dst = storage_root(cfg) / "figures" / fig.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(fig, dst)
            out_fig = storage_root(cfg) / "figures" / figure.name
        tracking.log_metrics({f"final_{k}": v for k, v in metrics.items() if k != "epoch"})
        return FoldResult(fold, plan.val_id, run.info.run_id, f"runs:/{run.info.run_id}/model", metrics, out_fig)
