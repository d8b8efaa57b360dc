"""Field algebra (compose, invert, velocity integration, resizing) and flow metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cardiomotion.flow import (
    EndpointError,
    compose,
    endpoint_error,
    exp,
    flow_mse,
    folding_fraction,
    gaussian_smooth,
    identity_grid,
    integrate_velocity,
    invert,
    jacobian_determinant,
    upsample_flow,
    velocity_sequence,
    warp,
)

SHAPE = (28, 28, 28)
INTERIOR = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))


def smooth_field(shape=SHAPE, sigma=4.0, max_abs=2.0, seed=0) -> torch.Tensor:
    """Gaussian-smoothed noise, (1, 3, I, J, K) float64, max |component| = max_abs voxels."""
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.normal(size=shape), sigma, mode="nearest") for _ in range(3)])
    return torch.tensor(u / np.abs(u).max() * max_abs)[None]


def smooth_image(shape=SHAPE, seed=5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = gaussian_filter(rng.normal(size=shape), 2.5, mode="nearest")
    return torch.tensor(img / np.abs(img).max())[None, None]


def const_field(d, shape=SHAPE) -> torch.Tensor:
    return torch.tensor(d, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()


# --- compose -------------------------------------------------------------------------------

def test_compose_of_translations_adds():
    out = compose(const_field([1.25, -0.5, 2.0]), const_field([0.5, 0.75, -3.0]))
    torch.testing.assert_close(out, const_field([1.75, 0.25, -1.0]))


def test_compose_known_answer_translation_then_linear():
    # compose(u, v)(x) = u(x) + v(x + u(x)); v linear, so trilinear sampling is exact inside.
    t = [1.0, -0.5, 0.25]
    u = const_field(t)
    g = identity_grid(SHAPE, dtype=torch.float64)
    v = 0.1 * g.flip(1)  # v_c(x) = 0.1 x_{2-c}
    out = compose(u, v)
    expected = u + 0.1 * (g + u).flip(1)
    torch.testing.assert_close(out[INTERIOR], expected[INTERIOR])
    # the other order samples the constant field: compose(v, u) = v + t, not the same
    torch.testing.assert_close(compose(v, u)[INTERIOR], (v + u)[INTERIOR])
    assert (compose(v, u) - out)[INTERIOR].abs().max() > 0.05


def test_warp_by_composed_equals_sequential_warps():
    img = smooth_image()
    u = smooth_field(seed=1, max_abs=1.5)
    v = smooth_field(seed=2, max_abs=1.5)
    once = warp(img, compose(u, v))
    twice = warp(warp(img, v), u)
    assert (once - twice)[INTERIOR].abs().max() < 0.02  # image range ±1: interpolation error only


def test_compose_is_differentiable():
    u = smooth_field(shape=(8, 8, 8), seed=3, max_abs=1.0).requires_grad_(True)
    v = smooth_field(shape=(8, 8, 8), seed=4, max_abs=1.0).requires_grad_(True)
    compose(u, v).square().sum().backward()
    assert u.grad is not None and v.grad is not None
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


# --- invert --------------------------------------------------------------------------------

def test_invert_smooth_field_both_sides():
    u = smooth_field(seed=0, max_abs=2.0)
    assert float(jacobian_determinant(u).min()) > 0.3  # invertible to start with
    w = invert(u)
    assert compose(u, w)[INTERIOR].abs().max() < 0.05
    assert compose(w, u)[INTERIOR].abs().max() < 0.05


def test_invert_translation_is_negative():
    torch.testing.assert_close(invert(const_field([1.5, -2.0, 0.25])), const_field([-1.5, 2.0, -0.25]))


# --- velocity integration ------------------------------------------------------------------

def test_integrate_constant_velocity_is_translation():
    v = const_field([1.5, -0.7, 0.3])
    torch.testing.assert_close(integrate_velocity(v), v)
    torch.testing.assert_close(exp(v, t=0.5), 0.5 * v)


def test_integrate_smooth_velocity_no_folding_and_inverse():
    v = smooth_field(seed=7, max_abs=1.5)
    phi = integrate_velocity(v, steps=7)
    phi_inv = integrate_velocity(-v, steps=7)
    assert folding_fraction(phi) == 0.0
    assert float(jacobian_determinant(phi).min()) > 0
    assert compose(phi, phi_inv)[INTERIOR].abs().max() < 0.05
    assert compose(phi_inv, phi)[INTERIOR].abs().max() < 0.05
    # small velocities: exp(v) ≈ v to first order
    assert (phi - v)[INTERIOR].abs().max() < 0.5


def test_velocity_sequence_endpoints_and_semigroup():
    v = smooth_field(shape=(16, 16, 16), seed=8, max_abs=1.0)
    seq = velocity_sequence(v, [0.0, 0.5, 1.0])
    assert len(seq) == 3
    assert seq[0].abs().max() == 0
    torch.testing.assert_close(seq[2], integrate_velocity(v))
    half_twice = compose(seq[1], seq[1])
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert (half_twice - seq[2])[inner].abs().max() < 0.02


# --- upsample ------------------------------------------------------------------------------

def test_upsample_scales_vectors_per_axis():
    u = const_field([1.0, 1.0, 1.0], shape=(5, 4, 3))
    up = upsample_flow(u, (9, 10, 5))  # ratios (8/4, 9/3, 4/2)
    assert up.shape == (1, 3, 9, 10, 5)
    torch.testing.assert_close(up, const_field([2.0, 3.0, 2.0], shape=(9, 10, 5)))


def test_upsample_preserves_the_physical_map():
    # u = 0.5·x (a scaling about voxel 0) is the same map on any grid of the same extent
    old, new = (5, 4, 3), (9, 10, 5)
    u = 0.5 * identity_grid(old, dtype=torch.float64)
    up = upsample_flow(u, new)
    torch.testing.assert_close(up, 0.5 * identity_grid(new, dtype=torch.float64))
    torch.testing.assert_close(upsample_flow(up, old), u)  # and back down


# --- Jacobian, folding ---------------------------------------------------------------------

def test_jacobian_identity_is_one():
    det = jacobian_determinant(torch.zeros(2, 3, 6, 5, 4))
    assert det.shape == (2, 1, 6, 5, 4)
    torch.testing.assert_close(det, torch.ones_like(det))


def test_jacobian_of_scaling_is_s_cubed():
    s = 1.3
    u = (s - 1) * identity_grid((6, 7, 8), dtype=torch.float64)
    det = jacobian_determinant(u)
    torch.testing.assert_close(det, torch.full_like(det, s**3))
    # numpy (3, I, J, K) in → numpy (I, J, K) out
    det_np = jacobian_determinant(u[0].numpy())
    assert isinstance(det_np, np.ndarray) and det_np.shape == (6, 7, 8)
    np.testing.assert_allclose(det_np, s**3)


def test_folded_field_has_positive_folding_fraction():
    g = identity_grid((20, 8, 8), dtype=torch.float64)
    u = torch.zeros(1, 3, 20, 8, 8, dtype=torch.float64)
    u[:, 0] = 5.0 * torch.exp(-((g[:, 0] - 10.0) ** 2) / (2 * 2.0**2))  # slope up to 1.5 > 1
    frac = folding_fraction(u)
    assert 0 < frac < 1
    mask = torch.zeros(20, 8, 8, dtype=torch.bool)
    mask[:4] = True  # far from the bump: no folding there
    assert folding_fraction(u, mask=mask) == 0.0
    assert folding_fraction(torch.zeros(1, 3, 4, 4, 4)) == 0.0


# --- endpoint error, MSE -------------------------------------------------------------------

def test_endpoint_error_known_values():
    shape = (4, 5, 6)
    pred = const_field([3.0, 4.0, 0.0], shape=shape) + 0.25
    true = torch.full((1, 3, *shape), 0.25, dtype=torch.float64)
    e = endpoint_error(pred, true)
    assert isinstance(e, EndpointError)
    assert e.epe_vox == pytest.approx(5.0) and e.epe_mm is None
    e = endpoint_error(pred, true, spacing_mm=(2.0, 2.0, 2.0))
    assert e.to_dict() == pytest.approx({"epe_vox": 5.0, "epe_mm": 10.0})
    e = endpoint_error(pred, true, spacing_mm=np.array([1.0, 2.0, 3.0]))
    assert e.epe_mm == pytest.approx(math.sqrt(9 + 64))


def test_endpoint_error_numpy_and_mask():
    shape = (4, 5, 6)
    true = np.zeros((3, *shape), dtype=np.float32)
    pred = np.zeros((3, *shape), dtype=np.float32)
    pred[0, :2] = 3.0
    pred[1, :2] = 4.0
    pred[2, 2:] = 10.0
    mask = np.zeros(shape, dtype=bool)
    mask[:2] = True
    assert endpoint_error(pred, true, mask=mask).epe_vox == pytest.approx(5.0)
    assert endpoint_error(pred, true).epe_vox == pytest.approx((2 * 5.0 + 2 * 10.0) / 4)
    torch_mask = torch.from_numpy(mask)[None, None]  # (B, 1, I, J, K) works too
    assert endpoint_error(torch.from_numpy(pred)[None], torch.from_numpy(true)[None],
                          mask=torch_mask).epe_vox == pytest.approx(5.0)
    with pytest.raises(ValueError):
        endpoint_error(pred, true, mask=np.zeros(shape, dtype=bool))


def test_flow_mse_known_values():
    shape = (3, 3, 3)
    pred = const_field([3.0, 4.0, 0.0], shape=shape)
    true = torch.zeros_like(pred)
    assert flow_mse(pred, true) == pytest.approx(25.0 / 3)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0] = True
    pred[:, :, 1:] = 0
    assert flow_mse(pred, true, mask=mask) == pytest.approx(25.0 / 3)
    assert flow_mse(pred[0].numpy(), true[0].numpy()) == pytest.approx(25.0 / 9)



def test_magnitude_ratio_known_values():
    from cardiomotion.flow import magnitude_ratio

    shape = (4, 4, 4)
    truth = const_field([3.0, 4.0, 0.0], shape=shape)  # |truth| = 5 everywhere
    assert magnitude_ratio(0.9 * truth, truth) == pytest.approx(0.9)
    # a rotated field of the same length is as strong, though every end point is wrong
    assert magnitude_ratio(const_field([0.0, 0.0, 5.0], shape=shape), truth) == pytest.approx(1.0)
    mask = np.zeros(shape, dtype=bool)
    mask[0] = True
    half = truth.clone()
    half[:, :, 1:] = 0  # only the first slab moves: inside the mask it is the truth's full motion
    assert magnitude_ratio(half, truth, mask=mask) == pytest.approx(1.0)
    assert magnitude_ratio(half, truth) == pytest.approx(0.25)
    assert magnitude_ratio(half[0].numpy(), truth[0].numpy()) == pytest.approx(0.25)
    assert np.isnan(magnitude_ratio(truth, torch.zeros_like(truth)))  # the reference does not move
    with pytest.raises(ValueError):
        magnitude_ratio(truth, truth[:, :, :2])


def test_truth_scores_per_region_known_values():
    """A flow that is the truth in the first slab and zero elsewhere: EPE 0 and magnitude 1 inside
    the slab, the truth's length (5 voxels · 2 mm) where it is zero; an empty region is left out."""
    from cardiomotion.data.phantom import LV_MYO, RV_WALL, region_masks
    from cardiomotion.flow.metrics import truth_scores

    shape = (4, 4, 4)
    truth = const_field([0.0, 0.0, 5.0], shape=shape)[0].numpy()  # a shear: the jump does not fold
    u = truth.copy()
    u[:, 1:] = 0.0
    labels = np.zeros(shape, np.uint8)
    labels[0] = LV_MYO
    labels[1] = RV_WALL
    masks = region_masks(labels)
    assert masks["myo"].sum() == 16 and masks["heart"].sum() == 32
    got = truth_scores(u, truth, 2.0, masks)
    assert got["epe_myo_mm"] == pytest.approx(0.0) and got["magnitude_myo"] == pytest.approx(1.0)
    assert got["epe_heart_mm"] == pytest.approx(5.0) and got["magnitude_heart"] == pytest.approx(0.5)
    assert got["epe_mm"] == pytest.approx(0.75 * 10.0) and got["folding"] == 0.0
    masks["empty"] = np.zeros(shape, bool)
    assert set(truth_scores(u, truth, (2.0, 2.0, 2.0), masks)) == set(got)
    assert set(truth_scores(u, truth, 2.0)) == {"epe_mm", "folding"}


