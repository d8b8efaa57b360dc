"""Cluster operation: launcher files pass Ray's own schema (a typo is named), the Ray Job entry
points and their checks before work, an unreachable MLflow server, and — slow — a real
two-node Ray cluster on this machine that runs the pipeline job and logs to an MLflow server."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cardiomotion.cli import build_parser, main
from cardiomotion.cluster import validate_cluster_file
from cardiomotion.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHER_FILES = [REPO / "cluster.yaml", REPO / "deploy" / "cluster-local.yaml"]
JOBS = ["prepare", "annotate", "train", "cv", "tune", "generate", "utility", "pipeline"]

# The smallest pipeline that still exercises every stage (cf. tests/test_annotate.py TINY).
TINY = {
    "phantom": {"patients": 2, "grid": 32},
    "prepare": {"spacing_mm": 4.0, "grid": [32, 32, 32]},
    "annotate": {"pwc": {"channels": [8, 16, 32], "estimator_channels": [16, 16], "search_range": 1},
                 "epochs": 1, "checkpoint_every": 1, "refine_steps": 5, "refine_levels": 2},
    "train": {"epochs": 1, "batch_size": 2, "checkpoint_every": 1, "prior_samples": 1,
              "augment": {"max_shift": 2}},
    "demo": {"folds": "0", "samples": 4, "through": "annotate"},
    "generate": {"shard_size": 4, "batch_size": 2, "actors": 1, "previews": 1, "gif_frames": 4,
                 "traversal_directions": 0},
    "tracking": {"experiment": "cluster-test"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jobs_common():
    spec = importlib.util.spec_from_file_location("cardiomotion_jobs_common", REPO / "jobs" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- launcher files
@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_files_pass_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    pytest.importorskip("jsonschema")
    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))  # Ray's own check, exactly as `ray up` runs it
    prepared = validate_cluster_file(path)
    text = path.read_text()
    for needed in ("/mnt/cardiomotion", "MLFLOW_TRACKING_URI", "CARDIOMOTION_STORAGE=/mnt/cardiomotion"):
        assert needed in text, needed
    if raw["provider"]["type"] != "local":
        types = prepared["available_node_types"]
        head = types[prepared["head_node_type"]]["resources"]
        assert head.get("GPU", 0) == 0 and head["CPU"] >= 1
        gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
        assert gpu and all(isinstance(v, int) for t in types.values() for v in t["resources"].values())
        setup = " ".join(prepared["setup_commands"])
        assert "cardiomotion-0.1.0" in setup and '"torch==2.13.*"' in setup  # pinned project + torch


@pytest.mark.parametrize("typo, named", [
    (("setup_commands:", "setup_comands:"), "top level: unknown key 'setup_comands' (did you mean 'setup_commands'?)"),
    (("    min_workers: 0", "    min_worker: 0"), "unknown key 'min_worker' (did you mean 'min_workers'?)"),
    (('{"CPU": 8, "GPU": 1}', '{"CPU": 8, "GPU": 0.5}'), "resources.GPU: 0.5 is not of type 'integer'"),
])
def test_a_typo_in_the_cluster_file_is_named(tmp_path, typo, named):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = tmp_path / "cluster.yaml"
    text = (REPO / "cluster.yaml").read_text()
    assert typo[0] in text
    bad.write_text(text.replace(typo[0], typo[1], 1))
    with pytest.raises(jsonschema.ValidationError):  # what `ray up` would say
        validate_config(prepare_config(yaml.safe_load(bad.read_text())))
    with pytest.raises(ConfigError) as exc:
        validate_cluster_file(bad)
    assert str(exc.value).startswith(f"{bad}: ") and named in str(exc.value), exc.value


def test_doctor_validates_a_cluster_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage_root: {tmp_path / 'store'}\n")
    assert main(["doctor", "--config", str(cfg), "--offline", "--cluster", str(REPO / "cluster.yaml")]) == 0
    out = capsys.readouterr().out
    assert "passes Ray's schema (aws, 3 node types)" in out and "FAIL" not in out
    assert not (tmp_path / "store").exists()  # doctor only looks
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / "cluster.yaml").read_text().replace("head_node_type:", "head_node:"))
    assert main(["doctor", "--config", str(cfg), "--offline", "--cluster", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "unknown key 'head_node'" in captured.out
    assert captured.err.strip().splitlines() == ["error: 1 of 4 checks failed (cluster file)"]


def test_rayjob_manifest_and_cluster_stage_config():
    from cardiomotion.config import load_config

    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python jobs/pipeline.py --config configs/")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" in workers["resources"]["limits"]
    assert {e["name"] for e in workers["env"]} >= {"MLFLOW_TRACKING_URI", "CARDIOMOTION_STORAGE"}
    cfg = load_config(REPO / "configs" / "cluster.yaml")
    assert (cfg.storage_root, cfg.ray.address, cfg.tracking.uri) == ("/mnt/cardiomotion", "auto", None)


# ---------------------------------------------------------------------------- jobs
def test_every_job_has_help_and_requires_its_config(monkeypatch, capsys):
    import runpy

    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    for stage in JOBS:  # as `python jobs/<stage>.py --help` runs them
        monkeypatch.setattr(sys, "argv", [f"jobs/{stage}.py", "--help"])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / "jobs" / f"{stage}.py"), run_name="__main__")
        out = capsys.readouterr().out
        assert exc.value.code == 0 and out.startswith(f"usage: jobs/{stage}.py"), out
        assert "--config" in out and "storage root" in out
    # a real process, as Ray runs the entrypoint: no config → usage error at once
    proc = subprocess.run([sys.executable, "jobs/annotate.py"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: jobs/annotate.py: the following arguments are required: --config "
                                        "(see `jobs/annotate.py --help`)"], proc.stderr


@pytest.mark.parametrize("stage", ["prepare", "annotate", "train", "cv", "tune", "generate", "utility", "demo"])
def test_the_command_each_job_runs_exists(stage):
    commands = {a.dest: a for a in build_parser()._actions}["command"].choices
    assert stage in commands
    job = "pipeline" if stage == "demo" else stage
    assert f'run_job("{job}", "{stage}"' in (REPO / "jobs" / f"{job}.py").read_text()


def _run_job(monkeypatch, capsys, stage, command, argv, paths=None):
    monkeypatch.setenv("RAY_LOGGER_LEVEL", os.environ.get("RAY_LOGGER_LEVEL", "info"))
    common = _jobs_common()
    paths = paths if paths is not None else [common.PathFlag("--out", "output folder", default="out")]
    rc = common.run_job(stage, command, f"{stage} job", paths, argv=argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip().splitlines()


def test_a_job_refuses_bad_settings_and_a_missing_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CARDIOMOTION_STORAGE", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = {
        f"storage_root: {blocker / 'store'}\n": f"error: {blocker / 'store'}: storage root is not writable",
        "storage_root: relative/store\n": "error: storage_root: 'relative/store' is relative; a job needs an absolute path",
        "seed: 1\n": "error: storage_root: not set; a job needs an absolute storage root",
    }
    closed = _free_port()  # a Ray address nothing listens at: refused in seconds, not after minutes of retries
    cases[f"storage_root: {tmp_path / 'store'}\nray:\n  address: 127.0.0.1:{closed}\n"] = (
        f"error: Ray cluster '127.0.0.1:{closed}' is unreachable")
    for text, expected in cases.items():
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        rc, out, err = _run_job(monkeypatch, capsys, "annotate", "annotate", ["--config", str(cfg)])
        assert rc == 2 and len(err) == 1 and err[0].startswith(expected), err
        assert out == ""
    rc, out, err = _run_job(monkeypatch, capsys, "annotate", "annotate", ["--config", str(tmp_path / "nope.yaml")])
    assert rc == 2 and len(err) == 1 and "nope.yaml: config file does not exist" in err[0], err
    assert not (tmp_path / "relative").exists()


def test_an_unreachable_mlflow_server_fails_every_entry_point_at_start(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "storage_root": str(tmp_path / "store")}))
    t0 = time.perf_counter()
    # the command: the demo pipeline, before the phantom stage writes anything
    assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: MLflow tracking server {uri} is unreachable"), err
    assert not (tmp_path / "demo" / "phantom").exists()
    # a job: before its stage starts
    rc, out, err = _run_job(monkeypatch, capsys, "annotate", "annotate", ["--config", str(cfg)])
    assert rc == 2 and len(err) == 1 and uri in err[0] and "unreachable" in err[0], err
    # doctor reports it among the other checks
    assert main(["doctor", "--config", str(cfg), "--offline"]) == 2
    captured = capsys.readouterr()
    assert f"FAIL  MLflow        MLflow tracking server {uri} is unreachable" in captured.out
    assert time.perf_counter() - t0 < 30


def test_job_paths_default_under_the_storage_root(tmp_path, monkeypatch, capsys):
    """Relative job paths land under the storage root; patterns are expanded on the cluster."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    common = _jobs_common()
    root = tmp_path / "store"
    (root / "raw").mkdir(parents=True)
    for name in ("b.nii.gz", "a.nii.gz"):
        (root / "raw" / name).write_text("not a scan")
    assert common._expand(["raw/*.nii.gz", "/abs/x"], root) == [str(root / "raw" / "a.nii.gz"),
                                                                  str(root / "raw" / "b.nii.gz"), "/abs/x"]
    assert [common._is_uri(v) for v in ("runs:/0a1b/model", "models:/cvae@best", "s3://b/m", "cv/model", "/m")] == [
        True, True, True, False, False]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage_root: {root}\n")
    # prepare on files that are not scans: the job runs `cardiomotion prepare` on the expanded,
    # rooted paths, and the command's own one-line error comes back.
    rc, out, err = _run_job(monkeypatch, capsys, "prepare", "prepare", ["--config", str(cfg), "--scans", "raw/*.nii.gz"],
                            paths=[common.PathFlag("--scans", "scans", many=True),
                                   common.PathFlag("--out", "out", default="prepared")])
    assert rc == 2, (out, err)
    assert f"--scans {root}/raw/a.nii.gz {root}/raw/b.nii.gz --out {root}/prepared" in out
    assert len(err) == 1 and err[0].startswith(f"error: {root}/raw/a.nii.gz: "), err


