"""cv.pyramid: per_fold — fold k's CVAE is conditioned on the pyramid of a PWC-Net trained
without scan k (strict leave-one-out), cached and reused; shared stays annotate's pyramid."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cv_cohort import TINY, cohort


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_per_fold_pyramid_is_trained_without_the_held_out_scan_and_reused(tmp_path_factory, tmp_path, ray_session):
    import mlflow

    from cardiomotion.config import load_config
    from cardiomotion.layout import PYRAMID_FILE, fold_pyramid_path
    from cardiomotion.tracking import tracking_uri
    from cardiomotion.train.cvae import train_fold
    from cardiomotion.train.fold import plan_fold

    prepared, flows = cohort(tmp_path_factory)
    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store"), "cv": {"pyramid": "per_fold"},
                             "annotate": {**TINY["annotate"], "epochs": 1, "checkpoint_every": 1},
                             "train": {**TINY["train"], "epochs": 1}})
    shared = plan_fold(prepared, flows, 1)
    assert shared.pyramid == flows / PYRAMID_FILE and shared.pyramid_protocol == "shared"
    plan = plan_fold(prepared, flows, 1, "per_fold")
    assert plan.pyramid == fold_pyramid_path(flows, plan.val_id) and not plan.pyramid.exists()

    said: list[str] = []
    res = train_fold(prepared, flows, 1, cfg, log=said.append)
    assert plan.pyramid.is_file()
    made_with = json.loads((plan.pyramid.parent / "pyramid.json").read_text())  # what it was trained with
    assert made_with["held_out"] == plan.val_id and made_with["annotate"]["epochs"] == 1
    assert any(f"without {plan.val_id} (3 pairs" in m for m in said), said  # 4 scans, the held-out one left out
    assert _sha(plan.pyramid) != _sha(flows / PYRAMID_FILE)
    model_dir = mlflow.artifacts.download_artifacts(res.model_uri, tracking_uri=tracking_uri(cfg),
                                                    dst_path=str(tmp_path / "model"))
    assert _sha(Path(model_dir) / PYRAMID_FILE) == _sha(plan.pyramid)  # the model carries its fold's pyramid
    assert json.loads((Path(model_dir) / "model.json").read_text())["pyramid_protocol"] == "per_fold"

    # a rerun (train_fold asks for the fold's pyramid first, the same call) reuses it untouched
    from cardiomotion.annotate import train_fold_pyramid

    stamp = plan.pyramid.stat().st_mtime_ns
    said.clear()
    assert train_fold_pyramid(prepared, flows, plan.val_id, cfg, log=said.append) == plan.pyramid
    assert plan.pyramid.stat().st_mtime_ns == stamp and not any("without" in m for m in said)  # reused

    # a record written while the refinement's settings were part of it (before stop 40) is reused too
    record = plan.pyramid.parent / "pyramid.json"
    old = json.loads(record.read_text())
    old["annotate"].update({"refine": True, "refine_steps": 300, "refine_smooth_weight": 0.03})
    record.write_text(json.dumps(old))
    assert train_fold_pyramid(prepared, flows, plan.val_id, cfg, log=said.append) == plan.pyramid
    assert plan.pyramid.stat().st_mtime_ns == stamp and not said, said


def test_per_fold_sweeps_depend_on_the_pyramid_settings_shared_ones_do_not():
    """Each per_fold fold trains its own pyramid, so annotate's settings are part of what a sweep
    is (a resumed sweep with another pyramid architecture is refused); with shared they are
    annotate's business, recorded with its output."""
    from cardiomotion.config import load_config
    from cardiomotion.train.sweep import sweep_fingerprint

    p, f = Path("/p"), Path("/f")

    def fp(pyramid, **pwc):
        return sweep_fingerprint(p, f, load_config(None, {"cv": {"pyramid": pyramid}, "annotate": {"pwc": pwc}}))

    assert fp("per_fold") != fp("per_fold", aligned=True)
    assert fp("per_fold") == fp("per_fold", aligned=False)  # the default, spelled out
    assert fp("shared") == fp("shared", aligned=True)
    assert "aligned" not in fp("per_fold")["pyramid_settings"]["pwc"]  # absent at its default

    def fp_lr(schedule):
        return sweep_fingerprint(p, f, load_config(None, {"cv": {"pyramid": "per_fold"},
                                                          "annotate": {"lr_schedule": schedule}}))

    assert fp_lr("cosine") == fp("per_fold") != fp_lr("constant")  # cosine: the default
    # constant (every record before the key) is recorded without it, so those records still match
    assert "lr_schedule" not in fp_lr("constant")["pyramid_settings"]
    # the refinement runs after the pyramid is trained: none of its settings is part of it
    for refine in ({"refine_edge_weight": 10}, {"refine_support_mm": 20}, {"refine_smooth_weight": 0.03},
                   {"refine": False}):
        assert sweep_fingerprint(p, f, load_config(None, {"cv": {"pyramid": "per_fold"}, "annotate": refine})) \
            == fp("per_fold"), refine
    assert not [k for k in fp("per_fold")["pyramid_settings"] if k.startswith("refine")]


