"""``generate_corpus``: the Ray Data generation job, resumable, with checks before any work.

Pipeline: rows = indices of the shards still to write → ``map_batches`` with an actor pool of
:class:`~cardiomotion.generate.engine.ShardWorker` (GPU actors when the cluster has GPUs): each
actor loads the model, the frozen pyramid and the ES frames once, then per shard decodes blocks of
latents, warps ES → ED_syn and streams the samples into a tar written under a temporary name,
fsynced and renamed when complete, followed by a small sidecar record. The driver only sees
per-shard records (a few numbers), never samples, so its memory does not grow with N; an
actor's memory is bounded by two decode blocks.

Files of a corpus folder: ``plan.json`` (what the corpus is: model hashes, seed, settings, scans;
written before the first shard), ``shard-KKKKKK.tar`` + ``shard-KKKKKK.json`` (sidecar),
``manifest.json`` (written last) and ``previews/``. A rerun with the same plan skips complete
shards (sidecar present, size — or with ``generate.verify: sha256`` the checksum — matching) and
writes the others; a different model, seed or setting is refused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import Config, load_config
from ..errors import InputError
from .corpus import MANIFEST, open_corpus, read_manifest
from .engine import (FORMAT, FORMAT_VERSION, MEMBERS, SampleEngine, ShardWorker, block_of, num_shards,
                     sample_key, shard_name, shard_range, sidecar_name)
from ..layout import CORPUS_PLAN as PLAN, FRAMES, GENERATE_LOCK as LOCK, PREVIEWS, SCAN_TABLE, SHARD_GLOB
from .model import ResolvedModel, load_networks, resolve_model

Log = Callable[[str], None]


# ---------------------------------------------------------------------------- inputs
def load_frames(prepared_dir: str | Path) -> dict[str, Any]:
    """The ES frames of a prepared dataset: {"scan_ids" (sorted), "es" (n, I, J, K) int16 HU,
    "affines" (n, 4, 4), "es_sha256" (of each frame's int16 voxels and affine), "spacing_mm"}.

    Raises:
        InputError: no scan table, unreadable frames, or frames on different grids.
    """
    import nibabel as nib

    from ..data.table import read_scan_table

    prepared = Path(prepared_dir).resolve()
    table = read_scan_table(prepared)
    if len(table) == 0:
        raise InputError(prepared / SCAN_TABLE, "holds no scans")
    rows = sorted(table.to_dict("records"), key=lambda r: str(r["scan_id"]))
    ids, frames, affines, shas = [], [], [], []
    for row in rows:
        path = prepared / row["es_path"]
        try:
            img = nib.load(str(path))
            vol = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:
            raise InputError(path, f"unreadable ES frame ({exc.__class__.__name__}: {exc})") from None
        if vol.ndim != 3 or not np.all(np.isfinite(vol)):
            raise InputError(path, f"ES frame must be a finite 3-D volume, got shape {vol.shape}")
        if frames and vol.shape != frames[0].shape:
            raise InputError(path, f"grid {vol.shape} differs from {frames[0].shape} of {ids[0]}")
        es = np.clip(np.round(vol), -32768, 32767).astype(np.int16)
        aff = np.asarray(img.affine, dtype=np.float64)
        h = hashlib.sha256(es.tobytes())
        h.update(np.round(aff, 6).tobytes())
        ids.append(str(row["scan_id"]))
        frames.append(es)
        affines.append(aff)
        shas.append(h.hexdigest())
    spacing = float(np.sqrt((affines[0][:3, :3] ** 2).sum(0))[0])
    provenance = [{k: (None if row.get(k) is None or row.get(k) != row.get(k) else str(row[k]))
                   for k in ("source", "format", "phases_from")} for row in rows]  # NaN → None
    return {"scan_ids": ids, "es": np.stack(frames), "affines": np.stack(affines), "es_sha256": shas,
            "spacing_mm": spacing, "prepared": str(prepared), "provenance": provenance}


def check_model_fits(resolved: ResolvedModel, frames: dict[str, Any], prepared: Path) -> None:
    grid = tuple(int(n) for n in frames["es"].shape[1:])
    if tuple(resolved.grid) != grid:
        raise InputError(resolved.uri, f"model grid {list(resolved.grid)} does not match the prepared data's "
                                       f"grid {list(grid)} ({prepared}); use the prepared data the model was trained on")
    spacing = resolved.meta.get("spacing_mm")
    if spacing is not None and abs(float(spacing) - frames["spacing_mm"]) > 1e-3 * float(spacing):
        raise InputError(resolved.uri, f"model spacing {spacing} mm does not match the prepared data's "
                                       f"{frames['spacing_mm']:g} mm ({prepared})")
    model, _ = load_networks(resolved.blobs())
    try:
        model.check_grid(grid)
    except ValueError as exc:
        raise InputError(resolved.uri, str(exc)) from None


def _identity(resolved: ResolvedModel, frames: dict[str, Any], seed: int, temperature: float, cfg: Config) -> dict:
    g = cfg.generate
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model_cvae_sha256": resolved.cvae_sha256, "model_pyramid_sha256": resolved.pyramid_sha256,
        "seed": int(seed), "temperature": float(temperature), "shard_size": g.shard_size,
        "batch_size": g.batch_size, "flow_dtype": g.flow_dtype, "precision": g.precision,
        "grid": [int(n) for n in frames["es"].shape[1:]], "window": list(resolved.window),
        "scans": [{"scan_id": s, "es_sha256": h} for s, h in zip(frames["scan_ids"], frames["es_sha256"])],
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _refuse_other_corpus(out: Path, found: dict, want: dict) -> None:
    """InputError naming what differs between an existing corpus' identity and this run's."""
    if found.get("model_cvae_sha256") != want["model_cvae_sha256"] or \
            found.get("model_pyramid_sha256") != want["model_pyramid_sha256"]:
        theirs, ours = str(found.get("model_cvae_sha256"))[:12], want["model_cvae_sha256"][:12]
        raise InputError(out, f"holds a corpus made with another model (cvae sha256 {theirs}…, this model "
                              f"{ours}…); it is never overwritten or mixed: use another --out")
    if found.get("seed") != want["seed"]:
        raise InputError(out, f"holds a corpus made with seed {found.get('seed')}, not {want['seed']}; "
                              "it is never overwritten or mixed: use another --out")
    keys = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
    shown = ", ".join(f"{k}: {found.get(k)!r} → {want.get(k)!r}" if k != "scans" else "the prepared scans differ"
                      for k in keys)
    raise InputError(out, f"holds a corpus made with other settings ({shown}); it is never overwritten or "
                          "mixed: rerun with the same settings to finish it, or use another --out")


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and ".tmp" in p.name


def _check_out(out: Path, identity: dict, n: int, shard_size: int) -> dict | None:
    """Refuse an --out that is not this corpus (or empty); return the existing plan, if any."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; use another --out")
    if not out.exists():
        return None
    plan_path = out / PLAN
    plan = None
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
            found = plan["identity"]
        except (ValueError, KeyError):
            raise InputError(plan_path, "unreadable corpus plan; use another --out") from None
        if found != identity:
            if any(out.glob(SHARD_GLOB)) or (out / MANIFEST).is_file():
                _refuse_other_corpus(out, found, identity)
            # A plan without a single shard is only an intention (a run that stopped before any
            # work, e.g. MLflow unreachable): it does not make the folder another corpus.
            plan = None
    else:
        others = sorted(p.name for p in out.iterdir() if not _is_temp(p) and p.name != LOCK and p.name != FRAMES
                        and not (p.name.startswith(".") and p.name.endswith(".lock")))
        if others:
            raise InputError(out, f"is not empty and holds no corpus (found {', '.join(others[:3])}"
                                  f"{' …' if len(others) > 3 else ''}); use an empty or new --out")
    if (out / MANIFEST).is_file():
        try:
            man = json.loads((out / MANIFEST).read_text())
        except ValueError:
            man = {}
        if man.get("identity") not in (None, identity):
            _refuse_other_corpus(out, man["identity"], identity)
        if int(man.get("n", 0)) > n:
            raise InputError(out, f"holds a complete corpus of {man['n']} samples, more than --n {n}; "
                                  "it is never cut down: use another --out")
    last = num_shards(n, shard_size)
    extra = sorted(p.name for p in out.glob(SHARD_GLOB) if int(p.stem.split("-")[1]) >= last)
    if extra:
        raise InputError(out, f"holds shards beyond --n {n} ({extra[0]} …); it is never cut down: use another --out")
    return plan


@contextlib.contextmanager
def _locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(out, "another `generate` is writing this corpus right now") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _finished_shard(out: Path, k: int, n: int, shard_size: int, identity_sha: str, verify: str) -> dict | None:
    """The sidecar record of shard k if the shard is complete and belongs to this corpus."""
    from .model import sha256_file

    tar, side = out / shard_name(k), out / sidecar_name(k)
    if not (tar.is_file() and side.is_file()):
        return None
    try:
        rec = json.loads(side.read_text())
    except ValueError:
        return None
    if rec.get("identity") != identity_sha:
        raise InputError(tar, "belongs to another corpus (its sidecar names another plan); use another --out")
    first, count = shard_range(k, n, shard_size)
    if (rec.get("first"), rec.get("count")) != (first, count) or tar.stat().st_size != rec.get("bytes"):
        return None
    if verify == "sha256" and sha256_file(tar) != rec.get("sha256"):
        return None
    return rec


# ---------------------------------------------------------------------------- the job
def generate_from_frames(model: str | Path, frame_paths: list[str | Path], out_dir: str | Path, n: int,
                         seed: int | None = None, cfg: Config | None = None, **kwargs: Any) -> Path:
    """Generate a corpus conditioned on single 3-D frames (any single-phase cardiac CT).

    Each frame is prepared as ``prepare`` prepares an ES frame, on the model's grid and voxel size
    (:func:`cardiomotion.data.frames.prepare_frames`), into ``out_dir/frames`` — its table keeps
    every frame's source path and format, and the manifest repeats them — then
    :func:`generate_corpus` runs on that folder. A rerun resumes both. Keyword arguments go to
    :func:`generate_corpus`.

    Raises:
        InputError: as :func:`generate_corpus`, and for unreadable frames or an ``out_dir``
            holding a corpus made from other frames or from ``--prepared`` data.
    """
    from ..data.frames import prepare_frames

    cfg = cfg or load_config(None)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; use another --out")
    if out.is_dir() and not (out / FRAMES).is_dir() and ((out / PLAN).is_file() or (out / MANIFEST).is_file()
                                                          or any(out.glob(SHARD_GLOB))):
        raise InputError(out, "holds a corpus made from --prepared data, not from --frames; use another --out")
    if (out / FRAMES / SCAN_TABLE).is_file():  # a corpus (or its start) exists: its frames never change
        from ..data.frames import plan_frames
        from ..data.table import read_scan_table

        have = {(str(r["scan_id"]), str(r["source"])) for r in read_scan_table(out / FRAMES).to_dict("records")}
        want = {(fid, str(path)) for fid, path in plan_frames(frame_paths)}
        if have != want:
            raise InputError(out, f"holds a corpus conditioned on other frames ({len(have)} frames, "
                                  f"{len(have & want)} of them among the {len(want)} given); use another --out")
    resolved = resolve_model(model, cfg)
    spacing = resolved.meta.get("spacing_mm")
    if spacing is None:
        raise InputError(resolved.uri, "model.json has no spacing_mm: the frames' voxel size is unknown")
    prepare_frames(frame_paths, out / FRAMES, cfg, resolved.grid, float(spacing), log=kwargs.get("log", lambda _m: None))
    return generate_corpus(model, out / FRAMES, out, n, seed, cfg, **kwargs)


def generate_corpus(
    model: str | Path,
    prepared_dir: str | Path,
    out_dir: str | Path,
    n: int,
    seed: int | None = None,
    cfg: Config | None = None,
    *,
    temperature: float | None = None,
    track: bool = True,
    log: Log = lambda _m: None,
    _fail_at_shard: int | tuple[int, str] | None = None,
    _trace_memory: bool = False,
) -> Path:
    """Generate (or finish) an N-sample corpus of (ES, ED_syn, flow) under ``out_dir``.

    Args:
        model: MLflow model URI (``runs:/<id>/model``, ``models:/…``), model folder or its cvae.pt.
        prepared_dir: prepared dataset (``scans.parquet`` + ``<scan>/es.nii.gz``) on the model's grid.
        out_dir: corpus folder: new, empty, or an unfinished/smaller corpus of the same plan.
        n: number of samples (> 0).
        seed: corpus seed (default ``generate.seed``, else the top-level ``seed``).
        cfg: configuration (``generate`` section; ``ray``, ``tracking``).
        temperature: prior temperature (default ``generate.temperature``).
        track: log the run to MLflow (parameters, throughput, counts, previews).

    Returns:
        The path of ``manifest.json`` (written last).

    Raises:
        InputError: before any work — a model that does not resolve, a model/data grid
            mismatch, N ≤ 0, an ``out_dir`` holding something else (another model, seed or
            settings, unrelated files, more samples than N).
        RuntimeError: a worker failed (finished shards stay; a rerun resumes).
    """
    cfg = cfg or load_config(None)
    g = cfg.generate
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise InputError("--n", f"the number of samples must be a positive integer, got {n!r}")
    n = int(n)
    seed = int(seed if seed is not None else (g.seed if g.seed is not None else cfg.seed))
    temperature = float(temperature if temperature is not None else g.temperature)
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError("--temperature", f"must be >= 0, got {temperature}")
    out = Path(out_dir).expanduser().resolve()
    resolved = resolve_model(model, cfg)
    frames = load_frames(prepared_dir)
    check_model_fits(resolved, frames, Path(prepared_dir))
    identity = _identity(resolved, frames, seed, temperature, cfg)
    ident_sha = _digest(identity)
    plan = _check_out(out, identity, n, g.shard_size)

    with _locked(out):
        for p in out.iterdir():
            if _is_temp(p):  # left by a crashed run (we hold the lock: nobody else writes here)
                p.unlink(missing_ok=True)
        if plan is None:
            from ..fileio import write_json

            plan = {"identity": identity, "identity_sha256": ident_sha, "model_uri": resolved.uri,
                    "prepared": frames["prepared"], "created": _now()}
            write_json(out / PLAN, plan)
        shards = num_shards(n, g.shard_size)
        done = {k: r for k in range(shards)
                if (r := _finished_shard(out, k, n, g.shard_size, ident_sha, g.verify)) is not None}
        todo = [k for k in range(shards) if k not in done]
        if not todo and (out / MANIFEST).is_file() and read_manifest(out).get("n") == n:
            checked = ("every shard's sha256 matches the manifest" if g.verify == "sha256" else
                       "shard sizes match the manifest; `generate.verify: sha256` (or Corpus.verify()) checks content")
            log(f"generate: {out} already holds the complete {n}-sample corpus ({checked})")
            return out / MANIFEST
        (out / MANIFEST).unlink(missing_ok=True)  # the corpus is about to change
        log(f"generate: {n} samples in {shards} shards of {g.shard_size} → {out} "
            f"({len(done)} shards already complete, {len(todo)} to write; seed {seed}, T = {temperature:g})")

        run_ctx = _mlflow_run(cfg, out, resolved, frames, n, seed, temperature) if track else contextlib.nullcontext()
        with run_ctx as run:
            stats = _run_pipeline(todo, out, n, resolved, frames, identity, ident_sha, seed, temperature, plan,
                                  cfg, log, _fail_at_shard, _trace_memory) if todo else _empty_stats()
            try:
                manifest = _write_manifest(out, n, plan, resolved, frames, identity, ident_sha, seed, temperature,
                                           cfg, stats, run.info.run_id if run is not None else None)
            except OSError as exc:
                from ..errors import StageFailed

                raise StageFailed(f"generate: {exc.filename or out / MANIFEST}: {exc.strerror or exc}; every shard "
                                  "is complete and kept: free space or fix permissions and rerun the same command to "
                                  "write the manifest") from None
            log(f"generate: wrote {manifest} ({stats['generated']} samples this run, "
                f"{stats['samples_per_s']:.1f} samples/s, {stats['mb_per_s']:.1f} MB/s)")
            previews = write_previews(out, resolved, cfg, log=log) if g.previews else []
            if run is not None:
                _log_run(stats, n, shards, len(done), manifest, previews)
    return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _empty_stats() -> dict[str, Any]:
    return {"generated": 0, "bytes": 0, "seconds": 0.0, "samples_per_s": 0.0, "mb_per_s": 0.0,
            "steady_samples_per_s": 0.0,
            "decode_warp_samples_per_s_per_actor": 0.0, "actors": 0, "use_gpu": False, "actor_peak_rss_mb": 0.0,
            "actor_rss_mb_by_shard": [], "actor_retained_rss_mb_by_shard": [], "shards": []}


def _run_pipeline(todo: list[int], out: Path, n: int, resolved: ResolvedModel, frames: dict, identity: dict,
                  ident_sha: str, seed: int, temperature: float, plan: dict, cfg: Config, log: Log,
                  fail_at_shard: int | tuple[int, str] | None, trace_memory: bool = False) -> dict[str, Any]:
    from ..raycluster import init_ray

    g = cfg.generate
    ray = init_ray(cfg.ray)
    import ray.data

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    use_gpu = g.use_gpu if g.use_gpu is not None else gpus > 0
    if use_gpu and gpus <= 0:
        raise InputError("generate.use_gpu", "is true but the Ray cluster has no GPU")
    if g.actors:
        actors = g.actors
    elif use_gpu:
        actors = max(1, int(gpus / g.gpus_per_actor))
    else:
        actors = max(1, int(float(res.get("CPU", 1)) // g.cpus_per_actor))
    actors = max(1, min(actors, len(todo)))
    payload = {
        "refs": {"blobs": ray.put(resolved.blobs()),
                 "frames": ray.put({k: frames[k] for k in ("scan_ids", "es", "affines")})},
        "spec": {"seed": seed, "temperature": temperature, "window": list(resolved.window),
                 "flow_dtype": g.flow_dtype, "model_uri": plan["model_uri"], "model_sha256": resolved.cvae_sha256},
        "out": str(out), "n": n, "shard_size": g.shard_size, "batch_size": g.batch_size, "identity": ident_sha,
        "use_gpu": use_gpu, "precision": g.precision, "channels_last": g.channels_last,
        "cpus_per_actor": g.cpus_per_actor, "fail_at_shard": fail_at_shard, "trace_memory": trace_memory,
    }
    log(f"generate: {actors} {'GPU' if use_gpu else 'CPU'} actor(s), batch {g.batch_size}")
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardWorker, fn_constructor_kwargs={"payload": payload}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=g.cpus_per_actor,
                        num_gpus=g.gpus_per_actor if use_gpu else 0)
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
        if _lost_worker(exc):  # an actor died (out of memory, lost node): the environment, not the code
            from ..errors import StageFailed

            raise StageFailed(f"generate: an actor died ({_root_cause(exc)}); finished shards are kept: rerun the "
                              "same command to resume") from exc
        raise RuntimeError(f"generation failed ({_root_cause(exc)}); finished shards are kept: rerun the "
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


def _lost_worker(exc: BaseException) -> bool:
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


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost exception (Ray wraps worker errors several times)."""
    while True:
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException) or nxt is exc:
            break
        exc = nxt
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__


def _write_manifest(out: Path, n: int, plan: dict, resolved: ResolvedModel, frames: dict, identity: dict,
                    ident_sha: str, seed: int, temperature: float, cfg: Config, stats: dict,
                    run_id: str | None) -> Path:
    from ..fileio import write_json

    g = cfg.generate
    shards = []
    per_scan: dict[str, int] = {s: 0 for s in frames["scan_ids"]}
    devices = set()
    for k in range(num_shards(n, g.shard_size)):
        rec = _finished_shard(out, k, n, g.shard_size, ident_sha, "size")
        if rec is None:
            raise RuntimeError(f"shard {k} is missing or incomplete after the run")
        shards.append({key: rec[key] for key in ("index", "name", "first", "count", "bytes", "sha256", "device")})
        for sid, c in rec["scan_counts"].items():
            per_scan[sid] = per_scan.get(sid, 0) + int(c)
        devices.add(rec["device"])
    total = sum(s["count"] for s in shards)
    if total != n:
        raise RuntimeError(f"shards hold {total} samples, expected {n}")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created": _now(),
        "n": n, "n_shards": len(shards), "shard_size": g.shard_size, "batch_size": g.batch_size,
        "seed": seed, "temperature": temperature,
        "model": {"uri": plan["model_uri"], "cvae_sha256": resolved.cvae_sha256,
                  "pyramid_sha256": resolved.pyramid_sha256, "meta": resolved.meta},
        "prepared": plan["prepared"],
        "grid": identity["grid"], "spacing_mm": frames["spacing_mm"], "intensity_window": list(resolved.window),
        "dtypes": {"es": "int16", "ed_syn": "int16", "flow": g.flow_dtype},
        "members": list(MEMBERS), "key_format": "9-digit zero-padded sample index",
        "convention": "flow: pull field on the ED grid in voxels, channel c along array axis c; "
                      "ED_syn = round(warp(ES, flow)) in HU; affine = the grid's RAS affine (mm)",
        "scans": [{"scan_id": s, "es_sha256": h, "affine": a.tolist(), "count": per_scan.get(s, 0), **prov}
                  for s, h, a, prov in zip(frames["scan_ids"], frames["es_sha256"], frames["affines"],
                                           frames.get("provenance") or [{}] * len(frames["scan_ids"]))],
        "counts": {"samples": n, "shards": len(shards), "bytes": int(sum(s["bytes"] for s in shards)),
                   "per_scan": per_scan},
        "devices": sorted(devices),
        "config": g.model_dump(mode="json"),
        "identity": identity, "identity_sha256": ident_sha,
        "run": {"mlflow_run_id": run_id, **{k: v for k, v in stats.items() if k != "shards"}},
        "shards": shards,
    }
    return write_json(out / MANIFEST, manifest)


@contextlib.contextmanager
def _mlflow_run(cfg: Config, out: Path, resolved: ResolvedModel, frames: dict, n: int, seed: int,
                temperature: float):
    from .. import tracking

    g = cfg.generate
    params = {"generate": g.model_dump(mode="json"), "n": n, "seed": seed, "temperature": temperature,
              "model_uri": resolved.uri, "model_cvae_sha256": resolved.cvae_sha256, "out": str(out),
              "prepared": frames["prepared"], "n_scans": len(frames["scan_ids"]),
              "grid": [int(x) for x in frames["es"].shape[1:]]}
    params["generate"].pop("seed", None)
    params["generate"].pop("temperature", None)
    tags = {"stage": "generate", "model_uri": resolved.uri, "corpus_out": str(out)}
    if resolved.uri.startswith("runs:/"):
        tags["source_run_id"] = resolved.uri.split("/")[1]
    # we hold this corpus' lock: a RUNNING run for the same folder was killed mid-run
    tracking.supersede_running(cfg, "corpus_out", str(out))
    with tracking.start_run(cfg, f"generate_{out.name}", params=params, tags=tags) as run:
        yield run


def _log_run(stats: dict, n: int, shards: int, reused: int, manifest: Path, previews: list[Path]) -> None:
    from .. import tracking

    tracking.log_metrics({
        "samples_per_s": stats["samples_per_s"], "mb_per_s": stats["mb_per_s"],
        "steady_samples_per_s": stats["steady_samples_per_s"],
        "decode_warp_samples_per_s_per_actor": stats["decode_warp_samples_per_s_per_actor"],
        "generated_samples": stats["generated"], "bytes_written": stats["bytes"], "seconds": stats["seconds"],
        "n_samples": n, "n_shards": shards, "reused_shards": reused, "actors": stats["actors"],
        "actor_peak_rss_mb": stats["actor_peak_rss_mb"],
    })
    tracking.log_artifact(manifest, "corpus")
    for p in previews:
        tracking.log_artifact(p, "figures")


# ---------------------------------------------------------------------------- previews, regeneration
def traversal_figure(resolved: ResolvedModel, es_hu: np.ndarray, spacing_mm: float, path: str | Path,
                     cfg: Config, title: str | None = None, view: str = "coronal") -> Path:
    """Decode a latent traversal for one ES frame (on this process' GPU if it has one, else the
    CPU) and save the mosaic PNG."""
    import torch

    from .figures import plot_traversal
    from .traversal import latent_directions, latent_traversal

    g = cfg.generate
    model, pyramid = load_networks(resolved.blobs(), "cuda" if torch.cuda.is_available() else "cpu")
    grid = tuple(int(x) for x in es_hu.shape[-3:])
    dirs = latent_directions(model.latent_shape(grid), max(1, g.traversal_directions), "channels")
    alphas = list(np.linspace(-g.traversal_range, g.traversal_range, g.traversal_steps))
    flows = latent_traversal(model, pyramid, es_hu, resolved.window, dirs, alphas)
    return plot_traversal(es_hu, flows, alphas, path, spacing_mm=spacing_mm, view=view, title=title,
                          labels=[f"latent channel {c}" if c < model.latent_channels else f"random {c}"
                                  for c in range(len(dirs))])


def write_previews(out: str | Path, resolved: ResolvedModel, cfg: Config, log: Log = lambda _m: None) -> list[Path]:
    """``previews/``: the first samples (orthogonal slices), the ES→ED GIF of sample 0 and the
    latent-traversal mosaic of sample 0's scan."""
    from .figures import plot_sample, transition_gif

    g = cfg.generate
    corpus = open_corpus(out)
    pdir = Path(out) / PREVIEWS
    paths = []
    for i in range(min(g.previews, len(corpus))):
        paths.append(plot_sample(corpus[i], pdir / f"sample_{sample_key(i)}.png"))
    if g.previews:
        s0 = corpus[0]
        paths.append(transition_gif(s0["es"], s0["flow"], pdir / f"transition_{sample_key(0)}.gif", frames=g.gif_frames,
                                    velocity=sample_velocity(out, 0, model=resolved, cfg=cfg)))
        if g.traversal_directions:
            paths.append(traversal_figure(resolved, s0["es"], float(s0["meta"]["spacing_mm"]),
                                          pdir / f"traversal_{s0['scan_id']}.png", cfg,
                                          title=f"latent traversal, {s0['scan_id']} (T-independent, z0 = 0)"))
    for p in paths:
        log(f"  preview {p}")
    return paths


def _sample_engine(corpus_dir: str | Path, index: int, model, prepared, cfg: Config | None,
                   device: str) -> tuple[SampleEngine, dict[str, Any]]:
    """The engine that made a corpus (model and frames checked against its manifest) and the manifest."""
    cfg = cfg or load_config(None)
    man = read_manifest(corpus_dir)
    n = int(man["n"])
    if not 0 <= index < n:
        raise IndexError(f"sample {index} out of range: the corpus has {n} samples")
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model or man["model"]["uri"], cfg)
    if resolved.cvae_sha256 != man["model"]["cvae_sha256"] or resolved.pyramid_sha256 != man["model"]["pyramid_sha256"]:
        raise InputError(resolved.uri, "is not the model this corpus was made with (sha256 differs)")
    frames = load_frames(prepared or man["prepared"])
    if frames["es_sha256"] != [s["es_sha256"] for s in man["identity"]["scans"]]:
        raise InputError(frames["prepared"], "ES frames differ from those this corpus was made with")
    ident = man["identity"]
    spec = {"seed": man["seed"], "temperature": man["temperature"], "window": ident["window"],
            "flow_dtype": ident["flow_dtype"], "model_uri": man["model"]["uri"],
            "model_sha256": man["model"]["cvae_sha256"]}
    engine = SampleEngine(resolved.blobs(), frames, spec, device, ident["precision"], man["config"]["channels_last"])
    return engine, man


def sample_velocity(corpus_dir: str | Path, index: int, *, model: str | Path | ResolvedModel | None = None,
                    prepared: str | Path | None = None, cfg: Config | None = None) -> np.ndarray | None:
    """The stationary velocity v of sample ``index`` ((3, I, J, K) float32 voxels; its flow is
    exp(v)) when the corpus' model predicts velocities, else None. Decoded again from (model,
    seed, index): the corpus stores exp(v) only."""
    man = read_manifest(corpus_dir)
    if (man.get("model", {}).get("meta") or {}).get("output") != "velocity":
        return None
    engine, _ = _sample_engine(corpus_dir, index, model, prepared, cfg, "cpu")
    return engine.velocities([index])[0]


def regenerate_sample(corpus_dir: str | Path, index: int, *, model: str | Path | None = None,
                      prepared: str | Path | None = None, cfg: Config | None = None, device: str = "cpu",
                      raw: bool = False) -> dict[str, Any]:
    """Make sample ``index`` of a corpus again from (model, seed, index) alone.

    Decodes the sample's block (:func:`~cardiomotion.generate.engine.block_of`) with the corpus'
    model (its URI, or ``model``; hashes checked) and prepared ES frames (the recorded folder, or
    ``prepared``; hashes checked). On the same kind of device and precision the bytes equal the
    stored ones. Returns ``raw`` member bytes {"es.npy", …} or a dict like ``Corpus[i]``.
    """
    from .corpus import decode_member, sample_dict

    engine, man = _sample_engine(corpus_dir, index, model, prepared, cfg, device)
    n = int(man["n"])
    start, stop = block_of(index, n, man["shard_size"], man["batch_size"])
    idx = list(range(start, stop))
    members = dict(engine.members(engine.decode_block(idx), idx))
    key = sample_key(index)
    mine = {m: members[f"{key}.{m}"] for m in MEMBERS}
    return mine if raw else sample_dict(index, {m: decode_member(m, b) for m, b in mine.items()})
