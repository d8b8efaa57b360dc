"""How networks see HU: clipped to a window and scaled to [0, 1]."""
from __future__ import annotations

import numpy as np
import torch


def hu_to_unit(vol, window: tuple[float, float]):
    """Clip HU to ``window`` = (low, high) and scale to [0, 1]; numpy or torch, any shape."""
    lo, hi = float(window[0]), float(window[1])
    if isinstance(vol, torch.Tensor):
        return ((vol - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((np.asarray(vol, np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def unit_to_hu(vol, window: tuple[float, float]):
    """Inverse of :func:`hu_to_unit` inside the window."""
    lo, hi = float(window[0]), float(window[1])
    return vol * (hi - lo) + lo