def test_a_sweep_recorded_with_the_refinements_settings_still_resumes(tmp_path):
    """Fingerprints written before stop 40 held every refinement key in ``pyramid_settings`` and no
    hash of the flows: such a record resumes (through ``resume_state``, as cv and tune do) whatever
    those keys were, while any other difference is still refused — and so are the same flows
    folder's flows annotated again."""
    from cardiomotion.annotate.stage import current_pyramid_record
    from cardiomotion.config import load_config
    from cardiomotion.errors import InputError
    from cardiomotion.fileio import write_json
    from cardiomotion.train.sweep import recorded_fingerprint, resume_state, sweep_fingerprint

    flows = tmp_path / "flows"
    (flows / "s0").mkdir(parents=True)
    (flows / "s0" / "flow.nii.gz").write_bytes(b"first annotation")
    cfg = load_config(None, {"cv": {"pyramid": "per_fold"}, "storage_root": str(tmp_path / "store")})
    now = sweep_fingerprint(Path("/p"), flows, cfg)
    old = json.loads(json.dumps(now))
    del old["flows_sha256"]  # not recorded before stop 40
    old["pyramid_settings"].update({"refine": True, "refine_steps": 300, "refine_smooth_weight": 0.03,
                                    "refine_start": "zero"})
    state = tmp_path / "cv.json"
    write_json(state, {"fingerprint": old})
    resume_state(state, now, "sweep", cfg)  # resumes
    assert recorded_fingerprint(old, now) == now
    assert current_pyramid_record(old, "pyramid_settings")["pyramid_settings"] == now["pyramid_settings"]
    old["pyramid_settings"]["epochs"] = now["pyramid_settings"]["epochs"] + 1
    assert current_pyramid_record(old, "pyramid_settings")["pyramid_settings"] != now["pyramid_settings"]
    assert current_pyramid_record([1], "pyramid_settings") == [1]  # not a record: unchanged
    write_json(state, {"fingerprint": old})
    with pytest.raises(InputError, match="pyramid_settings.epochs"):
        resume_state(state, now, "sweep", cfg)
    write_json(state, {"fingerprint": now})
    (flows / "s0" / "flow.nii.gz").write_bytes(b"annotated again")
    with pytest.raises(InputError, match="flows_sha256"):
        resume_state(state, sweep_fingerprint(Path("/p"), flows, cfg), "sweep", cfg)
    assert recorded_fingerprint(None, now) is None


def test_the_refinement_keys_are_the_annotate_settings_named_refine():
    """The pyramid's fingerprint leaves out exactly the refinement's settings, named one by one."""
    from cardiomotion.annotate.stage import REFINEMENT_KEYS
    from cardiomotion.config import AnnotateConfig

    assert set(REFINEMENT_KEYS) == {k for k in AnnotateConfig.model_fields if k.startswith("refine")}