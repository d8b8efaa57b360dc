"""3D PWC-Net of the annotation stage: pyramid, warping, cost volume, coarse-to-fine flow.

``PWCNet3D()(fixed, moving)`` with fixed = ED and moving = ES returns the pull field u on the
fixed grid with fixed(x) ≈ moving(x + u(x)), i.e. ``warp(moving, u) ≈ fixed`` (docs/design.md).

Flows are (B, 3, I, J, K) in voxels of the grid they live on, channel c along array axis c. A
level's flow is in voxels of that level's grid; moving between grids uses the voxel-centre
convention (coarse voxel i covers fine voxels [f·i, f·i + f)): trilinear resize with
``align_corners=False`` and vectors multiplied by the size ratio, exactly ×2 per level for grids
divisible by 2^levels. The same convention (area averaging) is what
:func:`cardiomotion.train.losses.pwc_unsupervised_loss` uses to bring images to a level's grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flow.warp import warp
from ..transfer import small_tensor
from .costvolume import CostVolume
from .pyramid import FeaturePyramid, conv3, load_checkpoint, save_checkpoint

PWCNET_KIND = "pwcnet3d"


def resize_flow(flow: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a flow (B, 3, i, j, k) to grid ``size`` and rescale its vectors (voxel units).

    Voxel-centre convention (``align_corners=False``); vectors along axis c are multiplied by
    size[c] / i_c, so a ×2 upsampling doubles them exactly.
    """
    size = tuple(int(n) for n in size)
    old = tuple(flow.shape[2:])
    if old == size:
        return flow
    out = F.interpolate(flow, size=size, mode="trilinear", align_corners=False)
    scale = small_tensor([n / o for n, o in zip(size, old)], flow)
    return out * scale.view(1, 3, 1, 1, 1)


def _zero_init(conv: nn.Conv3d) -> nn.Conv3d:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class FlowEstimator(nn.Module):
    """Per-level decoder: [cost, f1, upsampled flow] → hidden features → residual flow (voxels).

    The last conv is zero-initialised, so an untrained estimator predicts a zero residual.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in hidden:
            layers += [conv3(prev, ch), nn.LeakyReLU(0.1, inplace=True)]
            prev = ch
        self.body = nn.Sequential(*layers)
        self.out_channels = prev
        self.head = _zero_init(conv3(prev, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in_channels, I, J, K) → (residual flow (B, 3, I, J, K), hidden (B, hidden[-1], ...))."""
        h = self.body(x)
        return self.head(h), h


