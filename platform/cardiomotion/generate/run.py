"""The Ray run of ``generate``: shards → an actor pool of :class:`~cardiomotion.generate.shards.ShardWorker`
(GPU actors when the cluster has GPUs), the per-shard records folded into the run's statistics,
and the failures told apart (a lost actor is a resumable :class:`~cardiomotion.errors.StageFailed`;
a bug keeps its traceback).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from .engine import SampleSpec
from .shards import ShardJob, ShardWorker
from .model import ResolvedModel

Log = Callable[[str], None]


def empty_stats() -> dict[str, Any]:
    return {"generated": 0, "bytes": 0, "seconds": 0.0, "samples_per_s": 0.0, "mb_per_s": 0.0,
            "steady_samples_per_s": 0.0,
            "decode_warp_samples_per_s_per_actor": 0.0, "actors": 0, "use_gpu": False, "actor_peak_rss_mb": 0.0,
            "actor_rss_mb_by_shard": [], "actor_retained_rss_mb_by_shard": [], "shards": []}


def run_pipeline(todo: list[int], out: Path, n: int, resolved: ResolvedModel, frames: dict, identity: dict,
                  ident_sha: str, seed: int, temperature: float, plan: dict, cfg: Config, log: Log,
                  fail_at_shard: int | tuple[int, str] | None, trace_memory: bool = False) -> dict[str, Any]:
    from ..raycluster import actor_pool, init_ray

    g = cfg.generate
    ray = init_ray(cfg.ray)
    import ray.data

    use_gpu, actors = actor_pool(g.resources, g.actors, ray, "generate.resources.use_gpu")
    actors = max(1, min(actors, len(todo)))
    job = ShardJob(
        blobs_ref=ray.put(resolved.blobs()), frames_ref=ray.put({k: frames[k] for k in ("scan_ids", "es", "affines")}),
        spec=SampleSpec(seed=seed, temperature=temperature, window=resolved.window, flow_dtype=g.flow_dtype,
                        model_uri=plan["model_uri"], model_sha256=resolved.cvae_sha256),
        out=str(out), n=n, shard_size=g.shard_size, batch_size=g.batch_size, identity=ident_sha, use_gpu=use_gpu,
        precision=g.precision, channels_last=g.channels_last, cpus_per_actor=g.resources.cpus,
        fail_at_shard=fail_at_shard, trace_memory=trace_memory)
    log(f"generate: {actors} {'GPU' if use_gpu else 'CPU'} actor(s), batch {g.batch_size}")
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardWorker, fn_constructor_kwargs={"job": job}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=g.resources.cpus,
                        num_gpus=g.resources.gpus if use_gpu else 0)
    rows: list[dict[str, Any]] = []
    failed = None
    try:
        for row in ds.iter_rows():
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            if row["error"]:
                failed = row["error"]
                break  # stops the dataset; shards already renamed into place are complete
            rows.append(row)
            if len(rows) % max(1, len(todo) // 10) == 0 or len(rows) == len(todo):
                log(f"generate: {len(rows)}/{len(todo)} shards written")
    except Exception as exc:
        if lost_worker(exc):  # an actor died (out of memory, lost node): the environment, not the code
            from ..errors import StageFailed

            raise StageFailed(f"generate: an actor died ({root_cause(exc)}); finished shards are kept: rerun the "
                              "same command to resume") from exc
        raise RuntimeError(f"generation failed ({root_cause(exc)}); finished shards are kept: rerun the "
                           "same command to resume") from exc
    if failed and failed.startswith("OSERROR "):
        from ..errors import StageFailed

        raise StageFailed(f"generate: {failed.removeprefix('OSERROR ')}; finished shards are kept (nothing "
                          "partial): free space or fix permissions and rerun the same command to resume")
    if failed:
        first, _, trace = failed.partition("\n")
        raise RuntimeError(f"generation failed at {first}; finished shards are kept: rerun the same command "
                           f"to resume\nworker traceback:\n{trace}")
    seconds = time.perf_counter() - t0
    generated = int(sum(r["count"] for r in rows))
    nbytes = int(sum(r["bytes"] for r in rows))
    dec = sum(r["decode_seconds"] for r in rows)
    busy = sum(r["seconds"] for r in rows) / actors  # per actor, without actor start-up and scheduling
    return {"generated": generated, "bytes": nbytes, "seconds": seconds,
            "samples_per_s": generated / seconds if seconds > 0 else 0.0,
            "mb_per_s": nbytes / 2**20 / seconds if seconds > 0 else 0.0,
            "steady_samples_per_s": generated / busy if busy > 0 else 0.0,
            "decode_warp_samples_per_s_per_actor": generated / dec if dec > 0 else 0.0,
            "actors": actors, "use_gpu": bool(use_gpu),
            "actor_peak_rss_mb": float(max(r["rss_mb"] for r in rows)),
            "actor_rss_mb_by_shard": [round(float(r["rss_mb"]), 2) for r in sorted(rows, key=lambda r: r["index"])],
            "actor_retained_rss_mb_by_shard": [round(float(r["retained_rss_mb"]), 2)
                                               for r in sorted(rows, key=lambda r: r["index"])],
            **({"actor_traced_mb_by_shard": [round(float(r["traced_mb"]), 4)
                                             for r in sorted(rows, key=lambda r: r["index"])],
                "actor_traced_peak_mb": float(max(r["traced_peak_mb"] for r in rows))} if trace_memory else {}),
            "shards": rows}


def lost_worker(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) says a Ray worker, actor or node was lost."""
    import ray.exceptions as rex

    lost = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "WorkerCrashedError", "NodeDiedError",
                                           "OutOfMemoryError", "ObjectLostError") if hasattr(rex, n))
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, lost):
            return True
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        exc = nxt if isinstance(nxt, BaseException) else None
    return False


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost exception (Ray wraps worker errors several times)."""
    while True:
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException) or nxt is exc:
            break
        exc = nxt
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__
