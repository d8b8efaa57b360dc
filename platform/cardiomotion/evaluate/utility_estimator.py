"""One estimator of ``cardiomotion utility``: the fold's data, the batches of each data arm, the
training and the score on the held-out pair (:func:`run_estimator`, in this process), and the same as
a one-worker Ray Train run fed by Ray Data (:func:`train_estimator_on_ray`, :func:`estimator_task`).

The corpus arms stream the corpus through ``ray.train.get_dataset_shard`` (:func:`corpus_dataset`:
the shards ``generate`` wrote, or decoded on the fly), shuffled per pass; the others build their
batches in the worker (the annotated pairs, random fields, the transport pool, the anchored arm's
varied pool). The held-out pair is read only to score the trained estimator against its exact truth.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import Config, UtilityArm
from ..errors import InputError
from .utility_plan import UtilityRun, estimator_settings, planned_steps
from .utility_report import SCORES

def training_arrays(prepared: str, flows: str, train_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ES and ED (n, I, J, K) float32 HU and the annotated flows (n, 3, I, J, K) voxels."""
    from ..data.table import load_pair, read_scan_table
    from ..flow.io import read_flow
    from ..layout import flow_path

    table = read_scan_table(prepared).set_index("scan_id", drop=False)
    es, ed, fl = [], [], []
    for sid in train_ids:
        pair = load_pair(prepared, table.loc[sid].to_dict(), with_truth=False)
        path = flow_path(flows, sid)
        flow, _ = read_flow(path)
        if flow.shape[1:] != pair.es.shape:
            raise InputError(path, f"flow grid {flow.shape[1:]} differs from the prepared grid {pair.es.shape}")
        es.append(pair.es)
        ed.append(pair.ed)
        fl.append(flow)
    return np.stack(es), np.stack(ed), np.stack(fl).astype(np.float32)


def annotated_flow_rms(prepared: str, flows: str, train_ids: Sequence[str],
                       cache: dict[str, tuple[float, int]] | None = None) -> float:
    """RMS magnitude (voxels) of the annotated flows of ``train_ids`` — what the random arm's
    fields are scaled to: sqrt of the mean over scans and voxels of ‖u(x)‖², as
    :func:`~cardiomotion.evaluate.utility.flow_rms` of their stack (float64 sums). ``cache`` maps
    a scan to (Σ‖u‖², voxels) so that a sweep reads each flow file once, not once per fold.

    Raises:
        InputError: a flow's grid is not the scan's prepared grid.
    """
    from ..data.table import read_scan_table
    from ..flow.io import read_flow
    from ..layout import flow_path

    cache = {} if cache is None else cache
    table = None
    for sid in train_ids:
        if sid in cache:
            continue
        if table is None:
            table = read_scan_table(prepared).set_index("scan_id", drop=False)
        path = flow_path(flows, sid)
        flow, _ = read_flow(path)
        grid = tuple(int(x) for x in table.loc[sid, "shape"])
        if tuple(flow.shape[1:]) != grid:
            raise InputError(path, f"flow grid {tuple(flow.shape[1:])} differs from the prepared grid {grid}")
        cache[sid] = (float(np.square(flow, dtype=np.float64).sum()), int(np.prod(flow.shape[1:])))
    total = sum(cache[sid][0] for sid in train_ids)
    voxels = sum(cache[sid][1] for sid in train_ids)
    return float(np.sqrt(total / voxels)) if voxels else 0.0


def held_out_pair(prepared: str, scan_id: str):
    from ..data.table import load_pair, read_scan_table

    table = read_scan_table(prepared).set_index("scan_id", drop=False)
    pair = load_pair(prepared, table.loc[scan_id].to_dict(), with_truth=True)
    if pair.truth_flow is None:
        raise InputError(Path(prepared) / scan_id, "has no exact truth flow: `utility` scores against the "
                                                   "phantom's truth (prepare phantom scans)")
    return pair