def test_the_prepare_job_writes_under_the_storage_root(tmp_path, monkeypatch, capsys, ray_session):
    """The success path of a job on the embedded Ray: quoted patterns relative to the storage
    root, the default output folder, and the command's own summary line."""
    from cardiomotion.data.phantom import make_cohort

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "store"
    make_cohort(root / "phantom", patients=1, grid=16, phases=2, workers=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"storage_root": str(root), "prepare": {"spacing_mm": 8.0, "grid": [16, 16, 16]},
                                   "annotate": {"pwc": {"channels": [8, 16], "estimator_channels": [16]}}}))
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    monkeypatch.setenv("RAY_LOGGER_LEVEL", os.environ.get("RAY_LOGGER_LEVEL", "info"))
    monkeypatch.setattr(sys, "argv", ["jobs/prepare.py", "--config", str(cfg), "--scans", "phantom/*"])
    import runpy

    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "jobs" / "prepare.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert f"storage root  {root}" in out and "MLflow" not in out  # prepare logs nothing to MLflow
    assert f"wrote {root / 'prepared' / 'scans.parquet'}" in out
    assert (root / "prepared" / "phantom_000" / "es.nii.gz").is_file()


# ---------------------------------------------------------------------------- a real cluster
def _wait(what: str, ok, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} did not come up in {timeout:.0f} s\n{tail}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def _alive_nodes(dashboard: str) -> int:
    with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as resp:
        data = json.loads(resp.read())
    return sum(1 for n in data["data"]["summary"] if n.get("raylet", {}).get("state") == "ALIVE")


