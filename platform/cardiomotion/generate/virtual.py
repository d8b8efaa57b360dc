"""A virtual corpus: the samples ``generate`` would write, decoded on the fly, never stored.

Materialising 10⁶ samples at the paper's grid is about 5.5 TB. Sample i is a pure function of
(model, corpus seed, i) (its latent from :func:`~cardiomotion.generate.engine.sample_seed`, its
scan from :func:`~cardiomotion.generate.engine.scan_indices`), decoded in the fixed block
:func:`~cardiomotion.generate.engine.block_of` of the corpus layout (``shard_size``,
``batch_size``). A :class:`VirtualCorpus` decodes exactly those blocks with the same
:class:`~cardiomotion.generate.engine.SampleEngine`, so on the same device kind and precision it
yields the very arrays (and so the bytes) a materialised corpus of the same plan holds
(tested against ``generate`` on the CPU).

``VirtualCorpus.ray_dataset()`` has the columns of :meth:`Corpus.ray_dataset` and decodes inside
the consuming job's Ray Data pipeline on an actor pool (GPU actors where there are GPUs): a
training job can read it through ``get_dataset_shard`` instead of a materialised corpus.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .engine import SampleEngine, SampleSpec, block_of, blocks, num_shards, sample_index, shard_range

COLUMNS = ("index", "scan_id", "es", "ed_syn", "flow", "affine")


@dataclass(frozen=True)
class VirtualPlan:
    """Everything that fixes the samples of a virtual corpus (and of the corpus ``generate`` would write).

    Attributes:
        n: samples; shard_size, batch_size: the corpus layout (decode blocks never cross a shard).
        seed, temperature: the corpus seed and prior temperature T (z ~ N(0, T²·I)).
        window: HU window of the model; flow_dtype: stored flow dtype ("float16" | "float32").
        model_uri, model_sha256: the model; precision, channels_last: the decoder's GPU settings.
    """

    n: int
    shard_size: int
    batch_size: int
    seed: int
    temperature: float
    window: tuple[float, float]
    flow_dtype: str
    model_uri: str
    model_sha256: str
    precision: str
    channels_last: bool

    def decode_blocks(self) -> list[tuple[int, int]]:
        """Every decode block [start, stop) of the corpus, in sample order."""
        out: list[tuple[int, int]] = []
        for k in range(num_shards(self.n, self.shard_size)):
            out += blocks(*shard_range(k, self.n, self.shard_size), self.batch_size)
        return out

    def engine_spec(self) -> SampleSpec:
        return SampleSpec(seed=self.seed, temperature=self.temperature, window=self.window,
                          flow_dtype=self.flow_dtype, model_uri=self.model_uri, model_sha256=self.model_sha256)


def _columns(engine: SampleEngine, start: int, stop: int) -> dict[str, np.ndarray]:
    idx = list(range(start, stop))
    block = engine.decode_block(idx)
    scans = [int(s) for s in block["scan"]]
    return {"index": np.asarray(idx, dtype=np.int64),
            "scan_id": np.asarray([engine.scan_ids[s] for s in scans], dtype=object),
            "es": np.asarray(block["es"]), "ed_syn": np.asarray(block["ed_syn"]), "flow": np.asarray(block["flow"]),
            "affine": np.stack([engine.affines[s] for s in scans]).astype(np.float64)}


class BlockDecoder:
    """Ray Data actor UDF: rows {"start", "stop"} (decode blocks) → one row per sample.

    Loads the model, the pyramid and the ES frames once from the object store; decodes on the
    actor's GPU if it has one (``precision``/``channels_last`` of the plan), else on the CPU
    with ``threads`` torch threads (as a ``generate`` CPU actor does, so the arrays match).
    """

    def __init__(self, blobs_ref, frames_ref, plan: VirtualPlan, threads: int = 1):
        import ray

        use_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        if not use_gpu:
            torch.set_num_threads(max(1, int(threads)))
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.engine = SampleEngine(ray.get(blobs_ref), ray.get(frames_ref), plan.engine_spec(), device,
                                   plan.precision, plan.channels_last)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [_columns(self.engine, int(a), int(b)) for a, b in zip(batch["start"], batch["stop"])]
        return {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}


class VirtualCorpus:
    """The N samples ``generate`` would write for (model, prepared ES frames, seed, temperature,
    ``cfg.generate``'s layout and precision), decoded when read.

    ``len(v)``; ``v[i]`` (decodes i's block on the CPU; the dict ``Corpus[i]`` gives, ``meta`` too); and
    :meth:`ray_dataset`. Raises InputError as ``generate`` does for a model that does not fit the
    frames.
    """

    def __init__(self, model: str | Path, prepared_dir: str | Path, n: int, seed: int | None = None,
                 cfg=None, *, temperature: float | None = None):
        from ..config import load_config
        from .conditioning import check_model_fits, load_frames
        from .model import resolve_model

        cfg = cfg or load_config(None)
        g = cfg.generate
        if isinstance(n, bool) or int(n) != n or n <= 0:
            raise InputError("--n", f"the number of samples must be a positive integer, got {n!r}")
        self.cfg = cfg
        self.resolved = resolve_model(model, cfg)
        self.frames = load_frames(prepared_dir)
        check_model_fits(self.resolved, self.frames, Path(prepared_dir))
        self.plan = VirtualPlan(
            n=int(n), shard_size=int(g.shard_size), batch_size=int(g.batch_size),
            seed=int(seed if seed is not None else (g.seed if g.seed is not None else cfg.seed)),
            temperature=float(temperature if temperature is not None else g.temperature),
            window=tuple(float(w) for w in self.resolved.window), flow_dtype=g.flow_dtype,
            model_uri=str(self.resolved.uri), model_sha256=self.resolved.cvae_sha256, precision=g.precision,
            channels_last=bool(g.channels_last))
        self._engine: SampleEngine | None = None

    def __len__(self) -> int:
        return self.plan.n

    def _cpu_engine(self) -> SampleEngine:
        if self._engine is None:
            frames = {k: self.frames[k] for k in ("scan_ids", "es", "affines")}
            self._engine = SampleEngine(self.resolved.blobs(), frames, self.plan.engine_spec(), "cpu",
                                        self.plan.precision, self.plan.channels_last)
        return self._engine

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` (negative from the end) as ``Corpus[i]`` gives it: the arrays, ``index``,
        ``scan_id``, and ``meta``, the JSON the corpus would store beside them."""
        import json

        index = sample_index(index, self.plan.n)
        start, stop = block_of(index, self.plan.n, self.plan.shard_size, self.plan.batch_size)
        engine = self._cpu_engine()
        cols = _columns(engine, start, stop)
        j = index - start
        out = {c: (cols[c][j] if c != "index" else int(cols[c][j])) for c in COLUMNS}
        out["meta"] = json.loads(json.dumps(engine.meta(index, self.frames["scan_ids"].index(str(out["scan_id"]))),
                                            sort_keys=True))
        return out

    def ray_dataset(self, *, actors: int | None = None, shuffle_seed: int | None = None):
        """The samples as a Ray Dataset with the columns of :meth:`Corpus.ray_dataset`, decoded by
        an actor pool of ``actors`` (default ``generate.actors``, else one per GPU share or per
        ``generate.resources.cpus`` CPUs). ``shuffle_seed`` permutes the decode blocks (whole
        blocks: a sample's bytes depend on its block). As with :meth:`Corpus.ray_dataset`, drop the
        string column ``scan_id`` before ``iter_torch_batches``."""
        from ..raycluster import actor_pool, init_ray

        g = self.cfg.generate
        ray = init_ray(self.cfg.ray)
        use_gpu, size = actor_pool(g.resources, actors or g.actors, ray, "generate.resources.use_gpu")
        items = [{"start": a, "stop": b} for a, b in self.plan.decode_blocks()]
        if shuffle_seed is not None:
            order = np.random.default_rng(int(shuffle_seed)).permutation(len(items))
            items = [items[i] for i in order]
        size = max(1, min(int(size), len(items)))
        frames = {k: self.frames[k] for k in ("scan_ids", "es", "affines")}
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * size))
        return ds.map_batches(BlockDecoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                              fn_constructor_kwargs={"blobs_ref": ray.put(self.resolved.blobs()),
                                                     "frames_ref": ray.put(frames), "plan": self.plan,
                                                     "threads": int(g.resources.cpus)},
                              num_cpus=g.resources.cpus, num_gpus=g.resources.gpus if use_gpu else 0)


def open_virtual_corpus(model: str | Path, prepared_dir: str | Path, n: int, seed: int | None = None, cfg=None,
                        *, temperature: float | None = None) -> VirtualCorpus:
    """The corpus ``generate`` would write with these arguments, without writing it."""
    return VirtualCorpus(model, prepared_dir, n, seed, cfg, temperature=temperature)
