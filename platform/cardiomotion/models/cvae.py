"""Systole-conditioned motion CVAE: a dense 3D flow generator conditioned on one ES frame.

The model learns p(u | ES) for the ED←ES pull field u (docs/design.md conventions: flows (B, 3, I, J, K)
in voxels of the ES/ED grid, channel c = displacement along array axis c, ED(x) ≈ ES(x + u(x))).
Conditioning is multi-scale: the *frozen* PWC-Net feature pyramid of the ES frame
(:class:`~cardiomotion.models.pyramid.FeaturePyramid`) is computed by the caller and passed to
every call as a list of features, finest first; the CVAE does not own (or train) it.

Architecture (L = ``len(channels)`` levels, level l at grid /2^(l+1), like the pyramid):

* Encoder q(z | u, ES): input concat(u, ES) (B, 3 + in_channels, I, J, K). Level l:
  halve as the pyramid does (conv3 stride 2, or ``AlignedDown`` under an aligned pyramid) →
  LeakyReLU(0.1) → concat(pyramid level l) → conv3 → LeakyReLU(0.1), giving
  channels[l] at grid /2^(l+1). At the coarsest level two 1×1×1 heads give μ and log σ² of a
  *spatial* latent map (B, latent_channels, I/2^L, J/2^L, K/2^L).
* Decoder p(u | z, ES): concat(z, pyramid level L−1) → conv3 → LeakyReLU (grid /2^L); then for
  each finer grid /2^l, l = L−1 … 0: trilinear ×2 upsampling → conv3 → LeakyReLU → concat(the
  pyramid level at that grid, or the raw ES image at full resolution, l = 0) → conv3 → LeakyReLU.
  A final conv3 head gives 3 channels, initialised near zero (weights ~ N(0, 1e-5²), bias 0), so
  an untrained decoder outputs (almost exactly) the identity map.
* Output: ``OutputKind.DISPLACEMENT`` (the paper): the head is the displacement u in voxels.
  ``OutputKind.VELOCITY``: the head is a stationary velocity field v (voxels per unit time) and
  u = exp(v) by scaling and squaring (:func:`cardiomotion.flow.ops.integrate_velocity`), a
  diffeomorphism (no folding; exp(−v) is the inverse).

Any grid whose three sizes are divisible by 2^L works (e.g. 96³ → latent 3³ for 5 levels).
The log-variance head is soft-clamped to (−16, 16) with 16·tanh(·/16) (identity for ordinary
values, no exp overflow under bf16/fp16 autocast).

Checkpoints (``save`` / ``load``) are ``{"kind": "motion_cvae", "config", "state_dict"}`` with
primitive types and tensors only, read with ``torch.load(weights_only=True)``; the model
rebuilds from the file alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..choices import OutputKind
from ..transfer import to_device
from ..flow.ops import integrate_velocity
from .pyramid import conv3, downsample, load_checkpoint, save_checkpoint

CVAE_KIND = "motion_cvae"
LOGVAR_BOUND = 16.0


class CVAEOutput(NamedTuple):
    """Result of :meth:`MotionCVAE.forward`.

    flow: (B, 3, I, J, K) reconstructed/generated pull displacement, voxels.
    mu, logvar: (B, latent_channels, I/2^L, J/2^L, K/2^L) posterior parameters (log σ²).
    z: the latent that was decoded, same shape as mu.
    """

    flow: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.1, inplace=True)


class _EncoderLevel(nn.Module):
    """halve (:func:`~.pyramid.downsample`, as the pyramid halves) → act → concat(cond) → conv3 → act."""

    def __init__(self, in_ch: int, cond_ch: int, out_ch: int, aligned: bool = False):
        super().__init__()
        self.down = downsample(in_ch, out_ch, aligned)
        self.fuse = conv3(out_ch + cond_ch, out_ch)
        self.act = _act()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.act(self.down(x))
        return self.act(self.fuse(torch.cat([x, cond.to(x.dtype)], dim=1)))


class _DecoderLevel(nn.Module):
    """trilinear ×2 (to ``cond``'s grid) → conv3 → act → concat(cond) → conv3 → act."""

    def __init__(self, in_ch: int, cond_ch: int, out_ch: int):
        super().__init__()
        self.up = conv3(in_ch, out_ch)
        self.fuse = conv3(out_ch + cond_ch, out_ch)
        self.act = _act()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(cond.shape[2:]), mode="trilinear", align_corners=False)
        x = self.act(self.up(x))
        return self.act(self.fuse(torch.cat([x, cond.to(x.dtype)], dim=1)))


