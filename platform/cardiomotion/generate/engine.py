"""What sample i of a corpus is, and how it is decoded (the shard writer is :mod:`.shards`).

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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..layout import SAMPLE_ED_SYN, SAMPLE_ES, SAMPLE_FLOW, SAMPLE_META
from ..transfer import to_device, to_host


FORMAT = "cardiomotion-corpus"
FORMAT_VERSION = 1
KEY_DIGITS = 9  # member names "000000012.es.npy": up to 10^9 samples
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


def sample_index(index: Any, n: int) -> int:
    """``index`` as a sample of a corpus of ``n``: an integer (numpy's too; a float such as 3.7 is
    not one), negative from the end as in a list.

    Raises:
        TypeError: not an integer.
        IndexError: outside -n … n - 1.
    """
    import operator

    i = operator.index(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample {index} out of range: the corpus has {n} samples")
    return i


def sample_key(index: int) -> str:
    return f"{int(index):0{KEY_DIGITS}d}"




def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------- decode + warp
@dataclass(frozen=True)
class SampleSpec:
    """What fixes sample i besides the model and the frames (crosses into every actor)."""

    seed: int
    temperature: float
    window: tuple[float, float]  # HU window of the model
    flow_dtype: str  # "float16" | "float32"
    model_uri: str
    model_sha256: str

    def __post_init__(self) -> None:
        if self.flow_dtype not in ("float16", "float32"):
            raise ValueError(f"flow_dtype must be float16 or float32, got {self.flow_dtype!r}")
        object.__setattr__(self, "window", (float(self.window[0]), float(self.window[1])))

    @classmethod
    def of(cls, spec: "SampleSpec | Mapping[str, Any]") -> "SampleSpec":
        """A spec, or one built from a mapping with exactly these keys (a misspelled key fails here)."""
        return spec if isinstance(spec, SampleSpec) else cls(**spec)


@contextmanager
def deterministic_cudnn(active: bool = True):
    """cuDNN's deterministic algorithms, without autotuning, inside the block only (``active``);
    the process's own ``deterministic`` and ``benchmark`` flags are restored afterwards, so a
    training step in the same process keeps the recipe's autotuning."""
    if not active:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


