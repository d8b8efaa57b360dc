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
    """Fingerprints written before stop 40 held every ``refine*`` key in ``pyramid_settings``:
    such a record resumes under today's fingerprint whatever those keys were, while any other
    difference is still refused."""
    from cardiomotion.config import load_config
    from cardiomotion.errors import InputError
    from cardiomotion.train.sweep import recorded_fingerprint, refuse_other_settings, sweep_fingerprint

    cfg = load_config(None, {"cv": {"pyramid": "per_fold"}})
    now = sweep_fingerprint(Path("/p"), Path("/f"), cfg)
    old = json.loads(json.dumps(now))
    old["pyramid_settings"].update({"refine": True, "refine_steps": 300, "refine_smooth_weight": 0.03,
                                    "refine_start": "zero"})
    state = tmp_path / "state.json"
    refuse_other_settings(state, recorded_fingerprint(old), now, "sweep")  # resumes
    old["pyramid_settings"]["epochs"] = now["pyramid_settings"]["epochs"] + 1
    with pytest.raises(InputError, match="pyramid_settings.epochs"):
        refuse_other_settings(state, recorded_fingerprint(old), now, "sweep")
    assert recorded_fingerprint(None) is None and recorded_fingerprint({"seed": 0}) == {"seed": 0}
