"""Seeded joint augmentation of (ES image, ED←ES pull flow) for CVAE training.

Applied to the ES image and its flow together, *before* the frozen pyramid computes the
conditioning features (so the features see the augmented image). Shapes: image (B, C, I, J, K)
(C = 1 for CT), flow (B, 3, I, J, K) in voxels, channel c along array axis c (docs/design.md).

Per sample b, in this order (each step is applied with probability ``p``, independently):

1. **Zoom** by s ∈ [zoom[0], zoom[1]] (isotropic, about the grid centre c = ((I−1)/2, (J−1)/2,
   (K−1)/2), same output grid)::

       I'(x) = I(c + (x − c)/s)          u'(x) = s · u(c + (x − c)/s)

   Image and flow are resampled through the same sampling positions (trilinear, align_corners
   =True, border padding — :func:`cardiomotion.flow.warp.warp`), and the flow *vectors* are
   multiplied by s: an anatomy zoomed in by s moves s times as many voxels. s = 1 exactly skips
   the resampling (no interpolation at all).
2. **Shift** by an integer t ∈ {−max_shift, …, max_shift}³::

       I'(x) = I(x − t)                  u'(x) = u(x − t)

   done by index gathering with edge replication (indices clamped to the grid: the image gets
   "border" padding, the flow repeats its edge vectors), so it is exact — no interpolation.
   Zero padding would put 0 (not air) into a CT image and a spurious still band into the flow.
3. **Intensity noise**: image += N(0, noise_std²) per voxel (image only; the flow is untouched).

Both spatial maps satisfy, in the continuum, ``warp(I', u') == (warp(I, u))'``: the augmented
pair is again a consistent (ES, pull flow) pair whose warped image is the augmented ED frame
(derivation for the zoom: with y = c + (x−c)/s, warp(I', u')(x) = I'(x + s·u(y))
= I(c + (x + s·u(y) − c)/s) = I(y + u(y)) = warp(I, u)(y) = (warp(I, u))'(x)). Near the borders
the padding breaks this identity (content that came from outside the grid is invented).

Determinism: all random numbers are drawn from the caller's ``torch.Generator`` in a fixed order
and count (independent of ``p``'s outcomes), on the generator's device, then moved to the data's
device. The same generator state gives the same output; a CPU generator gives the same
parameters on any device. CUDA and CPU generators give *different* streams for the same seed:
training (:func:`cardiomotion.train.cvae.epoch_generators`) draws the parameters from a CPU
generator and only the per-voxel noise field (``noise_generator``) on the GPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, Sequence

import torch

from ..flow.warp import Padding, identity_grid, warp
from ..transfer import to_device


@dataclass
class AugmentConfig:
    """Augmentation settings: shifts up to 10 voxels and zoom 0.9–1.1 as in the paper; intensity
    noise std 0.015 by default — the paper states a *variance* of 0.015 (std 0.1225), selectable as
    ``noise_std: 0.1225`` (README, issue 14: both measured on the same folds).

    Attributes:
        noise_std: std of the additive Gaussian intensity noise (image units, [0, 1]-scaled CT).
        max_shift: largest integer shift per axis, voxels (0 disables shifting).
        zoom: (low, high) range of the isotropic zoom factor, drawn uniformly; (1, 1) disables.
        p: probability with which each of zoom, shift and noise is applied to a sample.
    """

    noise_std: float = 0.015
    max_shift: int = 10
    zoom: tuple[float, float] = (0.9, 1.1)
    p: float = 1.0

    def __post_init__(self) -> None:
        self.noise_std = float(self.noise_std)
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if isinstance(self.max_shift, bool) or int(self.max_shift) != self.max_shift or self.max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, got {self.max_shift!r}")
        self.max_shift = int(self.max_shift)
        try:
            lo, hi = (float(v) for v in self.zoom)
        except (TypeError, ValueError):
            raise ValueError(f"zoom must be a pair (low, high), got {self.zoom!r}") from None
        if not 0 < lo <= hi:
            raise ValueError(f"zoom must satisfy 0 < low <= high, got {self.zoom!r}")
        self.zoom = (lo, hi)
        self.p = float(self.p)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")

    def to_dict(self) -> dict[str, Any]:
        """Primitive-typed dict (zoom as a list), e.g. for MLflow params or YAML."""
        d = asdict(self)
        d["zoom"] = list(self.zoom)
        return d


class AugmentParams(NamedTuple):
    """The draws of one :func:`augment` call (CPU tensors).

    zoom: (B,) float64 zoom factors (1.0 where no zoom was applied).
    shift: (B, 3) int64 shifts in voxels along the array axes (0 where not applied).
    noise_std: (B,) float64 noise std actually used (0.0 where not applied).
    """

    zoom: torch.Tensor
    shift: torch.Tensor
    noise_std: torch.Tensor


def augment_config(settings: Any) -> AugmentConfig:
    """An :class:`AugmentConfig`, or one copied from any object with its fields (the config's
    ``train.augment`` section): the torch-only step never holds a pydantic model."""
    if isinstance(settings, AugmentConfig):
        return settings
    return AugmentConfig(**{f.name: getattr(settings, f.name) for f in fields(AugmentConfig)})


def _check_pair(image: torch.Tensor, flow: torch.Tensor) -> None:
    if image.dim() != 5 or flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"augment expects image (B,C,I,J,K) and flow (B,3,I,J,K), got "
                         f"{tuple(image.shape)} and {tuple(flow.shape)}")
    if image.shape[0] != flow.shape[0] or image.shape[2:] != flow.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and flow {tuple(flow.shape)} differ in batch or grid")


def zoom_pair(image: torch.Tensor, flow: torch.Tensor, zoom: Sequence[float] | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom each sample b by ``zoom[b]`` about the grid centre (same grid).

    ``I'(x) = I(c + (x − c)/s)``, ``u'(x) = s · u(c + (x − c)/s)``; trilinear, border padding.
    Samples with s == 1 are returned unchanged (bit-exact).

    Args:
        image: (B, C, I, J, K).
        flow: (B, 3, I, J, K) voxels.
        zoom: B factors (> 1 enlarges the anatomy).
    """
    _check_pair(image, flow)
    s = torch.as_tensor(zoom, dtype=torch.float64).reshape(-1)
    if s.numel() != image.shape[0]:
        raise ValueError(f"need {image.shape[0]} zoom factors, got {s.numel()}")
    if bool((s <= 0).any()):
        raise ValueError(f"zoom factors must be > 0, got {s.tolist()}")
    if bool((s == 1).all()):
        return image, flow
    grid = tuple(image.shape[2:])
    dtype = flow.dtype if flow.is_floating_point() else torch.float32
    x = identity_grid(grid, device=flow.device, dtype=dtype)
    c = to_device(torch.tensor([(n - 1) / 2 for n in grid], dtype=dtype), flow.device).view(1, 3, 1, 1, 1)
    imgs, flows = [], []
    for b in range(image.shape[0]):
        sb = float(s[b])
        if sb == 1.0:
            imgs.append(image[b:b + 1])
            flows.append(flow[b:b + 1])
            continue
        # Sampling offset d(x) = c + (x − c)/s − x, a pull field for warp().
        d = (c - x) * (1.0 - 1.0 / sb)
        imgs.append(warp(image[b:b + 1], d, padding=Padding.BORDER).to(image.dtype))
        flows.append(sb * warp(flow[b:b + 1], d, padding=Padding.BORDER).to(flow.dtype))
    return torch.cat(imgs), torch.cat(flows)


