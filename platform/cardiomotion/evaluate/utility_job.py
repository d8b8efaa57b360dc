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
3. every (arm, N, seed) is one Ray Train run (:func:`estimator_train_loop`) of the
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
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import Config, UtilityArm, UtilityCorpus
from ..errors import InputError

Log = Callable[[str], None]

from ..layout import (UTILITY_CORPUS as CORPUS_DIR, UTILITY_FIGURE as FIGURE_FILE, UTILITY_FRAMES as FRAMES_DIR,
                      UTILITY_GENERATOR as GENERATOR_RECORD, UTILITY_INPUTS as INPUTS_FILE, UTILITY_PAIRED as PAIRED_FILE, UTILITY_RUNS as RUNS_FILE, UTILITY_SUMMARY as SUMMARY_FILE,
                      UTILITY_TABLE as TABLE_FILE, UTILITY_TARGET_CORPUS as TARGET_CORPUS_DIR,
                      UTILITY_TARGET_FRAMES as TARGET_FRAMES_DIR, UTILITY_TRANSPORT_POOL as TRANSPORT_POOL,
                      transport_pairs_dir, utility_fold_dir)
from .utility_report import (PAIRED_COLUMNS, SCORES, TABLE_COLUMNS, paired_differences, per_scan_means, summarize,
                             utility_figure)


def run_key(scan: str, arm: str, n: int, seed: int) -> str:
    """What identifies an estimator in ``runs.jsonl``: held-out scan, arm, N, seed."""
    return f"{scan}|{arm}|{n}|{seed}"


def _row_key(row: dict) -> str:
    return run_key(row["scan"], row["arm"], row["n"], row["seed"])


@dataclass(frozen=True)
class UtilityRun:
    """One estimator to train (what crosses into the Ray task and the Train worker)."""

    fold: int
    scan_id: str  # the held-out scan
    arm: str  # UtilityArm value
    n: int  # distinct training samples (corpus size; the number of training pairs for real arms)
    seed: int
    prepared: str
    flows: str
    train_ids: tuple[str, ...]
    corpus_dir: str | None  # materialized corpus (corpus arms)
    model_uri: str | None  # the fold CVAE (on_the_fly corpus arms)
    frames_dir: str | None  # training-scan view the corpus is conditioned on
    rms_vox: float  # RMS magnitude of the training scans' annotated flows (random arm)
    steps: int | None = None  # Adam steps (``utility.steps_for``); None: ``utility.steps``
    target_corpus_dir: str | None = None  # materialized corpus of the held-out ES frame (target arms)
    target_frames_dir: str | None = None  # the held-out scan's view that corpus is conditioned on
    transport_file: str | None = None  # the fold's transport pool, registered once for its seeds (transport arm)
    spacing_mm: float | None = None  # the fold's one grid spacing (FoldPlan.spacing_mm): transport registers on it
    transport_pairs_dir: str | None = None  # the pairs' transported fields, shared by the folds (PairCache)

    @property
    def key(self) -> str:
        return run_key(self.scan_id, self.arm, self.n, self.seed)

    @property
    def name(self) -> str:
        arm = UtilityArm(self.arm).tag
        return f"utility_{self.scan_id}_{arm}_n{self.n}_s{self.seed}"


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


