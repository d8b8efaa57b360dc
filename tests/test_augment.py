"""Joint (ES image, pull flow) augmentation: consistency with warping, exact shifts, zoom scaling,
noise on the image only, determinism. (KL is tested in test_losses.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from cardiomotion.flow.warp import identity_grid, warp
from cardiomotion.train.augment import AugmentConfig, augment, draw_params, shift_pair, zoom_pair

GRID = (32, 36, 40)  # non-cubic, so a swapped axis shows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a busy shared machine OpenMP threads
    that spin-wait for each other make a 2-thread step 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(grid=GRID, batch=1, seed=0) -> torch.Tensor:
    """Smooth image (B, 1, I, J, K): a sum of Gaussian blobs (σ 4–6 voxels) in [0, ~1]."""
    g = torch.Generator().manual_seed(seed)
    x = identity_grid(grid, dtype=torch.float64)[0]
    out = torch.zeros(batch, 1, *grid, dtype=torch.float64)
    for b in range(batch):
        for _ in range(8):
            centre = torch.tensor([4 + (n - 8) * float(torch.rand(1, generator=g)) for n in grid],
                                  dtype=torch.float64).view(3, 1, 1, 1)
            sigma = 4.0 + 2.0 * float(torch.rand(1, generator=g))
            out[b, 0] += 0.5 * torch.exp(-((x - centre) ** 2).sum(0) / (2 * sigma**2))
    return out.float()


def smooth_flow(grid=GRID, batch=1, amp=1.5, seed=1) -> torch.Tensor:
    """Smooth pull flow (B, 3, I, J, K) in voxels: one long-wavelength sinusoid per component."""
    g = torch.Generator().manual_seed(seed)
    x = identity_grid(grid, dtype=torch.float64)[0]
    out = torch.zeros(batch, 3, *grid, dtype=torch.float64)
    for b in range(batch):
        for c in range(3):
            k = torch.rand(3, generator=g, dtype=torch.float64) * 2 * math.pi / torch.tensor(grid, dtype=torch.float64)
            phase = 2 * math.pi * float(torch.rand(1, generator=g))
            out[b, c] = amp * torch.sin((k.view(3, 1, 1, 1) * x).sum(0) + phase)
    return out.float()


def interior(grid=GRID, margin=7) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(margin, n - margin) for n in grid)


def test_zoom_and_shift_keep_warping_consistent():
    """warp(I', u') == (warp(I, u))' inside the grid, and the ×s on the vectors is what makes it so."""
    image, flow = blobs(batch=2), smooth_flow(batch=2)
    ed = warp(image, flow)
    zoom = [0.9, 1.12]
    shift = [[3, -2, 1], [-1, 0, 2]]
    img_a, flow_a = shift_pair(*zoom_pair(image, flow, zoom), shift)
    ed_a, _ = shift_pair(*zoom_pair(ed, flow, zoom), shift)
    lhs = warp(img_a, flow_a)
    sl = interior()
    err = (lhs - ed_a)[sl].abs().max()
    assert float(err) < 6e-3, float(err)

    # Control: the same resampling without scaling the vectors by s is visibly inconsistent.
    s = torch.tensor(zoom).view(2, 1, 1, 1, 1)
    wrong = warp(img_a, flow_a / s)
    err_wrong = (wrong - ed_a)[sl].abs().max()
    assert float(err_wrong) > 5 * float(err), (float(err), float(err_wrong))


