"""Leave-one-out cross-validation on Ray: every fold an independent single-fold training.

Each fold is one :func:`cardiomotion.train.cvae.train_fold` (a Ray Train TorchTrainer) called
from its own driver task (``@ray.remote(num_cpus=0)``). The driver task holds no resources; the
fold's trainer requests ``train.num_workers`` workers of ``{"CPU": train.resources.cpus,
"GPU": train.resources.gpus}`` (GPU only when the cluster has one), so as many folds train at
once as the cluster's resources hold: on a GPU node ``resources.gpus: 0.25`` packs four
single-rank folds per GPU, and CPU-only clusters work the same way with CPUs. The sweep launches
at most that many folds at a time (``cv.max_concurrent`` caps it further) and starts the next
fold as one finishes, recomputing the capacity as nodes join.

Tracking: one MLflow parent run (tag ``stage=cv``) and a nested run per fold (created by this
driver, so its id is known, and persisted, before the fold starts).

State and fault tolerance, all under ``OUT``:

- ``cv.json``: the parent run id and a fingerprint of the inputs and training settings (a rerun
  with other settings is refused rather than mixing two sweeps in one table);
- ``folds/<k>.json`` (written atomically): status (``running``/``done``/``failed``), MLflow run
  id, Ray Train run name, metrics, error, attempts.

A worker that dies mid-fold is restarted by the trainer's FailureConfig from the last
checkpoint. A fold that fails for good (retries exhausted, bad data) is recorded as ``failed``
with its error while the other folds go on. Rerunning the same command skips ``done`` folds and
resumes the others: same Ray Train run name (Ray Train resumes from the last checkpoint under
``<storage_root>/ray_results/<name>``) and same MLflow run id.

At the end: ``OUT/folds.csv`` (one row per fold: fold, scan, status, run_id, reconstruction
EPE, prior-sample EPE, zero-flow EPE (voxels and mm), KL per latent element, folding fraction
of the prior samples and of the reconstruction, spread of the prior samples; the prior scored
as a distribution on ``train.eval_samples`` samples — energy score against the annotated flow
and the truth, best-of-K, spread–skill and magnitude ratios — and on phantoms the synthetic-ED
ejection fraction (mean, sd, min, max over the samples, and the truth's), longitudinal
shortening and myocardial volume change; epochs, seconds, attempts, error) and ``OUT/summary.json`` (counts; mean ± sample std, min, max per metric over
finished folds), both logged to the parent run with the summary metrics ``cv_<metric>_mean`` /
``cv_<metric>_std``. The table covers every fold recorded under ``OUT`` (a sweep run in parts,
``--folds 0-21`` then ``--folds 22-43``, gives one table).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import Config
from ..fileio import write_json
from ..layout import CV_FOLDS as FOLD_DIR, CV_STATE as STATE_FILE, CV_SUMMARY as SUMMARY_FILE, CV_TABLE as TABLE_FILE, cv_fold_state_name
from .sweep import (alive_nodes, capacity, check_capacity, fmt_resources, fold_demand, read_json, resolve_folds,
                    resume_state, sweep_fingerprint, write_csv)

# table column -> validation metric of the final epoch
METRICS = {
    "epe_rec_vox": "val_epe_rec_vox",
    "epe_rec_mm": "val_epe_rec_mm",
    "epe_prior_vox": "val_epe_prior_vox",
    "epe_prior_mm": "val_epe_prior_mm",
    "epe_zero_vox": "val_epe_zero_vox",
    "epe_zero_mm": "val_epe_zero_mm",
    "kl": "val_kl",
    "folding_prior": "val_folding_prior",
    "folding_rec": "val_folding_rec",
    "prior_spread_vox": "val_prior_spread_vox",  # diversity of prior samples (0: collapsed)
    "mse_rec": "val_mse_rec",
    # the prior as a distribution: train.eval_samples samples of the held-out scan after training
    "energy_vox": "prior_energy_score_vox",  # energy score vs the annotated flow (proper: lower is better)
    "energy_mm": "prior_energy_score_mm",
    "energy_truth_vox": "prior_truth_energy_score_vox",  # vs the exact truth (phantom)
    "best_of_k_vox": "prior_best_of_k_vox",
    "spread_skill": "prior_spread_skill",  # 1 = calibrated
    "magnitude_ratio": "prior_magnitude_ratio",  # 1 = samples as strong as the annotated motion
    "ef_samples_mean": "prior_ef_mean",  # synthetic-ED physiology (phantom: ES labels)
    "ef_samples_std": "prior_ef_std",
    "ef_samples_min": "prior_ef_min",
    "ef_samples_max": "prior_ef_max",
    "ef_truth": "truth_ef",
    "ls_samples_mean": "prior_longitudinal_shortening_mean",
    "ls_truth": "truth_longitudinal_shortening",
    "myo_dv_samples_mean": "prior_myo_volume_change_mean",
    "myo_dv_truth": "truth_myo_volume_change",
}
COLUMNS = ["fold", "scan", "status", "run_id", *METRICS, "epochs", "seconds", "attempts", "error"]
Log = Callable[[str], None]


# --------------------------------------------------------------------------- results
@dataclass
class CVProgress:
    """Where the sweep stands (passed to ``on_progress``)."""

    total: int
    done: int
    running: int
    queued: int
    failed: int
    skipped: int  # finished in an earlier invocation
    epochs: dict[int, int] = field(default_factory=dict)  # running fold -> epochs logged so far
    epochs_total: int = 0

    def line(self) -> str:
        s = (f"cv: {self.done}/{self.total} done, {self.running} running, {self.queued} queued, "
             f"{self.failed} failed")
        if self.skipped:
            s += f" ({self.skipped} done earlier)"
        if self.epochs:
            s += "  [" + ", ".join(f"fold {k}: {e}/{self.epochs_total}" for k, e in sorted(self.epochs.items())) + "]"
        return s


@dataclass
class CVSummary:
    """What :func:`run_cv` produced."""

    out: Path
    parent_run_id: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    folds_csv: Path
    summary_json: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    def format_table(self) -> str:
        """The fold table and the mean ± std line, as fixed-width text."""
        cols = [("fold", "fold", "{:d}"), ("scan", "scan", "{}"), ("status", "status", "{}"),
                ("rec EPE vox", "epe_rec_vox", "{:.3f}"), ("rec EPE mm", "epe_rec_mm", "{:.3f}"),
                ("prior EPE vox", "epe_prior_vox", "{:.3f}"), ("energy vox", "energy_vox", "{:.3f}"),
                ("spread/skill", "spread_skill", "{:.2f}"), ("magnitude", "magnitude_ratio", "{:.2f}"),
                ("EF samples", "ef_samples_mean", "{:.3f}"), ("EF sd", "ef_samples_std", "{:.3f}"),
                ("EF truth", "ef_truth", "{:.3f}"),
                ("KL", "kl", "{:.4f}"), ("folding prior", "folding_prior", "{:.4f}"), ("run", "run_id", "{}")]

        def cell(row, key, fmt):
            v = row.get(key)
            if v is None or v == "":
                return "-"
            return fmt.format(v) if not isinstance(v, str) else v[:12] if key == "run_id" else v

        body = [[cell(r, key, fmt) for _, key, fmt in cols] for r in self.rows]
        stats = self.summary.get("metrics", {})
        mean = ["mean ± std", "", f"{self.summary.get('done', 0)} done"]
        for _, key, _ in cols[3:-1]:
            s = stats.get(key)
            mean.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "-")
        mean.append("")
        widths = [max(len(h), *(len(r[i]) for r in body + [mean])) for i, (h, _, _) in enumerate(cols)]
        lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
        lines.append("  ".join(c.ljust(w) for c, w in zip(mean, widths)))
        for r in self.failed:
            lines.append(f"fold {r['fold']} ({r['scan']}) failed: {r['error']}")
        return "\n".join(line.rstrip() for line in lines)


def _fold_path(out: Path, k: int) -> Path:
    return out / FOLD_DIR / cv_fold_state_name(k)


def _row(state: Mapping[str, Any]) -> dict[str, Any]:
    metrics = state.get("metrics") or {}
    row = {"fold": int(state["fold"]), "scan": state.get("scan"), "status": state.get("status"),
           "run_id": state.get("run_id"), "epochs": state.get("epochs"), "seconds": state.get("seconds"),
           "attempts": state.get("attempts", 0), "error": state.get("error")}
    for col, key in METRICS.items():
        v = metrics.get(key)
        row[col] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return row


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and mean ± sample std (ddof 1; 0 for one fold), min, max per metric over finished folds."""
    import numpy as np

    done = [r for r in rows if r["status"] == "done"]
    stats: dict[str, Any] = {}
    for col in METRICS:
        vals = np.array([r[col] for r in done if r.get(col) is not None], dtype=np.float64)
        if vals.size:
            stats[col] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                          "min": float(vals.min()), "max": float(vals.max()), "n": int(vals.size)}
    return {"folds": len(rows), "done": len(done), "failed": sum(r["status"] == "failed" for r in rows),
            "unfinished": sum(r["status"] not in ("done", "failed") for r in rows),
            "failed_folds": [r["fold"] for r in rows if r["status"] == "failed"], "metrics": stats}


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """The fold table ``folds.csv`` (:data:`COLUMNS`)."""
    return write_csv(path, rows, COLUMNS)


