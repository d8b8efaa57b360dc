"""Ray Tune search over the CVAE's loss weights, learning rate and KL warm-up.

Search space (``tune`` section of the config): with ``train.recipe: paper`` ``train.w_rec`` and
``train.w_kl``, with ``train.recipe: elbo`` ``train.beta`` (the decoder noise 2σ², voxels²), in both
``train.lr`` — log-uniform over (low, high) with 0 < low < high — and the KL schedule's knob, a
uniform integer in [low, high] (high capped at the trial's epochs; a low above them is refused):
``train.kl_warmup_epochs`` with ``train.kl_schedule: linear``, ``train.kl_cycles`` with ``cyclical``
(the default; the other knob would have no effect);
random search (seeded), ``tune.samples`` trials, ASHA early stopping with ``time_attr="epoch"``
(epochs completed), ``max_t`` = the trial's epochs, ``tune.grace_period`` and ``tune.reduction_factor``.

Objective (minimised; reported every epoch as ``score``; the mean over the trial's folds
``tune.folds``, measured on the held-out scan of each fold)::

    score = ES + κ · max(0, KL − KL_max)

- ES: the energy score (voxels, field norm) of ``train.prior_samples`` prior samples (z ~ N(0, I))
  against the held-out annotated flow (:func:`cardiomotion.evaluate.generative.ensemble_score`):
  mean_k ‖X_k − y‖ − ½ mean_{k≠l} ‖X_k − X_l‖.
- KL penalty: κ = ``tune.kl_penalty`` voxels per nat of KL per latent element above
  ``tune.kl_max``. Off by default (κ = 0); see below.

Why the energy score, and not the reconstruction error plus the prior samples' EPE (the objective
before): the EPE of a prior sample, E‖X − y‖, is smallest for samples that all sit on the
conditional mean, so that objective *rewards posterior collapse* — a prior whose samples are one
motion. The energy score is strictly proper: its expectation is lowest only when the samples are
distributed like the motions the held-out scan can have; the −½ E‖X − X'‖ term pays a collapsed
prior back nothing for its missing spread and an over-dispersed one less than its extra error.
Reconstruction EPE (z = μ) is still computed and reported (``score_rec``, ``val_epe_rec_vox``),
but does not rank trials: it measures an autoencoder, not a generator.

Why no KL penalty by default: with the KL switched (nearly) off the encoder's posteriors leave
N(0, I), prior samples decode latents the decoder never saw, and their error *and* spread grow
together; the energy score of such off-distribution samples is worse than a calibrated prior's
without any extra term (tests/test_tune.py pins the known answers). ``tune.kl_penalty`` stays for
searches that want the KL itself bounded. Caveat: the folds a search tunes on should not be the
ones a later cross-validation reports as unbiased.

How trials train (and why not ``Tuner(TorchTrainer)``): in Ray 2.60 (Train V2) a trainer can no
longer be passed to a Tuner; the supported pattern is a function trainable that builds a
TorchTrainer with ``TuneReportCallback``. That adds a Train controller, worker group and
placement group per trial (~10 s each on a small box) and reports one fold per trainer, while a
trial here must report the mean over several folds each epoch for ASHA. Trials are single-rank
anyway (fractional GPUs: two DDP ranks cannot share one), so each trial is a plain Tune function
trainable that runs the same epoch and validation code as a fold's Ray Train loop
(:func:`cardiomotion.train.cvae.train_epoch`, :func:`~cardiomotion.train.cvae.validate`) for all
its folds in lock-step, on the same samples (with ``train.transport_partners`` each fold's
transport pool, :func:`~cardiomotion.train.cvae.transported_samples`, through the storage root's
pair cache; the trial's run logs the pairs it transported and registered, summed over its folds),
reports ``tune.report`` per epoch and a checkpoint every ``train.checkpoint_every`` epochs (trial
restarts via FailureConfig and ``Tuner.restore`` resume from it). Each trial requests ``train.resources.bundle(use_gpu)`` (``{"CPU": cpus}``, plus ``"GPU": gpus`` on GPU)
(GPU when the cluster has one), so trials pack onto GPUs like cross-validation folds.

Outputs under ``OUT``: ``search/`` (the Tune experiment: a rerun of the same command restores it
with ``Tuner.restore`` and finishes the unfinished trials), ``tune.json`` (parent run id,
fingerprint, best trial), ``trials.csv``, and ``best.yaml``: the input config with the best
trial's values, which ``load_config`` reads and ``train``/``cv`` accept. MLflow: a parent run
(``stage=tune``) with a nested run per trial (params, per-epoch metrics, ``stopped_early`` tag);
the parent gets the best values, ``best.yaml`` and ``trials.csv``.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import Config, TuneConfig, dump_config
from ..errors import CardiomotionError, InputError
from ..fileio import atomic_path, write_json
from ..layout import (TRIAL_CHECKPOINT as CKPT_FILE, TUNE_BEST as BEST_FILE, TUNE_EXPERIMENT as EXPERIMENT,
                      TUNE_STATE as STATE_FILE, TUNE_TRIALS as TRIALS_FILE)

SEARCHED_PAPER = ("w_rec", "w_kl", "lr")
SEARCHED_ELBO = ("beta", "lr")
SCHEDULE_KEY = {"linear": "kl_warmup_epochs", "cyclical": "kl_cycles"}  # the KL schedule's one searched knob
_INT_KEYS = frozenset(SCHEDULE_KEY.values())
ALL_SEARCHED = (*SEARCHED_PAPER, "beta", *SCHEDULE_KEY.values())


def schedule_knob(cfg: Config) -> str:
    """The ``train`` key of the configured KL schedule that a search varies (also its ``tune`` range's name)."""
    return SCHEDULE_KEY[cfg.train.kl_schedule.value]


def searched(cfg: Config) -> tuple[str, ...]:
    """The ``train`` keys a search varies under the config's loss recipe and KL schedule."""
    base = SEARCHED_PAPER if cfg.train.recipe.value == "paper" else SEARCHED_ELBO
    return (*base, schedule_knob(cfg))
_BAD_SCORE = 1e9  # a diverged trial (NaN/inf) scores this instead

Log = Callable[[str], None]


class TuneInterrupted(CardiomotionError):
    """The search stopped before every trial finished; its state is saved for a rerun."""


def objective(metrics: Mapping[str, float], tc: TuneConfig) -> dict[str, float]:
    """``score`` and its terms from (fold-averaged) validation metrics; see the module docstring."""
    energy = float(metrics["val_energy_vox"])
    rec = float(metrics["val_epe_rec_vox"])
    kl = float(metrics["val_kl"])
    penalty = tc.kl_penalty * max(0.0, kl - tc.kl_max)
    score = energy + penalty
    if not all(math.isfinite(v) for v in (energy, kl, score)):  # max(0, nan) is 0: test the terms
        score = _BAD_SCORE
    return {"score": score, "score_energy": energy, "score_kl_penalty": penalty, "score_rec": rec}


def search_space(cfg: Config, epochs: int) -> dict[str, Any]:
    """The Tune param space of ``cfg.tune`` (bounds checked by the config)."""
    from ray import tune

    t = cfg.tune
    key = schedule_knob(cfg)
    rng = getattr(t, key)
    hi = min(rng[1], epochs)  # neither a warm-up nor a cycle count can exceed the epochs
    lo = min(rng[0], hi)
    space = {"lr": tune.loguniform(*t.lr), key: tune.randint(lo, hi + 1)}
    if cfg.train.recipe.value == "paper":
        space.update({"w_rec": tune.loguniform(*t.w_rec), "w_kl": tune.loguniform(*t.w_kl)})
    else:
        space["beta"] = tune.loguniform(*t.beta)
    return space


def apply_trial(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with a trial's values in ``train`` (validated)."""
    data = cfg.model_dump(mode="json")
    for k in searched(cfg):
        if k in values:
            v = values[k]
            data["train"][k] = int(v) if k in _INT_KEYS else float(v)
    return Config.model_validate(data)


# --------------------------------------------------------------------------- the trainable
@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search is built with (crosses into the Tune trainable)."""

    cfg: dict[str, Any]  # the validated config, as JSON
    prepared: str
    flows: str
    folds: tuple[int, ...]
    epochs: int
    use_gpu: bool
    tracking_uri: str
    parent_run_id: str
    experiment_id: str
    transport_cache: str | None = None  # the storage root's transport pair cache (train.transport_partners)


def _trial_run(client, setup: "TrialSetup", trial_id: str, values: Mapping[str, Any]) -> str:
    """The trial's MLflow child run: found by its trial id (a restored trial keeps its run), else created."""
    parent = setup.parent_run_id
    found = client.search_runs([setup.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent}' and tags.trial_id = '{trial_id}'"), max_results=1)
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param

    run = client.create_run(setup.experiment_id, run_name=f"trial_{trial_id}",
                            tags={"mlflow.parentRunId": parent, "stage": "tune-trial", "trial_id": trial_id})
    params = [Param(f"train.{k}", str(values[k])) for k in values if k in ALL_SEARCHED]
    params += [Param("folds", ",".join(map(str, setup.folds))), Param("epochs", str(setup.epochs))]
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def tune_trial(values: dict[str, Any], setup: "TrialSetup") -> None:
    """Tune function trainable: train the trial's folds in lock-step, report per epoch."""
    import mlflow
    import torch
    from ray import tune

    from ..models.pyramid import FeaturePyramid
    from ..tracking import log_metrics_to
    from .cvae import build_cvae, train_epoch, transported_samples, validate
    from .fold import load_samples, plan_fold
    from .recipe import StepRecipe

    cfg = apply_trial(Config.model_validate(setup.cfg), values)
    cfg.train.epochs = int(setup.epochs)
    tc = cfg.train
    device = torch.device("cuda" if setup.use_gpu and torch.cuda.is_available() else "cpu")
    recipe = StepRecipe.for_device(device, bf16=tc.bf16, channels_last=tc.channels_last)
    recipe.setup()
    torch.manual_seed(cfg.seed)

    pyramids: dict[Path, Any] = {}  # one per fold under cv.pyramid: per_fold, else the shared one
    folds = []
    made: dict[str, float] = {}  # the trial's transported pairs, summed over its folds
    for k in setup.folds:
        plan = plan_fold(setup.prepared, setup.flows, k, cfg.cv.pyramid.value)
        if plan.pyramid not in pyramids:
            pyramids[plan.pyramid] = recipe.place(
                FeaturePyramid.load(plan.pyramid, map_location=device).eval().requires_grad_(False), device)
        pyramid = pyramids[plan.pyramid]
        es, flow = load_samples(plan, plan.train_ids, cfg.intensity.window)
        if tc.transport_partners:  # the pool a fold's Ray Train loop trains on (train_fold), from the same cache
            ids = list(plan.train_ids)
            es, flow, fold_made = transported_samples(plan, ids, ids, cfg, es, flow, setup.transport_cache)
            made = {key: made.get(key, 0.0) + v for key, v in fold_made.items()}
        es_v, flow_v = load_samples(plan, [plan.val_id], cfg.intensity.window)
        model = recipe.place(build_cvae(cfg, pyramid.config()), device)
        opt = recipe.optimizer(model.parameters(), tc.lr, device)
        steps = max(1, math.ceil(len(plan.train_ids) / tc.batch_size))  # transport changes what it sees, not how long
        if device.type == "cuda":  # training data lives on the GPU, as in a fold's Ray Train loop
            es, flow = es.to(device), flow.to(device)
        folds.append({"plan": plan, "es": es, "flow": flow, "es_v": es_v, "flow_v": flow_v, "model": model,
                      "opt": opt, "steps": steps, "pyramid": pyramid})

    client = mlflow.MlflowClient(setup.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    run_id = _trial_run(client, setup, trial_id, values)
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, CKPT_FILE), map_location=device, weights_only=True)
        for f, s in zip(folds, state["folds"]):
            f["model"].load_state_dict(s["model"])
            f["opt"].load_state_dict(s["optimizer"])
        start = int(state["epoch"]) + 1
    elif made:  # logged once, by the attempt that starts the trial
        log_metrics_to(setup.tracking_uri, run_id, made, 0)
    from ray.tune import Checkpoint

    tcfg = Config.model_validate(setup.cfg).tune
    for epoch in range(start, tc.epochs):
        per_fold = []
        for f in folds:
            m = train_epoch(f["model"], f["pyramid"], f["opt"], f["es"], f["flow"], cfg, epoch, steps=f["steps"],
                            device=device, recipe=recipe)
            with recipe.autocast(device):
                m.update(validate(f["model"], f["pyramid"], f["es_v"], f["flow_v"], f["plan"].spacing_mm,
                                  tc.prior_samples, cfg.seed, device, temperature=cfg.generate.temperature))
            per_fold.append(m)
        metrics = {k: sum(m[k] for m in per_fold) / len(per_fold) for k in per_fold[0]}
        metrics.update(objective(metrics, tcfg))
        log_metrics_to(setup.tracking_uri, run_id, metrics, epoch)
        metrics["epoch"] = epoch + 1  # ASHA's time attribute: epochs completed
        last = epoch == tc.epochs - 1
        if last or (epoch + 1) % tc.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"epoch": epoch, "folds": [{"model": f["model"].state_dict(),
                                                       "optimizer": f["opt"].state_dict()} for f in folds]},
                           os.path.join(d, CKPT_FILE))
                tune.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            tune.report(metrics)
    client.set_terminated(run_id, "FINISHED")


