"""PWC-Net style 3D feature pyramid, reusable on its own (the CVAE conditions on its frozen output).

Each level halves the grid: a stride-2 convolution + LeakyReLU(0.1) + conv3 + LeakyReLU(0.1). For an
input (B, in_channels, I, J, K) level l (0 = finest) has shape (B, channels[l], I/2^(l+1), J/2^(l+1),
K/2^(l+1)) when the grid is divisible by 2^levels (otherwise each halving rounds up).

Where a coarse voxel sits (docs/design.md, "Grids between levels"): the rest of the project uses the
voxel-centre convention, coarse voxel i at fine position 2i + 0.5 (area pooling, trilinear resizing
with ``align_corners=False``). A 3×3×3 stride-2 convolution (padding 1) centres output i on fine
voxel 2i, half a fine voxel off that convention at every halving (1.5 fine voxels at the 1/4 grid).
``aligned=True`` halves with a 4×4×4 stride-2 convolution (padding 1) instead, centred on 2i + 0.5.

Checkpoints are plain dicts ``{"kind", "config", "state_dict"}`` with only tensors and primitive
types inside, so ``torch.load(path, weights_only=True)`` reads them and the module is rebuilt from
the file alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fileio import atomic_path

PYRAMID_KIND = "feature_pyramid"


def conv3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    """3×3×3 convolution that keeps the grid (stride 1) or halves it (stride 2, rounding up)."""
    return nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=dilation, dilation=dilation)


class AlignedDown(nn.Module):
    """Halve the grid with output voxel i centred on input position 2i + 0.5 (voxel-centre convention).

    A 4×4×4 convolution, stride 2, padding 1: output i sees inputs 2i − 1 … 2i + 2. An odd size is
    first padded by one replicated voxel at its far end, so each halving rounds up like :func:`conv3`.
    (B, in_ch, I, J, K) → (B, out_ch, ⌈I/2⌉, ⌈J/2⌉, ⌈K/2⌉).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        odd = [n % 2 for n in x.shape[2:]]
        if any(odd):
            x = F.pad(x, (0, odd[2], 0, odd[1], 0, odd[0]), mode="replicate")
        return self.conv(x)


def downsample(in_ch: int, out_ch: int, aligned: bool = False) -> nn.Module:
    """The grid-halving convolution: :func:`conv3` stride 2 (output i at fine 2i), or
    :class:`AlignedDown` (output i at fine 2i + 0.5, the voxel-centre convention) when ``aligned``."""
    return AlignedDown(in_ch, out_ch) if aligned else conv3(in_ch, out_ch, stride=2)


def save_checkpoint(path: str | Path, kind: str, config: dict[str, Any], module: nn.Module) -> Path:
    """Write ``{"kind", "config", "state_dict"}`` atomically (temp sibling, then os.replace);
    the same module writes the same bytes wherever and whenever it is saved.

    The state dict is moved to CPU so the file loads on a machine without the training device.
    """
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    ckpt = {"kind": kind, "config": config, "state_dict": state}
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # through a file object: torch names the archive "archive", not after the (random)
        # temporary file, so the same weights always give the same bytes and sha256
        torch.save(ckpt, fh)
    return path


def load_weights(source: Any, map_location: Any = "cpu") -> Any:
    """``torch.load(source, weights_only=True)`` (a path, file object or BytesIO), without torch's
    warning about the pickle protocol.

    Raises:
        ValueError: the file holds more than tensors and plain types (the unpickler refused it),
            saying what it refused — not torch's advice to load it with ``weights_only=False``,
            the wrong advice for a file of unknown origin.
    """
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if found := re.search(r"unsupported GLOBAL (\S+)", text):
            what = f"the global {found.group(1)}"
        elif found := re.search(r"Unsupported operand \d+", text):
            what = found.group(0).lower()
        else:
            what = "an object weights_only does not allow"
        raise ValueError(f"holds more than tensors and plain types ({what}): refused unread; a checkpoint "
                         "written by cardiomotion holds nothing else") from None


def load_checkpoint(path: Any, kind: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``) from a path or
    a file object (its bytes in a BytesIO); check its kind (the message names a path, not a file object)."""
    named = isinstance(path, (str, Path))
    ckpt = load_weights(Path(path) if named else path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{f'{path}: ' if named else ''}not a {kind} checkpoint (kind={found!r})")
    return ckpt


class FeaturePyramid(nn.Module):
    """Shared-weight feature extractor of the 3D PWC-Net.

    Args:
        in_channels: channels of the input volume (1 for CT scaled to [0, 1]).
        channels: output channels per level, finest first; ``len(channels)`` levels.
        aligned: halve with :class:`AlignedDown` (coarse voxel i at fine 2i + 0.5) instead of a
            3×3×3 stride-2 convolution (at fine 2i); see the module docstring.

    ``forward(x)`` with x (B, in_channels, I, J, K) returns a list of ``len(channels)`` tensors,
    finest first: level l is (B, channels[l], I/2^(l+1), J/2^(l+1), K/2^(l+1)).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 96, 128),
                 aligned: bool = False):
        super().__init__()
        if len(channels) < 1:
            raise ValueError("FeaturePyramid needs at least one level")
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        self.aligned = bool(aligned)
        levels = []
        prev = self.in_channels
        for ch in self.channels:
            levels.append(nn.Sequential(
                downsample(prev, ch, self.aligned), nn.LeakyReLU(0.1, inplace=True),
                conv3(ch, ch), nn.LeakyReLU(0.1, inplace=True),
            ))
            prev = ch
        self.levels = nn.ModuleList(levels)

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types only); ``aligned`` only when set, so a file written
        before the option existed and one written now with the default are the same."""
        cfg: dict[str, Any] = {"in_channels": self.in_channels, "channels": list(self.channels)}
        if self.aligned:
            cfg["aligned"] = True
        return cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, in_channels, I, J, K) → [level 0 (finest, 1/2 grid), ..., coarsest (1/2^L grid)]."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"FeaturePyramid expects (B,{self.in_channels},I,J,K), got {tuple(x.shape)}")
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats

    def save(self, path: str | Path) -> Path:
        """Write the pyramid (config + weights) atomically; read back with :meth:`load`."""
        return save_checkpoint(path, PYRAMID_KIND, self.config(), self)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> "FeaturePyramid":
        """Rebuild a pyramid from a file written by :meth:`save` (``weights_only=True``)."""
        ckpt = load_checkpoint(path, PYRAMID_KIND, map_location)
        model = cls(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model
