"""Typed configuration, loaded from ``configs/*.yaml``.

Every key has a default; a YAML file only states what it changes. Unknown keys and impossible
values are refused with a :class:`~cardiomotion.errors.ConfigError` naming the file and key.
Later stages add their own sections here.
"""
from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .choices import IntervalMethod, OutputKind as FlowOutput, Similarity as RefineSimilarity, SupportMode
from .errors import ConfigError


def _low_high(v: tuple[float, float], name: str) -> tuple[float, float]:
    if v[0] >= v[1]:
        raise ValueError(f"{name} must be (low, high) with low < high, got {v}")
    return v


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The parsed YAML of ``path``; a missing or unparsable file is one :class:`ConfigError` line."""
    if not path.is_file():
        raise ConfigError(path, f"{what} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is UTF-8, whatever the locale says
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None


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
    rv_contrast: float = Field(1.0, ge=0, le=1, description="RV blood enhancement above the myocardium, as a share "
                                                             "of the cohort's (1); 0: an unopacified right heart, "
                                                             "its blood at the myocardium's HU (a saline chaser)")


class CenterMode(str, Enum):
    """Where :func:`~cardiomotion.data.preprocess.crop_or_pad` centres the crop."""

    HEART = "heart"  # centroid of contrast-enhanced blood near the volume centre
    VOLUME = "volume"  # the volume's centre


class PrepareConfig(_Section):
    """Resampling and cropping of ES/ED frames (``cardiomotion prepare``)."""

    spacing_mm: float = Field(1.5, gt=0, description="isotropic output voxel size")
    grid: tuple[int, int, int] = Field((96, 96, 96), description="output grid (I, J, K)")
    center: CenterMode = Field(CenterMode.HEART, description="crop centre: heart (blood centroid) or volume")
    dtype: Literal["int16", "float32"] = Field("int16", description="stored dtype of es/ed.nii.gz: int16 or float32")
    blood_hu: tuple[float, float] = Field((200.0, 800.0), description="HU range of contrast-enhanced blood")
    pad_hu: float = Field(-1000.0, description="HU used where the crop reaches outside the scan")

    @field_validator("grid")
    @classmethod
    def _positive_grid(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(n < 8 for n in v):
            raise ValueError(f"every grid size must be >= 8, got {v}")
        return v

    @field_validator("blood_hu")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _low_high(v, "blood_hu")


class IntensityConfig(_Section):
    """How networks see HU: clipped to ``window`` and scaled to [0, 1]."""

    window: tuple[float, float] = Field((-200.0, 800.0), description="HU window the networks see, scaled to [0, 1]")

    @field_validator("window")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _low_high(v, "window")


class PWCConfig(_Section):
    """The 3D PWC-Net (constructor arguments of :class:`cardiomotion.models.PWCNet3D`)."""

    channels: tuple[int, ...] = Field((16, 32, 64, 96, 128), description="pyramid channels, finest first")
    search_range: int = Field(2, ge=1, le=4, description="cost-volume radius (voxels of each level)")
    estimator_channels: tuple[int, ...] = Field((64, 48, 32), description="hidden widths of each level's flow estimator")
    context: bool = Field(True, description="dilated context network on the finest level")
    cost_chunk: Optional[int] = Field(25, ge=1, description="cost-volume offsets per chunk (memory bound)")
    aligned: bool = Field(False, description="pyramid halvings centred like the flow resizing and area pooling "
                                             "(coarse voxel i at fine 2i + 0.5; README 'Grid alignment')")

    @field_validator("channels", "estimator_channels")
    @classmethod
    def _non_empty(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {v}")
        return v


class RefineStart(str, Enum):
    """Where the per-pair refinement starts: the network's flow or zero flow."""

    NETWORK = "network"
    ZERO = "zero"


class LrSchedule(str, Enum):
    """How the PWC-Net's Adam learning rate moves over the epochs (``annotate.lr_schedule``)."""

    CONSTANT = "constant"  # ``annotate.lr`` throughout
    COSINE = "cosine"  # lr·(1 + cos(π·epoch/epochs))/2: lr at the first epoch, near 0 (never 0) at the last


