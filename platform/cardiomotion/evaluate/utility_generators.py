"""The fold generators of ``cardiomotion utility`` and the corpora they condition on.

Each leave-one-out fold trains its CVAE once on the training scans (:func:`_fold_generator`, recorded
in ``OUT/folds/<scan>/generator.json`` with the settings that trained it) and, for the corpus arms,
generates from a prepared view holding only the training scans (:func:`training_view`), or for the
transductive arms only the held-out ES frame (:func:`prepare_fold_task`, a Ray task). ``--generators``
lends another utility folder's fold CVAEs when they were made from the same inputs with the same
settings (:func:`plan_adoption`, then :func:`write_adoption`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import Config, UtilityCorpus
from ..errors import InputError
from ..layout import (UTILITY_CORPUS as CORPUS_DIR, UTILITY_FRAMES as FRAMES_DIR, UTILITY_GENERATOR as GENERATOR_RECORD,
                      UTILITY_INPUTS as INPUTS_FILE, UTILITY_TARGET_CORPUS as TARGET_CORPUS_DIR,
                      UTILITY_TARGET_FRAMES as TARGET_FRAMES_DIR, utility_fold_dir)
from .utility_plan import inputs_difference

Log = Callable[[str], None]

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


def check_generator_inputs(prepared: Path, flows: Path, plans: Sequence, planned: dict, have: set[str], out: Path,
                           lent: set[Path], cfg: Config) -> None:
    """Before Ray starts: the inputs of every fold CVAE this run will train — a fold with an
    unfinished generated arm (``planned``, less the rows in ``have``) whose ``generator.json`` is
    neither in ``out`` with this plan's settings nor among those ``lent`` (:func:`plan_adoption`) — pass ``train``'s own
    checks (:func:`~cardiomotion.train.cvae.check_fold_inputs`: its feature pyramid opens, the
    grid suits it), so that a damaged pyramid is refused at once, not after the other arms trained.

    Raises:
        InputError: as :func:`~cardiomotion.train.cvae.check_fold_inputs`.
    """
    from ..config import UtilityArm
    from ..train.cvae import check_fold_inputs

    want = _generator_want(cfg)
    for plan in plans:
        record = utility_fold_dir(out, plan.val_id) / GENERATOR_RECORD
        if record in lent or (record.is_file() and _recorded_settings(read_generator_record(record), want, cfg) == want):
            continue  # a generator this run reuses (one trained otherwise is trained again: checked)
        if any(UtilityArm(r.arm).generated and r.key not in have for r in planned[plan.val_id]):
            check_fold_inputs(prepared, flows, plan.fold, cfg)
            if cfg.cv.pyramid.value == "shared":
                return  # one pyramid for every fold: checked once


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
                                 f"({inputs_difference(have, inputs)}): they cannot serve this run")
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


def prepare_fold_task(prepared: str, flows: str, fold: int, scan_id: str, train_ids: list[str], fold_dir: str,
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
