"""Cross-validation: 4 folds at once on 2 CPUs, parent/child MLflow runs, a worker failure that
resumes, a fold that fails for good, a rerun that skips finished folds, and bad input."""
from __future__ import annotations

import csv
import json

import mlflow
import pytest
from cv_cohort import TINY, cohort

from cardiomotion.config import dump_config, load_config
from cardiomotion.errors import InputError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_session):
    prepared, flows = cohort(tmp_path_factory)
    root = tmp_path_factory.mktemp("cv")
    cfg = load_config(None, {**TINY, "storage_root": str(root / "store")})
    return prepared, flows, root, cfg


@pytest.fixture(scope="module")
def sweep(inputs):
    """One sweep over all 4 folds: fold 1's worker is killed (SIGKILL) at epoch 1 (after the epoch-0 checkpoint)
    and must resume; fold 2 dies at epoch 0 in every attempt (no checkpoint yet), so it fails for
    good once its max_failures=1 restart is spent."""
    from cardiomotion.train.cv import run_cv

    prepared, flows, root, cfg = inputs
    progress = []
    res = run_cv(prepared, flows, root / "sweep", cfg, "all", on_progress=progress.append,
                 fail_at_epoch={1: 1, 2: 0})
    return res, progress


def _client(cfg):
    from cardiomotion.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri(cfg))


def _children(cfg, parent_id):
    client = _client(cfg)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_folds_run_concurrently_and_the_table_is_written(inputs, sweep):
    prepared, flows, root, cfg = inputs
    res, progress = sweep
    assert max(p.running for p in progress) == 4  # every fold launched at once: 4 × 0.5 CPU on 2 CPUs
    assert [r["fold"] for r in res.rows] == [0, 1, 2, 3]
    assert [r["status"] for r in res.rows] == ["done", "done", "failed", "done"]
    # SIGKILLed in every attempt: Ray says so as "worker process has died" or, when the controller
    # reaches the killed worker's actor first (seen once on a loaded machine), "… is unavailable"
    assert any(m in res.rows[2]["error"] for m in ("worker process has died", "is unavailable")), res.rows[2]["error"]
    for r in res.rows[:2] + res.rows[3:]:
        assert r["epe_rec_vox"] > 0 and r["epe_prior_vox"] > 0 and r["kl"] >= 0
        assert 0 <= r["folding_prior"] <= 1
        assert r["epe_rec_mm"] == pytest.approx(4.0 * r["epe_rec_vox"], rel=1e-5)  # 4 mm voxels
        assert r["epochs"] == 2
        # the prior as a distribution, and the physiology of its synthetic EDs (phantom labels)
        assert 0 < r["energy_vox"] and r["best_of_k_vox"] > 0 and r["spread_skill"] >= 0
        assert r["magnitude_ratio"] > 0 and 0.3 < r["ef_truth"] < 0.8
        assert r["ef_samples_min"] <= r["ef_samples_mean"] <= r["ef_samples_max"]
    with open(root / "sweep" / "folds.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["scan"] for t in table] == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    assert {"epe_rec_vox", "epe_prior_mm", "kl", "folding_prior", "run_id", "error", "energy_vox", "spread_skill",
            "magnitude_ratio", "ef_samples_mean", "ef_truth"} <= set(table[0])
    assert "energy vox" in res.format_table() and "EF truth" in res.format_table()
    summary = json.loads((root / "sweep" / "summary.json").read_text())
    assert (summary["done"], summary["failed"], summary["failed_folds"]) == (3, 1, [2])
    rec = [r["epe_rec_vox"] for r in res.rows if r["status"] == "done"]
    assert summary["metrics"]["epe_rec_vox"]["mean"] == pytest.approx(sum(rec) / 3)
    assert summary["metrics"]["epe_rec_vox"]["n"] == 3

    # MLflow: a cv parent run with one nested run per fold, the table and summary on the parent
    client = _client(cfg)
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["stage"] == "cv"
    assert parent.data.metrics["cv_folds_done"] == 3 and "cv_epe_rec_vox_mean" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {"folds.csv", "summary.json"}
    children = {int(r.data.tags["fold"]): r for r in _children(cfg, res.parent_run_id)}
    assert sorted(children) == [0, 1, 2, 3]
    assert children[2].info.status == "FAILED" and children[0].info.status == "FINISHED"
    assert children[0].data.params["val_scan"] == "phantom_000"  # train_fold's params on the pre-made run

    # folds trained at the same time: some moment lies inside the training span of several folds
    # (how many depends on how fast each trainer starts on a loaded 2-core box; all 4 were launched)
    spans = []
    for k in (0, 1, 3):
        hist = client.get_metric_history(children[k].info.run_id, "train_loss")
        spans.append((min(m.timestamp for m in hist), max(m.timestamp for m in hist)))
        assert "val_folding_prior" in children[k].data.metrics
    assert max(sum(a <= t <= b for a, b in spans) for t, _ in spans) >= 2
    # fold 1 resumed from its epoch-0 checkpoint: epoch 0 was not trained again
    steps = [m.step for m in client.get_metric_history(children[1].info.run_id, "train_loss")]
    assert sorted(steps) == [0, 1]


