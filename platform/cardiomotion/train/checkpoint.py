"""The Ray Train checkpoint round trip shared by the training loops (PWC-Net, CVAE).

A checkpoint is a directory holding ``state.pt`` = {"model": state_dict, "optimizer":
state_dict, "epoch": int}, tensors and primitives only, read with ``weights_only=True``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

CKPT_FILE = "state.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def load_state(checkpoint, map_location: Any = "cpu") -> dict[str, Any]:
    """The ``state.pt`` dict of a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CKPT_FILE), map_location=map_location, weights_only=True)


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, device) -> tuple[int, Any]:
    """Restore model and optimizer from ``ray.train.get_checkpoint()``.

    Returns (first epoch to run, the checkpoint or None).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, None
    state = load_state(ckpt, device)
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