def _stop(procs: list[subprocess.Popen], markers: list[str]) -> None:
    """Stop only what this test started. `ray stop` is never used: it kills every Ray process on
    the machine (the test session's own embedded Ray and other users' clusters included).

    Each `ray start --block` / `mlflow server` was started as the leader of its own process group
    (start_new_session), and Ray's daemons (GCS, raylet, dashboard, agents, workers) stay in that
    group: SIGTERM to the group, then SIGKILL to what is left. Processes that left the group
    (a job's driver runs in its own session) are found by the unique paths in their command
    line (this test's temp folders) and killed by PID.
    """
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    groups = {p.pid for p in procs}
    me = os.getpid()
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit() or int(pid_s) == me:
            continue
        pid = int(pid_s)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            mine = os.getpgid(pid) in groups or any(m in cmdline for m in markers)
        except (OSError, ProcessLookupError):
            continue
        if mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(600)
def test_two_node_cluster_runs_the_pipeline_job_and_logs_to_an_mlflow_server(tmp_path):
    """`ray start --head` + a second `ray start --address` node on this machine, an `mlflow server`
    on 127.0.0.1, and `ray job submit --working-dir <repo> -- python jobs/pipeline.py` of a tiny
    pipeline: the job attaches to that cluster (both nodes), writes under the storage root the
    nodes were started with, and logs to the server."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    # One temp dir per node (short: Ray's socket paths must fit 107 bytes). Two nodes sharing one
    # would share its runtime_resources/: the second node re-extracting the job's working_dir
    # deletes the driver's current directory under it (getcwd() fails; torch's MKL aborts).
    head_tmp = tempfile.mkdtemp(prefix="cmrh", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="cmrw", dir="/tmp")
    store = tmp_path / "store"
    mlflow_port, gcs, dash = _free_port(), _free_port(), _free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    dashboard = f"http://127.0.0.1:{dash}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}",
               # `ray start` gives the dashboard 60 s to register, then aborts the head: a loaded
               # 2-core machine (another experiment running) once took longer
               RAY_DASHBOARD_STARTUP_TIMEOUT_S=env.get("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240"))
    # What cluster.yaml's start commands give every node: the storage root and the MLflow server.
    node_env = dict(env, CARDIOMOTION_STORAGE=str(store), MLFLOW_TRACKING_URI=tracking)
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: Path, proc_env: dict) -> subprocess.Popen:
        p = subprocess.Popen(args, env=proc_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=tmp_path)
        procs.append(p)
        return p

    t0 = time.perf_counter()
    try:
        mlflow_log = tmp_path / "mlflow.log"
        mlflow = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                        "--port", str(mlflow_port), "--workers", "1"], mlflow_log, env)
        common = ["--num-cpus=1", "--object-store-memory=100000000", "--node-ip-address=127.0.0.1",
                  "--disable-usage-stats", "--block"]
        head_log = tmp_path / "ray-head.log"
        head = start([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=true",
                      f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                      f"--temp-dir={head_tmp}", *common], head_log, node_env)
        _wait("ray head", lambda: _http_ok(f"{dashboard}/api/version"), 300, head, head_log)
        for attempt in range(3):
            # `ray start` gives its node a fixed 30 s (ray 2.60, no setting) to register with the
            # GCS and exits if it has not: a 2-core machine at load 25 (experiments beside the
            # suite) missed that twice; a node that exited is started again, as an operator would
            worker_log = tmp_path / f"ray-worker-{attempt}.log"
            worker = start([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}",
                            f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={worker_tmp}", *common],
                           worker_log, node_env)
            try:
                _wait("second node", lambda: _alive_nodes(dashboard) == 2, 240, worker, worker_log)
                break
            except AssertionError:
                if worker.poll() is None or attempt == 2:
                    raise
                try:  # what the failed start left of its daemons (they stay in its process group)
                    os.killpg(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # the server was started first, but its app start-up alone took 2 min on a 2-core machine at
        # load 18 (experiments beside the suite), 4 min 20 s from launch to /health
        _wait("mlflow server", lambda: _http_ok(f"{tracking}/health"), 420, mlflow, mlflow_log)
        t_up = time.perf_counter() - t0

        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(yaml.safe_dump(TINY))  # no storage_root, no tracking uri: the nodes' env
        sid = f"cardiomotion-test-{os.getpid()}-{int(time.time())}"
        submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", sid,
                  "--working-dir", str(REPO), "--no-wait", "--", "python", "jobs/pipeline.py", "--config", str(cfg)]
        # the dashboard answers before the head's job agent has registered with it; until then a
        # submission is refused with "No available agent" (seen once on an idle machine): retried
        deadline = time.monotonic() + 240
        while True:
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr \
                    or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        client = JobSubmissionClient(dashboard)
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        _wait("the pipeline job", lambda: client.get_job_status(sid) in terminal, 420)
        logs = client.get_job_logs(sid)
        assert client.get_job_status(sid) == JobStatus.SUCCEEDED, logs[-4000:]
        t_job = time.perf_counter() - t0 - t_up

        # It attached to this two-node cluster (not an embedded Ray) with the nodes' settings.
        assert f"storage root  {store}" in logs and f"MLflow        {tracking}" in logs, logs[-3000:]
        assert "2 nodes, 2 CPUs" in logs, logs[-3000:]
        assert "demo finished" in logs and f"open {tracking} in a browser" in logs, logs[-3000:]
        assert (store / "prepared" / "scans.parquet").is_file()
        assert (store / "annotations" / "annotations.parquet").is_file()
        assert not (store / "mlflow.db").exists()  # the server holds the runs, not a local store

        # The server has the annotate run, its metrics and its artifacts (proxied to the server's store).
        ml = MlflowClient(tracking)
        exp = ml.get_experiment_by_name("cluster-test")
        runs = ml.search_runs([exp.experiment_id])
        annotate = [r for r in runs if r.data.tags.get("stage") == "annotate"]
        assert annotate and annotate[0].info.status == "FINISHED"
        assert any(k.startswith("mean_epe_myo_mm") for k in annotate[0].data.metrics)
        artifacts = {a.path for a in ml.list_artifacts(annotate[0].info.run_id)}
        assert {"model", "feature_pyramid", "annotations.parquet"} <= artifacts, artifacts
        assert any((tmp_path / "artifacts").rglob("annotations.parquet"))
        print(f"\ncluster up {t_up:.0f} s, pipeline job {t_job:.0f} s")
    finally:
        t_stop = time.perf_counter()
        _stop(procs, [head_tmp, worker_tmp, str(tmp_path)])
        print(f"cluster stopped in {time.perf_counter() - t_stop:.0f} s")
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
