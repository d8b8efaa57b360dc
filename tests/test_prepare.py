"""``prepare``: phantom patients and 4-D NIfTI files → ES/ED on the configured grid (Ray Data),
the scan table, resuming, ES/ED detection, manifests, the prepared-pairs dataset, and every kind
of bad input through the command line (one error line, exit 2, nothing half-written)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from cardiomotion.cli import main
from cardiomotion.config import load_config
from cardiomotion.data import read_scan
from cardiomotion.data.phantom import LV_BLOOD, LV_MYO, HeartModel, PhantomParams, make_cohort
from cardiomotion.data.phases import detect_es_ed, read_manifest
from cardiomotion.data.prepare import prepare_scans, prepared_pairs
from cardiomotion.data.table import COLUMNS, load_pair, read_scan_table
from cardiomotion.errors import ConfigError, InputError
from cardiomotion.fileio import write_nifti
from cardiomotion.flow import read_flow, warp
from cardiomotion.orientation import flow_vox_to_mm

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
GRID = (32, 32, 32)
SPACING = 4.0


def _warp(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    return warp(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None],
                torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32))[None])[0, 0].numpy()


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def _leftovers(root: Path) -> list[Path]:
    """Temporary files/folders of atomic writes (named .<final>.<random>.tmp…)."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def cfg():
    c = load_config(SMOKE)
    assert tuple(c.prepare.grid) == GRID and c.prepare.spacing_mm == SPACING and c.prepare.dtype == "int16"
    return c


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    """3 phantom patients, 32³ grid (4.4 mm voxels), 10 phases."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), patients=3, grid=32, seed=0, workers=1)


@pytest.fixture(scope="module")
def prepared(ray_session, cohort, cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    table = prepare_scans(cohort, out, cfg)
    assert table == out.resolve() / "scans.parquet"
    return out


@pytest.fixture(scope="module")
def mixed(ray_session, cohort, cfg, tmp_path_factory):
    """A 4-D NIfTI copy of patient 0 (phases detected) with patient 1 under a manifest."""
    root = tmp_path_factory.mktemp("mixed")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    nifti = elsewhere / "scanA.nii.gz"
    shutil.copyfile(cohort[0] / "ct.nii.gz", nifti)
    manifest = root / "manifest.csv"
    manifest.write_text("scan_id,es_phase,ed_phase\nphantom_001,2,5\n")
    out = root / "prepared"
    prepare_scans([nifti, cohort[1]], out, cfg, manifest=manifest)
    return out, nifti, manifest


# ---------------------------------------------------------------------------- the table and the volumes


def test_scan_table(prepared, cohort):
    df = read_scan_table(prepared)
    assert list(df.columns) == COLUMNS
    for col in ("scan_id", "source", "es_phase", "ed_phase", "spacing_mm", "shape", "es_path", "ed_path"):
        assert col in df.columns  # the minimum
    assert list(df["scan_id"]) == ["phantom_000", "phantom_001", "phantom_002"]
    for (_, row), folder in zip(df.iterrows(), cohort):
        meta = _meta(folder)
        assert (row["es_phase"], row["ed_phase"]) == (meta["es_phase"], meta["ed_phase"])
        assert row["phases_from"] == "meta" and row["format"] == "phantom"
        assert row["n_phases"] == 10
        assert Path(row["source"]) == folder.resolve()
        assert row["spacing_mm"] == SPACING and list(row["shape"]) == list(GRID)
        assert row["es_path"] == f"{row['scan_id']}/es.nii.gz" and row["ed_path"] == f"{row['scan_id']}/ed.nii.gz"
        assert row["truth_flow_path"] == f"{row['scan_id']}/truth_flow.nii.gz"
        np.testing.assert_allclose(json.loads(row["original_affine"]), nib.load(str(folder / "ct.nii.gz")).affine)
        assert (prepared / row["scan_id"] / "prepared.json").is_file()
    assert not _leftovers(prepared)


def test_prepared_volumes(prepared, cohort):
    df = read_scan_table(prepared)
    for _, row in df.iterrows():
        imgs = [nib.load(str(prepared / row[k])) for k in ("es_path", "ed_path")]
        for img in imgs:
            assert img.shape == GRID
            assert img.get_data_dtype() == np.int16
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.affine[:3, :3], np.diag([SPACING] * 3))
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            # the grid is centred on center_mm
            centre = img.affine[:3, :3] @ ((np.asarray(GRID) - 1) / 2.0) + img.affine[:3, 3]
            np.testing.assert_allclose(centre, row["center_mm"], atol=1e-4)
            hu = np.asarray(img.dataobj)
            assert -1100 <= hu.min() and hu.max() <= 600  # HU: air/lung … contrast blood
        np.testing.assert_array_equal(imgs[0].affine, imgs[1].affine)  # ES and ED share one grid


def test_prepared_grid_sits_where_the_heart_is(prepared, cohort):
    """World consistency: the LV blood pool's centroid (world mm) is the same in the phantom's
    own grid and in the prepared grid, and prepared HU are the phantom's HU."""
    pair = load_pair(prepared, read_scan_table(prepared).iloc[0])
    folder = cohort[0]
    labels = nib.load(str(folder / "labels.nii.gz"))
    lab0 = np.asarray(labels.dataobj[..., 0])
    src_c = labels.affine[:3, :3] @ np.argwhere(lab0 == LV_BLOOD).mean(0) + labels.affine[:3, 3]
    assert pair.ed_labels is not None and pair.ed_labels.shape == GRID
    dst_c = pair.affine[:3, :3] @ np.argwhere(pair.ed_labels == LV_BLOOD).mean(0) + pair.affine[:3, 3]
    np.testing.assert_allclose(dst_c, src_c, atol=2.0)  # mm; voxels are 4 mm
    prm = _meta(folder)["params"]
    blood = ndimage.binary_erosion(pair.ed_labels == LV_BLOOD)
    assert np.median(pair.ed[blood]) == pytest.approx(prm["blood_hu"], abs=15)
    assert 350 <= np.median(pair.ed[blood]) <= 450
    myo = pair.ed_labels == LV_MYO
    assert 60 <= np.median(pair.ed[myo]) <= 160  # thin wall, partial volume at 4 mm


