"""What sample i of a corpus is, and how a shard of samples is made and written.

Sample i of a corpus with seed s (docs/corpus.md):

* scan: ``scan_indices(s, n_scans, [i])`` — round r = i // n_scans of the scans (sorted by id)
  is a permutation seeded by (s, r): every scan is used equally often, in a seeded order;
* latent: z = T · ε, ε ~ N(0, I) of the model's latent shape, drawn in float32 on the CPU from
  ``torch.Generator().manual_seed(sample_seed(s, i))`` — a hash of (s, i), so the draw does not
  depend on any other sample, on the device, or on the order work is done in;
* flow = decode(z, ES, pyramid(ES)); the stored flow is rounded to ``flow_dtype``; ED_syn =
  warp(ES, stored flow) in float32, rounded to int16 HU. The stored triple is therefore
  consistent: ED_syn == round(warp(ES, flow)) up to float32 arithmetic.

Decoding is batched, and batched convolutions are not bitwise batch-invariant (not on CPU
either), so the batches are fixed blocks: shard k holds samples [k·S, min((k+1)·S, N)), decoded
in blocks [k·S + j·B, …) of ``batch_size`` B. Regenerating sample i decodes its block again
(:func:`block_of`), which gives the same bytes on the same kind of device and precision.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..layout import shard_name, sidecar_name  # re-exported: the corpus layout's names

FORMAT = "cardiomotion-corpus"
FORMAT_VERSION = 1
KEY_DIGITS = 9  # member names "000000012.es.npy": up to 10^9 samples
MEMBERS = ("es.npy", "ed_syn.npy", "flow.npy", "json")  # per sample, in this order
CONVENTION = "pull field on the ED grid, voxels, channel c along array axis c: ED_syn(x) = ES(x + u(x))"
_SCAN_SALT = 0x5CA75CA7


# ---------------------------------------------------------------------------- sample identity
def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index``'s latent: blake2b of (corpus seed, index)."""
    digest = hashlib.blake2b(f"cardiomotion-sample/{int(seed)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def scan_indices(seed: int, n_scans: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Scan (position in the sorted scan list) of each sample: round r = i // n_scans is a
    permutation of the scans seeded by (seed, r); sample i takes entry i % n_scans of it."""
    idx = np.asarray(indices, dtype=np.int64)
    out = np.empty(idx.shape, dtype=np.int64)
    rounds = idx // n_scans
    for r in np.unique(rounds):
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, _SCAN_SALT, int(r)])
        perm = np.random.default_rng(ss).permutation(n_scans)
        sel = rounds == r
        out[sel] = perm[idx[sel] % n_scans]
    return out


def shard_range(k: int, n: int, shard_size: int) -> tuple[int, int]:
    """(first sample, count) of shard k of an N-sample corpus."""
    first = k * shard_size
    return first, max(0, min(shard_size, n - first))


def num_shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def blocks(first: int, count: int, batch_size: int) -> list[tuple[int, int]]:
    """The decode blocks [start, stop) of a shard starting at ``first`` with ``count`` samples."""
    return [(s, min(s + batch_size, first + count)) for s in range(first, first + count, batch_size)]


def block_of(index: int, n: int, shard_size: int, batch_size: int) -> tuple[int, int]:
    """The decode block [start, stop) that sample ``index`` was generated in."""
    first, count = shard_range(index // shard_size, n, shard_size)
    start = first + ((index - first) // batch_size) * batch_size
    return start, min(start + batch_size, first + count)


def sample_key(index: int) -> str:
    return f"{int(index):0{KEY_DIGITS}d}"




def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Freed sample buffers otherwise stay in the allocator's arenas (one per thread: the decode
    loop and the writer), so a long-running actor's RSS would creep with fragmentation even
    though nothing is kept; trimming after each shard keeps RSS equal to what is live.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_mb() -> float:
    """Private (anonymous) resident memory of this process now, MiB: resident minus shared pages
    (Linux /proc; elsewhere the peak RSS). Shared pages — libraries, and in a Ray worker the
    memory-mapped object store — are left out: they are not this process' working set."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        pages = int(fields[1]) - int(fields[2])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- decode + warp
class SampleEngine:
    """Decodes and warps blocks of samples for one corpus plan; holds the model, the pyramid,
    the ES frames and their (frozen) pyramid features on one device.

    Args:
        blobs: checkpoint bytes {"cvae", "pyramid"} (see :meth:`ResolvedModel.blobs`).
        frames: {"scan_ids": [...], "es": (n_scans, I, J, K) int16 HU, "affines": (n_scans, 4, 4)}.
        spec: {"seed", "temperature", "window", "flow_dtype", "model_uri", "model_sha256"}.
        device: torch device; precision "fp32" | "bf16" | "fp16" (autocast, CUDA only).
    """

    def __init__(self, blobs: dict[str, bytes], frames: dict[str, Any], spec: dict[str, Any],
                 device: Any = "cpu", precision: str = "fp32", channels_last: bool = False):
        from .model import load_networks
        from ..data.intensity import hu_to_unit

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if cuda else None
        self.fmt = torch.channels_last_3d if (cuda and channels_last) else torch.contiguous_format
        if cuda:  # same bytes for the same block on every run
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.spec = dict(spec)
        self.seed = int(spec["seed"])
        self.temperature = float(spec["temperature"])
        self.flow_dtype = {"float16": torch.float16, "float32": torch.float32}[spec["flow_dtype"]]
        self.scan_ids = [str(s) for s in frames["scan_ids"]]
        self.affines = np.asarray(frames["affines"], dtype=np.float64)
        es = np.asarray(frames["es"])
        if es.dtype != np.int16:
            raise ValueError(f"ES frames must be int16 HU, got {es.dtype}")
        self.model, self.pyramid = load_networks(blobs, self.device)
        self.model = self.model.to(memory_format=self.fmt)
        self.pyramid = self.pyramid.to(memory_format=self.fmt)
        self.grid = tuple(int(n) for n in es.shape[1:])
        self.latent_shape = self.model.latent_shape(self.grid)
        self.es_hu = torch.from_numpy(es.astype(np.float32))[:, None].to(self.device)  # (n, 1, I, J, K)
        self.es_i16 = es
        es_unit = hu_to_unit(self.es_hu, tuple(spec["window"])).contiguous(memory_format=self.fmt)
        with torch.no_grad(), self._autocast():
            per_scan = [self.pyramid(es_unit[s:s + 1]) for s in range(len(self.scan_ids))]
        self.es_unit = es_unit
        self.feats = [torch.cat([f[lvl] for f in per_scan]) for lvl in range(len(per_scan[0]))]
        self.spacing = [float(np.sqrt((a[:3, :3] ** 2).sum(0))[0]) for a in self.affines]

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """z (B, C, i, j, k) float32 on the CPU: z_i = T · N(0, I) from sample i's own generator."""
        zs = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(sample_seed(self.seed, i)),
                          dtype=torch.float32) for i in indices]
        return self.temperature * torch.stack(zs)

    @torch.no_grad()
    def decode_block(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Samples ``indices`` (one decode block): es, ed_syn (B, I, J, K) int16 HU, flow
        (B, 3, I, J, K) ``flow_dtype`` voxels, scan (B,) positions in the scan list."""
        from ..flow.warp import warp

        scans = scan_indices(self.seed, len(self.scan_ids), indices)
        sel = torch.from_numpy(scans).to(self.device)
        z = self.latents(indices).to(self.device)
        es_unit = self.es_unit.index_select(0, sel)
        feats = [f.index_select(0, sel) for f in self.feats]
        with self._autocast():
            flow = self.model.decode(z.contiguous(memory_format=self.fmt), es_unit, feats)
        flow_q = flow.float().to(self.flow_dtype)
        ed = warp(self.es_hu.index_select(0, sel), flow_q.float())
        ed = ed.round_().clamp_(-32768, 32767).to(torch.int16)
        return {"es": self.es_i16[scans], "ed_syn": ed[:, 0].cpu().numpy(),
                "flow": flow_q.contiguous().cpu().numpy(), "scan": scans}

    @torch.no_grad()
    def velocities(self, indices: Sequence[int]) -> np.ndarray:
        """The stationary velocities v of samples ``indices`` of a velocity model ((B, 3, I, J, K)
        float32 voxels; the stored flow is exp(v)): the sample's path is exp(t·v), t ∈ [0, 1]."""
        from ..models.cvae import OutputKind

        if self.model.output is not OutputKind.VELOCITY:
            raise ValueError("the model predicts displacements, not velocities")
        scans = scan_indices(self.seed, len(self.scan_ids), indices)
        sel = torch.from_numpy(scans).to(self.device)
        z = self.latents(indices).to(self.device)
        feats = [f.index_select(0, sel) for f in self.feats]
        with self._autocast():
            v = self.model.decode(z.contiguous(memory_format=self.fmt), self.es_unit.index_select(0, sel), feats,
                                  integrate=False)
        return v.float().contiguous().cpu().numpy()

    def meta(self, index: int, scan: int) -> dict[str, Any]:
        return {
            "index": int(index), "scan_id": self.scan_ids[scan], "seed": self.seed,
            "sample_seed": sample_seed(self.seed, index), "temperature": self.temperature,
            "model_uri": self.spec["model_uri"], "model_sha256": self.spec["model_sha256"],
            "affine": self.affines[scan].tolist(), "spacing_mm": self.spacing[scan],
            "grid": list(self.grid), "flow_units": "voxels", "hu_dtype": "int16",
            "flow_dtype": self.spec["flow_dtype"], "convention": CONVENTION, "format_version": FORMAT_VERSION,
        }

    def members(self, block: dict[str, np.ndarray], indices: Sequence[int]) -> list[tuple[str, bytes]]:
        """Tar members of a decoded block, in sample order: <key>.es.npy, .ed_syn.npy, .flow.npy, .json."""
        out: list[tuple[str, bytes]] = []
        for j, i in enumerate(indices):
            key = sample_key(i)
            meta = json.dumps(self.meta(i, int(block["scan"][j])), sort_keys=True, separators=(",", ":"))
            out += [(f"{key}.es.npy", npy_bytes(block["es"][j])),
                    (f"{key}.ed_syn.npy", npy_bytes(block["ed_syn"][j])),
                    (f"{key}.flow.npy", npy_bytes(block["flow"][j])),
                    (f"{key}.json", meta.encode())]
        return out


# ---------------------------------------------------------------------------- shard writer
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

    def __init__(self, payload: dict[str, Any]):
        import ray

        refs = payload["refs"]
        blobs = ray.get(refs["blobs"])
        frames = ray.get(refs["frames"])
        use_gpu = payload["use_gpu"] and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, int(payload.get("cpus_per_actor", 1))))
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.device_label = torch.cuda.get_device_name(0) if use_gpu else "cpu"
        self.p = payload
        self.engine = SampleEngine(blobs, frames, payload["spec"], device, payload["precision"],
                                   payload["channels_last"])
        self.pool = ThreadPoolExecutor(1, "shard-writer")  # one writer thread for the actor's life
        self.trace = bool(payload.get("trace_memory"))
        if self.trace:  # Python + numpy heap of the actor (tests: exact, unlike RSS)
            import tracemalloc

            tracemalloc.start()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import traceback

        p = self.p
        rows: list[dict[str, Any]] = []
        for k in batch["shard"]:
            k = int(k)
            try:
                fail = p.get("fail_at_shard")  # test hook: shard index, or (index, "enospc")
                at, kind = (fail, "error") if not isinstance(fail, (tuple, list)) else fail
                if at is not None and k == at:
                    if kind == "enospc":
                        import errno
                        import os

                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(p["out"]) / shard_name(k)))
                    raise RuntimeError(f"injected failure at shard {k} (test hook)")
                if self.trace:
                    import tracemalloc

                    tracemalloc.reset_peak()
                rec = {**write_shard(Path(p["out"]), k, p["n"], p["shard_size"], p["batch_size"], self.engine,
                                     p["identity"], self.device_label, self.pool), "error": ""}
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
