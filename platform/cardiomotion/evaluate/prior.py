"""Evaluate a trained CVAE as a motion prior on one held-out scan.

Draws K prior samples for the held-out ES frame and scores them as a distribution against the
annotated flow and, on the phantom, against the exact truth (:mod:`.generative`); where the
prepared set carries ES labels (phantoms), labels each synthetic ED and measures its physiology
next to the truth field's (:mod:`.physiology`). Used by ``train``/``cv`` after a fold finishes and
by ``bench/prior_recipes.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .generative import ensemble_score
from .physiology import Physiology, physiology, summarize_physiology


@dataclass(frozen=True)
class PriorReport:
    """What :func:`evaluate_prior` measured for one held-out scan.

    metrics: flat floats (``prior_*`` keys; distances in voxels and mm), ready for MLflow / tables.
    samples_physiology: one :class:`Physiology` per prior sample (empty without ES labels).
    truth_physiology: the same indices of the exact truth field (None without truth or labels).
    """

    metrics: dict[str, float]
    samples_physiology: tuple[Physiology, ...] = ()
    truth_physiology: Physiology | None = None
    reference_physiology: Physiology | None = None


@torch.no_grad()
def draw_prior_samples(model, pyramid, es: torch.Tensor, k: int, seed: int, batch: int = 8,
                       temperature: float = 1.0) -> torch.Tensor:
    """K prior samples for one ES frame es (1, 1, I, J, K) → (K, 3, I, J, K) voxels on the CPU.

    z is drawn from a CPU ``torch.Generator`` seeded ``seed`` (the same latents on any device; the
    decoded flows agree to the device's floating-point precision).
    """
    device = next(model.parameters()).device
    model = model.eval()
    es = es.to(device)
    feats = pyramid(es)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for start in range(0, k, batch):
        n = min(batch, k - start)
        e = es.expand(n, *es.shape[1:])
        f = [t.expand(n, *t.shape[1:]) for t in feats]
        out.append(model.sample(e, f, temperature=temperature, generator=gen).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_prior(model, pyramid, es: torch.Tensor, reference: torch.Tensor, spacing_mm: float, *, k: int = 16,
                   seed: int = 0, truth: Any = None, es_labels: Any = None, temperature: float = 1.0) -> PriorReport:
    """Score K prior samples of a held-out scan.

    Args:
        model: a :class:`~cardiomotion.models.cvae.MotionCVAE`; pyramid: its frozen feature pyramid.
        es: (1, 1, I, J, K) held-out ES image in [0, 1].
        reference: (1, 3, I, J, K) or (3, I, J, K) annotated flow, voxels.
        spacing_mm: isotropic voxel size.
        k: number of prior samples (K ≥ 2 for the spread terms).
        truth: optional exact pull field (3, I, J, K) voxels (phantom).
        es_labels: optional (I, J, K) ES labels (phantom): physiology of each synthetic ED.
        temperature: prior z ~ N(0, T²·I), as ``generate.temperature`` draws a corpus.

    Returns:
        :class:`PriorReport`. Metric keys: ``prior_<score>_vox`` / ``_mm`` against the annotated
        flow, ``prior_truth_<score>…`` against the truth, ``prior_spread_skill``,
        ``prior_magnitude_ratio``, ``prior_folding``, and with labels ``prior_ef_mean`` … plus
        ``truth_ef`` … and ``reference_ef`` … (the annotated flow's).
    """
    from ..flow.metrics import folding_fraction

    samples = draw_prior_samples(model, pyramid, es, k, seed, temperature=temperature)
    ref = torch.as_tensor(np.asarray(reference)) if not isinstance(reference, torch.Tensor) else reference
    ref = ref.detach().float().cpu().reshape(3, *samples.shape[2:])
    metrics = ensemble_score(samples, ref).to_dict("prior_", spacing_mm)
    metrics["prior_folding"] = folding_fraction(samples)
    truth_t = None
    if truth is not None:
        truth_t = torch.as_tensor(np.asarray(truth)).float().reshape(3, *samples.shape[2:])
        sc = ensemble_score(samples, truth_t).to_dict("prior_truth_", spacing_mm)
        metrics.update({k_: v for k_, v in sc.items() if k_ != "prior_truth_k"})
    phys: tuple[Physiology, ...] = ()
    truth_phys = ref_phys = None
    if es_labels is not None:
        lab = np.asarray(es_labels)
        phys = tuple(physiology(lab, samples, spacing_mm))
        metrics.update({f"prior_{k_}": v for k_, v in summarize_physiology(list(phys)).items()})
        ref_phys = physiology(lab, ref, spacing_mm)[0]
        metrics.update(_indices(ref_phys, "reference_"))
        if truth_t is not None:
            truth_phys = physiology(lab, truth_t, spacing_mm)[0]
            metrics.update(_indices(truth_phys, "truth_"))
    return PriorReport(metrics, phys, truth_phys, ref_phys)


def _indices(p: Physiology, prefix: str) -> dict[str, float]:
    return {f"{prefix}ef": p.ef, f"{prefix}longitudinal_shortening": p.longitudinal_shortening,
            f"{prefix}myo_volume_change": p.myo_volume_change}


__all__ = ["PriorReport", "draw_prior_samples", "evaluate_prior"]
