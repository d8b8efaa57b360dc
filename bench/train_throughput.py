"""Training-step throughput of the CVAE: the reference recipe against the project's optimized step.

Reference recipe (the paper's): fp32, eager, contiguous tensors, plain Adam, batch 16.
Optimized step (what ``cardiomotion train`` does on a GPU): bf16 autocast, channels_last_3d
for the CVAE and the frozen pyramid, fused Adam, cuDNN autotuning, and optionally
``torch.compile``. Both run side by side in one process on the same device, on the same
synthetic batch (smooth random flows, phantom-like ES images), at each grid asked for.

``--parity-steps N`` also trains both recipes for N steps from the same initialisation on a
fixed batch and reports their reconstruction EPE, so a speed-up is only claimed at equal error.

Prints one JSON document. Defaults target a GPU (paper grid 86×86×76 → nearest valid grid
96×96×64 for 5 levels, and 96³); on a CPU use e.g. ``--grids 32 --batch 4 --channels 8,16,32``.
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

from cardiomotion.models.cvae import MotionCVAE  # noqa: E402
from cardiomotion.models.pyramid import FeaturePyramid  # noqa: E402
from cardiomotion.train.losses import kl_standard_normal  # noqa: E402


def nearest_valid(n: int, levels: int) -> int:
    d = 2**levels
    return max(d, int(round(n / d)) * d)


def make_batch(batch: int, grid: tuple[int, int, int], device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    es = torch.rand((batch, 1, *grid), generator=g)
    es = torch.nn.functional.avg_pool3d(es, 5, 1, 2)  # smooth, image-like
    flow = torch.randn((batch, 3, *(max(2, n // 8) for n in grid)), generator=g) * 2.0
    flow = torch.nn.functional.interpolate(flow, size=grid, mode="trilinear", align_corners=False)
    return es.to(device), flow.to(device)


class Recipe:
    def __init__(self, name: str, channels, device, optimized: bool, compile_model: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.name = name
        self.device = device
        cuda = device.type == "cuda"
        self.amp = optimized and cuda
        self.fmt = torch.channels_last_3d if optimized else torch.contiguous_format
        self.pyramid = FeaturePyramid(1, channels).to(device).eval().requires_grad_(False)
        self.model = MotionCVAE(channels=channels).to(device)
        if optimized:
            self.pyramid = self.pyramid.to(memory_format=self.fmt)
            self.model = self.model.to(memory_format=self.fmt)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        fused = optimized and cuda
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=fused or None)

    def step(self, es, flow) -> float:
        es = es.contiguous(memory_format=self.fmt)
        flow = flow.contiguous(memory_format=self.fmt)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                feats = self.pyramid(es)
            out = self.step_model(flow, es, feats)
        loss = 0.95 * ((out.flow.float() - flow) ** 2).mean() + 0.05 * kl_standard_normal(out.mu.float(), out.logvar.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.75)
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def rec_epe(self, es, flow) -> float:
        self.model.eval()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            feats = self.pyramid(es.contiguous(memory_format=self.fmt))
            mu, _ = self.model.encode(flow.contiguous(memory_format=self.fmt), es, feats)
            rec = self.model.decode(mu, es, feats).float()
        self.model.train()
        return float(torch.linalg.vector_norm(rec - flow, dim=1).mean())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_recipe(r: Recipe, es, flow, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        r.step(es, flow)
    sync(r.device)
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        r.step(es, flow)
    sync(r.device)
    dt = time.perf_counter() - t0
    out = {"samples_per_s": es.shape[0] * steps / dt, "step_ms": 1000 * dt / steps}
    if r.device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="paper,96", help="comma list: 'paper' (86x86x76 → nearest valid) or N (N³) or IxJxK")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", default="16,32,64,96,128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the optimized model")
    p.add_argument("--parity-steps", type=int, default=0, help="train both recipes this many steps and compare EPE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels = tuple(int(c) for c in args.channels.split(","))
    levels = len(channels)
    results = []
    for spec in args.grids.split(","):
        if spec == "paper":
            grid = tuple(nearest_valid(n, levels) for n in (86, 86, 76))
        elif "x" in spec:
            grid = tuple(int(n) for n in spec.split("x"))
        else:
            grid = (int(spec),) * 3
        es, flow = make_batch(args.batch, grid, device)
        ref = Recipe("reference (fp32, eager, contiguous)", channels, device, optimized=False, compile_model=False)
        opt = Recipe("optimized (bf16 autocast, channels_last_3d, fused Adam" + (", compile" if args.compile else "") + ")",
                     channels, device, optimized=True, compile_model=args.compile)
        row = {"grid": list(grid), "batch": args.batch,
               "reference": time_recipe(ref, es, flow, args.warmup, args.steps),
               "optimized": time_recipe(opt, es, flow, args.warmup, args.steps)}
        row["speedup"] = row["optimized"]["samples_per_s"] / row["reference"]["samples_per_s"]
        if args.parity_steps:
            ref_p = Recipe("ref", channels, device, optimized=False, compile_model=False, seed=1)
            opt_p = Recipe("opt", channels, device, optimized=True, compile_model=args.compile, seed=1)
            for _ in range(args.parity_steps):
                ref_p.step(es, flow)
                opt_p.step(es, flow)
            row["parity"] = {"steps": args.parity_steps, "zero_flow_epe_vox": float(torch.linalg.vector_norm(flow, dim=1).mean()),
                             "reference_rec_epe_vox": ref_p.rec_epe(es, flow), "optimized_rec_epe_vox": opt_p.rec_epe(es, flow)}
        results.append(row)
        del ref, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({_platform.processor() or _platform.machine()}, {torch.get_num_threads()} threads)"
    print(json.dumps({"bench": "train_throughput", "device": dev, "torch": torch.__version__,
                      "channels": list(channels), "results": results}, indent=2))


if __name__ == "__main__":
    main()