def test_augment_consistency_with_random_params():
    cfg = AugmentConfig(noise_std=0.0, max_shift=4, zoom=(0.85, 1.15))
    image, flow = blobs(batch=3, seed=3), smooth_flow(batch=3, seed=4)
    img_a, flow_a, params = augment(image, flow, cfg, torch.Generator().manual_seed(7), return_params=True)
    ed_a, flow_b = augment(warp(image, flow), flow, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(flow_a, flow_b)
    assert bool(((params.zoom - 1).abs() > 1e-3).any())
    assert bool((params.shift != 0).any()) and int(params.shift.abs().max()) <= 4
    err = (warp(img_a, flow_a) - ed_a)[interior(margin=8)].abs().max()
    assert float(err) < 6e-3, float(err)


def test_integer_shift_is_exact_in_the_interior():
    image, flow = blobs(batch=2, seed=5), smooth_flow(batch=2, seed=6)
    shift = torch.tensor([[3, -2, 1], [0, 0, -4]])
    img_s, flow_s = shift_pair(image, flow, shift)
    # Direction: I'(x) = I(x − t), so I'[i + t] = I[i].
    assert torch.equal(img_s[0, :, 3:, :-2, 1:], image[0, :, :-3, 2:, :-1])
    assert torch.equal(flow_s[1, :, :, :, :-4], flow[1, :, :, :, 4:])
    # Edge replication at the border the shift uncovers.
    assert torch.equal(img_s[0, :, :4], img_s[0, :, 3:4].expand(-1, 4, -1, -1))
    assert torch.equal(flow_s[1, :, :, :, -5:], flow[1, :, :, :, -1:].expand(-1, -1, -1, 5))
    lhs = warp(img_s, flow_s)
    rhs, _ = shift_pair(warp(image, flow), flow, shift)
    assert torch.allclose(lhs[interior(margin=6)], rhs[interior(margin=6)], atol=1e-5, rtol=0)


def test_zoom_scales_constant_flow_vectors():
    vec = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    flow = vec.expand(2, 3, *GRID).clone()
    image = blobs(batch=2)
    cfg = AugmentConfig(noise_std=0.0, max_shift=0, zoom=(1.1, 1.1))
    _, flow_z = augment(image, flow, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(flow_z, 1.1 * flow, atol=1e-5, rtol=0)
    _, flow_z = zoom_pair(image, flow, [0.8, 1.0])
    assert torch.allclose(flow_z[0], 0.8 * flow[0], atol=1e-5, rtol=0)
    assert torch.equal(flow_z[1], flow[1])  # s == 1: untouched, bit for bit


def test_zoom_enlarges_about_the_centre():
    """A blob at the centre stays there; its offset from the centre grows by s."""
    grid = (33, 33, 33)  # odd: the centre is a voxel
    x = identity_grid(grid, dtype=torch.float64)[0]
    centre = torch.tensor([16.0, 16.0, 16.0], dtype=torch.float64).view(3, 1, 1, 1)
    off = torch.tensor([6.0, 0.0, 0.0], dtype=torch.float64).view(3, 1, 1, 1)
    img = torch.exp(-((x - centre - off) ** 2).sum(0) / 8.0)[None, None].float()
    z, _ = zoom_pair(img, torch.zeros(1, 3, *grid), [1.5])
    peak = torch.nonzero(z[0, 0] == z[0, 0].max())[0].tolist()
    assert peak == [25, 16, 16]  # 16 + 1.5 · 6


def test_noise_only_touches_the_image():
    cfg = AugmentConfig(noise_std=0.1, max_shift=0, zoom=(1.0, 1.0))
    image, flow = blobs(batch=2), smooth_flow(batch=2)
    img_n, flow_n = augment(image, flow, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(flow_n, flow)
    d = img_n - image
    assert 0.09 < float(d.std()) < 0.11 and abs(float(d.mean())) < 0.01


def test_same_seed_same_output_and_seeds_differ():
    cfg = AugmentConfig()
    image, flow = blobs(batch=2), smooth_flow(batch=2)
    a = augment(image, flow, cfg, torch.Generator().manual_seed(11))
    b = augment(image, flow, cfg, torch.Generator().manual_seed(11))
    c = augment(image, flow, cfg, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert a[0].shape == image.shape and a[1].shape == flow.shape and a[0].dtype == image.dtype


def test_p_zero_is_identity_and_draw_count_is_fixed():
    image, flow = blobs(), smooth_flow()
    img, fl = augment(image, flow, AugmentConfig(p=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(img, image) and torch.equal(fl, flow)
    # The generator advances by the same amount whatever p decided.
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment(image, flow, AugmentConfig(p=0.0), g0)
    augment(image, flow, AugmentConfig(p=1.0), g1)
    assert torch.equal(torch.rand(4, generator=g0), torch.rand(4, generator=g1))


def test_draw_params_ranges():
    p = draw_params(64, AugmentConfig(max_shift=2, zoom=(0.9, 1.1)), torch.Generator().manual_seed(0))
    assert p.shift.shape == (64, 3) and int(p.shift.abs().max()) == 2
    assert float(p.zoom.min()) >= 0.9 and float(p.zoom.max()) <= 1.1
    assert torch.all(p.noise_std == 0.015)


@pytest.mark.parametrize("kwargs", [dict(noise_std=-0.1), dict(max_shift=-1), dict(max_shift=1.5),
                                    dict(zoom=(1.1, 0.9)), dict(zoom=(0.0, 1.0)), dict(zoom=3),
                                    dict(p=1.5)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_config_from_yaml_like_values():
    cfg = AugmentConfig(zoom=[0.8, 1.2], max_shift=3.0)
    assert cfg.zoom == (0.8, 1.2) and cfg.max_shift == 3
    assert cfg.to_dict() == {"noise_std": 0.015, "max_shift": 3, "zoom": [0.8, 1.2], "p": 1.0}


def test_augment_takes_the_config_section_directly():
    """The config's train.augment section and its AugmentConfig copy draw the same augmentation."""
    from cardiomotion.config import load_config
    from cardiomotion.train.augment import augment_config

    section = load_config(None, {"train": {"augment": {"noise_std": 0.05, "max_shift": 3, "zoom": [0.95, 1.05]}}}).train.augment
    copy = augment_config(section)
    assert copy == AugmentConfig(noise_std=0.05, max_shift=3, zoom=(0.95, 1.05), p=1.0)
    assert augment_config(copy) is copy
    image, flow = torch.rand(2, 1, 12, 12, 12), torch.randn(2, 3, 12, 12, 12)
    a = augment(image, flow, section, torch.Generator().manual_seed(3))
    b = augment(image, flow, copy, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
