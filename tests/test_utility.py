"""Downstream utility (`cardiomotion utility`): its pieces with known answers, and one tiny run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cv_cohort import TINY, cohort


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return cohort(tmp_path_factory)


def _pair(prepared, k=0):
    from cardiomotion.data.table import load_pair, read_scan_table

    rows = sorted(read_scan_table(prepared).to_dict("records"), key=lambda r: str(r["scan_id"]))
    return load_pair(prepared, rows[k], with_truth=True)


# --------------------------------------------------------------------------- random fields
def test_random_fields_have_the_asked_magnitude_no_folding_and_depend_on_seed_and_index_only():
    from cardiomotion.evaluate.utility import flow_rms, random_smooth_flow, random_smooth_flows
    from cardiomotion.flow.metrics import folding_fraction

    u = random_smooth_flows(3, (24, 24, 24), rms_vox=1.2, seed=5)
    assert u.shape == (3, 3, 24, 24, 24) and u.dtype == torch.float32
    for f in u:
        assert flow_rms(f[None]) == pytest.approx(1.2, rel=0.02)
        assert folding_fraction(f) == 0.0  # a diffeomorphism's displacement at this magnitude
    assert torch.equal(random_smooth_flow((24, 24, 24), 1.2, 5, 2), u[2])  # field i alone
    assert not torch.allclose(u[0], u[1])
    assert not torch.allclose(random_smooth_flows(1, (24, 24, 24), 1.2, seed=6)[0], u[0])
    # smooth: neighbouring voxels move nearly together (independent voxels would differ by ~1.1×|u|)
    assert (u[:, :, 1:] - u[:, :, :-1]).abs().mean() < 0.4 * u.abs().mean()


# --------------------------------------------------------------------------- the loss
def test_supervised_loss_is_the_weighted_epe_of_every_level():
    from cardiomotion.evaluate.utility import supervised_flow_loss

    target = torch.zeros(2, 3, 16, 16, 16)
    levels = [torch.zeros(2, 3, 4, 4, 4), torch.zeros(2, 3, 8, 8, 8), torch.zeros(2, 3, 16, 16, 16)]
    assert float(supervised_flow_loss(levels, target, [0.25, 0.5, 1.0])) == 0.0
    levels[2][:, 0] = 3.0
    levels[2][:, 1] = 4.0  # EPE 5 voxels everywhere at full resolution
    assert float(supervised_flow_loss(levels, target, [0.25, 0.5, 1.0])) == pytest.approx(5.0)
    # a constant target flow of 2 voxels is 1 voxel at half resolution: a zero coarse flow misses by 1
    target[:, 2] = 2.0
    levels = [torch.zeros(2, 3, 8, 8, 8), target.clone()]
    assert float(supervised_flow_loss(levels, target, [1.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weights"):
        supervised_flow_loss(levels, target, [1.0])


# --------------------------------------------------------------------------- the scores
def test_scores_of_the_truth_and_of_zero_flow(phantom):
    from cardiomotion.evaluate.utility import score_estimate

    prepared, _ = phantom
    pair = _pair(prepared)
    truth = pair.truth_flow
    exact = score_estimate(truth, truth, pair.spacing_mm, pair.ed_labels, pair.es_labels)
    assert exact.epe_mm == 0.0 and exact.epe_myo_mm == 0.0 and exact.folding == 0.0
    zero = score_estimate(np.zeros_like(truth), truth, pair.spacing_mm, pair.ed_labels, pair.es_labels)
    mag = np.linalg.norm(truth, axis=0)
    assert zero.epe_mm == pytest.approx(float(mag.mean()) * pair.spacing_mm, rel=1e-5)
    assert zero.epe_myo_mm == pytest.approx(float(mag[pair.ed_labels == 2].mean()) * pair.spacing_mm, rel=1e-5)
    # pulling the ES labels through the true motion recovers the ED labels better than no motion
    assert exact.dice > zero.dice and exact.dice > 0.8
    # the estimate's motion against the truth's, in the myocardium
    assert exact.magnitude_myo == pytest.approx(1.0) and zero.magnitude_myo == 0.0
    half = score_estimate(0.5 * truth, truth, pair.spacing_mm, pair.ed_labels, pair.es_labels)
    assert half.magnitude_myo == pytest.approx(0.5) and half.as_dict()["magnitude_myo"] == pytest.approx(0.5)
    assert np.isnan(score_estimate(truth, truth, pair.spacing_mm, None, None).magnitude_myo)
    with pytest.raises(ValueError, match="3, I, J, K"):
        score_estimate(truth[None], truth, 4.0, None, None)


def test_summary_averages_seeds_per_scan_then_scans():
    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility_report import format_table, summarize

    cfg = load_config(None)
    rows = [{"scan": "a", "arm": "cvae", "n": 64, "seed": s, "epe_mm": v, "epe_myo_mm": v, "dice": 0.5, "folding": 0.0}
            for s, v in ((0, 1.0), (1, 3.0))]
    rows += [{"scan": "b", "arm": "cvae", "n": 64, "seed": 0, "epe_mm": 4.0, "epe_myo_mm": 4.0, "dice": 0.7,
              "folding": 0.0}]
    refs = [{"scan": "a", "arm": "zero", "epe_mm": 9.0, "epe_myo_mm": 9.0, "dice": 0.1, "folding": 0.0}]
    table = summarize(rows, refs, cfg)
    cv = {r["metric"]: r for r in table if r["arm"] == "cvae"}
    assert cv["epe_mm"]["mean"] == pytest.approx(3.0)  # scan a: (1 + 3) / 2 = 2; scan b: 4 → 3
    assert cv["epe_mm"]["scans"] == 2 and cv["epe_mm"]["runs"] == 3
    assert cv["dice"]["mean"] == pytest.approx(0.6)
    assert cv["epe_mm"]["seed_sd"] == pytest.approx(np.sqrt(2.0))  # scan a's seeds 1 and 3; b has one seed
    assert cv["dice"]["seed_sd"] == 0.0
    partial = summarize(rows + [{"scan": "b", "arm": "cvae", "n": 64, "seed": 1, "epe_mm": float("nan"), "dice": 0.9,
                                 "folding": 0.0}], refs, cfg)  # a row without one score, another with a NaN
    cvp = {r["metric"]: r for r in partial if r["arm"] == "cvae"}
    assert cvp["epe_myo_mm"]["mean"] == pytest.approx(3.0) and cvp["epe_mm"]["mean"] == pytest.approx(3.0)
    assert cvp["dice"]["mean"] == pytest.approx((0.5 + 0.8) / 2)  # scan b: seeds 0.7 and 0.9
    zero = [r for r in table if r["arm"] == "zero" and r["metric"] == "epe_mm"][0]
    assert zero["n"] == 0 and zero["mean"] == 9.0 and zero["seed_sd"] is None
    text = format_table(table)
    assert "cvae" in text and "zero" in text and "3.000" in text
    # the magnitude score is summarised where rows hold it, left out where none does (older rows)
    assert not any(r["metric"] == "magnitude_myo" for r in table)
    mag = summarize([{**r, "magnitude_myo": 0.8 if r["scan"] == "a" else 0.9} for r in rows], refs, cfg)
    assert [r["mean"] for r in mag if r["metric"] == "magnitude_myo"] == [pytest.approx(0.85)]


def test_paired_differences_compare_arms_scan_by_scan():
    """A corpus arm exactly 0.5 mm better than the annotated arm on every scan: delta −0.5 with a
    zero-width interval and every scan a win, even though the scans' own spread (1–4 mm) makes
    the two arms' marginal intervals overlap. Against an arm it ties with on average (±1 per
    scan) the interval covers 0."""
    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility_report import format_paired, paired_differences, summarize

    cfg = load_config(None)
    base = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    noise = {"a": 1.0, "b": -1.0, "c": 1.0, "d": -1.0}

    def row(scan, arm, n, v, seed=0):
        return {"scan": scan, "arm": arm, "n": n, "seed": seed, "epe_mm": v, "epe_myo_mm": v, "dice": 1 - v / 10,
                "folding": 0.0}

    rows = [row(s, "annotated", 43, v + 0.5) for s, v in base.items()]
    rows += [row(s, "cvae", 256, v - 0.2, seed=0) for s, v in base.items()]  # seeds 0, 1 average to v
    rows += [row(s, "cvae", 256, v + 0.2, seed=1) for s, v in base.items()]
    rows += [row(s, "random", 256, v + noise[s]) for s, v in base.items()]
    rows += [row(s, "random", 64, 0.0) for s in base]  # another N: never compared with cvae at 256
    refs = [{"scan": s, "arm": "zero", "epe_mm": 9.0, "epe_myo_mm": 9.0, "dice": 0.1, "folding": 0.0} for s in base]
    everything = paired_differences(rows, refs, cfg)
    paired = {(r["vs_arm"], r["vs_n"], r["metric"]): r for r in everything if r["arm"] == "cvae"}
    assert {(a, n) for a, n, _ in paired} == {("annotated", 43), ("random", 256), ("zero", 0)}
    # the scaling pair: random at its largest N (256) against itself at 64, and never the other way
    scaling = [r for r in everything if r["arm"] == "random"]
    assert {(r["n"], r["vs_arm"], r["vs_n"]) for r in scaling} == {(256, "random", 64)}
    rs = [r for r in scaling if r["metric"] == "epe_myo_mm"][0]
    assert rs["delta"] == pytest.approx(np.mean([v + noise[s] for s, v in base.items()])) and rs["wins"] == 0
    ann = paired[("annotated", 43, "epe_myo_mm")]
    assert ann["arm"] == "cvae" and ann["n"] == 256
    assert ann["delta"] == pytest.approx(-0.5) and ann["ci_low"] == pytest.approx(-0.5) and ann["ci_high"] == pytest.approx(-0.5)
    assert ann["wins"] == 4 and ann["scans"] == 4
    dice = paired[("annotated", 43, "dice")]
    assert dice["delta"] == pytest.approx(0.05) and dice["wins"] == 4  # higher Dice is the better one
    marginal = {(r["arm"], r["metric"]): r for r in summarize(rows, refs, cfg)}
    assert marginal[("cvae", "epe_myo_mm")]["ci_high"] > marginal[("annotated", "epe_myo_mm")]["ci_low"]  # overlap
    rnd = paired[("random", 256, "epe_myo_mm")]
    assert rnd["delta"] == pytest.approx(0.0) and rnd["ci_low"] < 0 < rnd["ci_high"] and rnd["wins"] == 2
    assert "annotated" in format_paired(list(paired.values())) and "4/4" in format_paired(list(paired.values()))
    import re

    assert re.search(r"student_t intervals exclude zero for a true tie [4-6]% over 4 scans", format_paired(list(paired.values())))
    assert re.search(r"percentile intervals exclude zero for a true tie (1[5-9]|2[0-5])% over 4 scans",
                     format_paired(list(paired.values()), method="percentile"))


def test_comparison_pairs_are_the_old_rules_plus_each_synthetic_arms_scaling_pairs():
    from cardiomotion.evaluate.utility_report import comparison_pairs

    synthetic = ("cvae", "random", "cvae+annotated", "cvae>annotated")
    keys = [("annotated", 43), ("unsupervised", 43), ("zero", 0), ("demons", 0)]
    keys += [(a, n) for a in synthetic for n in (64, 256, 4096)]
    pairs = comparison_pairs(keys)
    assert len(pairs) == len(set(pairs)) and not any((o, s) in pairs for s, o in pairs)  # once, one way
    scaling = {(s, o) for s, o in pairs if s[0] == o[0]}
    assert scaling == {((a, 4096), (a, n)) for a in synthetic for n in (64, 256)}
    rest = set(pairs) - scaling
    real = [("annotated", 43), ("unsupervised", 43), ("zero", 0), ("demons", 0)]
    corpus = ("cvae", "cvae+annotated", "cvae>annotated")
    want = {((a, n), o) for a in corpus for n in (64, 256, 4096) for o in real + [("random", n)]}
    # the arms that also see the real pairs against the corpus alone; not against each other
    want |= {((a, n), ("cvae", n)) for a in ("cvae+annotated", "cvae>annotated") for n in (64, 256, 4096)}
    assert rest == want
    # the transductive arms: against every arm without a generator; target against cvae (does the
    # held-out anatomy help?), annotated+target against target (do the real pairs add to it?)
    target = comparison_pairs(keys + [("target", 256), ("annotated+target", 256)])
    new = {(s, o) for s, o in target if "target" in s[0] or "target" in o[0]}
    assert new == ({(("target", 256), o) for o in real + [("random", 256), ("cvae", 256)]}
                   | {(("annotated+target", 256), o) for o in real + [("random", 256), ("target", 256)]})
    # the transport arm (no generator): against the arms without one but random (its N is its own);
    # every generated arm against it
    moved = comparison_pairs(keys + [("transport", 215)])
    new = {(s, o) for s, o in moved if "transport" in (s[0], o[0])}
    assert new == ({(("transport", 215), o) for o in real}
                   | {((a, n), ("transport", 215)) for a in corpus for n in (64, 256, 4096)})
    collide = comparison_pairs(keys + [("transport", 64)])  # its N equal to a corpus size: still not random
    assert not any(s[0] == "transport" and o[0] == "random" for s, o in collide)
    both = comparison_pairs(keys + [("transport", 215), ("target", 256), ("annotated+target", 256)])
    assert {(("target", 256), ("transport", 215)), (("annotated+target", 256), ("transport", 215))} <= set(both)
    # the anchored arm (the CVAE's variation around the transport pool): against the arms without a
    # generator, random at its N, transport (the fields it starts from) and cvae (prior samples instead)
    anch = comparison_pairs(keys + [("transport", 215), ("anchored", 256)])
    assert {(s, o) for s, o in anch if "anchored" in (s[0], o[0])} == {
        (("anchored", 256), o) for o in real + [("random", 256), ("cvae", 256), ("transport", 215)]}


def test_the_fine_tuned_arm_reads_the_corpus_then_the_pairs():
    """``pretrain_then`` gives exactly n batches of the first stream, then the second's for good;
    the pre-training steps are the share of the budget, rounded, leaving both phases a step."""
    import itertools

    from cardiomotion.evaluate.utility import pretrain_steps, pretrain_then

    first, then = itertools.count(0), itertools.count(100)
    assert list(itertools.islice(pretrain_then(first, then, 3), 6)) == [0, 1, 2, 100, 101, 102]
    assert list(itertools.islice(pretrain_then(iter([]), iter([7, 8]), 0), 5)) == [7, 8]
    assert pretrain_steps(1000, 0.5) == 500 and pretrain_steps(1000, 0.25) == 250
    assert pretrain_steps(3, 0.01) == 1 and pretrain_steps(3, 0.99) == 2 and pretrain_steps(1, 0.5) == 0
    # names that MLflow and Ray Train accept, one per arm
    from cardiomotion.config import UtilityArm

    tags = {a.tag for a in UtilityArm}
    assert len(tags) == len(UtilityArm) and all(t.replace("_", "").isalnum() for t in tags)
    assert UtilityArm("cvae+annotated").tag == "cvae_annotated" and UtilityArm("cvae>annotated").tag == "cvae_then_annotated"


def _utility_axes(monkeypatch, rows, refs, tmp_path):
    """The figure's axes (saving replaced by capturing the figure)."""
    from cardiomotion.config import load_config
    from cardiomotion.evaluate import figures
    from cardiomotion.evaluate.utility_report import per_scan_means, summarize, utility_figure

    got = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi=None: got.setdefault("fig", fig) and path)
    utility_figure(summarize(rows, refs, load_config(None)), tmp_path / "u.png", per_scan=per_scan_means(rows, refs))
    return got["fig"].axes


