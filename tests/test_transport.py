"""Motion transport (train/transport.py): known answers for the conjugation, the partner choice,
and a pool built from a twin whose anatomy is a shifted copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from cardiomotion.train.transport import partners, transport_flow, transport_pool

GRID = (20, 20, 20)


def _smooth_field(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    return scale * torch.nn.functional.interpolate(coarse, size=GRID, mode="trilinear", align_corners=True)


def _coords(shape=GRID) -> np.ndarray:
    """(3, I, J, K) voxel coordinates."""
    return np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))


def test_identity_correspondence_keeps_the_motion():
    u = _smooth_field(0)
    w = transport_flow(u, torch.zeros_like(u))
    assert torch.allclose(w, u, atol=1e-12)


def test_constant_correspondence_shifts_the_motion():
    """p ≡ c: the partner is the target moved by c, so w(x) = u(x + c) exactly (integer c, interior)."""
    u = _smooth_field(1)
    c = (2, -1, 3)
    p = torch.tensor(c, dtype=u.dtype).view(1, 3, 1, 1, 1).expand(1, 3, *GRID).contiguous()
    w = transport_flow(u, p)
    want = torch.roll(u, shifts=tuple(-s for s in c), dims=(2, 3, 4))
    inner = (slice(None), slice(None), slice(4, 16), slice(4, 16), slice(4, 16))
    assert torch.allclose(w[inner], want[inner], atol=1e-9)


def test_affine_correspondence_reorients_the_vectors():
    """p(x) = A x + b is affine, so φ_p⁻¹ is too and w(x) = (I + A)⁻¹ u(φ_p(x)); u at φ_p(x) is
    sampled here with scipy (an independent trilinear sampler), not with the project's warp."""
    u = _smooth_field(2, scale=0.8)
    A = np.array([[0.06, -0.03, 0.0], [0.02, -0.05, 0.04], [0.0, 0.03, 0.05]])
    b = np.array([0.4, -0.7, 0.3])
    x = _coords()
    p = np.einsum("ab,bijk->aijk", A, x - 10.0) + b.reshape(3, 1, 1, 1)
    w = transport_flow(u, torch.from_numpy(p)[None])[0].numpy()

    at = x + p
    u_np = u[0].numpy()
    sampled = np.stack([ndimage.map_coordinates(u_np[c], at, order=1, mode="nearest") for c in range(3)])
    want = np.einsum("ab,bijk->aijk", np.linalg.inv(np.eye(3) + A), sampled)
    inner = (slice(None), slice(5, 15), slice(5, 15), slice(5, 15))
    assert np.abs(w[inner] - want[inner]).max() < 1e-3
    # the re-orientation matters here: without it the answer is measurably off
    assert np.abs(sampled[inner] - want[inner]).max() > 0.02


def test_partners_exclude_the_scan_and_do_not_depend_on_who_else_is_there():
    ids = [f"s{n:02d}" for n in range(10)]
    full = partners(ids, 3, seed=0)
    assert all(len(v) == 3 and k not in v and len(set(v)) == 3 for k, v in full.items())
    assert partners(ids, 3, seed=0) == full  # deterministic
    assert partners(ids, 3, seed=1) != full  # and the seed matters
    # a fold without s04: every other scan keeps its partners, s04 replaced where it was chosen
    fold = partners([s for s in ids if s != "s04"], 3, seed=0)
    for k, v in fold.items():
        kept = [s for s in full[k] if s != "s04"]
        assert v[:len(kept)] == kept and "s04" not in v
    assert len(partners(ids[:3], 5, seed=0)["s00"]) == 2  # fewer scans than asked: all the others
    assert partners(ids, 0, seed=0) == {k: [] for k in ids}
    with pytest.raises(ValueError, match="k must be"):
        partners(ids, -1, seed=0)


def _blob(shape, centre, radii) -> np.ndarray:
    x = _coords(shape)
    r = np.sqrt(sum(((x[c] - centre[c]) / radii[c]) ** 2 for c in range(3)))
    return ndimage.gaussian_filter((r < 1).astype(np.float64), 1.0) * 0.8 + 0.1


