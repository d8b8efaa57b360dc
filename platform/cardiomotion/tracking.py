"""The one place that talks to MLflow.

Tracking URI, in order: config ``tracking.uri``, ``$MLFLOW_TRACKING_URI``, else a sqlite store
``<storage_root>/mlflow.db`` with artifacts in ``<storage_root>/mlartifacts``. A bare path names
a sqlite file (``*.db``) or a folder that holds ``mlflow.db``. URIs are made
absolute: Ray workers run in other directories. A server URI (http/https) is checked before any
work starts, so a stage never trains for hours and then loses its logs.
"""
from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .config import Config, storage_root
from .errors import CardiomotionError


class TrackingError(CardiomotionError):
    """MLflow is unreachable or refused a request."""


def tracking_uri(cfg: Config) -> str:
    """Absolute MLflow tracking URI for this config (see module docstring)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{storage_root(cfg) / 'mlflow.db'}"
    if "://" not in uri:  # a bare path: a sqlite file (*.db) or a folder to keep mlflow.db in
        path = Path(uri).expanduser().resolve()  # (MLflow 3 refuses its old file store by default)
        return f"sqlite:///{path if path.suffix == '.db' else path / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        return f"sqlite:///{Path(rel).resolve()}"
    return uri


def ui_hint(uri: str) -> str:
    """How to open the MLflow UI for a tracking URI (a server serves it; a local store needs one)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f".venv/bin/mlflow ui --backend-store-uri {uri}"


def _artifact_root(uri: str, cfg: Config) -> str | None:
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None  # server or file store: its own default


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError unless an http(s) tracking server answers its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (configured URI)
            if resp.status != 200:
                raise TrackingError(f"MLflow server {uri} answered {resp.status} to {url}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                            "(see README: Running on a cluster) or unset MLFLOW_TRACKING_URI") from None


def setup(cfg: Config, experiment: str | None = None) -> str:
    """Point mlflow at the configured store and experiment (created if needed); returns the URI."""
    import mlflow

    uri = tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI. Undo that: the variable is the
    # user's setting, and left behind it would send every later stage of this process (another
    # storage root, another config) to this store. Ray workers get the URI passed explicitly.
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    name = experiment or cfg.tracking.experiment
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name, artifact_location=_artifact_root(uri, cfg))
        except Exception:  # created concurrently by another process
            if client.get_experiment_by_name(name) is None:
                raise
    mlflow.set_experiment(name)
    return uri


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat {"section.key": value} for mlflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


@contextmanager
def start_run(cfg: Config, run_name: str, *, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, nested: bool = False,
              parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run after :func:`setup`; yields the run."""
    import mlflow

    setup(cfg)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested,
                          tags=all_tags or None) as run:
        if params:
            mlflow.log_params({k: v for k, v in flatten(params).items()})
        yield run


def supersede_running(cfg: Config, key_tag: str, key: str) -> list[str]:
    """Mark as KILLED every RUNNING run of the configured experiment whose tag ``key_tag`` is
    ``key``: a run SIGKILLed mid-stage never ends itself, and the caller (holding the stage's lock
    on that output) is the run that replaces it. Returns the run ids marked."""
    import mlflow

    uri = setup(cfg)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    safe = key.replace("'", "")
    found = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{key_tag}` = '{safe}' and attributes.status = 'RUNNING'"))
    for r in found:
        client.set_tag(r.info.run_id, "superseded", "true")
        client.set_terminated(r.info.run_id, "KILLED")
    return [r.info.run_id for r in found]


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)


def log_metrics_to(uri: str | None, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
    """Log metrics to a given run from any process (Ray workers): no active-run state needed."""
    if not (uri and run_id):
        return
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
    MlflowClient(uri).log_batch(run_id, metrics=batch)


@contextmanager
def watch_metric(uri: str, run_id: str, key: str, on_step: Callable[[int, float], None] | None,
                 every_s: float = 2.0) -> Iterator[None]:
    """While the block runs, call ``on_step(step, value)`` once per new step of metric ``key``.

    A daemon thread polls the run's metric history every ``every_s`` seconds (the Ray Train
    workers log one step per epoch from another process), and once more when the block ends, so
    the caller sees every step in order. Steps logged before the block (a resumed run) are
    reported on the first poll. Polling is best effort: a busy store skips a poll. Does nothing
    when ``on_step`` is None.
    """
    if on_step is None:
        yield
        return
    import threading

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    seen: set[int] = set()
    stop = threading.Event()

    def poll() -> None:
        try:
            history = client.get_metric_history(run_id, key)
        except Exception:  # noqa: BLE001 (a locked sqlite store or a slow server: try again later)
            return
        for m in sorted(history, key=lambda m: m.step):
            if m.step not in seen:
                seen.add(m.step)
                on_step(int(m.step), float(m.value))

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name=f"watch-{key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_checkpoint(path: str | Path, artifact_path: str = "model") -> str:
    """Log a state_dict + config checkpoint file as the run's artifact dir ``artifact_path``.

    Returns the model URI ``runs:/<run_id>/<artifact_path>``.
    """
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return f"runs:/{mlflow.active_run().info.run_id}/{artifact_path}"


def download(uri: str, cfg: Config, dst: str | Path | None = None) -> Path:
    """Download an artifact (``runs:/<id>/<path>`` or ``models:/…``) to a local path.

    A local sqlite store that does not exist holds no artifact: refused without creating it (a
    lookup writes nothing).
    """
    import mlflow

    uri_store = tracking_uri(cfg)
    if uri_store.startswith("sqlite:///") and not Path(uri_store[len("sqlite:///"):]).is_file():
        raise TrackingError(f"{uri}: no MLflow store at {uri_store[len('sqlite:///'):]} (set tracking.uri or "
                            "MLFLOW_TRACKING_URI to the store the run logged to)")
    setup(cfg)
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="cardiomotion-artifact-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        raise TrackingError(f"{uri}: cannot be resolved in {tracking_uri(cfg)} ({exc.__class__.__name__}: {exc})") from None
