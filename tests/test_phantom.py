"""The analytic beating-heart phantom: realism (EF, HU, noise), the exactness of its ground-truth
pull field, determinism, the on-disk layout, and resuming a cohort.

Sizes are kept small: realism on one noise-free 48³ patient rendered with 4 phases (ES is the
phase of full contraction f = 1 for any phase count, so the ED/ES pair is the same as with 10),
EF over several 32³ patients, and one 2-patient 48³ cohort with the default 10 phases written in
parallel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from cardiomotion.data.phantom import (
    AORTA,
    LA_BLOOD,
    LV_BLOOD,
    LV_MYO,
    RV_BLOOD,
    HeartModel,
    draw_params,
    make_cohort,
    make_patient,
    phantom_affine,
    write_patient,
)
from cardiomotion.errors import InputError
from cardiomotion.flow import read_flow, warp
from cardiomotion.flow.metrics import jacobian_determinant

FILES = ("ct.nii.gz", "labels.nii.gz", "truth/flow_ed_from_es.nii.gz", "meta.json")


def _warp(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    return warp(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None],
                torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32))[None])[0, 0].numpy()


def _eroded(labels: np.ndarray, label: int, iterations: int = 1) -> np.ndarray:
    mask = ndimage.binary_erosion(labels == label, iterations=iterations)
    assert mask.sum() >= 20, f"label {label}: too few interior voxels to measure"
    return mask


@pytest.fixture(scope="module")
def clean():
    """Noise-free patient 0 at 48³ (2.9 mm voxels)."""
    return make_patient(0, seed=0, grid=48, phases=4, noise=False)


@pytest.fixture(scope="module")
def noisy():
    """Patient 0 of seed 0 with noise, at 32³."""
    return make_patient(0, seed=0, grid=32, phases=4, noise=True)


@pytest.fixture(scope="module")
def cohort48(tmp_path_factory):
    """A 2-patient 48³ cohort with the default 10 phases, written by 2 worker processes."""
    out = tmp_path_factory.mktemp("cohort48")
    seen: list[Path] = []
    folders = make_cohort(out, patients=2, grid=48, seed=0, workers=2, on_patient=seen.append)
    assert folders == [out / "phantom_000", out / "phantom_001"]
    assert sorted(seen) == folders
    return out


# ---------------------------------------------------------------------------- realism


def test_ejection_fraction_in_range_for_several_patients():
    efs, params = [], []
    for i in range(5):
        p = make_patient(i, seed=3, grid=32, phases=4)
        m = p.meta
        assert 0.50 <= m["ef_measured"] <= 0.70, (i, m["ef_measured"])
        assert abs(m["ef_measured"] - m["ef_drawn"]) < 0.05
        assert 80.0 <= m["edv_ml"] <= 200.0  # ~26 mm × 85 mm half prolate ellipsoid ≈ 120 ml
        assert m["esv_ml"] == pytest.approx(m["edv_ml"] * (1 - m["ef_measured"]))
        efs.append(m["ef_measured"])
        params.append(m["params"])
    assert len({round(e, 6) for e in efs}) == 5  # every patient draws its own anatomy/motion
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 5


def test_hounsfield_units_of_blood_and_myocardium(clean):
    ed = clean.ct[..., clean.meta["ed_phase"]]
    lab = clean.labels[..., clean.meta["ed_phase"]]
    prm = clean.meta["params"]
    for label in (LV_BLOOD, RV_BLOOD, LA_BLOOD, AORTA):
        med = float(np.median(ed[_eroded(lab, label)]))
        assert 350.0 <= med <= 450.0, (label, med)
    assert float(np.median(ed[_eroded(lab, LV_BLOOD)])) == pytest.approx(prm["blood_hu"], abs=1.0)
    myo = float(np.median(ed[_eroded(lab, LV_MYO)]))
    assert 90.0 <= myo <= 130.0
    assert myo == pytest.approx(prm["myo_hu"], abs=3.0)
    # far from the heart: lung (−800 ± 30)
    assert np.median(ed[:3, :3, :3]) == pytest.approx(prm["lung_hu"], abs=1.0)
    assert -830 <= prm["lung_hu"] <= -770
    # ES too: the blood pool stays in range while it shrinks
    es = clean.ct[..., clean.meta["es_phase"]]
    lab_es = clean.labels[..., clean.meta["es_phase"]]
    assert 350.0 <= float(np.median(es[_eroded(lab_es, LV_BLOOD)])) <= 450.0


@pytest.mark.parametrize("index", range(8))
def test_drawn_blood_hu_ranges(index):
    """Every drawn patient's blood pools (LV and the less enhanced RV) lie in 350–450 HU."""
    prm = draw_params(np.random.default_rng([0, index]), 10)
    for hu in (prm.blood_hu, prm.rv_blood_hu):
        assert 350.0 <= hu <= 450.0
    assert 90.0 <= prm.myo_hu <= 130.0
    assert 10.0 <= prm.noise_sd <= 20.0