def test_utility_figure_notes_what_zero_flow_would_squash_and_pairs_the_scans(monkeypatch, tmp_path):
    scans = {"a": 0.0, "b": 0.1, "c": -0.1, "d": 0.05}

    def row(scan, arm, n, v):
        return {"scan": scan, "arm": arm, "n": n, "seed": 0, "epe_mm": v, "epe_myo_mm": v, "dice": 0.9, "folding": 0.0}

    rows = [row(s, "annotated", 43, 2.5 + d) for s, d in scans.items()]
    rows += [row(s, "cvae", 64, 2.6 + d) for s, d in scans.items()] + [row(s, "cvae", 256, 2.4 + d) for s, d in scans.items()]
    rows += [row(s, "random", 256, 9.1 + d) for s, d in scans.items()]  # on the zero-flow plateau
    refs = [{"scan": s, "arm": "zero", "epe_mm": 9.0 + d, "epe_myo_mm": 9.0 + d, "dice": 0.6, "folding": 0.0}
            for s, d in scans.items()]
    ax, bx = _utility_axes(monkeypatch, rows, refs, tmp_path)
    note = " ".join(t.get_text() for t in ax.texts)
    assert "zero flow 9.0" in note and "random (N 256) 9.1" in note and "cvae" not in note
    assert 2.4 < ax.get_ylim()[1] < 9.0  # the learned arms set the scale
    labels = {t.get_text() for t in bx.get_legend().get_texts()}
    assert labels == {"vs annotated (N 43)", "vs cvae (N 64)", "vs random (N 256)"}  # subject: cvae at N 256
    assert "off the axis" not in bx.get_xlabel() and bx.get_xlim()[1] < 10  # random on the plateau is drawn, nothing is off the axis

    # a diverged random estimator on scan b (32 mm, far above zero flow's worst 9.1) is named, not drawn
    diverged = [{**r, "epe_myo_mm": 32.0} if (r["arm"], r["scan"]) == ("random", "b") else r for r in rows]
    _, bx = _utility_axes(monkeypatch, diverged, refs, tmp_path)
    assert bx.get_xlabel().splitlines()[1:] == ["off the axis (worse than zero flow):", "random (N 256) on b: 32.00"]
    assert bx.get_xlim()[1] < 10
    assert sum(len(c.get_offsets()) for c in bx.collections) == 11  # 3 arms × 4 scans less the one named

    # zero flow's interval so wide that no arm is below it: no note, nothing claimed to be off the axis
    wide = [{**r, "epe_myo_mm": v} for r, v in zip(refs, (2.0, 16.0, 2.0, 16.0))]
    ax, _ = _utility_axes(monkeypatch, [r for r in rows if r["arm"] != "random"], wide, tmp_path)
    assert not ax.texts


