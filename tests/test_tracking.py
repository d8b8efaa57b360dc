"""The MLflow glue: URIs, and the epoch watcher that drives the training progress bars."""
from __future__ import annotations

import threading
import time

import pytest

from cardiomotion.config import load_config


@pytest.fixture()
def store(tmp_path, monkeypatch):
    from cardiomotion import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, {"storage_root": str(tmp_path / "store")})
    uri = tracking.setup(cfg)
    return cfg, uri


def test_default_uri_is_an_absolute_sqlite_store_under_the_storage_root(store, tmp_path):
    cfg, uri = store
    assert uri == f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').resolve()}"


def test_a_bare_path_is_a_sqlite_store(tmp_path, monkeypatch):
    from cardiomotion.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = load_config(None, {"tracking": {"uri": str(tmp_path / "runs")}})
    assert tracking_uri(folder) == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    db = load_config(None, {"tracking": {"uri": str(tmp_path / "x.db")}})
    assert tracking_uri(db) == f"sqlite:///{(tmp_path / 'x.db').resolve()}"


def test_watch_metric_reports_each_step_once_in_order_while_another_thread_logs(store):
    from cardiomotion import tracking

    cfg, uri = store
    seen: list[tuple[int, float]] = []
    with tracking.start_run(cfg, "watch") as run:
        run_id = run.info.run_id
        tracking.log_metrics_to(uri, run_id, {"train_loss": 9.0}, step=0)  # before the watch: a resumed run

        def worker() -> None:  # stands in for a Ray Train rank logging one step per epoch
            for step in range(1, 6):
                tracking.log_metrics_to(uri, run_id, {"train_loss": 10.0 - step, "other": 1.0}, step=step)
                time.sleep(0.05)

        with tracking.watch_metric(uri, run_id, "train_loss", lambda s, v: seen.append((s, v)), every_s=0.02):
            t = threading.Thread(target=worker)
            t.start()
            t.join()
    assert seen == [(0, 9.0)] + [(s, 10.0 - s) for s in range(1, 6)]


def test_watch_metric_without_a_callback_does_nothing(store):
    from cardiomotion import tracking

    _, uri = store
    with tracking.watch_metric(uri, "no-such-run", "train_loss", None):
        pass


def test_two_storage_roots_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    """setup() must not leave $MLFLOW_TRACKING_URI behind (mlflow.set_tracking_uri exports it):
    a second config with another storage root gets its own store, not the first one's."""
    import os

    from cardiomotion import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_config(None, {"storage_root": str(tmp_path / "a")})
    second = load_config(None, {"storage_root": str(tmp_path / "b")})
    with tracking.start_run(first, "one"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.setup(second) == f"sqlite:///{(tmp_path / 'b' / 'mlflow.db').resolve()}"
    with tracking.start_run(second, "two") as run:
        assert run.info.run_name == "two"
    assert (tmp_path / "a" / "mlflow.db").is_file() and (tmp_path / "b" / "mlflow.db").is_file()
    import mlflow

    names = lambda cfg: [r.info.run_name for r in mlflow.search_runs(  # noqa: E731
        experiment_names=[cfg.tracking.experiment], output_format="list")]
    tracking.setup(first)
    assert names(first) == ["one"]
    tracking.setup(second)
    assert names(second) == ["two"]


def test_a_users_tracking_uri_survives_setup(tmp_path, monkeypatch):
    import os

    from cardiomotion import tracking

    user = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    cfg = load_config(None, {"storage_root": str(tmp_path / "a"), "tracking": {"uri": str(tmp_path / "cfgstore")}})
    tracking.setup(cfg)  # the config's URI wins for this stage …
    assert os.environ["MLFLOW_TRACKING_URI"] == user  # … and the user's variable is left as it was


def test_a_killed_runs_mlflow_run_is_marked_killed_by_its_successor(tmp_path):
    import mlflow

    from cardiomotion.config import load_config
    from cardiomotion.tracking import setup, supersede_running, tracking_uri

    cfg = load_config(None, {"storage_root": str(tmp_path / "store")})
    setup(cfg)
    client = mlflow.MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    dead = client.create_run(exp, tags={"corpus_out": "/data/corpus"}).info.run_id  # never ended: SIGKILL
    other = client.create_run(exp, tags={"corpus_out": "/data/other"}).info.run_id
    done = client.create_run(exp, tags={"corpus_out": "/data/corpus"}).info.run_id
    client.set_terminated(done, "FINISHED")
    assert supersede_running(cfg, "corpus_out", "/data/corpus") == [dead]
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING" and client.get_run(done).info.status == "FINISHED"