def test_noise_level(noisy):
    ed = noisy.ct[..., noisy.meta["ed_phase"]]
    lab = noisy.labels[..., noisy.meta["ed_phase"]]
    blood = _eroded(lab, LV_BLOOD) | _eroded(lab, RV_BLOOD)
    drawn = noisy.meta["params"]["noise_sd"]
    assert 10.0 <= drawn <= 20.0
    # blood is uniform inside each pool: the spread about each pool's mean is the noise
    resid = np.concatenate([ed[blood & (lab == k)] - ed[blood & (lab == k)].mean() for k in (LV_BLOOD, RV_BLOOD)])
    assert resid.size > 1000
    sd = float(resid.std())
    assert 9.5 <= sd <= 20.5  # 10–20 HU, give or take the sampling error of ~1500 voxels
    assert sd == pytest.approx(drawn, rel=0.08)
    # and the noise is independent between phases (not one frozen pattern)
    es = noisy.ct[..., noisy.meta["es_phase"]]
    both = _eroded(lab, RV_BLOOD) & _eroded(noisy.labels[..., noisy.meta["es_phase"]], RV_BLOOD)
    assert both.sum() > 100
    assert abs(np.corrcoef(ed[both], es[both])[0, 1]) < 0.2


def test_noise_free_interior_is_constant(clean):
    ed = clean.ct[..., 0]
    lab = clean.labels[..., 0]
    assert float(ed[_eroded(lab, LV_BLOOD, 2)].std()) < 1.0


# ---------------------------------------------------------------------------- the true field


def test_true_field_has_no_folding_and_known_volume_change(clean):
    u = clean.flow_ed_from_es
    assert u.shape == (3, 48, 48, 48) and u.dtype == np.float32
    det = jacobian_determinant(u)
    assert det.shape == (48, 48, 48)
    assert float(det.min()) > 0.2  # no folding anywhere (det J > 0), with margin
    lab = clean.labels[..., clean.meta["ed_phase"]]
    ef = clean.meta["params"]["ef"]
    # the cavity shrinks by exactly (1 − EF) at ES; the myocardium is incompressible
    np.testing.assert_allclose(np.median(det[_eroded(lab, LV_BLOOD)]), 1.0 - ef, atol=0.01)
    np.testing.assert_allclose(np.median(det[_eroded(lab, LV_MYO)]), 1.0, atol=0.02)
    # the heart moves by centimetres: the field is not trivially small
    mm = np.linalg.norm(u, axis=0) * clean.meta["spacing_mm"]
    assert 8.0 < float(mm.max()) < 30.0


