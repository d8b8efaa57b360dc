"""Pictures people would rather look at than read: orthogonal slices of volumes and flows.

Display convention (radiological): axial and coronal views show the patient's right on the
image's left; axial has anterior at the top; coronal and sagittal have superior at the top;
sagittal has anterior on the left. Inputs are canonical RAS arrays (I, J, K).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

VIEWS = ("axial", "coronal", "sagittal")


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    from ..fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **({"dpi": dpi} if dpi else {}))
    pyplot().close(fig)
    return path


def orthogonal_slice(vol: np.ndarray, view: str, center: Sequence[int]) -> np.ndarray:
    """The 2-D slice of a RAS volume (I, J, K) for a view, oriented for display (rows, cols)."""
    i, j, k = (int(c) for c in center)
    if view == "axial":
        sl = vol[:, :, k]  # (I: R→, J: A→)
    elif view == "coronal":
        sl = vol[:, j, :]  # (I, K)
    elif view == "sagittal":
        sl = vol[i, :, :]  # (J, K)
    else:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return sl.T[::-1, ::-1]


def view_aspect(view: str, spacing: Sequence[float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def plot_orthogonal(
    rows: Sequence[tuple[str, np.ndarray]],
    path: str | Path,
    *,
    center: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window: tuple[float, float] = (-250.0, 550.0),
    title: str | None = None,
    cmaps: Sequence[str] | None = None,
    windows: Sequence[tuple[float, float] | None] | None = None,
) -> Path:
    """Save a PNG grid: one row per volume, columns axial / coronal / sagittal.

    Args:
        rows: (label, volume (I, J, K)) pairs in canonical RAS order, same grid.
        center: voxel the three planes pass through (default: grid centre).
        spacing: voxel size (mm) for correct aspect ratios.
        window: display window (HU) for rows without their own entry in ``windows``.
    """
    plt = pyplot()
    shape = rows[0][1].shape
    center = center if center is not None else [n // 2 for n in shape]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.0 * len(rows) + 0.4), squeeze=False)
    for r, (label, vol) in enumerate(rows):
        win = (windows[r] if windows and windows[r] is not None else window)
        cmap = cmaps[r] if cmaps else "gray"
        for c, view in enumerate(VIEWS):
            ax = axes[r, c]
            im = ax.imshow(orthogonal_slice(vol, view, center), cmap=cmap, vmin=win[0], vmax=win[1],
                           aspect=view_aspect(view, spacing), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view)
            if c == 0:
                ax.set_ylabel(label)
        fig.colorbar(im, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def plot_pair(
    es: np.ndarray,
    ed: np.ndarray,
    path: str | Path,
    *,
    flow: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    center: Sequence[int] | None = None,
) -> Path:
    """ES, ED, |ED − ES| and (optionally) the flow magnitude (mm) in orthogonal slices."""
    rows: list[tuple[str, np.ndarray]] = [("ES", es), ("ED", ed), ("|ED - ES| (HU)", np.abs(ed - es))]
    windows: list[tuple[float, float] | None] = [None, None, (0.0, 300.0)]
    cmaps = ["gray", "gray", "magma"]
    if flow is not None:
        mag = np.sqrt(((flow * np.asarray(spacing, float)[:, None, None, None]) ** 2).sum(0))
        rows.append(("|u| (mm)", mag))
        windows.append((0.0, float(max(mag.max(), 1e-3))))
        cmaps.append("viridis")
    return plot_orthogonal(rows, path, spacing=spacing, title=title, cmaps=cmaps, windows=windows, center=center)


def plot_phantom_preview(folder: str | Path) -> Path:
    """``<patient>/preview.png``: ES, ED, |ED − ES| and the true flow magnitude through the LV."""
    import json

    import nibabel as nib

    from ..flow.io import read_flow
    from ..layout import PHANTOM_CT, PHANTOM_LABELS, PHANTOM_META, PHANTOM_PREVIEW, PHANTOM_TRUTH_FLOW

    folder = Path(folder)
    meta = json.loads((folder / PHANTOM_META).read_text())
    ct = nib.load(str(folder / PHANTOM_CT))
    es = np.asarray(ct.dataobj[..., meta["es_phase"]], dtype=np.float32)
    ed = np.asarray(ct.dataobj[..., meta["ed_phase"]], dtype=np.float32)
    labels = np.asarray(nib.load(str(folder / PHANTOM_LABELS)).dataobj[..., meta["ed_phase"]])
    flow, _ = read_flow(folder / PHANTOM_TRUTH_FLOW)
    center = np.argwhere(labels == 1).mean(0).astype(int).tolist() if (labels == 1).any() else None
    s = float(meta["spacing_mm"])
    return plot_pair(es, ed, folder / PHANTOM_PREVIEW, flow=flow, spacing=(s, s, s), center=center,
                     title=f"{meta['patient_id']}: ES (phase {meta['es_phase']}), ED (phase {meta['ed_phase']}), "
                           f"EF {100 * meta['ef_measured']:.0f} %")


def plot_error_comparison(errors: dict[str, Sequence[float]], path: str | Path, ylabel: str,
                          title: str = "") -> Path:
    """Box plot with every scan's value drawn over it, one box per method (in dict order).

    Args:
        errors: method name → per-scan errors (e.g. myocardium EPE in mm); the same scans in
            each, so a line joins the values of one scan across methods.
        path: output PNG (written atomically).
    """
    plt = pyplot()
    names = list(errors)
    values = [np.asarray(errors[n], dtype=float) for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 4.0), dpi=120)
    ax.boxplot(values, showfliers=False, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1), names)
    n = min(len(v) for v in values)
    if n and all(len(v) == n for v in values):
        ax.plot(np.arange(1, len(names) + 1), np.stack(values)[:, :n], color="0.6", lw=0.5, alpha=0.5)
    for x, v in enumerate(values, start=1):
        ax.scatter(np.full(len(v), x), v, s=8, alpha=0.7, zorder=3)
        ax.annotate(f"{v.mean():.2f}", (x, float(v.max())), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ef_histogram(sample_ef: Sequence[float], cohort_ef: Sequence[float], path: str | Path, *,
                      truth_ef: float | None = None, title: str = "") -> Path:
    """Histogram of the synthetic-ED ejection fractions of one ES frame's prior samples (%) over
    the cohort's true EFs (shaded), with the held-out scan's own EF as a line.

    Args:
        sample_ef, cohort_ef: fractions (0.6 = 60 %).
        path: output PNG (written atomically).
    """
    plt = pyplot()
    s = 100 * np.asarray(sample_ef, dtype=float)
    c = 100 * np.asarray(cohort_ef, dtype=float)
    both = np.concatenate([s[np.isfinite(s)], c[np.isfinite(c)]]) if len(s) + len(c) else np.zeros(1)
    lo, hi = float(np.floor(both.min() - 2)), float(np.ceil(both.max() + 2))
    bins = np.linspace(lo, hi, 25)
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=120)
    if len(c):
        ax.hist(c, bins=bins, density=True, color="0.75", label=f"cohort truth (n={len(c)})")
    if len(s):
        ax.hist(s, bins=bins, density=True, histtype="step", lw=2, color="C0", label=f"prior samples (K={len(s)})")
    if truth_ef is not None and np.isfinite(truth_ef):
        ax.axvline(100 * truth_ef, color="C3", lw=1.5, ls="--", label="held-out scan truth")
    ax.set_xlabel("ejection fraction of the (synthetic) ED (%)")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