# --------------------------------------------------------------------------- training
def test_estimator_learns_a_known_translation_from_synthetic_pairs():
    """Supervised on pairs that differ by a known constant shift, the estimator's error on a new
    image with the same shift falls well below the zero-flow error."""
    from cardiomotion.evaluate.utility import Batch, EstimatorSettings, level_weights_for, train_estimator
    from cardiomotion.flow.warp import warp
    from cardiomotion.models.pwcnet import PWCNet3D

    torch.manual_seed(0)
    grid = (16, 16, 16)
    shift = torch.zeros(1, 3, *grid)
    shift[:, 0] = 1.5

    def pairs(n, seed):
        g = torch.Generator().manual_seed(seed)
        es = torch.nn.functional.avg_pool3d(torch.rand((n, 1, *grid), generator=g), 3, 1, 1)
        return es, warp(es, shift.expand(n, -1, -1, -1, -1))

    es, ed = pairs(8, 1)

    def stream():
        while True:
            yield Batch(es[:4], ed[:4], shift.expand(4, -1, -1, -1, -1))
            yield Batch(es[4:], ed[4:], shift.expand(4, -1, -1, -1, -1))

    model = PWCNet3D(channels=(8, 16), search_range=1, estimator_channels=(16, 16))
    settings = EstimatorSettings(steps=60, batch_size=4, lr=3e-3, level_weights=level_weights_for(2, None),
                                 smooth_weight=0.0, ssim_alpha=0.85)
    losses = train_estimator(model, stream(), settings)
    assert len(losses) == 60 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    es_t, ed_t = pairs(2, 2)
    model.eval()
    with torch.no_grad():
        pred = model(ed_t, es_t).flow
    err = torch.linalg.vector_norm(pred - shift, dim=1).mean()
    assert err < 0.5 * 1.5  # zero flow errs by 1.5 voxels


def test_estimator_steps_on_clipped_gradients(monkeypatch):
    """``grad_clip``: every Adam step sees a gradient of norm ≤ the clip (and > it without one)."""
    from cardiomotion.evaluate.utility import Batch, EstimatorSettings, level_weights_for, train_estimator
    from cardiomotion.models.pwcnet import PWCNet3D

    seen: list[float] = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    torch.manual_seed(0)
    grid = (16, 16, 16)
    es = torch.rand(2, 1, *grid)
    batch = Batch(es, es.roll(1, 2), torch.full((2, 3, *grid), 2.0))

    def stream():
        while True:
            yield batch

    for clip in (None, 1e-3):
        seen.clear()
        model = PWCNet3D(channels=(8, 16), search_range=1, estimator_channels=(16, 16))
        settings = EstimatorSettings(steps=3, batch_size=2, lr=1e-3, level_weights=level_weights_for(2, None),
                                     smooth_weight=0.0, ssim_alpha=0.85, grad_clip=clip)
        train_estimator(model, stream(), settings)
        assert len(seen) == 3
        if clip is None:
            assert min(seen) > 1e-2  # a 2-voxel target: the raw gradient is far above the clip below
        else:
            assert max(seen) <= clip * (1 + 1e-4)


def test_estimator_rate_follows_its_schedule(monkeypatch):
    """``utility.lr_schedule``: the rate each Adam step uses is lr for constant and
    lr·(1 + cos(π·s/steps))/2 for cosine; the estimator identity names the schedule only when not
    constant (rows made before the key stay comparable)."""
    import math

    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility import Batch, EstimatorSettings, level_weights_for, train_estimator
    from cardiomotion.evaluate.utility_plan import estimator_identity, estimator_settings
    from cardiomotion.models.pwcnet import PWCNet3D

    rates: list[float] = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    grid = (16, 16, 16)
    es = torch.rand(1, 1, *grid)
    batch = Batch(es, es, torch.zeros(1, 3, *grid))
    for schedule, want in (("constant", [1e-3] * 4), ("cosine", [1e-3 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)])):
        rates.clear()
        settings = EstimatorSettings(steps=4, batch_size=1, lr=1e-3, level_weights=level_weights_for(2, None),
                                     smooth_weight=0.0, ssim_alpha=0.85, lr_schedule=schedule)
        train_estimator(PWCNet3D(channels=(8, 16), search_range=1, estimator_channels=(16, 16)),
                        iter(lambda: batch, None), settings)
        assert rates == pytest.approx(want)
    cosine = load_config(None, {"utility": {"lr_schedule": "cosine"}})
    assert estimator_settings(cosine, 3).lr_schedule == "cosine" and estimator_identity(cosine)["lr_schedule"] == "cosine"
    assert "lr_schedule" not in estimator_identity(load_config(None))