# --------------------------------------------------------------------------- gaussian_smooth
def test_gaussian_smooth_keeps_constant_and_linear_fields():
    const = torch.full((1, 3, 12, 10, 9), 2.5)
    torch.testing.assert_close(gaussian_smooth(const, 1.5), const)
    ramp = torch.arange(20, dtype=torch.float32).view(1, 1, 20, 1, 1).expand(1, 3, 20, 6, 5).contiguous()
    out = gaussian_smooth(ramp, 1.0)  # radius 3: voxels 3..16 see no padding
    torch.testing.assert_close(out[:, :, 3:-3], ramp[:, :, 3:-3], atol=1e-5, rtol=0)


def test_gaussian_smooth_matches_scipy_and_preserves_mass_of_an_impulse():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(1, 3, 16, 14, 12)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(u), 1.3).numpy()
    ref = np.stack([gaussian_filter(u[0, c], 1.3, mode="nearest", truncate=3.0) for c in range(3)])[None]
    # scipy's radius is int(truncate·σ + 0.5) = 4 = ours (ceil(3.9)); both normalise the kernel.
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    impulse = torch.zeros(1, 1, 21, 21, 21)
    impulse[0, 0, 10, 10, 10] = 1.0
    out = gaussian_smooth(impulse, 2.0)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(out[0, 0, 10, 10, 10]) == pytest.approx(float(out.max()))


def test_gaussian_smooth_zero_sigma_is_identity_and_tiny_axes_work():
    u = torch.randn(2, 3, 5, 1, 2)
    assert gaussian_smooth(u, 0.0) is u
    out = gaussian_smooth(u, 3.0)  # radius 9 > axis sizes: the kernel is trimmed, not an error
    assert out.shape == u.shape and torch.isfinite(out).all()
    const = torch.full((1, 3, 5, 1, 2), -1.25)
    torch.testing.assert_close(gaussian_smooth(const, 3.0), const)
