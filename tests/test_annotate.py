"""The annotation stage: PWC-Net training on Ray Train, flows, quality table, MLflow, resume."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cardiomotion.config import load_config
from cardiomotion.errors import InputError

TINY = {
    "phantom": {"patients": 2, "grid": 32},
    "prepare": {"spacing_mm": 4.0, "grid": [32, 32, 32]},
    "annotate": {"pwc": {"channels": [8, 16, 32], "estimator_channels": [16, 16], "search_range": 1},
                 "epochs": 4, "checkpoint_every": 2, "refine_steps": 25, "refine_levels": 2},
    "ray": {"num_cpus": 2, "dashboard": False},
}


EPOCHS_SEEN: list[tuple[int, float]] = []  # the training progress callback's calls


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, ray_session):
    from cardiomotion.annotate import annotate
    from cardiomotion.data.phantom import make_cohort
    from cardiomotion.data.prepare import prepare_scans

    root = tmp_path_factory.mktemp("annotate")
    cfg = load_config(None, {**TINY, "storage_root": str(root / "store")})
    folders = make_cohort(root / "cohort", patients=2, grid=32, workers=1)
    prepare_scans(folders, root / "prepared", cfg)
    table = annotate(root / "prepared", root / "annotations", cfg,
                     on_epoch=lambda e, v: EPOCHS_SEEN.append((e, v)))
    return root, cfg, table


@pytest.mark.slow
def test_annotations_table_and_flows(annotated):
    from cardiomotion.flow.io import read_flow

    root, cfg, table = annotated
    df = pd.read_parquet(table)
    assert sorted(df.scan_id) == ["phantom_000", "phantom_001"]
    for col in ("photometric_zero", "photometric_refined", "folding_refined", "epe_mm_zero",
                "epe_myo_mm_zero", "epe_myo_mm_net", "epe_myo_mm_refined"):
        assert col in df.columns and df[col].notna().all(), col
    for row in df.itertuples():
        flow, affine = read_flow(root / "annotations" / row.flow_path)
        ed = nib.load(str(root / "prepared" / row.scan_id / "ed.nii.gz"))
        assert flow.shape == (3, 32, 32, 32)
        np.testing.assert_allclose(affine, ed.affine, atol=1e-5)
    # Refinement against the photometric loss must beat no motion at all, in image error and in
    # endpoint error against the phantom's exact field.
    assert (df.photometric_refined < 0.5 * df.photometric_zero).all()
    assert (df.epe_myo_mm_refined < df.epe_myo_mm_zero).all()
    assert (df.folding_refined < 0.01).all()
    # the refined flows move the myocardium, not as much as the truth nor far more
    assert ((df.magnitude_myo_refined > 0.3) & (df.magnitude_myo_refined < 1.5)).all()


@pytest.mark.slow
def test_flow_file_opens_in_simpleitk(annotated):
    sitk = pytest.importorskip("SimpleITK")
    root, _, table = annotated
    row = pd.read_parquet(table).iloc[0]
    img = sitk.ReadImage(str(root / "annotations" / row.flow_path), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(img)
    assert transform.GetDimension() == 3


@pytest.mark.slow
def test_pyramid_and_model_artifacts_load_safely(annotated):
    from cardiomotion.models.pwcnet import PWCNet3D
    from cardiomotion.models.pyramid import FeaturePyramid

    root, _, _ = annotated
    pyr = FeaturePyramid.load(root / "annotations" / "feature_pyramid.pt")
    assert pyr.config()["channels"] == [8, 16, 32]
    net = PWCNet3D.load(root / "annotations" / "pwcnet.pt")
    # The saved pyramid is the trained network's own pyramid.
    for (k, a), (_, b) in zip(pyr.state_dict().items(), net.pyramid.state_dict().items()):
        assert torch.equal(a, b), k
    raw = torch.load(root / "annotations" / "feature_pyramid.pt", weights_only=True)
    assert set(raw) >= {"config", "state_dict", "kind"}


@pytest.mark.slow
def test_mlflow_run_records_training_and_artifacts(annotated):
    import mlflow

    from cardiomotion.tracking import tracking_uri

    root, cfg, _ = annotated
    client = mlflow.MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'annotate'")
    assert len(runs) == 1
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "pwc_train_loss")
    assert [m.step for m in history] == list(range(4))
    # The progress callback saw each epoch once, in order, with the logged loss.
    assert EPOCHS_SEEN == [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    # The default cosine schedule drove the optimiser: epoch e of 4 ran at lr·(1 + cos(πe/4))/2.
    lrs = sorted(client.get_metric_history(run.info.run_id, "pwc_train_lr"), key=lambda m: m.step)
    assert cfg.annotate.lr_schedule.value == "cosine"
    np.testing.assert_allclose([m.value for m in lrs], [1e-3 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)],
                               rtol=1e-6)
    assert "mean_epe_myo_mm_refined" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "feature_pyramid", "figures", "annotations.parquet"} <= arts
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/feature_pyramid",
                                                tracking_uri=tracking_uri(cfg))
    from cardiomotion.models.pyramid import FeaturePyramid

    FeaturePyramid.load(f"{local}/feature_pyramid.pt")


@pytest.mark.slow
def test_rerun_reuses_model_and_flows(annotated):
    from cardiomotion.annotate import annotate

    root, cfg, table = annotated
    model = root / "annotations" / "pwcnet.pt"
    flow = root / "annotations" / "phantom_000" / "flow.nii.gz"
    before = (model.stat().st_mtime_ns, flow.stat().st_mtime_ns)
    annotate(root / "prepared", root / "annotations", cfg)
    assert (model.stat().st_mtime_ns, flow.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_a_rerun_with_other_annotate_settings_is_refused_before_any_work(annotated):
    from cardiomotion.annotate import annotate
    from cardiomotion.annotate.stage import annotation_settings

    root, cfg, _ = annotated
    out = root / "annotations"
    assert json.loads((out / "settings.json").read_text()) == annotation_settings(cfg)
    model = out / "pwcnet.pt"
    before = model.stat().st_mtime_ns
    other = load_config(None, {**TINY, "storage_root": str(root / "store"),
                               "annotate": {**TINY["annotate"], "epochs": 5}})
    with pytest.raises(InputError, match=r"settings.json.*annotate.epochs: 4 then, 5 now"):
        annotate(root / "prepared", out, other)
    assert model.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_refinement_change_reuses_the_trained_network_from_another_folder(annotated, tmp_path):
    """The fixture annotated with a 30 mm support; the same prepared set without a support, given
    ``network=`` that folder: refused in place (the message names --network), then made in a new
    folder without training — the same network bytes, no Ray Train run — and the new (plain)
    flows weighted by the 30 mm support reproduce the fixture's flows (the refinement starts from
    zero flow and is deterministic: only the support differs)."""
    from cardiomotion.annotate import annotate
    from cardiomotion.annotate.stage import ANNOTATE_TRAIN_DIR, MODEL_FILE, PYRAMID_FILE, annotation_settings
    from cardiomotion.annotate.support import motion_support
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.flow.io import read_flow

    root, cfg, _ = annotated
    assert cfg.annotate.refine_support_mm == 30 and cfg.annotate.refine_start.value == "zero"
    src = root / "annotations"
    plain = load_config(None, {**TINY, "storage_root": str(root / "store"),
                               "annotate": {**TINY["annotate"], "refine_support_mm": 0}})
    with pytest.raises(InputError, match=rf"refine_support_mm: 30.0 then, 0.0 now.*--network {src}"):
        annotate(root / "prepared", src, plain)
    out = tmp_path / "plain"
    annotate(root / "prepared", out, plain, network=src)
    for name in (MODEL_FILE, PYRAMID_FILE):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / ANNOTATE_TRAIN_DIR).exists()  # nothing trained
    assert json.loads((out / "settings.json").read_text()) == annotation_settings(plain)
    for _, row in read_scan_table(root / "prepared").iterrows():
        pair = load_pair(root / "prepared", row)
        u_plain, _ = read_flow(out / row.scan_id / "flow.nii.gz")
        u_masked, _ = read_flow(src / row.scan_id / "flow.nii.gz")
        w = motion_support(pair.es, pair.ed, pair.spacing_mm, tuple(cfg.prepare.blood_hu), 30.0)
        assert w is not None and (w < 1).any()  # the support masks part of the grid: the flows differ
        np.testing.assert_allclose(u_plain * w[None], u_masked, atol=1e-5)
        assert np.abs(u_plain - u_masked).max() > 1e-3


def test_the_network_to_reuse_is_checked_before_any_work(tmp_path):
    """``annotate --network``'s source: refused when it is the output folder, holds no usable
    network, lacks its records, annotated another prepared set or trained its network with other
    settings (the first difference named); accepted when only the refinement's settings differ."""
    from cardiomotion.annotate.stage import MODEL_FILE, PYRAMID_FILE, annotation_settings, check_network_source
    from cardiomotion.data.table import PREPARED_ID_FILE
    from cardiomotion.models.pwcnet import PWCNet3D

    cfg = load_config(None, TINY)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    with pytest.raises(InputError, match="output folder itself"):
        check_network_source(src, src.resolve(), cfg, "id")
    with pytest.raises(InputError, match="holds no trained network to reuse"):
        check_network_source(src, out, cfg, "id")
    net = PWCNet3D(channels=(4, 8), estimator_channels=(8,), search_range=1)
    net.save(src / MODEL_FILE)
    net.pyramid.save(src / PYRAMID_FILE)
    with pytest.raises(InputError, match=f"{PREPARED_ID_FILE}: is missing"):
        check_network_source(src, out, cfg, "id")
    (src / PREPARED_ID_FILE).write_text("id\n")
    with pytest.raises(InputError, match="settings.json: is missing"):
        check_network_source(src, out, cfg, "id")
    (src / "settings.json").write_text(json.dumps(annotation_settings(cfg)))
    assert check_network_source(src, out, cfg, "id") == src.resolve()
    with pytest.raises(InputError, match="another prepared set"):
        check_network_source(src, out, cfg, "other id")
    refined = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "refine_support_mm": 20,
                                                      "refine_smooth_weight": 0.03}})
    assert check_network_source(src, out, refined, "id") == src.resolve()
    longer = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "epochs": 5}})
    with pytest.raises(InputError, match=r"other settings \(annotate.epochs: 4 then, 5 now\)"):
        check_network_source(src, out, longer, "id")
    window = load_config(None, {**TINY, "intensity": {"window": [-100, 700]}})
    with pytest.raises(InputError, match=r"intensity.window"):
        check_network_source(src, out, window, "id")
    assert not out.exists()