def test_sources_give_unit_images_and_voxel_flows(phantom):
    from cardiomotion.evaluate.utility import PairSource, RandomFieldSource, flow_rms
    from cardiomotion.flow.warp import warp

    prepared, _ = phantom
    pair = _pair(prepared)
    window = (-200.0, 600.0)
    es = pair.es[None]
    src = RandomFieldSource(es, n=3, rms_vox=1.0, seed=0, window=window)
    b = src.batch([0, 2])
    assert b.es.shape == (2, 1, 32, 32, 32) and b.flow.shape == (2, 3, 32, 32, 32)
    assert 0.0 <= float(b.es.min()) and float(b.ed.max()) <= 1.0
    assert flow_rms(b.flow) == pytest.approx(1.0, rel=0.02)
    # ED is the ES frame warped by the field (in HU, rounded as a corpus stores it)
    from cardiomotion.data.intensity import hu_to_unit

    ed_hu = warp(torch.from_numpy(es[None]).float(), b.flow[:1]).round()
    assert torch.allclose(b.ed[:1], hu_to_unit(ed_hu, window))
    real = PairSource(es, pair.ed[None], pair.truth_flow[None], window).batch([0, 0])
    assert real.flow.shape == (2, 3, 32, 32, 32) and torch.equal(real.es[0], real.es[1])
    assert PairSource(es, pair.ed[None], None, window).batch([0]).flow is None


def test_the_transport_arm_warps_each_frame_by_its_own_and_its_partners_carried_motion():
    """Scan b is scan a moved by (2, -1, 1) voxels, motion included: a's row from b carries b's
    motion back onto a (a's own motion, up to the registration's error), and every row's ED is its
    ES frame warped by the row's field, rounded to HU as a corpus stores it."""
    from scipy import ndimage

    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.evaluate.utility import TransportSource
    from cardiomotion.flow.warp import warp

    shape = (24, 24, 24)
    x = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    r = np.sqrt(sum(((x[c] - m) / s) ** 2 for c, m, s in zip(range(3), (11.0, 12.5, 11.5), (5.0, 4.0, 6.0))))
    es_a = ndimage.gaussian_filter((r < 1).astype(np.float64), 1.0) * 400.0 - 100.0  # HU
    u_a = np.zeros((3, *shape))
    u_a[0] = 1.2 * np.exp(-(((x - 11.5) ** 2).sum(0)) / 12.0)
    shift = (2, -1, 1)
    es = np.stack([es_a, np.roll(es_a, shift, axis=(0, 1, 2))]).astype(np.float32)
    flows = np.stack([u_a, np.roll(u_a, shift, axis=(1, 2, 3))]).astype(np.float32)
    window = (-200.0, 600.0)
    src = TransportSource.build(es, flows, ["a", "b"], k=1, seed=0, spacing_mm=2.0, window=window)
    assert len(src) == 4 and src.dropped == ()
    assert src.pairs == (("a", "a"), ("b", "b"), ("a", "b"), ("b", "a"))
    assert src.frame.tolist() == [0, 1, 0, 1]
    assert torch.equal(src.flows[0], torch.from_numpy(flows[0]))
    inner = (slice(None), slice(5, 19), slice(5, 19), slice(5, 19))
    back = src.flows[2].numpy()[inner]
    moved = np.abs(flows[1][inner] - u_a[inner]).mean()
    assert np.abs(back - u_a[inner]).mean() < 0.25 * moved
    b = src.batch([2, 1])
    assert b.es.shape == (2, 1, *shape) and b.flow.shape == (2, 3, *shape)
    es_hu = torch.from_numpy(es[[0, 1]])[:, None]
    assert torch.equal(b.es, hu_to_unit(es_hu, window))
    want_ed = warp(es_hu, torch.stack([src.flows[2], src.flows[1]])).round()
    assert torch.allclose(b.ed, hu_to_unit(want_ed, window))


def test_the_anchored_arm_keeps_its_anchors_and_adds_the_decoders_variation(phantom):
    """AnchoredSource: at T 0 every sample is its anchor; the first m samples take each of the m
    pool rows once; at T 2 sample i is w + D(μ + 2ε_i) − D(μ), checked against the same formula
    computed alone for that sample (ε_i from sample_seed, as a corpus draws it); ED is the warp."""
    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility import AnchoredSource, TransportSource, _unit, warped_ed
    from cardiomotion.evaluate.utility_estimator import training_arrays
    from cardiomotion.generate.engine import sample_seed
    from cardiomotion.models.pyramid import FeaturePyramid
    from cardiomotion.train.cvae import build_cvae

    prepared, flows = phantom
    cfg = load_config(None, TINY)
    window = cfg.intensity.window
    ids = ["phantom_001", "phantom_002"]
    es, _, fl = training_arrays(str(prepared), str(flows), ids)
    shifted = torch.from_numpy(fl[::-1].copy()) * 0.5  # a second row per frame: another field on it
    pool = TransportSource(es, ids, torch.cat([torch.from_numpy(fl), shifted]),
                           [("phantom_001", "phantom_001"), ("phantom_002", "phantom_002"),
                            ("phantom_001", "phantom_002"), ("phantom_002", "phantom_001")], [], window)
    torch.manual_seed(0)
    pyramid = FeaturePyramid(channels=cfg.annotate.pwc.channels).eval()
    model = build_cvae(cfg, pyramid.config()).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)  # a decoder that moves (the head starts near zero)
    still = AnchoredSource(pool, model, pyramid, n=6, seed=3, temperature=0.0, cond_window=window)
    assert sorted(still.anchor[:4].tolist()) == [0, 1, 2, 3] and len(still) == 6
    assert torch.allclose(still.fields(range(6)), pool.flows[still.anchor], atol=1e-5)
    moved = AnchoredSource(pool, model, pyramid, n=6, seed=3, temperature=2.0, cond_window=window)
    assert torch.equal(moved.anchor, still.anchor)
    got = moved.fields([0, 5])
    assert torch.equal(got, moved.fields([0, 5]))
    for j, i in enumerate((0, 5)):
        a = int(moved.anchor[i])
        frame = int(pool.frame[a])
        cond = _unit(pool.es_hu[frame:frame + 1], window)
        with torch.no_grad():
            feats = pyramid(cond)
            mu, _ = model.encode(pool.flows[a:a + 1], cond, feats)
            eps = torch.randn(mu.shape[1:], generator=torch.Generator().manual_seed(sample_seed(3, i)))[None]
            want = pool.flows[a:a + 1] + model.decode(mu + 2.0 * eps, cond, feats) - model.decode(mu, cond, feats)
        assert torch.allclose(got[j:j + 1], want, atol=1e-5)
        assert (got[j] - pool.flows[a]).abs().max() > 0.005  # the decoder's variation is there
    b = moved.batch([0, 5])
    es_rows = pool.es_hu[pool.frame[moved.anchor[[0, 5]]]]
    assert torch.equal(b.flow, got) and torch.equal(b.es, _unit(es_rows, window))
    assert torch.equal(b.ed, _unit(warped_ed(es_rows, got), window))