def test_a_shifted_twin_transports_its_motion_back():
    """Scan b is scan a moved by (2, −1, 1) voxels, motion included; a's pool row from b carries
    b's motion back onto a, which must be a's own motion (up to the registration's error)."""
    shape = (24, 24, 24)
    es_a = _blob(shape, (11.0, 12.5, 11.5), (5.0, 4.0, 6.0))
    u_a = np.zeros((3, *shape))
    u_a[0] = 1.2 * np.exp(-(((_coords(shape) - 11.5) ** 2).sum(0)) / 12.0)  # a smooth push along axis 0
    shift = (2, -1, 1)
    es_b = np.roll(es_a, shift, axis=(0, 1, 2))
    u_b = np.roll(u_a, shift, axis=(1, 2, 3))
    es = torch.from_numpy(np.stack([es_a, es_b])[:, None].astype(np.float32))
    flow = torch.from_numpy(np.stack([u_a, u_b]).astype(np.float32))
    pool = transport_pool(es, flow, ["a", "b"], ["a"], k=1, seed=0, spacing_mm=2.0)
    assert pool.pairs == (("a", "a"), ("a", "b"))
    assert pool.es.shape == (2, 1, *shape) and pool.flow.shape == (2, 3, *shape)
    assert pool.frames is es and pool.frame.tolist() == [0, 0]  # row → frame, no copies of the frames
    assert torch.equal(pool.es[0], es[0]) and torch.equal(pool.es[1], es[0]) and torch.equal(pool.flow[0], flow[0])
    inner = (slice(None), slice(5, 19), slice(5, 19), slice(5, 19))
    back = pool.flow[1].numpy()[inner]
    err = np.abs(back - u_a[inner]).mean()
    moved = np.abs(u_b[inner] - u_a[inner]).mean()  # the motion left where b has it
    assert err < 0.25 * moved, (err, moved)


def test_pool_refuses_what_it_cannot_pair():
    es = torch.zeros(2, 1, 8, 8, 8)
    flow = torch.zeros(2, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="targets not among"):
        transport_pool(es, flow, ["a", "b"], ["c"], k=1, seed=0, spacing_mm=1.0)
    with pytest.raises(ValueError, match="3 scan ids for 2 frames"):
        transport_pool(es, flow, ["a", "b", "c"], ["a"], k=1, seed=0, spacing_mm=1.0)


def test_config_default_is_off_and_negative_is_refused():
    from cardiomotion.config import load_config
    from cardiomotion.errors import ConfigError

    assert load_config(None).train.transport_partners == 0
    assert load_config(None, {"train": {"transport_partners": 3}}).train.transport_partners == 3
    with pytest.raises(ConfigError, match="transport_partners"):
        load_config(None, {"train": {"transport_partners": -1}})


def test_a_pair_that_folds_is_left_out(monkeypatch):
    """A registration whose transported field folds (a failed match) does not enter the pool, and
    neither does one SimpleITK refuses; the own pairs always do."""
    import cardiomotion.train.transport as transport

    shape = (12, 12, 12)
    es = torch.rand(3, 1, *shape)
    flow = torch.zeros(3, 3, *shape)
    folding = np.zeros((3, *shape), dtype=np.float32)
    folding[0, :, :, :] = np.where(np.arange(12) % 2 == 0, 1.5, -1.5)[:, None, None]  # det J < 0 everywhere

    def fake_register(fixed, moving, spacing_mm, **_):
        if float(moving.mean()) == float(es[2, 0].numpy().mean()):
            raise RuntimeError("itk::ERROR: no overlap")
        return folding

    monkeypatch.setattr(transport, "register_frames", fake_register)
    pool = transport.transport_pool(es, flow, ["a", "b", "c"], ["a"], k=2, seed=0, spacing_mm=1.0)
    assert pool.pairs == (("a", "a"),)
    assert sorted(pool.dropped) == [("a", "b"), ("a", "c")]
    assert pool.es.shape[0] == 1


