"""Resolving a trained CVAE for generation: an MLflow model URI, a model folder or a checkpoint.

A model artifact (written by :func:`cardiomotion.train.cvae.save_model_dir`) is a folder with
``cvae.pt`` (MotionCVAE checkpoint), ``feature_pyramid.pt`` (the frozen pyramid) and
``model.json`` (grid, spacing, intensity window, ...). The generator identifies a model by the
sha256 of ``cvae.pt`` and of ``feature_pyramid.pt``: a corpus records both, and a rerun with
another model is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..config import Config

from ..layout import CVAE_FILE as MODEL_FILE, MODEL_META, PYRAMID_FILE
MODEL_FILES = (MODEL_FILE, PYRAMID_FILE, MODEL_META)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (flat memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on local disk and what identifies it."""

    uri: str  # as the user gave it (runs:/…, models:/…, or an absolute folder path)
    path: Path  # local folder with the three files
    cvae_sha256: str
    pyramid_sha256: str
    meta: dict[str, Any]
    store: str | None = None  # the MLflow tracking URI an MLflow ``uri`` resolved in (None: a folder)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.meta["grid"])  # type: ignore[return-value]

    @property
    def window(self) -> tuple[float, float]:
        return tuple(float(x) for x in self.meta["intensity_window"])  # type: ignore[return-value]

    def blobs(self) -> dict[str, bytes]:
        """The checkpoint bytes (shipped to Ray actors through the object store)."""
        return {"cvae": (self.path / MODEL_FILE).read_bytes(), "pyramid": (self.path / PYRAMID_FILE).read_bytes()}


def _looks_like_uri(s: str) -> bool:
    return "://" in s or s.startswith(("runs:/", "models:/"))


def resolve_model(model: str | Path, cfg: Config) -> ResolvedModel:
    """Find the model artifact named by ``model`` and check it, before any work.

    ``model`` is a model folder (``cvae.pt`` + ``feature_pyramid.pt`` + ``model.json``), the
    path of such a folder's ``cvae.pt``, or an MLflow URI (``runs:/<run_id>/model``,
    ``models:/<name>@<alias>``, ...) resolved in the configured tracking store.

    Raises:
        InputError: it does not resolve, or the folder lacks a file or holds unreadable ones.
    """
    from .. import tracking

    text = str(model)
    store = None
    p = Path(text).expanduser()
    if p.exists():
        path = p.resolve()
        if path.is_file():
            if path.name != MODEL_FILE:
                raise InputError(path, f"not a model: pass the model folder or its {MODEL_FILE}")
            path = path.parent
        uri = str(path)
    elif _looks_like_uri(text):
        try:
            path = tracking.download(text, cfg)
        except tracking.TrackingError as exc:
            raise InputError(text, f"model URI does not resolve ({exc})") from None
        uri, store = text, tracking.tracking_uri(cfg)
    else:
        raise InputError(text, "model does not resolve: no such folder or file, and not an MLflow "
                               "URI (runs:/<run_id>/model, models:/<name>@<alias>)")
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise InputError(path, f"not a model folder: missing {', '.join(missing)} "
                               "(a model artifact of `cardiomotion train`)")
    try:
        meta = json.loads((path / MODEL_META).read_text())
        for key in ("grid", "intensity_window"):
            if key not in meta:
                raise ValueError(f"no {key!r}")
    except ValueError as exc:
        raise InputError(path / MODEL_META, f"unreadable model description ({exc})") from None
    resolved = ResolvedModel(uri, path, sha256_file(path / MODEL_FILE), sha256_file(path / PYRAMID_FILE), meta, store)
    try:
        load_networks(resolved.blobs())
    except CheckpointError as exc:
        raise InputError(path / exc.file, f"unreadable checkpoint ({exc})") from None
    except Exception as exc:
        raise InputError(path, f"unreadable checkpoints ({exc.__class__.__name__}: {exc})") from None
    return resolved


def resolve_corpus_model(manifest: dict[str, Any], model: str | Path | None, cfg: Config) -> ResolvedModel:
    """The model a corpus was made with (``manifest["model"]``), or ``model`` when given: an MLflow
    URI that does not resolve in the configured store is looked up in the store the corpus recorded
    (``model.tracking_uri``: e.g. ``make demo``'s ``demo_output/mlflow.db``, which a later command
    does not configure).

    Raises:
        InputError: as :func:`resolve_model`, naming both stores where both were tried.
    """
    if model is not None:
        return resolve_model(model, cfg)
    from .. import tracking

    uri, recorded = manifest["model"]["uri"], manifest["model"].get("tracking_uri")
    try:
        return resolve_model(uri, cfg)
    except InputError as first:
        if not recorded or not _looks_like_uri(str(uri)) or recorded == tracking.tracking_uri(cfg):
            raise
        try:
            return resolve_model(uri, cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": recorded})}))
        except InputError as second:
            raise InputError(uri, f"{first.problem}; nor in the store the corpus recorded ({second.problem})") from None


class CheckpointError(ValueError):
    """One of a model's checkpoints does not load or does not build its network; ``file`` names it."""

    def __init__(self, file: str, problem: str):
        self.file = file
        super().__init__(problem)


def load_networks(blobs: dict[str, bytes], device: Any = "cpu"):
    """(MotionCVAE, FeaturePyramid) from checkpoint bytes (``weights_only=True``), in eval mode,
    parameters frozen.

    Raises:
        CheckpointError: naming the file (``cvae.pt`` or ``feature_pyramid.pt``) that does not load,
            is not of its kind, or does not build its network.
    """
    from ..models.cvae import CVAE_KIND, MotionCVAE
    from ..models.pyramid import PYRAMID_KIND, FeaturePyramid, load_checkpoint

    def build(key: str, file: str, kind: str, cls):
        try:
            ckpt = load_checkpoint(io.BytesIO(blobs[key]), kind, device)
            module = cls(**ckpt["config"])
            module.load_state_dict(ckpt["state_dict"])
        except Exception as exc:  # noqa: BLE001  (any damage: named by its file)
            raise CheckpointError(file, f"{exc.__class__.__name__}: {' '.join(str(exc).split())}") from None
        return module

    model = build("cvae", MODEL_FILE, CVAE_KIND, MotionCVAE)
    pyramid = build("pyramid", PYRAMID_FILE, PYRAMID_KIND, FeaturePyramid)
    model = model.to(device).eval().requires_grad_(False)
    pyramid = pyramid.to(device).eval().requires_grad_(False)
    return model, pyramid
