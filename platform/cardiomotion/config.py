"""Typed configuration, loaded from ``configs/*.yaml``.

Every key has a default; a YAML file only states what it changes. Unknown keys and impossible
values are refused with a :class:`~cardiomotion.errors.ConfigError` naming the file and key.
Later stages add their own sections here.
"""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(_Section):
    """The analytic beating-heart cohort (``cardiomotion phantom``)."""

    patients: int = Field(4, ge=1, description="number of patients")
    grid: int = Field(64, ge=16, description="voxels per axis of the cubic grid")
    spacing_mm: Optional[float] = Field(None, gt=0, description="voxel size; default fov_mm / grid")
    fov_mm: float = Field(140.0, gt=40, description="field of view when spacing_mm is unset")
    phases: int = Field(10, ge=2, le=40, description="cardiac phases over the R-R interval")
    seed: int = Field(0, description="cohort seed: same seed, identical files")


class CenterMode(str, Enum):
    """Where :func:`~cardiomotion.data.preprocess.crop_or_pad` centres the crop."""

    HEART = "heart"  # centroid of contrast-enhanced blood near the volume centre
    VOLUME = "volume"  # the volume's centre


class PrepareConfig(_Section):
    """Resampling and cropping of ES/ED frames (``cardiomotion prepare``)."""

    spacing_mm: float = Field(1.5, gt=0, description="isotropic output voxel size")
    grid: tuple[int, int, int] = Field((96, 96, 96), description="output grid (I, J, K)")
    center: CenterMode = CenterMode.HEART
    dtype: str = Field("int16", description="stored dtype of es/ed.nii.gz: int16 or float32")
    blood_hu: tuple[float, float] = Field((200.0, 800.0), description="HU range of contrast-enhanced blood")
    pad_hu: float = Field(-1000.0, description="HU used where the crop reaches outside the scan")

    @field_validator("grid")
    @classmethod
    def _positive_grid(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(n < 8 for n in v):
            raise ValueError(f"every grid size must be >= 8, got {v}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("int16", "float32"):
            raise ValueError(f"dtype must be int16 or float32, got {v!r}")
        return v

    @field_validator("blood_hu")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"blood_hu must be (low, high) with low < high, got {v}")
        return v


class IntensityConfig(_Section):
    """How networks see HU: clipped to ``window`` and scaled to [0, 1]."""

    window: tuple[float, float] = (-200.0, 800.0)

    @field_validator("window")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {v}")
        return v


class RayConfig(_Section):
    """Where Ray runs. ``address: null`` starts an embedded local instance."""

    address: Optional[str] = Field(None, description="'auto', ray://host:10001, or null for local")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the embedded instance")
    object_store_mb: Optional[int] = Field(None, ge=64, description="object store of the embedded instance")


class TrackingConfig(_Section):
    """MLflow. ``uri: null`` → $MLFLOW_TRACKING_URI, else sqlite under the storage root."""

    uri: Optional[str] = None
    experiment: str = "cardiomotion"


class Config(_Section):
    """The whole configuration."""

    seed: int = 0
    storage_root: Optional[str] = Field(None, description="root of stage outputs; default ./cardiomotion_work")
    phantom: PhantomConfig = PhantomConfig()
    prepare: PrepareConfig = PrepareConfig()
    intensity: IntensityConfig = IntensityConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config over the defaults; ``None`` gives the defaults.

    Args:
        path: YAML file (``configs/default.yaml``, ``configs/smoke.yaml``, ...).
        overrides: nested dict applied on top (CLI flags).

    Raises:
        ConfigError: missing/unparsable file, unknown key or impossible value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(path, "config file does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(path, "a config file must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _format_validation(exc)) from None


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def storage_root(cfg: Config) -> Path:
    """Absolute root for stage outputs: config, else $CARDIOMOTION_STORAGE, else ./cardiomotion_work."""
    root = cfg.storage_root or os.environ.get("CARDIOMOTION_STORAGE") or "cardiomotion_work"
    return Path(root).expanduser().resolve()


def dump_config(cfg: Config) -> str:
    """YAML text of a config that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