def test_old_sweeps_and_generators_match_while_transport_is_off():
    """``train.transport_partners`` is left out of the sweep fingerprint and the generator's settings
    at 0, so a cv/tune state or a generator.json written before the key resumes or is reused; at
    any other value it is another sweep and another generator."""
    from pathlib import Path

    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility_generators import _generator_want
    from cardiomotion.train.sweep import recorded_fingerprint, sweep_fingerprint

    off = load_config(None)
    on = load_config(None, {"train": {"transport_partners": 2}})
    p = f = Path("/nonexistent")
    now = sweep_fingerprint(p, f, off)
    old = {**now, "train": {k: v for k, v in now["train"].items() if k != "transport_partners"}}
    assert "transport_partners" not in now["train"] and recorded_fingerprint(old, now) == now
    assert sweep_fingerprint(p, f, on)["train"]["transport_partners"] == 2
    assert sweep_fingerprint(p, f, on) != now
    assert "transport_partners" not in _generator_want(off)["train"]
    assert _generator_want(on)["train"]["transport_partners"] == 2


def test_the_fold_pool_holds_training_scans_only(tmp_path_factory, monkeypatch):
    """The worker's pool for fold 1 is built from the fold's training scans (phantom_001, held out,
    is neither a target nor a partner), by one rank holding them all or by two ranks sharing them."""
    from cv_cohort import cohort

    import cardiomotion.train.transport as transport
    from cardiomotion.config import load_config
    from cardiomotion.train.cvae import transported_samples
    from cardiomotion.train.fold import load_samples, plan_fold

    prepared, flows = cohort(tmp_path_factory)
    plan = plan_fold(prepared, flows, 1)
    cfg = load_config(None, {"train": {"transport_partners": 2}})
    seen: list[tuple[list[str], list[str]]] = []
    real = transport.transport_pool

    def spy(es, flow, scan_ids, targets, *args, **kwargs):
        seen.append((list(scan_ids), list(targets)))
        return real(es, flow, scan_ids, targets, *args, **kwargs)

    monkeypatch.setattr(transport, "transport_pool", spy)
    train_ids = list(plan.train_ids)
    assert plan.val_id == "phantom_001" and plan.val_id not in train_ids
    for mine in (train_ids, train_ids[0::2], train_ids[1::2]):
        es, flow = load_samples(plan, mine, cfg.intensity.window)
        pool_es, pool_flow, made = transported_samples(plan, train_ids, mine, cfg, es, flow)
        assert pool_es.shape[0] == len(mine) * 3 - int(made["transport_dropped"])
        assert torch.equal(pool_flow[:len(mine)], flow)  # the own pairs first, unchanged
        assert made["transport_pairs"] == 6.0  # 3 training scans × 2 partners, the fold's total
    assert all(ids == train_ids and set(t) <= set(train_ids) for ids, t in seen)