# --------------------------------------------------------------------------- data of a fold
def _training_arrays(prepared: str, flows: str, train_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ES and ED (n, I, J, K) float32 HU and the annotated flows (n, 3, I, J, K) voxels."""
    from ..data.table import load_pair, read_scan_table
    from ..flow.io import read_flow
    from ..layout import flow_path

    table = read_scan_table(prepared).set_index("scan_id", drop=False)
    es, ed, fl = [], [], []
    for sid in train_ids:
        pair = load_pair(prepared, table.loc[sid].to_dict(), with_truth=False)
        path = flow_path(flows, sid)
        flow, _ = read_flow(path)
        if flow.shape[1:] != pair.es.shape:
            raise InputError(path, f"flow grid {flow.shape[1:]} differs from the prepared grid {pair.es.shape}")
        es.append(pair.es)
        ed.append(pair.ed)
        fl.append(flow)
    return np.stack(es), np.stack(ed), np.stack(fl).astype(np.float32)


def annotated_flow_rms(prepared: str, flows: str, train_ids: Sequence[str],
                       cache: dict[str, tuple[float, int]] | None = None) -> float:
    """RMS magnitude (voxels) of the annotated flows of ``train_ids`` — what the random arm's
    fields are scaled to: sqrt of the mean over scans and voxels of ‖u(x)‖², as
    :func:`~cardiomotion.evaluate.utility.flow_rms` of their stack (float64 sums). ``cache`` maps
    a scan to (Σ‖u‖², voxels) so that a sweep reads each flow file once, not once per fold.

    Raises:
        InputError: a flow's grid is not the scan's prepared grid.
    """
    from ..data.table import read_scan_table
    from ..flow.io import read_flow
    from ..layout import flow_path

    cache = {} if cache is None else cache
    table = None
    for sid in train_ids:
        if sid in cache:
            continue
        if table is None:
            table = read_scan_table(prepared).set_index("scan_id", drop=False)
        path = flow_path(flows, sid)
        flow, _ = read_flow(path)
        grid = tuple(int(x) for x in table.loc[sid, "shape"])
        if tuple(flow.shape[1:]) != grid:
            raise InputError(path, f"flow grid {tuple(flow.shape[1:])} differs from the prepared grid {grid}")
        cache[sid] = (float(np.square(flow, dtype=np.float64).sum()), int(np.prod(flow.shape[1:])))
    total = sum(cache[sid][0] for sid in train_ids)
    voxels = sum(cache[sid][1] for sid in train_ids)
    return float(np.sqrt(total / voxels)) if voxels else 0.0


def _held_out(prepared: str, scan_id: str):
    from ..data.table import load_pair, read_scan_table

    table = read_scan_table(prepared).set_index("scan_id", drop=False)
    pair = load_pair(prepared, table.loc[scan_id].to_dict(), with_truth=True)
    if pair.truth_flow is None:
        raise InputError(Path(prepared) / scan_id, "has no exact truth flow: `utility` scores against the "
                                                   "phantom's truth (prepare phantom scans)")
    return pair


def training_view(prepared: str | Path, train_ids: Sequence[str], dst: Path) -> Path:
    """A prepared folder holding only ``train_ids`` (scan folders linked, the table filtered): what
    the fold's corpus is conditioned on. Rebuilt when the set differs."""
    from ..data.table import read_scan_table, write_scan_table

    prepared = Path(prepared).resolve()
    table = read_scan_table(prepared)
    rows = [r for r in table.to_dict("records") if str(r["scan_id"]) in set(train_ids)]
    from ..layout import SCAN_TABLE

    if (dst / SCAN_TABLE).is_file():
        have = sorted(read_scan_table(dst, check_files=False).scan_id.astype(str))
        if have == sorted(train_ids):
            return dst
    dst.mkdir(parents=True, exist_ok=True)
    for r in rows:
        link = dst / str(r["scan_id"])
        if not link.exists():
            os.symlink(prepared / str(r["scan_id"]), link, target_is_directory=True)
    write_scan_table(dst, rows)
    return dst


# --------------------------------------------------------------------------- the estimator run
def estimator_settings(cfg: Config, n_levels: int, steps: int | None = None):
    """The settings of one estimator; ``steps`` its budget (None: ``utility.steps``)."""
    from .utility import EstimatorSettings, level_weights_for

    u, a = cfg.utility, cfg.annotate
    return EstimatorSettings(steps=u.steps if steps is None else int(steps), batch_size=u.batch_size, lr=float(u.lr or a.lr),
                             level_weights=level_weights_for(n_levels, a.level_weights),
                             smooth_weight=a.smooth_weight, ssim_alpha=a.ssim_alpha, grad_clip=u.grad_clip,
                             lr_schedule=u.lr_schedule.value)


def estimator_identity(cfg: Config) -> dict:
    """What makes two estimators of the same (scan, arm, N, seed) comparable: the training budget
    and optimiser, the network and the random arm's field scales. Every row of ``runs.jsonl``
    carries it; a rerun into the same folder with other values is refused, not mixed. A budget that
    scales with N (``utility.epochs``) enters as ``epochs`` (absent when off, as in rows made before
    it); each row's own steps are checked against its plan by :func:`_check_budgets`."""
    u, a = cfg.utility, cfg.annotate
    ident = {"steps": u.steps, "batch_size": u.batch_size, "lr": float(u.lr or a.lr), "grad_clip": u.grad_clip,
             "random_scales": list(u.random_scales), "pwc": a.pwc.model_dump(mode="json"),
             "corpus_temperature": cfg.generate.temperature}
    if u.epochs is not None:
        ident["epochs"] = u.epochs
    if u.lr_schedule.value != "constant":  # absent when constant, as in rows made before the key
        ident["lr_schedule"] = u.lr_schedule.value
    if u.pretrain_share != type(u).model_fields["pretrain_share"].default:  # absent at the default, as in rows
        ident["pretrain_share"] = u.pretrain_share  # made before the key (only cvae>annotated reads it)
    return ident


def _check_identity(runs_file: Path, done_rows: list[dict], ident: dict) -> None:
    for i, r in enumerate(done_rows, 1):
        if r.get("estimator") != ident:
            have = r.get("estimator")
            diff = ("no settings record (an older version)" if have is None else
                    ", ".join(f"{k} {have.get(k)!r} → {ident.get(k)!r}" for k in sorted(set(ident) | set(have))
                              if have.get(k) != ident.get(k)))
            raise InputError(runs_file, f"row {i} ({r.get('arm')} N {r.get('n')} seed {r.get('seed')}) was trained with "
                                        f"other estimator settings ({diff}); use another --out or the same settings")


def _check_budgets(runs_file: Path, done_rows: list[dict], planned: Sequence[UtilityRun], cfg: Config) -> None:
    """A finished row is reused only if its steps are those its run would get now: with
    ``utility.epochs`` the real arms train the largest N's budget, so another largest N changes
    them (rows made before ``steps`` was recorded trained ``utility.steps``)."""
    by_key = {_row_key(r): r for r in done_rows}
    for run in planned:
        row = by_key.get(run.key)
        if row is None:
            continue
        want = _planned_steps(run, cfg)
        had = int(row.get("steps", (row.get("estimator") or {}).get("steps", want)))
        if had != want:
            raise InputError(runs_file, f"{run.arm} N {run.n} seed {run.seed} of {run.scan_id} was trained for "
                                        f"{had} steps, this plan gives it {want} (utility.epochs with "
                                        f"another largest N); use another --out or the same sizes")


def check_inputs(out: Path, prepared: Path, flows: Path) -> dict[str, str]:
    """One utility folder, one pair of inputs: its rows, fold generators and corpora were made
    from ``OUT/inputs.json``'s prepared and flows folders (resolved paths, as ``cv`` and ``tune``
    record theirs, and the flows folder's content: :func:`~cardiomotion.annotate.stage.flows_fingerprint`), and a rerun pointed
    at others — or at the same folder annotated again with other flows or another pyramid — is
    refused before any work: it would reuse them as if made from the new ones. Returns the record
    to write (:func:`record_inputs`) once the run is past its refusals; a folder without one (made
    before it), or whose record predates the fingerprint, adopts the inputs of its next run."""
    from ..annotate.stage import flows_fingerprint
    from ..train.sweep import read_json

    want = {"prepared": str(Path(prepared).resolve()), "flows": str(Path(flows).resolve()),
            "flows_sha256": flows_fingerprint(Path(flows))}
    record = out / INPUTS_FILE
    have = read_json(record) if record.is_file() else None
    if record.is_file() and not isinstance(have, dict):  # never silently re-adopted: the guard would be off for good
        raise InputError(record, "is unreadable; restore it, or remove it only if the folder's rows were made from "
                                 f"--prepared {want['prepared']} and --flows {want['flows']}")
    if have is not None and "flows_sha256" not in have:  # recorded before the fingerprint: paths only
        have = {**have, "flows_sha256": want["flows_sha256"]}
    if have is not None and have != want:
        raise InputError(record, f"this folder's estimators and generators were made from other inputs "
                                 f"({_inputs_difference(have, want)}); use another --out (a folder that was moved: "
                                 f"edit the record)")
    return want


def _inputs_difference(have: dict, want: dict) -> str:
    """How two ``inputs.json`` records differ, in words: the first path that differs, else the
    flows' content."""
    from ..train.sweep import first_difference

    def paths(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "flows_sha256"}

    return first_difference(paths(have), paths(want)) or "the flows folder's content changed since (annotated again?)"


def record_inputs(out: Path, inputs: dict[str, str]) -> None:
    """Write ``inputs.json`` when missing or when it predates a key of ``inputs`` (adopted)."""
    from ..fileio import write_json
    from ..train.sweep import read_json

    have = read_json(out / INPUTS_FILE) if (out / INPUTS_FILE).is_file() else None
    if have is None or not set(inputs) <= set(have):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / INPUTS_FILE, inputs)


