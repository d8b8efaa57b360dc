"""Shared fixtures: one embedded Ray instance per session, small phantom data in temp dirs."""
from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def ray_session():
    """A session-scoped embedded Ray (2 CPUs, no GPU even on a GPU host: the tests model the
    CPU-only CI cluster; small object store), its address pinned for every
    process it starts as `init_ray` pins it: with `make test`'s two pytest workers (xdist) two
    such instances run side by side, and Ray code that looks for "the" cluster must find its own."""
    import ray

    from cardiomotion.raycluster import embedded_environment, environ_pinned, free_port

    if not ray.is_initialized():
        port = free_port()
        with environ_pinned(embedded_environment(port)):
            ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=256 * 1024**2,
                     include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