# --------------------------------------------------------------------------- the search
@dataclass
class TuneSummary:
    """What :func:`run_tune` produced."""

    out: Path
    parent_run_id: str
    best: dict[str, Any]  # the best trial's values, score and terms
    best_yaml: Path
    trials_csv: Path
    trials: list[dict[str, Any]]
    restored: bool


def _fingerprint(prepared: Path, flows: Path, cfg: Config, folds: Sequence[int]) -> dict[str, Any]:
    """The sweep fingerprint less the searched keys, plus the search's own settings."""
    from .sweep import sweep_fingerprint

    tune_cfg = cfg.tune.model_dump(mode="json")
    tune_cfg.pop("max_concurrent", None)
    tune_cfg["folds"] = list(folds)
    if cfg.train.transport_partners:  # trials transport since stop 51: a search recorded before (when they
        tune_cfg["trials_transport"] = True  # ignored the setting) is refused, not resumed on other data
    return sweep_fingerprint(prepared, flows, cfg, drop=searched(cfg), extra={"tune": tune_cfg})


def _trial_status(exp_path: Path) -> dict[str, str]:
    """trial id → Tune status (TERMINATED, ERROR, PENDING, ...) as saved in the experiment state.

    Read back from disk: after an interruption the in-memory trials are already cleaned up,
    while the saved state marks every unfinished trial PENDING (what ``Tuner.restore`` resumes).
    """
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: str(t.status) for t in ExperimentAnalysis(str(exp_path)).trials}