def _error_text(exc: BaseException) -> str:
    """One line for the table: the root cause of a Ray task / Ray Train failure."""
    cause = exc
    seen = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        nxt = getattr(cause, "cause", None) or cause.__cause__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        cause = nxt
    text = str(cause).strip() or cause.__class__.__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray Train/Tune errors embed the worker traceback: keep its last line (the exception itself)
    msg = next((ln for ln in reversed(lines) if not ln.startswith(("File ", "^", "~"))), lines[0] if lines else text)
    if ":" not in msg:
        msg = f"{cause.__class__.__name__}: {msg}"
    return msg[:500]


# --------------------------------------------------------------------------- the fold task
def _train_fold_task(prepared: str, flows: str, fold: int, cfg_json: dict, name: str, parent_run_id: str,
                     run_id: str, fail_at_epoch: int | None) -> dict[str, Any]:
    """Runs inside a Ray task (no resources of its own): one fold's Ray Train trainer."""
    from .cvae import train_fold

    cfg = Config.model_validate(cfg_json)
    t0 = time.perf_counter()
    res = train_fold(prepared, flows, fold, cfg, name=name, parent_run_id=parent_run_id, run_id=run_id,
                     fail_at_epoch=fail_at_epoch)
    return {"run_id": res.run_id, "model_uri": res.model_uri, "metrics": res.metrics,
            "figure": str(res.figure) if res.figure else None, "seconds": time.perf_counter() - t0}


