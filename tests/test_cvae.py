"""Motion CVAE: shapes on several grids, identity at init, diffeomorphic velocity output,
checkpoint round trip, a few training steps, seeded prior samples. (KL: test_losses.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cardiomotion.flow.metrics import folding_fraction, jacobian_determinant
from cardiomotion.models.cvae import CVAE_KIND, CVAEOutput, MotionCVAE, OutputKind
from cardiomotion.models.pyramid import FeaturePyramid, load_checkpoint
from cardiomotion.train.losses import kl_standard_normal

SMALL = (8, 16, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a busy shared machine OpenMP threads
    that spin-wait for each other make a 2-thread step 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(channels=SMALL, grid=(16, 16, 16), batch=1, seed=0, **kw):
    """(model, pyramid (frozen, eval), es, flow, feats) with smooth random inputs."""
    torch.manual_seed(seed)
    pyr = FeaturePyramid(1, channels).eval().requires_grad_(False)
    model = MotionCVAE(channels, **kw)
    es = F.avg_pool3d(torch.rand(batch, 1, *grid), 3, 1, 1, count_include_pad=False)
    flow = 2.0 * F.interpolate(torch.randn(batch, 3, *(n // 8 for n in grid)), size=grid,
                               mode="trilinear", align_corners=False)
    with torch.no_grad():
        feats = pyr(es)
    return model, pyr, es, flow, feats


@pytest.mark.parametrize("channels,grid,output", [
    (SMALL, (32, 32, 32), "displacement"),
    (SMALL, (32, 48, 64), "displacement"),
    (SMALL, (64, 64, 32), "velocity"),
    (SMALL, (16, 24, 32), "velocity"),
    ((16, 32, 64, 96, 128), (32, 32, 32), "displacement"),
])
def test_shapes_and_identity_at_init(channels, grid, output):
    model, _, es, flow, feats = make(channels, grid, batch=2 if max(grid) <= 32 else 1, output=output)
    model.eval()
    with torch.no_grad():
        out = model(flow, es, feats)
    assert isinstance(out, CVAEOutput)
    b = es.shape[0]
    lat = model.latent_shape(grid)
    assert lat == (channels[-1], *(n // 2 ** len(channels) for n in grid))
    assert out.flow.shape == (b, 3, *grid)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (b, *lat)
    assert torch.equal(out.z, out.mu)  # eval mode: z = mu
    assert float(out.flow.abs().max()) < 1e-2  # near-zero head: identity map at init
    assert torch.isfinite(out.logvar).all()


def test_latent_shapes_default_config():
    m = MotionCVAE()
    assert m.latent_shape((96, 96, 96)) == (128, 3, 3, 3)
    assert m.latent_shape((96, 96, 64)) == (128, 3, 3, 2)
    assert MotionCVAE(SMALL, latent_channels=4).latent_shape((32, 48, 64)) == (4, 4, 6, 8)


def test_bad_grid_and_bad_features_are_rejected():
    model, pyr, es, flow, feats = make(grid=(16, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        model.latent_shape((20, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(flow[..., :12], es[..., :12], pyr(es[..., :12]))
    with pytest.raises(ValueError, match="pyramid"):
        model.encode(flow, es, feats[:2])
    with pytest.raises(ValueError, match="pyramid level 1"):
        model.encode(flow, es, [feats[0], feats[1][:, :3], feats[2]])
    with pytest.raises(ValueError):
        MotionCVAE(SMALL, cond_channels=(8, 16))
    with pytest.raises(ValueError):
        MotionCVAE(SMALL, output="acceleration")


def test_train_mode_samples_eval_mode_uses_mean():
    model, _, es, flow, feats = make()
    model.train()
    out = model(flow, es, feats, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out.z, out.mu)
    model.eval()
    assert torch.equal(model(flow, es, feats).z, model(flow, es, feats).mu)
    drawn = model(flow, es, feats, sample=True, generator=torch.Generator().manual_seed(0))
    again = model(flow, es, feats, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(drawn.z, drawn.mu) and torch.equal(drawn.z, again.z)


def test_velocity_output_does_not_fold():
    """A decoder scaled up to a 2-voxel velocity (as after training) gives a folding-free map,
    while the same field used directly as a displacement folds."""
    vel, _, es, _, feats = make(grid=(32, 32, 32), output=OutputKind.VELOCITY)
    disp = MotionCVAE(SMALL, output="displacement")
    disp.load_state_dict(vel.state_dict())
    vel.eval()
    disp.eval()
    with torch.no_grad():
        torch.nn.init.normal_(vel.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
        z = vel.sample_latent(es, temperature=3.0, generator=torch.Generator().manual_seed(1))
        disp.head.weight.copy_(vel.head.weight)
        v = disp.decode(z, es, feats)
        scale = 2.0 / float(v.abs().max())
        vel.head.weight.mul_(scale)
        disp.head.weight.mul_(scale)
        u_vel = vel.decode(z, es, feats)
        u_disp = disp.decode(z, es, feats)
    assert float(u_disp.abs().max()) == pytest.approx(2.0, rel=1e-4)
    assert float(u_vel.abs().max()) > 0.5
    assert folding_fraction(u_vel) == 0.0 and float(jacobian_determinant(u_vel).min()) > 0
    assert folding_fraction(u_disp) > 0.0


def test_save_load_round_trip(tmp_path):
    model, _, es, flow, feats = make(output="velocity", latent_channels=6, integration_steps=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    path = model.save(tmp_path / "cvae.pt")
    ckpt = load_checkpoint(path, CVAE_KIND)  # weights_only=True inside
    assert ckpt["config"] == {"channels": [8, 16, 32], "cond_channels": [8, 16, 32], "latent_channels": 6,
                              "output": "velocity", "integration_steps": 5, "in_channels": 1}
    loaded = MotionCVAE.load(path).eval()
    assert loaded.output is OutputKind.VELOCITY and loaded.config() == model.config()
    z = model.sample_latent(es, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.decode(z, es, feats), loaded.decode(z, es, feats))
        assert torch.equal(model(flow, es, feats).flow, loaded(flow, es, feats).flow)
    with pytest.raises(ValueError, match="motion_cvae"):
        FeaturePyramid.load(path)


def test_a_few_adam_steps_lower_the_loss():
    model, _, es, flow, feats = make(grid=(16, 16, 16), batch=2, latent_channels=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def loss_of(out):
        return 0.95 * F.mse_loss(out.flow, flow) + 0.05 * kl_standard_normal(out.mu, out.logvar)

    model.eval()
    with torch.no_grad():
        before = float(loss_of(model(flow, es, feats)))
    model.train()
    for _ in range(8):
        opt.zero_grad()
        loss = loss_of(model(flow, es, feats, generator=gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.75)
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(loss_of(model(flow, es, feats)))
    assert after < 0.9 * before, (before, after)  # typically 1.85 → 1.53


def test_prior_samples_are_seeded():
    model, _, es, _, feats = make(grid=(16, 16, 16), batch=2)
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(1e4)  # make the decoded flows depend visibly on z
        model.eval()
        a = model.sample(es, feats, generator=torch.Generator().manual_seed(5))
        b = model.sample(es, feats, generator=torch.Generator().manual_seed(5))
        c = model.sample(es, feats, generator=torch.Generator().manual_seed(6))
        zero = model.sample(es, feats, temperature=0.0, generator=torch.Generator().manual_seed(5))
        z0 = torch.zeros(2, *model.latent_shape((16, 16, 16)))
        assert torch.equal(zero, model.decode(z0, es, feats))
    assert a.shape == (2, 3, 16, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and float((a - c).abs().max()) > 1e-3 * float(a.abs().max())
    z = model.sample_latent(es, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, *model.latent_shape((16, 16, 16)))
    assert torch.equal(z, 2.0 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0)))


def test_parameter_count_default_config():
    m = MotionCVAE()
    n = sum(p.numel() for p in m.parameters())
    assert 4_000_000 < n < 5_000_000  # 4.53 M; the grid does not change it
    assert m.config()["latent_channels"] == 128 and m.config()["output"] == "displacement"
