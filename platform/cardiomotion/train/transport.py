"""Motion transport: another scan's annotated motion, carried onto this scan's anatomy.

The generator learns p(u | ES) from one annotated flow per training ES frame, so nothing in
its data says that one heart could move in more than one way: the fold CVAEs learned an almost
deterministic map ES → u (README, "The generator's samples: temperature, diversity, and the
recipe"). Transport gives each training ES frame the motions of other training scans as well,
each mapped into its anatomy, so the spread of the cohort's motion (ejection, shortening, twist)
appears as spread *given* an ES frame, which is what the latent has to carry.

Conventions (docs/design.md): pull fields (3, I, J, K) or (B, 3, I, J, K) in voxels, channel c
along array axis c; a field ``u`` stands for the map φ_u(x) = x + u(x).

For a target scan i and a partner j:

* ``p`` registers ES_j onto ES_i: ES_i(x) ≈ ES_j(x + p(x)), i.e. φ_p maps i's space into j's
  (:func:`register_frames`, demons with fixed = ES_i, moving = ES_j);
* j's motion u_j satisfies ED_j(y) ≈ ES_j(y + u_j(y));
* the transported field is the conjugate ``w = φ_p⁻¹ ∘ φ_{u_j} ∘ φ_p − id``
  (:func:`transport_flow`), so that ES_i(x + w(x)) ≈ ED_j(x + p(x)): the synthetic ED of i is
  j's ED seen through the correspondence, and the vectors are re-oriented and re-scaled by the
  correspondence (no first-order approximation).

Which scans partner which (:func:`partners`) depends only on the seed and the two scan ids, so
the pairs of two folds agree except where one of them holds the other's held-out scan; a
held-out scan is never a partner (only the ids given are considered). A transported field is a
function of three arrays only (ES_i, ES_j, u_j), so a :class:`PairCache` shared by the folds of a
leave-one-out sweep registers each pair once for all of them: with 44 folds and k partners a fold
registers 43·k pairs, the sweep about 44·k distinct ones instead of 44·43·k.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..flow.metrics import folding_fraction
from ..flow.ops import compose, invert

__all__ = ["MAX_FOLDING", "TRANSPORT_ITERATIONS", "PairCache", "TransportPool", "partners", "register_frames",
           "transport_flow", "transport_pool"]

# Demons iterations per level (coarse to fine) for ES_j → ES_i. Measured on 12 phantom pairs of
# scans 8-43 at 32³ (docs/results/motion_transport/probe.py, probe.md): 40/20/10 carries j's true
# motion as close to i's truth as the 400/200/100 default does (myocardium EPE 1.30 mm both;
# 2.02 untransported) in a ninth of the time (0.6 s a pair).
TRANSPORT_ITERATIONS = (40, 20, 10)
# A transported field folding more of the grid than this (Jacobian det ≤ 0) comes from a failed
# registration or an inverse that did not converge: that pair is left out of the pool.
MAX_FOLDING = 0.01


def partners(scan_ids: Sequence[str], k: int, seed: int) -> dict[str, list[str]]:
    """The ``k`` partners of each scan among ``scan_ids`` (never itself; fewer when fewer exist).

    The order of j for scan i is that of sha256(seed, i, j), so the choice does not depend on
    which other scans are present: removing a scan only replaces it where it was chosen.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ids = [str(s) for s in scan_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("scan_ids must be distinct")

    def rank(i: str, j: str) -> str:
        return hashlib.sha256(f"{int(seed)}\0{i}\0{j}".encode()).hexdigest()

    return {i: sorted((j for j in ids if j != i), key=lambda j: rank(i, j))[:k] for i in ids}


def register_frames(fixed: np.ndarray, moving: np.ndarray, spacing_mm: float,
                    iterations: Sequence[int] = TRANSPORT_ITERATIONS, window: tuple[float, float] = (0.0, 1.0),
                    threads: int | None = 1) -> np.ndarray:
    """Pull field p (3, I, J, K) voxels with ``fixed(x) ≈ moving(x + p(x))`` (diffeomorphic demons,
    :func:`cardiomotion.evaluate.baseline.demons_flow`). ``fixed``, ``moving``: (I, J, K) volumes
    on one grid, intensities in ``window`` (the training images are in [0, 1])."""
    from ..evaluate.baseline import demons_flow

    return demons_flow(moving, fixed, spacing_mm, iterations=tuple(iterations), levels=len(iterations),
                       window_hu=window, threads=threads)


def transport_flow(u: torch.Tensor, p: torch.Tensor, p_inverse: torch.Tensor | None = None) -> torch.Tensor:
    """The motion ``u`` of a partner, carried through the correspondence ``p`` onto the target.

    Args:
        u: (B, 3, I, J, K) the partner's pull field ED ← ES, voxels of the partner's grid.
        p: (B, 3, I, J, K) the target → partner correspondence (target(x) ≈ partner(x + p(x))).
        p_inverse: its inverse if known (else :func:`cardiomotion.flow.ops.invert`).

    Returns:
        (B, 3, I, J, K) w = φ_p⁻¹ ∘ φ_u ∘ φ_p − id, voxels: target(x + w(x)) ≈ partner's ED(x + p(x)).
    """
    q = invert(p) if p_inverse is None else p_inverse
    return compose(p, compose(u, q))


class PairCache:
    """Transported fields of (target, partner) pairs in a folder, content-addressed.

    A file's name is the sha256 of what the field is a function of: the target's and the partner's
    ES frames and the partner's motion (bytes, dtype, shape), the spacing, the demons schedule
    (:data:`TRANSPORT_ITERATIONS`) and this format's version. So a file is valid for whichever
    fold, seed or run asks for the same pair, and any other input gives another name: nothing
    goes stale, and no held-out scan can enter (its frame would change the name). A file holds
    {"flow": (3, I, J, K) float32 voxels, or None where the registration failed}, written under a
    unique temporary name and renamed (two folds computing one pair at once write the same
    content), read with ``torch.load(weights_only=True)``; a file that does not load is computed
    again. The folding bound is applied by :func:`transport_pool`, not stored.
    """

    VERSION = 1

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, es_target: torch.Tensor, es_partner: torch.Tensor, flow_partner: torch.Tensor,
            spacing_mm: float) -> str:
        h = hashlib.sha256(f"v{self.VERSION}|{float(spacing_mm)!r}|{tuple(TRANSPORT_ITERATIONS)}".encode())
        for t in (es_target, es_partner, flow_partner):
            a = t.detach().cpu().contiguous().numpy()
            h.update(f"|{a.dtype.str}{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        from ..layout import transport_pair_file

        return transport_pair_file(self.root, key)

    _MISSING = object()

    def get(self, key: str):
        """The stored field (float32 tensor), None for a stored failure, :attr:`_MISSING` if absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return self._MISSING
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file is computed again, never trusted
            return self._MISSING
        if not isinstance(rec, dict) or "flow" not in rec:
            return self._MISSING
        return None if rec["flow"] is None else rec["flow"].float()

    def put(self, key: str, flow: torch.Tensor | None) -> None:
        from ..fileio import atomic_path

        with atomic_path(self.path(key)) as tmp:
            torch.save({"flow": None if flow is None else flow.detach().float().cpu().contiguous()}, tmp)


@dataclass(frozen=True)
class TransportPool:
    """Training pairs with transported motions appended.

    frames: (n, 1, I, J, K) the ES frames given to :func:`transport_pool` (not copied); frame: (N,)
    the index into ``frames`` of each row's (target) ES frame; flow: (N, 3, I, J, K) voxels;
    pairs: (target, source) scan ids of each row (source == target for a scan's own annotation);
    dropped: the (target, partner) pairs left out (registration failed, or the transported field
    folds more than :data:`MAX_FOLDING` of the grid).
    """

    frames: torch.Tensor
    frame: torch.Tensor
    flow: torch.Tensor
    pairs: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...] = ()
    registered: int = 0  # pairs registered here (the others were read from a PairCache)

    @property
    def es(self) -> torch.Tensor:
        """(N, 1, I, J, K) each row's ES frame (a new tensor: N frames, where :attr:`frames` holds n)."""
        return self.frames[self.frame]


def transport_pool(es: torch.Tensor, flow: torch.Tensor, scan_ids: Sequence[str], targets: Sequence[str],
                   k: int, seed: int, spacing_mm: float,
                   on_pair: Callable[[int, int], None] | None = None, cache: PairCache | None = None) -> TransportPool:
    """The targets' own pairs, then each target's ES with the motions of its ``k`` partners.

    Args:
        es: (n, 1, I, J, K) ES frames of ``scan_ids`` in [0, 1]; flow: (n, 3, I, J, K) their
            annotated pull fields, voxels. Only these scans are used (a fold's training scans).
        targets: the ids whose rows this pool holds (a rank's share), each in ``scan_ids``.
        k: partners per target (:func:`partners` over ``scan_ids``); 0 = the own pairs only.
        on_pair: called (done, total) after each pair (progress).
        cache: where transported fields are read from and written to (:class:`PairCache`); the
            pool is the same with or without it.
    """
    ids = [str(s) for s in scan_ids]
    if es.shape[0] != len(ids) or flow.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} scan ids for {es.shape[0]} frames and {flow.shape[0]} flows")
    where = {s: n for n, s in enumerate(ids)}
    missing = [t for t in targets if t not in where]
    if missing:
        raise ValueError(f"targets not among the scans: {missing}")
    chosen = partners(ids, k, seed)
    rows_frame = [where[t] for t in targets]
    rows_flow = [flow[where[t]] for t in targets]
    pairs = [(t, t) for t in targets]
    dropped = []
    total = sum(len(chosen[t]) for t in targets)
    jobs = [(t, src) for t in targets for src in chosen[t]]
    if cache is not None:
        # computed in an order of this call's own, drawn at random (the pool's rows keep the canonical
        # order, so the result does not depend on it): folds and seeds that run at once share most
        # pairs, and in different orders each finds most of them already done by the others
        import random

        random.SystemRandom().shuffle(jobs)
    fields: dict[tuple[str, str], torch.Tensor | None] = {}
    registered = 0
    for done, (t, src) in enumerate(jobs, 1):
        i, j = where[t], where[src]
        key = None if cache is None else cache.key(es[i], es[j], flow[j], spacing_mm)
        w = PairCache._MISSING if cache is None else cache.get(key)
        if w is PairCache._MISSING:
            try:
                p = torch.from_numpy(register_frames(es[i, 0].numpy(), es[j, 0].numpy(), spacing_mm))[None]
            except RuntimeError:  # SimpleITK gave up on this pair: the pool does without it
                p = None
            w = None if p is None else transport_flow(flow[j:j + 1].float(), p)[0]
            registered += 1
            if cache is not None:
                cache.put(key, w)
        fields[(t, src)] = w
        if on_pair is not None:
            on_pair(done, total)
    for t in targets:
        for src in chosen[t]:
            w = fields[(t, src)]
            if w is None or not torch.isfinite(w).all() or folding_fraction(w) > MAX_FOLDING:
                dropped.append((t, src))
            else:
                rows_frame.append(where[t])
                rows_flow.append(w.to(flow.dtype))
                pairs.append((t, src))
    return TransportPool(es, torch.tensor(rows_frame, dtype=torch.long), torch.stack(rows_flow), tuple(pairs),
                         tuple(dropped), registered)
