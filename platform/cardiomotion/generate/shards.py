"""Writing a corpus shard: a generation actor (:class:`ShardWorker`, a Ray Data UDF) decodes the
shard's blocks with a :class:`~cardiomotion.generate.engine.SampleEngine` and streams them into a
tar under a temporary name, fsynced and renamed when complete, then a small sidecar record
(docs/corpus.md). What every actor is built with crosses as a frozen :class:`ShardJob`."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..layout import shard_name, sidecar_name
from .engine import SampleEngine, SampleSpec, blocks, shard_range
from .memory import current_rss_mb, release_free_memory


@dataclass(frozen=True)
class ShardJob:
    """What every :class:`ShardWorker` actor of a generate run is built with (object-store refs
    of the model blobs and the frames, the sample spec, the layout, the device settings)."""

    blobs_ref: Any
    frames_ref: Any
    spec: SampleSpec
    out: str
    n: int
    shard_size: int
    batch_size: int
    identity: str  # sha256 of the corpus identity (written into every sidecar)
    use_gpu: bool
    precision: str
    channels_last: bool
    cpus_per_actor: float
    fail_at_shard: Any = None  # test hook: shard index, or (index, "enospc")
    trace_memory: bool = False


class _HashingFile:
    """File wrapper for tarfile: hashes and counts what is written."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.f.write(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n


def _add(tar: tarfile.TarFile, members: list[tuple[str, bytes]]) -> None:
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # deterministic bytes: a regenerated shard has the same sha256
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: Path, k: int, n: int, shard_size: int, batch_size: int, engine: SampleEngine,
                identity: str, device_label: str, pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    """Write shard k (tar under a temporary name, fsync, rename), then its sidecar record.

    Decoding block j+1 overlaps writing block j (one writer thread, at most two blocks in
    flight), so memory is bounded by a few blocks whatever the shard or corpus size. Pass a
    long-lived single-thread ``pool`` when writing many shards: a fresh thread per shard gets a
    fresh malloc arena, and in a Ray worker those arenas pile up (RSS creeps by about a shard's
    bytes per shard); one persistent writer thread keeps RSS flat.
    """
    from ..fileio import atomic_path, write_json

    if pool is None:
        with ThreadPoolExecutor(1, "shard-writer") as own:
            return write_shard(out_dir, k, n, shard_size, batch_size, engine, identity, device_label, own)

    first, count = shard_range(k, n, shard_size)
    t0 = time.perf_counter()
    decode_s = 0.0
    rss = current_rss_mb()
    scan_counts: dict[str, int] = {}
    path = Path(out_dir) / shard_name(k)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        hf = _HashingFile(f)
        tar = tarfile.open(fileobj=hf, mode="w", format=tarfile.USTAR_FORMAT)
        pending: list[Future] = []
        try:
            for start, stop in blocks(first, count, batch_size):
                idx = list(range(start, stop))
                t = time.perf_counter()
                block = engine.decode_block(idx)
                decode_s += time.perf_counter() - t
                rss = max(rss, current_rss_mb())
                for s in block["scan"]:
                    sid = engine.scan_ids[int(s)]
                    scan_counts[sid] = scan_counts.get(sid, 0) + 1
                if pending:  # block j-1 was written while block j was decoded
                    pending.pop().result()
                pending.append(pool.submit(lambda b=block, i=idx: _add(tar, engine.members(b, i))))
            while pending:
                pending.pop().result()
        finally:
            for fut in pending:  # on error: never leave a write running on a file being removed
                fut.exception()
        tar.close()
        f.flush()
        os.fsync(f.fileno())
        size, sha = hf.n, hf.sha.hexdigest()
    record = {"index": k, "name": path.name, "first": first, "count": count, "bytes": size, "sha256": sha,
              "scan_counts": scan_counts, "device": device_label, "identity": identity}
    write_json(Path(out_dir) / sidecar_name(k), record)
    seconds = time.perf_counter() - t0
    release_free_memory()
    return {**record, "seconds": seconds, "decode_seconds": decode_s, "rss_mb": rss,
            "retained_rss_mb": current_rss_mb()}


class ShardWorker:
    """Ray Data actor UDF: rows {"shard": k} → writes shard k; returns small per-shard records.

    The constructor loads the model, the pyramid and the ES frames once (from the object store,
    so no node needs the driver's files) and computes the frozen features of every scan.
    """

    def __init__(self, job: ShardJob):
        import ray

        blobs = ray.get(job.blobs_ref)
        frames = ray.get(job.frames_ref)
        use_gpu = job.use_gpu and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, int(job.cpus_per_actor)))
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.device_label = torch.cuda.get_device_name(0) if use_gpu else "cpu"
        self.job = job
        self.engine = SampleEngine(blobs, frames, job.spec, device, job.precision, job.channels_last)
        self.pool = ThreadPoolExecutor(1, "shard-writer")  # one writer thread for the actor's life
        self.trace = bool(job.trace_memory)
        if self.trace:  # Python + numpy heap of the actor (tests: exact, unlike RSS)
            import tracemalloc

            tracemalloc.start()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import traceback

        job = self.job
        rows: list[dict[str, Any]] = []
        for k in batch["shard"]:
            k = int(k)
            try:
                fail = job.fail_at_shard  # test hook: shard index, or (index, "enospc")
                at, kind = (fail, "error") if not isinstance(fail, (tuple, list)) else fail
                if at is not None and k == at:
                    if kind == "enospc":
                        import errno
                        import os

                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(job.out) / shard_name(k)))
                    raise RuntimeError(f"injected failure at shard {k} (test hook)")
                if self.trace:
                    import tracemalloc

                    tracemalloc.reset_peak()
                rec = {**write_shard(Path(job.out), k, job.n, job.shard_size, job.batch_size, self.engine,
                                     job.identity, self.device_label, self.pool), "error": ""}
                traced = tracemalloc.get_traced_memory() if self.trace else (0, 0)
                rec["traced_mb"], rec["traced_peak_mb"] = traced[0] / 2**20, traced[1] / 2**20
            except OSError as exc:  # the file system refused: one line for the user, no traceback
                where = f" {exc.filename}" if exc.filename else ""
                rec = {"index": k, "count": 0, "bytes": 0, "seconds": 0.0, "decode_seconds": 0.0, "rss_mb": 0.0,
                       "retained_rss_mb": 0.0, "traced_mb": 0.0, "traced_peak_mb": 0.0,
                       "error": f"OSERROR shard {k}: cannot write{where} ({exc.strerror or exc})"}
            except Exception as exc:  # reported by the driver, which stops the job (finished shards stay)
                rec = {"index": k, "count": 0, "bytes": 0, "seconds": 0.0, "decode_seconds": 0.0, "rss_mb": 0.0,
                       "retained_rss_mb": 0.0, "traced_mb": 0.0, "traced_peak_mb": 0.0,
                       "error": f"shard {k}: {exc.__class__.__name__}: {exc}\n{traceback.format_exc()}"}
            rows.append(rec)
        keys = ("index", "count", "bytes", "seconds", "decode_seconds", "rss_mb", "retained_rss_mb", "traced_mb",
                "traced_peak_mb", "error")
        return {key: np.asarray([r[key] for r in rows]) for key in keys}
