"""How a CVAE training step runs on a device: precision, memory format, optimizer kernel.

One :class:`StepRecipe` is what ``cardiomotion train``, ``cv`` and ``tune`` use
(:meth:`StepRecipe.for_device`) and what ``bench/train_throughput.py`` and
``bench/cv_wallclock.py`` time against the paper's recipe (:meth:`StepRecipe.reference`:
fp32, eager, contiguous tensors, plain Adam), so a measured speed-up is the speed-up of the
step that training actually runs.

Measured (README, "Results"): channels_last_3d speeds the 3-D convolutions up on a CPU as well
(1.96× at 32³ on 2 cores, equal held-out EPE), so it is used on every device; bf16 autocast, fused Adam
and cuDNN autotuning apply on CUDA only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class StepRecipe:
    """The knobs of a training step.

    Attributes:
        bf16: bf16 autocast of the forward pass (CUDA only; the loss is computed in fp32).
        channels_last: channels_last_3d memory format for the model, the frozen pyramid and
            the (B, C, I, J, K) batches.
        fused_adam: the fused (single-kernel) Adam step (CUDA only).
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithm per shape (CUDA only).
    """

    bf16: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def reference(cls) -> "StepRecipe":
        """The paper's recipe: fp32, eager, contiguous tensors, plain Adam."""
        return cls()

    @classmethod
    def for_device(cls, device: torch.device | str, bf16: bool = True, channels_last: bool = True) -> "StepRecipe":
        """The project's step on ``device`` given the config switches ``train.bf16`` and
        ``train.channels_last``: CUDA-only features are dropped on other devices."""
        cuda = torch.device(device).type == "cuda"
        return cls(bf16=bf16 and cuda, channels_last=channels_last, fused_adam=cuda, cudnn_benchmark=cuda)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        on = [name for name, flag in (("bf16 autocast", self.bf16), ("channels_last_3d", self.channels_last),
                                      ("fused Adam", self.fused_adam), ("cuDNN autotune", self.cudnn_benchmark)) if flag]
        return ", ".join(on) if on else "fp32, eager, contiguous"

    def setup(self) -> None:
        """Process-wide switches: cuDNN autotuning on or off as the recipe says (so a reference
        step built after a project step in the same process does not inherit its autotuning)."""
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def place(self, module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
        """Move ``module`` to ``device`` in the recipe's memory format (in place; returned)."""
        return module.to(device).to(memory_format=self.memory_format)

    def batch(self, t: torch.Tensor) -> torch.Tensor:
        """A (B, C, I, J, K) batch in the recipe's memory format."""
        return t.contiguous(memory_format=self.memory_format)

    def optimizer(self, params: Iterable[torch.nn.Parameter], lr: float, device: torch.device | str):
        """Adam, fused where the recipe and device allow it."""
        fused = self.fused_adam and torch.device(device).type == "cuda"
        return torch.optim.Adam(params, lr=lr, fused=True if fused else None)

    def autocast(self, device: torch.device | str):
        """The forward pass's autocast context (a no-op unless bf16 on CUDA)."""
        dev = torch.device(device)
        if self.bf16 and dev.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


__all__ = ["StepRecipe"]
