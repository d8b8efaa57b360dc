"""StepSettings: the config's training-step values as a frozen dataclass (no pydantic needed).

A step run from the settings must be the step run from the config: same batches, augmentation,
noise, loss, hence bit-identical parameters afterwards.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cardiomotion.config import load_config
from cardiomotion.models.pyramid import FeaturePyramid
from cardiomotion.train.cvae import build_cvae, kl_factor, kl_weight, train_epoch
from cardiomotion.train.settings import StepSettings, step_settings


def _cfg():
    return load_config(None, {"seed": 3, "train": {
        "batch_size": 2, "lr": 1e-3, "recipe": "elbo", "beta": 0.7, "kl_schedule": "cyclical", "kl_cycles": 2,
        "epochs": 8, "free_bits": 0.5, "model": {"latent_channels": 2, "output": "velocity"},
        "augment": {"max_shift": 1, "noise_std": 0.05, "zoom": [0.95, 1.05]}}})


def test_settings_copy_every_value_the_step_reads():
    cfg = _cfg()
    s = StepSettings.from_config(cfg)
    assert (s.seed, s.recipe, s.beta, s.kl_schedule, s.kl_cycles, s.free_bits, s.batch_size) == (
        3, "elbo", 0.7, "cyclical", 2, 0.5, 2)
    assert (s.model.latent_channels, s.model.output, s.model.integration_steps) == (2, "velocity", 7)
    assert (s.augment.max_shift, s.augment.noise_std, s.augment.zoom) == (1, 0.05, (0.95, 1.05))
    assert step_settings(s) is s and step_settings(cfg) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 4  # type: ignore[misc]
    assert [kl_factor(s, e) for e in range(8)] == [kl_factor(cfg, e) for e in range(8)]
    assert kl_weight(s, 1) == kl_weight(cfg, 1) == pytest.approx(0.7 * kl_factor(cfg, 1))


def test_an_epoch_from_the_settings_equals_an_epoch_from_the_config():
    cfg = _cfg()
    s = StepSettings.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    es, flow = torch.rand((3, 1, 8, 8, 8), generator=g), torch.randn((3, 3, 8, 8, 8), generator=g)
    params, metrics = [], []
    for c in (cfg, s):
        torch.manual_seed(0)
        pyramid = FeaturePyramid(1, (4, 8)).eval().requires_grad_(False)
        model = build_cvae(c, pyramid.config())
        opt = torch.optim.Adam(model.parameters(), lr=c.lr if isinstance(c, StepSettings) else c.train.lr)
        metrics.append(train_epoch(model, pyramid, opt, es, flow, c, 1, steps=2, device="cpu"))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert metrics[0] == metrics[1]
    assert torch.equal(params[0], params[1])
    assert metrics[0]["train_loss"] > 0


def test_epoch_generators_share_one_cpu_stream_on_the_cpu():
    """On the CPU one generator serves everything (the stream every earlier CPU run used); the
    parameter stream is a CPU generator whatever the device, so it is the same numbers on a GPU."""
    from cardiomotion.train.cvae import epoch_generators

    gen, noise = epoch_generators(3, 5, 1, "cpu")
    assert gen is noise and gen.device.type == "cpu"
    assert gen.initial_seed() == 3 * 100_003 + 5 * 101 + 1
    a = torch.randint(0, 10**6, (8,), generator=epoch_generators(3, 5, 1, "cpu")[0])
    b = torch.randint(0, 10**6, (8,), generator=epoch_generators(3, 5, 1, "cpu")[0])
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.randint(0, 10**6, (8,), generator=epoch_generators(3, 6, 1, "cpu")[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_indices_augmentation_parameters_and_eps_match_the_cpu():
    from cardiomotion.train.augment import AugmentConfig, draw_params
    from cardiomotion.train.cvae import epoch_generators

    streams = []
    for device in ("cpu", "cuda"):
        gen, noise = epoch_generators(0, 2, 0, device)
        assert gen.device.type == "cpu" and noise.device.type == device
        idx = torch.randint(0, 43, (16,), generator=gen)
        p = draw_params(16, AugmentConfig(), gen)
        eps = torch.randn((16, 8, 3, 3, 3), generator=gen)
        streams.append((idx, p.zoom, p.shift, eps))
    for a, b in zip(*streams):
        assert torch.equal(a, b)


def test_the_paper_preset_is_the_papers_recipe_and_differs_from_the_defaults_where_measured():
    """configs/paper.yaml reproduces the paper's recipe (README): its loss, latent, T = 1 and noise
    variance 0.015; the defaults keep what the measurements chose."""
    from pathlib import Path

    from cardiomotion.config import LossRecipe, load_config

    paper = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    default = load_config(None)
    assert paper.train.recipe is LossRecipe.PAPER and (paper.train.w_rec, paper.train.w_kl) == (0.95, 0.05)
    assert paper.train.model.latent_channels is None and paper.generate.temperature == 1.0
    assert paper.train.kl_schedule.value == "linear" and paper.train.kl_warmup_epochs == 0  # constant KL weight
    assert default.train.kl_schedule.value == "cyclical"
    assert paper.train.augment.noise_std ** 2 == pytest.approx(0.015, rel=1e-3)
    assert default.train.model.latent_channels == 8 and default.generate.temperature == 2.5
    assert default.train.augment.noise_std == 0.015
    # everything else is the default cluster setting
    assert paper.prepare == load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml").prepare