def _tag(arm: str) -> str:
    """An arm's or reference's name (zero, demons) in MLflow metric names."""
    return UtilityArm(arm).tag if arm in UtilityArm._value2member_map_ else arm


def _planned_steps(run: UtilityRun, cfg: Config) -> int:
    """The steps ``run`` trains (``utility.steps`` for a run planned before runs carried them)."""
    return cfg.utility.steps if run.steps is None else run.steps


def _dataset_batches(batch_size: int, seed: int, buffer: int, window, name: str = "train") -> Any:
    """Endless batches of this worker's Ray Data shard ``name`` ("train": the training scans'
    corpus, "target": the held-out ES frame's), a new shuffled pass each time."""
    import ray.train

    from .utility import batch_from_columns

    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        got = 0
        for cols in shard.iter_torch_batches(batch_size=batch_size, drop_last=False,
                                             local_shuffle_buffer_size=buffer or None,
                                             local_shuffle_seed=seed + epoch if buffer else None):
            got += 1
            yield batch_from_columns(cols, window)
        if got == 0:
            raise RuntimeError(f"the corpus dataset {name!r} yielded no samples")
        epoch += 1


def run_estimator(run: UtilityRun, cfg: Config, batches=None, device: Any = "cpu",
                  target_batches=None) -> dict[str, float]:
    """Train one estimator (this process, on ``device``) and score it on the held-out pair;
    ``batches``: an iterator of corpus batches (the Ray Data shard inside a Train worker), or None
    to read the corpus in-process; ``target_batches`` the same for the target arms' corpus (of the
    held-out ES frame). Returns the scores (:class:`~cardiomotion.evaluate.utility.EstimateScore`)
    and the last training losses."""
    import torch

    from ..annotate.pwc import build_pwcnet
    from .utility import (Arm, CorpusSource, PairSource, RandomFieldSource, alternate, pretrain_steps, pretrain_then,
                          score_estimate, source_batches, train_estimator)

    torch.manual_seed(run.seed)
    window = cfg.intensity.window
    arm = Arm(run.arm)
    # the real pairs: every arm but those that read only generated or random samples
    es, ed, flows = _training_arrays(run.prepared, run.flows, run.train_ids) if arm.uses_pairs else (None,) * 3
    bs = cfg.utility.batch_size
    made: dict[str, float] = {}
    if arm.uses_corpus and batches is None:
        batches = source_batches(CorpusSource(_open_corpus(run, cfg), window, run.n), bs, run.seed)
    if arm.uses_target and target_batches is None:
        target_batches = source_batches(CorpusSource(_open_corpus(run, cfg, target=True), window, run.n), bs,
                                        run.seed)
    if arm is Arm.CVAE:
        stream = batches
    elif arm is Arm.TARGET:
        stream = target_batches
    elif arm is Arm.ANNOTATED_TARGET:
        stream = alternate(source_batches(PairSource(es, ed, flows, window), bs, run.seed + 1), target_batches)
    elif arm is Arm.MIXED:
        stream = alternate(batches, source_batches(PairSource(es, ed, flows, window), bs, run.seed + 1))
    elif arm is Arm.FINETUNE:
        stream = pretrain_then(batches, source_batches(PairSource(es, ed, flows, window), bs, run.seed + 1),
                               pretrain_steps(_planned_steps(run, cfg), cfg.utility.pretrain_share))
    elif arm is Arm.RANDOM:
        stream = source_batches(RandomFieldSource(es, run.n, run.rms_vox, run.seed, window, cfg.utility.random_scales),
                                bs, run.seed)
    elif arm is Arm.ANNOTATED:
        stream = source_batches(PairSource(es, ed, flows, window), bs, run.seed)
    elif arm.transports:
        t0 = time.perf_counter()
        pool = transport_source(run, cfg, es, flows)
        made = {"transport_dropped": float(len(pool.dropped)), "transport_s": round(time.perf_counter() - t0, 2),
                "transport_registered": float(pool.registered)}
        stream = source_batches(anchored_source(run, cfg, pool) if arm is Arm.ANCHORED else pool, bs, run.seed)
    else:
        stream = source_batches(PairSource(es, ed, None, window), bs, run.seed)
    model = build_pwcnet(cfg).to(device)
    settings = estimator_settings(cfg, len(model.channels), run.steps)
    t0 = time.perf_counter()
    losses = train_estimator(model, stream, settings, device=device)
    train_s = time.perf_counter() - t0
    pair = _held_out(run.prepared, run.scan_id)
    model.eval()
    from ..data.intensity import hu_to_unit

    with torch.no_grad():
        fixed = hu_to_unit(torch.from_numpy(pair.ed)[None, None], window).to(device)
        moving = hu_to_unit(torch.from_numpy(pair.es)[None, None], window).to(device)
        pred = model(fixed, moving).flow[0].float().cpu()
    score = score_estimate(pred, pair.truth_flow, pair.spacing_mm, pair.ed_labels, pair.es_labels)
    tail = losses[-max(1, len(losses) // 10):]
    return {**score.as_dict(), "final_loss": float(np.mean(tail)), "train_s": round(train_s, 2),
            "steps": settings.steps, **made}


def transport_source(run: UtilityRun, cfg: Config, es_hu: np.ndarray, flows: np.ndarray):
    """The transport arm's pairs (:class:`~cardiomotion.evaluate.utility.TransportSource`) of
    ``run``'s fold, registered once per fold: read from ``run.transport_file`` when it holds this
    plan's pool (the fold's training scans, ``utility.transport_partners``, the seed, the flows
    folder, the intensity window, the registration schedule and folding bound), else built and
    written there under a temporary name, then renamed, for the fold's later seeds and reruns
    (seeds that start together each build it: the same content). The partners follow ``cfg.seed``
    (as the CVAE's pool), so the estimator seeds share one pool. The fields pass through float16
    either way (as a corpus stores its flows), so a built and a read pool are the same. Building
    reads and writes each pair's field in ``run.transport_pairs_dir`` (the storage root's
    :class:`~cardiomotion.train.transport.PairCache`), which every fold shares: a fold registers
    only the pairs no earlier fold, seed or CVAE pool did (``registered`` counts them)."""
    import torch

    from ..train.transport import MAX_FOLDING, TRANSPORT_ITERATIONS, PairCache
    from .utility import TransportSource

    window = cfg.intensity.window
    key = json.dumps({"train_ids": list(run.train_ids), "partners": cfg.utility.transport_partners, "seed": cfg.seed,
                      "flows": str(run.flows), "window": list(window), "iterations": list(TRANSPORT_ITERATIONS),
                      "max_folding": MAX_FOLDING})
    path = Path(run.transport_file) if run.transport_file else None
    if path is not None and path.is_file():
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            rec = None
        if isinstance(rec, dict) and rec.get("key") == key and {"flows", "pairs", "dropped"} <= set(rec):
            return TransportSource(es_hu, run.train_ids, rec["flows"].float(), [tuple(p) for p in rec["pairs"]],
                                   [tuple(p) for p in rec["dropped"]], window)
    if run.spacing_mm is None:
        raise ValueError(f"{run.name}: a transport run needs its fold's spacing_mm (plan_runs(..., spacing_mm=))")
    cache = PairCache(run.transport_pairs_dir) if run.transport_pairs_dir else None
    built = TransportSource.build(es_hu, flows, run.train_ids, cfg.utility.transport_partners, cfg.seed,
                                  run.spacing_mm, window, cache=cache)
    half = built.flows.half()
    if path is not None:
        from ..fileio import atomic_path

        with atomic_path(path) as tmp:  # a unique temporary (mkstemp), so nodes of a shared folder cannot collide
            torch.save({"key": key, "flows": half, "pairs": [list(p) for p in built.pairs],
                        "dropped": [list(p) for p in built.dropped]}, tmp)
    return TransportSource(es_hu, run.train_ids, half.float(), built.pairs, built.dropped, window,
                           registered=built.registered)


def anchored_source(run: UtilityRun, cfg: Config, pool):
    """The anchored arm's N samples (:class:`~cardiomotion.evaluate.utility.AnchoredSource`): the
    fold CVAE ``run.model_uri`` varying the fields of ``pool`` (the fold's transport pool) at
    ``generate.temperature``, the samples seeded by ``cfg.seed`` as the fold's corpus is."""
    from ..generate.model import load_networks, resolve_model
    from .utility import AnchoredSource

    if run.model_uri is None:
        raise ValueError(f"{run.name}: the anchored arm needs its fold's generator (model_uri)")
    resolved = resolve_model(run.model_uri, cfg)
    model, pyramid = load_networks(resolved.blobs(), "cpu")
    return AnchoredSource(pool, model, pyramid, run.n, cfg.seed, cfg.generate.temperature, resolved.window)


def _corpus_of(run: UtilityRun, target: bool) -> tuple[str | None, str | None]:
    """(materialized corpus folder or None, frames view) of ``run``'s training-scan corpus, or
    with ``target`` of its held-out ES frame's."""
    return (run.target_corpus_dir, run.target_frames_dir) if target else (run.corpus_dir, run.frames_dir)


def _open_corpus(run: UtilityRun, cfg: Config, target: bool = False):
    corpus_dir, frames_dir = _corpus_of(run, target)
    if corpus_dir is not None:
        from ..generate.corpus import open_corpus

        return open_corpus(corpus_dir)
    from ..generate.virtual import open_virtual_corpus

    return open_virtual_corpus(run.model_uri, frames_dir, run.n, seed=cfg.seed, cfg=cfg)


def estimator_train_loop(config: dict[str, Any]) -> dict[str, float]:
    """Ray Train worker loop: one estimator; the corpus arms read ``get_dataset_shard("train")``,
    the target arms ``get_dataset_shard("target")``."""
    import ray.train
    import ray.train.torch

    from ..raycluster import quiet_train_worker

    quiet_train_worker()
    cfg = Config.model_validate(config["cfg"])
    run = UtilityRun(**{**config["run"], "train_ids": tuple(config["run"]["train_ids"])})
    arm = UtilityArm(run.arm)
    shard = {name: _dataset_batches(cfg.utility.batch_size, run.seed, min(cfg.utility.shuffle_buffer, run.n),
                                    cfg.intensity.window, name)
             for name, wanted in (("train", arm.uses_corpus), ("target", arm.uses_target)) if wanted}
    # Result.return_value (metrics without a checkpoint are not kept)
    return run_estimator(run, cfg, shard.get("train"), ray.train.torch.get_device(), shard.get("target"))


def corpus_dataset(run: UtilityRun, cfg: Config, target: bool = False):
    """The Ray Dataset the corpus arms of ``run`` train on (with ``target``: the target arms'
    corpus of the held-out ES frame): the first N samples, tensors only."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # one estimator of hundreds: no bars in the log
    corpus_dir, frames_dir = _corpus_of(run, target)
    if corpus_dir is not None:
        from ..generate.corpus import open_corpus

        ds = open_corpus(corpus_dir).ray_dataset(shuffle_seed=run.seed, limit=run.n)
    else:
        from ..generate.virtual import open_virtual_corpus

        ds = open_virtual_corpus(run.model_uri, frames_dir, run.n, seed=cfg.seed, cfg=cfg).ray_dataset(
            shuffle_seed=run.seed)
    return ds.select_columns(["es", "ed_syn", "flow"])


def train_estimator_on_ray(run: UtilityRun, cfg: Config) -> dict[str, Any]:
    """One estimator as a Ray Train run (one worker); returns its result row."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..config import storage_root
    from ..raycluster import stage_gpu, train_logging

    use_gpu = stage_gpu(cfg.utility.resources, ray, "utility.resources.use_gpu")
    arm = UtilityArm(run.arm)
    datasets = {name: corpus_dataset(run, cfg, target=name == "target")
                for name, wanted in (("train", arm.uses_corpus), ("target", arm.uses_target)) if wanted} or None
    trainer = TorchTrainer(
        estimator_train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run": asdict(run)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker=cfg.utility.resources.bundle(use_gpu)),
        run_config=RunConfig(name=run.name, storage_path=str(storage_root(cfg) / "ray_results" / "utility"),
                             logging_config=train_logging()),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    metrics = getattr(result, "return_value", None)
    if result.error is not None or not metrics:
        raise RuntimeError(f"utility: {run.name} failed: {result.error}")
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"fold": run.fold, "scan": run.scan_id, "arm": run.arm, "n": run.n, "seed": run.seed,
            **{k: metrics[k] for k in (*SCORES, "final_loss", "train_s", "transport_s") if k in metrics},
            **{k: int(metrics[k]) for k in ("transport_dropped", "transport_registered") if k in metrics},
            "steps": int(metrics.get("steps", _planned_steps(run, cfg))),
            "wall_s": round(time.perf_counter() - t0, 2)}


def _ray_task(run_json: dict, cfg_json: dict) -> dict[str, Any]:
    """Inside a Ray task (no resources of its own): one estimator's Ray Train run."""
    cfg = Config.model_validate(cfg_json)
    run = UtilityRun(**{**run_json, "train_ids": tuple(run_json["train_ids"])})
    return train_estimator_on_ray(run, cfg)


def _cause(exc: BaseException) -> str:
    """The last line of a (Ray-wrapped) error: what went wrong, without the traceback."""
    text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
    return (text[-1] if text else exc.__class__.__name__)[:300]


# --------------------------------------------------------------------------- the fold set-up
def _what_trains(train: dict) -> dict:
    """A ``train`` dump as :func:`~cardiomotion.train.sweep.what_trains` gives it (less where it
    trains, less keys added later at their old value), and less the flat resource keys records made
    before ``train.resources`` hold, so a generator trained on another cluster shape, or recorded
    before a key existed, is the same generator."""
    from ..train.sweep import what_trains

    legacy = ("use_gpu", "gpus_per_worker", "cpus_per_worker")
    return {k: v for k, v in what_trains(train).items() if k not in legacy}


def _generator_want(cfg: Config) -> dict:
    """The settings a fold CVAE of this plan is trained with (what ``generator.json`` records)."""
    from ..annotate.stage import pyramid_settings

    want = {"train": _what_trains(cfg.train.model_dump(mode="json")), "pyramid": cfg.cv.pyramid.value,
            "seed": cfg.seed}
    if cfg.cv.pyramid.value == "per_fold":  # the fold trains its own pyramid: annotate's settings make it
        want["pyramid_settings"] = pyramid_settings(cfg)
    return want


def _recorded_settings(rec: dict, want: dict, cfg: Config) -> dict:
    """A ``generator.json``'s settings in the form :func:`_generator_want` gives them (records
    made before a key was recorded read as what those runs trained with)."""
    from ..annotate.stage import current_pyramid_record

    found = dict(rec.get("settings") or {})
    found["train"] = _what_trains(found.get("train") or {})
    found = current_pyramid_record(found, "pyramid_settings")  # perhaps recorded with the refinement's keys
    if ("pyramid_settings" in want and "pyramid_settings" not in found
            and cfg.annotate.lr_schedule.value == "constant"):
        # recorded before the key, when every pyramid trained at the constant rate: only a
        # constant-rate plan may reuse it (a cosine one trains its own generator)
        found["pyramid_settings"] = want["pyramid_settings"]
    return found


def _fold_generator(prepared: Path, flows: Path, fold: int, scan_id: str, fold_dir: Path, cfg: Config, log: Log) -> str:
    """The fold CVAE's model URI (trained once; kept in generator.json).

    Raises:
        InputError: the fold's ``generator.json`` is damaged (:func:`read_generator_record`).
    """
    from ..fileio import write_json
    from ..train.cvae import train_fold

    record = fold_dir / GENERATOR_RECORD
    want = _generator_want(cfg)
    if record.is_file():
        rec = read_generator_record(record)
        if _recorded_settings(rec, want, cfg) == want:
            return rec["model_uri"]
        log(f"utility: fold {fold}: the generator was trained with other settings: training it again")
    import hashlib

    # the Ray Train run's name (what a rerun resumes) is this folder's and these settings' own
    digest = hashlib.sha256(json.dumps([want, str(fold_dir.resolve())], sort_keys=True).encode()).hexdigest()[:10]
    res = train_fold(prepared, flows, fold, cfg, name=f"utility_generator_{scan_id}_{digest}", log=log)
    write_json(record, {"model_uri": res.model_uri, "run_id": res.run_id, "settings": want})
    return res.model_uri


def read_generator_record(path: Path) -> dict:
    """A fold's ``generator.json`` (its ``model_uri``, and the ``settings`` it was trained with).

    Raises:
        InputError: the file is not a JSON object, or names no model URI.
    """
    from ..train.sweep import read_json

    rec = read_json(path)
    if not isinstance(rec, dict):
        raise InputError(path, "is unreadable (not a generator record)")
    if not isinstance(rec.get("model_uri"), str):
        raise InputError(path, "records no model URI")
    return rec


def plan_adoption(source: Path, out: Path, scan_ids: Sequence[str], inputs: dict[str, str], cfg: Config,
                  log: Log = lambda _m: None) -> list[tuple[Path, dict]]:
    """Check that another utility folder ``source`` can lend its fold CVAEs to this run
    (``--generators``) and return what :func:`write_adoption` writes: (this folder's
    ``generator.json`` of a fold, the record to write there). Writes nothing.

    ``source`` must have been made from the same inputs (``inputs.json``: the prepared and flows
    folders and the flows' content hash) and its fold generators with this plan's settings (the
    ``train`` section, ``cv.pyramid``, the seed and, with per-fold pyramids, annotate's pyramid
    settings); each model must resolve in this run's tracking store. A fold ``source`` has no
    generator for is said and left to train here; a fold this folder already holds the same
    generator of needs nothing.

    Raises:
        InputError: ``source`` is ``out`` itself or no utility folder, was made from other inputs,
            holds an unreadable record or a generator trained with other settings or not
            resolvable here, or ``out`` already holds another generator of a fold (its corpus and
            rows were made from that one).
    """
    from ..generate import model as _model
    from ..train.sweep import first_difference, read_json

    source = Path(source).expanduser().resolve()
    if source == Path(out).expanduser().resolve():
        raise InputError(source, "--generators names the --out folder itself: leave it out (a folder reuses its "
                                 "own generators)")
    record = source / INPUTS_FILE
    if not record.is_file():
        raise InputError(source, f"is not a utility folder (no {INPUTS_FILE}): give the --out of an earlier "
                                 "utility run as --generators")
    have = read_json(record)
    if not isinstance(have, dict):
        raise InputError(record, "is unreadable: that folder's generators cannot be traced to their inputs")
    if "flows_sha256" not in have:
        raise InputError(record, "records no fingerprint of its flows: rerun utility into it once (it adopts "
                                 "one), then give it as --generators")
    if have != inputs:
        raise InputError(record, f"its fold generators were made from other inputs "
                                 f"({_inputs_difference(have, inputs)}): they cannot serve this run")
    want = _generator_want(cfg)
    copies: list[tuple[Path, dict]] = []
    for scan_id in scan_ids:
        theirs = utility_fold_dir(source, scan_id) / GENERATOR_RECORD
        if not theirs.is_file():
            log(f"utility: {source} has no generator of the fold holding out {scan_id}: it is trained here")
            continue
        rec = read_generator_record(theirs)
        if not isinstance(rec.get("settings"), dict):
            raise InputError(theirs, "is unreadable (not a generator record)")
        found = _recorded_settings(rec, want, cfg)
        if found != want:
            raise InputError(theirs, f"was trained with other settings ({first_difference(found, want)}): give a "
                                     "config that trains what it did, or leave out --generators")
        mine = utility_fold_dir(out, scan_id) / GENERATOR_RECORD
        if mine.is_file():
            own = read_generator_record(mine)  # a damaged record of this folder is said as such
            if own["model_uri"] == rec["model_uri"]:
                continue  # adopted before
            raise InputError(mine, "this folder holds its own generator of the fold, which made its corpus and "
                                   "rows: use another --out to reuse " + str(theirs))
        try:  # a model this run's tracking store cannot open would fail in the fold's task, on every rerun
            _model.resolve_model(rec["model_uri"], cfg)
        except InputError as exc:
            raise InputError(theirs, f"its model does not open here ({exc}): the same storage_root and "
                                     "tracking.uri as the run that trained it are needed") from None
        copies.append((mine, {**rec, "adopted_from": str(theirs)}))
    return copies


def write_adoption(copies: Sequence[tuple[Path, dict]]) -> None:
    """Write the generator records :func:`plan_adoption` returned (each atomically)."""
    from ..fileio import write_json

    for mine, rec in copies:
        mine.parent.mkdir(parents=True, exist_ok=True)
        write_json(mine, rec)


def _references(pair, cfg: Config) -> list[dict[str, Any]]:
    from .utility import score_estimate

    rows = [("zero", np.zeros((3, *pair.es.shape), np.float32))]
    if cfg.utility.demons:
        from .baseline import demons_flow

        rows.append(("demons", demons_flow(pair.es, pair.ed, pair.spacing_mm, threads=1)))
    return [{"arm": name, **score_estimate(f, pair.truth_flow, pair.spacing_mm, pair.ed_labels,
                                           pair.es_labels).as_dict()} for name, f in rows]


def plan_runs(fold: int, scan_id: str, train_ids: Sequence[str], cfg: Config, *, prepared: str, flows: str,
              corpus_dir: str | None, model_uri: str | None, frames_dir: str | None, rms_vox: float,
              target_corpus_dir: str | None = None, target_frames_dir: str | None = None,
              spacing_mm: float | None = None) -> list[UtilityRun]:
    """Every estimator of a fold: synthetic arms at each N, the real arms once (N = training pairs;
    transport: its planned pool, n_train·(1 + k));
    each with its step budget (:meth:`~cardiomotion.config.UtilityConfig.steps_for`).
    ``spacing_mm``: the fold's one grid spacing (``FoldPlan.spacing_mm``, checked by ``plan_fold``),
    which the transport arm registers on."""
    u = cfg.utility
    runs = []
    for arm in u.arms:
        # N: the corpus sizes; the training pairs of the real arms; the transport arm's own and planned
        # transported motions (k partners each, fewer when fewer scans; dropped pairs are the row's transport_dropped)
        k = min(u.transport_partners, len(train_ids) - 1)
        sizes = (u.sizes if arm.synthetic else
                 [len(train_ids) * (1 + k)] if arm is UtilityArm.TRANSPORT else [len(train_ids)])
        for n in sizes:
            steps = u.steps_for(n if arm.synthetic else None)
            for s in range(u.seeds):
                runs.append(UtilityRun(fold, scan_id, arm.value, int(n), cfg.seed + s, prepared, flows,
                                       tuple(train_ids), corpus_dir if arm.uses_corpus else None,
                                       model_uri if arm.generated else None,
                                       frames_dir if arm.uses_corpus else None, float(rms_vox), steps,
                                       target_corpus_dir if arm.uses_target else None,
                                       target_frames_dir if arm.uses_target else None,
                                       spacing_mm=None if spacing_mm is None else float(spacing_mm)))
    return runs


# --------------------------------------------------------------------------- the stage
def run_utility(prepared_dir: str | Path, flows_dir: str | Path, out_dir: str | Path, cfg: Config,
                folds: Sequence[int | str] | str | None = None, log: Log = lambda _m: None,
                on_run: Callable[[int, int], None] | None = None,
                generators: str | Path | None = None) -> UtilitySummary:
    """Run the utility experiment into ``out_dir`` (one run at a time per folder); see the module
    docstring. ``folds``: indices/scan ids/ranges as ``cv --folds`` (default: all).
    ``on_run(done, total)`` after every finished estimator (progress bars). ``generators``:
    another utility folder whose fold CVAEs are reused (:func:`plan_adoption`).

    Raises:
        InputError: before any work — bad inputs, a scan without exact truth.
    """
    from ..fileio import exclusive_lock

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "utility"):
        return _run_utility(Path(prepared_dir).resolve(), Path(flows_dir).resolve(), out, cfg, folds, log, on_run,
                            generators)


@dataclass(frozen=True)
class FoldCorpus:
    """What a fold's corpus arms read (returned by the fold's preparation task)."""

    model_uri: str
    frames_dir: str | None  # the training scans' view; None: no arm planned reads their corpus
    corpus_dir: str | None  # None: on the fly, or no such arm
    target_frames_dir: str | None = None  # the held-out scan's view (target arms planned)
    target_corpus_dir: str | None = None  # its corpus; None: on the fly, or no target arm


def _corpus_size(corpus_dir: Path) -> int:
    """Samples of the complete corpus in ``corpus_dir`` (0: none, or unfinished)."""
    from ..generate.corpus import read_manifest

    try:
        return int(read_manifest(corpus_dir).get("n", 0))
    except InputError:
        return 0


def _fed(run: UtilityRun, fc: FoldCorpus) -> UtilityRun:
    """``run`` given its fold's generator and the corpora its arm reads (the others stay None,
    as :func:`plan_runs` left them)."""
    arm = UtilityArm(run.arm)
    given: dict[str, Any] = {"model_uri": fc.model_uri}
    if arm.uses_corpus:
        given.update(corpus_dir=fc.corpus_dir, frames_dir=fc.frames_dir)
    if arm.uses_target:
        given.update(target_corpus_dir=fc.target_corpus_dir, target_frames_dir=fc.target_frames_dir)
    return replace(run, **given)


def _conditioned_corpus(prepared: str, ids: Sequence[str], view: Path, corpus: Path, model_uri: str,
                        cfg: Config) -> tuple[str, str | None]:
    """A prepared view at ``view`` holding only ``ids`` (what the corpus is conditioned on) and,
    with ``utility.corpus: materialized``, the model's largest corpus of it at ``corpus`` (the
    generate pipeline); returns (view, corpus or None: on the fly)."""
    frames = str(training_view(prepared, ids, view))
    if cfg.utility.corpus is not UtilityCorpus.MATERIALIZED:
        return frames, None
    from ..generate.job import generate_corpus

    # a corpus is never cut down: one made for a larger N (an earlier run's sizes) serves every
    # smaller N (the arms read its first N samples); generate still checks it is this model's
    n = max(max(cfg.utility.sizes), _corpus_size(corpus))
    generate_corpus(model_uri, frames, corpus, n, cfg=cfg, track=False)
    return frames, str(corpus)


def _prepare_fold_task(prepared: str, flows: str, fold: int, scan_id: str, train_ids: list[str], fold_dir: str,
                       cfg_json: dict, corpus: bool = True, target: bool = False) -> FoldCorpus:
    """Inside a Ray task (no resources of its own): the fold's CVAE (a Ray Train run) and, for the
    arms planned, the training scans' corpus (``corpus``) and the held-out ES frame's (``target``)."""
    cfg = Config.model_validate(cfg_json)
    d = Path(fold_dir)
    model_uri = _fold_generator(Path(prepared), Path(flows), fold, scan_id, d, cfg, lambda _m: None)
    frames, corpus_dir = (_conditioned_corpus(prepared, train_ids, d / FRAMES_DIR, d / CORPUS_DIR, model_uri, cfg)
                          if corpus else (None, None))
    target_frames, target_dir = (_conditioned_corpus(prepared, [scan_id], d / TARGET_FRAMES_DIR,
                                                     d / TARGET_CORPUS_DIR, model_uri, cfg)
                                 if target else (None, None))
    return FoldCorpus(model_uri, frames, corpus_dir, target_frames, target_dir)


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
    held_out = {p.val_id: _held_out(str(prepared), p.val_id) for p in plans}  # exact truth: checked before any work
    runs_file = out / RUNS_FILE
    from ..fileio import append_json_lines, read_json_lines

    done_rows = read_json_lines(runs_file, log=log)
    ident = estimator_identity(cfg)
    _check_identity(runs_file, done_rows, ident)  # before any work: finished rows are only reused if comparable
    inputs = check_inputs(out, prepared, flows)
    # every fold's estimators, planned once; the random arm's RMS and the corpus arms' corpus are
    # filled in (dataclasses.replace) when known
    planned = {p.val_id: plan_runs(p.fold, p.val_id, p.train_ids, cfg, prepared=str(prepared), flows=str(flows),
                                   corpus_dir=None, model_uri=None, frames_dir=None, rms_vox=0.0,
                                   spacing_mm=p.spacing_mm) for p in plans}
    _check_budgets(runs_file, done_rows, [r for runs in planned.values() for r in runs], cfg)
    have = {_row_key(r) for r in done_rows}
    u = cfg.utility
    # another folder's fold generators (--generators): checked before Ray starts, written past the refusals
    lent = (plan_adoption(Path(generators), out, [p.val_id for p in plans], inputs, cfg, log)
            if generators is not None else [])
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
    sumsq: dict[str, tuple[float, int]] = {}  # each scan's flow read once for the whole sweep
    total = corpus_runs_todo = 0
    prep = ray.remote(num_cpus=0, max_retries=0)(_prepare_fold_task)
    for plan in plans:
        fold_dir = utility_fold_dir(out, plan.val_id)
        fold_dir.mkdir(parents=True, exist_ok=True)
        rms = annotated_flow_rms(str(prepared), str(flows), plan.train_ids, sumsq)
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
    task = ray.remote(num_cpus=0, max_retries=0)(_ray_task)
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
