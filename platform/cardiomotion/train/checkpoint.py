"""The Ray Train checkpoint round trip shared by the training loops (PWC-Net, CVAE).

A checkpoint is a directory holding ``state.pt`` = {"model": state_dict, "optimizer":
state_dict, "epoch": int}, tensors and primitives only, read with ``weights_only=True``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from ..layout import TRAIN_CHECKPOINT as CKPT_FILE


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def load_state(checkpoint, map_location: Any = "cpu") -> dict[str, Any]:
    """The ``state.pt`` dict of a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CKPT_FILE), map_location=map_location, weights_only=True)


def latest_checkpoint(map_location: Any = "cpu") -> tuple[Any, dict[str, Any] | None]:
    """The newest readable checkpoint of this Ray Train run and its loaded state, or (None, None).

    Ray Train hands a restarted worker group the last checkpoint its controller *registered*
    (``ray.train.get_checkpoint()``), and the controller learns of a report only when it next
    polls the workers: a checkpoint a worker had already written to storage is lost to it if the
    process dies hard (SIGKILL, OOM kill, node loss) before that poll. So the run's storage
    folder is searched too (``checkpoint_<timestamp>`` folders, newest first); a folder whose
    ``state.pt`` does not load — a copy cut off by the crash — is skipped. The state is loaded
    once, to ``map_location``: the load that proves a folder readable is the one returned.
    """
    import ray.train
    from ray.train import Checkpoint

    registered = ray.train.get_checkpoint()
    try:
        from pyarrow.fs import FileSelector, FileType

        storage = ray.train.get_context().get_storage()
        fs, root = storage.storage_filesystem, storage.experiment_fs_path
        infos = fs.get_file_info(FileSelector(root, allow_not_found=True))
        found = sorted((i.path for i in infos
                        if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
    except Exception:  # noqa: BLE001  (a storage the listing does not support: Ray's own answer)
        found = []
    ckpt, state = newest_readable([Checkpoint(path, filesystem=fs) for path in found], map_location)
    if ckpt is not None:
        return ckpt, state
    return (registered, load_state(registered, map_location)) if registered else (None, None)


def newest_readable(checkpoints: list, map_location: Any = "cpu") -> tuple[Any, dict[str, Any] | None]:
    """The first of ``checkpoints`` (Ray Train checkpoints, newest first) whose ``state.pt`` loads,
    and its state, or (None, None). Each one skipped is told in a :class:`RuntimeWarning` naming
    its folder and why (in a Ray Train worker the warning reaches the driver's console): a
    training run that resumes from an older epoch than its newest checkpoint says so."""
    import warnings

    for ckpt in checkpoints:
        try:
            return ckpt, load_state(ckpt, map_location)
        except Exception as exc:  # noqa: BLE001  (incomplete or corrupt: try the next older)
            warnings.warn(f"{ckpt.path}: checkpoint does not load ({exc.__class__.__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); resuming from an older one", RuntimeWarning,
                          stacklevel=2)
    return None, None


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, device) -> tuple[int, Any]:
    """Restore model and optimizer from the run's newest checkpoint (:func:`latest_checkpoint`).

    Returns (first epoch to run, the checkpoint or None).
    """
    ckpt, state = latest_checkpoint(device)
    if state is None:
        return 0, None
    unwrap(model).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, ckpt


def report_with_checkpoint(metrics: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int,
                           rank: int) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 attaches the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                       os.path.join(d, CKPT_FILE))
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


INPUT_ERROR_KEY = "input_error"


def input_error_on_any_rank(exc: Exception | None, world: int) -> tuple[str | None, str] | None:
    """In a training loop: (where, problem) of the bad input any rank found, or None — the same
    answer on every rank (a collective when ``world`` > 1, so no rank goes on alone into DDP).

    Bad input is not a crash: a loop that finds it *returns* ``{INPUT_ERROR_KEY: (where,
    problem)}`` instead of raising, so Ray Train does not restart the worker group on it (a
    retry would read the same file again), and the driver re-raises it with
    :func:`raise_input_error`.
    """
    mine = None if exc is None else (getattr(exc, "where", None), getattr(exc, "problem", str(exc)))
    if world <= 1:
        return mine
    import torch.distributed as dist

    found: list = [None] * world
    dist.all_gather_object(found, mine)
    return next((f for f in found if f is not None), None)


def raise_input_error(result) -> None:
    """On the driver: raise the :class:`~cardiomotion.errors.InputError` a training loop returned
    (see :func:`input_error_on_any_rank`); nothing when it returned none."""
    from ..errors import InputError

    value = getattr(result, "return_value", None)
    if isinstance(value, dict) and value.get(INPUT_ERROR_KEY):
        where, problem = value[INPUT_ERROR_KEY]
        raise InputError(where, problem)