def test_a_folds_transport_pool_is_registered_once_and_read_by_its_other_seeds(phantom, tmp_path, monkeypatch):
    """transport_source: the first estimator of a fold registers and writes the pool; another seed
    reads the same fields without registering; other partners, or a damaged file, rebuild it."""
    from dataclasses import replace

    from cardiomotion.config import load_config
    from cardiomotion.evaluate import utility_job
    from cardiomotion.evaluate.utility import TransportSource
    from cardiomotion.evaluate.utility_estimator import training_arrays, transport_source
    from cardiomotion.evaluate.utility_plan import plan_runs

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "utility": {"arms": ["transport"], "seeds": 2, "transport_partners": 1}})
    ids = ["phantom_001", "phantom_002"]
    runs = [replace(r, transport_file=str(tmp_path / "transport_pool.pt"), transport_pairs_dir=str(tmp_path / "pairs"))
            for r in plan_runs(0, "phantom_000", ids, cfg, prepared=str(prepared), flows=str(flows), corpus_dir=None,
                               model_uri=None, frames_dir=None, rms_vox=1.0, spacing_mm=4.0)]
    assert [(r.arm, r.n, r.seed) for r in runs] == [("transport", 4, 0), ("transport", 4, 1)]
    assert all(r.spacing_mm == 4.0 for r in runs)  # the fold's spacing travels with the run
    es, _, fl = training_arrays(str(prepared), str(flows), ids)
    first = transport_source(runs[0], cfg, es, fl)
    assert (tmp_path / "transport_pool.pt").is_file() and not list(tmp_path.glob(".*.tmp*"))
    assert len(first) == 4 and torch.equal(first.flows[:2], torch.from_numpy(fl).half().float())
    assert first.registered == 2 and len(list((tmp_path / "pairs").glob("*.pt"))) == 2  # one file per pair
    built: list[int] = []
    real = TransportSource.build.__func__

    def counting(cls, *a, **kw):
        built.append(1)
        return real(cls, *a, **kw)

    monkeypatch.setattr(TransportSource, "build", classmethod(counting))
    second = transport_source(runs[1], cfg, es, fl)
    assert not built and second.pairs == first.pairs and torch.equal(second.flows, first.flows)
    assert second.registered == 0
    b0, b1 = first.batch([2, 3]), second.batch([2, 3])
    assert torch.equal(b0.ed, b1.ed) and torch.equal(b0.flow, b1.flow)
    more = cfg.model_copy(deep=True)
    more.utility.transport_partners = 2  # 2 training scans: each has 1 partner at most
    assert transport_source(runs[0], more, es, fl).registered == 0  # a new pool of the pairs already registered
    assert len(built) == 1
    (tmp_path / "transport_pool.pt").write_bytes(b"not a pool")
    assert len(transport_source(runs[0], cfg, es, fl)) == 4 and len(built) == 2
    wider = cfg.model_copy(deep=True)
    wider.intensity.window = (-300.0, 700.0)  # registration sees other images: another pool
    assert transport_source(runs[0], wider, es, fl).registered == 2  # other images: other pairs
    assert len(built) == 3 and not list(tmp_path.glob(".*.tmp*"))
    assert utility_job.TRANSPORT_POOL == "transport_pool.pt"
    with pytest.raises(ValueError, match="needs its fold's spacing_mm"):
        transport_source(replace(runs[0], spacing_mm=None, transport_file=None), cfg, es, fl)


def test_the_random_arms_magnitude_is_the_rms_of_the_training_flows_read_once_per_scan(phantom, tmp_path):
    import shutil

    from cardiomotion.evaluate.utility import flow_rms
    from cardiomotion.evaluate.utility_estimator import annotated_flow_rms, training_arrays
    from cardiomotion.errors import InputError
    from cardiomotion.flow.io import read_flow, write_flow

    prepared, flows = phantom
    ids = ["phantom_001", "phantom_002"]
    want = flow_rms(training_arrays(str(prepared), str(flows), ids)[2])  # the stack's RMS
    cache: dict = {}
    assert annotated_flow_rms(str(prepared), str(flows), ids, cache) == pytest.approx(want, rel=1e-5)
    assert sorted(cache) == ids
    # a second fold sharing a scan reads only the new one: the cached scan's file is not opened again
    copy = tmp_path / "flows"
    shutil.copytree(flows, copy)
    (copy / "phantom_001" / "flow.nii.gz").unlink()
    both = flow_rms(training_arrays(str(prepared), str(flows), ["phantom_001", "phantom_000"])[2])
    assert annotated_flow_rms(str(prepared), str(copy), ["phantom_001", "phantom_000"], cache) == pytest.approx(both, rel=1e-5)
    # a flow on another grid is refused, naming the file
    u, affine = read_flow(copy / "phantom_002" / "flow.nii.gz")
    write_flow(copy / "phantom_002" / "flow.nii.gz", u[:, :16], affine)
    with pytest.raises(InputError, match="phantom_002.*flow grid"):
        annotated_flow_rms(str(prepared), str(copy), ["phantom_002"])


def test_every_arm_without_a_corpus_trains_and_scores_in_process(phantom):
    """run_estimator (what each Ray Train worker runs) for the real-pair and random arms: finite
    scores of the held-out pair, seeded (the same run twice gives the same numbers)."""
    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility_estimator import run_estimator
    from cardiomotion.evaluate.utility_plan import plan_runs

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "utility": {"arms": ["random", "annotated", "unsupervised", "transport"],
                                                 "sizes": [4], "seeds": 1, "steps": 2, "batch_size": 2,
                                                 "transport_partners": 1}})
    runs = plan_runs(0, "phantom_000", ["phantom_001", "phantom_002"], cfg, prepared=str(prepared),
                     flows=str(flows), corpus_dir=None, model_uri=None, frames_dir=None, rms_vox=1.0,
                     spacing_mm=4.0)
    # the transport arm: each of the 2 training frames with its own motion and 1 partner's
    assert [(r.arm, r.n) for r in runs] == [("random", 4), ("annotated", 2), ("unsupervised", 2), ("transport", 4)]
    assert len({r.steps for r in runs}) == 1
    scores = [run_estimator(run, cfg) for run in runs]
    for run, a in zip(runs, scores):
        assert np.isfinite(a["epe_mm"]) and a["epe_mm"] > 0 and 0 <= a["dice"] <= 1, (run.arm, a)
    assert scores[3]["transport_dropped"] == 0 and scores[3]["transport_s"] > 0
    assert all("transport_dropped" not in a for a in scores[:3])
    assert run_estimator(runs[0], cfg)["epe_mm"] == pytest.approx(scores[0]["epe_mm"], rel=1e-6)


def test_the_fine_tuned_arm_trains_on_the_corpus_then_on_the_annotated_pairs(phantom, monkeypatch):
    """cvae>annotated in the worker: exactly ``pretrain_share`` of its steps on the corpus batches
    it is given, the rest on the training pairs with their annotated flows; the share, when not
    the default, is part of the estimators' identity (rows made before it still match)."""
    import torch

    from cardiomotion.config import load_config
    from cardiomotion.evaluate import utility as ut
    from cardiomotion.evaluate.utility_estimator import run_estimator
    from cardiomotion.evaluate.utility_plan import estimator_identity, plan_runs

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "utility": {"arms": ["cvae>annotated"], "sizes": [4], "seeds": 1, "steps": 5,
                                                 "batch_size": 2, "pretrain_share": 0.4}})
    (run,) = plan_runs(0, "phantom_000", ["phantom_001", "phantom_002"], cfg, prepared=str(prepared),
                       flows=str(flows), corpus_dir="unused", model_uri="unused", frames_dir="unused", rms_vox=1.0)
    assert (run.arm, run.n, run.steps) == ("cvae>annotated", 4, 5)
    shape = (2, 1, *TINY["prepare"]["grid"])
    marked = (ut.Batch(torch.zeros(shape), torch.zeros(shape), torch.full((2, 3, *shape[2:]), 7.0)) for _ in range(99))
    seen = []

    def recording(model, batches, settings, **kw):
        seen.extend(next(batches) for _ in range(settings.steps))
        return [0.0] * settings.steps

    monkeypatch.setattr(ut, "train_estimator", recording)
    run_estimator(run, cfg, batches=marked)
    from_corpus = [bool((b.flow == 7.0).all()) for b in seen]
    assert from_corpus == [True, True, False, False, False]  # round(0.4 · 5) = 2 corpus steps, then the pairs
    assert all(b.flow is not None and b.es.shape == shape for b in seen)
    assert estimator_identity(cfg)["pretrain_share"] == 0.4
    assert "pretrain_share" not in estimator_identity(load_config(None, TINY))