def test_the_settings_guard_records_refuses_and_leaves_older_folders_alone(tmp_path):
    """Fresh folder: settings to record before training; a record with the same settings: nothing
    to write; other settings or an unreadable record: refused; a key the record lacks matches at
    its default only; a finished network with no record (made before records were kept): reused
    unchecked; an interrupted training beside no record: refused, neither resumed nor deleted."""
    from cardiomotion.annotate.stage import MODEL_FILE, PYRAMID_FILE, annotation_settings, check_settings
    from cardiomotion.models.pwcnet import PWCNet3D

    cfg = load_config(None, TINY)
    fresh = tmp_path / "fresh"
    assert check_settings(fresh, cfg) == annotation_settings(cfg)
    fresh.mkdir()
    (fresh / "settings.json").write_text(json.dumps(annotation_settings(cfg)))
    assert check_settings(fresh, cfg) is None
    cosine_to_constant = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "lr_schedule": "constant"}})
    with pytest.raises(InputError, match='annotation was run with other settings .annotate.lr_schedule: "cosine" then, "constant" now'):
        check_settings(fresh, cosine_to_constant)
    older_record = annotation_settings(cfg)
    del older_record["annotate"]["lr_schedule"], older_record["annotate"]["pwc"]["aligned"]  # keys added later
    (fresh / "settings.json").write_text(json.dumps(older_record))
    assert check_settings(fresh, cfg) is None  # both at their defaults: the same settings
    aligned = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "pwc": {**TINY["annotate"]["pwc"], "aligned": True}}})
    with pytest.raises(InputError, match='annotate.pwc.aligned: null then, true now'):
        check_settings(fresh, aligned)
    with pytest.raises(InputError, match="lr_schedule: null then"):
        check_settings(fresh, cosine_to_constant)
    # the support: its mode is no setting while it is off; on, the blood range it grows from is one
    off = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "refine_support_mm": 0}})
    (fresh / "settings.json").write_text(json.dumps(annotation_settings(off)))
    confine_off = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "refine_support_mm": 0,
                                                          "refine_support_mode": "confine"}})
    assert annotation_settings(confine_off) == annotation_settings(off) and check_settings(fresh, confine_off) is None
    assert cfg.annotate.refine_support_mm == 30.0 and annotation_settings(cfg)["support_blood_hu"] == [200.0, 800.0]
    with pytest.raises(InputError, match="refine_support_mm: 0.0 then, 30.0 now"):
        check_settings(fresh, cfg)
    before_support = annotation_settings(off)
    del before_support["annotate"]["refine_support_mm"], before_support["annotate"]["refine_support_mode"]
    (fresh / "settings.json").write_text(json.dumps(before_support))  # a record from before stop 40: no support
    assert check_settings(fresh, off) is None
    with pytest.raises(InputError, match="refine_support_mm: 0.0 then, 30.0 now"):  # not the default it lacks
        check_settings(fresh, cfg)
    (fresh / "settings.json").write_text(json.dumps(annotation_settings(cfg)))
    assert check_settings(fresh, cfg) is None
    with pytest.raises(InputError, match=r"support_blood_hu: \[200.0, 800.0\] then, \[250.0, 800.0\] now"):
        check_settings(fresh, load_config(None, {**TINY, "prepare": {**TINY.get("prepare", {}), "blood_hu": [250.0, 800.0]}}))
    # the volume term (on by default since stop 46): its tissue range is no setting while it is off;
    # a record from before it was made without it
    assert cfg.annotate.refine_volume_weight == 0.001
    with pytest.raises(InputError, match=r"refine_tissue_hu: \[0.0, 200.0\] then, \[-50.0, 150.0\] now"):
        check_settings(fresh, load_config(None, {**TINY, "annotate": {**TINY["annotate"], "refine_tissue_hu": [-50, 150]}}))
    no_volume = {**TINY["annotate"], "refine_volume_weight": 0}
    volume_off = load_config(None, {**TINY, "annotate": no_volume})
    tissue_off = load_config(None, {**TINY, "annotate": {**no_volume, "refine_tissue_hu": [-50, 150]}})
    assert annotation_settings(tissue_off) == annotation_settings(volume_off)
    before_volume = annotation_settings(cfg)
    del before_volume["annotate"]["refine_volume_weight"], before_volume["annotate"]["refine_tissue_hu"]
    (fresh / "settings.json").write_text(json.dumps(before_volume))  # a record from before stop 46
    assert check_settings(fresh, volume_off) is None and check_settings(fresh, tissue_off) is None
    with pytest.raises(InputError, match=r"refine_volume_weight: 0.0 then, 0.001 now"):  # not the default it lacks
        check_settings(fresh, cfg)
    # without refinement no refinement key is a setting: a folder annotated so before the support
    # and the volume term existed is resumed with today's defaults, and with any other value of them
    unrefined = load_config(None, {**TINY, "annotate": {**TINY["annotate"], "refine": False}})
    before_both = annotation_settings(unrefined)
    for key in ("refine_support_mm", "refine_support_mode", "refine_volume_weight", "refine_tissue_hu"):
        del before_both["annotate"][key]
    (fresh / "settings.json").write_text(json.dumps(before_both))
    assert check_settings(fresh, unrefined) is None
    assert check_settings(fresh, load_config(None, {**TINY, "annotate": {**TINY["annotate"], "refine": False,
                                                                          "refine_volume_weight": 0.01,
                                                                          "refine_sigma": 1.0}})) is None
    with pytest.raises(InputError, match="refine: false then, true now"):
        check_settings(fresh, cfg)
    (fresh / "settings.json").write_text('{"seed": ')
    with pytest.raises(InputError, match="unreadable settings record"):
        check_settings(fresh, cfg)

    older = tmp_path / "older"
    older.mkdir()
    (older / "ray_train" / "pwcnet").mkdir(parents=True)  # an interrupted training of unknown settings
    with pytest.raises(InputError, match=r"ray_train: holds an interrupted training with no settings record"):
        check_settings(older, cfg)
    assert (older / "ray_train" / "pwcnet").is_dir()  # not thrown away unasked
    net = PWCNet3D(channels=(4, 8), estimator_channels=(8,), search_range=1)
    net.save(older / MODEL_FILE)
    net.pyramid.save(older / PYRAMID_FILE)
    assert check_settings(older, cfg) is None and check_settings(older, cosine_to_constant) is None
    assert not (older / "settings.json").exists()


