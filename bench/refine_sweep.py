"""Choose ``annotate``'s refinement settings by measurement: EPE and motion magnitude against the truth.

Every downstream arm inherits the annotations' error (README, "Downstream utility"): the delivered
flows under-state myocardial motion, and the corpus's generator is fitted to them. This bench
refines the prepared pairs of a phantom cohort (exact truth per scan) from zero flow — exactly as
``annotate`` does with ``refine_start: zero``, so no network is involved — under each setting of a
grid (``--sigma``, ``--smooth-weight``, ``--steps``, ``--lr``, ``--levels``, ``--similarity``,
``--edge-weight``, ``--support-mm``, ``--support-mode``, ``--volume-weight``: comma lists; every combination), and reports per setting, over the scans: EPE in
the ED myocardium, the heart, the RV wall, the whole grid and the tissue more than ``FAR_MM`` from
the heart (mm); ``magnitude_myo`` (mean ‖u‖ / mean ‖truth‖ in the myocardium, 1 = as
much motion as the truth); the refinement's own image term (MSE of the unit-window frames, what it
minimises — no truth needed); folding; seconds per pair; with a support (``--support-mm`` > 0,
``annotate.refine_support_mm``) its reach: the share of the grid it lets move
(``support_share``) and its mean weight over the heart (``support_heart``, 1 = all of the heart free).

One JSON line per (setting, scan) is appended to ``--out`` as it finishes (a rerun skips what the
file already holds: it resumes); the summary (JSON on stdout) gives the mean and standard deviation
per setting, sorted by myocardium EPE; ``--figure PNG`` draws every setting the file holds for the
selected scans against the smoothness weight. ``--scans`` picks scans by id or index range (``8-19``):
choose scans that the evaluation using these annotations does not score on, e.g. not the held-out
scans of the utility folds.

    python bench/refine_sweep.py --prepared P --config S --scans 8-19 --sigma 2,3,4 \\
        --smooth-weight 0,0.001,0.01 --out sweep.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

GRID = ("sigma", "smooth_weight", "steps", "lr", "levels", "similarity", "edge_weight", "window", "support_mm",
        "support_mode", "blood_hu", "alpha", "volume_weight", "tissue_hu")
#: settings added after rows were first written: a row without one was made at this value
#: (``window``: the intensity window in HU the refinement saw, the config's — the default then;
#: ``blood_hu``: the blood range the support grew from, ``prepare.blood_hu`` — likewise; ``alpha``: the
#: SSIM share of ``ssim_l1``, ``annotate.ssim_alpha`` — likewise; ``volume_weight``: no incompressibility
#: term, ``tissue_hu``: the range of the tissue it would hold, the config's)
ADDED = {"edge_weight": 0.0, "window": [-200.0, 800.0], "support_mm": 0.0, "support_mode": None,
         "blood_hu": [200.0, 800.0], "alpha": 0.85, "volume_weight": 0.0, "tissue_hu": [0.0, 200.0]}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def settings_grid(args: argparse.Namespace) -> list[dict]:
    """Every combination of the comma lists, as dicts over :data:`GRID` (``args.window``: a list of
    [low, high] HU windows)."""
    lists = [args.sigma, args.smooth_weight, args.steps, args.lr, args.levels, args.similarity, args.edge_weight,
             args.window, args.support_mm, args.support_mode, args.blood_hu, args.alpha, args.volume_weight,
             args.tissue_hu]
    return [dict(zip(GRID, combo)) for combo in itertools.product(*lists)]


def setting_key(s: dict) -> str:
    """The setting as a canonical string (a key :data:`ADDED` lists and the row lacks: its value
    then; without a support its mode and blood range are no setting: None, nor without the
    incompressibility term the tissue range)."""
    full = {k: s[k] if k in s else ADDED[k] for k in GRID}
    if not full["support_mm"]:
        full["support_mode"] = full["blood_hu"] = None
    if not full["volume_weight"]:
        full["tissue_hu"] = None
    return json.dumps(full, sort_keys=True)


def select_scans(ids: list[str], spec: str | None) -> list[str]:
    """``spec``: None (all), or what ``cv --folds`` takes — scan ids, indices, ranges ``a-b``
    (:func:`cardiomotion.train.sweep.resolve_folds`; an unknown one raises its InputError)."""
    from cardiomotion.train.sweep import resolve_folds

    return [ids[k] for k in resolve_folds(spec, ids, where="--scans")]


#: "far": voxels more than this far from the heart (mm) — at the default intensity window mostly
#: clipped lung and air, with no texture to anchor the flow; the truth barely moves there
FAR_MM = 30.0


def score(u: np.ndarray, truth: np.ndarray, spacing_mm: float, labels: np.ndarray | None) -> dict:
    """EPE (mm) over the grid, the heart, the myocardium, the RV wall (``rv_wall``: the tissue a
    support grown from the blood pool may miss when the right heart is not opacified) and the tissue
    ``FAR_MM`` from the heart, magnitude ratios (mean ‖u‖ / mean ‖truth‖) in each, and folding — the
    measures of ``annotate``'s quality table (:func:`cardiomotion.flow.metrics.truth_scores` over
    :func:`cardiomotion.data.phantom.region_masks`) plus the RV wall and the far region. ``u``,
    ``truth``: (3, I, J, K) pull flows in voxels."""
    from scipy.ndimage import distance_transform_edt

    from cardiomotion.data.phantom import RV_WALL, region_masks
    from cardiomotion.flow.metrics import truth_scores

    masks = None
    if labels is not None:
        masks = {**region_masks(labels), "rv_wall": np.asarray(labels) == RV_WALL}
        if masks["heart"].any():  # without a heart there is no distance to it
            masks["far"] = distance_transform_edt(~masks["heart"], sampling=spacing_mm) > FAR_MM
    return truth_scores(u, truth, spacing_mm, masks)


def refinement(setting: dict):
    """``setting`` as :class:`cardiomotion.annotate.stage.Refinement` — what ``annotate`` runs
    with a config holding these values (every refinement setting is in :data:`GRID`). A sweep may
    measure settings the config refuses (a ``tissue_hu`` band reaching into ``blood_hu`` with the
    volume term on): they are measured here, not refused."""
    from cardiomotion.annotate.stage import Refinement
    from cardiomotion.choices import Similarity, SupportMode

    full = {k: setting.get(k, ADDED.get(k)) for k in GRID}
    blood = full["blood_hu"] or (0.0, 0.0)  # no blood range: no support (:func:`setting_key`'s normal form)
    tissue = full["tissue_hu"] or ADDED["tissue_hu"]
    r = Refinement(steps=int(full["steps"]), lr=float(full["lr"]), smooth_weight=float(full["smooth_weight"]),
                   similarity=Similarity(full["similarity"]), alpha=float(full["alpha"]), sigma=float(full["sigma"]),
                   levels=int(full["levels"]), edge_weight=float(full["edge_weight"]),
                   support_mm=float(full["support_mm"] or 0.0),
                   support_mode=SupportMode(full["support_mode"] or SupportMode.MASK.value),
                   blood_hu=(float(blood[0]), float(blood[1])), volume_weight=float(full["volume_weight"]),
                   tissue_hu=(float(tissue[0]), float(tissue[1])))
    return r if r.support_mm else r.without_support()


def refine_scan(pair, setting: dict, cache: dict | None = None) -> dict:
    """Refine one pair from zero flow under ``setting`` exactly as ``annotate`` does
    (:func:`cardiomotion.annotate.stage.refine_pair`; a support from the setting's ``blood_hu``)
    and score it. ``cache`` (one pair's, filled here): the refinements made, so the ``mask`` mode
    weights one already made instead of making it again (its ``seconds``, the refinement's alone,
    are then the first run's)."""
    import torch

    from cardiomotion.annotate.stage import refine_pair
    from cardiomotion.data.phantom import region_masks
    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.flow.warp import warp

    window = tuple(setting.get("window", ADDED["window"]))
    fixed = torch.from_numpy(hu_to_unit(pair.ed, window))[None, None]
    moving = torch.from_numpy(hu_to_unit(pair.es, window))[None, None]
    r = refinement(setting)
    made = ({} if cache is None else cache).setdefault(window, {})  # the frames differ by window: so do the refinements
    out = refine_pair(pair, fixed, moving, torch.zeros((1, 3, *fixed.shape[2:])), r, made)
    extra = {}
    if r.support_mm:
        extra["support_share"] = out.share
        heart = region_masks(pair.ed_labels)["heart"] if pair.ed_labels is not None else None
        if heart is not None and heart.any():  # no voxel in the blood range: all of the heart free (weight 1)
            extra["support_heart"] = 1.0 if out.support is None else float(out.support[0, 0].numpy()[heart].mean())
    u = out.flow
    with torch.no_grad():
        mse = float((fixed - warp(moving, u)).pow(2).mean())
    return {**score(u[0].numpy(), pair.truth_flow, pair.spacing_mm, pair.ed_labels), "image_mse": mse,
            "seconds": out.seconds, **extra}


def summarize(rows: list[dict]) -> list[dict]:
    """Per setting: mean and sd of every score over its scans, best myocardium EPE first."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(setting_key(r["setting"]), []).append(r)
    out = []
    for key, rs in groups.items():
        entry: dict = {"setting": json.loads(key), "scans": len(rs)}
        for metric in ("epe_myo_mm", "epe_heart_mm", "epe_rv_wall_mm", "epe_mm", "epe_far_mm", "magnitude_myo",
                       "magnitude_heart", "magnitude_rv_wall",
                       "magnitude_far", "image_mse", "folding", "seconds", "support_share", "support_heart"):
            v = np.asarray([r[metric] for r in rs if r.get(metric) is not None], dtype=np.float64)
            if v.size == len(rs):  # a metric some rows lack (written before it was scored) is left out
                entry[metric] = float(v.mean())
                entry[f"{metric}_sd"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
        out.append(entry)
    return sorted(out, key=lambda e: e.get("epe_myo_mm", e.get("epe_mm", np.inf)))


def sweep_figure(summary: list[dict], path: Path, scans: int) -> Path:
    """Panels against the smoothness weight (symlog axis): myocardium, heart and whole-grid EPE, EPE
    far from the heart when the rows hold it (mm) and ``magnitude_myo``; one line per combination of
    the other settings; written atomically."""
    from cardiomotion.evaluate.figures import pyplot, save_figure

    plt = pyplot()
    varying = [k for k in GRID if k != "smooth_weight" and len({json.dumps(e["setting"][k]) for e in summary}) > 1]
    fixed = {k: summary[0]["setting"][k] for k in GRID if k != "smooth_weight" and k not in varying}
    lines: dict[str, list[dict]] = {}
    for e in summary:  # one line per combination of the settings that vary; the fixed ones in the title
        lines.setdefault(", ".join(f"{k} {e['setting'][k]}" for k in varying) or "refinement", []).append(e)
    panels = [("epe_myo_mm", "myocardium EPE (mm)"), ("epe_heart_mm", "heart EPE (mm)"),
              ("epe_mm", "whole-grid EPE (mm)"), ("magnitude_myo", "myocardial motion / truth's")]
    if any("epe_far_mm" in e for e in summary):  # rows written before the far region was scored lack it
        panels.insert(3, ("epe_far_mm", f"EPE > {FAR_MM:.0f} mm from the heart (mm)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.75 * len(panels), 3.8))
    weights = sorted({e["setting"]["smooth_weight"] for e in summary})
    positive = [w for w in weights if w > 0]
    for ax, (metric, label) in zip(axes, panels):
        for name, es in sorted(lines.items()):
            es = sorted((e for e in es if metric in e), key=lambda e: e["setting"]["smooth_weight"])
            if es:
                ax.plot([e["setting"]["smooth_weight"] for e in es], [e[metric] for e in es], marker="o", ms=4,
                        label=name if len(es) > 1 else f"{name} (one weight)")
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        if metric == "magnitude_myo":
            ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xlabel("smoothness weight")
        ax.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(f"annotate's refinement from zero flow against the exact truth, mean over {scans} scans "
                 f"({', '.join(f'{k} {v}' for k, v in fixed.items())})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, help="prepared phantom cohort (exact truth per scan)")
    ap.add_argument("--config", default=None, help="config file (its intensity window and refine defaults)")
    ap.add_argument("--scans", default=None, help="scan ids / indices / ranges, comma-separated (default: all)")
    ap.add_argument("--sigma", type=_floats, default=None, help="Gaussian std of the correction, voxels")
    ap.add_argument("--smooth-weight", type=_floats, default=None, help="first-order smoothness weight")
    ap.add_argument("--steps", type=_ints, default=None, help="Adam steps per level")
    ap.add_argument("--lr", type=_floats, default=None, help="Adam step (voxels)")
    ap.add_argument("--levels", type=_ints, default=None, help="coarse-to-fine levels")
    ap.add_argument("--similarity", default=None, help="mse and/or ssim_l1")
    ap.add_argument("--edge-weight", type=_floats, default=None, help="edge-aware smoothness λ (0: plain)")
    ap.add_argument("--support-mm", type=_floats, default=None,
                    help="the heart's region: this distance (mm) from the blood pool (0: whole volume)")
    ap.add_argument("--support-mode", default=None, help="mask and/or confine (annotate.refine_support_mode)")
    ap.add_argument("--volume-weight", type=_floats, default=None,
                    help="incompressibility weight λ over the ED soft tissue (annotate.refine_volume_weight; 0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", required=True, help="JSON-lines file, one row per (setting, scan); appended, resumed")
    ap.add_argument("--figure", default=None, help="PNG: every setting of --out on the selected scans against the smoothness weight")
    args = ap.parse_args(argv)

    import torch

    from cardiomotion.choices import Similarity, SupportMode
    from cardiomotion.config import load_config
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.errors import InputError
    from cardiomotion.fileio import append_json_lines, read_json_lines

    cfg = load_config(args.config)
    ac = cfg.annotate
    args.sigma = args.sigma or [ac.refine_sigma]
    args.smooth_weight = args.smooth_weight if args.smooth_weight is not None else [ac.refine_smooth_weight]
    args.steps = args.steps or [ac.refine_steps]
    args.lr = args.lr or [ac.refine_lr]
    args.levels = args.levels or [ac.refine_levels]
    args.edge_weight = args.edge_weight if args.edge_weight is not None else [ac.refine_edge_weight]
    args.support_mm = args.support_mm if args.support_mm is not None else [ac.refine_support_mm]
    args.support_mode = ([SupportMode(v.strip()).value for v in args.support_mode.split(",")] if args.support_mode
                         else [ac.refine_support_mode.value])
    args.volume_weight = args.volume_weight if args.volume_weight is not None else [ac.refine_volume_weight]
    if any(v < 0 for v in args.support_mm + args.volume_weight):
        print(f"refine_sweep: --support-mm and --volume-weight must be 0 (off) or positive, got "
              f"{args.support_mm} and {args.volume_weight}", file=sys.stderr)
        return 2
    args.similarity = ([Similarity(v.strip()).value for v in args.similarity.split(",")] if args.similarity
                       else [ac.refine_similarity.value])
    torch.set_num_threads(args.threads)

    table = read_scan_table(args.prepared)
    rows_by_id = {str(r["scan_id"]): r for _, r in table.iterrows()}
    try:
        scans = select_scans(sorted(rows_by_id), args.scans)
        # a run killed mid-append leaves a truncated last line: dropped (and remade), not a crash
        done = read_json_lines(args.out, log=lambda m: print(f"refine_sweep: {m}", file=sys.stderr))
    except InputError as exc:
        print(f"refine_sweep: {exc}", file=sys.stderr)
        return 2
    if not all(isinstance(rows_by_id[s].get("truth_flow_path"), str) and rows_by_id[s]["truth_flow_path"]
               for s in scans):
        raise SystemExit(f"{args.prepared}: a selected scan has no exact truth flow (a phantom cohort has one per scan)")
    have = {(setting_key(r["setting"]), r["scan"]) for r in done}
    window = [float(v) for v in cfg.intensity.window]
    args.window = [window]
    args.blood_hu = [[float(v) for v in cfg.prepare.blood_hu]]
    args.alpha = [float(ac.ssim_alpha)]
    args.tissue_hu = [[float(v) for v in ac.refine_tissue_hu]]
    settings = settings_grid(args)
    for scan in scans:
        pair, cache = None, {}
        for s in settings:
            if (setting_key(s), scan) in have:
                continue
            pair = pair or load_pair(args.prepared, rows_by_id[scan])
            row = {"scan": scan, "setting": s, **refine_scan(pair, s, cache)}
            append_json_lines(args.out, [row])
            done.append(row)
            have.add((setting_key(s), scan))  # a grid with a 0 margin names the same setting once per mode
            print(f"{scan} {setting_key(s)}: EPE myo {row.get('epe_myo_mm', float('nan')):.3f} mm, "
                  f"magnitude {row.get('magnitude_myo', float('nan')):.3f} ({row['seconds']:.1f} s)",
                  file=sys.stderr)
    chosen = {setting_key(s) for s in settings}
    mine = [r for r in done if setting_key(r["setting"]) in chosen and r["scan"] in set(scans)]
    result = {"prepared": str(args.prepared), "scans": scans, "window_hu": window,
              "blood_hu": [float(v) for v in cfg.prepare.blood_hu], "summary": summarize(mine)}
    if args.figure:  # every setting the file holds for these scans, not only this invocation's
        result["figure"] = str(sweep_figure(summarize([r for r in done if r["scan"] in set(scans)]),
                                            Path(args.figure), len(scans)))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