def test_true_field_is_exact_for_the_analytic_model():
    """ED(x) = ES(x + u(x)) holds exactly for the analytic heart: the material point seen at
    x + u(x) in ES is x itself (so the rendered intensities agree before any interpolation)."""
    params = draw_params(np.random.default_rng([0, 0]), 10)
    model = HeartModel(params, center=np.zeros(3))
    aff = phantom_affine(24, 140.0 / 24)
    ijk = np.stack(np.meshgrid(*(np.arange(24.0),) * 3, indexing="ij"), -1)
    x = ijk @ aff[:3, :3].T + aff[:3, 3]
    u = model.displacement(x, 1.0)  # the ES pull field on the ED grid, mm
    assert np.abs(u).max() > 5.0
    back = model.material_points(x + u, 1.0)
    np.testing.assert_allclose(back, x, atol=2e-3)
    hu_ed, lab_ed = model.render(x, 1.0)
    hu_es_at_pull, lab_es_at_pull = model.render(back, 1.0)  # what ES shows at x + u(x)
    np.testing.assert_allclose(hu_es_at_pull, hu_ed, atol=0.5)
    assert (lab_es_at_pull != lab_ed).mean() < 1e-3


def test_warping_es_by_the_true_field_reproduces_ed(clean):
    es_t, ed_t = clean.meta["es_phase"], clean.meta["ed_phase"]
    ed, es = clean.ct[..., ed_t], clean.ct[..., es_t]
    lab = clean.labels[..., ed_t]
    warped = _warp(es, clean.flow_ed_from_es)
    before = np.abs(es - ed)
    after = np.abs(warped - ed)
    assert after.mean() < 0.3 * before.mean()
    heart = ndimage.binary_dilation(lab > 0, iterations=2)
    assert after[heart].mean() < 0.2 * before[heart].mean()
    contrast = clean.meta["params"]["blood_hu"] - clean.meta["params"]["myo_hu"]
    assert after[heart].mean() < 0.05 * contrast  # interpolation of ~1 mm edges on 2.9 mm voxels
    # the zero field or the opposite field does far worse
    assert np.abs(_warp(es, -clean.flow_ed_from_es) - ed)[heart].mean() > 3 * after[heart].mean()


def test_warping_noisy_es_reproduces_noisy_ed(noisy):
    es_t, ed_t = noisy.meta["es_phase"], noisy.meta["ed_phase"]
    ed, es = noisy.ct[..., ed_t], noisy.ct[..., es_t]
    heart = ndimage.binary_dilation(noisy.labels[..., ed_t] > 0, iterations=2)
    after = np.abs(_warp(es, noisy.flow_ed_from_es) - ed)[heart].mean()
    assert after < 0.35 * np.abs(es - ed)[heart].mean()


def test_myocardial_volume_is_conserved(clean):
    lab = clean.labels
    v_ed = int((lab[..., clean.meta["ed_phase"]] == LV_MYO).sum())
    v_es = int((lab[..., clean.meta["es_phase"]] == LV_MYO).sum())
    assert v_es == pytest.approx(v_ed, rel=0.03)
    lv_ed = int((lab[..., clean.meta["ed_phase"]] == LV_BLOOD).sum())
    lv_es = int((lab[..., clean.meta["es_phase"]] == LV_BLOOD).sum())
    assert lv_es < 0.5 * lv_ed  # while the cavity empties


def test_motion_over_the_cycle():
    p = make_patient(1, seed=0, grid=24, phases=10, noise=False)
    m = p.meta
    assert m["ed_phase"] == 0 and 3 <= m["es_phase"] <= 4
    assert m["phase_percent"] == [10.0 * t for t in range(10)]
    f = np.asarray(m["contraction"])
    assert f[0] == 0.0 and f[m["es_phase"]] == pytest.approx(1.0)
    assert np.all(np.diff(f[: m["es_phase"] + 1]) > 0) and np.all(np.diff(f[m["es_phase"]:]) < 0)
    lv = (p.labels == LV_BLOOD).sum(axis=(0, 1, 2))
    assert int(np.argmax(lv)) == 0 and int(np.argmin(lv)) == m["es_phase"]


