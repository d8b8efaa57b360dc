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
