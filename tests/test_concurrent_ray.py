"""Two stages on one machine at the same time, each with its own embedded Ray instance.

With two local Ray instances alive, anything in Ray that finds "the" cluster by looking for
running GCS processes (Ray Train's placement-group cleaner queries the state API from the
controller) gives up with "Found multiple active Ray instances" — that once killed a `train` with
a traceback. Every embedded instance pins its own address for the processes it starts
(:func:`cardiomotion.raycluster.init_ray`); both runs here must finish cleanly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cv_cohort import TINY, cohort

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.serial
def test_two_trains_with_their_own_embedded_ray_both_succeed(tmp_path_factory, tmp_path):
    prepared, flows = cohort(tmp_path_factory)
    procs = []
    for fold in (0, 1):
        cfg = {**TINY, "train": {**TINY["train"], "epochs": 1, "checkpoint_every": 1},
               # the dashboard on (the default): Ray's state API, which Train queries, lives there
               "ray": {"num_cpus": 2, "dashboard": True}, "storage_root": str(tmp_path / f"store{fold}")}
        path = tmp_path / f"cfg{fold}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cardiomotion.cli", "train", "--prepared", str(prepared), "--flows", str(flows),
             "--fold", str(fold), "--config", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env))
    outs = [p.communicate(timeout=900) for p in procs]
    for fold, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"fold {fold}:\n{err[-4000:]}"
        assert "Found multiple active Ray instances" not in err, f"fold {fold}:\n{err[-4000:]}"
        assert "finished without a checkpoint" not in err, f"fold {fold}:\n{err[-4000:]}"
        # The one traceback allowed is Ray's own warning when a 5 s call to its autoscaling
        # coordinator times out on an overloaded CPU ("safe to ignore", logged by the Train
        # controller, the run goes on); any other traceback is a failure.
        assert err.count("Traceback") <= err.count("Failed to send resource request"), f"fold {fold}:\n{err[-4000:]}"
        assert "train: fold" in err or "train: fold" in out


_PROBE = """
import json, os
from cardiomotion.config import RayConfig
from cardiomotion.raycluster import PREEMPTION_WATCHER_ENV, TRAIN_START_TIMEOUT_ENV, init_ray
KEYS = (TRAIN_START_TIMEOUT_ENV, PREEMPTION_WATCHER_ENV)
ray = init_ray(RayConfig(num_cpus=1, dashboard=False))
@ray.remote
def task_env():
    return [os.environ.get(k) for k in KEYS]
@ray.remote
class Actor:
    def env(self):
        return [os.environ.get(k) for k in KEYS]
    def state_api(self, actor_id):
        # what Ray Train's placement-group cleaner asks from its own actor: where the state API is,
        # and whether the controller (here this actor) is alive
        from ray.dashboard.utils import get_address_for_submission_client
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException
        try:
            alive = is_actor_alive(actor_id=actor_id, timeout=5)
        except RayStateApiException:
            alive = "unavailable"
        return get_address_for_submission_client(None), alive
actor = Actor.remote()
url, alive = ray.get(actor.state_api.remote(actor._actor_id.hex()))
print(json.dumps({"task": ray.get(task_env.remote()), "actor": ray.get(actor.env.remote()),
                  "driver": [os.environ.get(k) for k in KEYS], "state_api": url, "alive": alive}))
"""


@pytest.mark.slow
@pytest.mark.serial
def test_an_embedded_instance_gives_ray_train_a_long_start_timeout_no_preemption_watcher_and_its_own_state_api(tmp_path):
    """Ray Train logs a traceback each minute while a run waits for CPUs (its default worker-group
    start timeout is 60 s, retried forever), and a core-worker error line at every run's start for
    its preemption watcher (ray#53727); an embedded instance's tasks and actors — the Train
    controller is one — see a week and the watcher off instead, the driver's own environment is
    untouched, and values the caller exported are passed through unchanged. Without a dashboard,
    the state API its processes find is an address of its own (:func:`cardiomotion.raycluster.embedded_dashboard`)."""
    from cardiomotion.raycluster import EMBEDDED_TRAIN_START_TIMEOUT_S, PREEMPTION_WATCHER_ENV, TRAIN_START_TIMEOUT_ENV

    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", TRAIN_START_TIMEOUT_ENV, PREEMPTION_WATCHER_ENV)}
    seen = {}
    for name, extra in (("default", {}), ("caller", {TRAIN_START_TIMEOUT_ENV: "5", PREEMPTION_WATCHER_ENV: "1"})):
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env={**base, **extra})
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    week = str(EMBEDDED_TRAIN_START_TIMEOUT_S)
    state = {name: (s.pop("state_api"), s.pop("alive")) for name, s in seen.items()}
    assert seen["default"] == {"task": [week, "0"], "actor": [week, "0"], "driver": [None, None]}, seen
    assert seen["caller"] == {"task": ["5", "1"], "actor": ["5", "1"], "driver": ["5", "1"]}, seen
    # Without a dashboard, the state API is an address of the instance's own where nothing listens,
    # not Ray's default 8265, where another instance's dashboard may answer that the controller does
    # not exist (Ray Train's placement-group cleaner then removes a live run's placement group): asked
    # whether an actor is alive, it is unavailable (the cleaner waits), never "no".
    for name, (url, alive) in state.items():
        assert not url.endswith(":8265") and alive == "unavailable", (name, url, alive)