@pytest.mark.slow
def test_the_cost_bench_times_both_schedules_on_resampled_grids(tmp_path_factory):
    """bench/transport_cost.py: one JSON document, a row per grid, the reference schedule and ours
    timed on the same pair (their ratio is the ratio of the two times), the pool's bytes as k
    decides them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from cv_cohort import cohort

    prepared, flows = cohort(tmp_path_factory)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "transport_cost.py"), "--prepared", str(prepared),
                           "--flows", str(flows), "--grids", "16,24", "--pairs", "1", "--reference", "8,4,2",
                           "--partners", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["reference_iterations"] == [8, 4, 2] and [r["grid"] for r in out["grids"]] == [16, 24]
    for r in out["grids"]:
        assert r["transport_s_per_pair"] > 0 and r["conjugation_s_per_pair"] > 0
        assert r["reference_over_transport"] == pytest.approx(r["reference_s_per_pair"] / r["transport_s_per_pair"],
                                                              rel=0.05, abs=0.02)
        assert r["pool_bytes_per_scan"] == 4 * 4 * 4 * r["grid"] ** 3
    # a folder that is not a prepared one: one line naming it, exit 2
    bad = subprocess.run([sys.executable, str(repo / "bench" / "transport_cost.py"), "--prepared",
                          str(tmp_path_factory.mktemp("empty")), "--flows", str(flows)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("transport_cost: ") and "empty" in bad.stderr


def test_a_pair_cache_gives_the_same_pool_and_registers_each_pair_once_across_folds(tmp_path, monkeypatch):
    """Two leave-one-out folds of 4 scans share a PairCache: the pool with the cache equals the pool
    without it, bitwise; the second fold registers only the pairs the first did not have (those
    with the first fold's held-out scan); a damaged file is computed again; another frame (a
    different scan, e.g. a held-out one) gives another name, so it never reads a stored pair."""
    from cardiomotion.train import transport as tr

    shape = (16, 16, 16)
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c", "d"]
    es = torch.from_numpy(np.stack([_blob(shape, tuple(7.5 + rng.uniform(-1, 1, 3)), (4.0, 3.5, 4.5))
                                    for _ in ids])[:, None].astype(np.float32))
    flow = torch.from_numpy(rng.normal(0, 0.2, (4, 3, *shape)).astype(np.float32))
    calls: list[int] = []
    real = tr.register_frames

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tr, "register_frames", counting)
    cache = tr.PairCache(tmp_path / "pairs")
    fold0 = [1, 2, 3]  # held out: a
    plain = tr.transport_pool(es[fold0], flow[fold0], ids[1:], ids[1:], k=2, seed=0, spacing_mm=2.0)
    assert plain.registered == 6 and len(calls) == 6
    cached = tr.transport_pool(es[fold0], flow[fold0], ids[1:], ids[1:], k=2, seed=0, spacing_mm=2.0, cache=cache)
    assert cached.registered == 6 and len(list((tmp_path / "pairs").glob("*.pt"))) == 6
    assert cached.pairs == plain.pairs and torch.equal(cached.flow, plain.flow)
    again = tr.transport_pool(es[fold0], flow[fold0], ids[1:], ids[1:], k=2, seed=0, spacing_mm=2.0, cache=cache)
    assert again.registered == 0 and torch.equal(again.flow, plain.flow) and len(calls) == 12
    fold1 = [0, 2, 3]  # held out: b; the pairs among c and d are the first fold's
    want = tr.transport_pool(es[fold1], flow[fold1], ["a", "c", "d"], ["a", "c", "d"], k=2, seed=0, spacing_mm=2.0)
    got = tr.transport_pool(es[fold1], flow[fold1], ["a", "c", "d"], ["a", "c", "d"], k=2, seed=0, spacing_mm=2.0,
                            cache=cache)
    shared = sum(1 for t in ("c", "d") for s in ("c", "d") if t != s)
    assert got.registered == 6 - shared and torch.equal(got.flow, want.flow) and got.pairs == want.pairs
    # a damaged file is computed again, and the pool does not change
    victim = sorted((tmp_path / "pairs").glob("*.pt"))[0]
    victim.write_bytes(b"not a field")
    healed = tr.transport_pool(es[fold0], flow[fold0], ids[1:], ids[1:], k=2, seed=0, spacing_mm=2.0, cache=cache)
    assert healed.registered == 1 and torch.equal(healed.flow, plain.flow)
    assert not list((tmp_path / "pairs").glob(".*.tmp*"))
    # the name is the content: another partner motion, frame or spacing is another key
    k0 = cache.key(es[1], es[2], flow[2], 2.0)
    assert k0 != cache.key(es[1], es[2], flow[2] + 1e-3, 2.0) != cache.key(es[1], es[3], flow[2], 2.0)
    assert k0 != cache.key(es[1], es[2], flow[2], 2.5) and k0 == cache.key(es[1].clone(), es[2], flow[2], 2.0)