def test_prepared_truth_flow_still_maps_es_onto_ed(prepared):
    df = read_scan_table(prepared)
    for _, row in df.iterrows():
        pair = load_pair(prepared, row)
        assert pair.truth_flow is not None and pair.truth_flow.shape == (3,) + GRID
        _, aff = read_flow(prepared / row["truth_flow_path"])
        np.testing.assert_allclose(aff, pair.affine, atol=1e-5)
        heart = ndimage.binary_dilation(pair.ed_labels > 0, iterations=2)
        after = np.abs(_warp(pair.es, pair.truth_flow) - pair.ed)[heart].mean()
        before = np.abs(pair.es - pair.ed)[heart].mean()
        assert after < 0.35 * before, (row["scan_id"], after, before)


def test_prepared_truth_flow_is_the_analytic_motion(prepared, cohort):
    """In world millimetres the prepared truth field is the phantom's own ES displacement at
    each prepared voxel centre (up to linear interpolation of a smooth field)."""
    row = read_scan_table(prepared).iloc[1]
    pair = load_pair(prepared, row)
    meta = _meta(cohort[1])
    params = PhantomParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()})
    model = HeartModel(params, center=np.zeros(3))
    ijk = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in GRID), indexing="ij"), -1)
    world = ijk @ pair.affine[:3, :3].T + pair.affine[:3, 3]
    expected = model.displacement(world, meta["contraction"][meta["es_phase"]])
    got = np.moveaxis(flow_vox_to_mm(pair.truth_flow.astype(np.float64), pair.affine), 0, -1)
    src = nib.load(str(cohort[1] / "ct.nii.gz")).affine
    src_idx = (world - src[:3, 3]) @ np.linalg.inv(src[:3, :3]).T
    inside = np.all((src_idx >= 0) & (src_idx <= 31), axis=-1)  # the phantom's own grid
    assert inside.mean() > 0.8 and np.abs(expected[inside]).max() > 5.0
    err = np.linalg.norm(got - expected, axis=-1)[inside]
    assert err.mean() < 0.1 and err.max() < 1.0  # mm


def test_outputs_have_ordinary_permissions(prepared):
    umask = os.umask(0o022)
    os.umask(umask)
    for p in prepared.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, p


def test_rerun_skips_finished_scans(prepared, cohort, cfg):
    before = read_scan_table(prepared)
    stamps = {p: p.stat().st_mtime_ns for p in prepared.rglob("*") if p.is_file() and p.name != "scans.parquet"}
    skipped: list[str] = []
    prepare_scans(cohort, prepared, cfg, on_skip=skipped.append)  # no Ray work: nothing to do
    assert skipped == ["phantom_000", "phantom_001", "phantom_002"]
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*") if p.is_file() and p.name != "scans.parquet"} == stamps
    pd.testing.assert_frame_equal(read_scan_table(prepared), before)


def test_preparing_more_scans_into_a_folder_merges_its_table(prepared, cohort, cfg):
    """Adding scans keeps the earlier ones in scans.parquet (a call with one scan used to rewrite
    the table with that scan only)."""
    before = read_scan_table(prepared)
    prepare_scans(cohort[:1], prepared, cfg)  # nothing to do for it, but the table is rewritten
    pd.testing.assert_frame_equal(read_scan_table(prepared), before)


def test_rerun_with_other_settings_is_refused(prepared, cohort, cfg):
    other = cfg.model_copy(update={"prepare": cfg.prepare.model_copy(update={"spacing_mm": 3.0})})
    with pytest.raises(InputError, match="different prepare settings"):
        prepare_scans(cohort, prepared, other)
    # a manifest that contradicts the finished scan's phases is refused too
    manifest = prepared.parent / "contradicting.json"
    manifest.write_text(json.dumps({"phantom_002": {"es_phase": 1, "ed_phase": 6}}))
    with pytest.raises(InputError, match="phantom_002.*manifest"):
        prepare_scans(cohort, prepared, cfg, manifest=manifest)


# ---------------------------------------------------------------------------- phases, other inputs