@pytest.mark.slow
def test_bad_prepared_data_is_refused_before_any_work(annotated, tmp_path):
    from cardiomotion.annotate import annotate

    root, cfg, _ = annotated
    with pytest.raises(InputError, match="scans.parquet.*no scan table"):
        annotate(tmp_path / "nothing", tmp_path / "out1", cfg)
    assert not (tmp_path / "out1").exists()

    bad = tmp_path / "prepared"
    shutil.copytree(root / "prepared", bad)
    ed = bad / "phantom_001" / "ed.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.int16), np.eye(4)), str(ed))
    with pytest.raises(InputError, match=r"phantom_001/ed.nii.gz: ED grid \(32, 32, 16\) differs"):
        annotate(bad, tmp_path / "out2", cfg)
    assert not (tmp_path / "out2").exists()

    (bad / "phantom_001" / "ed.nii.gz").unlink()
    with pytest.raises(InputError, match="phantom_001/ed.nii.gz: listed in scans.parquet but missing"):
        annotate(bad, tmp_path / "out3", cfg)
    assert not (tmp_path / "out3").exists()

    # a truncated volume (its header whole): refused before the run records the prepared set it was
    # given, so the repaired set can be annotated into the same --out
    es = bad / "phantom_000" / "es.nii.gz"
    es.write_bytes(es.read_bytes()[: len(es.read_bytes()) // 2])
    shutil.copy(root / "prepared" / "phantom_001" / "ed.nii.gz", ed)
    with pytest.raises(InputError, match=r"phantom_000/es.nii.gz: unreadable prepared volume"):
        annotate(bad, tmp_path / "out4", cfg)
    assert not (tmp_path / "out4").exists()


def test_epoch_lr_known_values():
    """Constant keeps lr; cosine starts at lr, halves at mid-training, decreases every epoch and
    stays above 0 at the last; a name outside the two is refused."""
    from cardiomotion.annotate.pwc import epoch_lr

    assert [epoch_lr(1e-3, "constant", e, 40) for e in (0, 20, 39)] == [1e-3] * 3
    cos = [epoch_lr(2e-3, "cosine", e, 40) for e in range(40)]
    assert cos[0] == pytest.approx(2e-3) and cos[20] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(cos, cos[1:])) and 0 < cos[-1] < 2e-3 * 0.01
    with pytest.raises(ValueError, match="step"):
        epoch_lr(1e-3, "step", 0, 40)


def test_a_network_worse_than_zero_flow_is_named():
    """The 44-patient run whose training diverged: network 0.305 against zero flow's 0.063."""
    from cardiomotion.annotate.stage import network_warning

    cfg = load_config(None, {})
    bad = {"mean_photometric_net": 0.3054, "mean_photometric_zero": 0.0633}
    said = network_warning(bad, cfg)
    assert said is not None and "0.3054" in said and "0.0633" in said and "diverged" in said
    assert "refined from zero flow and do not depend on it" in said  # the default refinement
    # what depends on the network follows the settings
    assert "are its predictions" in network_warning(bad, load_config(None, {"annotate": {"refine": False}}))
    assert "refined from its predictions" in network_warning(bad, load_config(None, {"annotate": {"refine_start": "network"}}))
    assert network_warning({"mean_photometric_net": 0.006, "mean_photometric_zero": 0.063}, cfg) is None
    assert network_warning({"mean_photometric_zero": 0.063}, cfg) is None  # no network figure
    assert network_warning({"mean_photometric_net": float("nan"), "mean_photometric_zero": 0.063}, cfg) is None


def test_tiny_pwcnet_learns_on_a_phantom_pair():
    """A few Adam steps on one 32³ phantom pair lower the full-resolution photometric loss."""
    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.data.phantom import make_patient
    from cardiomotion.flow.warp import warp
    from cardiomotion.models.pwcnet import PWCNet3D
    from cardiomotion.train.losses import photometric_loss, pwc_unsupervised_loss

    torch.manual_seed(0)
    p = make_patient(0, grid=32, noise=False)
    es_t, ed_t = p.meta["es_phase"], p.meta["ed_phase"]
    moving = torch.from_numpy(hu_to_unit(p.ct[..., es_t], (-200, 800)))[None, None]
    fixed = torch.from_numpy(hu_to_unit(p.ct[..., ed_t], (-200, 800)))[None, None]
    net = PWCNet3D(channels=(8, 16, 32), estimator_channels=(16, 16), search_range=1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def full_res_loss() -> float:
        with torch.no_grad():
            return float(photometric_loss(fixed, warp(moving, net(fixed, moving).flow)))

    before = full_res_loss()
    for _ in range(40):
        out = net(fixed, moving)
        loss, _ = pwc_unsupervised_loss(fixed, moving, [*out.levels, out.flow], [0.25, 0.5, 1.0, 1.0], 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert full_res_loss() < 0.8 * before


@pytest.mark.slow
def test_foreign_folder_in_the_output_is_refused_before_any_work(annotated, tmp_path):
    from cardiomotion.annotate import annotate

    root, cfg, _ = annotated
    out = tmp_path / "out"
    (out / "phantom_000").mkdir(parents=True)
    (out / "phantom_000" / "flow.nii.gz").write_bytes(b"not ours")
    with pytest.raises(InputError, match="phantom_000: exists but holds no finished annotation"):
        annotate(root / "prepared", out, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000"]  # nothing else written


def test_a_truncated_or_missing_network_is_trained_again_not_reused(tmp_path):
    """Resume after a killed run or a full disk: only a network and pyramid that both load are reused."""
    from cardiomotion.annotate.stage import MODEL_FILE, PYRAMID_FILE, _unusable_model
    from cardiomotion.models.pwcnet import PWCNet3D

    net = PWCNet3D(channels=(4, 8), estimator_channels=(8,), search_range=1)
    assert "missing" in _unusable_model(tmp_path)
    net.save(tmp_path / MODEL_FILE)
    assert _unusable_model(tmp_path) == f"{tmp_path / PYRAMID_FILE} is missing"
    net.pyramid.save(tmp_path / PYRAMID_FILE)
    assert _unusable_model(tmp_path) is None
    data = (tmp_path / MODEL_FILE).read_bytes()
    (tmp_path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    assert "unreadable" in _unusable_model(tmp_path) and MODEL_FILE in _unusable_model(tmp_path)


def test_annotations_of_another_prepared_set_are_refused(tmp_path):
    """Same scan ids and grid, other content: the recorded fingerprint tells them apart."""
    import shutil

    import nibabel as nib
    import numpy as np

    from cardiomotion.data.table import PREPARED_ID_FILE, check_prepared_identity, prepared_fingerprint, write_scan_table

    def prepared(root, value):
        root.mkdir()
        recs = []
        for sid in ("a", "b"):
            (root / sid).mkdir()
            for name in ("es", "ed"):
                nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.int16), np.eye(4)), str(root / sid / f"{name}.nii.gz"))
            recs.append({"scan_id": sid, "es_path": f"{sid}/es.nii.gz", "ed_path": f"{sid}/ed.nii.gz"})
        write_scan_table(root, recs)
        return root

    p1, p2 = prepared(tmp_path / "p1", 1), prepared(tmp_path / "p2", 2)
    assert prepared_fingerprint(p1) != prepared_fingerprint(p2)
    flows = tmp_path / "flows"
    flows.mkdir()
    check_prepared_identity(p1, flows)  # no record (hand-made annotations): accepted
    (flows / PREPARED_ID_FILE).write_text(prepared_fingerprint(p1) + "\n")
    check_prepared_identity(p1, flows)
    with pytest.raises(InputError, match="made from another prepared set"):
        check_prepared_identity(p2, flows)
    shutil.copy2(p2 / "a" / "es.nii.gz", p1 / "a" / "es.nii.gz")  # content changed in place
    with pytest.raises(InputError, match="another prepared set"):
        check_prepared_identity(p1, flows)


def test_a_gpu_asked_of_a_cluster_without_one_is_refused_not_waited_for(tmp_path, ray_session):
    """``annotate.resources.use_gpu: true`` on a GPU-less cluster: one clear error before Ray
    Train is started (Ray would otherwise wait for a GPU forever)."""
    from cardiomotion.annotate.pwc import train_pwcnet

    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store"),
                             "annotate": {**TINY["annotate"], "resources": {"use_gpu": True}}})
    with pytest.raises(InputError, match="annotate.resources.use_gpu: is true but the Ray cluster has no GPU"):
        train_pwcnet(tmp_path / "prepared", cfg, tmp_path / "runs", rows=[])
    assert not (tmp_path / "runs").exists()