def shift_pair(image: torch.Tensor, flow: torch.Tensor, shift: Sequence[Sequence[int]] | torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each sample b by the integer vector ``shift[b]`` (voxels, array axes), exactly.

    ``I'(x) = I(clamp(x − t))``, ``u'(x) = u(clamp(x − t))``: index gathering with indices
    clamped to the grid (edge replication; border padding for the image, edge vectors repeated
    for the flow). Vectors are unchanged.

    Args:
        image: (B, C, I, J, K).
        flow: (B, 3, I, J, K) voxels.
        shift: (B, 3) integers.
    """
    _check_pair(image, flow)
    t = torch.as_tensor(shift)
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError(f"shifts must be integers, got {t.tolist()}")
    t = t.to(torch.int64).reshape(-1, 3)
    if t.shape[0] != image.shape[0]:
        raise ValueError(f"need {image.shape[0]} shift vectors, got {t.shape[0]}")
    if not bool(t.any()):
        return image, flow
    grid = tuple(image.shape[2:])
    imgs, flows = [], []
    for b in range(image.shape[0]):
        idx = [(torch.arange(n, device=image.device) - int(t[b, a])).clamp_(0, n - 1)
               for a, n in enumerate(grid)]
        ib, fb = image[b:b + 1], flow[b:b + 1]
        for a in range(3):
            if int(t[b, a]):
                ib = ib.index_select(2 + a, idx[a])
                fb = fb.index_select(2 + a, idx[a])
        imgs.append(ib)
        flows.append(fb)
    return torch.cat(imgs), torch.cat(flows)


def draw_params(batch: int, cfg: Any, generator: torch.Generator) -> AugmentParams:
    """Draw zoom, shift and noise std for ``batch`` samples (fixed order and count of draws);
    ``cfg``: :class:`AugmentConfig` or the ``train.augment`` section."""
    cfg = augment_config(cfg)
    dev = generator.device
    apply = torch.rand(batch, 3, generator=generator, device=dev).cpu() < cfg.p  # zoom, shift, noise
    u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64).cpu()
    lo, hi = cfg.zoom
    zoom = torch.where(apply[:, 0], lo + (hi - lo) * u, torch.ones_like(u))  # exactly lo if hi == lo
    shift = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (batch, 3), generator=generator, device=dev).cpu()
    shift = shift * apply[:, 1:2].to(torch.int64)
    noise_std = apply[:, 2].to(torch.float64) * cfg.noise_std
    return AugmentParams(zoom=zoom, shift=shift, noise_std=noise_std)


def augment(
    image: torch.Tensor,
    flow: torch.Tensor,
    cfg: Any,
    generator: torch.Generator,
    return_params: bool = False,
    noise_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, AugmentParams]:
    """Augment (ES image, pull flow) jointly: zoom, then integer shift, then intensity noise.

    Args:
        image: (B, C, I, J, K) ES image(s), e.g. CT scaled to [0, 1].
        flow: (B, 3, I, J, K) ED←ES pull flow(s), voxels.
        cfg: :class:`AugmentConfig`, or the config's ``train.augment`` section.
        generator: source of all randomness; same state → same output.
        return_params: also return the :class:`AugmentParams` drawn.
        noise_generator: draw the per-voxel intensity-noise field from this generator instead
            (e.g. one on the data's GPU, while ``generator`` is a CPU generator whose stream is the
            same on every device); the parameters always come from ``generator``.

    Returns:
        (image', flow') with the input shapes and dtypes (plus the params if asked). The image
        is not clipped after adding noise.
    """
    _check_pair(image, flow)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    params = draw_params(image.shape[0], cfg, generator)
    ng = noise_generator if noise_generator is not None else generator
    noise = torch.randn(image.shape, generator=ng, device=ng.device, dtype=torch.float32)
    image, flow = zoom_pair(image, flow, params.zoom)
    image, flow = shift_pair(image, flow, params.shift)
    if bool((params.noise_std > 0).any()):
        std = to_device(params.noise_std, image.device, image.dtype).view(-1, *([1] * (image.dim() - 1)))
        image = image + std * to_device(noise, image.device, image.dtype)
    return (image, flow, params) if return_params else (image, flow)


__all__ = ["AugmentConfig", "AugmentParams", "augment", "augment_config", "draw_params", "shift_pair", "zoom_pair"]
