"""The refinement's support: known weights at known distances, the blood pool it grows from, and a
refinement confined by it (no motion beyond the support, the motion inside kept)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cardiomotion.annotate.refine import refine_flow
from cardiomotion.annotate.support import TAPER_SHARE, blood_pool, motion_support, support_weight
from cardiomotion.flow import warp

BLOOD = (200.0, 800.0)


def test_weight_is_one_within_the_margin_half_at_mid_taper_and_zero_beyond():
    margin = 20.0
    taper = TAPER_SHARE * margin
    d = np.array([0.0, 19.9, 20.0, margin + taper / 2, margin + taper, 100.0])
    w = support_weight(d, margin)
    np.testing.assert_allclose(w, [1, 1, 1, 0.5, 0, 0], atol=1e-6)
    assert w.dtype == np.float32
    assert np.all(np.diff(support_weight(np.linspace(0, 40, 81), margin)) <= 0)  # never rises with distance
    with pytest.raises(ValueError, match="positive"):
        support_weight(d, 0.0)


def test_blood_pool_keeps_the_largest_enhanced_component():
    vol = np.full((20, 20, 20), -800.0)
    vol[2:10, 2:10, 2:10] = 400.0  # 512 voxels
    vol[14:17, 14:17, 14:17] = 400.0  # 27 voxels, apart
    vol[0, 19, 19] = 1500.0  # bone: above the range
    pool = blood_pool(vol, BLOOD)
    assert pool.sum() == 512 and pool[5, 5, 5] and not pool[15, 15, 15]
    assert not blood_pool(np.full((4, 4, 4), 50.0), BLOOD).any()


def test_support_distances_are_millimetres_along_each_axis():
    """A blood cube on an anisotropic grid: 3 voxels of 4 mm along k is 12 mm, 3 voxels of 1 mm
    along i is 3 mm; margin 10 mm, so the first is past the margin and the second inside."""
    es = np.full((30, 30, 30), -800.0, np.float32)
    es[10:15, 10:15, 10:15] = 400.0
    w = motion_support(es, es, (1.0, 2.0, 4.0), BLOOD, margin_mm=10.0)
    assert w.shape == es.shape and w.dtype == np.float32
    assert w[12, 12, 12] == 1.0
    assert w[17, 12, 12] == 1.0  # 3 mm from the cube along i
    assert w[12, 12, 17] == pytest.approx(support_weight(np.array([12.0]), 10.0)[0])  # 12 mm along k: tapering
    assert 0.0 < w[12, 12, 17] < 1.0
    assert w[12, 12, 19] == 0.0  # 20 mm ≥ margin + taper (15 mm)
    assert motion_support(np.zeros_like(es), np.zeros_like(es), 1.0, BLOOD, 10.0) is None  # no blood: no support
    with pytest.raises(ValueError, match="one grid"):
        motion_support(es, es[:-1], 1.0, BLOOD, 10.0)


def test_support_covers_the_blood_of_either_frame():
    """The pull field lives on ED's grid and points into ES: a pool seen in ES only still counts."""
    ed = np.full((16, 16, 16), -800.0, np.float32)
    es = ed.copy()
    ed[2:5, 2:5, 2:5] = 400.0
    es[11:14, 11:14, 11:14] = 400.0
    w = motion_support(es, ed, 1.0, BLOOD, margin_mm=2.0)
    assert w[3, 3, 3] == 1.0 and w[12, 12, 12] == 1.0 and w[8, 8, 8] == 0.0


N = 32


def _local_motion_pair(shift: float = 1.5):
    """A textured blob (smooth noise under a Gaussian envelope) in the middle of an otherwise
    uniform volume, moved by ``shift`` voxels along i within 7 voxels of the centre and not at all
    from 10 voxels on (the heart in still tissue); the support is 1 to 10 voxels and 0 from 15."""
    from cardiomotion.flow.ops import gaussian_smooth

    c = N // 2
    i, j, k = torch.meshgrid(*(torch.arange(N, dtype=torch.float32),) * 3, indexing="ij")
    envelope = torch.exp(-(((i - c) / 4.5) ** 2 + ((j - c) / 4.5) ** 2 + ((k - c) / 4.5) ** 2))
    noise = gaussian_smooth(torch.randn(1, 1, N, N, N, generator=torch.Generator().manual_seed(0)), 1.5)
    texture = 0.5 + noise / (4 * noise.std())
    moving = (envelope * texture.clamp(0, 1)[0, 0])[None, None]
    dist = torch.sqrt((i - c) ** 2 + (j - c) ** 2 + (k - c) ** 2)
    truth = torch.zeros(1, 3, N, N, N)
    truth[:, 0] = shift * ((10 - dist) / 3).clamp(0, 1)
    fixed = warp(moving, truth)
    support = torch.from_numpy(support_weight(dist.numpy(), 10.0))[None, None]
    return fixed, moving, truth, support, dist