# ---------------------------------------------------------------------------- files and cohorts


def _read(folder: Path) -> dict[str, bytes]:
    return {f: (folder / f).read_bytes() for f in FILES}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = make_cohort(tmp_path / "a", patients=2, grid=32, phases=4, seed=5, workers=1)
    b = make_cohort(tmp_path / "b", patients=2, grid=32, phases=4, seed=5, workers=1)
    for fa, fb in zip(a, b):
        assert _read(fa) == _read(fb)
    assert _read(a[0])["ct.nii.gz"] != _read(a[1])["ct.nii.gz"]  # patients differ
    c = make_cohort(tmp_path / "c", patients=1, grid=32, phases=4, seed=6, workers=1)
    other = _read(c[0])
    for f in FILES:
        assert other[f] != _read(a[0])[f], f
    assert json.loads(other["meta.json"])["seed"] == 6


def test_cohort_files(cohort48):
    folder = cohort48 / "phantom_000"
    meta = json.loads((folder / "meta.json").read_text())
    ct = nib.load(str(folder / "ct.nii.gz"))
    assert ct.shape == (48, 48, 48, 10)
    assert ct.get_data_dtype() == np.int16
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(ct.affine)[:3], 140.0 / 48)
    assert int(ct.header["sform_code"]) == 1 and int(ct.header["qform_code"]) == 1
    labels = nib.load(str(folder / "labels.nii.gz"))
    assert labels.shape == (48, 48, 48, 10) and labels.get_data_dtype() == np.uint8
    lab = np.asarray(labels.dataobj)
    assert set(np.unique(lab)) <= set(range(7)) and {LV_BLOOD, LV_MYO, RV_BLOOD} <= set(np.unique(lab))
    np.testing.assert_array_equal(labels.affine, ct.affine)
    assert meta["ed_phase"] == 0 and 3 <= meta["es_phase"] <= 4
    assert 0.5 <= meta["ef_measured"] <= 0.7
    assert meta["grid"] == 48 and meta["spacing_mm"] == pytest.approx(140.0 / 48)
    # the truth file: intent 1006, the ED grid's affine, vectors that warp ES onto ED
    truth = folder / "truth" / "flow_ed_from_es.nii.gz"
    img = nib.load(str(truth))
    assert int(img.header["intent_code"]) == 1006
    assert img.shape == (48, 48, 48, 1, 3) and img.get_data_dtype() == np.float32
    u, aff = read_flow(truth)
    assert u.shape == (3, 48, 48, 48)
    np.testing.assert_allclose(aff, ct.affine, atol=1e-6)
    vol = np.asarray(ct.dataobj, dtype=np.float32)
    ed, es = vol[..., meta["ed_phase"]], vol[..., meta["es_phase"]]
    heart = ndimage.binary_dilation(lab[..., meta["ed_phase"]] > 0, iterations=2)
    after = np.abs(_warp(es, u) - ed)[heart].mean()
    assert after < 0.35 * np.abs(es - ed)[heart].mean()
    # outputs are readable like any file the user writes (not the 0600 of a temp file)
    umask = os.umask(0o022)
    os.umask(umask)
    for f in FILES:
        assert (folder / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not [p for p in cohort48.rglob(".*")]  # no temporary left behind


def test_cohort_resumes_without_rewriting(cohort48):
    stamps = {p: p.stat().st_mtime_ns for p in cohort48.rglob("*") if p.is_file()}
    assert len(stamps) == 8
    seen = []
    folders = make_cohort(cohort48, patients=2, grid=48, seed=0, workers=2, on_patient=seen.append)
    assert seen == folders
    assert {p: p.stat().st_mtime_ns for p in cohort48.rglob("*") if p.is_file()} == stamps


def test_an_unopacified_right_heart_has_its_blood_at_the_myocardiums_hu(clean):
    """``rv_contrast`` 0: the RV blood at the myocardium's HU, everything else — the other
    parameters, the other tissues' HU, the motion and the labels — as drawn; 0.5 halfway; 1 the
    cohort itself (bit for bit, and nothing new in its meta)."""
    washed = make_patient(0, seed=0, grid=48, phases=4, noise=False, rv_contrast=0.0)
    prm, wp = clean.meta["params"], washed.meta["params"]
    assert wp["rv_blood_hu"] == prm["myo_hu"]
    assert {k: v for k, v in wp.items() if k != "rv_blood_hu"} == {k: v for k, v in prm.items() if k != "rv_blood_hu"}
    ed = clean.meta["ed_phase"]
    lab = clean.labels[..., ed]
    rv = _eroded(lab, RV_BLOOD)
    assert float(np.median(washed.ct[..., ed][rv])) == pytest.approx(prm["myo_hu"], abs=1.0)
    assert float(np.median(clean.ct[..., ed][rv])) == pytest.approx(prm["rv_blood_hu"], abs=1.0)
    lv = _eroded(lab, LV_BLOOD)  # the LV's blood as it was (but for the blurred edge near the septum)
    assert float(np.median(washed.ct[..., ed][lv])) == pytest.approx(float(np.median(clean.ct[..., ed][lv])), abs=0.5)
    assert np.array_equal(washed.ct[:3, :3, :3], clean.ct[:3, :3, :3])  # far from the heart: untouched
    assert np.array_equal(washed.labels, clean.labels) and np.array_equal(washed.flow_ed_from_es, clean.flow_ed_from_es)
    assert washed.meta["rv_contrast"] == 0.0 and "rv_contrast" not in clean.meta
    half = draw_params(np.random.default_rng([0, 0]), 4, rv_contrast=0.5)
    assert half.rv_blood_hu == pytest.approx(0.5 * (prm["myo_hu"] + prm["rv_blood_hu"]))
    same = make_patient(0, seed=0, grid=48, phases=4, noise=False, rv_contrast=1.0)
    assert np.array_equal(same.ct, clean.ct) and same.meta == clean.meta


@pytest.mark.parametrize("kwargs, what", [
    ({"rv_contrast": 0.0}, "made with rv_contrast=1, not rv_contrast=0"),
    ({"seed": 1}, "made with seed=0, not seed=1"),
    ({"phases": 8}, "made with phases=10, not phases=8"),
    ({"grid": 32}, "made with grid=48, spacing_mm=2.91667, not grid=32, spacing_mm=4.375"),
    ({"spacing_mm": 2.5}, "made with spacing_mm=2.91667, not spacing_mm=2.5"),
])
def test_cohort_refuses_a_folder_made_with_other_settings(cohort48, kwargs, what):
    args = dict(patients=2, grid=48, seed=0, workers=1) | kwargs
    stamps = {p: p.stat().st_mtime_ns for p in cohort48.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as err:
        make_cohort(cohort48, **args)
    assert "phantom_000" in str(err.value) and what in str(err.value), str(err.value)
    assert {p: p.stat().st_mtime_ns for p in cohort48.rglob("*") if p.is_file()} == stamps


def test_cohort_refuses_a_stray_folder(tmp_path):
    stray = tmp_path / "phantom_000"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(InputError) as err:
        make_cohort(tmp_path, patients=1, grid=24, phases=3, workers=1)
    assert "phantom_000" in str(err.value) and "not a complete phantom" in str(err.value)
    assert (stray / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom_000"]


def test_write_patient_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves neither the patient folder nor a temporary behind."""
    import cardiomotion.flow.io as flow_io

    p = make_patient(2, grid=16, phases=2)

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(flow_io, "write_flow", boom)
    with pytest.raises(RuntimeError):
        write_patient(p, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    folder = write_patient(p, tmp_path)
    assert sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) == sorted(FILES)
