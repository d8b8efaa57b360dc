"""Shared fixtures: one embedded Ray instance per session, small phantom data in temp dirs."""
from __future__ import annotations

import json
import os
from pathlib import Path

# Ray settings that must be in place before ray is imported anywhere.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores run the test process and Ray workers side by side: one intra-op thread each avoids
# oversubscription (two spinning threads per process are 10-30x slower under load).
torch.set_num_threads(1)


FILE_COSTS = Path(__file__).with_name("file_costs.json")


def pytest_addoption(parser):
    parser.addoption("--record-file-costs", metavar="PATH", default=None,
                     help="write each test file's summed test durations (s) to PATH as JSON "
                          "(the costs tests/file_costs.json orders `make test`'s files by)")


def pytest_collection_modifyitems(config, items):
    """The costliest files first (tests/file_costs.json: seconds per file path as pytest names it,
    measured with ``--record-file-costs``; a file not listed counts as free and runs last), each
    file's tests together and in collection order. ``make test``'s xdist workers take the files in
    this order (``--dist loadfile --no-loadscope-reorder``; xdist hands a worker its next file once
    it has two or fewer tests left, so one-test files are queued in pairs): roughly
    longest-processing-time-first, so the one-test files of several minutes do not start last while
    the other worker idles. A stale table only changes the order, never which tests run."""
    try:
        costs = json.loads(FILE_COSTS.read_text())
    except (OSError, ValueError):
        costs = {}
    items.sort(key=lambda item: -float(costs.get(_file_of(item.nodeid), 0.0)))  # stable within a file


_file_seconds: dict[str, float] = {}


def _file_of(nodeid: str) -> str:
    """The file part of a test id (``tests/test_cv.py`` of ``tests/test_cv.py::test_x[1]``)."""
    return nodeid.split("::", 1)[0]


def pytest_runtest_logreport(report):
    """Sums each file's setup, call and teardown durations (in the xdist controller, from every
    worker's reports) for ``--record-file-costs``."""
    name = _file_of(report.nodeid)
    _file_seconds[name] = _file_seconds.get(name, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    dst = session.config.getoption("--record-file-costs")
    # the controller writes, not a worker; and only after a whole, passing run (a failed or
    # interrupted one would replace the table with part of it)
    if dst is None or hasattr(session.config, "workerinput") or exitstatus != 0:
        return
    from cardiomotion.fileio import atomic_path

    with atomic_path(dst) as tmp:  # costliest first, for the reader (the order is read by name)
        tmp.write_text(json.dumps({k: round(v, 1) for k, v in sorted(_file_seconds.items(), key=lambda kv: -kv[1])},
                                  indent=1) + "\n")


@pytest.fixture(scope="session")
def ray_session():
    """A session-scoped embedded Ray (2 CPUs, no GPU even on a GPU host: the tests model the
    CPU-only CI cluster; small object store; no dashboard, its state API address one of its own
    as `init_ray` gives it), its address pinned for every
    process it starts as `init_ray` pins it: with `make test`'s two pytest workers (xdist) two
    such instances run side by side, and Ray code that looks for "the" cluster must find its own."""
    import ray

    from cardiomotion.raycluster import start_embedded

    if not ray.is_initialized():
        start_embedded(ray, dashboard=False, num_cpus=2, num_gpus=0, object_store_memory=256 * 1024**2,
                       log_to_driver=False)
    yield ray
    ray.shutdown()
