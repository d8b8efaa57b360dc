"""``generate_corpus``: the Ray Data generation job, resumable, with checks before any work.

Pipeline: rows = indices of the shards still to write → ``map_batches`` with an actor pool of
:class:`~cardiomotion.generate.shards.ShardWorker` (GPU actors when the cluster has GPUs): each
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
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import Config, load_config
from ..errors import InputError
from ..layout import CORPUS_PLAN as PLAN, FRAMES, MANIFEST, SCAN_TABLE, SHARD_GLOB
from .corpus import read_manifest
from .identity import check_out, corpus_identity, corpus_lock, digest, finished_shard, is_temp, now_utc
from .conditioning import check_model_fits, load_frames
from .engine import num_shards
from .manifest import write_manifest
from .model import ResolvedModel, resolve_model
from .previews import write_previews
from .run import empty_stats, run_pipeline

Log = Callable[[str], None]


# ---------------------------------------------------------------------------- the job
def _checked_request(n: Any, temperature: float | None, cfg: Config) -> tuple[int, float]:
    """(N, temperature) of a generate request, checked before any work (``temperature`` None:
    ``generate.temperature``).

    Raises:
        InputError: N not a positive integer, or a temperature below 0 or not finite.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise InputError("--n", f"the number of samples must be a positive integer, got {n!r}")
    temperature = float(temperature if temperature is not None else cfg.generate.temperature)
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError("--temperature", f"must be >= 0, got {temperature}")
    return int(n), temperature


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
    _checked_request(n, kwargs.get("temperature"), cfg)  # before the frames are prepared
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
    from ..fileio import removed_if_refused
    from ..layout import lock_name

    # a frame refused inside the pipeline (a 5-D file): the frames and their lock, made by this call
    # in a new --out, are removed (not --out's other contents: a plain `generate` may write there)
    with removed_if_refused(out, "frames_intake", lambda o: (o / FRAMES, o / lock_name(FRAMES, "frames"))):
        prepare_frames(frame_paths, out / FRAMES, cfg, resolved.grid, float(spacing),
                       log=kwargs.get("log", lambda _m: None))
    return generate_corpus(model, out / FRAMES, out, n, seed, cfg, **kwargs)


def _sweep_temps(out: Path, settle_s: float = 5.0) -> None:
    """Remove the temporary files of shards whose writers were stopped when the run failed (the
    dataset's actors are shut down asynchronously): sweep until two passes in a row find none, for
    at most ``settle_s``. A rerun sweeps again before it starts (we hold the corpus lock)."""
    deadline, quiet = time.monotonic() + settle_s, 0
    while quiet < 2 and time.monotonic() < deadline:
        found = [p for p in out.iterdir() if is_temp(p)]
        for p in found:
            p.unlink(missing_ok=True)
        quiet = 0 if found else quiet + 1
        time.sleep(0.25)


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
    n, temperature = _checked_request(n, temperature, cfg)
    seed = int(seed if seed is not None else (g.seed if g.seed is not None else cfg.seed))
    out = Path(out_dir).expanduser().resolve()
    resolved = resolve_model(model, cfg)
    frames = load_frames(prepared_dir)
    check_model_fits(resolved, frames, Path(prepared_dir))
    identity = corpus_identity(resolved, frames, seed, temperature, cfg)
    ident_sha = digest(identity)
    plan = check_out(out, identity, n, g.shard_size)

    with corpus_lock(out):
        for p in out.iterdir():
            if is_temp(p):  # left by a crashed run (we hold the lock: nobody else writes here)
                p.unlink(missing_ok=True)
        if plan is None:
            from ..fileio import write_json

            plan = {"identity": identity, "identity_sha256": ident_sha, "model_uri": resolved.uri,
                    "prepared": frames["prepared"], "created": now_utc()}
            write_json(out / PLAN, plan)
        shards = num_shards(n, g.shard_size)
        done = {k: r for k in range(shards)
                if (r := finished_shard(out, k, n, g.shard_size, ident_sha, g.verify)) is not None}
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
            try:
                stats = run_pipeline(todo, out, n, resolved, frames, identity, ident_sha, seed, temperature, plan,
                                      cfg, log, _fail_at_shard, _trace_memory) if todo else empty_stats()
            except BaseException:  # another actor may have been stopped mid-shard: leave nothing half-written
                _sweep_temps(out)
                raise
            try:
                manifest = write_manifest(out, n, plan, resolved, frames, identity, ident_sha, seed, temperature,
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