def _write_trials(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    cols = ["trial_id", "status", "epochs", *ALL_SEARCHED, "score", "score_energy", "score_kl_penalty", "score_rec",
            "val_energy_vox", "val_spread_skill", "val_magnitude_ratio", "val_epe_rec_vox", "val_epe_prior_vox",
            "val_kl", "val_folding_prior", "run_id", "error"]
    from .sweep import write_csv

    return write_csv(path, rows, cols)


def run_tune(
    prepared_dir: str | Path,
    flows_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    samples: int | None = None,
    log: Log = lambda _m: None,
    callbacks: Sequence[Any] = (),
) -> TuneSummary:
    """Search the loss weights (``w_rec``/``w_kl`` or ``beta``), ``lr`` and the KL schedule's knob
    (``kl_warmup_epochs`` or ``kl_cycles``; module docstring).

    Args:
        samples: number of trials (default ``tune.samples``).
        callbacks: extra ``ray.tune.Callback`` objects (driver side).

    Raises:
        InputError: bad inputs, folds that do not exist, trials the cluster can never hold, a
            search space with impossible bounds, ``OUT`` made with other settings: before any work.
        TuneInterrupted: the search was interrupted (Ctrl-C); rerun the same command to resume.
    """
    import mlflow
    from pydantic import ValidationError
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .. import tracking
    from ..config import format_validation, storage_root
    from ..errors import ConfigError
    from ..layout import transport_pairs_dir
    from ..raycluster import init_ray, stage_gpu
    from .sweep import alive_nodes, check_capacity, read_json, resolve_folds, resume_state
    from .cvae import check_fold_inputs
    from .fold import plan_fold

    try:  # a config built in code (model_copy, update=) skips validators: check it whole
        cfg = Config.model_validate(cfg.model_dump(mode="json"))
    except ValidationError as exc:
        raise ConfigError("config", format_validation(exc)) from None
    if samples is not None:
        if samples < 1:
            raise InputError("--samples", f"must be at least 1, got {samples}")
        cfg.tune.samples = samples
    # Tune's console table and snapshot warnings: the library does not print (RAY_AIR_NEW_OUTPUT=0 → old,
    # silent reporter at verbose=0)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    prepared = Path(prepared_dir).resolve()
    flows = Path(flows_dir).resolve()
    out = Path(out_dir).resolve()
    scan_ids = plan_fold(prepared, flows, 0, cfg.cv.pyramid.value).scan_ids
    folds = resolve_folds(cfg.tune.folds, scan_ids, where="tune.folds")
    for k in folds:
        check_fold_inputs(prepared, flows, k, cfg)
    if cfg.cv.pyramid.value == "per_fold":  # every trial of fold k conditions on the same pyramid fitted without k
        from ..annotate import train_fold_pyramid

        init_ray(cfg.ray)
        for k in folds:
            train_fold_pyramid(prepared, flows, scan_ids[k], cfg)
    epochs = cfg.tune.epochs or cfg.train.epochs
    key = schedule_knob(cfg)
    if getattr(cfg.tune, key)[0] > epochs:
        what = "finish its warm-up" if key == "kl_warmup_epochs" else "run that many KL cycles"
        raise InputError(f"tune.{key}", f"the range {list(getattr(cfg.tune, key))} starts above the "
                                        f"{epochs} epochs a trial trains: no trial could {what}")
    grace = min(cfg.tune.grace_period, epochs)
    fingerprint = _fingerprint(prepared, flows, cfg, folds)
    state, uri, client, parent_id = resume_state(out / STATE_FILE, fingerprint, "search", cfg)
    ray = init_ray(cfg.ray)
    use_gpu = stage_gpu(cfg.train.resources, ray, "train.resources.use_gpu")
    bundle = cfg.train.resources.bundle(use_gpu)
    check_capacity(alive_nodes(ray), 1, bundle, cfg.tune.max_concurrent, what="trial", setting="tune.max_concurrent")

    exp_path = out / EXPERIMENT
    out.mkdir(parents=True, exist_ok=True)
    params = {"tune": {**cfg.tune.model_dump(mode="json"), "folds": folds}, "train": cfg.train.model_dump(mode="json"),
              "epochs": epochs, "prepared": str(prepared), "flows": str(flows), "out": str(out), "seed": cfg.seed}
    with tracking.start_run(cfg, "tune", params=None if parent_id else params, tags={"stage": "tune"},
                            run_id=parent_id) as parent:
        parent_id = parent.info.run_id
        write_json(out / STATE_FILE, {**state, "parent_run_id": parent_id, "tracking_uri": uri,
                                      "fingerprint": fingerprint, "experiment_path": str(exp_path)})
        setup = TrialSetup(cfg=cfg.model_dump(mode="json"), prepared=str(prepared), flows=str(flows),
                           folds=tuple(folds), epochs=epochs, use_gpu=use_gpu, tracking_uri=uri,
                           parent_run_id=parent_id, experiment_id=parent.info.experiment_id,
                           transport_cache=str(transport_pairs_dir(storage_root(cfg))))
        trainable = tune.with_resources(tune.with_parameters(tune_trial, setup=setup), bundle)
        restored = tune.Tuner.can_restore(str(exp_path))
        if restored:
            log(f"tune: resuming the search in {exp_path}")
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            log(f"tune: {cfg.tune.samples} trials over {searched(cfg)} on folds {folds}, {epochs} epochs each "
                f"(ASHA grace {grace}, factor {cfg.tune.reduction_factor}); each trial {bundle}; parent run {parent_id}")
            seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.seed
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(cfg, epochs),
                tune_config=tune.TuneConfig(
                    metric="score", mode="min", num_samples=cfg.tune.samples,
                    search_alg=BasicVariantGenerator(random_state=seed),
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=grace,
                                            reduction_factor=cfg.tune.reduction_factor),
                    max_concurrent_trials=cfg.tune.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=str(out), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=list(callbacks),
                ),
            )
        t0 = time.perf_counter()
        results = tuner.fit()
        status = _trial_status(exp_path)
        unfinished = [t for t, s in status.items() if s not in ("TERMINATED", "ERROR")]
        if unfinished:
            raise TuneInterrupted(f"tune: the search stopped with {len(unfinished)} unfinished trials; its state is "
                                  f"saved in {exp_path}: rerun the same command to resume")

        runs = {r.data.tags.get("trial_id"): r.info.run_id for r in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")}
        rows = []
        for res in results:
            m = dict(res.metrics or {})
            tid = m.get("trial_id") or (Path(res.path).name if res.path else None)
            row = {"trial_id": tid, "status": status.get(tid, "ERROR" if res.error else "TERMINATED"),
                   "epochs": m.get("epoch"), **{k: res.config.get(k) for k in searched(cfg)},
                   **{k: m.get(k) for k in ("score", "score_energy", "score_kl_penalty", "score_rec", "val_energy_vox",
                                            "val_spread_skill", "val_magnitude_ratio", "val_epe_rec_vox",
                                            "val_epe_prior_vox", "val_kl", "val_folding_prior")},
                   "run_id": runs.get(tid), "error": str(res.error).splitlines()[0][:300] if res.error else None}
            if row["status"] == "TERMINATED":
                row["status"] = "finished" if (row["epochs"] or 0) >= epochs else "stopped early"
            elif row["status"] == "ERROR":
                row["status"] = "error"
            rows.append(row)
            if row["run_id"]:
                try:
                    client.set_tag(row["run_id"], "stopped_early", str(row["status"] == "stopped early").lower())
                    client.set_terminated(row["run_id"], "FAILED" if row["status"] == "error" else "FINISHED")
                except Exception:
                    pass
        rows.sort(key=lambda r: (r["score"] is None, r["score"] if r["score"] is not None else 0.0))
        scored = [r for r in rows if r["score"] is not None and r["score"] < _BAD_SCORE]
        complete = [r for r in scored if (r["epochs"] or 0) >= epochs]
        pool = complete or scored
        if not pool:
            errors = [r["error"] for r in rows if r["error"]]
            raise CardiomotionError(f"tune: no trial produced a score ({len(errors)} errors"
                                    + (f"; first: {errors[0]}" if errors else "") + ")")
        best = pool[0]
        best_cfg = apply_trial(cfg, best)
        best_yaml = out / BEST_FILE
        with atomic_path(best_yaml) as tmp:
            tmp.write_text(f"# best of {len(rows)} trials (score {best['score']:.4f} = rec EPE + "
                           f"energy score + KL penalty), trial {best['trial_id']}, "
                           f"MLflow run {best['run_id']}\n" + dump_config(best_cfg))
        trials_csv = _write_trials(out / TRIALS_FILE, rows)
        best_out = {k: best[k] for k in (*searched(cfg), "score", "score_energy", "score_kl_penalty", "score_rec",
                                         "trial_id", "run_id", "epochs")}
        write_json(out / STATE_FILE, {**(read_json(out / STATE_FILE) or {}), "best": best_out,
                                      "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
                                      "stopped_early": sum(r["status"] == "stopped early" for r in rows),
                                      "errors": sum(r["status"] == "error" for r in rows),
                                      "wall_s": round(time.perf_counter() - t0, 1)})
        tracking.log_metrics({f"best_{k}": float(best[k]) for k in (*searched(cfg), "score", "score_energy", "score_rec")})
        mlflow.set_tag("best_trial", str(best["trial_id"]))
        tracking.log_artifact(best_yaml)
        tracking.log_artifact(trials_csv)
    log(f"tune: best trial {best['trial_id']} score {best['score']:.4f} "
        + " ".join(f"{k}={best[k]:.4g}" for k in searched(cfg)) + f"; wrote {best_yaml}")
    return TuneSummary(out, parent_id, best_out, best_yaml, trials_csv, rows, restored)


def format_trials(rows: Sequence[Mapping[str, Any]]) -> str:
    """The trial table as fixed-width text (best first)."""
    cols = [("trial", "trial_id", "{}"), ("status", "status", "{}"), ("epochs", "epochs", "{:.0f}"),
            ("w_rec", "w_rec", "{:.3g}"), ("w_kl", "w_kl", "{:.3g}"), ("beta", "beta", "{:.3g}"), ("lr", "lr", "{:.3g}"),
            ("warmup", "kl_warmup_epochs", "{:.0f}"), ("KL cycles", "kl_cycles", "{:.0f}"), ("score (ES)", "score", "{:.4f}"),
            ("spread/skill", "val_spread_skill", "{:.2f}"), ("magnitude", "val_magnitude_ratio", "{:.2f}"),
            ("rec EPE", "val_epe_rec_vox", "{:.3f}"), ("KL", "val_kl", "{:.4f}")]
    present = {k for r in rows for k, v in r.items() if v is not None}
    cols = [c for c in cols if c[1] in present or c[1] in ("trial_id", "status", "score")]
    body = [[("-" if r.get(k) is None else fmt.format(r[k]) if not isinstance(r[k], str) else r[k])
             for _, k, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


__all__ = ["TuneInterrupted", "TuneSummary", "apply_trial", "format_trials", "objective", "run_tune", "search_space",
           "tune_trial"]
