"""Connecting to Ray: an embedded local instance by default, or a cluster address."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from .config import RayConfig


def detect_gpu(setting: bool | None, ray) -> bool:
    """Whether a stage uses GPUs: its ``use_gpu`` setting, or (null) whether the cluster has any."""
    if setting is not None:
        return bool(setting)
    return ray.cluster_resources().get("GPU", 0) > 0


def stage_gpu(resources, ray, where: str) -> bool:
    """:func:`detect_gpu` for a ``resources`` block, refusing ``use_gpu: true`` on a cluster
    without a GPU (``where`` names the setting) instead of waiting forever for one."""
    from .errors import InputError

    use_gpu = detect_gpu(resources.use_gpu, ray)
    if use_gpu and not ray.cluster_resources().get("GPU", 0):
        raise InputError(where, "is true but the Ray cluster has no GPU")
    return use_gpu


def actor_pool(resources, actors: int | None, ray, where: str) -> tuple[bool, int]:
    """(use_gpu, pool size) of an actor pool whose actors each ask for ``resources``
    (:class:`~cardiomotion.config.Resources`): ``actors`` when set, else as many as the cluster's
    GPUs (on GPU) or CPUs hold. ``where`` names the setting in the error when ``use_gpu`` is true
    on a cluster without a GPU."""
    use_gpu = stage_gpu(resources, ray, where)
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if actors:
        return use_gpu, int(actors)
    if use_gpu:
        return use_gpu, max(1, int(gpus / resources.gpus))
    return use_gpu, max(1, int(float(res.get("CPU", 1)) // resources.cpus))


# Ray Train stops waiting for a run's worker resources after 60 s, logs "Error in control loop
# iteration" with a traceback, and tries again — every minute, per waiting run, forever (the
# controller's retries are unlimited). On an autoscaling cluster the minute is when nodes are asked
# for; on an embedded instance nothing scales and a run waiting for CPUs waits for this process's own
# other runs (utility's fold CVAEs beside its estimators, a sweep's folds): the plan, not a fault.
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
EMBEDDED_TRAIN_START_TIMEOUT_S = 7 * 24 * 3600
# Ray Train (2.60) starts a preemption watcher beside every run: an actor that polls for nodes
# being drained (spot instances) and logs them. Created with max_restarts > 0 and its arguments in
# the object store, it makes the controller's core worker log an error line ("Actor with class
# name: 'PreemptionWatcher' ... max_restarts > 0", ray#53727) at the start of every run. An
# embedded instance is this machine alone: no node of it is ever drained, so the watcher has
# nothing to watch and only that line to give.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def embedded_environment(port: int) -> dict[str, str]:
    """What every process of an embedded instance whose GCS listens on ``port`` inherits: its own
    address (see :func:`init_ray`) and, unless the caller's environment sets them, a Ray Train
    worker-group start timeout of a week, so a run queued behind the instance's own work waits
    quietly instead of logging a traceback each minute, and no Ray Train preemption watcher
    (:data:`PREEMPTION_WATCHER_ENV`: one machine has no node to drain)."""
    return {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}",
            TRAIN_START_TIMEOUT_ENV: os.environ.get(TRAIN_START_TIMEOUT_ENV, str(EMBEDDED_TRAIN_START_TIMEOUT_S)),
            PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0")}


def embedded_dashboard(dashboard: bool, taken: tuple[int, ...] = ()) -> dict[str, int]:
    """``ray.init`` arguments for an embedded instance's dashboard: none when it runs (Ray takes
    port 8265, or the next free one when another instance holds it, and records where), and a port
    of its own, free now and not among ``taken`` (the instance's GCS port), when it does not. Ray
    starts a dashboard process either way, and it records its address (8265 unless told) in the
    instance whether or not its web server starts; Ray's state API — which Ray Train's
    placement-group cleaner asks, every second, whether the run's controller is alive — goes to
    that address. Without a web server of its own, an instance pointing at 8265 asks whichever
    other instance's dashboard is there; that one has never heard of the controller, so the cleaner
    removes the run's placement group and the training workers die mid-run ("Destroying worker
    since its placement group was removed"). Pointed at a port where nothing listens, the state API
    is simply unavailable, and the cleaner keeps waiting."""
    if dashboard:
        return {}
    port = free_port()
    while port in taken:
        port = free_port()
    return {"dashboard_port": port}


def init_ray(cfg: RayConfig | None = None):
    """Initialise Ray once per process and return the module.

    ``cfg.address`` null → an embedded local instance (``address="local"``, so a stale
    /tmp/ray/ray_current_cluster is never joined by accident); "auto" or ray://… → that
    cluster. Inside a Ray job (``RAY_ADDRESS`` set) the job's cluster is used.

    An embedded instance pins its own address for every process it starts: its GCS gets a port
    chosen here, and the GCS, raylet and dashboard — hence every worker, actor and Ray Train
    controller, which inherit the raylet's environment — see ``RAY_ADDRESS`` set to it. Without
    that, Ray code that locates "the" cluster by looking for running GCS processes (Ray Train's
    placement-group cleaner queries the state API) fails with "Found multiple active Ray
    instances" whenever a second experiment runs on the same machine. The driver's own
    environment is left as it was (a later stage in this process or a child command must not
    join this instance by accident). The same processes get a long Ray Train start timeout
    and no preemption watcher (:func:`embedded_environment`), and an instance without a dashboard
    a dashboard port of its own (:func:`embedded_dashboard`); a cluster keeps Ray's settings.
    """
    import ray

    if ray.is_initialized():
        return ray
    cfg = cfg or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        start_embedded(ray, dashboard=cfg.dashboard, num_cpus=cfg.num_cpus,
                       object_store_memory=cfg.object_store_mb * 1024**2 if cfg.object_store_mb else None, **kwargs)
    return ray


def start_embedded(ray, *, dashboard: bool, **init_kwargs) -> None:
    """``ray.init`` of an embedded local instance (``address="local"``) as :func:`init_ray` starts
    one: its GCS on a port free now, pinned for every process it starts
    (:func:`embedded_environment`), and without a dashboard a dashboard port of its own
    (:func:`embedded_dashboard`). ``init_kwargs`` go to ``ray.init`` (CPUs, object store, logging);
    the test suite's session instance starts here too."""
    port = free_port()
    with environ_pinned(embedded_environment(port)):
        ray.init(address="local", include_dashboard=dashboard, **embedded_dashboard(dashboard, taken=(port,)),
                 **init_kwargs)


def free_port() -> int:
    """A TCP port free on this machine now (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def environ_pinned(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (processes started inside it
    inherit them), then restore what was there before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_log_level() -> str:
    """``RAY_LOGGER_LEVEL`` as a logging level name ("WARNING"); INFO when unset or unknown."""
    import logging

    level = os.environ.get("RAY_LOGGER_LEVEL", "info").upper()
    return level if level in logging.getLevelNamesMapping() else "INFO"


def train_logging():
    """Ray Train's own log level (controller and workers) as a ``RunConfig(logging_config=)``.

    Follows ``RAY_LOGGER_LEVEL`` — the CLI and jobs/ set it to warning, so a run's console
    shows the stage's progress rather than every worker-group start and checkpoint report —
    and is INFO otherwise (Ray's default).
    """
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=_ray_log_level())


def quiet_train_worker() -> None:
    """In a Ray Train worker: apply ``RAY_LOGGER_LEVEL`` to the one Ray Train logger that
    :func:`train_logging` cannot reach. Ray 2.60 logs "Reporting training result …" (one line
    per report) through ``logging.getLogger(__file__)`` of its execution context, a logger
    outside ``ray.train``. A no-op when the level is INFO or lower, or on a Ray without it."""
    import logging

    level = _ray_log_level()
    if logging.getLevelNamesMapping()[level] <= logging.INFO:
        return
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(level)