class MotionCVAE(nn.Module):
    """Conditional VAE over ED←ES pull flows, conditioned on the ES frame and its frozen pyramid.

    Args:
        channels: encoder/decoder channels per level, finest first (L = len(channels) levels;
            the grid must be divisible by 2^L).
        cond_channels: channels of the conditioning pyramid per level (the frozen
            FeaturePyramid's ``channels``); default = ``channels``. Must have L entries.
        latent_channels: channels of the spatial latent map; default = ``channels[-1]``.
        output: ``OutputKind.DISPLACEMENT`` / ``"displacement"`` or ``OutputKind.VELOCITY`` /
            ``"velocity"``.
        integration_steps: scaling-and-squaring steps for the velocity output.
        in_channels: channels of the ES image (1 for CT scaled to [0, 1]).
        aligned: the encoder halves as an ``aligned`` pyramid does (coarse voxel i at fine 2i + 0.5),
            so its maps line up with the conditioning features; take it from the pyramid's config.

    Shapes: flow (B, 3, I, J, K) voxels; es (B, in_channels, I, J, K); feats = the pyramid's
    output for es, a list of L tensors, level l (B, cond_channels[l], I/2^(l+1), …);
    latent (B, latent_channels, I/2^L, J/2^L, K/2^L).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 96, 128),
        cond_channels: Sequence[int] | None = None,
        latent_channels: int | None = None,
        output: OutputKind | str = OutputKind.DISPLACEMENT,
        integration_steps: int = 7,
        in_channels: int = 1,
        aligned: bool = False,
    ):
        super().__init__()
        self.aligned = bool(aligned)
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        self.cond_channels = self.channels if cond_channels is None else tuple(int(c) for c in cond_channels)
        if len(self.cond_channels) != len(self.channels) or min(self.cond_channels) < 1:
            raise ValueError(f"cond_channels must have {len(self.channels)} positive entries "
                             f"(one per level), got {cond_channels}")
        self.latent_channels = self.channels[-1] if latent_channels is None else int(latent_channels)
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        self.output = OutputKind(output)
        self.integration_steps = int(integration_steps)
        if self.integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        self.in_channels = int(in_channels)
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")

        L = len(self.channels)
        ch, cond = self.channels, self.cond_channels
        # Encoder: level l maps (ch[l-1] or 3 + in_channels) at grid /2^l → ch[l] at /2^(l+1).
        enc = []
        prev = 3 + self.in_channels
        for lvl in range(L):
            enc.append(_EncoderLevel(prev, cond[lvl], ch[lvl], self.aligned))
            prev = ch[lvl]
        self.encoder = nn.ModuleList(enc)
        self.mu_head = nn.Conv3d(ch[-1], self.latent_channels, kernel_size=1)
        self.logvar_head = nn.Conv3d(ch[-1], self.latent_channels, kernel_size=1)
        # Start the posterior near N(0, 1)-scale variances rather than at random log-variances.
        nn.init.normal_(self.logvar_head.weight, std=1e-3)
        nn.init.zeros_(self.logvar_head.bias)

        # Decoder: bottom block at /2^L, then one up-block per finer grid /2^l, l = L-1 … 0.
        self.bottom = nn.Sequential(conv3(self.latent_channels + cond[-1], ch[-1]), _act())
        dec = []
        for g in range(L - 1, 0, -1):  # to grid /2^g = pyramid level g-1
            dec.append(_DecoderLevel(ch[g], cond[g - 1], ch[g - 1]))
        dec.append(_DecoderLevel(ch[0], self.in_channels, ch[0]))  # full resolution, raw image
        self.decoder = nn.ModuleList(dec)
        self.head = conv3(ch[0], 3)
        nn.init.normal_(self.head.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ shapes and config

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, primitive types only (the enum as its value); ``aligned`` only when
        set (files written before the option read the same)."""
        cfg: dict[str, Any] = {
            "channels": list(self.channels),
            "cond_channels": list(self.cond_channels),
            "latent_channels": self.latent_channels,
            "output": self.output.value,
            "integration_steps": self.integration_steps,
            "in_channels": self.in_channels,
        }
        if self.aligned:
            cfg["aligned"] = True
        return cfg

    def check_grid(self, grid: Sequence[int]) -> tuple[int, int, int]:
        """Return ``grid`` as a 3-tuple; ValueError unless each size is a positive multiple of 2^L."""
        grid = tuple(int(n) for n in grid)
        f = 2 ** self.num_levels
        if len(grid) != 3 or any(n < f or n % f for n in grid):
            raise ValueError(f"grid {grid} must have three sizes divisible by 2^{self.num_levels} = {f}")
        return grid  # type: ignore[return-value]

    def latent_shape(self, grid: Sequence[int]) -> tuple[int, int, int, int]:
        """(latent_channels, I/2^L, J/2^L, K/2^L) for an (I, J, K) grid (no batch axis)."""
        grid = self.check_grid(grid)
        f = 2 ** self.num_levels
        return (self.latent_channels, *(n // f for n in grid))

    def _check_inputs(self, es: torch.Tensor, feats: Sequence[torch.Tensor],
                      flow: torch.Tensor | None = None) -> None:
        if es.dim() != 5 or es.shape[1] != self.in_channels:
            raise ValueError(f"es must be (B,{self.in_channels},I,J,K), got {tuple(es.shape)}")
        grid = self.check_grid(es.shape[2:])
        if flow is not None and (flow.dim() != 5 or flow.shape[1] != 3 or tuple(flow.shape[2:]) != grid
                                 or flow.shape[0] != es.shape[0]):
            raise ValueError(f"flow must be (B,3,I,J,K) matching es {tuple(es.shape)}, got {tuple(flow.shape)}")
        if len(feats) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} pyramid levels, got {len(feats)}")
        for lvl, f in enumerate(feats):
            want = (es.shape[0], self.cond_channels[lvl], *(n // 2 ** (lvl + 1) for n in grid))
            if tuple(f.shape) != want:
                raise ValueError(f"pyramid level {lvl}: expected {want}, got {tuple(f.shape)}")

    # ------------------------------------------------------------------ encoder / decoder

    def encode(self, flow: torch.Tensor, es: torch.Tensor,
               feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z | flow, ES): (mu, logvar), each (B, latent_channels, I/2^L, J/2^L, K/2^L).

        Args:
            flow: (B, 3, I, J, K) pull displacement, voxels.
            es: (B, in_channels, I, J, K) ES image.
            feats: frozen pyramid features of ``es``, finest first.
        """
        self._check_inputs(es, feats, flow)
        x = torch.cat([flow, es.to(flow.dtype)], dim=1)
        for level, cond in zip(self.encoder, feats):
            x = level(x, cond)
        mu = self.mu_head(x)
        logvar = LOGVAR_BOUND * torch.tanh(self.logvar_head(x) / LOGVAR_BOUND)
        return mu, logvar

    def decode(self, z: torch.Tensor, es: torch.Tensor, feats: Sequence[torch.Tensor],
               integrate: bool = True) -> torch.Tensor:
        """p(flow | z, ES): z (B, latent_channels, I/2^L, J/2^L, K/2^L) → flow (B, 3, I, J, K) voxels.

        For ``output='velocity'`` the head's stationary velocity is integrated (scaling and
        squaring, ``integration_steps``) and the displacement exp(v) is returned; with
        ``integrate=False`` the velocity v itself (the motion's path is exp(t·v), t ∈ [0, 1]).
        """
        self._check_inputs(es, feats)
        want = (es.shape[0], *self.latent_shape(es.shape[2:]))
        if tuple(z.shape) != want:
            raise ValueError(f"z must be {want}, got {tuple(z.shape)}")
        x = self.bottom(torch.cat([z, feats[-1].to(z.dtype)], dim=1))
        conds = list(feats[:-1])[::-1] + [es]  # grids /2^(L-1), …, /2, full
        for level, cond in zip(self.decoder, conds):
            x = level(x, cond)
        out = self.head(x)
        if self.output is OutputKind.VELOCITY and integrate:
            # Integrate in fp32 even under autocast: the squaring compounds rounding errors.
            out = integrate_velocity(out.float(), steps=self.integration_steps)
        return out

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + exp(logvar / 2) · ε, ε ~ N(0, I) (drawn from ``generator`` if given)."""
        eps = _randn(mu.shape, mu, generator)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, flow: torch.Tensor, es: torch.Tensor, feats: Sequence[torch.Tensor],
                sample: bool | None = None, generator: torch.Generator | None = None) -> CVAEOutput:
        """Posterior reconstruction: encode (flow, ES), draw z, decode.

        Args:
            flow: (B, 3, I, J, K) pull displacement, voxels.
            es: (B, in_channels, I, J, K) ES image.
            feats: frozen pyramid features of ``es``, finest first.
            sample: draw z by reparameterisation (True) or use z = mu (False); default: draw in
                train mode, mu in eval mode.
            generator: optional torch.Generator for ε.

        Returns:
            :class:`CVAEOutput` (flow (B, 3, I, J, K) voxels, mu, logvar, z).
        """
        mu, logvar = self.encode(flow, es, feats)
        draw = self.training if sample is None else bool(sample)
        z = self.reparameterize(mu, logvar, generator) if draw else mu
        return CVAEOutput(self.decode(z, es, feats), mu, logvar, z)

    @torch.no_grad()
    def sample_latent(self, es: torch.Tensor, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, temperature² · I), shape (B, latent_channels, I/2^L, J/2^L, K/2^L) for ``es``."""
        shape = (es.shape[0], *self.latent_shape(es.shape[2:]))
        return float(temperature) * _randn(shape, self.mu_head.weight, generator)

    def sample(self, es: torch.Tensor, feats: Sequence[torch.Tensor], temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Prior sample: z ~ N(0, T²·I) at the latent grid, decoded to a flow (B, 3, I, J, K) voxels.

        With a ``generator`` the draw depends only on its state (ε is drawn on the generator's
        device and moved to the model's), so a seed gives the same z on CPU and GPU.
        """
        z = self.sample_latent(es, temperature, generator)
        return self.decode(z, es, feats)

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> Path:
        """Write config + weights atomically (kind ``motion_cvae``); read back with :meth:`load`."""
        return save_checkpoint(path, CVAE_KIND, self.config(), self)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> "MotionCVAE":
        """Rebuild a model from a file written by :meth:`save` (``weights_only=True``)."""
        ckpt = load_checkpoint(path, CVAE_KIND, map_location)
        model = cls(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model


def _randn(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise with ``like``'s device and dtype, drawn from ``generator`` if given."""
    if generator is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    eps = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return to_device(eps, like.device, like.dtype)


__all__ = ["CVAEOutput", "CVAE_KIND", "MotionCVAE", "OutputKind"]
