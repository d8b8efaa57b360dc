"""Latent traversal: decode z(α) = z0 + α·d along unit latent directions d (the paper's figures).

The prior's marginal along any unit direction is N(0, 1), so α in [−2.5, 2.5] spans the prior's
range along d. Directions ``"channels"``: d_c = the indicator of latent channel c at every
position of the spatial latent, normalised (a global mode of channel c); ``"random"``: seeded
Gaussian directions, normalised.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def latent_directions(latent_shape: Sequence[int], count: int, kind: str = "channels", seed: int = 0) -> torch.Tensor:
    """``count`` unit directions (count, C, i, j, k) in a latent of ``latent_shape``.

    ``kind="channels"`` uses channels 0, 1, … (random directions once channels run out).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if kind not in ("channels", "random"):
        raise ValueError(f"kind must be 'channels' or 'random', got {kind!r}")
    shape = tuple(int(n) for n in latent_shape)
    out = []
    g = torch.Generator().manual_seed(int(seed))
    for c in range(count):
        if kind == "channels" and c < shape[0]:
            d = torch.zeros(shape)
            d[c] = 1.0
        else:
            d = torch.randn(shape, generator=g)
        out.append(d / d.norm())
    return torch.stack(out) if out else torch.zeros((0, *shape))


@torch.no_grad()
def latent_traversal(model, pyramid, es_hu: torch.Tensor | np.ndarray, window: tuple[float, float],
                     directions: torch.Tensor, alphas: Sequence[float], base: torch.Tensor | None = None,
                     batch_size: int = 8) -> torch.Tensor:
    """Flows along latent directions for one ES frame.

    Args:
        model: a :class:`~cardiomotion.models.cvae.MotionCVAE` (eval mode).
        pyramid: its frozen :class:`~cardiomotion.models.pyramid.FeaturePyramid`.
        es_hu: the ES frame in HU, (I, J, K) or (1, 1, I, J, K).
        window: the model's intensity window (model.json ``intensity_window``).
        directions: (D, C, i, j, k) latent directions (e.g. :func:`latent_directions`).
        alphas: positions along each direction, in prior standard deviations.
        base: the latent the traversal starts from (C, i, j, k); default 0 (the prior mean).
        batch_size: latents decoded together.

    Returns:
        (D, A, 3, I, J, K) float32 flows in voxels (pull convention), on the CPU.
    """
    from ..data.intensity import hu_to_unit

    device = next(model.parameters()).device
    es = torch.as_tensor(np.asarray(es_hu, dtype=np.float32)) if not isinstance(es_hu, torch.Tensor) else es_hu.float()
    es = es.reshape(1, 1, *es.shape[-3:]).to(device)
    es_unit = hu_to_unit(es, window)
    feats = pyramid(es_unit)
    latent = model.latent_shape(es.shape[2:])
    directions = torch.as_tensor(directions, dtype=torch.float32).to(device)
    if directions.dim() != 4 + 1 or tuple(directions.shape[1:]) != tuple(latent):
        raise ValueError(f"directions must be (D, {', '.join(map(str, latent))}), got {tuple(directions.shape)}")
    z0 = torch.zeros(latent, device=device) if base is None else torch.as_tensor(base, dtype=torch.float32).to(device)
    a = torch.as_tensor([float(x) for x in alphas], dtype=torch.float32, device=device)
    zs = (z0[None, None] + a[None, :, None, None, None, None] * directions[:, None]).reshape(-1, *latent)
    flows = []
    for s in range(0, zs.shape[0], batch_size):
        z = zs[s:s + batch_size]
        b = z.shape[0]
        flows.append(model.decode(z, es_unit.expand(b, -1, -1, -1, -1),
                                  [f.expand(b, -1, -1, -1, -1) for f in feats]).float().cpu())
    out = torch.cat(flows) if flows else torch.zeros((0, 3, *es.shape[2:]))
    return out.reshape(directions.shape[0], len(a), 3, *es.shape[2:])
