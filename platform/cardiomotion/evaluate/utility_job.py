"""``cardiomotion utility``: train the same motion estimator on every data arm, on Ray.

For each leave-one-out fold k (held-out scan s_k):

1. the fold's generator: :func:`cardiomotion.train.cvae.train_fold` trains the CVAE on the other
   scans (``cv.pyramid`` decides whose pyramid conditions it), resumable, its model URI kept in
   ``OUT/folds/<s_k>/generator.json``;
2. ``OUT/folds/<s_k>/frames``: a prepared view holding only the training scans (links), so that
   the corpus is conditioned on them alone; with ``utility.corpus: materialized`` ``generate``
   writes the largest corpus into ``OUT/folds/<s_k>/corpus`` (its first N samples are the
   N-sample corpus of the same plan), with ``on_the_fly`` the samples are decoded inside the
   estimator's data pipeline (:class:`~cardiomotion.generate.virtual.VirtualCorpus`);
3. every (arm, N, seed) is one Ray Train run (:func:`~cardiomotion.evaluate.utility_estimator.estimator_train_loop`) of the
   ``annotate.pwc`` PWC-Net, ``utility.steps`` steps (``utility.epochs``: a budget that grows
   with N): the corpus arms stream the corpus through ``ray.train.get_dataset_shard`` (Ray Data,
   shuffled per pass), the others build their batches in the worker; the worker then scores its
   estimate of the held-out pair against the exact truth
   (:func:`~cardiomotion.evaluate.utility.score_estimate`) and reports the scores;
4. zero flow and demons are scored on the same pair as references.

The transductive arms (``target``, ``annotated+target``, on request) also need
``OUT/folds/<s_k>/target_frames`` (a view of the held-out scan alone) and its corpus
``target_corpus``: the same CVAE conditioned on the held-out ES frame — the one image of the
held-out scan that anything here sees before scoring (never its ED, labels or flow).

Rows stream to ``OUT/runs.jsonl`` (a rerun skips finished rows); the summary — mean over seeds
per scan, then the mean over scans with a 95 % interval (``utility.interval``) — goes to ``OUT/utility.csv``,
``OUT/summary.json``, the figure ``OUT/utility.png`` (myocardium EPE against N per arm) and an
MLflow run (the report: :mod:`cardiomotion.evaluate.utility_report`). What saw the held-out scan: nothing trained here; the training scans' annotated flows
are ``annotate``'s per-pair refinements from zero flow (independent of its network), and the
CVAE's pyramid follows ``cv.pyramid`` (docs/design.md, "Downstream utility").

This module schedules the folds and streams the rows; the runs it plans and the guards on a rerun
are :mod:`~cardiomotion.evaluate.utility_plan`'s, one estimator is
:mod:`~cardiomotion.evaluate.utility_estimator`'s, the fold generators and their corpora
:mod:`~cardiomotion.evaluate.utility_generators`'.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import Config, UtilityArm
from ..errors import InputError
from ..layout import (UTILITY_FIGURE as FIGURE_FILE, UTILITY_PAIRED as PAIRED_FILE, UTILITY_RUNS as RUNS_FILE,
                      UTILITY_SUMMARY as SUMMARY_FILE, UTILITY_TABLE as TABLE_FILE,
                      UTILITY_TRANSPORT_POOL as TRANSPORT_POOL, transport_pairs_dir, utility_fold_dir)
from .utility_estimator import annotated_flow_rms, estimator_task, held_out_pair
from .utility_generators import (FoldCorpus, check_generator_inputs, plan_adoption, prepare_fold_task,
                                 write_adoption)
from .utility_plan import (UtilityRun, check_budgets, check_identity, check_inputs, estimator_identity,
                           plan_runs, record_inputs, row_key)
from .utility_report import PAIRED_COLUMNS, TABLE_COLUMNS, paired_differences, per_scan_means, summarize, utility_figure

Log = Callable[[str], None]


@dataclass(frozen=True)
class UtilitySummary:
    """What ``utility`` produced: the table rows (arm, N, metric, mean, interval) and the files."""

    rows: tuple[dict, ...]
    table: Path
    summary: Path
    figure: Path | None
    runs: Path
    folds: tuple[int, ...] = field(default_factory=tuple)
    paired: tuple[dict, ...] = field(default_factory=tuple)  # corpus arms against the others, scan by scan
    paired_file: Path | None = None


def _tag(arm: str) -> str:
    """An arm's or reference's name (zero, demons) in MLflow metric names."""
    return UtilityArm(arm).tag if arm in UtilityArm._value2member_map_ else arm


def _cause(exc: BaseException) -> str:
    """The last line of a (Ray-wrapped) error: what went wrong, without the traceback."""
    text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
    return (text[-1] if text else exc.__class__.__name__)[:300]


def _references(pair, cfg: Config) -> list[dict[str, Any]]:
    from .utility import score_estimate

    rows = [("zero", np.zeros((3, *pair.es.shape), np.float32))]
    if cfg.utility.demons:
        from .baseline import demons_flow

        rows.append(("demons", demons_flow(pair.es, pair.ed, pair.spacing_mm, threads=1)))
    return [{"arm": name, **score_estimate(f, pair.truth_flow, pair.spacing_mm, pair.ed_labels,
                                           pair.es_labels).as_dict()} for name, f in rows]


def _fed(run: UtilityRun, fc: FoldCorpus) -> UtilityRun:
    """``run`` given its fold's generator and the corpora its arm reads (the others stay None,
    as :func:`~cardiomotion.evaluate.utility_plan.plan_runs` left them)."""
    arm = UtilityArm(run.arm)
    given: dict[str, Any] = {"model_uri": fc.model_uri}
    if arm.uses_corpus:
        given.update(corpus_dir=fc.corpus_dir, frames_dir=fc.frames_dir)
    if arm.uses_target:
        given.update(target_corpus_dir=fc.target_corpus_dir, target_frames_dir=fc.target_frames_dir)
    return replace(run, **given)


def run_utility(prepared_dir: str | Path, flows_dir: str | Path, out_dir: str | Path, cfg: Config,
                folds: Sequence[int | str] | str | None = None, log: Log = lambda _m: None,
                on_run: Callable[[int, int], None] | None = None,
                generators: str | Path | None = None) -> UtilitySummary:
    """Run the utility experiment into ``out_dir`` (one run at a time per folder); see the module
    docstring. ``folds``: indices/scan ids/ranges as ``cv --folds`` (default: all).
    ``on_run(done, total)`` after every finished estimator (progress bars). ``generators``:
    another utility folder whose fold CVAEs are reused (:func:`~cardiomotion.evaluate.utility_generators.plan_adoption`).

    Raises:
        InputError: before any work — bad inputs, a scan without exact truth.
    """
    from ..fileio import removed_if_refused

    # refused before any work: a folder this call made is not left behind
    with removed_if_refused(out_dir, "utility") as out:
        out.mkdir(parents=True, exist_ok=True)
        return _run_utility(Path(prepared_dir).resolve(), Path(flows_dir).resolve(), out, cfg, folds, log, on_run,
                            generators)


def _run_utility(prepared: Path, flows: Path, out: Path, cfg: Config, folds, log: Log, on_run,
                 generators: str | Path | None = None) -> UtilitySummary:
    """Every fold's preparation (CVAE + corpus) is a Ray task; the estimators of the arms that
    need no corpus start at once, a fold's corpus arms as soon as its corpus is ready."""
    from .. import tracking
    from ..config import storage_root
    from ..data.table import check_prepared_identity, read_scan_table
    from ..raycluster import init_ray, stage_gpu
    from ..train.fold import plan_fold
    from ..train.sweep import resolve_folds, write_csv

    check_prepared_identity(prepared, flows)
    ids = sorted(read_scan_table(prepared).scan_id.astype(str))
    fold_list = resolve_folds(folds if folds is not None else "all", ids)
    plans = [plan_fold(prepared, flows, k, pyramid=cfg.cv.pyramid.value) for k in fold_list]
    held_out = {p.val_id: held_out_pair(str(prepared), p.val_id) for p in plans}  # exact truth: checked before any work
    runs_file = out / RUNS_FILE
    from ..fileio import append_json_lines, read_json_lines

    done_rows = read_json_lines(runs_file, log=log)
    ident = estimator_identity(cfg)
    check_identity(runs_file, done_rows, ident)  # before any work: finished rows are only reused if comparable
    inputs = check_inputs(out, prepared, flows)
    # every fold's estimators, planned once; the random arm's RMS and the corpus arms' corpus are
    # filled in (dataclasses.replace) when known
    planned = {p.val_id: plan_runs(p.fold, p.val_id, p.train_ids, cfg, prepared=str(prepared), flows=str(flows),
                                   corpus_dir=None, model_uri=None, frames_dir=None, rms_vox=0.0,
                                   spacing_mm=p.spacing_mm) for p in plans}
    check_budgets(runs_file, done_rows, [r for runs in planned.values() for r in runs], cfg)
    have = {row_key(r) for r in done_rows}
    u = cfg.utility
    # another folder's fold generators (--generators): checked before Ray starts, written past the refusals
    lent = (plan_adoption(Path(generators), out, [p.val_id for p in plans], inputs, cfg, log)
            if generators is not None else [])
    check_generator_inputs(prepared, flows, plans, planned, have, out, {mine for mine, _ in lent}, cfg)
    # the random arm's RMS: every training flow read (once for the sweep), so a damaged one is refused before any work
    sumsq: dict[str, tuple[float, int]] = {}
    rms_of = {p.val_id: annotated_flow_rms(str(prepared), str(flows), p.train_ids, sumsq) for p in plans}
    ray = init_ray(cfg.ray)
    use_gpu = stage_gpu(u.resources, ray, "utility.resources.use_gpu")  # before any work
    write_adoption(lent)
    if generators is not None:
        log(f"utility: {len(lent)} fold generators adopted from {Path(generators).expanduser().resolve()}")
    record_inputs(out, inputs)  # past the refusals: what this folder is made from
    uri = tracking.setup(cfg)
    task_cfg = cfg.model_copy(deep=True)  # what tasks see: absolute storage root and tracking URI
    task_cfg.storage_root = str(storage_root(cfg))
    task_cfg.tracking.uri = uri
    cfg_json = task_cfg.model_dump(mode="json")
    refs: list[dict] = []
    queue: list[UtilityRun] = []
    preparing: dict[Any, Any] = {}  # prep task → its fold's plan
    total = corpus_runs_todo = 0
    prep = ray.remote(num_cpus=0, max_retries=0)(prepare_fold_task)
    for plan in plans:
        fold_dir = utility_fold_dir(out, plan.val_id)
        fold_dir.mkdir(parents=True, exist_ok=True)
        rms = rms_of[plan.val_id]
        runs = planned[plan.val_id] = [
            replace(r, rms_vox=float(rms),
                    transport_file=str(fold_dir / TRANSPORT_POOL) if UtilityArm(r.arm).transports else None,
                    transport_pairs_dir=(str(transport_pairs_dir(task_cfg.storage_root))
                                         if UtilityArm(r.arm).transports else None))
            for r in planned[plan.val_id]]
        total += len(runs)
        queue += [r for r in runs if not UtilityArm(r.arm).generated and r.key not in have]
        waiting = [UtilityArm(r.arm) for r in runs if UtilityArm(r.arm).generated and r.key not in have]
        if waiting:
            corpus_runs_todo += len(waiting)
            preparing[prep.remote(str(prepared), str(flows), plan.fold, plan.val_id, list(plan.train_ids),
                                  str(fold_dir), cfg_json, any(a.uses_corpus for a in waiting),
                                  any(a.uses_target for a in waiting))] = plan
        refs += [{"fold": plan.fold, "scan": plan.val_id, **r} for r in _references(held_out[plan.val_id], cfg)]
    todo = len(queue) + corpus_runs_todo
    budget = (f"{u.steps} steps each" if u.epochs is None else
              f"{u.steps_for(min(u.sizes))}–{u.steps_for()} steps ({u.epochs:g} epochs of N, at least {u.steps})")
    log(f"utility: {len(fold_list)} folds, {total} estimators ({total - todo} already done), {budget}, "
        f"corpus {u.corpus.value}; {len(preparing)} folds need their CVAE and corpus (made, or reused if present)")
    # leave a CPU to Ray Data (a trainer whose workers hold every CPU starves its dataset)
    slots = u.max_concurrent or max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // u.resources.cpus))
    if use_gpu:
        slots = min(slots, max(1, int(ray.cluster_resources().get("GPU", 0) // u.resources.gpus)))
    task = ray.remote(num_cpus=0, max_retries=0)(estimator_task)
    pending: dict[Any, UtilityRun] = {}
    failed: list[str] = []
    rows = [r for r in done_rows if r["scan"] in {p.val_id for p in plans}]
    finished = total - todo
    with tracking.start_run(cfg, "utility", params={"folds": ",".join(map(str, fold_list)), "arms": ",".join(a.value for a in u.arms),
                                                    "sizes": ",".join(map(str, u.sizes)), "seeds": u.seeds, "steps": u.steps,
                                                    "epochs": u.epochs,
                                                    "batch_size": u.batch_size, "lr": ident["lr"], "grad_clip": u.grad_clip, "lr_schedule": u.lr_schedule.value,
                                                    "corpus": u.corpus.value, "pyramid": cfg.cv.pyramid.value},
                            tags={"stage": "utility"}) as mlrun:
        while queue or pending or preparing:
            while queue and len(pending) < slots:
                r = queue.pop(0)
                pending[task.remote(asdict(r), cfg_json)] = r
            ready, _ = ray.wait(list(pending) + list(preparing), num_returns=1)
            if ready[0] in preparing:
                plan = preparing.pop(ready[0])
                try:
                    fc: FoldCorpus = ray.get(ready[0])
                except Exception as exc:  # the other folds go on; a rerun retries this one
                    failed.append(f"fold {plan.fold} ({plan.val_id}) CVAE/corpus: {_cause(exc)}")
                    log(f"utility: fold {plan.fold} ({plan.val_id}): its CVAE or corpus failed: {_cause(exc)}")
                    continue
                made = [f"{what} {where or 'on the fly'}" for what, view, where in
                        (("corpus", fc.frames_dir, fc.corpus_dir),
                         ("target corpus", fc.target_frames_dir, fc.target_corpus_dir)) if view]
                log(f"utility: fold {plan.fold} ({plan.val_id}): CVAE {fc.model_uri}"
                    + (f", {', '.join(made)}" if made else " (no corpus: the anchored arm decodes in its worker)"))
                queue += [_fed(r, fc) for r in planned[plan.val_id]
                          if UtilityArm(r.arm).generated and r.key not in have]
                continue
            r = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except Exception as exc:  # recorded; the others go on, a rerun retries it
                failed.append(f"{r.name}: {_cause(exc)}")
                log(f"utility: fold {r.fold} {r.arm} N {r.n} seed {r.seed} failed: {_cause(exc)}")
                continue
            row = {**row, "estimator": ident}
            rows.append(row)
            append_json_lines(runs_file, [row])
            finished += 1
            log(f"utility: [{finished}/{total}] fold {r.fold} {r.arm} N {r.n} seed {r.seed}: "
                f"EPE myo {row['epe_myo_mm']:.3f} mm, EPE {row['epe_mm']:.3f} mm, Dice {row['dice']:.3f}")
            if on_run is not None:
                on_run(finished, total)
        table_rows = summarize(rows, refs, cfg)
        table = write_csv(out / TABLE_FILE, table_rows, TABLE_COLUMNS)
        paired_rows = paired_differences(rows, refs, cfg)
        paired = write_csv(out / PAIRED_FILE, paired_rows, PAIRED_COLUMNS)
        from ..fileio import write_json

        summary = write_json(out / SUMMARY_FILE, {"folds": fold_list, "scans": [p.val_id for p in plans],
                                                  "settings": cfg.utility.model_dump(mode="json"),
                                                  "pyramid": cfg.cv.pyramid.value, "references": refs,
                                                  "table": table_rows, "paired": paired_rows})
        figure = utility_figure(table_rows, out / FIGURE_FILE, per_scan=per_scan_means(rows, refs))
        import mlflow

        for tr in table_rows:
            if tr["metric"] in ("epe_myo_mm", "epe_mm") and tr["mean"] == tr["mean"]:
                mlflow.log_metric(f"{_tag(tr['arm'])}_n{tr['n']}_{tr['metric']}", tr["mean"])
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(summary))
        mlflow.log_artifact(str(paired))
        mlflow.log_artifact(str(figure))
        log(f"utility: wrote {table} and {figure} (MLflow run {mlrun.info.run_id})")
    if failed:
        from ..errors import StageFailed

        raise StageFailed(f"utility: {len(failed)} of {total} estimators or folds failed (first: {failed[0]}); the "
                          f"table holds what finished; rerun the same command to retry the rest")
    return UtilitySummary(tuple(table_rows), table, summary, figure, runs_file, tuple(fold_list), tuple(paired_rows),
                          paired)
