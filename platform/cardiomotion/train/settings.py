"""What one CVAE training step needs to know, as a frozen dataclass with no dependency on the config.

:class:`StepSettings` is the part of a validated :class:`~cardiomotion.config.Config` that the
training step reads (:func:`cardiomotion.train.cvae.train_epoch`, :func:`~cardiomotion.train.cvae.
build_cvae`, the KL schedule and the loss). The config stays the one owner of defaults and
validation; :meth:`StepSettings.from_config` copies its values. The split lets the step run
where only PyTorch is installed — the GPU suite (``bench/gpu_suite.py``) runs on machines
without pydantic, YAML, Ray or MLflow — and makes what crosses into a training process a typed,
frozen value instead of a dict.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .augment import AugmentConfig, augment_config


@dataclass(frozen=True)
class CVAEShape:
    """The CVAE's constructor choices beyond the pyramid's channels (``train.model``).

    Attributes:
        latent_channels: channels of the spatial latent map; None → the coarsest pyramid channels.
        output: ``"displacement"`` or ``"velocity"`` (integrated by scaling and squaring).
        integration_steps: scaling-and-squaring steps of a velocity output.
    """

    latent_channels: int | None
    output: str
    integration_steps: int


@dataclass(frozen=True)
class StepSettings:
    """The training step's settings (``seed`` and the ``train`` section of the config); frozen
    (its ``augment`` is an :class:`AugmentConfig` copy: do not mutate it).

    Units as in the config: ``grad_clip`` is a gradient norm, ``beta`` voxels², ``free_bits`` nats
    per latent channel; ``recipe`` is ``"paper"`` or ``"elbo"``, ``kl_schedule`` ``"linear"`` or
    ``"cyclical"`` (the values of the config's enums).
    """

    seed: int
    model: CVAEShape
    augment: AugmentConfig
    recipe: str
    w_rec: float
    w_kl: float
    beta: float
    kl_schedule: str
    kl_cycles: int
    kl_warmup_epochs: int
    free_bits: float
    epochs: int
    batch_size: int
    lr: float
    grad_clip: float | None

    @classmethod
    def from_config(cls, cfg: Any) -> "StepSettings":
        """The settings of a validated :class:`~cardiomotion.config.Config` (values copied)."""
        t = cfg.train
        a = t.augment
        return cls(
            seed=int(cfg.seed),
            model=CVAEShape(latent_channels=t.model.latent_channels, output=_value(t.model.output),
                            integration_steps=int(t.model.integration_steps)),
            augment=augment_config(a),
            recipe=_value(t.recipe), w_rec=float(t.w_rec), w_kl=float(t.w_kl), beta=float(t.beta),
            kl_schedule=_value(t.kl_schedule), kl_cycles=int(t.kl_cycles),
            kl_warmup_epochs=int(t.kl_warmup_epochs), free_bits=float(t.free_bits), epochs=int(t.epochs),
            batch_size=int(t.batch_size), lr=float(t.lr),
            grad_clip=None if t.grad_clip is None else float(t.grad_clip),
        )

    def with_(self, **changes: Any) -> "StepSettings":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)


def step_settings(cfg_or_settings: Any) -> StepSettings:
    """``StepSettings`` as given, or copied from a :class:`~cardiomotion.config.Config`."""
    if isinstance(cfg_or_settings, StepSettings):
        return cfg_or_settings
    return StepSettings.from_config(cfg_or_settings)


def _value(x: Any) -> str:
    return str(x.value if hasattr(x, "value") else x)