class ContextNetwork(nn.Module):
    """Dilated-conv refinement on the finest processed level: [hidden, flow] → residual flow.

    Dilations 1, 2, 4, 8, … (one per hidden layer), then a zero-initialised conv3 to 3 channels.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(hidden):
            layers += [conv3(prev, ch, dilation=2 ** i), nn.LeakyReLU(0.1, inplace=True)]
            prev = ch
        layers.append(_zero_init(conv3(prev, 3)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PWCOutput(NamedTuple):
    """What :class:`PWCNet3D` returns.

    flow: (B, 3, I, J, K) pull field on the input (fixed) grid, in input voxels.
    levels: per processed pyramid level, coarse → fine, (B, 3, i_l, j_l, k_l) flows in voxels of
        that level's grid (the finest one includes the context refinement).
    """

    flow: torch.Tensor
    levels: list[torch.Tensor]


class PWCNet3D(nn.Module):
    """3D PWC-Net (Sun et al. 2018) for unsupervised ED←ES flow.

    Args:
        channels: feature pyramid channels, finest first; the input grid should be divisible by
            2^len(channels) (others work, with rounding between levels).
        search_range: cost volume search radius r in voxels of every level's grid.
        estimator_channels: hidden widths of each level's flow estimator.
        context: add the dilated context network on the finest processed level.
        cost_chunk: offsets per chunk in the cost volume (memory bound; None = all).
        finest_level: finest pyramid level that is decoded (0 = 1/2 grid, as in the original
            PWC-Net's 1/4 output at 1); the final flow is upsampled from it.
        context_channels: hidden widths of the context network (default: estimator_channels).
        in_channels: image channels (1).
        aligned: the pyramid halves with coarse voxel i centred at fine 2i + 0.5, the convention of
            :func:`resize_flow` and of the loss's area pooling (:class:`~.pyramid.AlignedDown`).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 96),
        search_range: int = 2,
        estimator_channels: Sequence[int] = (64, 48, 32),
        context: bool = True,
        cost_chunk: int | None = 25,
        finest_level: int = 0,
        context_channels: Sequence[int] | None = None,
        in_channels: int = 1,
        aligned: bool = False,
    ):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.aligned = bool(aligned)
        self.search_range = int(search_range)
        self.estimator_channels = tuple(int(c) for c in estimator_channels)
        self.use_context = bool(context)
        self.cost_chunk = None if cost_chunk is None else int(cost_chunk)
        self.finest_level = int(finest_level)
        self.context_channels = (self.estimator_channels if context_channels is None
                                 else tuple(int(c) for c in context_channels))
        self.in_channels = int(in_channels)
        if not 0 <= self.finest_level < len(self.channels):
            raise ValueError(f"finest_level {finest_level} outside 0..{len(self.channels) - 1}")
        if not self.estimator_channels:
            raise ValueError("estimator_channels must not be empty")

        self.pyramid = FeaturePyramid(self.in_channels, self.channels, aligned=self.aligned)
        self.cost = CostVolume(self.search_range, self.cost_chunk)
        n_cost = self.cost.out_channels
        # One estimator per decoded level, stored finest first (index = pyramid level).
        self.estimators = nn.ModuleList(
            FlowEstimator(n_cost + ch + 3, self.estimator_channels) if lvl >= self.finest_level
            else nn.Identity()
            for lvl, ch in enumerate(self.channels)
        )
        self.context = (ContextNetwork(self.estimator_channels[-1] + 3, self.context_channels)
                        if self.use_context else None)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types only): ``PWCNet3D(**net.config())`` rebuilds it.
        ``aligned`` appears only when set (files written before the option read the same)."""
        cfg: dict[str, Any] = {
            "channels": list(self.channels),
            "search_range": self.search_range,
            "estimator_channels": list(self.estimator_channels),
            "context": self.use_context,
            "cost_chunk": self.cost_chunk,
            "finest_level": self.finest_level,
            "context_channels": list(self.context_channels),
            "in_channels": self.in_channels,
        }
        if self.aligned:
            cfg["aligned"] = True
        return cfg

    @property
    def divisor(self) -> int:
        """Grid sizes divisible by this give exact ×2 relations between all levels."""
        return 2 ** len(self.channels)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> PWCOutput:
        """Estimate the pull field u with fixed(x) ≈ moving(x + u(x)).

        Args:
            fixed: (B, 1, I, J, K) ED volume, intensities scaled to about [0, 1].
            moving: (B, 1, I, J, K) ES volume on the same grid.

        Returns:
            :class:`PWCOutput` (flow on the input grid in input voxels, per-level flows coarse → fine).
        """
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ")
        b = fixed.shape[0]
        # One pyramid pass on both frames (shared weights).
        feats = self.pyramid(torch.cat([fixed, moving], dim=0))
        levels: list[torch.Tensor] = []
        flow: torch.Tensor | None = None
        hidden: torch.Tensor | None = None
        for lvl in range(len(self.channels) - 1, self.finest_level - 1, -1):
            f1, f2 = feats[lvl][:b], feats[lvl][b:]
            if flow is None:
                flow = f1.new_zeros((b, 3, *f1.shape[2:]))
                f2w = f2
            else:
                flow = resize_flow(flow, f1.shape[2:])
                f2w = warp(f2, flow)
            cost = F.leaky_relu(self.cost(f1, f2w), 0.1)
            residual, hidden = self.estimators[lvl](torch.cat([cost, f1, flow], dim=1))
            flow = flow + residual
            if lvl == self.finest_level and self.context is not None:
                flow = flow + self.context(torch.cat([hidden, flow], dim=1))
            levels.append(flow)
        assert flow is not None
        return PWCOutput(flow=resize_flow(flow, fixed.shape[2:]), levels=levels)

    def save(self, path: str | Path) -> Path:
        """Write config + weights atomically; :meth:`load` rebuilds the model from the file alone."""
        return save_checkpoint(path, PWCNET_KIND, self.config(), self)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> "PWCNet3D":
        """Rebuild a model from a file written by :meth:`save` (``torch.load(weights_only=True)``)."""
        ckpt = load_checkpoint(path, PWCNET_KIND, map_location)
        model = cls(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model
