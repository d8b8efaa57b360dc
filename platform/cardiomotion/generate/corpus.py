"""Reading a generated corpus: random access to sample i and a streaming PyTorch dataset.

A corpus folder (docs/corpus.md) holds ``manifest.json`` (written last: its presence marks a
complete corpus) and tar shards ``shard-000000.tar`` … with, per sample i (key = i as 9
digits), the members ``<key>.es.npy`` (int16 HU, (I, J, K)), ``<key>.ed_syn.npy`` (int16 HU),
``<key>.flow.npy`` (float16 voxels, (3, I, J, K), pull convention) and ``<key>.json``
(metadata: scan, index, seeds, model URI and hash, the grid's affine).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import InputError
from .engine import FORMAT, sample_index, sample_key

from ..layout import MANIFEST, SAMPLE_ED_SYN, SAMPLE_ES, SAMPLE_FLOW, SAMPLE_MEMBERS, SAMPLE_META


def read_manifest(corpus_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete corpus.

    Raises:
        InputError: no manifest (not a corpus, or an unfinished one) or not a corpus manifest.
    """
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise InputError(path.parent, "not a complete corpus: no manifest.json (rerun `cardiomotion "
                                      "generate` with the same settings to finish it)")
    try:
        man = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"unreadable manifest ({exc})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise InputError(path, f"not a cardiomotion corpus manifest (format="
                               f"{man.get('format') if isinstance(man, dict) else None!r})")
    missing = [k for k in ("n", "shard_size", "shards") if k not in man]
    if missing:
        raise InputError(path, f"damaged manifest: no {', '.join(missing)} (rerun `cardiomotion generate` with the "
                               "same settings to write it again)")
    return man


#: what to do about a shard that is not what the manifest records
_REWRITE = "rerun `cardiomotion generate` with the same settings to write it again"


def check_shard_file(path: Path, record: dict[str, Any]) -> None:
    """Refuse a shard that is missing or whose size differs from its manifest ``record``
    (``bytes``): a copy cut off, or a file changed after the corpus was written. A stat, no read;
    :meth:`Corpus.verify` compares contents.

    Raises:
        InputError: naming the shard.
    """
    if not path.is_file():
        raise InputError(path, f"shard missing (the manifest lists it); {_REWRITE}")
    size = path.stat().st_size
    if size != int(record["bytes"]):
        raise InputError(path, f"shard is {size} bytes where the manifest records {record['bytes']} (cut off or "
                               f"changed after it was written); {_REWRITE}")


def decode_member(name: str, data: bytes) -> Any:
    if name.endswith(".npy"):
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    return json.loads(data)


def sample_dict(index: int, parts: dict[str, Any]) -> dict[str, Any]:
    meta = parts[SAMPLE_META]
    return {"index": index, "scan_id": meta["scan_id"], "es": parts[SAMPLE_ES], "ed_syn": parts[SAMPLE_ED_SYN],
            "flow": parts[SAMPLE_FLOW], "affine": np.asarray(meta["affine"], dtype=np.float64), "meta": meta}