def test_the_target_arms_train_on_the_held_out_es_corpus_alone_or_alternating_with_the_pairs(phantom, monkeypatch):
    """target: every step on the batches of the held-out ES frame's corpus, the training pairs never
    read; annotated+target: the annotated pairs and that corpus, batch about; neither reads the
    training scans' corpus, and both are synthetic arms planned at each N with the target corpus."""
    import torch

    from cardiomotion.config import UtilityArm, load_config
    from cardiomotion.evaluate import utility as ut
    from cardiomotion.evaluate import utility_estimator as ue
    from cardiomotion.evaluate.utility_plan import plan_runs

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "utility": {"arms": ["target", "annotated+target"], "sizes": [4], "seeds": 1,
                                                 "steps": 4, "batch_size": 2}})
    runs = plan_runs(0, "phantom_000", ["phantom_001", "phantom_002"], cfg, prepared=str(prepared),
                        flows=str(flows), corpus_dir="train_corpus", model_uri="m", frames_dir="train_view",
                        rms_vox=1.0, target_corpus_dir="target_corpus", target_frames_dir="target_view")
    assert [(r.arm, r.n, r.corpus_dir, r.target_corpus_dir, r.target_frames_dir) for r in runs] == [
        ("target", 4, None, "target_corpus", "target_view"), ("annotated+target", 4, None, "target_corpus", "target_view")]
    assert all(UtilityArm(r.arm).generated and not UtilityArm(r.arm).uses_corpus for r in runs)
    shape = (2, 1, *TINY["prepare"]["grid"])

    def marked():
        return (ut.Batch(torch.zeros(shape), torch.zeros(shape), torch.full((2, 3, *shape[2:]), 9.0)) for _ in range(99))

    seen = []

    def recording(model, batches, settings, **kw):
        seen.append([next(batches) for _ in range(settings.steps)])
        return [0.0] * settings.steps

    monkeypatch.setattr(ut, "train_estimator", recording)
    read_pairs = []
    real = ue.training_arrays
    monkeypatch.setattr(ue, "training_arrays", lambda *a: read_pairs.append(a) or real(*a))
    ue.run_estimator(runs[0], cfg, target_batches=marked())
    assert read_pairs == [] and [bool((b.flow == 9.0).all()) for b in seen[0]] == [True] * 4
    ue.run_estimator(runs[1], cfg, target_batches=marked())
    assert len(read_pairs) == 1 and [bool((b.flow == 9.0).all()) for b in seen[1]] == [False, True, False, True]
    assert all(b.flow is not None and b.es.shape == shape for b in seen[1])


def test_a_budget_that_scales_with_n_gives_each_estimator_its_steps(phantom, monkeypatch):
    """utility.epochs: a synthetic arm at N trains max(steps, ceil(epochs·N / batch)) steps, the real
    arms the largest N's; the worker trains exactly its run's steps; without epochs nothing changes."""
    from cardiomotion.config import load_config
    from cardiomotion.evaluate import utility as ut
    from cardiomotion.evaluate.utility_estimator import run_estimator
    from cardiomotion.evaluate.utility_plan import estimator_identity, plan_runs

    fixed = load_config(None, {"utility": {"sizes": [64, 256, 4096], "steps": 1000, "batch_size": 4}}).utility
    assert [fixed.steps_for(n) for n in (64, 256, 4096, None)] == [1000, 1000, 1000, 1000]
    scaled = fixed.model_copy(update={"epochs": 16.0})
    assert [scaled.steps_for(n) for n in (64, 256, 4096, None)] == [1000, 1024, 16384, 16384]
    assert scaled.model_copy(update={"epochs": 0.5}).steps_for(4096) == 1000  # the floor: steps
    odd = load_config(None, {"utility": {"sizes": [90], "steps": 1, "batch_size": 3, "epochs": 1.1}}).utility
    assert odd.steps_for(90) == 33  # 1.1·90/3 is 33.00000000000001 in floats: no extra step
    from cardiomotion.errors import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, {"utility": {"epochs": float("inf")}})

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "utility": {"arms": ["random", "annotated"], "sizes": [2, 6], "seeds": 1,
                                                 "steps": 1, "epochs": 1, "batch_size": 2}})
    runs = plan_runs(0, "phantom_000", ["phantom_001", "phantom_002"], cfg, prepared=str(prepared),
                     flows=str(flows), corpus_dir=None, model_uri=None, frames_dir=None, rms_vox=1.0)
    assert [(r.arm, r.n, r.steps) for r in runs] == [("random", 2, 1), ("random", 6, 3), ("annotated", 2, 3)]
    trained, real = [], ut.train_estimator

    def counting(model, batches, settings, **kw):  # the steps the worker really took
        losses = real(model, batches, settings, **kw)
        trained.append(len(losses))
        return losses

    monkeypatch.setattr(ut, "train_estimator", counting)
    assert [run_estimator(r, cfg)["steps"] for r in runs] == [1, 3, 3] and trained == [1, 3, 3]
    # the rows of a fixed budget are not those of a scaling one: the identity tells them apart, both ways
    from pathlib import Path

    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility_plan import check_budgets, check_identity

    fixed_cfg = load_config(None, TINY)
    assert "epochs" not in estimator_identity(fixed_cfg) and estimator_identity(cfg)["epochs"] == 1
    scaled_row = {"arm": "random", "n": 2, "seed": 0, "estimator": estimator_identity(cfg)}
    with pytest.raises(InputError, match=r"other estimator settings \(.*epochs 1\.0 → None"):
        check_identity(Path("runs.jsonl"), [scaled_row], estimator_identity(fixed_cfg))
    # a finished row is reused only with the steps its plan gives it now: a larger largest N moves
    # the real arms' budget (3 → 4 steps), not the synthetic arms' at the same N
    rows = [{"scan": "phantom_000", "arm": r.arm, "n": r.n, "seed": r.seed, "steps": r.steps} for r in runs]
    check_budgets(Path("runs.jsonl"), rows, runs, cfg)
    larger = cfg.model_copy(deep=True)
    larger.utility.sizes = [2, 8]
    replanned = plan_runs(0, "phantom_000", ["phantom_001", "phantom_002"], larger, prepared=str(prepared),
                          flows=str(flows), corpus_dir=None, model_uri=None, frames_dir=None, rms_vox=1.0)
    with pytest.raises(InputError, match=r"annotated N 2 seed 0 of phantom_000 was trained for 3 steps, this plan gives it 4"):
        check_budgets(Path("runs.jsonl"), rows, replanned, larger)
    check_budgets(Path("runs.jsonl"), rows, [r for r in replanned if r.arm == "random" and r.n == 2], larger)


