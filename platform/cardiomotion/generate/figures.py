"""Figures of generated samples: previews, the ES→ED transition GIF, the latent-traversal mosaic."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..evaluate.figures import VIEWS, orthogonal_slice

HU_WINDOW = (-250.0, 550.0)


def plot_sample(sample: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """ES, ED_syn, |ED_syn − ES| and |u| (mm) of a corpus sample in orthogonal slices."""
    from ..evaluate.figures import plot_pair

    s = float(sample["meta"]["spacing_mm"])
    return plot_pair(sample["es"].astype(np.float32), sample["ed_syn"].astype(np.float32), path,
                     flow=sample["flow"].astype(np.float32), spacing=(s, s, s),
                     title=title or f"sample {sample['index']} ({sample['scan_id']}): ES, ED_syn, generated flow")


def _to_uint8(img: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _frame(vol: np.ndarray, center: Sequence[int], window, scale: int) -> np.ndarray:
    views = [_to_uint8(np.ascontiguousarray(orthogonal_slice(vol, v, center)), window) for v in VIEWS]
    h = max(v.shape[0] for v in views)
    pad = [np.pad(v, ((0, h - v.shape[0]), (0, 2)), constant_values=0) for v in views]
    img = np.concatenate(pad, axis=1)
    return np.kron(img, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else img


def transition_gif(es_hu: np.ndarray, flow_vox: np.ndarray, path: str | Path, frames: int = 12,
                   window: tuple[float, float] = HU_WINDOW, center: Sequence[int] | None = None,
                   duration_ms: int = 120, velocity: np.ndarray | None = None) -> Path:
    """Animated GIF of ES → ED for t = 0 … 1 (and back), axial/coronal/sagittal: warp(ES, t·u)
    for a displacement model, warp(ES, exp(t·v)) when the sample's stationary ``velocity`` v is
    given (a velocity model's actual path; exp(v) is its flow ``flow_vox``).

    ``es_hu`` (I, J, K), ``flow_vox`` and ``velocity`` (3, I, J, K) voxels (pull convention).
    """
    from PIL import Image, ImageDraw

    from ..fileio import atomic_path
    from ..flow.ops import exp
    from ..flow.warp import warp

    es = torch.from_numpy(np.asarray(es_hu, dtype=np.float32))[None, None]
    u = torch.from_numpy(np.asarray(flow_vox, dtype=np.float32))[None]
    center = list(center) if center is not None else [n // 2 for n in es.shape[2:]]
    scale = max(1, int(np.ceil(160 / max(es.shape[2:]))))
    ts = np.linspace(0.0, 1.0, max(2, int(frames)))
    images = []
    v = None if velocity is None else torch.from_numpy(np.asarray(velocity, dtype=np.float32))[None]
    if v is not None and v.shape != u.shape:
        raise ValueError(f"velocity {tuple(v.shape[1:])} and flow {tuple(u.shape[1:])} differ in shape")
    with torch.no_grad():
        for t in ts:
            field = float(t) * u if v is None else (u if t == 1.0 else exp(v, float(t)))
            vol = warp(es, field)[0, 0].numpy()
            img = Image.fromarray(_frame(vol, center, window, scale), mode="L")
            canvas = Image.new("L", (img.width, img.height + 16), 0)
            canvas.paste(img, (0, 16))
            ImageDraw.Draw(canvas).text((4, 2), f"t = {t:.2f}  ES -> ED_syn   (axial, coronal, sagittal)", fill=255)
            images.append(canvas)
    seq = images + images[-2:0:-1]  # there and back: a seamless loop
    path = Path(path)
    with atomic_path(path) as tmp:
        seq[0].save(tmp, format="GIF", save_all=True, append_images=seq[1:], duration=duration_ms, loop=0)
    return path


def plot_traversal(es_hu: np.ndarray, flows: torch.Tensor | np.ndarray, alphas: Sequence[float], path: str | Path,
                   spacing_mm: float = 1.0, view: str = "coronal", center: Sequence[int] | None = None,
                   window: tuple[float, float] = HU_WINDOW, title: str | None = None,
                   labels: Sequence[str] | None = None) -> Path:
    """Mosaic of a latent traversal: per direction a row of ED_syn = warp(ES, u(α)) and a row of
    |u(α)| (mm), one column per α (``flows`` (D, A, 3, I, J, K) voxels from
    :func:`~cardiomotion.generate.traversal.latent_traversal`)."""
    from ..evaluate.figures import view_aspect, pyplot, save_figure
    from ..flow.warp import warp

    plt = pyplot()
    flows = torch.as_tensor(flows, dtype=torch.float32)
    d, a = flows.shape[:2]
    es = torch.from_numpy(np.asarray(es_hu, dtype=np.float32))[None, None]
    center = list(center) if center is not None else [n // 2 for n in es.shape[2:]]
    with torch.no_grad():
        eds = warp(es, flows.reshape(-1, *flows.shape[2:])).reshape(d, a, *es.shape[2:]).numpy()
    mags = (flows.norm(dim=2) * spacing_mm).numpy()
    hi = float(max(mags.max(), 1e-3)) if mags.size else 1.0
    asp = view_aspect(view, (spacing_mm,) * 3)
    fig, axes = plt.subplots(2 * d, a, figsize=(1.9 * a + 0.6, 1.9 * 2 * d + 0.5), squeeze=False)
    for r in range(d):
        name = labels[r] if labels else f"direction {r}"
        for c in range(a):
            for row, (vol, cmap, vmin, vmax) in enumerate(((eds[r, c], "gray", *window),
                                                           (mags[r, c], "viridis", 0.0, hi))):
                ax = axes[2 * r + row, c]
                im = ax.imshow(orthogonal_slice(vol, view, center), cmap=cmap, vmin=vmin, vmax=vmax,
                               aspect=asp, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and row == 0:
                    ax.set_title(f"α = {alphas[c]:+.2f}")
                if c == 0:
                    ax.set_ylabel(f"{name}\n{'ED_syn' if row == 0 else '|u| mm'}", fontsize=8)
            if c == a - 1:
                fig.colorbar(im, ax=axes[2 * r + 1, :].tolist(), fraction=0.02, pad=0.01)
    fig.suptitle(title or f"latent traversal ({view})")
    return save_figure(fig, path, dpi=100)