def test_a_confined_refinement_moves_nothing_beyond_the_support_and_keeps_the_motion_inside():
    """Without the support the smooth correction carries the blob's motion into the uniform
    corners; with it, voxels whose support and coarse-level neighbours are 0 keep the start (zero)
    exactly, and the blob's motion is still recovered."""
    fixed, moving, truth, support, dist = _local_motion_pair()
    settings = dict(steps=150, smooth_weight=0.001, sigma=2.0, levels=2)
    free = refine_flow(fixed, moving, torch.zeros_like(truth), **settings)
    confined = refine_flow(fixed, moving, torch.zeros_like(truth), support=support, **settings)
    far = (dist >= 15 + 2 * 2)[None, None].expand_as(truth)  # beyond the support by two coarse voxels
    assert float(free[far].abs().max()) > 0.05  # the test can fail: the free refinement moves the corners
    assert float(confined[far].abs().max()) == 0.0
    inner = (dist <= 4)[None].expand(1, 3, N, N, N)

    def err(u):
        return float((u - truth)[inner].view(3, -1).norm(dim=0).mean())

    assert err(confined) < 0.15  # voxels, against a 1.5-voxel motion (free: 0.03; its corners move too)
    assert float((warp(moving, confined) - fixed).abs().mean()) < 0.3 * float((moving - fixed).abs().mean())


def test_a_support_of_ones_changes_nothing_and_a_misshapen_one_is_refused():
    fixed, moving, truth, support, _ = _local_motion_pair()
    settings = dict(steps=40, smooth_weight=0.001, sigma=2.0, levels=2)
    plain = refine_flow(fixed, moving, torch.zeros_like(truth), **settings)
    ones = refine_flow(fixed, moving, torch.zeros_like(truth), support=torch.ones_like(support), **settings)
    torch.testing.assert_close(ones, plain)
    with pytest.raises(ValueError, match="support"):
        refine_flow(fixed, moving, truth, support=support[..., :-1])


def _phantom_pair():
    from cardiomotion.data.phantom import make_patient
    from cardiomotion.data.table import PreparedPair

    p = make_patient(0, grid=32, spacing_mm=4.0)
    es, ed = p.meta["es_phase"], p.meta["ed_phase"]
    return PreparedPair("p0", p.ct[..., es], p.ct[..., ed], p.affine, truth_flow=p.flow_ed_from_es,
                        ed_labels=p.labels[..., ed])


def test_annotate_builds_the_support_from_the_prepared_frames():
    """``annotate``'s support for a phantom pair covers the whole heart at a 20 mm margin (the
    default) and leaves the corners of the crop still; off at 0."""
    from cardiomotion.annotate.stage import Refinement, pair_support
    from cardiomotion.config import load_config
    from cardiomotion.data.phantom import region_masks

    def refinement(margin):
        return Refinement.from_config(load_config(None, {"annotate": {"refine_support_mm": margin}}))

    pair = _phantom_pair()
    assert pair_support(pair, refinement(0)) == (None, None)
    weight, share = pair_support(pair, refinement(20.0))
    w = weight[0, 0].numpy()
    assert w[region_masks(pair.ed_labels)["heart"]].min() == 1.0
    assert w[0, 0, 0] == 0.0 and w[-1, -1, -1] == 0.0
    assert 0.0 < share < 1.0 and share == pytest.approx(float((w > 0).mean()))
    no_blood = type(pair)("p1", np.full_like(pair.es, -500.0), np.full_like(pair.ed, -500.0), pair.affine)
    assert pair_support(no_blood, refinement(20.0)) == (None, 1.0)