class Corpus:
    """Random access to a complete corpus: ``len(c)``, ``c[i]`` → dict with ``es``, ``ed_syn``
    (int16 HU, (I, J, K)), ``flow`` (float16 voxels, (3, I, J, K)), ``affine`` (4×4 of the grid),
    ``scan_id``, ``index`` and ``meta`` (the sample's JSON).

    Each shard's member offsets are read from its tar headers on first use (cached for the
    ``cache_shards`` most recent shards); a sample then costs four seeks and reads.
    """

    def __init__(self, corpus_dir: str | Path, cache_shards: int = 64):
        self.dir = Path(corpus_dir).resolve()
        self.manifest = read_manifest(self.dir)
        self.n = int(self.manifest["n"])
        self.shard_size = int(self.manifest["shard_size"])
        self.shards = list(self.manifest["shards"])
        self._index: "OrderedDict[int, dict[str, tuple[int, int]]]" = OrderedDict()
        self._cache = cache_shards

    def __len__(self) -> int:
        return self.n

    def shard_path(self, k: int) -> Path:
        return self.dir / self.shards[k]["name"]

    def _offsets(self, k: int) -> dict[str, tuple[int, int]]:
        if k in self._index:
            self._index.move_to_end(k)
            return self._index[k]
        path = self.shard_path(k)
        try:
            with tarfile.open(path, mode="r:") as tar:
                offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        except (OSError, tarfile.TarError) as exc:
            raise InputError(path, f"unreadable shard ({exc.__class__.__name__}: {exc})") from None
        self._index[k] = offsets
        if len(self._index) > self._cache:
            self._index.popitem(last=False)
        return offsets

    def raw(self, index: int) -> dict[str, bytes]:
        """The stored bytes of sample ``index``'s members {"es.npy", "ed_syn.npy", "flow.npy", "json"}."""
        index = self._check(index)
        k = index // self.shard_size
        offsets = self._offsets(k)
        key = sample_key(index)
        out: dict[str, bytes] = {}
        with open(self.shard_path(k), "rb") as f:
            for member in SAMPLE_MEMBERS:
                name = f"{key}.{member}"
                if name not in offsets:
                    raise InputError(self.shard_path(k), f"shard lacks member {name}")
                off, size = offsets[name]
                f.seek(off)
                out[member] = f.read(size)
        return out

    def _check(self, index: int) -> int:
        return sample_index(index, self.n)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check(index)
        raw = self.raw(index)
        try:
            return sample_dict(index, {m: decode_member(m, b) for m, b in raw.items()})
        except (ValueError, KeyError, TypeError, EOFError) as exc:  # bytes that are not what the manifest promised
            raise InputError(self.shard_path(index // self.shard_size),
                             f"sample {index} is damaged ({exc.__class__.__name__}: {exc}); Corpus.verify() names "
                             "the shards whose bytes differ from the manifest") from None

    def verify(self) -> list[str]:
        """Names of shards whose size or sha256 differs from the manifest (empty: intact)."""
        bad = []
        for rec in self.shards:
            path = self.dir / rec["name"]
            if not path.is_file() or path.stat().st_size != rec["bytes"]:
                bad.append(rec["name"])
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != rec["sha256"]:
                bad.append(rec["name"])
        return bad

    def ray_dataset(self, *, shuffle_seed: int | None = None, override_num_blocks: int | None = None,
                    limit: int | None = None):
        """The corpus as a Ray Dataset, read by ``ray.data.read_webdataset`` (the format's own
        reader) over the manifest's shards, one row per sample:

        ``index`` (int64), ``scan_id`` (str), ``es`` and ``ed_syn`` ((I, J, K) int16 HU), ``flow``
        ((3, I, J, K) float16 voxels), ``affine`` ((4, 4) float64) — the arrays ``corpus[i]`` holds.

        ``shuffle_seed`` shuffles the shard order with a new seed at every execution (every epoch
        of a Ray Train loop that iterates its ``get_dataset_shard``), reproducibly from the seed;
        mix samples across shards with ``local_shuffle_buffer_size`` when iterating. Ray Train
        splits the dataset between DDP ranks (``DataConfig``). Members are decoded without pickle.
        ``scan_id`` is a string column, which ``iter_torch_batches`` cannot turn into a tensor:
        ``ds.drop_columns(["scan_id"])`` before it (``iter_batches`` keeps it as numpy).

        ``limit``: only samples 0 … limit − 1 (the corpus of that size with the same plan: sample
        i depends on i alone), reading only the shards that hold them.

        Raises:
            InputError: a shard it reads is missing or not the size the manifest records
                (:func:`check_shard_file`); a sample whose bytes do not decode, when it is read.
        """
        import ray.data
        from ray.data import FileShuffleConfig

        if limit is not None and not 0 < int(limit) <= self.n:
            raise ValueError(f"limit must be in 1 … {self.n}, got {limit}")
        count = len(self.shards) if limit is None else -(-int(limit) // self.shard_size)
        for k in range(count):  # a shard cut off would lose its samples without a word
            check_shard_file(self.shard_path(k), self.shards[k])
        paths = [str(self.shard_path(k)) for k in range(count)]
        shuffle = FileShuffleConfig(seed=int(shuffle_seed), reseed_after_execution=True) \
            if shuffle_seed is not None else None
        ds = ray.data.read_webdataset(paths, decoder=None, shuffle=shuffle, override_num_blocks=override_num_blocks)
        ds = ds.map_batches(_decode_rows, batch_format="numpy", batch_size=32)
        if limit is not None and int(limit) < count * self.shard_size:
            from ray.data.expressions import col

            ds = ds.filter(expr=col("index") < int(limit))
        return ds

    def torch_dataset(self, shuffle_buffer: int = 0, seed: int = 0, *, shuffle_shards: bool | None = None,
                      rank: int = 0, world_size: int = 1,
                      transform: Callable[[dict[str, Any]], Any] | None = None) -> "CorpusIterableDataset":
        """A streaming ``torch.utils.data.IterableDataset`` over the corpus (see the class)."""
        return CorpusIterableDataset(self.dir, [r["name"] for r in self.shards], shuffle_buffer, seed,
                                     shuffle_shards=shuffle_buffer > 0 if shuffle_shards is None else shuffle_shards,
                                     rank=rank, world_size=world_size, transform=transform)


def _decode_rows(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """A batch of undecoded ``read_webdataset`` rows (member bytes) → the columns of
    :meth:`Corpus.ray_dataset`, stacked: ``.npy`` members without pickle (:func:`decode_member`),
    of the JSON only what a row holds (scan id, the grid's affine). Decoding a whole batch in one
    call instead of in the reader's per-row hook gave 2.0–2.6× the rows/s (32³, CPU; README →
    Generation)."""
    try:
        metas = [decode_member(SAMPLE_META, bytes(b)) for b in batch[SAMPLE_META]]
        out = {"index": np.asarray([int(k) for k in batch["__key__"]], dtype=np.int64),
               "scan_id": np.asarray([str(m["scan_id"]) for m in metas])}
        for member, column in ((SAMPLE_ES, "es"), (SAMPLE_ED_SYN, "ed_syn"), (SAMPLE_FLOW, "flow")):
            out[column] = np.stack([decode_member(member, bytes(b)) for b in batch[member]])
        out["affine"] = np.stack([np.asarray(m["affine"], dtype=np.float64) for m in metas])
    except (ValueError, KeyError, TypeError, EOFError) as exc:  # bytes that are not what the manifest promised
        keys = list(batch.get("__key__", []))
        raise InputError(f"samples {keys[0]}-{keys[-1]}" if keys else None,
                         f"damaged ({exc.__class__.__name__}: {exc}); Corpus.verify() names the shards whose "
                         "bytes differ from the manifest") from None
    return out  # the column order of the virtual corpus (generate.virtual.COLUMNS)


def iter_shard(path: str | Path, record: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Stream the samples of one shard in order (sequential read, one pass).

    With the shard's manifest ``record`` (``first``, ``count``, ``bytes``), the shard must be that
    size and hold exactly samples first … first + count − 1, each with all its members.

    Raises:
        InputError: naming the shard — unreadable or damaged bytes, a sample lacking a member, or
            (with ``record``) the wrong size, a sample out of place or fewer samples than recorded.
    """
    path = Path(path)
    if record is not None:
        check_shard_file(path, record)
    first = None if record is None else int(record["first"])
    yielded = 0

    def whole(key: str, parts: dict[str, Any]) -> dict[str, Any]:
        missing = [m for m in SAMPLE_MEMBERS if m not in parts]
        if missing:
            raise InputError(path, f"sample {key} lacks {', '.join(missing)}; {_REWRITE}")
        if first is not None and int(key) != first + yielded:
            raise InputError(path, f"holds sample {int(key)} where the manifest puts sample {first + yielded}; "
                                   f"{_REWRITE}")
        return sample_dict(int(key), parts)

    parts: dict[str, Any] = {}
    key = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for m in tar:
                k, _, member = m.name.partition(".")
                if key is not None and k != key:
                    sample = whole(key, parts)
                    yield sample
                    yielded += 1
                    parts = {}
                key = k
                f = tar.extractfile(m)
                parts[member] = decode_member(member, f.read() if f else b"")
    except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
        raise InputError(path, f"unreadable shard ({exc.__class__.__name__}: {exc}); {_REWRITE}") from None
    if key is not None:
        yield whole(key, parts)
        yielded += 1
    if record is not None and yielded != int(record["count"]):
        raise InputError(path, f"holds {yielded} samples where the manifest records {record['count']}; {_REWRITE}")


try:
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover - torch is a dependency
    _IterableDataset = object  # type: ignore[assignment,misc]


class CorpusIterableDataset(_IterableDataset):  # type: ignore[misc,valid-type]
    """Streams a corpus shard by shard: sequential tar reads, no index needed.

    Sharding: shards are split between DDP ranks (``rank``/``world_size``) and then between
    the DataLoader workers of each rank (``torch.utils.data.get_worker_info``): shard s goes to
    stream ``s % (world_size · workers)``, so every sample is read exactly once per epoch (use at
    least as many shards as streams). Shuffling: the shard order is permuted per epoch and a
    shuffle buffer of ``shuffle_buffer`` samples mixes samples across shards; everything is
    seeded by (seed, epoch, stream), so an epoch is reproducible. Call :meth:`set_epoch` each epoch.

    Yields dicts of torch tensors (``es``, ``ed_syn`` int16 (I, J, K); ``flow`` float16
    (3, I, J, K); ``affine`` float64 4×4) plus ``index`` and ``scan_id``, or ``transform(sample)``.
    Each shard is checked against the manifest as it is read (:func:`iter_shard`): a shard cut off
    is an :class:`~cardiomotion.errors.InputError` naming it, never a shorter epoch.
    """

    def __init__(self, corpus_dir: str | Path, shard_names: list[str], shuffle_buffer: int = 0, seed: int = 0,
                 *, shuffle_shards: bool = False, rank: int = 0, world_size: int = 1,
                 transform: Callable[[dict[str, Any]], Any] | None = None):
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dir = Path(corpus_dir)
        self.shard_names = list(shard_names)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.shuffle_shards = bool(shuffle_shards)
        self.rank, self.world_size = int(rank), int(world_size)
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _streams(self) -> tuple[int, int]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _my_shards(self) -> list[str]:
        stream, streams = self._streams()
        order = list(range(len(self.shard_names)))
        if self.shuffle_shards:
            order = list(np.random.default_rng([self.seed, self.epoch]).permutation(len(order)))
        return [self.shard_names[s] for s in order[stream::streams]]

    def _to_torch(self, s: dict[str, Any]) -> Any:
        import torch

        out = {"index": s["index"], "scan_id": s["scan_id"], "es": torch.from_numpy(s["es"]),
               "ed_syn": torch.from_numpy(s["ed_syn"]), "flow": torch.from_numpy(s["flow"]),
               "affine": torch.from_numpy(s["affine"])}
        return self.transform(out) if self.transform else out

    def __iter__(self) -> Iterator[Any]:
        stream, _ = self._streams()
        rng = np.random.default_rng([self.seed, self.epoch, stream, 1])
        buf: list[dict[str, Any]] = []
        records = {r["name"]: r for r in read_manifest(self.dir)["shards"]}
        for name in self._my_shards():
            for sample in iter_shard(self.dir / name, records.get(name)):
                if self.shuffle_buffer <= 1:
                    yield self._to_torch(sample)
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(sample)
                    continue
                j = int(rng.integers(len(buf)))
                out, buf[j] = buf[j], sample
                yield self._to_torch(out)
        rng.shuffle(buf)  # type: ignore[arg-type]
        for sample in buf:
            yield self._to_torch(sample)


def open_corpus(corpus_dir: str | Path) -> Corpus:
    """Open a complete corpus (``generate_corpus``'s output) for random access and streaming.

    Raises:
        InputError: the folder holds no (complete) corpus.
    """
    return Corpus(corpus_dir)
