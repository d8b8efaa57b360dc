"""Generative-quality metrics (energy score, spread–skill, magnitude) and synthetic-ED physiology."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cardiomotion.evaluate.generative import ensemble_score, field_norm
from cardiomotion.evaluate.physiology import physiology, summarize_physiology, synthetic_ed_labels

GRID = (6, 5, 4)


def _gaussian_draws(rng, n, mean, sd):
    return mean[None] + sd * rng.standard_normal((n, *mean.shape))


def test_field_norm_known_answer():
    a = np.zeros((1, 3, *GRID))
    a[0, 0] = 3.0
    a[0, 1] = 4.0  # |a(x)| = 5 everywhere
    assert float(field_norm(a)[0]) == pytest.approx(5.0)
    half = np.zeros(GRID, bool)
    half[:3] = True
    b = a.copy()
    b[0, :, 3:] = 0.0  # 5 on half the voxels: RMS = 5/sqrt(2)
    assert float(field_norm(b)[0]) == pytest.approx(5.0 / np.sqrt(2))
    assert float(field_norm(b, mask=half)[0]) == pytest.approx(5.0)


def test_energy_score_of_identical_samples_is_their_error():
    y = np.zeros((3, *GRID))
    x = np.zeros((4, 3, *GRID))
    x[:, 2] = 2.0
    s = ensemble_score(x, y)
    assert s.energy_score == pytest.approx(2.0) and s.mean_pair_distance == 0.0
    assert s.best_of_k == pytest.approx(2.0) and s.spread == 0.0 and s.spread_skill == 0.0
    assert s.magnitude_ratio != s.magnitude_ratio  # y = 0: undefined (nan)


def test_true_sampler_beats_collapsed_and_overdispersed_on_energy_score():
    """Strict propriety in practice: over many held-out draws y ~ N(m, s²), samples from the same
    distribution score lower on average than samples sitting on the mean or spread 3× too wide."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((3, *GRID))
    sd, k, trials = 0.7, 16, 200
    scores = {"true": [], "collapsed": [], "over": [], "under": []}
    for _ in range(trials):
        y = _gaussian_draws(rng, 1, mean, sd)[0]
        scores["true"].append(ensemble_score(_gaussian_draws(rng, k, mean, sd), y).energy_score)
        scores["collapsed"].append(ensemble_score(np.repeat(mean[None], k, 0), y).energy_score)
        scores["over"].append(ensemble_score(_gaussian_draws(rng, k, mean, 3 * sd), y).energy_score)
        scores["under"].append(ensemble_score(_gaussian_draws(rng, k, mean, 0.3 * sd), y).energy_score)
    m = {k_: np.mean(v) for k_, v in scores.items()}
    assert m["true"] < m["collapsed"] and m["true"] < m["over"] and m["true"] < m["under"]
    # In high dimension ‖X − y‖ concentrates at sqrt(2)·σ_total for the truth, σ_total for the
    # collapsed mean: ES(true) = (sqrt(2) − sqrt(2)/2)·σ = σ/sqrt(2), ES(collapsed) = σ (29 % apart).
    sigma = sd * np.sqrt(3)
    assert m["true"] == pytest.approx(sigma / np.sqrt(2), rel=0.05)
    assert m["collapsed"] == pytest.approx(sigma, rel=0.05)


def test_spread_skill_ratio_is_one_for_a_calibrated_ensemble_and_tells_the_failures_apart():
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((3, *GRID))
    for k in (2, 5, 20):
        ratios, ratios_under, ratios_over, mags = [], [], [], []
        for _ in range(300):
            y = _gaussian_draws(rng, 1, mean, 0.5)[0]
            s = ensemble_score(_gaussian_draws(rng, k, mean, 0.5), y)
            ratios.append(s.spread ** 2 * (k + 1) / k)
            ratios_under.append(s.skill ** 2)
            mags.append(s.magnitude_ratio)
            ratios_over.append(ensemble_score(_gaussian_draws(rng, k, mean, 1.5), y).spread_skill)
        # E[skill²] = (1 + 1/K)·E[spread²] for a calibrated ensemble (the finite-K correction)
        assert np.mean(ratios) / np.mean(ratios_under) == pytest.approx(1.0, abs=0.06)
        assert np.mean(ratios_over) > 1.5
        assert np.mean(mags) == pytest.approx(1.0, abs=0.1)
    under = ensemble_score(_gaussian_draws(rng, 8, mean, 0.05), _gaussian_draws(rng, 1, mean, 0.5)[0])
    assert under.spread_skill < 0.3