def test_the_refinement_reads_annotates_settings():
    """Every ``annotate.refine_*`` setting and the blood range reach the refinement; without a
    support the plain refinement is one key whatever the support's mode and blood range were."""
    from cardiomotion.annotate.stage import Refinement
    from cardiomotion.choices import Similarity, SupportMode
    from cardiomotion.config import load_config

    cfg = load_config(None, {"annotate": {"refine_steps": 7, "refine_lr": 0.3, "refine_smooth_weight": 0.02,
                                          "refine_similarity": "ssim_l1", "ssim_alpha": 0.5, "refine_sigma": 2.0,
                                          "refine_levels": 2, "refine_edge_weight": 4.0, "refine_support_mm": 15.0,
                                          "refine_support_mode": "confine", "refine_volume_weight": 0.05,
                                          "refine_tissue_hu": [-20, 140]},
                             "prepare": {"blood_hu": [150, 700]}})
    r = Refinement.from_config(cfg)
    assert r == Refinement(steps=7, lr=0.3, smooth_weight=0.02, similarity=Similarity.SSIM_L1, alpha=0.5, sigma=2.0,
                           levels=2, edge_weight=4.0, support_mm=15.0, support_mode=SupportMode.CONFINE,
                           blood_hu=(150.0, 700.0), volume_weight=0.05, tissue_hu=(-20.0, 140.0))
    plain = r.without_support()
    assert plain.support_mm == 0.0 and plain.steps == 7 and plain.volume_weight == 0.05
    from dataclasses import replace
    assert replace(r, support_mode=SupportMode.MASK, blood_hu=(1.0, 2.0)).without_support() == plain
    assert len({plain, replace(plain, steps=8)}) == 2  # hashable, a key per refinement


def test_the_delivered_flow_is_the_refinement_weighted_by_the_support():
    """``mask``: exactly the plain refinement times the support (the heart's flow untouched, the
    still tissue beyond the margin at zero); ``confine`` gives another field (its coarse levels
    spread the correction past the support's edge, so it is not zero there); a plain refinement
    already made is weighted, not made again."""
    from dataclasses import replace

    from cardiomotion.annotate.stage import Refinement, refine_pair
    from cardiomotion.choices import SupportMode
    from cardiomotion.config import load_config
    from cardiomotion.data.intensity import hu_to_unit

    pair = _phantom_pair()
    cfg = load_config(None, {"annotate": {"refine_steps": 20, "refine_levels": 2, "refine_support_mm": 0}})
    r = Refinement.from_config(cfg)
    fixed = torch.from_numpy(hu_to_unit(pair.ed, cfg.intensity.window))[None, None]
    moving = torch.from_numpy(hu_to_unit(pair.es, cfg.intensity.window))[None, None]
    zero = torch.zeros(1, 3, *fixed.shape[2:])
    plain = refine_pair(pair, fixed, moving, zero, r)
    assert plain.share is None and plain.support is None and float(plain.flow.abs().max()) > 0
    masked = refine_pair(pair, fixed, moving, zero, replace(r, support_mm=20.0))
    weight = masked.support
    torch.testing.assert_close(masked.flow, weight * plain.flow)
    still = (weight == 0).expand_as(masked.flow)
    assert still.any() and float(plain.flow[still].abs().max()) > 0 and float(masked.flow[still].abs().max()) == 0.0
    assert masked.share == pytest.approx(float((weight > 0).float().mean()))
    confined = refine_pair(pair, fixed, moving, zero, replace(r, support_mm=20.0, support_mode=SupportMode.CONFINE))
    assert not torch.allclose(confined.flow, masked.flow)
    # made: the mask weights the refinement found there (a stand-in field shows it was not made again)
    key = r.without_support()
    made = {key: (torch.ones_like(plain.flow), 12.5)}
    reused = refine_pair(pair, fixed, moving, zero, replace(r, support_mm=20.0), made)
    torch.testing.assert_close(reused.flow, weight.expand_as(plain.flow))
    assert reused.seconds == 12.5 and plain.seconds > 0  # the time of the run that made it
    made = {}
    again = refine_pair(pair, fixed, moving, zero, replace(r, support_mm=25.0), made)
    assert list(made) == [key]
    torch.testing.assert_close(made[key][0], plain.flow)  # the plain refinement is deterministic and kept
    torch.testing.assert_close(again.flow, again.support * plain.flow)