def test_quality_record_known_keys_and_values():
    """The quality record of each candidate flow: the truth scores EPE 0 and magnitude 1; zero flow
    scores the truth's own length and records neither magnitude nor folding; without a truth only
    the photometric error and folding are recorded."""
    from types import SimpleNamespace

    from cardiomotion.annotate.stage import _quality

    shape = (8, 8, 8)
    truth = np.zeros((3, *shape), np.float32)
    truth[2] = 1.0  # one voxel along the last axis everywhere
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 2:6, 2:6] = 2
    labels[0] = 3
    img = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    flows = {"zero": torch.zeros(1, 3, *shape), "refined": torch.from_numpy(truth)[None]}
    pair = SimpleNamespace(truth_flow=truth, ed_labels=labels, spacing_mm=2.0)
    q = _quality(pair, img, img, flows, alpha=0.85)
    assert q["epe_mm_zero"] == pytest.approx(2.0) and q["epe_myo_mm_zero"] == pytest.approx(2.0)
    assert q["epe_heart_mm_zero"] == pytest.approx(2.0) and q["folding_zero"] == 0.0
    assert q["epe_mm_refined"] == 0.0 and q["magnitude_myo_refined"] == pytest.approx(1.0)
    assert q["magnitude_heart_refined"] == pytest.approx(1.0) and q["folding_refined"] == 0.0
    assert q["photometric_zero"] == pytest.approx(0.0, abs=1e-6)  # the same image on both sides
    assert set(q) == {f"{k}_{n}" for n in ("zero", "refined") for k in (
        "photometric", "folding", "epe_mm", "epe_heart_mm", "epe_myo_mm")} | {"magnitude_heart_refined",
                                                                               "magnitude_myo_refined"}
    blind = _quality(SimpleNamespace(truth_flow=None, ed_labels=None, spacing_mm=2.0), img, img, flows, alpha=0.85)
    assert set(blind) == {"photometric_zero", "folding_zero", "photometric_refined", "folding_refined"}