def _dataset_batches(batch_size: int, seed: int, buffer: int, window, name: str = "train") -> Any:
    """Endless batches of this worker's Ray Data shard ``name`` ("train": the training scans'
    corpus, "target": the held-out ES frame's), a new shuffled pass each time."""
    import ray.train

    from .utility import batch_from_columns

    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        got = 0
        for cols in shard.iter_torch_batches(batch_size=batch_size, drop_last=False,
                                             local_shuffle_buffer_size=buffer or None,
                                             local_shuffle_seed=seed + epoch if buffer else None):
            got += 1
            yield batch_from_columns(cols, window)
        if got == 0:
            raise RuntimeError(f"the corpus dataset {name!r} yielded no samples")
        epoch += 1


def run_estimator(run: UtilityRun, cfg: Config, batches=None, device: Any = "cpu",
                  target_batches=None) -> dict[str, float]:
    """Train one estimator (this process, on ``device``) and score it on the held-out pair;
    ``batches``: an iterator of corpus batches (the Ray Data shard inside a Train worker), or None
    to read the corpus in-process; ``target_batches`` the same for the target arms' corpus (of the
    held-out ES frame). Returns the scores (:class:`~cardiomotion.evaluate.utility.EstimateScore`)
    and the last training losses."""
    import torch

    from ..annotate.pwc import build_pwcnet
    from .utility import (Arm, CorpusSource, PairSource, RandomFieldSource, alternate, pretrain_steps, pretrain_then,
                          score_estimate, source_batches, train_estimator)

    torch.manual_seed(run.seed)
    window = cfg.intensity.window
    arm = Arm(run.arm)
    # the real pairs: every arm but those that read only generated or random samples
    es, ed, flows = training_arrays(run.prepared, run.flows, run.train_ids) if arm.uses_pairs else (None,) * 3
    bs = cfg.utility.batch_size
    made: dict[str, float] = {}
    if arm.uses_corpus and batches is None:
        batches = source_batches(CorpusSource(_open_corpus(run, cfg), window, run.n), bs, run.seed)
    if arm.uses_target and target_batches is None:
        target_batches = source_batches(CorpusSource(_open_corpus(run, cfg, target=True), window, run.n), bs,
                                        run.seed)
    if arm is Arm.CVAE:
        stream = batches
    elif arm is Arm.TARGET:
        stream = target_batches
    elif arm is Arm.ANNOTATED_TARGET:
        stream = alternate(source_batches(PairSource(es, ed, flows, window), bs, run.seed + 1), target_batches)
    elif arm is Arm.MIXED:
        stream = alternate(batches, source_batches(PairSource(es, ed, flows, window), bs, run.seed + 1))
    elif arm is Arm.FINETUNE:
        stream = pretrain_then(batches, source_batches(PairSource(es, ed, flows, window), bs, run.seed + 1),
                               pretrain_steps(planned_steps(run, cfg), cfg.utility.pretrain_share))
    elif arm is Arm.RANDOM:
        stream = source_batches(RandomFieldSource(es, run.n, run.rms_vox, run.seed, window, cfg.utility.random_scales),
                                bs, run.seed)
    elif arm is Arm.ANNOTATED:
        stream = source_batches(PairSource(es, ed, flows, window), bs, run.seed)
    elif arm.transports:
        t0 = time.perf_counter()
        pool = transport_source(run, cfg, es, flows)
        made = {"transport_dropped": float(len(pool.dropped)), "transport_s": round(time.perf_counter() - t0, 2),
                "transport_registered": float(pool.registered)}
        stream = source_batches(anchored_source(run, cfg, pool) if arm is Arm.ANCHORED else pool, bs, run.seed)
    else:
        stream = source_batches(PairSource(es, ed, None, window), bs, run.seed)
    model = build_pwcnet(cfg).to(device)
    settings = estimator_settings(cfg, len(model.channels), run.steps)
    t0 = time.perf_counter()
    losses = train_estimator(model, stream, settings, device=device)
    train_s = time.perf_counter() - t0
    pair = held_out_pair(run.prepared, run.scan_id)
    model.eval()
    from ..data.intensity import hu_to_unit

    with torch.no_grad():
        fixed = hu_to_unit(torch.from_numpy(pair.ed)[None, None], window).to(device)
        moving = hu_to_unit(torch.from_numpy(pair.es)[None, None], window).to(device)
        pred = model(fixed, moving).flow[0].float().cpu()
    score = score_estimate(pred, pair.truth_flow, pair.spacing_mm, pair.ed_labels, pair.es_labels)
    tail = losses[-max(1, len(losses) // 10):]
    return {**score.as_dict(), "final_loss": float(np.mean(tail)), "train_s": round(train_s, 2),
            "steps": settings.steps, **made}


def transport_source(run: UtilityRun, cfg: Config, es_hu: np.ndarray, flows: np.ndarray):
    """The transport arm's pairs (:class:`~cardiomotion.evaluate.utility.TransportSource`) of
    ``run``'s fold, registered once per fold: read from ``run.transport_file`` when it holds this
    plan's pool (the fold's training scans, ``utility.transport_partners``, the seed, the flows
    folder, the intensity window, the registration schedule and folding bound), else built and
    written there under a temporary name, then renamed, for the fold's later seeds and reruns
    (seeds that start together each build it: the same content). The partners follow ``cfg.seed``
    (as the CVAE's pool), so the estimator seeds share one pool. The fields pass through float16
    either way (as a corpus stores its flows), so a built and a read pool are the same. Building
    reads and writes each pair's field in ``run.transport_pairs_dir`` (the storage root's
    :class:`~cardiomotion.train.transport.PairCache`), which every fold shares: a fold registers
    only the pairs no earlier fold, seed or CVAE pool did (``registered`` counts them)."""
    import torch

    from ..train.transport import MAX_FOLDING, TRANSPORT_ITERATIONS, PairCache
    from .utility import TransportSource

    window = cfg.intensity.window
    key = json.dumps({"train_ids": list(run.train_ids), "partners": cfg.utility.transport_partners, "seed": cfg.seed,
                      "flows": str(run.flows), "window": list(window), "iterations": list(TRANSPORT_ITERATIONS),
                      "max_folding": MAX_FOLDING})
    path = Path(run.transport_file) if run.transport_file else None
    if path is not None and path.is_file():
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            rec = None
        if isinstance(rec, dict) and rec.get("key") == key and {"flows", "pairs", "dropped"} <= set(rec):
            return TransportSource(es_hu, run.train_ids, rec["flows"].float(), [tuple(p) for p in rec["pairs"]],
                                   [tuple(p) for p in rec["dropped"]], window)
    if run.spacing_mm is None:
        raise ValueError(f"{run.name}: a transport run needs its fold's spacing_mm (plan_runs(..., spacing_mm=))")
    cache = PairCache(run.transport_pairs_dir) if run.transport_pairs_dir else None
    built = TransportSource.build(es_hu, flows, run.train_ids, cfg.utility.transport_partners, cfg.seed,
                                  run.spacing_mm, window, cache=cache)
    half = built.flows.half()
    if path is not None:
        from ..fileio import atomic_path

        with atomic_path(path) as tmp:  # a unique temporary (mkstemp), so nodes of a shared folder cannot collide
            torch.save({"key": key, "flows": half, "pairs": [list(p) for p in built.pairs],
                        "dropped": [list(p) for p in built.dropped]}, tmp)
    return TransportSource(es_hu, run.train_ids, half.float(), built.pairs, built.dropped, window,
                           registered=built.registered)


def anchored_source(run: UtilityRun, cfg: Config, pool):
    """The anchored arm's N samples (:class:`~cardiomotion.evaluate.utility.AnchoredSource`): the
    fold CVAE ``run.model_uri`` varying the fields of ``pool`` (the fold's transport pool) at
    ``generate.temperature``, the samples seeded by ``cfg.seed`` as the fold's corpus is."""
    from ..generate.model import load_networks, resolve_model
    from .utility import AnchoredSource

    if run.model_uri is None:
        raise ValueError(f"{run.name}: the anchored arm needs its fold's generator (model_uri)")
    resolved = resolve_model(run.model_uri, cfg)
    model, pyramid = load_networks(resolved.blobs(), "cpu")
    return AnchoredSource(pool, model, pyramid, run.n, cfg.seed, cfg.generate.temperature, resolved.window)


def _corpus_of(run: UtilityRun, target: bool) -> tuple[str | None, str | None]:
    """(materialized corpus folder or None, frames view) of ``run``'s training-scan corpus, or
    with ``target`` of its held-out ES frame's."""
    return (run.target_corpus_dir, run.target_frames_dir) if target else (run.corpus_dir, run.frames_dir)


def _open_corpus(run: UtilityRun, cfg: Config, target: bool = False):
    corpus_dir, frames_dir = _corpus_of(run, target)
    if corpus_dir is not None:
        from ..generate.corpus import open_corpus

        return open_corpus(corpus_dir)
    from ..generate.virtual import open_virtual_corpus

    return open_virtual_corpus(run.model_uri, frames_dir, run.n, seed=cfg.seed, cfg=cfg)


def estimator_train_loop(config: dict[str, Any]) -> dict[str, float]:
    """Ray Train worker loop: one estimator; the corpus arms read ``get_dataset_shard("train")``,
    the target arms ``get_dataset_shard("target")``."""
    import ray.train
    import ray.train.torch

    from ..raycluster import quiet_train_worker

    quiet_train_worker()
    cfg = Config.model_validate(config["cfg"])
    run = UtilityRun(**{**config["run"], "train_ids": tuple(config["run"]["train_ids"])})
    arm = UtilityArm(run.arm)
    shard = {name: _dataset_batches(cfg.utility.batch_size, run.seed, min(cfg.utility.shuffle_buffer, run.n),
                                    cfg.intensity.window, name)
             for name, wanted in (("train", arm.uses_corpus), ("target", arm.uses_target)) if wanted}
    # Result.return_value (metrics without a checkpoint are not kept)
    return run_estimator(run, cfg, shard.get("train"), ray.train.torch.get_device(), shard.get("target"))


def corpus_dataset(run: UtilityRun, cfg: Config, target: bool = False):
    """The Ray Dataset the corpus arms of ``run`` train on (with ``target``: the target arms'
    corpus of the held-out ES frame): the first N samples, tensors only."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # one estimator of hundreds: no bars in the log
    corpus_dir, frames_dir = _corpus_of(run, target)
    if corpus_dir is not None:
        from ..generate.corpus import open_corpus

        ds = open_corpus(corpus_dir).ray_dataset(shuffle_seed=run.seed, limit=run.n)
    else:
        from ..generate.virtual import open_virtual_corpus

        ds = open_virtual_corpus(run.model_uri, frames_dir, run.n, seed=cfg.seed, cfg=cfg).ray_dataset(
            shuffle_seed=run.seed)
    return ds.select_columns(["es", "ed_syn", "flow"])


def train_estimator_on_ray(run: UtilityRun, cfg: Config) -> dict[str, Any]:
    """One estimator as a Ray Train run (one worker); returns its result row."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..config import storage_root
    from ..raycluster import stage_gpu, train_logging

    use_gpu = stage_gpu(cfg.utility.resources, ray, "utility.resources.use_gpu")
    arm = UtilityArm(run.arm)
    datasets = {name: corpus_dataset(run, cfg, target=name == "target")
                for name, wanted in (("train", arm.uses_corpus), ("target", arm.uses_target)) if wanted} or None
    trainer = TorchTrainer(
        estimator_train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run": asdict(run)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker=cfg.utility.resources.bundle(use_gpu)),
        run_config=RunConfig(name=run.name, storage_path=str(storage_root(cfg) / "ray_results" / "utility"),
                             logging_config=train_logging()),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    metrics = getattr(result, "return_value", None)
    if result.error is not None or not metrics:
        raise RuntimeError(f"utility: {run.name} failed: {result.error}")
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"fold": run.fold, "scan": run.scan_id, "arm": run.arm, "n": run.n, "seed": run.seed,
            **{k: metrics[k] for k in (*SCORES, "final_loss", "train_s", "transport_s") if k in metrics},
            **{k: int(metrics[k]) for k in ("transport_dropped", "transport_registered") if k in metrics},
            "steps": int(metrics.get("steps", planned_steps(run, cfg))),
            "wall_s": round(time.perf_counter() - t0, 2)}


def estimator_task(run_json: dict, cfg_json: dict) -> dict[str, Any]:
    """Inside a Ray task (no resources of its own): one estimator's Ray Train run."""
    cfg = Config.model_validate(cfg_json)
    run = UtilityRun(**{**run_json, "train_ids": tuple(run_json["train_ids"])})
    return train_estimator_on_ray(run, cfg)