def test_best_of_k_and_mask():
    y = np.zeros((3, *GRID))
    x = np.zeros((3, 3, *GRID))
    x[0, 0], x[1, 0], x[2, 0] = 1.0, 3.0, -2.0
    s = ensemble_score(x, y)
    assert s.best_of_k == pytest.approx(1.0) and s.mean_error == pytest.approx(2.0)
    # pairs: |1-3| = 2, |1+2| = 3, |3+2| = 5: mean 10/3; ES = 2 − 5/3
    assert s.mean_pair_distance == pytest.approx(10 / 3) and s.energy_score == pytest.approx(2 - 5 / 3)
    with pytest.raises(ValueError, match="mask"):
        ensemble_score(x, y, mask=np.zeros(GRID, bool))
    with pytest.raises(ValueError, match="reference"):
        ensemble_score(x, np.zeros((3, 4, 4, 4)))


@pytest.fixture(scope="module")
def patient():
    from cardiomotion.data.phantom import make_patient

    return make_patient(0, grid=40, noise=False)


def test_physiology_of_the_truth_field_is_the_phantoms_own(patient):
    es = patient.meta["es_phase"]
    lab_es = patient.labels[..., es]
    p = physiology(lab_es, patient.flow_ed_from_es, spacing_mm=patient.meta["spacing_mm"])[0]
    # EF measured on the phantom's own labels (ED and ES rendered separately): within 2.5 points
    assert p.ef == pytest.approx(patient.meta["ef_measured"], abs=0.025)
    assert p.longitudinal_shortening == pytest.approx(patient.meta["params"]["shortening"], abs=0.02)
    assert abs(p.myo_volume_change) < 0.06  # incompressible wall (label-boundary effects only)
    zero = physiology(lab_es, np.zeros_like(patient.flow_ed_from_es), patient.meta["spacing_mm"])[0]
    assert zero.ef == pytest.approx(0.0, abs=1e-6) and zero.longitudinal_shortening == pytest.approx(0.0, abs=1e-9)
    assert zero.myo_volume_change == pytest.approx(0.0, abs=1e-6)
    # half the motion: a smaller EF; the truth field scaled by 0.5 is a weaker heart beat
    half = physiology(lab_es, 0.5 * patient.flow_ed_from_es, patient.meta["spacing_mm"])[0]
    assert 0.1 < half.ef < p.ef - 0.1


def test_synthetic_ed_labels_of_a_translation_move_the_labels():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[4:8, 4:8, 4:8] = 1
    lab[3, 4:8, 4:8] = 2
    u = np.zeros((3, 12, 12, 12), np.float32)
    u[0] = -2.0  # ED(x) = ES(x − 2 e0): everything moves +2 along axis 0
    ed = synthetic_ed_labels(lab, u)
    assert ed.shape == lab.shape
    assert (ed[6:10, 4:8, 4:8] == 1).all() and (ed[5, 4:8, 4:8] == 2).all() and (ed[:5] != 1).all()
    assert synthetic_ed_labels(lab, u[None]).shape == (1, 12, 12, 12)


def test_summarize_physiology():
    from cardiomotion.evaluate.physiology import Physiology

    items = [Physiology(0.5, 0.1, 0.0, 100, 50), Physiology(0.7, 0.2, 0.02, 100, 30)]
    s = summarize_physiology(items)
    assert s["ef_mean"] == pytest.approx(0.6) and s["ef_min"] == 0.5 and s["ef_max"] == 0.7
    assert s["ef_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_physiology_refuses_labels_without_lv():
    with pytest.raises(ValueError, match="LV"):
        physiology(np.zeros((8, 8, 8), np.uint8), np.zeros((3, 8, 8, 8)))


def test_energy_score_accepts_tensors():
    x = torch.zeros(2, 3, *GRID)
    x[1] += 1.0
    s = ensemble_score(x, torch.zeros(3, *GRID))
    assert s.k == 2 and s.mean_pair_distance == pytest.approx(np.sqrt(3))


def test_ejection_fraction_shortcut_matches_physiology(patient):
    from cardiomotion.evaluate.physiology import ejection_fraction

    lab_es = patient.labels[..., patient.meta["es_phase"]]
    full = physiology(lab_es, patient.flow_ed_from_es)[0]
    assert ejection_fraction(lab_es, patient.flow_ed_from_es) == pytest.approx(full.ef, abs=1e-9)


def test_ef_histogram_figure(tmp_path):
    from cardiomotion.evaluate.figures import plot_ef_histogram

    p = plot_ef_histogram([0.55, 0.6, 0.62], [0.5, 0.58, 0.66], tmp_path / "ef.png", truth_ef=0.6, title="fold 0")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
