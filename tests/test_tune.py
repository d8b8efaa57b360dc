"""Ray Tune search: 4 trials with ASHA, interrupted and restored, a loadable best config, MLflow
parent/child runs, trials on the folds' transport pools, and bad search spaces refused before work."""
from __future__ import annotations

import csv
import os
import signal

import mlflow
import pytest
from cv_cohort import TINY, cohort
from ray import tune

from cardiomotion.config import load_config
from cardiomotion.errors import ConfigError, InputError

SEARCH = {"samples": 4, "folds": [0], "grace_period": 1, "reduction_factor": 2, "kl_cycles": [1, 2]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_session):
    prepared, flows = cohort(tmp_path_factory)
    root = tmp_path_factory.mktemp("tune")
    cfg = load_config(None, {**TINY, "storage_root": str(root / "store"), "tune": SEARCH,
                             "train": {**TINY["train"], "transport_partners": 1}})
    return prepared, flows, root, cfg


class InterruptOnce(tune.Callback):
    """Sends the driver SIGUSR1 (what Ray Tune treats like Ctrl-C) at the 2nd trial result, once
    per test session: Tuner.restore unpickles the run's callbacks too, and a module-level class
    comes back as this same class (its state lives in class attributes)."""

    seen = 0
    fired = False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        InterruptOnce.seen += 1
        if InterruptOnce.seen >= 2 and not InterruptOnce.fired:
            InterruptOnce.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_search_is_interrupted_restored_and_writes_a_loadable_best_config(inputs):
    from cardiomotion.layout import transport_pairs_dir
    from cardiomotion.tracking import tracking_uri
    from cardiomotion.train.tune import TuneInterrupted, run_tune

    prepared, flows, root, cfg = inputs
    out = root / "search"

    with pytest.raises(TuneInterrupted, match="rerun the same command to resume"):
        run_tune(prepared, flows, out, cfg, callbacks=[InterruptOnce()])
    assert (out / "search").is_dir() and not (out / "best.yaml").exists()

    res = run_tune(prepared, flows, out, cfg)  # the same command again: Tuner.restore
    assert res.restored
    best = load_config(out / "best.yaml")  # a full config that train / cv accept
    assert best.train.w_rec == pytest.approx(res.best["w_rec"]) and best.train.lr == pytest.approx(res.best["lr"])
    assert cfg.tune.w_kl[0] <= best.train.w_kl <= cfg.tune.w_kl[1]
    assert 1 <= best.train.kl_cycles <= 2  # the default cyclical schedule searches its cycle count
    assert best.prepare == cfg.prepare and best.train.epochs == cfg.train.epochs
    with open(out / "trials.csv") as fh:
        trials = list(csv.DictReader(fh))
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    assert {t["status"] for t in trials} <= {"finished", "stopped early"}
    assert "finished" in {t["status"] for t in trials}
    assert res.best["score"] == pytest.approx(min(float(t["score"]) for t in trials if t["status"] == "finished"))
    assert res.best["score"] == pytest.approx(res.best["score_energy"] + res.best["score_kl_penalty"])

    client = mlflow.MlflowClient(tracking_uri(cfg))
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["stage"] == "tune" and "best_score" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {"best.yaml", "trials.csv"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(t["trial_id"] for t in trials)  # one each
    best_run = client.get_run(res.best["run_id"])
    assert best_run.data.params["train.lr"] and len(client.get_metric_history(res.best["run_id"], "score")) >= 2

    # train.transport_partners 1: each trial trains fold 0 on its transport pool, as train_fold would (the 3
    # training scans, one partner's motion each), through the storage root's pair cache (3 pairs between them all)
    for c in children:
        assert {m.value for m in client.get_metric_history(c.info.run_id, "transport_pairs")} == {3.0}
    assert sum(client.get_metric_history(c.info.run_id, "transport_registered")[0].value for c in children) >= 3
    assert len(list(transport_pairs_dir(cfg.storage_root).glob("*.pt"))) == 3


@pytest.mark.parametrize("tune_override, error, message", [
    ({"lr": (1e-2, 1e-3)}, ConfigError, r"config: tune.lr: a log-uniform range must be \(low, high\) "
                                        r"with 0 < low < high, got \[0.01, 0.001\]"),
    ({"w_kl": (-0.1, 0.5)}, ConfigError, "tune.w_kl: a log-uniform range"),
    ({"kl_warmup_epochs": (5, 1)}, ConfigError, "tune.kl_warmup_epochs: must be"),
    ({"kl_cycles": (0, 2)}, ConfigError, "tune.kl_cycles: must be"),
    ({"kl_cycles": (50, 100)}, InputError, r"tune.kl_cycles: the range \[50, 100\] starts above "
                                           r"the 2 epochs a trial trains: no trial could run that many KL cycles"),
    ({"folds": [0, "phantom_042"]}, InputError, "tune.folds: no such fold or scan: 'phantom_042'"),
    ({"max_concurrent": 5}, InputError, "tune.max_concurrent: 5 concurrent trials requested but the cluster "
                                        "holds at most 4"),
])
def test_bad_search_is_refused_before_work(inputs, tmp_path, tune_override, error, message):
    from cardiomotion.train.tune import run_tune

    prepared, flows, _, cfg = inputs
    # model_copy(update=...) skips pydantic's validators, as code building a config might
    bad = cfg.model_copy(update={"tune": cfg.tune.model_copy(update=tune_override)})
    with pytest.raises(error, match=message):
        run_tune(prepared, flows, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_the_search_varies_the_knob_of_the_configured_kl_schedule():
    """A linear schedule searches its warm-up, a cyclical one its cycle count (the other would have no
    effect); both ranges are capped at the trial's epochs and applied as integers."""
    from cardiomotion.train.tune import apply_trial, search_space, searched

    lin = load_config(None, {"train": {"kl_schedule": "linear"}, "tune": {"kl_warmup_epochs": [0, 50]}})
    cyc = load_config(None, {"train": {"kl_schedule": "cyclical"}, "tune": {"kl_cycles": [2, 50]}})
    assert searched(lin) == ("w_rec", "w_kl", "lr", "kl_warmup_epochs")
    assert searched(cyc) == ("w_rec", "w_kl", "lr", "kl_cycles")
    assert "kl_cycles" not in search_space(lin, 10) and "kl_warmup_epochs" not in search_space(cyc, 10)
    cycles = search_space(cyc, 10)["kl_cycles"]
    drawn = {cycles.sample() for _ in range(200)}
    assert drawn <= set(range(2, 11)) and max(drawn) == 10  # capped at 10 epochs, high end inclusive
    best = apply_trial(cyc, {"kl_cycles": 3.0, "lr": 1e-3, "kl_warmup_epochs": 7})
    assert best.train.kl_cycles == 3 and isinstance(best.train.kl_cycles, int)
    assert best.train.kl_warmup_epochs == 0  # not searched under this schedule: left as configured


def test_bad_search_space_in_a_config_file_is_refused():
    with pytest.raises(ConfigError, match="tune.lr: a log-uniform range"):
        load_config(None, {"tune": {"lr": [0.0, 1e-3]}})


def test_cli_rejects_zero_samples(inputs, tmp_path, capsys):
    from cardiomotion.cli import main

    prepared, flows, _, _ = inputs
    rc = main(["tune", "--prepared", str(prepared), "--flows", str(flows), "--out", str(tmp_path / "o"),
               "--samples", "0"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "error: --samples: must be at least 1, got 0"


def test_objective_is_the_energy_score_and_collapse_cannot_win():
    from cardiomotion.config import TuneConfig
    from cardiomotion.train.tune import objective

    tc = TuneConfig()  # no KL penalty by default
    vae = {"val_energy_vox": 0.5, "val_epe_rec_vox": 0.6, "val_kl": 0.5}
    assert objective(vae, tc) == pytest.approx(
        {"score": 0.5, "score_energy": 0.5, "score_kl_penalty": 0.0, "score_rec": 0.6})
    # posterior collapse: every sample the mean motion. Its energy score is its error (no spread to
    # pay back), even though its reconstruction EPE is what the old objective rewarded.
    collapsed = {"val_energy_vox": 0.94, "val_epe_rec_vox": 0.94, "val_kl": 0.0}
    assert objective(collapsed, tc)["score"] > objective(vae, tc)["score"]
    # the optional KL penalty still works when asked for
    penal = TuneConfig(kl_max=2.0, kl_penalty=1.0)
    assert objective({**vae, "val_kl": 6.0}, penal)["score"] == pytest.approx(0.5 + 4.0)
    # a diverged trial is ranked last, not NaN
    assert objective({**vae, "val_kl": float("nan")}, tc)["score"] == pytest.approx(1e9)
    assert objective({**vae, "val_energy_vox": float("nan")}, tc)["score"] == pytest.approx(1e9)


def test_energy_score_objective_ranks_real_samplers():
    """The objective is fed by validate()'s energy score: an ensemble drawn from the held-out
    flow's own distribution beats a collapsed one and a KL-off autoencoder's off-distribution one."""
    import numpy as np

    from cardiomotion.evaluate.generative import ensemble_score

    rng = np.random.default_rng(3)
    mean = rng.standard_normal((3, 6, 6, 6))
    calibrated, collapsed, off = [], [], []
    for _ in range(100):
        y = mean + 0.5 * rng.standard_normal(mean.shape)
        calibrated.append(ensemble_score(mean + 0.5 * rng.standard_normal((4, *mean.shape)), y).energy_score)
        collapsed.append(ensemble_score(np.repeat(mean[None], 4, 0), y).energy_score)
        off.append(ensemble_score(mean + 3.0 * rng.standard_normal((4, *mean.shape)), y).energy_score)
    assert np.mean(calibrated) < np.mean(collapsed) < np.mean(off)


def test_a_search_recorded_before_trials_transported_is_not_resumed_with_transport(inputs, tmp_path):
    """Until stop 51 tune's trials ignored ``train.transport_partners``; a search recorded then with it
    set trained its trials without the transport pool, so trials that now transport must not resume
    it: its fingerprint lacks the marker and the rerun is refused, naming it. Without transport the
    fingerprint is as before (old searches resume)."""
    import copy

    from cardiomotion.train.sweep import refuse_other_settings
    from cardiomotion.train.tune import _fingerprint

    prepared, flows, _, cfg = inputs  # train.transport_partners: 1
    now = _fingerprint(prepared, flows, cfg, [0])
    before = copy.deepcopy(now)
    del before["tune"]["trials_transport"]
    with pytest.raises(InputError, match=r"tune.json: this search was run with other settings "
                                         r"\(tune.trials_transport: null then, true now\)"):
        refuse_other_settings(tmp_path / "tune.json", before, now, "search")
    off = cfg.model_copy(deep=True)
    off.train.transport_partners = 0
    assert "trials_transport" not in _fingerprint(prepared, flows, off, [0])["tune"]
