"""Unsupervised training of the 3D PWC-Net on prepared (ED, ES) pairs, as a Ray Train job.

Each rank loads its share of the (small) prepared dataset into memory from the shared prepared
folder, trains with DDP (gloo on CPU, NCCL on GPU, bf16 autocast on GPU), reports per-epoch
metrics, checkpoints every ``checkpoint_every`` epochs and resumes from the last checkpoint
after a worker failure (``FailureConfig``). Rank 0 logs the metrics to the MLflow run the
driver opened.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..train.checkpoint import load_state, raise_input_error, report_with_checkpoint, resume

if TYPE_CHECKING:  # the epoch itself (pwc_train_epoch) needs no config, so no pydantic
    from ..config import Config


def level_weights(cfg: Config, n_levels: int) -> list[float]:
    """Loss weight per flow (decoded levels coarse→fine, then the full-resolution flow)."""
    if cfg.annotate.level_weights is not None:
        w = list(cfg.annotate.level_weights)
        if len(w) != n_levels + 1:
            from ..errors import ConfigError

            raise ConfigError(None, f"annotate.level_weights needs {n_levels + 1} values "
                                    f"({n_levels} levels + full resolution), got {len(w)}")
        return w
    return [0.5 ** (n_levels - k) for k in range(n_levels)] + [1.0]


def build_pwcnet(cfg: Config):
    from ..models.pwcnet import PWCNet3D

    p = cfg.annotate.pwc
    return PWCNet3D(channels=p.channels, search_range=p.search_range,
                    estimator_channels=p.estimator_channels, context=p.context, cost_chunk=p.cost_chunk,
                    aligned=p.aligned)


def load_unit_pairs(prepared_dir: str | Path, rows: list[dict], window) -> tuple[torch.Tensor, torch.Tensor]:
    """ES and ED of ``rows`` as (N, 1, I, J, K) float32 tensors in [0, 1]."""
    from ..data.intensity import hu_to_unit
    from ..data.table import load_pair

    es, ed = [], []
    for row in rows:
        pair = load_pair(prepared_dir, row, with_truth=False)
        es.append(hu_to_unit(pair.es, window))
        ed.append(hu_to_unit(pair.ed, window))
    return torch.from_numpy(np.stack(es))[:, None], torch.from_numpy(np.stack(ed))[:, None]


def epoch_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The Adam learning rate of ``epoch`` (0-based) of ``epochs``: ``lr`` for ``constant``;
    for ``cosine`` lr·(1 + cos(π·epoch/epochs))/2 — ``lr`` at epoch 0, lr/2 half-way, above 0 at the
    last epoch. A function of the epoch alone, so a resumed training continues the same schedule."""
    if schedule == "constant":
        return float(lr)
    if schedule == "cosine":
        return float(lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant or cosine)")


