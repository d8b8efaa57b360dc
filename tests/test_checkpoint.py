"""Resuming from the newest checkpoint that loads, and saying so when a newer one does not."""
from __future__ import annotations

import warnings

import pytest
import torch
from ray.train import Checkpoint

from cardiomotion.layout import TRAIN_CHECKPOINT
from cardiomotion.train.checkpoint import load_state, newest_readable


def _write(folder, epoch: int):
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "epoch": epoch},
               folder / TRAIN_CHECKPOINT)
    return Checkpoint.from_directory(str(folder))


def test_a_checkpoint_cut_off_by_a_crash_is_skipped_with_a_warning_naming_it(tmp_path):
    older = _write(tmp_path / "checkpoint_2026-01-01_00-00-01", 4)
    newer = _write(tmp_path / "checkpoint_2026-01-01_00-00-02", 5)
    state_file = tmp_path / "checkpoint_2026-01-01_00-00-02" / TRAIN_CHECKPOINT
    state_file.write_bytes(state_file.read_bytes()[:100])  # the copy the crash cut off
    with pytest.warns(RuntimeWarning, match=r"checkpoint_2026-01-01_00-00-02: checkpoint does not load .*older one"):
        ckpt, state = newest_readable([newer, older])
    assert ckpt is older and state["epoch"] == 4 and torch.equal(state["model"]["w"], torch.full((3,), 4.0))
    # every one damaged: nothing to resume from, each named
    (tmp_path / "checkpoint_2026-01-01_00-00-01" / TRAIN_CHECKPOINT).write_bytes(b"")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert newest_readable([newer, older]) == (None, None)
    assert [str(w.message).split(":")[0] for w in seen] == [newer.path, older.path]


def test_the_newest_readable_checkpoint_is_taken_without_a_warning(tmp_path):
    older = _write(tmp_path / "a", 1)
    newer = _write(tmp_path / "b", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt, state = newest_readable([newer, older])
    assert ckpt is newer and state["epoch"] == 2 and torch.equal(state["model"]["w"], load_state(newer)["model"]["w"])
