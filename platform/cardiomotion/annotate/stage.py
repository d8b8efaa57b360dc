"""``annotate``: ground-truth ED←ES flows for every prepared pair, and the frozen pyramid.

1. Train the 3D PWC-Net unsupervised on all prepared (ED, ES) pairs (Ray Train), unless the
   output folder already holds the trained model (a rerun resumes).
2. For every scan (Ray Data, parallel): predict the pull flow, optionally refine it per pair,
   write ``OUT/<scan_id>/flow.nii.gz`` (intent 1006, RAS mm, ED grid) and its quality figures.
3. Write ``OUT/annotations.parquet`` and log everything to one MLflow run: parameters,
   training curves, the table, summary figures, the PWC-Net (artifact ``model``) and the frozen
   feature pyramid (artifact ``feature_pyramid``), each a state_dict + config file loaded with
   ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ..choices import Similarity, SupportMode
from ..config import AnnotateConfig, Config
from ..errors import CardiomotionError, InputError
from ..fileio import atomic_dir, atomic_path, write_json
from ..layout import ANNOTATION_QUALITY as QUALITY_FILE, ANNOTATION_TABLE as TABLE, FLOW_FILE, PWCNET_FILE as MODEL_FILE
from ..layout import ANNOTATE_TRAIN_DIR, ANNOTATION_SETTINGS, ANNOTATION_SUMMARY, FOLD_PYRAMID_RECORD, PYRAMID_FILE
from ..layout import SCAN_TABLE, annotation_figure_name

Log = Callable[[str], None]


def check_prepared(prepared_dir: Path, cfg: Config) -> list[dict]:
    """Validate a prepared dataset before any Ray work (and before the run records what it was made
    from); returns its rows. Every volume is read whole: a truncated file has a readable header.

    Raises:
        InputError: missing table or files, an unreadable or truncated volume, ES/ED grids that differ, a grid the networks cannot
            take, or grids that differ between scans.
    """
    from ..data.table import read_scan_table

    rows = read_scan_table(prepared_dir).to_dict("records")
    if not rows:
        raise InputError(prepared_dir / SCAN_TABLE, "scan table is empty")
    divisor = 2 ** len(cfg.annotate.pwc.channels)
    first_shape = None
    for row in rows:
        headers = {}
        for key in ("es_path", "ed_path"):
            path = prepared_dir / row[key]
            try:
                img = nib.load(str(path))
                np.asarray(img.dataobj)  # the voxels too: a truncated file has a whole header
            except Exception as exc:
                raise InputError(path, f"unreadable prepared volume ({exc.__class__.__name__}: {exc})") from None
            headers[key] = (tuple(img.shape), img.affine)
        (es_shape, es_aff), (ed_shape, ed_aff) = headers["es_path"], headers["ed_path"]
        if es_shape != ed_shape or not np.allclose(es_aff, ed_aff, atol=1e-4):
            raise InputError(prepared_dir / row["ed_path"], f"ED grid {ed_shape} differs from ES grid {es_shape}")
        if any(n % divisor for n in ed_shape):
            raise InputError(prepared_dir / row["ed_path"], f"grid {ed_shape} is not divisible by {divisor} "
                             f"(2^levels of annotate.pwc.channels); prepare with such a grid")
        if first_shape is None:
            first_shape = ed_shape
        elif ed_shape != first_shape:
            raise InputError(prepared_dir / row["ed_path"], f"grid {ed_shape} differs from the other scans' {first_shape}")
    return rows


def _quality(pair, fixed, moving, flows: dict[str, torch.Tensor], alpha: float) -> dict:
    """Photometric error, folding and (with a truth flow) EPE of each candidate flow, and its
    magnitude against the truth's in the heart and the myocardium (``magnitude_myo_<name>``:
    mean ‖u‖ / mean ‖truth‖; below 1 the flow under-states the motion)."""
    from ..data.phantom import region_masks
    from ..flow.metrics import folding_fraction, truth_scores
    from ..flow.warp import warp
    from ..train.losses import photometric_loss

    q: dict[str, float] = {}
    masks = region_masks(pair.ed_labels) if pair.ed_labels is not None else {}
    for name, u in flows.items():
        with torch.no_grad():
            q[f"photometric_{name}"] = float(photometric_loss(fixed, warp(moving, u), alpha=alpha))
        scores = (truth_scores(u[0].numpy(), pair.truth_flow, pair.spacing_mm, masks) if pair.truth_flow is not None
                  else {"folding": folding_fraction(u[0])})
        if name == "zero":  # zero flow neither folds nor moves
            scores = {**{k: v for k, v in scores.items() if not k.startswith("magnitude_")}, "folding": 0.0}
        q.update({f"{k}_{name}": v for k, v in scores.items()})
    return q


def _unusable_model(out: Path) -> str | None:
    """Why the trained PWC-Net in ``out`` cannot be reused (missing, truncated or unreadable
    network or frozen pyramid), or None when both load. A killed run, a full disk or a copy cut
    short leaves such files; a rerun then trains again instead of failing on them."""
    from ..models.pwcnet import PWCNet3D
    from ..models.pyramid import FeaturePyramid

    for name, cls in ((MODEL_FILE, PWCNet3D), (PYRAMID_FILE, FeaturePyramid)):
        path = out / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            cls.load(path)
        except Exception as exc:
            return f"{path} is unreadable ({exc.__class__.__name__})"
    return None


def annotation_settings(cfg: Config) -> dict:
    """What an annotation folder's network and flows depend on besides the prepared set (which
    ``prepared.sha256`` pins): the seed, the intensity window and every ``annotate`` setting but
    where the network trains (workers, resources) and how often it checkpoints."""
    out = {"seed": cfg.seed, "intensity": cfg.intensity.model_dump(mode="json"),
           "annotate": _refinement_normal_form(_trained_with(cfg))}
    if cfg.annotate.refine and cfg.annotate.refine_support_mm:  # the support grows from prepare's blood range
        out["support_blood_hu"] = [float(v) for v in cfg.prepare.blood_hu]
    return out


def _refinement_normal_form(annotate: dict) -> dict:
    """``annotate`` settings (today's, or a record's) with the refinement keys that change nothing
    at fixed values: without refinement every refinement key but ``refine`` at its default; without
    a support its mode; without the volume term its tissue range."""
    a = dict(annotate)
    defaults = AnnotateConfig().model_dump(mode="json")
    if not a.get("refine", True):
        return {**a, **{k: defaults[k] for k in REFINEMENT_KEYS if k != "refine"}}
    if not a.get("refine_support_mm"):
        a["refine_support_mode"] = defaults["refine_support_mode"]
    if not a.get("refine_volume_weight"):
        a["refine_tissue_hu"] = defaults["refine_tissue_hu"]
    return a


#: ``annotate`` settings a record written before the key existed was made at, where that is not
#: the key's default today (the support was off before stop 40, the volume term before stop 46)
RECORDED_BEFORE = {"refine_support_mm": 0.0, "refine_volume_weight": 0.0}


def check_settings(out: Path, cfg: Config) -> dict | None:
    """The resume guard of an annotation folder, before any work.

    Returns the settings to record before training starts, or None when nothing is to be written:
    the folder's ``settings.json`` already holds these settings, or the folder predates the record
    and holds a finished network (reused unchecked, as before records were kept). A key the record
    lacks (added to ``annotate`` after it was written) matches when it is at its default — or, for
    :data:`RECORDED_BEFORE`'s keys, at the value records were made at before it.

    Raises:
        InputError: ``settings.json`` records other settings (named by their first difference; when
            only the refinement's differ and the folder holds a trained network, the message says
            how to reuse it), or
            is unreadable; or ``ray_train/`` holds an interrupted training beside no record (its
            settings unknown: it is neither resumed nor thrown away unasked).
    """
    from ..train.sweep import first_difference, refuse_other_settings

    record = out / ANNOTATION_SETTINGS
    settings = annotation_settings(cfg)
    if record.is_file():
        recorded = recorded_settings(record, settings)
        if isinstance(recorded, dict) and recorded != settings and network_part(recorded) == network_part(settings) \
                and _unusable_model(out) is None:  # a trained network there to reuse
            raise InputError(record, f"this annotation was made with other refinement settings "
                                     f"({first_difference(recorded, settings)}): rerun it with the same ones, or "
                                     f"annotate into another --out with --network {out} to reuse its trained network")
        refuse_other_settings(record, recorded, settings, "annotation")
        return None
    if _unusable_model(out) is None:
        return None
    if (out / ANNOTATE_TRAIN_DIR).exists():
        raise InputError(out / ANNOTATE_TRAIN_DIR, "holds an interrupted training with no settings record (started "
                                                   "before records were kept), so it cannot be resumed safely; "
                                                   "remove this folder to train from the start")
    return settings


def recorded_settings(record: Path, settings: dict):
    """An annotation folder's ``settings.json`` as it compares with ``settings`` (today's
    :func:`annotation_settings`): :data:`RECORDED_BEFORE`'s keys filled with the values records
    were made at before them, any other key the record lacks filled where ``settings`` holds
    its default, and the refinement keys that changed nothing at fixed values
    (:func:`_refinement_normal_form`: a folder annotated without refinement before a refinement
    key existed is the same folder whatever that key is today).

    Raises:
        InputError: the record is unreadable.
    """
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(record, f"unreadable settings record ({exc.__class__.__name__}); restore it, or rewrite "
                                 "it with the settings this folder was annotated with (its MLflow run's "
                                 "parameters)") from None
    if isinstance(recorded, dict) and isinstance(recorded.get("annotate"), dict):
        recorded = {**recorded, "annotate": {**RECORDED_BEFORE, **recorded["annotate"]}}
    recorded = _with_defaults(recorded, settings, annotation_settings(Config()))
    if isinstance(recorded, dict) and isinstance(recorded.get("annotate"), dict):
        recorded = {**recorded, "annotate": _refinement_normal_form(recorded["annotate"])}
    return recorded


def network_part(settings: dict) -> dict:
    """An annotation settings record (:func:`annotation_settings`) less what only the per-pair
    refinement reads (:data:`REFINEMENT_KEYS` and the support's blood range): what the trained
    PWC-Net and its frozen pyramid depend on."""
    return {"seed": settings.get("seed"), "intensity": settings.get("intensity"),
            "annotate": pyramid_part(settings.get("annotate") or {})}


def check_network_source(source: str | Path, out: Path, cfg: Config, prepared_id: str) -> Path:
    """The annotation folder whose trained network ``annotate --network`` reuses, checked before
    any work: it must hold a usable PWC-Net and pyramid made from the same prepared set (its
    ``prepared.sha256``) with the same network settings — the seed, the intensity window and
    every ``annotate`` key but the refinement's — so the network copied is the one ``annotate``
    would train here, and only the per-pair refinement is made again. Returns its resolved path.

    Raises:
        InputError: ``source`` is the output folder, holds no usable network, has no settings or
            prepared-set record (made before records were kept: what it was trained with is
            unknown), annotated another prepared set, or recorded other network settings (the
            first difference named).
    """
    from ..data.table import PREPARED_ID_FILE
    from ..train.sweep import first_difference

    src = Path(source).resolve()
    if src == out:
        raise InputError(src, "--network names the output folder itself; name another annotation folder")
    if (why := _unusable_model(src)) is not None:
        raise InputError(src, f"holds no trained network to reuse ({why})")
    for name in (PREPARED_ID_FILE, ANNOTATION_SETTINGS):
        if not (src / name).is_file():
            raise InputError(src / name, "is missing (an annotation made before records were kept): what its "
                                         "network was trained on is unknown, so it is not reused")
    if (src / PREPARED_ID_FILE).read_text().strip() != prepared_id:
        raise InputError(src / PREPARED_ID_FILE, "its network was trained on another prepared set than this one "
                                                 "(content differs)")
    settings = annotation_settings(cfg)
    recorded = recorded_settings(src / ANNOTATION_SETTINGS, settings)
    if not isinstance(recorded, dict) or network_part(recorded) != network_part(settings):
        diff = first_difference(network_part(recorded) if isinstance(recorded, dict) else recorded,
                                network_part(settings))
        raise InputError(src / ANNOTATION_SETTINGS, f"its network was trained with other settings ({diff}); "
                                                    "--network reuses a network only when the refinement's "
                                                    "settings (annotate.refine*) alone differ")
    return src


def copy_network(src: Path, out: Path) -> None:
    """Copy the trained PWC-Net and frozen pyramid of ``src`` into ``out``, each atomically, the
    network last (its presence marks a finished training, as after :func:`train_pwcnet`)."""
    import shutil

    for name in (PYRAMID_FILE, MODEL_FILE):
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src / name, tmp)


def _with_defaults(recorded, current, defaults):
    """``recorded`` with every key it lacks filled from ``current`` where ``current`` holds the
    key's default (nested dicts alike): a setting added after the record was written."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return recorded
    out = dict(recorded)
    for k, v in current.items():
        d = defaults.get(k) if isinstance(defaults, dict) else None
        if k not in out:
            if v == d:
                out[k] = v
        else:
            out[k] = _with_defaults(out[k], v, d)
    return out


@dataclass(frozen=True)
class Refinement:
    """The settings of one per-pair refinement (:func:`~cardiomotion.annotate.refine.refine_flow`'s
    arguments, ``annotate.refine_*``) and of its support: ``support_mm`` (0: none), its mode and
    the blood range in HU it grows from; the incompressibility term's weight and the HU range of
    the tissue it holds. Hashable: a key for refinements already made."""

    steps: int
    lr: float
    smooth_weight: float
    similarity: Similarity
    alpha: float
    sigma: float
    levels: int
    edge_weight: float
    support_mm: float
    support_mode: SupportMode
    blood_hu: tuple[float, float]
    volume_weight: float
    tissue_hu: tuple[float, float]

    @classmethod
    def from_config(cls, cfg: Config) -> Refinement:
        ac = cfg.annotate
        return cls(steps=ac.refine_steps, lr=ac.refine_lr, smooth_weight=ac.refine_smooth_weight,
                   similarity=ac.refine_similarity, alpha=ac.ssim_alpha, sigma=ac.refine_sigma,
                   levels=ac.refine_levels, edge_weight=ac.refine_edge_weight, support_mm=ac.refine_support_mm,
                   support_mode=ac.refine_support_mode,
                   blood_hu=(float(cfg.prepare.blood_hu[0]), float(cfg.prepare.blood_hu[1])),
                   volume_weight=ac.refine_volume_weight,
                   tissue_hu=(float(ac.refine_tissue_hu[0]), float(ac.refine_tissue_hu[1])))

    def without_support(self) -> Refinement:
        """The same refinement over the whole grid (the support's mode and blood range then mean
        nothing and are set to fixed values: one key per plain refinement)."""
        return replace(self, support_mm=0.0, support_mode=SupportMode.MASK, blood_hu=(0.0, 0.0))


@dataclass(frozen=True)
class Refined:
    """One pair's delivered flow: ``flow`` (1, 3, I, J, K) pull flow in voxels; ``support``
    (1, 1, I, J, K) weight in [0, 1] or None (no support asked for, or no voxel in the blood range);
    ``share`` the share of the grid the support reaches (None without one asked for, 1.0 when no
    voxel is in the blood range: the whole volume is refined); ``seconds`` the refinement's own
    time (not the support's; a refinement reused from ``made`` reports the run that made it)."""

    flow: torch.Tensor
    support: torch.Tensor | None
    share: float | None
    seconds: float


def pair_support(pair, refinement: Refinement) -> tuple[torch.Tensor | None, float | None]:
    """The support of ``refinement`` for ``pair`` (its HU frames) as (1, 1, I, J, K) and the
    share of the grid it reaches (weight > 0); (None, None) with ``support_mm`` 0, and (None, 1.0)
    when neither frame has a voxel in the blood range."""
    from .support import motion_support

    if not refinement.support_mm:
        return None, None
    weight = motion_support(pair.es, pair.ed, pair.spacing_mm, refinement.blood_hu, refinement.support_mm)
    if weight is None:
        return None, 1.0
    return torch.from_numpy(weight)[None, None], float((weight > 0).mean())


def pair_tissue(pair, refinement: Refinement) -> torch.Tensor | None:
    """The soft tissue the incompressibility term holds for ``pair``: (1, 1, I, J, K) float, 1
    where the ED frame's HU lies in ``tissue_hu``; None without the term (``volume_weight`` 0) or
    when no voxel lies in the range."""
    if not refinement.volume_weight:
        return None
    low, high = refinement.tissue_hu
    tissue = (pair.ed >= low) & (pair.ed <= high)
    if not tissue.any():
        return None
    return torch.from_numpy(tissue.astype(np.float32))[None, None]


def refine_pair(pair, fixed: torch.Tensor, moving: torch.Tensor, start: torch.Tensor, refinement: Refinement,
                made: dict[Refinement, tuple[torch.Tensor, float]] | None = None) -> Refined:
    """``annotate``'s delivered flow for one pair: the refinement from ``start``, with a support
    (``support_mm`` > 0) either weighting the delivered flow (``mask``) or the refinement's
    correction (``confine``).

    Args:
        pair: the prepared pair (its HU frames make the support).
        fixed, moving: (1, 1, I, J, K) ED and ES in [0, 1].
        start: (1, 3, I, J, K) pull flow in voxels to start from.
        made: plain refinements of this pair from this ``start`` and these frames with their
            seconds, by :meth:`Refinement.without_support`: ``mask`` weights one found there
            instead of making it again, and a plain refinement made here is added (a sweep over
            margins refines once).
    """
    import time

    from .refine import refine_flow

    support, share = pair_support(pair, refinement)
    confine = support is not None and refinement.support_mode is SupportMode.CONFINE
    plain = refinement.without_support()
    if not confine and made is not None and plain in made:
        flow, seconds = made[plain]
    else:
        r = refinement
        t0 = time.perf_counter()
        flow = refine_flow(fixed, moving, start, steps=r.steps, lr=r.lr, smooth_weight=r.smooth_weight,
                           alpha=r.alpha, similarity=r.similarity, sigma=r.sigma, levels=r.levels,
                           edge_weight=r.edge_weight, support=support if confine else None,
                           volume_weight=r.volume_weight, tissue=pair_tissue(pair, r))
        seconds = time.perf_counter() - t0
        if not confine and made is not None:
            made[plain] = (flow, seconds)
    if support is not None and not confine:
        flow = support.to(flow) * flow
    return Refined(flow, support, share, seconds)


def annotate_scan(row: dict, prepared_dir: str, out_dir: str, model_path: str, cfg_json: str) -> dict:
    """Annotate one prepared pair (a Ray Data task); input errors come back as data."""
    from ..data.intensity import hu_to_unit
    from ..data.table import load_pair
    from ..flow.io import write_flow
    from ..models.pwcnet import PWCNet3D

    cfg = Config.model_validate_json(cfg_json)
    ac = cfg.annotate
    try:
        torch.set_num_threads(1)
        pair = load_pair(prepared_dir, row)
        fixed = torch.from_numpy(hu_to_unit(pair.ed, cfg.intensity.window))[None, None]
        moving = torch.from_numpy(hu_to_unit(pair.es, cfg.intensity.window))[None, None]
        model = PWCNet3D.load(model_path).eval()
        with torch.no_grad():
            net = model(fixed, moving).flow
        flows = {"zero": torch.zeros_like(net), "net": net}
        final = net
        if ac.refine:
            start = torch.zeros_like(net) if ac.refine_start.value == "zero" else net
            refined = refine_pair(pair, fixed, moving, start, Refinement.from_config(cfg))
            final = flows["refined"] = refined.flow
        quality = _quality(pair, fixed, moving, flows, ac.ssim_alpha)
        if ac.refine and ac.refine_support_mm:
            quality["support_share"] = refined.share
        record = {"scan_id": pair.scan_id, "flow_path": f"{pair.scan_id}/{FLOW_FILE}",
                  "refined": bool(ac.refine), "has_truth": pair.truth_flow is not None, **quality}
        with atomic_dir(Path(out_dir) / pair.scan_id) as tmp:
            write_flow(tmp / FLOW_FILE, final[0].numpy(), pair.affine)
            write_json(tmp / QUALITY_FILE, record)
        return {"scan_id": pair.scan_id, "record": json.dumps(record), "error": ""}
    except CardiomotionError as exc:
        return {"scan_id": str(row["scan_id"]), "record": "", "error": str(exc)}


def _final(q: dict, key: str) -> float | None:
    """The delivered annotation's figure: refined when refinement ran, else the network's."""
    for name in ("refined", "net"):
        if f"{key}_{name}" in q:
            return q[f"{key}_{name}"]
    return None


def summarize(df: pd.DataFrame) -> dict[str, float]:
    """Mean figures over scans (zero flow, network, refined, delivered)."""
    out: dict[str, float] = {}
    for col in df.columns:
        if col.startswith(("epe_", "photometric_", "folding_", "magnitude_")) and df[col].notna().any():
            out[f"mean_{col}"] = float(df[col].mean())
    return out


def network_warning(summary: dict[str, float], cfg: Config) -> str | None:
    """A truth-free check of the trained network: its mean photometric loss (``summarize``'s
    ``mean_photometric_net``) above zero flow's means it aligns the pairs worse than not moving
    them — a diverged training (README, "Annotation network: a cosine learning rate"). Says what
    depends on the network under ``cfg``. None when it is better or was not measured."""
    net, zero = summary.get("mean_photometric_net"), summary.get("mean_photometric_zero")
    if net is None or zero is None or not net > zero:
        return None
    a = cfg.annotate
    flows = ("the delivered flows are its predictions" if not a.refine else
             "the delivered flows were refined from its predictions" if a.refine_start.value == "network" else
             "the delivered flows were refined from zero flow and do not depend on it")
    return (f"the PWC-Net's mean photometric loss {net:.4f} is above zero flow's {zero:.4f}: its training "
            f"probably diverged (see pwc_train_loss in MLflow); {flows}; its frozen pyramid conditions "
            f"the CVAE with cv.pyramid: shared")


def support_warning(df: pd.DataFrame) -> str | None:
    """A line naming the scans whose support reached the whole grid (``support_share`` 1: no voxel
    in ``prepare.blood_hu``, or a margin as wide as the crop), whose far field is then not masked;
    None when there are none or no support was asked for."""
    if "support_share" not in df:
        return None
    whole = sorted(str(v) for v in df.loc[df["support_share"] >= 1.0, "scan_id"])
    if not whole:
        return None
    names = ", ".join(whole[:5]) + (f" and {len(whole) - 5} more" if len(whole) > 5 else "")
    return (f"the refinement's support reaches the whole grid of {len(whole)} of {len(df)} scans ({names}): "
            "no voxel in prepare.blood_hu (no contrast?) or a margin as wide as the crop; their flows are "
            "not confined to the heart")


def annotate(prepared_dir: str | Path, out_dir: str | Path, cfg: Config, log: Log = lambda _m: None,
             on_epoch: Callable[[int, float], None] | None = None, network: str | Path | None = None) -> Path:
    """Run the annotation stage; returns the path of ``annotations.parquet``.

    ``on_epoch(epoch, train_loss)`` is called once per finished PWC-Net training epoch (for
    progress bars; the epochs are read back from the MLflow run the workers log to).
    ``network``: an annotation folder of the same prepared set whose trained PWC-Net is copied
    instead of training one (:func:`check_network_source`: its network settings must be these;
    the refinement's may differ) — a change of the refinement annotates again without training.
    """
    from .. import tracking
    from ..data.prepare import plain_rows
    from ..raycluster import init_ray
    from .pwc import train_pwcnet

    prepared = Path(prepared_dir).resolve()
    out = Path(out_dir).resolve()
    rows = check_prepared(prepared, cfg)
    from ..data.table import PREPARED_ID_FILE, check_prepared_identity, prepared_fingerprint

    check_prepared_identity(prepared, out)  # a rerun into annotations of another prepared set
    to_record = check_settings(out, cfg)  # a rerun with other annotate settings
    prepared_id = prepared_fingerprint(prepared)
    source = None if network is None else check_network_source(network, out, cfg, prepared_id)
    done, todo = [], []
    for row in rows:
        scan_dir = out / str(row["scan_id"])
        if (scan_dir / QUALITY_FILE).is_file():
            done.append(row)
        elif scan_dir.exists():  # our writes are atomic: this folder is not ours
            raise InputError(scan_dir, "exists but holds no finished annotation (no quality.json); "
                                       "remove it or choose another --out")
        else:
            todo.append(row)
    uri = tracking.setup(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / PREPARED_ID_FILE).is_file():
        with atomic_path(out / PREPARED_ID_FILE) as tmp:
            tmp.write_text(prepared_id + "\n")
    if to_record is not None:
        write_json(out / ANNOTATION_SETTINGS, to_record)  # before the network trains: what it resumes with
    elif not (out / ANNOTATION_SETTINGS).is_file():
        log(f"annotate: {out} predates settings records: its network is reused unchecked")
    model_path = out / MODEL_FILE
    with tracking.start_run(cfg, "annotate", params={"annotate": cfg.annotate.model_dump(mode="json"),
                                                      "intensity": cfg.intensity.model_dump(mode="json"),
                                                      "prepared": str(prepared), "n_scans": len(rows),
                                                      **({"network_from": str(source)} if source else {})},
                            tags={"stage": "annotate"}) as run:
        unusable = _unusable_model(out)
        copied = bool(unusable) and source is not None
        if copied:
            copy_network(source, out)
            log(f"annotate: reusing the PWC-Net trained in {source} (same prepared set and network settings)")
            unusable = _unusable_model(out)
        if unusable and model_path.exists():
            log(f"annotate: {unusable}: training it again")
        if unusable:
            log(f"annotate: training the PWC-Net on {len(rows)} pairs for {cfg.annotate.epochs} epochs (Ray Train)")
            with tracking.watch_metric(uri, run.info.run_id, "pwc_train_loss", on_epoch):
                model = train_pwcnet(prepared, cfg, storage_path=out / ANNOTATE_TRAIN_DIR, rows=rows,
                                     run_id=run.info.run_id, tracking_uri=uri)
            model.pyramid.save(out / PYRAMID_FILE)
            model.save(model_path)  # written last: its presence marks a finished training
        elif not copied:
            log(f"annotate: reusing the trained PWC-Net {model_path}")
        records = [json.loads((out / str(r["scan_id"]) / QUALITY_FILE).read_text()) for r in done]
        if todo:
            log(f"annotate: {len(todo)} pairs to annotate ({len(done)} done)")
            ray = init_ray(cfg.ray)
            ds = ray.data.from_items(plain_rows(todo), override_num_blocks=len(todo))
            results = ds.map(annotate_scan, fn_kwargs={"prepared_dir": str(prepared), "out_dir": str(out),
                                                       "model_path": str(model_path),
                                                       "cfg_json": cfg.model_dump_json()}, num_cpus=1).take_all()
            errors = sorted((r for r in results if r["error"]), key=lambda r: r["scan_id"])
            if errors:
                raise InputError(None, errors[0]["error"] + (f" ({len(errors) - 1} more)" if len(errors) > 1 else ""))
            records += [json.loads(r["record"]) for r in results]
        df = pd.DataFrame(sorted(records, key=lambda r: r["scan_id"]))
        table = out / TABLE
        with atomic_path(table) as tmp:
            df.to_parquet(tmp, index=False)
        summary = summarize(df)
        if (warning := network_warning(summary, cfg)) is not None:
            log(f"annotate: warning: {warning}")
        if (warning := support_warning(df)) is not None:
            log(f"annotate: warning: {warning}")
        tracking.log_metrics(summary)
        tracking.log_artifact(table)
        tracking.log_checkpoint(model_path, "model")
        tracking.log_checkpoint(out / PYRAMID_FILE, "feature_pyramid")
        fig = _figure(prepared, out, rows[0], cfg)
        tracking.log_artifact(fig, "figures")
        write_json(out / ANNOTATION_SUMMARY, {"run_id": run.info.run_id, "tracking_uri": uri,
                                          "pyramid_uri": f"runs:/{run.info.run_id}/feature_pyramid/{PYRAMID_FILE}",
                                          "model_uri": f"runs:/{run.info.run_id}/model/{MODEL_FILE}", **summary})
    return table


def _figure(prepared: Path, out: Path, row: dict, cfg: Config) -> Path:
    from ..data.table import load_pair
    from ..evaluate.figures import plot_orthogonal
    from ..flow.io import read_flow
    from ..flow.warp import warp

    pair = load_pair(prepared, row)
    flow, _ = read_flow(out / str(row["scan_id"]) / FLOW_FILE)
    warped = warp(torch.from_numpy(pair.es)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    s = pair.spacing_mm
    rows = [("ES", pair.es), ("ED", pair.ed), ("warp(ES, u)", warped),
            ("|ED - warp| (HU)", np.abs(pair.ed - warped)), ("|u| (mm)", np.sqrt((flow**2).sum(0)) * s)]
    windows = [None, None, None, (0.0, 300.0), (0.0, 12.0)]
    cmaps = ["gray", "gray", "gray", "magma", "viridis"]
    if pair.truth_flow is not None:
        rows.append(("|u_true| (mm)", np.sqrt((pair.truth_flow**2).sum(0)) * s))
        rows.append(("|u - u_true| (mm)", np.sqrt(((flow - pair.truth_flow) ** 2).sum(0)) * s))
        windows += [(0.0, 12.0), (0.0, 6.0)]
        cmaps += ["viridis", "magma"]
    center = None
    if pair.ed_labels is not None and (pair.ed_labels == 1).any():
        center = np.argwhere(pair.ed_labels == 1).mean(0).astype(int).tolist()
    return plot_orthogonal(rows, out / "figures" / annotation_figure_name(row['scan_id']), spacing=(s, s, s),
                           windows=windows, cmaps=cmaps, center=center,
                           title=f"{row['scan_id']}: annotation (pull field ED←ES)")


def _trained_with(cfg: Config) -> dict:
    return {k: v for k, v in cfg.annotate.model_dump(mode="json").items()
            if k not in ("num_workers", "resources", "checkpoint_every", "max_failures")}


#: the ``annotate`` settings only the per-pair refinement reads (a pyramid is trained before and
#: without it); named one by one, so a later key that does shape the network is never left out
REFINEMENT_KEYS = ("refine", "refine_start", "refine_steps", "refine_levels", "refine_lr", "refine_similarity",
                   "refine_sigma", "refine_smooth_weight", "refine_edge_weight", "refine_support_mm",
                   "refine_support_mode", "refine_volume_weight", "refine_tissue_hu")


def pyramid_part(settings: dict) -> dict:
    """``annotate`` settings (as :func:`_trained_with` or a record of them holds) less the
    refinement's (:data:`REFINEMENT_KEYS`)."""
    return {k: v for k, v in settings.items() if k not in REFINEMENT_KEYS}


def flows_fingerprint(flows: Path) -> str:
    """Content hash of what an annotation folder gives the stages after it: the bytes of every
    scan's annotated flow (the real arms' labels, the generators' training targets) and of
    annotate's frozen pyramid (what conditions the generators with ``cv.pyramid: shared``); the
    per-fold pyramids trained inside the folder are not part of it."""
    import hashlib

    from ..generate.model import sha256_file

    h = hashlib.sha256()
    for path in sorted(Path(flows).glob(f"*/{FLOW_FILE}")) + [Path(flows) / PYRAMID_FILE]:
        if path.is_file():
            h.update(f"{path.parent.name}/{path.name} {sha256_file(path)}\n".encode())
    return h.hexdigest()


def pyramid_settings(cfg: Config) -> dict:
    """The ``annotate`` settings a trained pyramid depends on: all but where it trains (workers,
    resources), how often it checkpoints and the refinement's (:func:`pyramid_part`);
    ``pwc.aligned`` only when set and ``lr_schedule`` only when not constant (so records written
    before those keys still match the settings they had). Records written with the refinement's
    keys are read through :func:`current_pyramid_record`."""
    out = pyramid_part(_trained_with(cfg))
    if not cfg.annotate.pwc.aligned:
        out["pwc"].pop("aligned", None)
    if cfg.annotate.lr_schedule.value == "constant":
        out.pop("lr_schedule", None)
    return out


def current_pyramid_record(record, key: str):
    """A record holding pyramid settings under ``key`` (a fold pyramid's, a fold generator's, a
    sweep's fingerprint) as it would be written today: settings recorded while a pyramid's
    fingerprint still held the refinement's keys (before stop 40) lose them (:func:`pyramid_part`);
    anything else is returned unchanged."""
    if isinstance(record, dict) and isinstance(record.get(key), dict):
        return {**record, key: pyramid_part(record[key])}
    return record


def train_fold_pyramid(prepared_dir: str | Path, flows_dir: str | Path, held_out_id: str, cfg: Config,
                       log: Log = lambda _m: None) -> Path:
    """The frozen pyramid of a PWC-Net trained on every prepared pair except ``held_out_id``
    (``cv.pyramid: per_fold``): strict leave-one-out, the held-out scan's images never fitted.

    Trained like :func:`annotate`'s network (Ray Train, the same settings and seed), stored in
    ``flows/fold_pyramids/<held_out_id>/feature_pyramid.pt``. A finished pyramid is reused; an
    interrupted training resumes from its checkpoint (its Ray Train run lives beside it).
    Returns the pyramid's path.

    Raises:
        InputError: ``held_out_id`` is not a prepared scan, or the prepared data are unusable.
    """
    import shutil

    from ..fileio import exclusive_lock
    from ..layout import fold_pyramid_path
    from ..models.pyramid import FeaturePyramid
    from .pwc import train_pwcnet

    prepared = Path(prepared_dir).resolve()
    dst = fold_pyramid_path(Path(flows_dir).resolve(), held_out_id)
    made_with = {"prepared": str(prepared), "held_out": str(held_out_id), "seed": cfg.seed,
                 "intensity": cfg.intensity.model_dump(mode="json"), "annotate": pyramid_settings(cfg)}
    record = dst.parent / FOLD_PYRAMID_RECORD
    dst.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dst.parent, "pyramid"):  # one trainer per fold pyramid (cv and a `train --fold` at once)
        if dst.is_file() and record.is_file():
            try:
                found = json.loads(record.read_text())
                same = current_pyramid_record(found, "annotate") == made_with
                FeaturePyramid.load(dst)
                if same:
                    return dst
                log(f"annotate: {dst} was trained with other settings: training it again")
            except Exception:  # a truncated file: train it again (as annotate does)
                log(f"annotate: {dst} is unreadable: training it again")
        shutil.rmtree(dst.parent / ANNOTATE_TRAIN_DIR, ignore_errors=True)  # never resume another setting's checkpoints
        dst.unlink(missing_ok=True)
        rows = check_prepared(prepared, cfg)
        keep = [r for r in rows if str(r["scan_id"]) != str(held_out_id)]
        if len(keep) == len(rows):
            raise InputError(prepared / SCAN_TABLE, f"no scan {held_out_id!r} to hold out")
        log(f"annotate: PWC-Net without {held_out_id} ({len(keep)} pairs, {cfg.annotate.epochs} epochs) "
            "for its fold's pyramid")
        model = train_pwcnet(prepared, cfg, storage_path=dst.parent / ANNOTATE_TRAIN_DIR, name="pwcnet", rows=keep)
        model.pyramid.save(dst)
        write_json(record, made_with)  # written last: a pyramid without it is trained again
    return dst