# --------------------------------------------------------------------------- the stage
def test_utility_refuses_scans_without_truth_before_any_work(phantom, tmp_path, capsys):
    """Held-out pairs are scored against exact truth: a prepared set without it is one line, exit 2."""
    import shutil

    import pandas as pd

    from cardiomotion.cli import main

    prepared, flows = phantom
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    table = pd.read_parquet(copy / "scans.parquet")
    table["truth_flow_path"] = None
    table.to_parquet(copy / "scans.parquet")
    rc = main(["utility", "--prepared", str(copy), "--flows", str(flows), "--out", str(tmp_path / "u"),
               "--folds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "exact truth" in err[0], err
    assert not (tmp_path / "u" / "runs.jsonl").exists()


def test_a_folder_made_from_other_inputs_is_refused(tmp_path):
    """inputs.json pins a folder to its prepared and flows folders and to the flows' content: the
    same ones pass, other annotations — another folder, or the same folder annotated again — are
    one error naming the difference; a folder without the record, or with one made before the
    content hash, adopts."""
    from cardiomotion.errors import InputError
    from cardiomotion.annotate.stage import flows_fingerprint
    from cardiomotion.evaluate.utility_plan import INPUTS_FILE, check_inputs, record_inputs

    out, p, a, b = tmp_path / "u", tmp_path / "P", tmp_path / "A", tmp_path / "A_cos"
    (a / "s1").mkdir(parents=True)
    (a / "s1" / "flow.nii.gz").write_bytes(b"flow one")
    (a / "feature_pyramid.pt").write_bytes(b"pyramid")
    want = check_inputs(out, p, a)
    assert want == {"prepared": str(p.resolve()), "flows": str(a.resolve()), "flows_sha256": flows_fingerprint(a)}
    assert not (out / INPUTS_FILE).exists()
    record_inputs(out, want)
    assert json.loads((out / INPUTS_FILE).read_text()) == want
    assert check_inputs(out, p, a) == want
    with pytest.raises(InputError, match=r"inputs.json: .*other inputs \(flows: .*/A\" then, .*/A_cos\" now\)"):
        check_inputs(out, p, b)
    assert check_inputs(tmp_path / "older", p, b)["flows"] == str(b.resolve())  # no record yet: adopts
    record_inputs(out, {"prepared": "x", "flows": "y"})  # an existing complete record is never overwritten
    assert json.loads((out / INPUTS_FILE).read_text()) == want
    (a / "feature_pyramid.pt").write_bytes(b"another pyramid")  # annotated again in place
    with pytest.raises(InputError, match=r"content changed since"):
        check_inputs(out, p, a)
    (a / "feature_pyramid.pt").write_bytes(b"pyramid")
    (a / "s1" / "flow.nii.gz").write_bytes(b"flow two")
    with pytest.raises(InputError, match=r"content changed since"):
        check_inputs(out, p, a)
    (a / "s1" / "flow.nii.gz").write_bytes(b"flow one")
    (a / "fold_pyramids" / "s1").mkdir(parents=True)  # what utility itself trains inside the folder
    (a / "fold_pyramids" / "s1" / "feature_pyramid.pt").write_bytes(b"fold")
    assert check_inputs(out, p, a) == want
    paths_only = {"prepared": want["prepared"], "flows": want["flows"]}  # recorded before the content hash
    (out / INPUTS_FILE).write_text(json.dumps(paths_only))
    assert check_inputs(out, p, a) == want
    record_inputs(out, want)
    assert json.loads((out / INPUTS_FILE).read_text()) == want  # adopted: pinned from now on
    (out / INPUTS_FILE).write_text("{not json")  # a damaged record is one error, never re-adopted
    with pytest.raises(InputError, match="inputs.json: is unreadable"):
        check_inputs(out, p, a)


def test_a_generator_recorded_before_train_resources_is_reused(phantom, tmp_path):
    """generator.json written before ``train.resources`` and ``train.transport_partners`` existed
    (flat resource keys in its settings, no transport key) names the same generator: it is
    reused, not trained again — but not by a plan that trains with transport."""
    from cardiomotion.config import load_config
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility_generators import GENERATOR_RECORD, _fold_generator, _generator_want, _recorded_settings

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store")})
    old_train = {k: v for k, v in cfg.train.model_dump(mode="json").items()
                 if k not in ("resources", "transport_partners")}
    old_train.update(use_gpu=None, gpus_per_worker=1.0, cpus_per_worker=0.5)
    (tmp_path / GENERATOR_RECORD).write_text(json.dumps({
        "model_uri": "runs:/abc/model", "run_id": "abc",
        "settings": {"train": old_train, "pyramid": cfg.cv.pyramid.value, "seed": cfg.seed}}))
    said: list[str] = []
    assert _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, cfg, said.append) == "runs:/abc/model"
    assert not said  # nothing trained, nothing said
    (tmp_path / GENERATOR_RECORD).write_text('{"model_uri": "runs:/abc/mo')  # cut off mid-write by hand
    with pytest.raises(InputError, match="generator.json"):
        _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, cfg, said.append)
    moved = cfg.model_copy(deep=True)
    moved.train.transport_partners = 2
    rec = {"settings": {"train": old_train, "pyramid": cfg.cv.pyramid.value, "seed": cfg.seed}}
    assert _recorded_settings(rec, _generator_want(moved), moved) != _generator_want(moved)


def test_fold_generators_are_adopted_from_a_folder_made_from_the_same_inputs_only(phantom, tmp_path):
    """--generators: another utility folder's fold CVAEs serve a run from the same inputs and
    settings (its generator.json copied; _fold_generator then trains nothing); other inputs, a
    generator trained otherwise, an unreadable record, a model that does not open, the --out
    itself, or a folder holding its own generator are refused, with nothing written; a fold the
    source lacks is said and left to train."""
    from cardiomotion.config import load_config
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility_generators import (GENERATOR_RECORD, _fold_generator, _generator_want,
                                                          plan_adoption, write_adoption)
    from cardiomotion.evaluate.utility_plan import INPUTS_FILE, check_inputs, record_inputs
    from cardiomotion.layout import utility_fold_dir
    from cardiomotion.generate.synthetic import make_random_model_dir

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store")})
    src, out = tmp_path / "U", tmp_path / "U2"
    inputs = check_inputs(src, prepared, flows)
    record_inputs(src, inputs)
    want = _generator_want(cfg)
    other = cfg.model_copy(deep=True)
    other.train.epochs = cfg.train.epochs + 1

    def lend(scan: str, settings: dict, uri: str | None = None) -> str:
        uri = uri or str(make_random_model_dir(tmp_path / "models" / scan, grid=(32, 32, 32), channels=(8, 16, 32)))
        utility_fold_dir(src, scan).mkdir(parents=True, exist_ok=True)
        (utility_fold_dir(src, scan) / GENERATOR_RECORD).write_text(json.dumps(
            {"model_uri": uri, "run_id": scan, "settings": settings}))
        return uri

    uri0, uri1 = lend("phantom_000", want), lend("phantom_001", want)
    said: list[str] = []
    copies = plan_adoption(src, out, ["phantom_000", "phantom_001", "phantom_002"], inputs, cfg, said.append)
    assert not out.exists()  # planned, nothing written
    assert [c[1]["model_uri"] for c in copies] == [uri0, uri1]
    assert len(said) == 1 and "phantom_002" in said[0] and "trained here" in said[0]
    write_adoption(copies)
    got = json.loads((utility_fold_dir(out, "phantom_001") / GENERATOR_RECORD).read_text())
    assert got["model_uri"] == uri1 and got["adopted_from"].endswith("phantom_001/" + GENERATOR_RECORD)
    quiet: list[str] = []
    assert _fold_generator(prepared, flows, 1, "phantom_001", utility_fold_dir(out, "phantom_001"), cfg,
                           quiet.append) == uri1 and not quiet  # reused, nothing trained
    assert plan_adoption(src, out, ["phantom_000"], inputs, cfg) == []  # a rerun: adopted before
    # a fold that passes, then one trained with other settings: refused before anything is written
    lend("phantom_002", _generator_want(other))
    with pytest.raises(InputError, match=r"phantom_000/generator.json: was trained with other settings "
                                         r"\(train.epochs: 2 then, 3 now\)"):
        plan_adoption(src, tmp_path / "U3", ["phantom_002", "phantom_000"], inputs, other)
    assert plan_adoption(src, tmp_path / "U3", ["phantom_002"], inputs, other)  # that fold alone would pass
    assert not (tmp_path / "U3").exists()
    # a model that does not open in this tracking store, a record without a model, an unreadable one
    lend("phantom_003", want, uri="runs:/0123456789abcdef/model")
    with pytest.raises(InputError, match=r"phantom_003/generator.json: its model does not open here"):
        plan_adoption(src, tmp_path / "U4", ["phantom_003"], inputs, cfg)
    (utility_fold_dir(src, "phantom_003") / GENERATOR_RECORD).write_text(json.dumps({"settings": want}))
    with pytest.raises(InputError, match=r"phantom_003/generator.json: records no model URI"):
        plan_adoption(src, tmp_path / "U4", ["phantom_003"], inputs, cfg)
    (utility_fold_dir(src, "phantom_003") / GENERATOR_RECORD).write_text("{not json")
    with pytest.raises(InputError, match=r"phantom_003/generator.json: is unreadable"):
        plan_adoption(src, tmp_path / "U4", ["phantom_003"], inputs, cfg)
    # a folder holding its own generator of the fold keeps it; the --out itself is no source
    (utility_fold_dir(out, "phantom_000") / GENERATOR_RECORD).write_text(json.dumps(
        {"model_uri": "runs:/own/model", "run_id": "own", "settings": want}))
    with pytest.raises(InputError, match=r"U2/folds/phantom_000/generator.json: this folder holds its own generator"):
        plan_adoption(src, out, ["phantom_000"], inputs, cfg)
    (utility_fold_dir(out, "phantom_000") / GENERATOR_RECORD).write_text('{"model_uri": "runs:/own/mo')  # cut off
    with pytest.raises(InputError, match=r"U2/folds/phantom_000/generator.json: is unreadable"):
        plan_adoption(src, out, ["phantom_000"], inputs, cfg)
    with pytest.raises(InputError, match=r"names the --out folder itself"):
        plan_adoption(src, src, ["phantom_000"], inputs, cfg)
    # generators made from other annotations, or from a folder that is no utility folder
    elsewhere = {**inputs, "flows_sha256": "0" * 64}
    with pytest.raises(InputError, match=r"inputs.json: its fold generators were made from other inputs \(the flows"):
        plan_adoption(src, tmp_path / "U4", ["phantom_000"], elsewhere, cfg)
    with pytest.raises(InputError, match=r"is not a utility folder"):
        plan_adoption(tmp_path / "nothing", tmp_path / "U4", ["phantom_000"], inputs, cfg)
    (src / INPUTS_FILE).write_text(json.dumps({k: v for k, v in inputs.items() if k != "flows_sha256"}))
    with pytest.raises(InputError, match=r"records no fingerprint"):
        plan_adoption(src, tmp_path / "U4", ["phantom_000"], inputs, cfg)
    (src / INPUTS_FILE).write_text("{not json")
    with pytest.raises(InputError, match=r"inputs.json: is unreadable"):
        plan_adoption(src, tmp_path / "U4", ["phantom_000"], inputs, cfg)
    assert not (tmp_path / "U4").exists()


