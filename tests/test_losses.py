"""SSIM, photometric, smoothness, multi-level PWC loss and the KL term."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from cardiomotion.train.losses import (
    downsample_to,
    kl_standard_normal,
    photometric_loss,
    pwc_unsupervised_loss,
    smoothness_loss,
    ssim3d,
)


@pytest.fixture
def volume() -> torch.Tensor:
    return torch.rand(2, 1, 12, 10, 14, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["gaussian", "box"])
def test_ssim_identity_is_one(volume, kind):
    assert float(ssim3d(volume, volume, kind=kind)) == pytest.approx(1.0, abs=1e-6)
    ssim_map = ssim3d(volume, volume, kind=kind, reduction="none")
    assert ssim_map.shape == volume.shape
    torch.testing.assert_close(ssim_map, torch.ones_like(volume), atol=1e-5, rtol=0)


def test_ssim_drops_for_different_volumes(volume):
    other = torch.rand(volume.shape, generator=torch.Generator().manual_seed(1))
    assert float(ssim3d(volume, other)) < 0.5
    assert float(ssim3d(volume, 1 - volume)) < 0
    with pytest.raises(ValueError):
        ssim3d(volume, volume, window=4)


def test_photometric_zero_for_identical(volume):
    assert float(photometric_loss(volume, volume)) == pytest.approx(0.0, abs=1e-6)
    assert float(photometric_loss(volume, volume.clone(), alpha=0.0)) == 0.0


def test_photometric_l1_part_and_mask(volume):
    other = volume + 0.1
    # alpha = 0: pure L1.
    assert float(photometric_loss(volume, other, alpha=0.0)) == pytest.approx(0.1, abs=1e-6)
    # A mask restricts the average to its voxels.
    other = volume.clone()
    other[:, :, :6] += 0.2
    mask = torch.zeros_like(volume)
    mask[:, :, 6:] = 1
    assert float(photometric_loss(volume, other, alpha=0.0, mask=mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(photometric_loss(volume, other, alpha=0.0, mask=1 - mask)) == pytest.approx(0.2, abs=1e-6)
    # alpha = 1: pure (1 - SSIM)/2, within [0, 1].
    val = float(photometric_loss(volume, 1 - volume, alpha=1.0))
    assert 0.5 < val <= 1.0


def test_smoothness_constant_and_ramp():
    const = torch.ones(2, 3, 6, 7, 8) * torch.tensor([1.5, -2.0, 0.3]).view(1, 3, 1, 1, 1)
    assert float(smoothness_loss(const)) == 0.0
    assert float(smoothness_loss(const, penalty="l1")) == 0.0
    s = 0.7
    ramp = torch.zeros(1, 3, 6, 7, 8)
    ramp[:, 0] = s * torch.arange(6, dtype=torch.float32).view(6, 1, 1)
    # One of three components has derivative s along one axis, everything else is 0.
    assert float(smoothness_loss(ramp)) == pytest.approx(s**2 / 3, rel=1e-6)
    assert float(smoothness_loss(ramp, penalty="l1")) == pytest.approx(s / 3, rel=1e-6)
    ramp_k = torch.zeros(1, 3, 6, 7, 8)
    ramp_k[:, 2] = s * torch.arange(8, dtype=torch.float32)
    assert float(smoothness_loss(ramp_k)) == pytest.approx(s**2 / 3, rel=1e-6)


def test_edge_aware_smoothness_prices_a_jump_across_an_image_edge():
    """A flow step of height h along axis 0 costs h²/(3·(I−1)) (one component, one voxel pair in
    I − 1 along that axis); with an image step of height e across the same voxel pair the cost is
    scaled by exp(−λe); an image step elsewhere, or λ = 0, leaves it unchanged."""
    I, h, e, lam = 6, 0.8, 0.3, 10.0
    flow = torch.zeros(1, 3, I, 5, 4)
    flow[:, 0, 3:] = h  # the jump is between i = 2 and i = 3
    plain = h**2 / (3 * (I - 1))
    assert float(smoothness_loss(flow)) == pytest.approx(plain, rel=1e-6)
    at_edge = torch.zeros(1, 1, I, 5, 4)
    at_edge[:, :, 3:] = e
    assert float(smoothness_loss(flow, image=at_edge, edge_weight=lam)) == pytest.approx(
        plain * math.exp(-lam * e), rel=1e-5)
    assert float(smoothness_loss(flow, penalty="l1", image=at_edge, edge_weight=lam)) == pytest.approx(
        h / (3 * (I - 1)) * math.exp(-lam * e), rel=1e-5)
    elsewhere = torch.zeros(1, 1, I, 5, 4)
    elsewhere[:, :, 1:] = e
    assert float(smoothness_loss(flow, image=elsewhere, edge_weight=lam)) == pytest.approx(plain, rel=1e-6)
    assert float(smoothness_loss(flow, image=at_edge, edge_weight=0.0)) == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="on the flow's grid"):
        smoothness_loss(flow, image=at_edge[:, :, :-1], edge_weight=lam)
    with pytest.raises(ValueError, match="on the flow's grid"):
        smoothness_loss(flow, image=at_edge.expand(2, 1, I, 5, 4), edge_weight=lam)  # batch 2 against 1
    with pytest.raises(ValueError, match="needs the image"):
        smoothness_loss(flow, edge_weight=lam)
    with pytest.raises(ValueError, match=">= 0"):
        smoothness_loss(flow, image=at_edge, edge_weight=-1.0)


def test_kl_standard_normal():
    zero = torch.zeros(4, 8, 3, 3, 3)
    assert float(kl_standard_normal(zero, zero)) == 0.0
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 8, 3, 3, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 8, 3, 3, 3, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))).mean()
    torch.testing.assert_close(kl_standard_normal(mu, logvar), expected)


def test_downsample_to_is_area_average():
    x = torch.rand(1, 1, 8, 8, 8)
    torch.testing.assert_close(downsample_to(x, (4, 4, 4)), torch.nn.functional.avg_pool3d(x, 2))
    assert downsample_to(x, (8, 8, 8)) is x


def test_pwc_unsupervised_loss_components():
    fixed = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    flows = [torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 3, 16, 16, 16)]
    total, parts = pwc_unsupervised_loss(fixed, fixed.clone(), flows, [0.25, 0.5, 1.0], smooth_weight=0.1)
    assert float(total) == pytest.approx(0.0, abs=1e-6)
    assert {"total", "photometric", "smoothness", "photometric/level0", "smoothness/level2"} <= set(parts)
    # A non-smooth flow on different images: the total is the weighted sum of its parts.
    moving = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    flows = [torch.randn(1, 3, 8, 8, 8, requires_grad=True), torch.randn(1, 3, 16, 16, 16, requires_grad=True)]
    total, parts = pwc_unsupervised_loss(fixed, moving, flows, [0.5, 1.0], smooth_weight=0.1)
    expected = sum(w * (parts[f"photometric/level{k}"] + 0.1 * parts[f"smoothness/level{k}"])
                   for k, w in enumerate([0.5, 1.0]))
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in flows)
    with pytest.raises(ValueError):
        pwc_unsupervised_loss(fixed, moving, flows, [1.0], smooth_weight=0.1)


def test_cvae_loss_recipes_known_answers():
    from cardiomotion.train.losses import cvae_loss, kl_elements, kl_per_sample

    pred = torch.zeros(2, 3, 4, 4, 4)
    flow = torch.full((2, 3, 4, 4, 4), 0.5)  # squared error 0.25 everywhere
    mu = torch.zeros(2, 8, 1, 1, 2)
    mu[:, 0] = 2.0  # KL 2 nats in channel 0's two elements, 0 elsewhere
    logvar = torch.zeros_like(mu)
    assert float(kl_elements(mu, logvar).sum()) == pytest.approx(2 * 2 * 2.0)
    assert float(kl_per_sample(mu, logvar)) == pytest.approx(4.0)  # nats per sample
    n_z, n_f = 16, 3 * 64
    loss, mse, kl = cvae_loss("paper", pred, flow, mu, logvar, w_rec=0.95, w_kl=0.05)
    assert float(mse) == pytest.approx(0.25) and float(kl) == pytest.approx(4.0 / n_z)
    assert float(loss) == pytest.approx(0.95 * 0.25 + 0.05 * 4.0 / n_z)
    loss, _, _ = cvae_loss("elbo", pred, flow, mu, logvar, beta=0.3)
    assert float(loss) == pytest.approx((0.25 * n_f + 0.3 * 4.0) / n_f)
    loss, _, _ = cvae_loss("elbo", pred, flow, mu, logvar, beta=0.3, kl_factor=0.5)
    assert float(loss) == pytest.approx((0.25 * n_f + 0.15 * 4.0) / n_f)
    # free bits: each of the 8 channels counts at least 1 nat: 4 + 7·1
    assert float(kl_per_sample(mu, logvar, free_bits=1.0)) == pytest.approx(11.0)
    loss, _, _ = cvae_loss("elbo", pred, flow, mu, logvar, beta=1.0, free_bits=1.0)
    assert float(loss) == pytest.approx((0.25 * n_f + 11.0) / n_f)
    with pytest.raises(ValueError, match="recipe"):
        cvae_loss("nope", pred, flow, mu, logvar)


def test_free_bits_stop_the_gradient_below_the_floor():
    from cardiomotion.train.losses import kl_per_sample

    mu = torch.full((1, 2, 1, 1, 1), 0.1, requires_grad=True)  # 0.005 nats per channel < 1
    kl_per_sample(mu, torch.zeros_like(mu), free_bits=1.0).backward()
    assert float(mu.grad.abs().max()) == 0.0


def test_kl_schedules():
    from cardiomotion.config import load_config
    from cardiomotion.train.cvae import kl_factor, kl_weight

    lin = load_config(None, {"train": {"epochs": 10, "kl_schedule": "linear", "kl_warmup_epochs": 4}})
    assert [kl_factor(lin, e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_weight(lin, 0) == pytest.approx(0.05 * 0.25)
    const = load_config(None, {"train": {"epochs": 10, "recipe": "elbo", "beta": 0.2, "kl_schedule": "linear"}})
    assert kl_factor(const, 0) == 1.0 and kl_weight(const, 3) == pytest.approx(0.2)
    cyc = load_config(None, {"train": {"epochs": 8, "kl_schedule": "cyclical", "kl_cycles": 2}})
    # two cycles of 4 epochs: ramp over the first half of each (0.5, 1), then hold
    assert [kl_factor(cyc, e) for e in range(8)] == [0.5, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0]