def _epochs_logged(client, run_id: str) -> int:
    try:
        return len({m.step for m in client.get_metric_history(run_id, "train_loss")})
    except Exception:  # a busy store: progress is best effort
        return 0


def run_cv(prepared_dir, flows_dir, out_dir, cfg: Config, *args, **kwargs) -> "CVSummary":
    """Leave-one-out cross-validation into ``out_dir``; one ``cv`` at a time per folder (a second
    is refused with one line, :func:`~cardiomotion.fileio.exclusive_lock`). Arguments and
    behaviour: :func:`_run_cv`."""
    from ..fileio import exclusive_lock

    with exclusive_lock(out_dir, "cv"):
        return _run_cv(prepared_dir, flows_dir, out_dir, cfg, *args, **kwargs)


def _run_cv(
    prepared_dir: str | Path,
    flows_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    folds: str | Sequence[int | str] | None = "all",
    *,
    on_progress: Callable[[CVProgress], None] | None = None,
    log: Log = lambda _m: None,
    fail_at_epoch: Mapping[int, int] | None = None,
) -> CVSummary:
    """Leave-one-out cross-validation of the CVAE, folds concurrently on Ray (see module docstring).

    Args:
        prepared_dir, flows_dir: the prepared dataset and its annotation folder.
        out_dir: where the sweep's state, ``folds.csv`` and ``summary.json`` go; rerun with the
            same folder to continue.
        cfg: the configuration (``train`` for every fold, ``cv`` for the sweep).
        folds: ``"all"``, ``"0,3,7"``, or a list of fold indices / scan ids.
        on_progress: called with a :class:`CVProgress` whenever a fold changes state and every
            ``cv.progress_every_s`` while folds run.
        log: one-line messages.
        fail_at_epoch: test hook, {fold: epoch}: that fold's worker group dies once at that epoch
            (in every attempt that starts without a checkpoint).

    Raises:
        InputError: missing or inconsistent inputs, unknown folds, folds the cluster can never
            hold, ``OUT`` made with other settings: all before any training starts.
    """
    import mlflow

    from .. import tracking
    from ..config import storage_root
    from ..raycluster import init_ray, stage_gpu
    from .cvae import check_fold_inputs
    from .fold import plan_fold

    prepared = Path(prepared_dir).resolve()
    flows = Path(flows_dir).resolve()
    out = Path(out_dir).resolve()
    scan_ids = plan_fold(prepared, flows, 0, cfg.cv.pyramid.value).scan_ids
    fold_list = resolve_folds(folds, scan_ids)
    for k in fold_list:
        check_fold_inputs(prepared, flows, k, cfg)
    fingerprint = sweep_fingerprint(prepared, flows, cfg)
    state, uri, client, parent_id = resume_state(out / STATE_FILE, fingerprint, "sweep", cfg)

    ray = init_ray(cfg.ray)
    use_gpu = stage_gpu(cfg.train.resources, ray, "train.resources.use_gpu")
    workers, bundle = fold_demand(cfg, use_gpu)
    if cfg.cv.check_resources:
        check_capacity(alive_nodes(ray), workers, bundle, cfg.cv.max_concurrent)

    # What the fold tasks see: absolute storage root and tracking URI (tasks run in other directories).
    task_cfg = cfg.model_copy(deep=True)
    task_cfg.storage_root = str(storage_root(cfg))
    task_cfg.tracking.uri = uri
    task_cfg_json = task_cfg.model_dump(mode="json")
    fail_at_epoch = dict(fail_at_epoch or {})

    params = {"cv": cfg.cv.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
              "folds": ",".join(map(str, fold_list)), "n_scans": len(scan_ids), "prepared": str(prepared),
              "flows": str(flows), "out": str(out), "seed": cfg.seed}
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tracking.start_run(cfg, "cv", params=None if parent_id else params, tags={"stage": "cv"},
                            run_id=parent_id) as parent:
        parent_id = parent.info.run_id
        experiment_id = parent.info.experiment_id
        write_json(out / STATE_FILE, {"parent_run_id": parent_id, "tracking_uri": uri, "fingerprint": fingerprint,
                                      "storage_root": task_cfg.storage_root})
        states: dict[int, dict[str, Any]] = {}
        for k in fold_list:
            st = read_json(_fold_path(out, k)) or {}
            states[k] = {"fold": k, "scan": scan_ids[k], "status": "queued", "attempts": 0, **st}
        skipped = [k for k in fold_list if states[k]["status"] == "done"]
        queue = deque(k for k in fold_list if states[k]["status"] != "done")
        log(f"cv: {len(fold_list)} folds of {len(scan_ids)} scans, {len(skipped)} done earlier, {len(queue)} to train; "
            f"each fold {workers} × {fmt_resources(bundle)}; parent run {parent_id}")
        running: dict[Any, int] = {}
        remote = ray.remote(num_cpus=0, max_retries=2)(_train_fold_task)
        last_line = None
        last_poll = 0.0
        epochs: dict[int, int] = {}

        def progress(poll: bool) -> None:
            nonlocal last_line, last_poll
            if on_progress is None:
                return
            if poll:
                epochs.update({k: _epochs_logged(client, states[k]["run_id"]) for k in running.values()})
                last_poll = time.monotonic()
            for k in [k for k in epochs if k not in running.values()]:
                del epochs[k]
            p = CVProgress(total=len(fold_list), done=sum(states[k]["status"] == "done" for k in fold_list),
                           running=len(running), queued=len(queue),
                           failed=sum(states[k]["status"] == "failed" for k in fold_list), skipped=len(skipped),
                           epochs=dict(epochs), epochs_total=cfg.train.epochs)
            line = p.line()
            if line != last_line:
                last_line = line
                on_progress(p)

        progress(False)
        while queue or running:
            limit = cfg.cv.max_concurrent or 10**9
            if cfg.cv.check_resources:
                limit = min(limit, max(1, capacity(alive_nodes(ray), workers, bundle)))
            while queue and len(running) < limit:
                k = queue.popleft()
                st = states[k]
                if not st.get("run_id"):
                    run = client.create_run(experiment_id, run_name=f"fold_{k:03d}",
                                            tags={"mlflow.parentRunId": parent_id, "stage": "train",
                                                  "fold": str(k), "val_scan": scan_ids[k]})
                    st["run_id"] = run.info.run_id
                st.setdefault("name", f"cv-{parent_id[:8]}-fold_{k:03d}")
                st.update(status="running", error=None, attempts=int(st.get("attempts", 0)) + 1)
                write_json(_fold_path(out, k), st)
                ref = remote.remote(str(prepared), str(flows), k, task_cfg_json, st["name"], parent_id,
                                    st["run_id"], fail_at_epoch.get(k))
                running[ref] = k
            progress(False)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=cfg.cv.progress_every_s)
            for ref in ready:
                k = running.pop(ref)
                st = states[k]
                try:
                    res = ray.get(ref)
                except Exception as exc:  # the fold failed for good: record it, the others go on
                    st.update(status="failed", error=_error_text(exc))
                    log(f"cv: fold {k} ({scan_ids[k]}) failed: {st['error']}")
                    try:
                        client.set_terminated(st["run_id"], "FAILED")
                    except Exception:
                        pass
                else:
                    metrics = {key: v for key, v in res["metrics"].items() if key != "epoch"}
                    st.update(status="done", error=None, metrics=metrics, model_uri=res["model_uri"],
                              figure=res["figure"], seconds=round(res["seconds"], 1),
                              epochs=int(res["metrics"].get("epoch", cfg.train.epochs - 1)) + 1)
                write_json(_fold_path(out, k), st)
            progress(bool(running) and time.monotonic() - last_poll >= cfg.cv.progress_every_s)

        # the table: every fold recorded under OUT, this invocation's and earlier ones'
        recorded = {}
        for path in sorted((out / FOLD_DIR).glob("*.json")):
            st = read_json(path)
            if st and "fold" in st:
                recorded[int(st["fold"])] = st
        recorded.update(states)
        rows = [_row(recorded[k]) for k in sorted(recorded)]
        summary = {**summarize(rows), "parent_run_id": parent_id, "tracking_uri": uri,
                   "wall_s": round(time.perf_counter() - t_start, 1), "epochs": cfg.train.epochs,
                   "scans": len(scan_ids), "pyramid_protocol": cfg.cv.pyramid.value}
        csv_path = write_table(out / TABLE_FILE, rows)
        json_path = write_json(out / SUMMARY_FILE, summary)
        tracking.log_artifact(csv_path)
        tracking.log_artifact(json_path)
        flat = {"cv_folds_done": summary["done"], "cv_folds_failed": summary["failed"]}
        for col, s in summary["metrics"].items():
            flat[f"cv_{col}_mean"] = s["mean"]
            flat[f"cv_{col}_std"] = s["std"]
        tracking.log_metrics(flat)
        mlflow.set_tag("cv_failed_folds", ",".join(map(str, summary["failed_folds"])) or "none")
    log(f"cv: wrote {csv_path} and {json_path}")
    return CVSummary(out, parent_id, rows, summary, csv_path, json_path)