def test_scans_the_support_reaches_whole_are_named():
    import pandas as pd

    from cardiomotion.annotate.stage import support_warning

    assert support_warning(pd.DataFrame({"scan_id": ["a"], "epe_mm": [1.0]})) is None  # no support asked for
    assert support_warning(pd.DataFrame({"scan_id": ["a", "b"], "support_share": [0.7, 0.8]})) is None
    said = support_warning(pd.DataFrame({"scan_id": ["a", "b", "c"], "support_share": [0.7, 1.0, 1.0]}))
    assert said.startswith("the refinement's support reaches the whole grid of 2 of 3 scans (b, c)")


def test_the_volume_term_holds_the_ed_frames_soft_tissue():
    """The tissue the incompressibility term holds is the ED frame's voxels in ``tissue_hu`` —
    the phantom's myocardium (95–125 HU) and not its contrast-enhanced blood pool or lung; none
    without the term or when no voxel lies in the range. A refinement with the term differs from
    one without."""
    from dataclasses import replace

    from cardiomotion.annotate.stage import Refinement, pair_tissue, refine_pair
    from cardiomotion.config import load_config
    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.data.phantom import LV_BLOOD, LV_MYO

    pair = _phantom_pair()
    cfg = load_config(None, {"annotate": {"refine_steps": 10, "refine_levels": 1, "refine_support_mm": 0,
                                          "refine_volume_weight": 0.01}})
    r = Refinement.from_config(cfg)
    assert r.tissue_hu == (0.0, 200.0)
    tissue = pair_tissue(pair, r)[0, 0].numpy()
    labels = pair.ed_labels
    assert tissue[labels == LV_MYO].mean() > 0.5 and tissue[labels == LV_BLOOD].mean() < 0.1
    assert set(np.unique(tissue)) <= {0.0, 1.0} and tissue[0, 0, 0] == 0.0  # a corner: lung
    assert pair_tissue(pair, replace(r, volume_weight=0.0)) is None
    assert pair_tissue(pair, replace(r, tissue_hu=(2000.0, 3000.0))) is None
    fixed = torch.from_numpy(hu_to_unit(pair.ed, cfg.intensity.window))[None, None]
    moving = torch.from_numpy(hu_to_unit(pair.es, cfg.intensity.window))[None, None]
    zero = torch.zeros(1, 3, *fixed.shape[2:])
    held = refine_pair(pair, fixed, moving, zero, r).flow
    assert not torch.equal(held, refine_pair(pair, fixed, moving, zero, replace(r, volume_weight=0.0)).flow)


def test_a_tissue_range_reaching_into_the_blood_is_refused_while_the_volume_term_is_on():
    """The incompressibility term holds the tissue band; one reaching into the contrast-enhanced
    blood would hold the pools whose volume the heart changes: one error naming both settings.
    Touching (top = the blood's bottom, the default) passes, and so does any band with the term off."""
    from cardiomotion.config import load_config
    from cardiomotion.errors import ConfigError

    assert load_config(None, {}).annotate.refine_tissue_hu[1] == load_config(None, {}).prepare.blood_hu[0]
    with pytest.raises(ConfigError, match=r"annotate.refine_tissue_hu \[0.0, 250.0\] reaches into prepare.blood_hu "
                                          r"\[200.0, 800.0\]"):
        load_config(None, {"annotate": {"refine_tissue_hu": [0, 250]}})
    with pytest.raises(ConfigError, match=r"reaches into prepare.blood_hu \[150.0, 800.0\]"):
        load_config(None, {"prepare": {"blood_hu": [150, 800]}})
    load_config(None, {"prepare": {"blood_hu": [150, 800]}, "annotate": {"refine_tissue_hu": [0, 150]}})
    load_config(None, {"annotate": {"refine_tissue_hu": [0, 250], "refine_volume_weight": 0}})
    load_config(None, {"annotate": {"refine_tissue_hu": [0, 250], "refine": False}})
