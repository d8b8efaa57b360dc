"""Training-step throughput of the CVAE: the reference recipe against the step training runs.

Both recipes run the library's own epoch loop (:func:`cardiomotion.train.cvae.train_epoch`:
random batch, joint augmentation on the device, frozen pyramid under no_grad, w_rec·MSE +
w_kl·KL, backward, clipping, Adam), side by side in one process on the same device and data:

* reference (the paper's): :meth:`StepRecipe.reference` — fp32, eager, contiguous, plain Adam;
* project: :meth:`StepRecipe.for_device` — what ``cardiomotion train`` runs there (GPU: bf16
  autocast, channels_last_3d, fused Adam, cuDNN autotuning; CPU: fp32, channels_last_3d).

The data are synthetic volumes: smooth ES images and flows of a few voxels drawn from a
low-dimensional family of smooth fields (as cardiac motion is). ``--parity-steps N`` trains both recipes N steps from the same initialisation and
reports the reconstruction EPE on held-out volumes (``validate``, z = μ), so a speed-up is only
claimed at equal validation error.

Prints one JSON document. Defaults target a GPU (paper grid 86×86×76 → nearest valid grid
96×96×64 for 5 levels, and 96³; batch 16); on a CPU use e.g.
``--grids 32 --batch 4 --channels 8,16,32``.
"""
from __future__ import annotations

import argparse
import json
import platform as _platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cardiomotion.models.pyramid import FeaturePyramid  # noqa: E402
from cardiomotion.train.cvae import build_cvae, train_epoch, validate  # noqa: E402
from cardiomotion.train.recipe import StepRecipe  # noqa: E402
from cardiomotion.train.settings import StepSettings  # noqa: E402


def nearest_valid(n: int, levels: int) -> int:
    d = 2**levels
    return max(d, int(round(n / d)) * d)


def make_volumes(n: int, grid: tuple[int, int, int], seed: int, modes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """n smooth image-like ES volumes (n,1,…) in [0,1] and flows (n,3,…) of a few voxels.

    Like cardiac motion, the flows are a low-dimensional family: random combinations of
    ``modes`` fixed smooth fields (the same for every seed), so a model trained on some
    volumes can reconstruct held-out ones and the parity check measures learning, not noise.
    """
    basis_gen = torch.Generator().manual_seed(12345)
    basis = torch.randn((modes, 3, *(max(2, k // 8) for k in grid)), generator=basis_gen)
    basis = torch.nn.functional.interpolate(basis, size=grid, mode="trilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    es = torch.nn.functional.avg_pool3d(torch.rand((n, 1, *grid), generator=g), 5, 1, 2)
    es = (es - es.amin()) / (es.amax() - es.amin())
    coef = torch.randn((n, modes), generator=g)
    flow = torch.einsum("nm,mcijk->ncijk", coef, basis) * (2.0 / modes**0.5)
    return es, flow


class Run:
    """One recipe's model, frozen pyramid and optimizer, built from the same seed (``cfg``: the
    :class:`StepSettings` of the step)."""

    def __init__(self, recipe: StepRecipe, cfg: StepSettings, channels, device, seed: int = 0):
        self.recipe, self.cfg, self.device = recipe, cfg, device
        recipe.setup()
        torch.manual_seed(seed)
        self.pyramid = recipe.place(FeaturePyramid(1, channels).eval(), device)
        self.pyramid.requires_grad_(False)
        self.model = recipe.place(build_cvae(cfg, self.pyramid.config()), device)
        self.opt = recipe.optimizer(self.model.parameters(), cfg.lr, device)
        self.epoch = 0

    def train(self, es, flow, steps: int) -> None:
        train_epoch(self.model, self.pyramid, self.opt, es, flow, self.cfg, self.epoch, steps=steps,
                    device=self.device, recipe=self.recipe)
        self.epoch += 1

    def val_epe(self, es, flow) -> dict[str, float]:
        with self.recipe.autocast(self.device):
            v = validate(self.model, self.pyramid, es, flow, 1.0, 1, 0, self.device)
        return {"rec_epe_vox": v["val_epe_rec_vox"], "zero_flow_epe_vox": v["val_epe_zero_vox"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_run(r: Run, es, flow, warmup: int, steps: int) -> dict:
    r.train(es, flow, warmup)
    sync(r.device)
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r.train(es, flow, steps)
    sync(r.device)
    dt = time.perf_counter() - t0
    out = {"recipe": r.recipe.describe(), "samples_per_s": round(r.cfg.batch_size * steps / dt, 3),
           "step_ms": round(1000 * dt / steps, 2)}
    if r.device.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="paper,96", help="comma list: 'paper' (86x86x76 → nearest valid) or N (N³) or IxJxK")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", default="16,32,64,96,128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--volumes", type=int, default=32, help="synthetic training volumes")
    p.add_argument("--val-volumes", type=int, default=4, help="held-out volumes of the parity check")
    p.add_argument("--parity-steps", type=int, default=0, help="train both recipes this many steps; compare held-out EPE")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (train.lr)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from cardiomotion.config import load_config

    device = torch.device(args.device)
    channels = tuple(int(c) for c in args.channels.split(","))
    levels = len(channels)
    reference, project = StepRecipe.reference(), StepRecipe.for_device(device)
    results = []
    for spec in args.grids.split(","):
        if spec == "paper":
            grid = tuple(nearest_valid(n, levels) for n in (86, 86, 76))
        elif "x" in spec:
            grid = tuple(int(n) for n in spec.split("x"))
        else:
            grid = (int(spec),) * 3
        cfg = StepSettings.from_config(load_config(None, {"train": {
            "batch_size": args.batch, "lr": args.lr, "augment": {"max_shift": max(1, min(grid) // 10)}}}))
        es, flow = make_volumes(args.volumes, grid, seed=0)
        es_v, flow_v = make_volumes(args.val_volumes, grid, seed=1)
        if device.type == "cuda":  # as in training: a fold's data lives on the GPU
            es, flow = es.to(device), flow.to(device)
        row = {"grid": list(grid), "batch": args.batch,
               "reference": time_run(Run(reference, cfg, channels, device), es, flow, args.warmup, args.steps),
               "project": time_run(Run(project, cfg, channels, device), es, flow, args.warmup, args.steps)}
        row["speedup"] = round(row["project"]["samples_per_s"] / row["reference"]["samples_per_s"], 3)
        if args.parity_steps:
            runs = {"reference": Run(reference, cfg, channels, device, seed=1),
                    "project": Run(project, cfg, channels, device, seed=1)}
            parity = {"steps": args.parity_steps, "held_out_volumes": args.val_volumes}
            for name, r in runs.items():
                r.train(es, flow, args.parity_steps)
                v = r.val_epe(es_v, flow_v)
                parity["zero_flow_epe_vox"] = round(v["zero_flow_epe_vox"], 4)
                parity[f"{name}_val_rec_epe_vox"] = round(v["rec_epe_vox"], 4)
            row["parity"] = parity
        results.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({_platform.processor() or _platform.machine()}, {torch.get_num_threads()} threads)"
    print(json.dumps({"bench": "train_throughput", "device": dev, "torch": torch.__version__,
                      "channels": list(channels), "results": results}, indent=2))


if __name__ == "__main__":
    main()