@pytest.mark.slow
def test_rerun_skips_finished_folds_and_retries_the_failed_one(inputs, sweep, tmp_path, capsys):
    from cardiomotion.cli import main

    prepared, flows, root, cfg = inputs
    res, _ = sweep
    before = {k: json.loads((root / "sweep" / "folds" / f"{k:03d}.json").read_text()) for k in range(4)}
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    rc = main(["cv", "--prepared", str(prepared), "--flows", str(flows), "--out", str(root / "sweep"),
               "--config", str(config)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(3 done earlier)" in out and "4 of 4 folds done, 0 failed" in out
    assert "mean ± std" in out
    after = {k: json.loads((root / "sweep" / "folds" / f"{k:03d}.json").read_text()) for k in range(4)}
    for k in (0, 1, 3):
        assert after[k] == before[k]  # finished folds untouched
    assert after[2]["status"] == "done" and after[2]["attempts"] == 2
    assert after[2]["run_id"] == before[2]["run_id"]  # same MLflow run, continued
    children = _children(cfg, res.parent_run_id)
    assert len(children) == 4
    client = _client(cfg)
    for k in (0, 3):  # not trained again: still one value per epoch
        steps = [m.step for m in client.get_metric_history(before[k]["run_id"], "train_loss")]
        assert sorted(steps) == [0, 1]
    summary = json.loads((root / "sweep" / "summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (4, 0)


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(inputs, sweep):
    from cardiomotion.train.cv import run_cv

    prepared, flows, root, cfg = inputs
    other = cfg.model_copy(deep=True)
    other.train.lr = 1e-4
    with pytest.raises(InputError, match=r"cv.json: this sweep was run with other settings \(train.lr"):
        run_cv(prepared, flows, root / "sweep", other)


@pytest.mark.parametrize("folds, message", [
    ("0,7", "--folds: no such fold or scan: 7 .*4 scans, folds 0..3"),
    (["phantom_009"], "no such fold or scan: 'phantom_009'"),
    ("", "names no fold"),
    ("2-5", "no such fold or scan: 4, 5 "),
])
def test_unknown_folds_are_refused_before_work(inputs, tmp_path, folds, message):
    from cardiomotion.train.cv import run_cv

    prepared, flows, _, cfg = inputs
    with pytest.raises(InputError, match=message):
        run_cv(prepared, flows, tmp_path / "out", cfg, folds)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ({"resources": {"cpus": 4.0}}, r"a fold worker needs \{CPU: 4\} but the largest node has \{CPU: 2\}: it can never"),
    ({"num_workers": 5, "resources": {"cpus": 0.5}}, r"a fold needs 5 workers × \{CPU: 0.5\} but the cluster has"),
])
def test_folds_the_cluster_can_never_hold_are_refused(inputs, tmp_path, override, message):
    from cardiomotion.train.cv import run_cv

    prepared, flows, _, cfg = inputs
    bad = cfg.model_copy(deep=True)
    for k, v in override.items():
        setattr(bad.train, k, v)
    with pytest.raises(InputError, match=message):
        run_cv(prepared, flows, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_more_concurrent_folds_than_resources_is_refused(inputs, tmp_path):
    from cardiomotion.train.cv import run_cv

    prepared, flows, _, cfg = inputs
    bad = cfg.model_copy(deep=True)
    bad.cv.max_concurrent = 8
    with pytest.raises(InputError, match="cv.max_concurrent: 8 concurrent folds requested but the cluster holds "
                                         "at most 4 at once"):
        run_cv(prepared, flows, tmp_path / "out", bad)


def test_gpu_fold_packing_capacity_and_rank_rule():
    from cardiomotion.train.sweep import capacity, check_capacity, fold_demand

    cfg = load_config(None, {"train": {"resources": {"gpus": 0.25, "cpus": 2}}})
    workers, bundle = fold_demand(cfg, use_gpu=True)
    assert (workers, bundle) == (1, {"CPU": 2.0, "GPU": 0.25})
    node = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}
    assert capacity([node], workers, bundle) == 4  # four folds share the GPU
    assert capacity([node, {"CPU": 8.0, "GPU": 2.0}], workers, bundle) == 8  # second node CPU-bound: 4
    assert check_capacity([node], workers, bundle, None) == 4
    with pytest.raises(InputError, match="the largest node has"):
        check_capacity([{"CPU": 16.0}], workers, bundle, None)  # no GPU anywhere
    cfg.train.num_workers = 2
    with pytest.raises(InputError, match="train.num_workers: 2 DDP ranks with resources.gpus 0.25"):
        fold_demand(cfg, use_gpu=True)
    assert fold_demand(cfg, use_gpu=False) == (2, {"CPU": 2.0})  # CPU-only clusters: DDP ranks are fine


def test_cli_bad_fold_list_is_one_line_and_exit_2(inputs, tmp_path, capsys):
    from cardiomotion.cli import main

    prepared, flows, _, _ = inputs
    rc = main(["cv", "--prepared", str(prepared), "--flows", str(flows), "--out", str(tmp_path / "o"),
               "--folds", "1,phantom_042"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == ["error: --folds: no such fold or scan: 'phantom_042' (the prepared dataset "
                                        "has 4 scans, folds 0..3: phantom_000, phantom_001, phantom_002, phantom_003)"]