class SampleEngine:
    """Decodes and warps blocks of samples for one corpus plan; holds the model, the pyramid,
    the ES frames and their (frozen) pyramid features on one device.

    Args:
        blobs: checkpoint bytes {"cvae", "pyramid"} (see :meth:`ResolvedModel.blobs`).
        frames: {"scan_ids": [...], "es": (n_scans, I, J, K) int16 HU, "affines": (n_scans, 4, 4)}.
        spec: :class:`SampleSpec` (or a mapping with its keys).
        device: torch device; precision "fp32" | "bf16" | "fp16" (autocast, CUDA only).
    """

    def __init__(self, blobs: dict[str, bytes], frames: dict[str, Any], spec: SampleSpec | Mapping[str, Any],
                 device: Any = "cpu", precision: str = "fp32", channels_last: bool = False):
        from .model import load_networks
        from ..data.intensity import hu_to_unit

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if cuda else None
        self.fmt = torch.channels_last_3d if (cuda and channels_last) else torch.contiguous_format
        # deterministic cuDNN inside the engine's own calls (the corpus's bytes); False only to time
        # what determinism costs (bench/gpu_profile.py)
        self.deterministic = True
        self.spec = spec = SampleSpec.of(spec)
        self.seed = int(spec.seed)
        self.temperature = float(spec.temperature)
        self.flow_dtype = {"float16": torch.float16, "float32": torch.float32}[spec.flow_dtype]
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
        es_unit = hu_to_unit(self.es_hu, spec.window).contiguous(memory_format=self.fmt)
        with torch.no_grad(), self._deterministic(), self._autocast():
            per_scan = [self.pyramid(es_unit[s:s + 1]) for s in range(len(self.scan_ids))]
        self.es_unit = es_unit
        self.feats = [torch.cat([f[lvl] for f in per_scan]) for lvl in range(len(per_scan[0]))]
        self.spacing = [float(np.sqrt((a[:3, :3] ** 2).sum(0))[0]) for a in self.affines]

    def _deterministic(self):
        """Same bytes for the same block on every run: deterministic cuDNN while the engine computes."""
        return deterministic_cudnn(self.device.type == "cuda" and self.deterministic)

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """z (B, C, i, j, k) float32 on the CPU: z_i = T · N(0, I) from sample i's own generator."""
        zs = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(sample_seed(self.seed, i)),
                          dtype=torch.float32) for i in indices]
        return self.temperature * torch.stack(zs)

    @torch.no_grad()
    def decode_on_device(self, indices: Sequence[int]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The device's part of a decode block: (scan positions (B,), ed_syn (B, I, J, K) int16 HU,
        flow (B, 3, I, J, K) ``flow_dtype`` voxels, C order), both tensors on the engine's device."""
        from ..flow.warp import warp

        scans = scan_indices(self.seed, len(self.scan_ids), indices)
        sel = to_device(torch.from_numpy(scans), self.device)
        z = to_device(self.latents(indices), self.device)
        es_unit = self.es_unit.index_select(0, sel)
        feats = [f.index_select(0, sel) for f in self.feats]
        with self._deterministic():
            with self._autocast():
                flow = self.model.decode(z.contiguous(memory_format=self.fmt), es_unit, feats)
            flow_q = flow.float().to(self.flow_dtype)
            ed = warp(self.es_hu.index_select(0, sel), flow_q.float())
        ed = ed.round_().clamp_(-32768, 32767).to(torch.int16)
        return scans, ed[:, 0].contiguous(), flow_q.contiguous()

    def decode_block(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Samples ``indices`` (one decode block): es, ed_syn (B, I, J, K) int16 HU, flow
        (B, 3, I, J, K) ``flow_dtype`` voxels, scan (B,) positions in the scan list."""
        scans, ed, flow = self.decode_on_device(indices)
        ed_np, flow_np = to_host(ed, flow)  # pinned buffers on CUDA (27x faster than pageable on an H200)
        return {"es": self.es_i16[scans], "ed_syn": ed_np, "flow": flow_np, "scan": scans}

    @torch.no_grad()
    def velocities(self, indices: Sequence[int]) -> np.ndarray:
        """The stationary velocities v of samples ``indices`` of a velocity model ((B, 3, I, J, K)
        float32 voxels; the stored flow is exp(v)): the sample's path is exp(t·v), t ∈ [0, 1]."""
        from ..models.cvae import OutputKind

        if self.model.output is not OutputKind.VELOCITY:
            raise ValueError("the model predicts displacements, not velocities")
        scans = scan_indices(self.seed, len(self.scan_ids), indices)
        sel = to_device(torch.from_numpy(scans), self.device)
        z = to_device(self.latents(indices), self.device)
        feats = [f.index_select(0, sel) for f in self.feats]
        with self._deterministic(), self._autocast():
            v = self.model.decode(z.contiguous(memory_format=self.fmt), self.es_unit.index_select(0, sel), feats,
                                  integrate=False)
        return to_host(v.float())[0]

    def meta(self, index: int, scan: int) -> dict[str, Any]:
        return {
            "index": int(index), "scan_id": self.scan_ids[scan], "seed": self.seed,
            "sample_seed": sample_seed(self.seed, index), "temperature": self.temperature,
            "model_uri": self.spec.model_uri, "model_sha256": self.spec.model_sha256,
            "affine": self.affines[scan].tolist(), "spacing_mm": self.spacing[scan],
            "grid": list(self.grid), "flow_units": "voxels", "hu_dtype": "int16",
            "flow_dtype": self.spec.flow_dtype, "convention": CONVENTION, "format_version": FORMAT_VERSION,
        }

    def members(self, block: dict[str, np.ndarray], indices: Sequence[int]) -> list[tuple[str, bytes]]:
        """Tar members of a decoded block, in sample order: <key>.es.npy, .ed_syn.npy, .flow.npy, .json."""
        out: list[tuple[str, bytes]] = []
        for j, i in enumerate(indices):
            key = sample_key(i)
            meta = json.dumps(self.meta(i, int(block["scan"][j])), sort_keys=True, separators=(",", ":"))
            out += [(f"{key}.{SAMPLE_ES}", npy_bytes(block["es"][j])),
                    (f"{key}.{SAMPLE_ED_SYN}", npy_bytes(block["ed_syn"][j])),
                    (f"{key}.{SAMPLE_FLOW}", npy_bytes(block["flow"][j])),
                    (f"{key}.{SAMPLE_META}", meta.encode())]
        return out