class Resources(_Section):
    """What each Ray worker (or actor) of a stage asks the cluster for; one shape for every stage
    (``annotate``, ``train``, ``generate``, ``utility``). ``bundle(use_gpu)`` is the request."""

    use_gpu: Optional[bool] = Field(None, description="null → use a GPU when the cluster has one")
    cpus: float = Field(1.0, gt=0, description="CPUs per worker (torch threads of a CPU worker)")
    gpus: float = Field(1.0, gt=0, le=1, description="GPU share per worker when on GPU (<1 packs several onto one GPU)")

    def bundle(self, use_gpu: bool) -> dict[str, float]:
        """The Ray resource request of one worker: ``{"CPU": cpus}`` plus ``{"GPU": gpus}`` on GPU."""
        return {"CPU": float(self.cpus), **({"GPU": float(self.gpus)} if use_gpu else {})}


def _lift_resources(data: Any, legacy: dict[str, str]) -> Any:
    """Accept a section's flat resource keys of configs written before :class:`Resources`
    (e.g. ``train.cpus_per_worker``) as ``resources.<key>``; both spellings at once with
    different values is an error."""
    if not isinstance(data, dict) or not any(k in data for k in legacy):
        return data
    data = dict(data)
    res = data.get("resources")
    res = res.model_dump() if isinstance(res, BaseModel) else dict(res or {})
    for old, new in legacy.items():
        if old in data:
            value = data.pop(old)
            if new in res and res[new] != value:
                raise ValueError(f"{old} and resources.{new} both set: keep resources.{new}")
            res[new] = value
    data["resources"] = res
    return data


