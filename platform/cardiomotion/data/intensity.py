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


#: HU: a chest CT in HU has lung or air below it (lung ~-850 to -500, air -1000) in at least
#: :data:`AIR_FRACTION` of its voxels; data stored without its rescale (HU + 1024, "0 origin")
#: has none: its air reads about 0, its lung 200-500, inside ``prepare.blood_hu``'s default range
AIR_HU = -200.0
#: the fraction of a volume's voxels below :data:`AIR_HU` expected of a chest CT in HU
AIR_FRACTION = 0.01


def hu_note(vol: np.ndarray, blood_hu: tuple[float, float]) -> str | None:
    """A note when ``vol`` (any shape, assumed HU) does not look like HU: fewer than
    :data:`AIR_FRACTION` of its voxels below :data:`AIR_HU`, i.e. no air or lung. Either the
    values are stored without their rescale (HU + 1024; air would read ~0, lung 200-500, inside a
    ``blood_hu`` range) or the volume is a crop without lung; None when it looks like HU."""
    sample = np.asarray(vol)[tuple(slice(None, None, max(1, n // 48)) for n in np.shape(vol))]  # ~48 per axis
    if sample.size == 0 or float(np.mean(sample < AIR_HU)) >= AIR_FRACTION:
        return None
    low, mid = (float(v) for v in np.percentile(sample, [1, 50]))
    return (f"intensities do not look like HU: no air or lung (1st percentile {low:.0f}, median {mid:.0f}; "
            f"a chest CT in HU has some below {AIR_HU:.0f}). If the values are stored without their "
            f"rescale (HU + 1024), lung falls in the blood range {list(blood_hu)} and the crop and ES/ED "
            "follow it: convert to HU (subtract 1024); a volume cropped to the heart, without lung, is fine")
