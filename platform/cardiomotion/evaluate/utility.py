"""Downstream utility of a corpus: does it train a better motion estimator than the alternatives?

The protocol of ``cardiomotion utility`` (docs/design.md, "Downstream utility"): for each
leave-one-out fold the *same* supervised estimator — the project's 3-D PWC-Net with the
``annotate.pwc`` architecture — is trained for the same number of Adam steps on each data arm
(:class:`Arm`) and scored on the held-out scan's real rendered (ES, ED) pair against its exact
phantom truth (:func:`score_estimate`). This module holds the pieces that need no Ray: the data
sources of the arms, SynthMorph-style random fields, the training step and the scores (the
intervals over scans: :mod:`cardiomotion.evaluate.intervals`); :mod:`cardiomotion.evaluate.utility_job` runs them on Ray
(one estimator: :mod:`cardiomotion.evaluate.utility_estimator`).

Conventions (docs/design.md): a flow is the pull field on the ED grid in voxels, (B, 3, I, J, K),
``ED(x) ≈ ES(x + u(x))``; the estimator is called ``model(fixed=ED, moving=ES)``; images enter it
in [0, 1] (``intensity.window``). Errors are reported in mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import UtilityArm, UtilityCorpus

__all__ = ["Arm", "CorpusMode", "EstimatorSettings", "Batch", "PairSource", "RandomFieldSource", "CorpusSource",
           "TransportSource",
           "random_smooth_flows", "random_smooth_flow", "warped_ed", "flow_rms", "supervised_flow_loss", "train_estimator", "score_estimate",
           "EstimateScore"]


Arm = UtilityArm  # the arms and corpus modes are the config's choices (one definition)
CorpusMode = UtilityCorpus


@dataclass(frozen=True)
class EstimatorSettings:
    """One step budget and one architecture for every arm (copied from ``utility`` and ``annotate``)."""

    steps: int
    batch_size: int
    lr: float
    level_weights: tuple[float, ...]  # per decoded level coarse → fine, then the full-resolution flow
    smooth_weight: float  # unsupervised arm only (annotate.smooth_weight)
    ssim_alpha: float  # unsupervised arm only (annotate.ssim_alpha)
    grad_clip: float | None = None  # gradient-norm clipping of every step; None = off
    lr_schedule: str = "constant"  # constant, or cosine over the steps (annotate's epoch_lr with step for epoch)


@dataclass(frozen=True)
class Batch:
    """One training batch: ES (moving) and ED (fixed) in [0, 1], (B, 1, I, J, K) float32; the
    target flow (B, 3, I, J, K) voxels, or None for the unsupervised arm."""

    es: torch.Tensor
    ed: torch.Tensor
    flow: torch.Tensor | None


class Source(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Batch: ...


def _unit(hu: torch.Tensor, window: Sequence[float]) -> torch.Tensor:
    from ..data.intensity import hu_to_unit

    return hu_to_unit(hu.float(), tuple(window))


class PairSource:
    """Real training pairs: ES and ED (n, I, J, K) float HU; ``flows`` (n, 3, I, J, K) voxels
    (annotated arm) or None (unsupervised arm)."""

    def __init__(self, es_hu: np.ndarray, ed_hu: np.ndarray, flows: np.ndarray | None, window: Sequence[float]):
        self.es = _unit(torch.as_tensor(np.asarray(es_hu, np.float32))[:, None], window)
        self.ed = _unit(torch.as_tensor(np.asarray(ed_hu, np.float32))[:, None], window)
        self.flows = None if flows is None else torch.as_tensor(np.asarray(flows, np.float32))

    def __len__(self) -> int:
        return len(self.es)

    def batch(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Batch(self.es[idx], self.ed[idx], None if self.flows is None else self.flows[idx])


def flow_rms(flows: Any) -> float:
    """sqrt(mean over samples and voxels of |u(x)|²) of (B, 3, I, J, K) flows, in voxels."""
    u = torch.as_tensor(np.asarray(flows) if not isinstance(flows, torch.Tensor) else flows).float()
    return float(u.pow(2).sum(1).mean().sqrt())


def random_smooth_flows(n: int, grid: Sequence[int], rms_vox: float, seed: int,
                        scales: Sequence[int] = (8, 4), steps: int = 7) -> torch.Tensor:
    """SynthMorph-style random diffeomorphic fields (Hoffmann et al. 2022): per field, Gaussian
    noise velocities on coarse grids ``grid / s`` for each s in ``scales``, upsampled to ``grid``
    and summed, integrated by scaling and squaring, then scaled so that each field's RMS magnitude
    is ``rms_vox`` (the velocity is rescaled and integrated again, so the field stays a
    diffeomorphism's displacement).

    Field i depends only on (seed, i) (:func:`random_smooth_flow`): any subset is reproducible alone.

    Returns:
        (n, 3, I, J, K) float32 pull fields in voxels.
    """
    return torch.stack([random_smooth_flow(grid, rms_vox, seed, i, scales, steps) for i in range(n)])


def random_smooth_flow(grid: Sequence[int], rms_vox: float, seed: int, index: int,
                       scales: Sequence[int] = (8, 4), steps: int = 7) -> torch.Tensor:
    """Field ``index`` of :func:`random_smooth_flows`: (3, I, J, K) float32 voxels."""
    from ..flow.ops import integrate_velocity
    from ..generate.engine import sample_seed

    grid = tuple(int(g) for g in grid)
    gen = torch.Generator().manual_seed(sample_seed(int(seed), int(index)))
    v = torch.zeros((1, 3, *grid))
    for s in scales:
        coarse = tuple(max(2, g // int(s)) for g in grid)
        v += F.interpolate(torch.randn((1, 3, *coarse), generator=gen), size=grid, mode="trilinear",
                           align_corners=False)
    u = integrate_velocity(v, steps=steps)
    for _ in range(2):  # the integrated field's RMS is not linear in the velocity's: refit twice
        r = flow_rms(u)
        if r <= 0:
            break
        v = v * (float(rms_vox) / r)
        u = integrate_velocity(v, steps=steps)
    return u[0]


def warped_ed(es_hu: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """ED as a corpus stores it: round(warp(ES, u)) in whole HU within int16's range, float32
    (B, 1, I, J, K), from ES (B, 1, I, J, K) HU and pull fields (B, 3, I, J, K) voxels."""
    from ..flow.warp import warp

    return warp(es_hu, flows).round_().clamp_(-32768, 32767)


class RandomFieldSource:
    """Random smooth fields warping the training ES frames (the ``random`` arm): sample i is
    field i of :func:`random_smooth_flows` applied to frame ``i mod n_frames``; ED = warp(ES, u)
    rounded to int16 HU as a corpus stores it."""

    def __init__(self, es_hu: np.ndarray, n: int, rms_vox: float, seed: int, window: Sequence[float],
                 scales: Sequence[int] = (8, 4)):
        self.es_hu = torch.as_tensor(np.asarray(es_hu, np.float32))[:, None]
        self.n, self.rms, self.seed, self.window, self.scales = int(n), float(rms_vox), int(seed), tuple(window), tuple(scales)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def field(self, i: int) -> torch.Tensor:
        if i not in self._cache:  # at most N fields: the arm's corpus size
            self._cache[i] = random_smooth_flow(self.es_hu.shape[2:], self.rms, self.seed, i, self.scales)
        return self._cache[i]

    def batch(self, indices: Sequence[int]) -> Batch:
        flows = torch.stack([self.field(int(i)) for i in indices])
        es = self.es_hu[[int(i) % len(self.es_hu) for i in indices]]
        ed = warped_ed(es, flows)
        return Batch(_unit(es, self.window), _unit(ed, self.window), flows)


class TransportSource:
    """The ``transport`` arm: registration-based augmentation, no generator.

    Each training ES frame is warped by its own annotated motion and by the annotated motions of
    ``k`` other training scans carried onto its anatomy through a demons registration of the two ES
    frames (:meth:`build`: :func:`~cardiomotion.train.transport.transport_pool`, the pool the CVAE
    trains on with ``train.transport_partners``). ED = round(warp(ES, w)) as a corpus stores it, so
    every pair is exactly labelled, as a corpus sample is; pairs whose transported field folds are
    left out (:attr:`dropped`).

    Args:
        es_hu: (n, I, J, K) the training ES frames, HU; scan_ids: their ids.
        flows: (m, 3, I, J, K) the pool's fields, voxels; pairs: (target, source) ids of each row
            (the target's ES frame is warped); dropped: the (target, partner) pairs left out.
        window: HU → [0, 1].
        registered: how many of its pairs were registered to make it (0: read from a pool file).
    """

    def __init__(self, es_hu: np.ndarray, scan_ids: Sequence[str], flows: torch.Tensor,
                 pairs: Sequence[tuple[str, str]], dropped: Sequence[tuple[str, str]], window: Sequence[float],
                 registered: int = 0):
        where = {str(s): n for n, s in enumerate(scan_ids)}
        if len(pairs) != len(flows):
            raise ValueError(f"{len(pairs)} pairs for {len(flows)} fields")
        self.es_hu = torch.as_tensor(np.asarray(es_hu, np.float32))[:, None]
        self.window = tuple(window)
        self.frame = torch.tensor([where[str(t)] for t, _ in pairs], dtype=torch.long)  # ES frame of each row
        self.flows = torch.as_tensor(flows).float()
        self.pairs = tuple((str(t), str(src)) for t, src in pairs)
        self.dropped = tuple((str(t), str(src)) for t, src in dropped)
        self.registered = int(registered)  # pairs registered to make it (build); 0 when read from a file

    @classmethod
    def build(cls, es_hu: np.ndarray, flows: np.ndarray, scan_ids: Sequence[str], k: int, seed: int,
              spacing_mm: float, window: Sequence[float], on_pair=None, cache=None) -> "TransportSource":
        """Register and transport: ``flows`` (n, 3, I, J, K) the annotated pull fields of
        ``scan_ids`` (only these scans partner each other); ``k`` partners per frame, chosen by
        ``seed`` (:func:`~cardiomotion.train.transport.partners`); ``spacing_mm`` the grid spacing
        (the registration's smoothing is in mm); ``on_pair(done, total)`` after each pair; ``cache``
        a :class:`~cardiomotion.train.transport.PairCache` the folds share (the same fields either way).
        :attr:`registered` counts the pairs registered here."""
        from ..train.transport import transport_pool

        ids = [str(s) for s in scan_ids]
        es = torch.as_tensor(np.asarray(es_hu, np.float32))[:, None]
        pool = transport_pool(_unit(es, window), torch.as_tensor(np.asarray(flows, np.float32)), ids, ids, int(k),
                              int(seed), float(spacing_mm), on_pair=on_pair, cache=cache)
        # rows index es_hu (pool.frame)
        return cls(es_hu, ids, pool.flow, pool.pairs, pool.dropped, window, registered=pool.registered)

    def __len__(self) -> int:
        return len(self.flows)

    def batch(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        es, flows = self.es_hu[self.frame[idx]], self.flows[idx]
        return Batch(_unit(es, self.window), _unit(warped_ed(es, flows), self.window), flows)


class AnchoredSource:
    """The ``anchored`` arm: the fold CVAE's variation around fields it is given.

    A corpus draws each field from the prior, so its decoder re-draws the motion from scratch; here
    the fields of a transport pool (:class:`TransportSource`: the training scans' own and carried
    annotated motions) are kept and the CVAE adds its learned variation around each. Sample i:

    * anchor a_i: a row of the pool (m rows), round r = i // m a permutation seeded by (``seed``,
      r), as a corpus takes its scans (:func:`~cardiomotion.generate.engine.scan_indices`);
    * ε_i ~ N(0, I) of the latent's shape from sample i's own generator
      (:func:`~cardiomotion.generate.engine.sample_seed`), as a corpus draws its latents;
    * u_i = w_a + D(μ_a + T·ε_i) − D(μ_a), with μ_a the encoder's posterior mean of (w_a, ES_a), D
      the decoder conditioned on ES_a and its frozen pyramid features, T ``temperature``;
    * ED = round(warp(ES_a, u_i)), exactly labelled, as a corpus sample is.

    At T = 0 every sample is its anchor; the anchor's own detail (what the decoder smooths away) is
    kept at every T, and only the decoder's variation is added.

    Args:
        pool: the fold's transport pool (its ES frames in HU, fields in voxels).
        model, pyramid: the fold CVAE and its frozen feature pyramid (eval mode, CPU).
        n: samples; seed: their seed (``cfg.seed``, as the corpus's); temperature: T.
        cond_window: HU → [0, 1] for the CVAE's conditioning (the model's intensity window).
    """

    def __init__(self, pool: "TransportSource", model: Any, pyramid: Any, n: int, seed: int, temperature: float,
                 cond_window: Sequence[float]):
        from ..generate.engine import scan_indices

        self.pool = pool
        self.n = int(n)
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.model = model
        self.anchor = torch.from_numpy(scan_indices(self.seed, len(pool), np.arange(self.n))).long()
        cond = _unit(pool.es_hu, cond_window)  # (n_frames, 1, I, J, K)
        with torch.no_grad():
            per_frame = [pyramid(cond[f:f + 1]) for f in range(cond.shape[0])]
            self.cond = cond
            self.feats = [torch.cat([f[lvl] for f in per_frame]) for lvl in range(len(per_frame[0]))]
            mus, bases = [], []
            for lo in range(0, len(pool), 16):
                rows = torch.arange(lo, min(lo + 16, len(pool)))
                es, feats = self._conditioning(rows)
                mu, _ = model.encode(pool.flows[rows], es, feats)
                mus.append(mu)
                bases.append(model.decode(mu, es, feats))
        self.mu = torch.cat(mus)  # (m, C, i, j, k) the anchors' posterior means
        self.base = torch.cat(bases)  # (m, 3, I, J, K) D(μ_a)

    def _conditioning(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        frames = self.pool.frame[rows]
        return self.cond[frames], [f[frames] for f in self.feats]

    def __len__(self) -> int:
        return self.n

    def fields(self, indices: Sequence[int]) -> torch.Tensor:
        """u_i (B, 3, I, J, K) voxels of samples ``indices``."""
        from ..generate.engine import sample_seed

        rows = self.anchor[torch.as_tensor(list(indices), dtype=torch.long)]
        eps = torch.stack([torch.randn(self.mu.shape[1:],
                                       generator=torch.Generator().manual_seed(sample_seed(self.seed, i)))
                           for i in indices])
        es, feats = self._conditioning(rows)
        with torch.no_grad():
            varied = self.model.decode(self.mu[rows] + self.temperature * eps, es, feats)
        return self.pool.flows[rows] + (varied - self.base[rows])

    def batch(self, indices: Sequence[int]) -> Batch:
        rows = self.anchor[torch.as_tensor(list(indices), dtype=torch.long)]
        es, flows = self.pool.es_hu[self.pool.frame[rows]], self.fields(indices)
        return Batch(_unit(es, self.pool.window), _unit(warped_ed(es, flows), self.pool.window), flows)


class CorpusSource:
    """Rows of a corpus (``Corpus[i]``, ``VirtualCorpus[i]`` or Ray Data batches): int16 HU
    ``es``/``ed_syn`` and float16 ``flow`` become a :class:`Batch`."""

    def __init__(self, corpus: Any, window: Sequence[float], n: int | None = None):
        self.corpus, self.window = corpus, tuple(window)
        self.n = len(corpus) if n is None else min(int(n), len(corpus))

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Sequence[int]) -> Batch:
        rows = [self.corpus[int(i)] for i in indices]
        return batch_from_columns({k: np.stack([r[k] for r in rows]) for k in ("es", "ed_syn", "flow")}, self.window)


def batch_from_columns(cols: dict[str, Any], window: Sequence[float]) -> Batch:
    """A :class:`Batch` from corpus columns ``es``, ``ed_syn`` ((B, I, J, K) int16 HU) and
    ``flow`` ((B, 3, I, J, K) float16 voxels), numpy or torch."""
    es = torch.as_tensor(cols["es"]).float()[:, None]
    ed = torch.as_tensor(cols["ed_syn"]).float()[:, None]
    return Batch(_unit(es, window), _unit(ed, window), torch.as_tensor(cols["flow"]).float())


def supervised_flow_loss(levels: Sequence[torch.Tensor], target: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Σ_k w_k · mean EPE between level k's flow and the target resized to its grid (voxels of
    that grid, :func:`~cardiomotion.models.pwcnet.resize_flow`, the network's own convention)."""
    from ..models.pwcnet import resize_flow

    if len(levels) != len(weights):
        raise ValueError(f"{len(levels)} flows but {len(weights)} weights")
    total = target.new_zeros(())
    for flow, w in zip(levels, weights):
        t = resize_flow(target, flow.shape[2:])
        total = total + w * torch.linalg.vector_norm(flow - t, dim=1).mean()
    return total


def train_estimator(model: torch.nn.Module, batches: Iterator[Batch], settings: EstimatorSettings,
                    device: Any = "cpu", on_step=None) -> list[float]:
    """``settings.steps`` Adam steps of ``model`` (a PWC-Net, ``model(fixed, moving)``) over
    ``batches``: EPE to the target flow when a batch has one, else the unsupervised photometric
    loss of ``annotate``. The rate of step s is ``epoch_lr(lr, lr_schedule, s, steps)``. Returns
    the loss of every step."""
    from ..annotate.pwc import epoch_lr
    from ..train.losses import pwc_unsupervised_loss

    device = torch.device(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    model.train()
    losses: list[float] = []
    for step in range(settings.steps):
        b = next(batches)
        es, ed = b.es.to(device), b.ed.to(device)
        out = model(ed, es)
        flows = [f.float() for f in out.levels] + [out.flow.float()]
        if b.flow is not None:
            loss = supervised_flow_loss(flows, b.flow.to(device), settings.level_weights)
        else:
            loss, _ = pwc_unsupervised_loss(ed, es, flows, settings.level_weights, settings.smooth_weight,
                                            settings.ssim_alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = epoch_lr(settings.lr, settings.lr_schedule, step, settings.steps)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices in [0, n): a fresh permutation per pass (CPU generator, the same
    on any device), cycled when n < batch_size."""
    gen = torch.Generator().manual_seed(int(seed))
    buf: list[int] = []
    while True:
        while len(buf) < batch_size:
            buf += torch.randperm(n, generator=gen).tolist()
        out, buf = buf[:batch_size], buf[batch_size:]
        yield out


def source_batches(source: Source, batch_size: int, seed: int) -> Iterator[Batch]:
    for idx in index_batches(len(source), batch_size, seed):
        yield source.batch(idx)


def alternate(*streams: Iterator[Batch]) -> Iterator[Batch]:
    """Round-robin over batch streams (the mixed arm: corpus, annotated, corpus, …)."""
    while True:
        for s in streams:
            yield next(s)


def pretrain_then(first: Iterator[Batch], then: Iterator[Batch], n_first: int) -> Iterator[Batch]:
    """``n_first`` batches of ``first``, then ``then``'s for good (the fine-tuned arm: the corpus,
    then the annotated pairs); ``first`` is closed when done with (a Ray Data shard's iterator
    stops prefetching)."""
    for _ in range(n_first):
        yield next(first)
    getattr(first, "close", lambda: None)()
    yield from then


def pretrain_steps(steps: int, share: float) -> int:
    """Steps of a ``steps`` budget spent pre-training: ``share`` of them rounded, at least one and
    leaving one to fine-tune (a budget of one step pre-trains nothing)."""
    if steps < 2:
        return 0
    return min(steps - 1, max(1, round(share * steps)))


@dataclass(frozen=True)
class EstimateScore:
    """How well one predicted flow matches the exact truth of a held-out pair.

    epe_mm / epe_myo_mm: mean end-point error over the grid / over the ED myocardium (mm);
    dice: mean Dice of the ED labels pulled from the ES labels through the flow against the
    true ED labels, over the LV blood pool and LV myocardium (NaN without labels);
    folding: fraction of voxels with det J ≤ 0;
    magnitude_myo: mean ‖u‖ / mean ‖truth‖ over the ED myocardium (1: as much motion as the truth;
    below 1 the estimate under-states it; NaN without labels).
    """

    epe_mm: float
    epe_myo_mm: float
    dice: float
    folding: float
    magnitude_myo: float = float("nan")

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(getattr(self, k))
                for k in ("epe_mm", "epe_myo_mm", "dice", "folding", "magnitude_myo")}


def score_estimate(flow: Any, truth: Any, spacing_mm: float | Sequence[float], ed_labels: np.ndarray | None,
                   es_labels: np.ndarray | None) -> EstimateScore:
    """Score a (3, I, J, K) voxel flow against the truth (same shape), see :class:`EstimateScore`."""
    from ..data.phantom import LV_BLOOD, LV_MYO
    from ..flow.metrics import endpoint_error, folding_fraction, magnitude_ratio
    from .physiology import synthetic_ed_labels

    u = torch.as_tensor(np.asarray(flow, np.float32) if not isinstance(flow, torch.Tensor) else flow).float()
    t = torch.as_tensor(np.asarray(truth, np.float32) if not isinstance(truth, torch.Tensor) else truth).float()
    if u.shape != t.shape or u.dim() != 4 or u.shape[0] != 3:
        raise ValueError(f"flow {tuple(u.shape)} and truth {tuple(t.shape)} must both be (3, I, J, K)")
    spacing = [float(spacing_mm)] * 3 if np.ndim(spacing_mm) == 0 else [float(x) for x in spacing_mm]
    epe = float(endpoint_error(u, t, spacing).epe_mm)
    epe_myo, dice, magnitude = float("nan"), float("nan"), float("nan")
    if ed_labels is not None:
        myo = np.asarray(ed_labels) == LV_MYO
        if myo.any():
            epe_myo = float(endpoint_error(u, t, spacing, mask=myo).epe_mm)
            magnitude = magnitude_ratio(u, t, mask=myo)
        if es_labels is not None:
            pulled = synthetic_ed_labels(es_labels, u)
            scores = []
            for lab in (LV_BLOOD, LV_MYO):
                a, b = pulled == lab, np.asarray(ed_labels) == lab
                if a.any() or b.any():
                    scores.append(2.0 * float((a & b).sum()) / float(a.sum() + b.sum()))
            dice = float(np.mean(scores)) if scores else float("nan")
    return EstimateScore(epe, epe_myo, dice, folding_fraction(u), magnitude)


def level_weights_for(n_levels: int, configured: Sequence[float] | None) -> tuple[float, ...]:
    """``annotate.level_weights`` or its default 0.5^k schedule (coarse → fine, then full resolution)."""
    if configured is not None:
        if len(configured) != n_levels + 1:
            raise ValueError(f"annotate.level_weights needs {n_levels + 1} values, got {len(configured)}")
        return tuple(float(w) for w in configured)
    return tuple([0.5 ** (n_levels - k) for k in range(n_levels)] + [1.0])