class AnnotateConfig(_Section):
    """Ground-truth flow annotation (``cardiomotion annotate``): PWC-Net training + refinement."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_resources(cls, data: Any) -> Any:
        return _lift_resources(data, {"use_gpu": "use_gpu"})

    pwc: PWCConfig = PWCConfig()
    epochs: int = Field(300, ge=1, description="PWC-Net training epochs")
    batch_size: int = Field(2, ge=1, description="pairs per step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_schedule: LrSchedule = Field(LrSchedule.COSINE, description="constant lr, or cosine decay towards 0 over the epochs (the last epoch's rate is small, not 0). cosine: at constant lr a rebuild of the 44-patient cohort diverged at epoch 37 of 40 (network EPE 83 mm; earlier constant-rate builds were healthy; README, 'Annotation network: a cosine learning rate')")
    smooth_weight: float = Field(0.1, ge=0, description="first-order smoothness weight")
    ssim_alpha: float = Field(0.85, ge=0, le=1, description="photometric mix: α·(1−SSIM)/2 + (1−α)·L1")
    level_weights: Optional[tuple[float, ...]] = Field(
        None, description="loss weight per decoded level, coarse→fine, then the full-res flow; null = 0.5^k schedule")
    both_directions: bool = Field(True, description="also train on (ES, ED) pairs: twice the data")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    resources: Resources = Field(Resources(), description="what each worker asks for (use_gpu, cpus, gpus)")
    checkpoint_every: int = Field(25, ge=1, description="epochs between checkpoints")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    refine: bool = Field(True, description="per-pair instance optimisation of the predicted flow")
    refine_start: RefineStart = Field(RefineStart.ZERO, description="refinement starts from zero flow or from the network's flow (README: zero was better on the phantom)")
    refine_steps: int = Field(300, ge=0, description="Adam steps per refinement level")
    refine_levels: int = Field(3, ge=1, le=5, description="coarse-to-fine refinement resolutions")
    refine_lr: float = Field(0.2, gt=0, description="Adam step on the flow correction (voxels)")
    refine_similarity: RefineSimilarity = Field(RefineSimilarity.MSE, description="refinement image term: mse, or ssim_l1 (the training loss)")
    refine_sigma: float = Field(3.0, ge=0, description="Gaussian std of the refinement's correction, voxels of each level (0 = none)")
    refine_smooth_weight: float = Field(0.001, ge=0, description="first-order smoothness weight during refinement")
    refine_edge_weight: float = Field(0.0, ge=0, description="edge-aware refinement smoothness: each flow difference weighted by exp(-λ·abs(ED intensity difference)), intensities in [0, 1] (0 = plain smoothness; measured worse in the myocardium on the phantom: README, 'Where the annotations' whole-grid error lives')")
    refine_support_mm: float = Field(30.0, ge=0, description="the region the heart moves: this distance (mm) from the contrast-enhanced blood pool (prepare.blood_hu), fading to zero over half as far again; 0 = the whole volume. 30: the smallest margin measured that leaves the RV wall's motion whole when the right heart is not opacified (a saline chaser; 20 mm cut it on 8/8 phantom scans); on opacified scans the whole-grid EPE 2.29 -> 1.93 mm (20 mm: 1.81) with the heart's unchanged; downstream (an estimator trained on the labels, 4 folds) 30 mm costs 0.14 mm over the grid on opacified scans and 20 mm costs 0.28 with an unopacified RV (README, 'A refinement that knows where the heart is', 'An unopacified right heart' and 'The support's margin downstream')")
    refine_support_mode: SupportMode = Field(SupportMode.MASK, description="mask: the delivered flow is weighted by the support; confine: the refinement's correction is (measured worse in the myocardium)")
    refine_volume_weight: float = Field(0.001, ge=0, description="weight λ of the refinement's incompressibility term: λ · mean over the ED soft tissue (refine_tissue_hu) of (det J − 1)², the volume change of the map x → x + u(x); 0 = none. The myocardium keeps its volume through the cycle, which fixes the motion along the wall the image cannot show. 0.001: on the 44-patient phantom cohort the myocardium EPE 2.22 -> 1.26 mm (better on 44/44), heart 2.61 -> 2.13, whole grid 2.08 -> 1.82, no folding; 0.003 was 0.05 mm better in the myocardium and 0.11 worse in the heart, and folded (README, 'The motion the annotations miss')")
    refine_tissue_hu: tuple[float, float] = Field((0.0, 200.0), description="HU range of the soft tissue the incompressibility term holds (ED frame): above fat, below prepare.blood_hu's contrast-enhanced blood, whose pools change volume")

    @field_validator("refine_tissue_hu")
    @classmethod
    def _tissue(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _low_high(v, "refine_tissue_hu")


class CVAEModelConfig(_Section):
    """CVAE architecture; its levels and channels mirror the frozen pyramid of the annotation."""

    latent_channels: Optional[int] = Field(8, ge=1, description="channels of the spatial latent map; null → the coarsest pyramid channels (the paper's). 8: measured better energy score (README, 'Which recipe')")
    output: FlowOutput = Field(FlowOutput.DISPLACEMENT, description="displacement (the paper) or velocity (diffeomorphic)")
    integration_steps: int = Field(7, ge=0, le=12, description="scaling-and-squaring steps (velocity)")


class AugmentSection(_Section):
    """Joint (ES, flow) augmentation before the frozen pyramid: the paper's shifts and zoom; the
    intensity noise is a standard deviation (the paper states a variance of 0.015, i.e. std 0.1225)."""

    noise_std: float = Field(0.015, ge=0, description="intensity noise standard deviation ([0, 1] image units); the paper's variance 0.015 is std 0.1225")
    max_shift: int = Field(10, ge=0, description="largest integer shift per axis (voxels)")
    zoom: tuple[float, float] = Field((0.9, 1.1), description="isotropic zoom range")
    p: float = Field(1.0, ge=0, le=1, description="probability of each augmentation")

    @field_validator("zoom")
    @classmethod
    def _zoom(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"zoom must be (low, high) with 0 < low <= high, got {v}")
        return v


class LossRecipe(str, Enum):
    """How the CVAE's reconstruction and KL terms are normalised (:func:`cardiomotion.train.losses.cvae_loss`)."""

    PAPER = "paper"  # w_rec·mean(squared error) + w_kl·mean(KL per latent element)
    ELBO = "elbo"  # [Σ squared error + β·Σ KL] per sample, / flow elements: β = 2σ² voxels², the decoder noise


class KLSchedule(str, Enum):
    """How the KL weight evolves over the epochs (a factor in [0, 1] on w_kl or β)."""

    LINEAR = "linear"  # 0 → 1 over kl_warmup_epochs, then 1 (constant when kl_warmup_epochs = 0)
    CYCLICAL = "cyclical"  # kl_cycles cycles; in each, 0 → 1 over its first half, then 1 (Fu et al. 2019)