def test_detect_es_ed_finds_the_phantoms_phases(cohort, cfg):
    for folder in cohort:
        scan = read_scan(folder)
        meta = _meta(folder)
        assert (scan.es_phase, scan.ed_phase) == (meta["es_phase"], meta["ed_phase"])
        choice = detect_es_ed(scan, tuple(cfg.prepare.blood_hu))
        assert (choice.es_phase, choice.ed_phase) == (meta["es_phase"], meta["ed_phase"])
        assert choice.source == "detected" and len(choice.blood_ml) == 10
        vols = np.asarray(choice.blood_ml)
        assert vols.min() < 0.9 * vols.max()


def test_detection_counts_noisy_and_quiet_phases_alike(tmp_path):
    """ECG dose modulation: the same blood pool, quiet (SD 20 HU) in phases 0, 4 and 5 and noisy
    (SD 90 HU) in the others. Counting every third voxel, noisy myocardium (130 HU) crosses into the
    blood range and the noisy phases look fuller (ES read as 4, ED as 7); on block means the true ES
    (3, the smallest pool) and ED (0, the largest) are found for every noise draw. Written with
    nibabel, 1 mm voxels."""
    shape = (48, 48, 32)
    r = np.linalg.norm(np.stack(np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij"), -1), axis=-1)
    radius, quiet = [13, 12, 11, 10, 10.5, 11.5, 12, 12.5], {0, 4, 5}  # mm: LV blood, in a 6 mm wall
    for seed in range(3):
        rng = np.random.default_rng(seed)
        frames = []
        for t, rad in enumerate(radius):
            v = np.where(r <= rad, 380.0, np.where(r <= rad + 6, 130.0, 40.0))
            frames.append(v + rng.normal(0, 20 if t in quiet else 90, shape))
        path = tmp_path / f"modulated_{seed}.nii.gz"
        nib.save(nib.Nifti1Image(np.stack(frames, -1).astype(np.float32), np.eye(4)), str(path))
        choice = detect_es_ed(read_scan(path), (200.0, 800.0))
        assert (choice.es_phase, choice.ed_phase) == (3, 0), choice.blood_ml


def test_the_crop_centres_on_the_heart_not_on_the_spine_beside_the_aorta():
    """A synthetic chest, 1 mm voxels, noise SD 60 HU: heart chambers (380 HU) joined to a
    descending aorta that lies 4 mm from the vertebrae (cancellous bone 250 HU, in the blood
    range; a 2 mm cortex of 1100 HU; discs of 80 HU). Smoothed, aorta and spine join, and without
    cutting out the bone the centroid of the largest component lay ~25 mm behind the heart; the
    crop centre is within 5 mm of the centroid of the blood itself."""
    from cardiomotion.data.preprocess import heart_center

    shape = (200, 200, 96)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    v = np.full(shape, -800.0, np.float32)  # lung
    v[((x - 100) ** 2 / 95 ** 2 + (y - 100) ** 2 / 90 ** 2 <= 1) & ((np.abs(x - 100) < 25) | (y > 150))] = 40.0
    blood = np.zeros(shape, bool)
    for (cx, cy, cz), r in (((90, 70, 48), 28), ((122, 66, 48), 20), ((104, 104, 62), 18)):  # LV, RV, LA
        blood |= (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r ** 2
    blood |= ((x - 112) ** 2 + (y - 122) ** 2 <= 8 ** 2) & (z > 62) & (z < 90)  # LA to the arch
    blood |= ((x - 116) ** 2 + (y - 140) ** 2 <= 11 ** 2)  # descending aorta, full height
    blood |= ((x - 112) ** 2 + (y - 130) ** 2 + (z - 88) ** 2 <= 12 ** 2)  # the arch
    v[blood] = 380.0
    spine = (x - 100) ** 2 + (y - 166) ** 2 <= 15 ** 2  # 4.5 mm from the aorta
    body = spine & (z % 26 < 20)
    v[spine & ~body] = 80.0
    v[body] = 250.0
    v[body & ((x - 100) ** 2 + (y - 166) ** 2 >= 13 ** 2)] = 1100.0
    v += np.random.default_rng(0).normal(0, 60, shape).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    truth = np.array(ndimage.center_of_mass(blood))
    got = heart_center(v, affine, (200.0, 800.0))
    assert np.linalg.norm(got - truth) < 5.0, (got, truth)
    # a bright, noisy pool near the blood range's top (low-kV CTA: 770 ± 70 HU) is blood, not bone: the
    # centre stays on it, not on the dimmer chamber beside it (a 1000 HU bone threshold; at 800 it moved 60 mm)
    w = np.full((120, 120, 96), 40.0, np.float32)
    xx, yy, zz = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in w.shape), indexing="ij")
    w[(xx - 45) ** 2 + (yy - 60) ** 2 + (zz - 48) ** 2 <= 26 ** 2] = 770.0
    w[(xx - 95) ** 2 + (yy - 60) ** 2 + (zz - 48) ** 2 <= 15 ** 2] = 300.0
    w += np.random.default_rng(1).normal(0, 70, w.shape).astype(np.float32)
    assert np.linalg.norm(heart_center(w, affine, (200.0, 800.0)) - [45, 60, 48]) < 3.0


def test_4d_nifti_file_is_prepared_with_detected_phases(mixed, cohort):
    out, nifti, _ = mixed
    df = read_scan_table(out).set_index("scan_id")
    assert sorted(df.index) == ["phantom_001", "scanA"]
    row = df.loc["scanA"]
    meta = _meta(cohort[0])
    assert row["format"] == "nifti4d" and row["phases_from"] == "detected"
    assert (row["es_phase"], row["ed_phase"]) == (meta["es_phase"], meta["ed_phase"])
    assert Path(row["source"]) == nifti.resolve()
    assert row["truth_flow_path"] is None or pd.isna(row["truth_flow_path"])
    pair = load_pair(out, row.to_dict() | {"scan_id": "scanA"})
    assert pair.es.shape == GRID and pair.truth_flow is None


def test_manifest_overrides_phases(mixed):
    out, _, manifest = mixed
    assert read_manifest(manifest) == {"phantom_001": (2, 5)}
    row = read_scan_table(out).set_index("scan_id").loc["phantom_001"]
    assert (row["es_phase"], row["ed_phase"]) == (2, 5) and row["phases_from"] == "manifest"
    # the truth flow belongs to the phantom's own ES/ED, so none is carried for other phases
    assert row["truth_flow_path"] is None or pd.isna(row["truth_flow_path"])


def test_read_manifest_forms(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("\ufeffscan_id, es_phase, ed_phase\n a ,3,0\nb, 4, 9\n", encoding="utf-8")
    assert read_manifest(csv_path) == {"a": (3, 0), "b": (4, 9)}
    json_path = tmp_path / "m.json"
    json_path.write_text(json.dumps({"a": {"es_phase": 3, "ed_phase": 0}}))
    assert read_manifest(json_path) == {"a": (3, 0)}
    bad = tmp_path / "bad.csv"
    bad.write_text("scan_id,es\na,3\n")
    with pytest.raises(InputError, match="bad.csv.*scan_id, es_phase, ed_phase"):
        read_manifest(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("scan_id,es_phase,ed_phase\na,3,0\nb,4,0\na,5,0\n")
    with pytest.raises(InputError, match=r"dup.csv: scan id 'a' appears twice \(line 4"):
        read_manifest(dup)
    with pytest.raises(InputError, match="missing.csv: manifest does not exist"):
        read_manifest(tmp_path / "missing.csv")
    # the forms pandas writes: records, its default column layout, a float column, a semicolon CSV
    frame = pd.DataFrame({"scan_id": ["a", "b"], "es_phase": [3, 4], "ed_phase": [0, 9]})
    written = {"records.json": frame.to_json(orient="records"), "columns.json": frame.to_json(),
               "floats.csv": frame.astype({"es_phase": float}).to_csv(index=False),
               "semicolon.csv": frame.to_csv(index=False, sep=";"), "tabs.csv": frame.to_csv(index=False, sep="\t")}
    for name, text in written.items():
        (tmp_path / name).write_text(text)
        assert read_manifest(tmp_path / name) == {"a": (3, 0), "b": (4, 9)}, name
    (tmp_path / "half.csv").write_text("scan_id,es_phase,ed_phase\na,3.5,0\n")
    with pytest.raises(InputError, match=r"half.csv: a: es_phase '3.5' is not a whole number"):
        read_manifest(tmp_path / "half.csv")
    (tmp_path / "flag.json").write_text(json.dumps({"a": {"es_phase": True, "ed_phase": 0}}))  # a JSON true is not phase 1
    with pytest.raises(InputError, match=r"flag.json: a: es_phase True is not a phase index"):
        read_manifest(tmp_path / "flag.json")
    (tmp_path / "twice.json").write_text(json.dumps([{"scan_id": "a", "es_phase": 1, "ed_phase": 0}] * 2))
    with pytest.raises(InputError, match=r"twice.json: scan id 'a' appears twice \(record 2"):
        read_manifest(tmp_path / "twice.json")


def test_manifest_phase_out_of_range_is_bad_input(prepared, cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("scan_id,es_phase,ed_phase\nphantom_002,3,12\n")
    out = tmp_path / "out"
    rc = main(["prepare", "--scans", str(cohort[2]), "--out", str(out), "--manifest", str(manifest),
               "--config", str(SMOKE)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "phantom_002" in err[0] and "ed_phase = 12" in err[0], err
    assert not (out / "scans.parquet").exists() and not (out / "phantom_002").exists()


def test_manifest_row_naming_no_scan_is_refused_with_the_closest_ids(cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("scan_id,es_phase,ed_phase\nphantom_02,3,0\n")  # a typo of phantom_002
    out = tmp_path / "out"
    rc = main(["prepare", "--scans", *map(str, cohort), "--out", str(out), "--manifest", str(manifest),
               "--config", str(SMOKE)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "m.csv" in err[0] and "'phantom_02' matches none of the 3 scans given" in err[0]
    assert "closest: phantom_002" in err[0]
    assert not out.exists()


def test_prepared_pairs_dataset(prepared, ray_session):
    ds = prepared_pairs(prepared)
    assert isinstance(ds, ray_session.data.Dataset)
    assert ds.count() == 3
    rows = sorted(ds.take_all(), key=lambda r: r["scan_id"])
    assert [r["scan_id"] for r in rows] == ["phantom_000", "phantom_001", "phantom_002"]
    for r in rows:
        assert r["es"].shape == GRID and r["ed"].shape == GRID
        assert r["es"].dtype == np.float32 and r["spacing_mm"] == SPACING
        assert not np.array_equal(r["es"], r["ed"])
    first = load_pair(prepared, read_scan_table(prepared).iloc[0])
    np.testing.assert_array_equal(rows[0]["ed"], first.ed)
    with_truth = prepared_pairs(prepared, with_truth=True).take(1)[0]
    assert with_truth["has_truth"] and with_truth["truth_flow"].shape == (3,) + GRID


# ---------------------------------------------------------------------------- bad input


def _ct(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(folder / "ct.nii.gz"))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _bad_truncated(tmp: Path, cohort) -> tuple[list[Path], str]:
    data = (cohort[0] / "ct.nii.gz").read_bytes()
    p = tmp / "trunc.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    return [p], "truncated"


def _bad_not_nifti(tmp: Path, cohort) -> tuple[list[Path], str]:
    p = tmp / "notes.txt"
    p.write_text("not an image\n")
    return [p], "not a NIfTI (.nii, .nii.gz), NRRD"


def _bad_garbage_nifti(tmp: Path, cohort) -> tuple[list[Path], str]:
    p = tmp / "garbage.nii.gz"
    p.write_bytes(b"this is not gzip data at all" * 20)
    return [p], "not a readable NIfTI"


def _bad_3d(tmp: Path, cohort) -> tuple[list[Path], str]:
    data, aff = _ct(cohort[0])
    return [write_nifti(tmp / "vol3d.nii.gz", data[..., 0], aff)], "3-D"


def _bad_nan(tmp: Path, cohort) -> tuple[list[Path], str]:
    data, aff = _ct(cohort[0])
    data[5, 6, 7, 4] = np.nan
    return [write_nifti(tmp / "withnan.nii.gz", data, aff)], "NaN"


def _bad_single_phase(tmp: Path, cohort) -> tuple[list[Path], str]:
    data, aff = _ct(cohort[0])
    return [write_nifti(tmp / "onephase.nii.gz", data[..., :1], aff)], "single phase"


def _bad_shapes(tmp: Path, cohort) -> tuple[list[Path], str]:
    data, aff = _ct(cohort[0])
    folder = tmp / "phasefolder"
    folder.mkdir()
    write_nifti(folder / "phase00.nii.gz", data[..., 0], aff)
    write_nifti(folder / "phase10.nii.gz", data[:30, :, :, 1], aff)
    return [folder], "phase10.nii.gz"


def _bad_empty(tmp: Path, cohort) -> tuple[list[Path], str]:
    folder = tmp / "emptyscan"
    folder.mkdir()
    return [folder], "empty folder"


def _bad_duplicate(tmp: Path, cohort) -> tuple[list[Path], str]:
    path = tmp / "dup.nii.gz"  # the same file twice (files named alike in two folders are named by them)
    shutil.copyfile(cohort[0] / "ct.nii.gz", path)
    return [path, path], "duplicate scan id"


def test_inputs_named_alike_are_named_by_their_folders(tmp_path):
    """A cohort laid out as case01/ct.nii.gz, case02/ct.nii.gz (or */DICOM) gets the folders' names
    as ids; inputs whose ids are unique keep them; the same file twice is refused."""
    from cardiomotion.data.prepare import distinct_ids, plan_scans

    paths = []
    for case in ("case01", "case02"):
        (tmp_path / case).mkdir()
        paths.append(tmp_path / case / "ct.nii.gz")
        paths[-1].write_bytes(b"")
    (tmp_path / "solo.nii.gz").write_bytes(b"")
    plan = plan_scans([*paths, tmp_path / "solo.nii.gz"])
    assert [sid for sid, _ in plan] == ["case01", "case02", "solo"]
    assert [p for _, p in plan] == [p.resolve() for p in (*paths, tmp_path / "solo.nii.gz")]
    for case in ("a", "b"):
        (tmp_path / case / "x" / "DICOM").mkdir(parents=True)
    assert [sid for sid, _ in plan_scans([tmp_path / c / "x" / "DICOM" for c in "ab"])] == ["a", "b"]
    assert distinct_ids([Path("/d/a/ct.nii.gz"), Path("/d/b/other/ct.nii.gz")]) == ["a", "b_other"]
    with pytest.raises(InputError, match="duplicate scan id 'ct'"):
        plan_scans([paths[0], paths[0]])


def test_a_scan_given_as_dot_or_dot_dot_is_named_by_its_folder(tmp_path, monkeypatch):
    """`prepare --scans .` inside a scan's folder (and `..` below it) names the scan by that
    folder: an empty id would write its files into --out's root. The root has no name: refused."""
    from cardiomotion.data.prepare import plan_scans

    (tmp_path / "case07" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "case07")
    assert plan_scans(["."]) == [("case07", tmp_path / "case07")]
    monkeypatch.chdir(tmp_path / "case07" / "sub")
    assert plan_scans([".."]) == [("case07", tmp_path / "case07")]
    with pytest.raises(InputError, match="no name to take a scan id from"):
        plan_scans(["/"])


BAD = {
    "truncated": _bad_truncated,
    "not_nifti": _bad_not_nifti,
    "garbage_nifti": _bad_garbage_nifti,
    "three_d": _bad_3d,
    "nan": _bad_nan,
    "single_phase": _bad_single_phase,
    "mismatched_shapes": _bad_shapes,
    "empty_folder": _bad_empty,
    "duplicate_ids": _bad_duplicate,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(case, prepared, cohort, tmp_path, capsys):
    # (`prepared` has run a Ray Data job in this process: Ray Data's once-per-process notice
    # about the progress bars that conftest disables is behind us, as it is in any real run)
    inputs, problem = BAD[case](tmp_path, cohort)
    # a good scan next to the bad one: the bad one still fails the whole command
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["prepare", "--scans", str(cohort[2]), *map(str, inputs), "--out", str(out), "--config", str(SMOKE)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in captured.err
    assert problem.lower() in line.lower(), line
    assert any(p.name in line for p in inputs), line  # names the file
    assert not (out / "scans.parquet").exists()
    for p in inputs:
        assert not (out / p.name.split(".")[0]).exists()  # no folder for the bad scan
    if out.exists():
        assert not _leftovers(out)
        for d in out.iterdir():  # whatever else is there is complete
            assert (d / "prepared.json").is_file() and (d / "es.nii.gz").is_file(), d


def test_ids_that_change_with_the_inputs_given_never_mix_two_scans(ray_session, cohort, cfg, tmp_path):
    """case01/ct.nii.gz alone is 'ct'; given with case02/ct.nii.gz into the same folder it would be
    'case01' beside the earlier 'ct' (one scan twice in the table): refused before any work. And
    case02/ct.nii.gz alone later would be 'ct' again, another scan under a finished id: refused
    too, naming both sources."""
    paths = []
    for i, case in enumerate(("case01", "case02")):
        (tmp_path / case).mkdir()
        paths.append(tmp_path / case / "ct.nii.gz")
        shutil.copyfile(cohort[i] / "ct.nii.gz", paths[-1])
    out = tmp_path / "out"
    prepare_scans([paths[0]], out, cfg)
    assert read_scan_table(out)["scan_id"].tolist() == ["ct"]
    with pytest.raises(InputError, match=r"ct: holds .*case01/ct.nii.gz prepared under the id 'ct'; this call names it 'case01'"):
        prepare_scans(paths, out, cfg)
    with pytest.raises(InputError, match=r"ct: holds the scan prepared from .*case01/ct.nii.gz, not .*case02/ct.nii.gz"):
        prepare_scans([paths[1]], out, cfg)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ct"]  # nothing else written


def test_scan_notes_name_what_was_left_out_and_a_blood_pool_that_barely_changes():
    """A reader's left-out lines come first, prefixed; detected phases whose blood-pool volume
    changes by less than MIN_BLOOD_CHANGE are doubted (1 % here), 20 % are not, a manifest's
    phases (no volumes) are not."""
    from types import SimpleNamespace

    from cardiomotion.data.phases import PhaseChoice
    from cardiomotion.data.prepare import MIN_BLOOD_CHANGE, scan_notes

    scan = SimpleNamespace(left_out=["2 second copies of images already read"], notes=[])
    flat = PhaseChoice(1, 0, "detected", (100.0, 99.0, 99.5))
    notes = scan_notes(scan, flat)
    assert notes[0] == "left out 2 second copies of images already read"
    assert len(notes) == 2 and "changes by only 1.0 %" in notes[1] and "manifest" in notes[1]
    assert 0.01 < MIN_BLOOD_CHANGE < 0.16  # between the unenhanced scan's 1 % and the phantom's 16-24 %
    beating = PhaseChoice(1, 0, "detected", (300.0, 240.0, 280.0))
    assert scan_notes(SimpleNamespace(left_out=[], notes=[]), beating) == []
    assert scan_notes(SimpleNamespace(left_out=[], notes=[]), PhaseChoice(1, 0, "manifest")) == []


def test_prepare_prints_a_note_for_phases_detected_from_a_flat_blood_pool(ray_session, tmp_path, capsys):
    """A 4-D scan whose only voxels in the blood range are a static bright block (bone, no
    contrast) with one voxel that flickers, beside a slab of lung: prepared (phases detected), with
    one note line on the console naming the scan, and the note in its prepared.json. The same
    scan stored without its rescale (HU + 1024, written by nibabel as plain values) gets the note
    that its intensities are not HU (its lung, at 224, is in the blood range: ES/ED are read off it)."""
    rng = np.random.default_rng(0)
    data = rng.normal(40.0, 5.0, (24, 24, 24, 4)).astype(np.float32)
    data[8:16, 8:16, 8:16, :] = 500.0
    data[4, 4, 4, 1] = 500.0  # the "phase" with one more voxel of blood: ED by detection
    data[20:] = -800.0  # lung, more of it in phase 2 (out of the blood range in HU)
    data[18:20, ..., 2] = -800.0
    path = write_nifti(tmp_path / "unenhanced.nii.gz", data, np.diag([3.0, 3.0, 3.0, 1.0]))
    stored = tmp_path / "stored.nii.gz"
    nib.save(nib.Nifti1Image((data + 1024).astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), str(stored))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["prepare", "--scans", str(path), str(stored), "--out", str(out), "--config", str(SMOKE)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lines = [line for line in printed.splitlines() if line.startswith("note: unenhanced: ")]
    assert len(lines) == 1 and lines[0].startswith("note: unenhanced: the blood-pool volume") and "manifest" in lines[0]
    record = json.loads((out / "unenhanced" / "prepared.json").read_text())["record"]
    assert record["notes"] == [lines[0].removeprefix("note: unenhanced: ")]
    hu = [line for line in printed.splitlines() if line.startswith("note: stored: intensities do not look like HU")]
    assert len(hu) == 1 and "subtract 1024" in hu[0], printed
    assert hu[0].removeprefix("note: stored: ") in json.loads((out / "stored" / "prepared.json").read_text())["record"]["notes"]


def test_the_hu_note_tells_values_stored_without_their_rescale_from_hu(cohort):
    """The phantom in HU (lung ~-800) gets no note; the same volume + 1024 (0-origin storage) and a
    crop of soft tissue only do, naming the percentiles; a quarter of lung is enough to pass."""
    from cardiomotion.data.intensity import hu_note

    vol = read_scan(cohort[0]).phase(0)
    assert hu_note(vol, (200.0, 800.0)) is None
    note = hu_note(vol + 1024.0, (200.0, 800.0))
    assert note and note.startswith("intensities do not look like HU") and "subtract 1024" in note
    low = float(np.percentile(vol + 1024.0, 1))
    assert abs(float(note.split("1st percentile ")[1].split(",")[0]) - low) < 60, (note, low)
    tissue = np.full((40, 40, 40), 60.0, np.float32)
    assert hu_note(tissue, (200.0, 800.0)) is not None
    tissue[:10] = -850.0
    assert hu_note(tissue, (200.0, 800.0)) is None


def test_a_detection_that_fails_on_values_stored_without_their_rescale_says_so(tmp_path):
    """A static scan stored as HU + 1024: the blood pool cannot change, and the refusal says why
    that is likelier than a heart that does not beat; the same scan in HU is refused without it."""
    rng = np.random.default_rng(0)
    data = rng.normal(40.0, 5.0, (24, 24, 24, 3)).astype(np.float32)
    data[8:16, 8:16, 8:16] = 400.0
    data[20:] = -800.0
    for name, values, hint in (("hu", data, False), ("stored", data + 1024, True)):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(values.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
        with pytest.raises(InputError, match="does not change over the phases") as exc:
            detect_es_ed(read_scan(path), (200.0, 800.0))
        assert ("intensities do not look like HU" in str(exc.value)) == hint, str(exc.value)


def test_bad_input_with_debug_raises(ray_session, cohort, tmp_path, capsys):
    """--debug before the command or after it: the error is raised with its traceback."""
    inputs, _ = _bad_not_nifti(tmp_path, cohort)
    with pytest.raises(InputError, match=r"not a NIfTI \(.nii, .nii.gz\), NRRD"):
        main(["--debug", "prepare", "--scans", *map(str, inputs), "--out", str(tmp_path / "out")])
    with pytest.raises(InputError, match=r"not a NIfTI \(.nii, .nii.gz\), NRRD"):
        main(["prepare", "--scans", *map(str, inputs), "--out", str(tmp_path / "out"), "--debug"])
    assert main(["prepare", "--scans", *map(str, inputs), "--out", str(tmp_path / "out")]) == 2  # without: one line


def test_missing_scan_path(tmp_path, capsys):
    rc = main(["prepare", "--scans", str(tmp_path / "nowhere.nii.gz"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere.nii.gz" in err[0] and "does not exist" in err[0]


def test_worker_separates_bugs_from_bad_input(cohort, cfg, tmp_path, monkeypatch):
    """The Ray UDF reports bad input as one line and a bug with its traceback, flagged, so a
    bug never reaches the user disguised as an 'error: <file>: ...' about their data."""
    import cardiomotion.data.prepare as prep

    row = {"scan_id": "phantom_000", "path": str(cohort[0]), "out": str(tmp_path),
           "cfg": cfg.prepare.model_dump_json(), "manifest": ""}

    def bug(*_a, **_k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(prep, "prepare_scan", bug)
    res = prep._prepare_row(row)
    assert res["internal"] and "ZeroDivisionError: oops" in res["error"] and "Traceback" in res["error"]

    def bad(*_a, **_k):
        raise InputError(cohort[0], "something wrong with the data")

    monkeypatch.setattr(prep, "prepare_scan", bad)
    res = prep._prepare_row(row)
    assert not res["internal"] and res["error"] == f"{cohort[0]}: something wrong with the data"


def test_stray_output_folder_is_refused(cohort, cfg, tmp_path):
    out = tmp_path / "out"
    (out / "phantom_000").mkdir(parents=True)
    (out / "phantom_000" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="phantom_000.*no finished prepared scan"):
        prepare_scans([cohort[0]], out, cfg)
    assert (out / "phantom_000" / "mine.txt").read_text() == "keep me"
    assert not (out / "scans.parquet").exists()


def test_output_path_that_is_a_file(cohort, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    rc = main(["prepare", "--scans", str(cohort[0]), "--out", str(target), "--config", str(SMOKE)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(target) in err[0] and "not a folder" in err[0]


@pytest.mark.parametrize("yaml_text, key, problem", [
    ("prepare:\n  spacing: 4.0\n", "prepare.spacing", "unknown key"),
    ("prepare:\n  spacing_mm: -4.0\n", "prepare.spacing_mm", "greater than 0"),
    ("prepare:\n  grid: [32, 32, 4]\n", "prepare.grid", ">= 8"),
    ("prepare:\n  dtype: int8\n", "prepare.dtype", "int16 or float32"),
    ("bogus_section: 1\n", "bogus_section", "unknown key"),
    ("prepare: [1, 2\n", "", "not valid YAML"),
])
def test_bad_config_one_line(yaml_text, key, problem, cohort, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(ConfigError):
        load_config(bad)
    rc = main(["prepare", "--scans", str(cohort[0]), "--out", str(tmp_path / "out"), "--config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "bad.yaml" in err[0] and key in err[0] and problem in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_a_config_is_read_as_utf8_whatever_the_locale(tmp_path):
    """A comment with non-ASCII text reads under the C locale too (GDCM, for one, switches a
    process to it); a file that is not UTF-8 is one ConfigError naming it."""
    import locale

    path = tmp_path / "utf8.yaml"
    path.write_bytes("# 30 mm — the default (µ, é)\nprepare:\n  spacing_mm: 2.0\n".encode("utf-8"))
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("# caf\xe9\nprepare:\n  spacing_mm: 2.0\n".encode("latin-1"))
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_ALL, "C")
        assert load_config(path).prepare.spacing_mm == 2.0
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    with pytest.raises(ConfigError, match=r"latin1.yaml.*not UTF-8 text"):
        load_config(latin)


def test_empty_config_section_means_defaults(tmp_path):
    path = tmp_path / "sparse.yaml"
    path.write_text("prepare:\n  # spacing_mm: 2.0\nphantom:\n  grid: 32\n")
    c = load_config(path)
    assert c.prepare == load_config().prepare and c.phantom.grid == 32


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_writes(tmp_path):
    from cardiomotion.fileio import atomic_dir, atomic_path

    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "table.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.startswith(".table.parquet.") and tmp.name.endswith(".tmp.parquet")
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o666 & ~umask

    full = tmp_path / "scan"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        with atomic_dir(full):
            pytest.fail("must refuse before the block runs")
    assert (full / "mine.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (empty / "a.txt").read_text() == "a" and empty.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not _leftovers(tmp_path)


def test_a_full_disk_is_one_line_and_leaves_nothing_partial(cohort, cfg, tmp_path, monkeypatch):
    """ENOSPC while writing a prepared scan (injected at the write call, in-process): the worker
    reports a resumable fault, not an internal error with a traceback, and no folder appears."""
    import errno

    import cardiomotion.data.prepare as prep

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prep, "write_nifti", full)
    out = tmp_path / "out"
    out.mkdir()
    row = prep._prepare_row({"scan_id": "phantom_000", "path": str(cohort[0]), "out": str(out),
                             "cfg": cfg.prepare.model_dump_json(), "manifest": ""})
    assert row["os_error"] and not row["internal"] and "\n" not in row["error"]
    assert "No space left on device" in row["error"] and "rerun the same command to resume" in row["error"]
    assert list(out.iterdir()) == []  # the atomic folder was never renamed into place


def test_symlinked_scan_folders_keep_their_link_names(cohort, cfg, tmp_path):
    """Two links to one phantom folder: each is prepared under its link's name (the plan's id),
    not the target's, so the folders do not collide and a rerun resumes both."""
    import cardiomotion.data.prepare as prep

    links = []
    for name in ("visit_a", "visit_b"):
        link = tmp_path / name
        link.symlink_to(cohort[0], target_is_directory=True)
        links.append(link)
    items = prep.plan_scans(links)
    assert [sid for sid, _ in items] == ["visit_a", "visit_b"]
    out = tmp_path / "out"
    out.mkdir()
    for sid, path in items:
        row = prep._prepare_row({"scan_id": sid, "path": str(path), "out": str(out),
                                 "cfg": cfg.prepare.model_dump_json(), "manifest": ""})
        assert row["error"] == "" and json.loads(row["record"])["scan_id"] == sid
    assert sorted(p.name for p in out.iterdir()) == ["visit_a", "visit_b"]


def test_frame_settings_hold_the_models_grid_as_the_field_types_it_and_keep_the_fingerprint():
    """`generate --frames` prepares frames on the model's grid: the settings hold it as the
    3-tuple the field declares (a list made pydantic warn on every dump), and the fingerprint that
    names prepared frames is what validated settings of that grid give, so earlier frames stay valid."""
    import warnings

    from cardiomotion.data.frames import frame_settings
    from cardiomotion.data.prepare import config_fingerprint

    base = load_config(None, {}).prepare
    pcfg = frame_settings(base, np.array([32, 32, 32]), np.float32(4.0))
    assert pcfg.grid == (32, 32, 32) and pcfg.spacing_mm == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pcfg.model_dump()
        pcfg.model_dump_json()
    validated = load_config(None, {"prepare": {"grid": [32, 32, 32], "spacing_mm": 4.0}}).prepare
    assert config_fingerprint(pcfg) == config_fingerprint(validated)
