"""What a ``cardiomotion utility`` run plans, and what its folder records and refuses to mix.

Every estimator is a :class:`UtilityRun` (what crosses into its Ray task and Train worker), planned by
:func:`plan_runs` per fold: the synthetic arms at each N, the real arms once, every arm with
``utility.seeds`` seeds and its step budget. ``OUT/runs.jsonl`` keys a finished estimator by
:func:`run_key` and holds its settings (:func:`estimator_identity`); ``OUT/inputs.json`` holds the
prepared and flows folders it was made from (:func:`check_inputs`). A rerun into the same folder with
other settings, another budget or other inputs is refused before any work (:func:`check_identity`,
:func:`check_budgets`, :func:`check_inputs`), never mixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import Config, UtilityArm
from ..errors import InputError
from ..layout import UTILITY_INPUTS as INPUTS_FILE

def run_key(scan: str, arm: str, n: int, seed: int) -> str:
    """What identifies an estimator in ``runs.jsonl``: held-out scan, arm, N, seed."""
    return f"{scan}|{arm}|{n}|{seed}"


def row_key(row: dict) -> str:
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
    it); each row's own steps are checked against its plan by :func:`check_budgets`."""
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


def check_identity(runs_file: Path, done_rows: list[dict], ident: dict) -> None:
    for i, r in enumerate(done_rows, 1):
        if r.get("estimator") != ident:
            have = r.get("estimator")
            diff = ("no settings record (an older version)" if have is None else
                    ", ".join(f"{k} {have.get(k)!r} → {ident.get(k)!r}" for k in sorted(set(ident) | set(have))
                              if have.get(k) != ident.get(k)))
            raise InputError(runs_file, f"row {i} ({r.get('arm')} N {r.get('n')} seed {r.get('seed')}) was trained with "
                                        f"other estimator settings ({diff}); use another --out or the same settings")


def check_budgets(runs_file: Path, done_rows: list[dict], planned: Sequence[UtilityRun], cfg: Config) -> None:
    """A finished row is reused only if its steps are those its run would get now: with
    ``utility.epochs`` the real arms train the largest N's budget, so another largest N changes
    them (rows made before ``steps`` was recorded trained ``utility.steps``)."""
    by_key = {row_key(r): r for r in done_rows}
    for run in planned:
        row = by_key.get(run.key)
        if row is None:
            continue
        want = planned_steps(run, cfg)
        had = int(row.get("steps", (row.get("estimator") or {}).get("steps", want)))
        if had != want:
            raise InputError(runs_file, f"{run.arm} N {run.n} seed {run.seed} of {run.scan_id} was trained for "
                                        f"{had} steps, this plan gives it {want} (utility.epochs with "
                                        f"another largest N); use another --out or the same sizes")


def planned_steps(run: UtilityRun, cfg: Config) -> int:
    """The steps ``run`` trains (``utility.steps`` for a run planned before runs carried them)."""
    return cfg.utility.steps if run.steps is None else run.steps


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
                                 f"({inputs_difference(have, want)}); use another --out (a folder that was moved: "
                                 f"edit the record)")
    return want


def inputs_difference(have: dict, want: dict) -> str:
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