class TrainConfig(_Section):
    """CVAE training of one leave-one-out fold (``cardiomotion train``)."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_resources(cls, data: Any) -> Any:
        return _lift_resources(data, {"use_gpu": "use_gpu", "cpus_per_worker": "cpus", "gpus_per_worker": "gpus"})

    model: CVAEModelConfig = CVAEModelConfig()
    augment: AugmentSection = AugmentSection()
    recipe: LossRecipe = Field(LossRecipe.PAPER, description="loss normalisation: paper (mean MSE, mean KL, w_rec/w_kl) or elbo (summed terms, KL weight beta)")
    beta: float = Field(0.1, gt=0, description="elbo recipe: KL weight in voxels² (= 2σ² of the decoder noise σ)")
    kl_schedule: KLSchedule = Field(KLSchedule.CYCLICAL, description="KL weight schedule: linear warm-up over kl_warmup_epochs, or cyclical (kl_cycles cycles, each ramping 0 → 1 over its first half). cyclical: with latent 8 and T = 2.5 the one measured setting that meets every target of issue 12 (README, 'Which recipe'); the paper's: linear with no warm-up. Downstream (folds 0-3, 150-epoch CVAEs) linear at T = 2 trained the better motion estimator (README, 'The default generator recipe downstream')")
    kl_cycles: int = Field(4, ge=1, description="cyclical schedule: number of cycles over the epochs")
    free_bits: float = Field(0.0, ge=0, description="free bits: nats per latent channel (summed over its map) below which its KL costs nothing. 6 keeps reconstruction of the annotated flows within 10 % of the paper's at a cost in spread and energy score (README, 'Which recipe')")
    epochs: int = Field(2000, ge=1, description="CVAE training epochs (the paper: 2000)")
    batch_size: int = Field(16, ge=1, description="samples per step per rank")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    grad_clip: Optional[float] = Field(0.75, gt=0, description="gradient-norm clipping; null = off")
    w_rec: float = Field(0.95, ge=0, description="weight of the reconstruction MSE")
    w_kl: float = Field(0.05, ge=0, description="weight of the KL term")
    kl_warmup_epochs: int = Field(0, ge=0, description="KL weight ramps linearly from 0 over these epochs")
    num_workers: int = Field(1, ge=1, description="DDP ranks of one fold")
    resources: Resources = Field(Resources(), description="what each rank asks for; gpus < 1 packs folds onto a GPU")
    bf16: bool = Field(True, description="bf16 autocast on GPU")
    channels_last: bool = Field(True, description="channels_last_3d memory format (GPU and CPU: faster 3-D convolutions on both)")
    checkpoint_every: int = Field(50, ge=1, description="epochs between checkpoints")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    val_every: int = Field(1, ge=1, description="epochs between validations")
    prior_samples: int = Field(4, ge=1, description="prior samples per validation scan (each validation epoch)")
    eval_samples: int = Field(16, ge=2, description="prior samples of the held-out scan scored after training (energy score, calibration, physiology)")
    transport_partners: int = Field(0, ge=0, description="motion transport: each training ES frame also trains with the annotated motions of this many other training scans, carried onto it through a demons registration of the two ES frames (train/transport.py); pairs whose transported field folds are left out; batches draw from the own and transported pairs and an epoch keeps its steps (ceil(n_train / (batch_size · workers)) per rank), so transport changes what the CVAE sees, not how long it trains. 0 = the own pairs only (README, 'Motion transport')")

    @model_validator(mode="after")
    def _weights(self) -> "TrainConfig":
        if self.w_rec + self.w_kl <= 0:
            raise ValueError("w_rec + w_kl must be > 0")
        return self


class GenerateConfig(_Section):
    """Mass generation of (ES, ED_syn, flow) corpora (``cardiomotion generate``, docs/corpus.md)."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_resources(cls, data: Any) -> Any:
        return _lift_resources(data, {"use_gpu": "use_gpu", "cpus_per_actor": "cpus", "gpus_per_actor": "gpus"})

    seed: Optional[int] = Field(None, description="corpus seed; null → the top-level seed")
    temperature: float = Field(2.5, ge=0, description="prior z ~ N(0, T²·I); 0 decodes the prior mean. 2.5: with the cyclical KL schedule calibrated (spread–skill 0.92) and the cohort's EF range covered (README, 'Which recipe'); 1 = the paper's. Downstream, 2.0 trained a better estimator than 2.5 from the same CVAEs (folds 0-3)")
    shard_size: int = Field(256, ge=1, description="samples per tar shard (shard k = samples [k·S, (k+1)·S))")
    batch_size: int = Field(16, ge=1, description="latents decoded together (fixed blocks inside a shard)")
    actors: Optional[int] = Field(None, ge=1, description="actor pool size; null → one per GPU share, else one per CPU")
    resources: Resources = Field(Resources(), description="what each actor asks for; gpus < 1 packs writers onto a GPU")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="decoder autocast on GPU: fp32, bf16 or fp16 (CPU: always fp32)")
    channels_last: bool = Field(True, description="channels_last_3d on GPU")
    flow_dtype: Literal["float16", "float32"] = Field("float16", description="stored flow dtype: float16 or float32")
    verify: Literal["size", "sha256"] = Field("size", description="how a rerun checks finished shards: size or sha256")
    previews: int = Field(2, ge=0, description="preview figures (samples) written and logged after a run")
    gif_frames: int = Field(12, ge=2, description="frames of the ES→ED transition GIF")
    traversal_directions: int = Field(3, ge=0, description="latent directions in the traversal mosaic (0 = none)")
    traversal_steps: int = Field(5, ge=2, description="points along each traversal direction")
    traversal_range: float = Field(2.5, gt=0, description="traversal from −range to +range prior std")