def pwc_train_epoch(model, opt, fixed_all: torch.Tensor, moving_all: torch.Tensor, order: torch.Tensor, *,
                    steps: int, batch_size: int, weights: Sequence[float], smooth_weight: float,
                    ssim_alpha: float, device) -> dict[str, float]:
    """One unsupervised PWC-Net epoch: ``steps`` Adam steps over ``order`` (a permutation of the
    pairs), batch b of step s taking pairs ``order[(s·batch_size + b) mod N]``.

    Args:
        fixed_all, moving_all: (N, 1, I, J, K) in [0, 1] (ED and ES, or both directions), on the
            CPU or already on ``device``.
        weights: loss weight per decoded level, coarse → fine, then the full-resolution flow.
        device: the step autocasts to bf16 on CUDA (fp32 elsewhere).

    Returns:
        epoch means of ``loss``, ``photometric`` and ``smoothness``.
    """
    from ..train.losses import pwc_unsupervised_loss

    device = torch.device(device)
    cuda = device.type == "cuda"
    model.train()
    sums = torch.zeros(3, device=device)  # loss, photometric, smoothness: no host sync per step
    for s in range(steps):
        idx = order[[(s * batch_size + b) % len(order) for b in range(batch_size)]]
        fixed = fixed_all[idx].to(device)
        moving = moving_all[idx].to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(fixed, moving)
        flows = [f.float() for f in out.levels] + [out.flow.float()]
        loss, parts = pwc_unsupervised_loss(fixed, moving, flows, weights, smooth_weight, ssim_alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([loss.detach(), parts["photometric"], parts["smoothness"]]).float()  # parts: detached
    return dict(zip(("loss", "photometric", "smoothness"), (sums / steps).tolist()))


def pwc_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker loop (``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    from ..config import Config
    from ..errors import InputError
    from ..tracking import log_metrics_to
    from ..train.checkpoint import INPUT_ERROR_KEY, input_error_on_any_rank

    cfg = Config.model_validate(config["cfg"])
    ac = cfg.annotate
    from ..raycluster import quiet_train_worker

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)

    rows = config["rows"]
    mine = [rows[i % len(rows)] for i in range(rank, max(len(rows), world), world)]
    bad: InputError | None = None
    try:
        es, ed = load_unit_pairs(config["prepared"], mine, cfg.intensity.window)
    except InputError as exc:
        bad = exc
    found = input_error_on_any_rank(bad, world)
    if found is not None:  # returned, not raised: Ray Train must not retry bad input
        return {INPUT_ERROR_KEY: found}
    fixed_all, moving_all = (torch.cat([ed, es]), torch.cat([es, ed])) if ac.both_directions else (ed, es)

    model = build_pwcnet(cfg)
    n_levels = len(model.channels)
    weights = level_weights(cfg, n_levels)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=ac.lr)

    start, _ = resume(model, opt, device)

    per_rank = math.ceil(max(len(rows), world) / world) * (2 if ac.both_directions else 1)
    steps = max(1, math.ceil(per_rank / ac.batch_size))  # equal on every rank (DDP)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    metrics: dict[str, float] = {}
    for epoch in range(start, ac.epochs):
        lr = epoch_lr(ac.lr, ac.lr_schedule.value, epoch, ac.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        order = torch.randperm(len(fixed_all), generator=gen)
        totals = pwc_train_epoch(model, opt, fixed_all, moving_all, order, steps=steps, batch_size=ac.batch_size,
                                 weights=weights, smooth_weight=ac.smooth_weight, ssim_alpha=ac.ssim_alpha,
                                 device=device)
        metrics = {"epoch": epoch, **{f"pwc_train_{k}": v for k, v in totals.items()}}
        if rank == 0:
            log_metrics_to(config.get("tracking_uri"), config.get("run_id"),
                           {**{f"pwc_train_{k}": v for k, v in totals.items()}, "pwc_train_lr": lr}, epoch)
        # Per-epoch curves go to MLflow above; Ray Train gets a report (a barrier on every rank)
        # only with each checkpoint.
        if epoch == ac.epochs - 1 or (epoch + 1) % ac.checkpoint_every == 0:
            report_with_checkpoint(metrics, model, opt, epoch, rank)
    return metrics


def train_pwcnet(
    prepared_dir: str | Path,
    cfg: Config,
    storage_path: str | Path,
    name: str = "pwcnet",
    rows: list[dict] | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
):
    """Train the PWC-Net with a Ray Train TorchTrainer; returns the trained model (on CPU).

    Re-running with the same ``storage_path``/``name`` resumes the run from its checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..data.prepare import plain_rows
    from ..data.table import read_scan_table
    from ..errors import InputError
    from ..raycluster import init_ray, stage_gpu, train_logging

    init_ray(cfg.ray)
    ac = cfg.annotate
    rows = rows if rows is not None else read_scan_table(prepared_dir).to_dict("records")
    use_gpu = stage_gpu(ac.resources, ray, "annotate.resources.use_gpu")  # refused, not waited for
    if use_gpu and ac.resources.gpus < 1 and ac.num_workers > 1:
        raise InputError("annotate.num_workers", f"{ac.num_workers} DDP ranks with resources.gpus {ac.resources.gpus}: "
                         "ranks could share a GPU, which NCCL refuses; use whole GPUs for several ranks")
    trainer = TorchTrainer(
        pwc_train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "prepared": str(Path(prepared_dir).resolve()),
                           "rows": plain_rows(rows), "run_id": run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(num_workers=ac.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=ac.resources.bundle(use_gpu)),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=ac.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), logging_config=train_logging()),
    )
    result = trainer.fit()
    raise_input_error(result)
    if result.checkpoint is None:
        raise RuntimeError(f"PWC-Net training finished without a checkpoint ({result.error})")
    model = build_pwcnet(cfg)
    state = load_state(result.checkpoint)
    model.load_state_dict(state["model"])
    return model

