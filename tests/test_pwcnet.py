"""Feature pyramid, cost volume and 3D PWC-Net: shapes, reference cross-checks, save/load, training."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cardiomotion.flow.warp import identity_grid, warp
from cardiomotion.models import CostVolume, FeaturePyramid, PWCNet3D, cost_offsets, cost_volume, resize_flow
from cardiomotion.train.losses import photometric_loss, pwc_unsupervised_loss

TINY = dict(channels=(8, 16, 24), search_range=1, estimator_channels=(16, 16), context_channels=(16, 16))


# ---------------------------------------------------------------- feature pyramid

@pytest.mark.parametrize("grid", [(32, 32, 32), (32, 48, 40), (16, 64, 24)])
def test_pyramid_level_shapes(grid):
    channels = (4, 6, 8)
    pyr = FeaturePyramid(1, channels)
    feats = pyr(torch.rand(2, 1, *grid))
    assert len(feats) == 3
    for lvl, f in enumerate(feats):
        assert f.shape == (2, channels[lvl], *(n // 2 ** (lvl + 1) for n in grid))


def test_pyramid_default_channels_and_save_load(tmp_path):
    pyr = FeaturePyramid()
    assert pyr.channels == (16, 32, 64, 96, 128)
    x = torch.rand(1, 1, 32, 32, 32)
    feats = pyr(x)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 96, 128]
    assert feats[-1].shape[2:] == (1, 1, 1)
    path = pyr.save(tmp_path / "pyr.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kind"] == "feature_pyramid" and ckpt["config"] == pyr.config()
    again = FeaturePyramid.load(path)
    for a, b in zip(feats, again(x)):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def _ramp(grid, axis):
    """x[..., i, j, k] = index along ``axis`` (float)."""
    idx = torch.arange(grid[axis], dtype=torch.float32).view(*[-1 if a == axis else 1 for a in range(3)])
    return idx.expand(*grid)[None, None].clone()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_aligned_halving_centres_coarse_voxels_where_area_pooling_does(axis):
    """Voxel-centre convention: coarse voxel i sits at fine 2i + 0.5 (area pooling). With box
    weights the aligned halving *is* area pooling away from the border; a 3×3×3 stride-2
    convolution's output i is centred on fine 2i (its centre tap reads exactly 2i)."""
    from cardiomotion.models.pyramid import AlignedDown, downsample

    x = _ramp((8, 10, 12), axis)
    down = AlignedDown(1, 1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[..., 1:3, 1:3, 1:3] = 1 / 8  # the 2×2×2 box inside the 4×4×4 kernel
        down.conv.bias.zero_()
    aligned = down(x)
    pooled = torch.nn.functional.avg_pool3d(x, 2)
    torch.testing.assert_close(aligned, pooled)
    i = torch.arange(x.shape[2 + axis] // 2, dtype=torch.float32)
    line = aligned[0, 0].movedim(axis, 0)[:, 1, 1]
    torch.testing.assert_close(line, 2 * i + 0.5)
    plain = downsample(1, 1, aligned=False)
    with torch.no_grad():
        plain.weight.zero_()
        plain.weight[..., 1, 1, 1] = 1.0
        plain.bias.zero_()
    torch.testing.assert_close(plain(x)[0, 0].movedim(axis, 0)[:, 1, 1], 2 * i)


@pytest.mark.parametrize("grid", [(32, 32, 32), (16, 24, 40), (15, 17, 9)])
def test_aligned_pyramid_shapes_and_save_load(grid, tmp_path):
    """Halvings round up like the plain pyramid's; ``aligned`` survives the file, and is absent
    from a plain pyramid's config (so files written before the option read the same)."""
    plain, aligned = FeaturePyramid(1, (4, 6, 8)), FeaturePyramid(1, (4, 6, 8), aligned=True)
    x = torch.rand(1, 1, *grid)
    assert [f.shape for f in aligned(x)] == [f.shape for f in plain(x)]
    assert "aligned" not in plain.config() and aligned.config()["aligned"] is True
    again = FeaturePyramid.load(aligned.save(tmp_path / "pyr.pt"))
    assert again.aligned and torch.equal(again(x)[-1], aligned(x)[-1])
    net = PWCNet3D(**TINY, aligned=True)
    assert PWCNet3D(**net.config()).pyramid.aligned and "aligned" not in PWCNet3D(**TINY).config()


def test_cvae_follows_an_aligned_pyramid():
    from cardiomotion.config import load_config
    from cardiomotion.train.cvae import build_cvae

    cfg = load_config(None, {})
    pyr = FeaturePyramid(1, (4, 6, 8), aligned=True)
    model = build_cvae(cfg, pyr.config())
    assert model.aligned and all(type(level.down).__name__ == "AlignedDown" for level in model.encoder)
    assert not build_cvae(cfg, FeaturePyramid(1, (4, 6, 8)).config()).aligned
    es, flow = torch.rand(1, 1, 16, 16, 16), torch.zeros(1, 3, 16, 16, 16)
    out = model(flow, es, pyr(es))
    assert out.flow.shape == flow.shape


def test_a_checkpoint_is_the_same_bytes_wherever_it_is_written(tmp_path):
    """Same weights → same file (the corpus identity and the demo's outputs hash model files)."""
    pyr = FeaturePyramid(1, (4, 6))
    a = pyr.save(tmp_path / "a.pt").read_bytes()
    (tmp_path / "sub").mkdir()
    assert pyr.save(tmp_path / "sub" / "b.pt").read_bytes() == a


def test_pyramid_rejects_wrong_input():
    with pytest.raises(ValueError):
        FeaturePyramid(1, (4,))(torch.rand(1, 2, 8, 8, 8))


# ---------------------------------------------------------------- cost volume

def _cost_reference(f1: torch.Tensor, f2: torch.Tensor, r: int) -> np.ndarray:
    """Loop over batch, offsets and voxels; f2 is zero outside its grid."""
    a, b = f1.double().numpy(), f2.double().numpy()
    bsz, c, ni, nj, nk = a.shape
    offs = list(itertools.product(range(-r, r + 1), repeat=3))
    out = np.zeros((bsz, len(offs), ni, nj, nk))
    for n in range(bsz):
        for d, (di, dj, dk) in enumerate(offs):
            for i in range(ni):
                for j in range(nj):
                    for k in range(nk):
                        ii, jj, kk = i + di, j + dj, k + dk
                        if 0 <= ii < ni and 0 <= jj < nj and 0 <= kk < nk:
                            out[n, d, i, j, k] = np.dot(a[n, :, i, j, k], b[n, :, ii, jj, kk]) / c
    return out


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_cost_volume_matches_loop_reference(r, chunk):
    g = torch.Generator().manual_seed(r)
    f1 = torch.randn(2, 3, 4, 5, 3, generator=g)
    f2 = torch.randn(2, 3, 4, 5, 3, generator=g)
    cost = cost_volume(f1, f2, r, chunk=chunk)
    assert cost.shape == (2, (2 * r + 1) ** 3, 4, 5, 3)
    assert cost.device == f1.device and cost.dtype == f1.dtype
    np.testing.assert_allclose(cost.double().numpy(), _cost_reference(f1, f2, r), rtol=1e-5, atol=1e-6)


def test_cost_volume_zero_offset_channel_and_order():
    f = torch.randn(1, 4, 5, 5, 5)
    cost = cost_volume(f, f, 1)
    offs = cost_offsets(1)
    centre = offs.index((0, 0, 0))
    assert centre == 13
    torch.testing.assert_close(cost[:, centre], (f * f).mean(1))
    # Channel of offset (1, 0, 0) reads f2 one voxel further along axis 0.
    d = offs.index((1, 0, 0))
    torch.testing.assert_close(cost[:, d, :-1], (f[:, :, :-1] * f[:, :, 1:]).mean(1))
    assert torch.all(cost[:, d, -1] == 0)


def _cost_autograd(f1: torch.Tensor, f2: torch.Tensor, r: int) -> torch.Tensor:
    """Plain autograd version (pad + shifted slices) to cross-check the custom backward."""
    n = f1.shape[2:]
    f2p = torch.nn.functional.pad(f2, (r,) * 6)
    return torch.stack([(f1 * f2p[:, :, r + a:r + a + n[0], r + b:r + b + n[1], r + c:r + c + n[2]]).mean(1)
                        for a, b, c in cost_offsets(r)], dim=1)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_cost_volume_gradients_match_autograd(chunk):
    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 27, 4, 5, 3, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((cost_volume(f1, f2, 1, chunk=chunk) * w).sum(), (f1, f2))
    want = torch.autograd.grad((_cost_autograd(f1, f2, 1) * w).sum(), (f1, f2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    mod = CostVolume(1, chunk)
    assert mod.out_channels == 27
    f1.grad = None
    mod(f1, f2.detach()).sum().backward()  # only one input needs a gradient
    assert f1.grad is not None


def test_cost_volume_gradcheck():
    g = torch.Generator().manual_seed(4)
    f1 = torch.randn(1, 2, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(1, 2, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cost_volume(a, b, 1, chunk=4), (f1, f2))


# ---------------------------------------------------------------- PWC-Net

def test_pwcnet_shapes_default_32():
    net = PWCNet3D()
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.flow.shape == (1, 3, 32, 32, 32)
    assert [tuple(f.shape[2:]) for f in out.levels] == [(2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    assert float(out.flow.abs().max()) < 1e-6  # zero-initialised heads: starts at the identity


@pytest.mark.parametrize("context", [True, False])
def test_pwcnet_shapes_anisotropic_grid(context):
    net = PWCNet3D(**TINY, context=context)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 32, 48, 40), torch.rand(2, 1, 32, 48, 40))
    assert out.flow.shape == (2, 3, 32, 48, 40)
    assert [tuple(f.shape[2:]) for f in out.levels] == [(4, 6, 5), (8, 12, 10), (16, 24, 20)]
    assert float(out.flow.abs().max()) < 1e-6


def test_pwcnet_finest_level_and_odd_grid():
    net = PWCNet3D(**TINY, finest_level=1)
    with torch.no_grad():
        out = net(torch.rand(1, 1, 30, 36, 28), torch.rand(1, 1, 30, 36, 28))
    assert out.flow.shape == (1, 3, 30, 36, 28)
    assert len(out.levels) == 2


def test_resize_flow_scales_vectors():
    flow = torch.ones(1, 3, 4, 6, 5) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    up = resize_flow(flow, (8, 12, 10))
    torch.testing.assert_close(up, torch.ones(1, 3, 8, 12, 10) * torch.tensor([2.0, -4.0, 1.0]).view(1, 3, 1, 1, 1))


def test_pwcnet_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = PWCNet3D(**TINY)
    for p in net.parameters():  # make the zero-initialised heads non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    fixed, moving = torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16)
    net.eval()
    with torch.no_grad():
        ref = net(fixed, moving)
    path = net.save(tmp_path / "pwc.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kind"] == "pwcnet3d" and ckpt["config"] == net.config()
    again = PWCNet3D.load(path)
    assert again.config() == net.config()
    with torch.no_grad():
        out = again(fixed, moving)
    assert torch.equal(out.flow, ref.flow)
    assert all(torch.equal(a, b) for a, b in zip(out.levels, ref.levels))
    # The trained pyramid can be saved and reused on its own.
    pyr = FeaturePyramid.load(net.pyramid.save(tmp_path / "pyr.pt"))
    assert torch.equal(pyr(fixed)[0], net.pyramid(fixed)[0])
    with pytest.raises(ValueError):
        PWCNet3D.load(tmp_path / "pyr.pt")


def _blobs(n: int, shift: tuple[float, float, float]) -> torch.Tensor:
    """Three Gaussian blobs on an n³ grid, moved by ``shift`` voxels, intensities in [0, 1]."""
    g = identity_grid((n, n, n))
    img = torch.zeros(1, 1, n, n, n)
    for centre, sigma, amp in [((12, 14, 16), 4.0, 1.0), ((20, 18, 12), 3.0, 0.7), ((16, 22, 20), 5.0, 0.5)]:
        c = (torch.tensor(centre, dtype=torch.float32) + torch.tensor(shift)).view(1, 3, 1, 1, 1)
        img = img + amp * torch.exp(-((g - c) ** 2).sum(1, keepdim=True) / (2 * sigma**2))
    return img.clamp(0, 1)


def test_tiny_pwcnet_learns_a_shift():
    torch.manual_seed(0)
    shift = (2.0, -1.5, 1.0)
    fixed, moving = _blobs(32, (0.0, 0.0, 0.0)), _blobs(32, shift)  # fixed(x) = moving(x + shift)
    net = PWCNet3D(**TINY)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.no_grad():
        initial = float(photometric_loss(fixed, warp(moving, net(fixed, moving).flow)))
    for _ in range(30):
        out = net(fixed, moving)
        loss, parts = pwc_unsupervised_loss(fixed, moving, out.levels + [out.flow], [0.5, 0.5, 1.0, 1.0], 0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) >= {"total", "photometric", "smoothness", "photometric/level3"}
    with torch.no_grad():
        flow = net(fixed, moving).flow
        final = float(photometric_loss(fixed, warp(moving, flow)))
    assert final < 0.25 * initial, (initial, final)
    # Pull semantics: the flow points from the fixed grid towards where the moving image has the
    # content, i.e. along +shift.
    mean = flow.mean(dim=(0, 2, 3, 4))
    assert float(torch.dot(mean, torch.tensor(shift))) > 0.5 * float(torch.tensor(shift).norm()) ** 2