class DemoConfig(_Section):
    """What ``cardiomotion demo`` runs after annotation."""

    folds: str = Field("0,1", description="cross-validation folds of the demo ('all' or a comma list)")
    samples: int = Field(16, ge=1, description="size of the demo's generated corpus")
    through: Literal["annotate", "cv", "generate"] = Field("generate", description="last stage the demo runs: annotate, cv or generate")


class RayConfig(_Section):
    """Where Ray runs. ``address: null`` starts an embedded local instance."""

    address: Optional[str] = Field(None, description="'auto', ray://host:10001, or null for local")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the embedded instance")
    object_store_mb: Optional[int] = Field(None, ge=64, description="object store of the embedded instance")
    dashboard: bool = Field(True, description="start the dashboard with the embedded instance (Ray's state API lives there: without it, Ray Train's placement-group cleaner cannot see its run's controller and warns once a second; off is for tests)")


class TrackingConfig(_Section):
    """MLflow. ``uri: null`` → $MLFLOW_TRACKING_URI, else sqlite under the storage root."""

    uri: Optional[str] = Field(None, description="MLflow URI (http(s)://, sqlite:///…, or a path: *.db file or folder); null → $MLFLOW_TRACKING_URI or sqlite under storage_root")
    experiment: str = Field("cardiomotion", description="MLflow experiment name")


class PyramidProtocol(str, Enum):
    """Which frozen feature pyramid conditions a fold's CVAE."""

    SHARED = "shared"  # annotate's network, trained on every pair — including the held-out scan's (transductive)
    PER_FOLD = "per_fold"  # a network trained without the held-out scan: strict leave-one-out


class CVConfig(_Section):
    """Leave-one-out cross-validation (``cardiomotion cv``): every fold a single-fold training."""

    pyramid: PyramidProtocol = Field(
        PyramidProtocol.PER_FOLD, description="frozen pyramid of each fold: per_fold (a PWC-Net trained without the "
                                              "held-out scan; strict leave-one-out, the default) or shared (annotate's, "
                                              "fitted on every pair, the held-out scan's too: transductive, one "
                                              "network fewer per fold); also used by train, tune and utility")

    max_concurrent: Optional[int] = Field(
        None, ge=1, description="folds trained at once; null → as many as the cluster's resources hold")
    check_resources: bool = Field(
        True, description="refuse, before any work, folds the cluster can never hold (off for autoscaling clusters)")
    progress_every_s: float = Field(5.0, gt=0, description="seconds between progress reports")