def test_a_per_fold_generator_follows_its_pyramid_settings(phantom, tmp_path, monkeypatch):
    """With per-fold pyramids the generator depends on annotate's settings: a record made before
    they were recorded (every pyramid then trained at the constant rate) is reused by a constant
    plan only; the cosine default, or a record with other pyramid settings, trains a new one."""
    from cardiomotion.annotate.stage import pyramid_settings
    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility_generators import GENERATOR_RECORD, _fold_generator, _what_trains

    prepared, flows = phantom
    trained: list[str] = []
    said: list[str] = []

    class _Res:
        model_uri, run_id = "runs:/new/model", "new"

    def fake_train_fold(*args, name, **kw):  # what would be trained, not a training
        trained.append(name)
        return _Res()

    import cardiomotion.train.cvae as cvae_mod

    monkeypatch.setattr(cvae_mod, "train_fold", fake_train_fold)

    def cfg_for(schedule):
        return load_config(None, {**TINY, "storage_root": str(tmp_path / "store"),
                                  "cv": {**TINY["cv"], "pyramid": "per_fold"}, "annotate": {"lr_schedule": schedule}})

    def write_record(settings):
        (tmp_path / GENERATOR_RECORD).write_text(json.dumps({"model_uri": "runs:/old/model", "run_id": "old",
                                                              "settings": settings}))

    constant = cfg_for("constant")
    legacy = {"train": _what_trains(constant.train.model_dump(mode="json")), "pyramid": "per_fold", "seed": constant.seed}
    write_record(legacy)
    assert _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, constant, said.append) == "runs:/old/model"
    assert not trained and not said
    write_record(legacy)
    assert _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, cfg_for("cosine"), said.append) == "runs:/new/model"
    assert len(trained) == 1 and "trained with other settings" in said[0]
    recorded = json.loads((tmp_path / GENERATOR_RECORD).read_text())["settings"]
    assert recorded["pyramid_settings"] == pyramid_settings(cfg_for("cosine"))  # the new record names them
    assert _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, cfg_for("cosine"), said.append) == "runs:/new/model"
    assert len(trained) == 1  # and is reused by the same plan
    # a record whose pyramid settings still held the refinement's keys (before stop 40) is reused
    with_refine = {**recorded, "pyramid_settings": {**recorded["pyramid_settings"], "refine": True,
                                                    "refine_steps": 300, "refine_smooth_weight": 0.03}}
    write_record(with_refine)
    assert _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, cfg_for("cosine"), said.append) == "runs:/old/model"
    assert len(trained) == 1
    other_epochs = {**with_refine, "pyramid_settings": {**with_refine["pyramid_settings"], "epochs": 2}}
    write_record(other_epochs)  # refinement keys aside, another pyramid: trained again
    assert _fold_generator(prepared, flows, 0, "phantom_000", tmp_path, cfg_for("cosine"), said.append) == "runs:/new/model"
    assert len(trained) == 2


def test_a_gpu_asked_of_a_cluster_without_one_is_refused_before_any_work(phantom, tmp_path, ray_session):
    from cardiomotion.config import load_config
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility_job import run_utility

    prepared, flows = phantom
    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store"),
                             "utility": {"resources": {"use_gpu": True}}})
    with pytest.raises(InputError, match="utility.resources.use_gpu: is true but the Ray cluster has no GPU"):
        run_utility(prepared, flows, tmp_path / "u", cfg, folds=[0])
    assert not (tmp_path / "u" / "runs.jsonl").exists()
    assert not (tmp_path / "u" / "inputs.json").exists()  # a refused run pins the folder to nothing


def test_a_damaged_shared_pyramid_is_refused_before_any_estimator_trains(phantom, tmp_path):
    """cv.pyramid shared with feature_pyramid.pt overwritten: `utility` with the cvae arm is refused at
    once, naming the file, before Ray starts and before anything is written (it trained the other arms
    and wrote its table first); an arm that needs no generator does not read the pyramid."""
    import shutil

    from cardiomotion.config import load_config
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility_job import run_utility

    prepared, flows = phantom
    damaged = tmp_path / "flows"
    shutil.copytree(flows, damaged)
    (damaged / "feature_pyramid.pt").write_bytes(b"not a checkpoint")
    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store"), "cv": {"pyramid": "shared"},
                             "utility": {"arms": ["annotated", "cvae"], "sizes": [4], "steps": 2}})
    with pytest.raises(InputError, match=r"flows/feature_pyramid.pt: not a feature-pyramid checkpoint"):
        run_utility(prepared, damaged, tmp_path / "u", cfg, folds=[0])
    assert not (tmp_path / "u").exists()  # the folder this call made is not left behind
    truncated = tmp_path / "flows_cut"  # a flow file cut short: refused before the folder records its inputs
    shutil.copytree(flows, truncated)
    cut = truncated / "phantom_001" / "flow.nii.gz"
    cut.write_bytes(cut.read_bytes()[:200])
    (tmp_path / "u").mkdir()  # a folder the user made: kept, and nothing recorded in it
    with pytest.raises(InputError, match=r"phantom_001/flow.nii.gz"):
        run_utility(prepared, truncated, tmp_path / "u", cfg, folds=[0])
    assert (tmp_path / "u").is_dir() and list((tmp_path / "u").iterdir()) == []
    from cardiomotion.evaluate.utility_generators import check_generator_inputs
    from cardiomotion.evaluate.utility_plan import plan_runs
    from cardiomotion.train.fold import plan_fold

    plan = plan_fold(prepared, damaged, 0, pyramid="shared")
    real_only = cfg.model_copy(update={"utility": cfg.utility.model_copy(update={"arms": [cfg.utility.arms[0]]})})
    runs = plan_runs(0, plan.val_id, plan.train_ids, real_only, prepared=str(prepared), flows=str(damaged),
                     corpus_dir=None, model_uri=None, frames_dir=None, rms_vox=1.0)
    check_generator_inputs(prepared, damaged, [plan], {plan.val_id: runs}, set(), tmp_path / "u", set(), real_only)