class TuneConfig(_Section):
    """Ray Tune search over the loss weights, learning rate and KL warm-up (``cardiomotion tune``).

    Objective (minimised, per epoch, mean over ``folds``): the energy score (voxels) of
    ``train.prior_samples`` prior samples against the held-out annotated flow + ``kl_penalty`` ·
    max(0, KL per latent element − ``kl_max``). See :mod:`cardiomotion.train.tune`.
    """

    samples: int = Field(8, ge=1, description="number of trials")
    folds: list[int | str] = Field([0], min_length=1, description="folds (indices or scan ids) every trial trains on")
    epochs: Optional[int] = Field(None, ge=1, description="epochs per trial (ASHA max_t); null → train.epochs")
    max_concurrent: Optional[int] = Field(None, ge=1, description="trials at once; null → as many as resources hold")
    w_rec: tuple[float, float] = Field((0.5, 1.0), description="log-uniform range of train.w_rec")
    w_kl: tuple[float, float] = Field((1e-3, 0.5), description="log-uniform range of train.w_kl")
    beta: tuple[float, float] = Field((0.01, 3.0), description="log-uniform range of train.beta (train.recipe: elbo)")
    lr: tuple[float, float] = Field((1e-4, 3e-3), description="log-uniform range of train.lr")
    kl_warmup_epochs: tuple[int, int] = Field(
        (0, 200), description="uniform integer range of train.kl_warmup_epochs (capped at the trial's epochs; searched with train.kl_schedule: linear)")
    kl_cycles: tuple[int, int] = Field(
        (1, 8), description="uniform integer range of train.kl_cycles (capped at the trial's epochs; searched with train.kl_schedule: cyclical)")
    grace_period: int = Field(100, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(3, ge=2, description="ASHA: 1/reduction_factor of trials go on at each rung")
    kl_max: float = Field(2.0, gt=0, description="nats per latent element above which the KL penalty applies")
    kl_penalty: float = Field(0.0, ge=0, description="objective voxels per nat of KL above kl_max (0: off; the energy score alone punishes a KL-off autoencoder)")
    seed: Optional[int] = Field(None, description="search seed; null → the config's seed")

    @field_validator("w_rec", "w_kl", "beta", "lr")
    @classmethod
    def _log_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1]:
            raise ValueError(f"a log-uniform range must be (low, high) with 0 < low < high, got {list(v)}")
        return v

    @field_validator("kl_warmup_epochs", "kl_cycles")
    @classmethod
    def _int_range(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        least = 1 if info.field_name == "kl_cycles" else 0  # a schedule has at least one cycle
        if not least <= v[0] <= v[1]:
            raise ValueError(f"must be (low, high) with {least} <= low <= high, got {list(v)}")
        return v


class UtilityArm(str, Enum):
    """What the estimator of one utility run is trained on (the same training scans every time).

    The ``target`` arms are transductive: their corpus is the fold CVAE conditioned on the held-out
    scan's ES frame (the image the estimator is then asked about), never its ED, labels or flow —
    what a user with one new scan can do: generate exactly labelled pairs of that anatomy and train
    on them before estimating its motion."""

    CVAE = "cvae"  # a corpus of the fold's CVAE, conditioned on the training ES frames
    RANDOM = "random"  # SynthMorph-style random smooth fields warping the training ES frames
    ANNOTATED = "annotated"  # the real training pairs with their annotated flows
    UNSUPERVISED = "unsupervised"  # the real training pairs, photometric loss (as ``annotate`` trains)
    MIXED = "cvae+annotated"  # alternate batches: corpus, annotated pairs
    FINETUNE = "cvae>annotated"  # the corpus first (utility.pretrain_share of the steps), then the annotated pairs
    TARGET = "target"  # a corpus of the fold's CVAE conditioned on the held-out ES frame alone
    ANNOTATED_TARGET = "annotated+target"  # alternate batches: annotated pairs, the target corpus
    TRANSPORT = "transport"  # no generator: each training ES warped by its own and other training scans' annotated motions carried onto it
    ANCHORED = "anchored"  # the transport pool's fields, each varied by the fold CVAE around itself (u = w + D(μ + Tε) − D(μ))

    @property
    def synthetic(self) -> bool:
        """Arms whose number of distinct samples is the corpus size N (the scaling curve)."""
        return self in (UtilityArm.CVAE, UtilityArm.RANDOM, UtilityArm.MIXED, UtilityArm.FINETUNE,
                        UtilityArm.TARGET, UtilityArm.ANNOTATED_TARGET, UtilityArm.ANCHORED)

    @property
    def uses_corpus(self) -> bool:
        """Reads the corpus conditioned on the training scans' ES frames."""
        return self in (UtilityArm.CVAE, UtilityArm.MIXED, UtilityArm.FINETUNE)

    @property
    def uses_target(self) -> bool:
        """Reads the corpus conditioned on the held-out scan's ES frame (transductive)."""
        return self in (UtilityArm.TARGET, UtilityArm.ANNOTATED_TARGET)

    @property
    def generated(self) -> bool:
        """Trains on the fold CVAE's output (either corpus, or its variation around given fields):
        waits for the fold's generator."""
        return self.uses_corpus or self.uses_target or self is UtilityArm.ANCHORED

    @property
    def transports(self) -> bool:
        """Builds the fold's transport pool (``folds/<scan>/transport_pool.pt``)."""
        return self in (UtilityArm.TRANSPORT, UtilityArm.ANCHORED)

    @property
    def uses_pairs(self) -> bool:
        """Reads the training scans' frames (the real pairs; the random arm warps their ES)."""
        return self not in (UtilityArm.CVAE, UtilityArm.TARGET)

    @property
    def tag(self) -> str:
        """The arm in names that allow only letters, digits and ``_`` (MLflow metrics, Ray Train
        runs): ``cvae+annotated`` → ``cvae_annotated``, ``cvae>annotated`` → ``cvae_then_annotated``."""
        return self.value.replace("+", "_").replace(">", "_then_")


class UtilityCorpus(str, Enum):
    """How the corpus arms read the CVAE's samples."""

    MATERIALIZED = "materialized"  # `generate` writes the corpus; Ray Data reads its shards
    ON_THE_FLY = "on_the_fly"  # decoded inside the data pipeline from (model, seed, i), never stored


class UtilityConfig(_Section):
    """Downstream utility (``cardiomotion utility``): the same estimator trained on each data arm.

    Every arm trains the ``annotate.pwc`` PWC-Net for ``steps`` Adam steps of ``batch_size`` (with
    ``epochs``, a budget that grows with the corpus size N: :meth:`steps_for`);
    the corpus arms read the fold CVAE's samples through Ray Data (``corpus``). The fold CVAE is
    trained with ``train`` and the pyramid protocol ``cv.pyramid``.
    """

    @model_validator(mode="before")
    @classmethod
    def _legacy_resources(cls, data: Any) -> Any:
        return _lift_resources(data, {"cpus_per_run": "cpus"})

    arms: list[UtilityArm] = Field(
        [UtilityArm.CVAE, UtilityArm.RANDOM, UtilityArm.ANNOTATED, UtilityArm.UNSUPERVISED, UtilityArm.MIXED],
        min_length=1, description="data arms: cvae, random, annotated, unsupervised, cvae+annotated (alternating "
                                  "batches); on request cvae>annotated (pre-trained on the corpus, then fine-tuned "
                                  "on the annotated pairs, `pretrain_share`) and the transductive target (a corpus "
                                  "conditioned on the held-out ES frame alone) and annotated+target (alternating "
                                  "batches), and transport (no generator: each training ES frame warped by its own "
                                  "annotated motion and by `transport_partners` other training scans' carried onto "
                                  "it, registration-based augmentation), and anchored (that pool's fields, each varied "
                                  "by the fold CVAE around itself at `generate.temperature`: N samples)")
    sizes: list[int] = Field([64, 256, 1024, 4096], min_length=1,
                             description="corpus sizes N of the synthetic arms (the scaling curve)")
    seeds: int = Field(3, ge=1, description="estimator seeds per (fold, arm, N)")
    steps: int = Field(1000, ge=1, description="Adam steps of every estimator (one budget for all arms); with "
                                               "`epochs`, the least any estimator gets")
    epochs: Optional[float] = Field(None, gt=0, allow_inf_nan=False,
                                    description="a budget that scales with N: a synthetic arm at corpus size N trains "
                                                "max(steps, ceil(epochs·N / batch_size)) steps, the real arms the "
                                                "largest N's; null = steps for all")
    batch_size: int = Field(4, ge=1, description="pairs per step")
    lr: Optional[float] = Field(None, gt=0, description="Adam learning rate; null → annotate.lr")
    grad_clip: Optional[float] = Field(None, gt=0, description="gradient-norm clipping of every estimator step; null = off")
    lr_schedule: LrSchedule = Field(LrSchedule.CONSTANT,
                                    description="the estimator's Adam rate over its steps: constant, or cosine decay "
                                                "(annotate's formula with steps for epochs). constant: every measured "
                                                "utility row trained so; cosine, measured for the cvae and annotated "
                                                "arms on 8 folds at one seed, helped the corpus arm by 0.05 mm (its "
                                                "interval touching 0) and not the annotated arm (README, 'The "
                                                "estimator's learning-rate schedule')")
    pretrain_share: float = Field(0.5, gt=0, lt=1, description="cvae>annotated: the share of the steps trained on "
                                                                "the corpus before the rest on the annotated pairs "
                                                                "(one optimiser and rate schedule throughout)")
    corpus: UtilityCorpus = Field(UtilityCorpus.MATERIALIZED,
                                  description="materialized (generate writes it, Ray Data reads the shards) or "
                                              "on_the_fly (decoded in the data pipeline, never stored)")
    transport_partners: int = Field(4, ge=1, description="transport arm: the other training scans whose annotated "
                                                          "motions each training ES frame is warped by (partners and "
                                                          "registration as train.transport_partners); its N is "
                                                          "n_train·(1 + this)")
    random_scales: list[int] = Field([8, 4], min_length=1,
                                     description="random arm: noise grids at grid/s, summed (SynthMorph-style)")
    shuffle_buffer: int = Field(64, ge=0, description="Ray Data local shuffle buffer (samples) of the corpus arms")
    interval: IntervalMethod = Field(IntervalMethod.STUDENT_T,
                                     description="the 95 % intervals over held-out scans: student_t (mean ± t·s/√n), "
                                                 "percentile (the percentile bootstrap, every table up to stop 52; too "
                                                 "narrow over few scans) or expanded (the bootstrap at widened "
                                                 "quantiles); README, 'Which interval over few scans'")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the bootstrap intervals over test scans")
    demons: bool = Field(True, description="score the demons baseline on every held-out pair")
    max_concurrent: Optional[int] = Field(None, ge=1, description="estimators trained at once; null → CPUs (GPUs)")
    resources: Resources = Field(Resources(), description="what each estimator's Ray Train worker asks for")

    @field_validator("sizes")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        if any(n <= 0 for n in v):
            raise ValueError(f"corpus sizes must be positive, got {v}")
        return sorted(set(int(n) for n in v))

    def steps_for(self, n: int | None = None) -> int:
        """Adam steps of an estimator of a synthetic arm at corpus size ``n`` (None: the real
        arms, which train the largest N's budget so that every arm at the largest N has one budget).
        ``steps`` alone: the same for all; with ``epochs``: max(steps, ceil(epochs·N / batch_size))."""
        if self.epochs is None:
            return self.steps
        n = max(self.sizes) if n is None else int(n)
        # the tolerance keeps an exact multiple from gaining a step on float error (1.1·90 / 3 = 33.00000000000001)
        return max(self.steps, math.ceil(self.epochs * n / self.batch_size - 1e-9))


class Config(_Section):
    """The whole configuration."""

    seed: int = Field(0, description="seed of everything (folds, augmentation, sampling)")
    storage_root: Optional[str] = Field(None, description="root of stage outputs; default ./cardiomotion_work")
    phantom: PhantomConfig = PhantomConfig()
    prepare: PrepareConfig = PrepareConfig()
    intensity: IntensityConfig = IntensityConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    train: TrainConfig = TrainConfig()
    demo: DemoConfig = DemoConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    cv: CVConfig = CVConfig()
    tune: TuneConfig = TuneConfig()
    generate: GenerateConfig = GenerateConfig()
    utility: UtilityConfig = UtilityConfig()

    @field_validator("storage_root")
    @classmethod
    def _local_storage_root(cls, v: Optional[str]) -> Optional[str]:
        if v and "://" in v:  # Path("s3://b/x") would silently become ./s3:/b/x
            raise ValueError(f"{v!r} is a URI; the stages write with local file APIs: mount the bucket "
                             "or share (EFS, Filestore, NFS, s3fs/gcsfuse) and give the mount path")
        return v

    @model_validator(mode="after")
    def _grid_fits_networks(self) -> "Config":
        levels = len(self.annotate.pwc.channels)
        bad = [n for n in self.prepare.grid if n % (2**levels)]
        if bad:
            raise ValueError(f"prepare.grid {list(self.prepare.grid)} must be divisible by 2^{levels} = "
                             f"{2**levels} (annotate.pwc.channels has {levels} levels)")
        return self

    @model_validator(mode="after")
    def _tissue_below_blood(self) -> "Config":
        a = self.annotate
        if a.refine and a.refine_volume_weight > 0 and a.refine_tissue_hu[1] > self.prepare.blood_hu[0]:
            raise ValueError(f"annotate.refine_tissue_hu {list(a.refine_tissue_hu)} reaches into prepare.blood_hu "
                             f"{list(self.prepare.blood_hu)}: the incompressibility term would hold the contrast-"
                             f"enhanced blood pools, whose volume changes; keep its top at or below the blood's "
                             f"bottom (or set annotate.refine_volume_weight: 0)")
        return self


def format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "literal_error":  # a closed choice: name the choices plainly
        expected = str(first.get("ctx", {}).get("expected", "")).replace("'", "")
        msg = f"must be {expected}, got {first.get('input')!r}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


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
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(path, "a config file must be a mapping of sections")
        data = _empty_sections_to_defaults(loaded or {})
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, format_validation(exc)) from None


def _empty_sections_to_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A section left empty in YAML (``prepare:`` with every line commented out) loads as None:
    read it as "all defaults", like a missing section, not as an invalid value."""
    sections = {name for name, f in Config.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    return {k: ({} if v is None and k in sections else v) for k, v in data.items()}


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


def reference_markdown() -> str:
    """The configuration reference (every key, its default and meaning) as a Markdown table."""
    import json

    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            v = f.default
            v = v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v
            lines.append(f"| `{prefix}{name}` | `{json.dumps(v)}` | {f.description or ''} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
