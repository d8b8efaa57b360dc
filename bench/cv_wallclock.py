"""Wall-clock of the paper's 44-fold × 2000-epoch cross-validation: measured and projected.

For N folds per device (default 1, 2, 4, 8) the benchmark starts N processes on the device at
hand, each running the CVAE training step of a fold exactly as a fold trains
(:func:`cardiomotion.train.cvae.train_epoch`: joint augmentation, frozen pyramid under no_grad,
loss, backward, clipping, Adam) on random volumes of the chosen grid, released together by a
barrier. It measures the aggregate training throughput (samples/s over the wall time from the
first start to the last finish) and each fold's step time, then projects the sweep:

    sweep samples = folds × epochs × ceil((scans − 1) / batch) × batch   (the fold loop's steps)
    projected wall = sweep samples / aggregate samples/s  (+ optional per-fold start-up cost)

against the reference recipe: one fold at a time, fp32, contiguous tensors, plain Adam (N = 1).
The packed runs use the step training runs on that device
(:meth:`cardiomotion.train.recipe.StepRecipe.for_device`: on a GPU bf16 autocast,
channels_last_3d, fused Adam, cuDNN autotuning; on a CPU fp32 with channels_last_3d);
``--precision both`` measures it in fp32 and bf16 at every N. On a CPU each of the N processes
gets cores/N threads (the reference all cores, or one if that is faster).

Prints one JSON document. Default settings (grid 32, batch 2, 3 timed steps) finish in about
a minute on an idle 2-core CPU; on a GPU use the paper's size, e.g.::

    python bench/cv_wallclock.py --device cuda --grid 96 --batch 16 --steps 30 --precision both
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path


def _worker(rank: int, opts: dict, threads: int, barrier, queue) -> None:
    try:
        import torch

        from cardiomotion.models.pyramid import FeaturePyramid
        from cardiomotion.train.cvae import build_cvae, train_epoch
        from cardiomotion.train.recipe import StepRecipe

        torch.set_num_threads(threads)
        device = torch.device(opts["device"])
        cuda = device.type == "cuda"
        bf16 = opts["precision"] == "bf16"
        grid = tuple(opts["grid"])
        cfg = opts["settings"]  # StepSettings: no config (and so no pydantic) in the fold process
        # the reference recipe (fp32, contiguous, plain Adam) or the step `train` runs on this device
        recipe = (StepRecipe.reference() if opts["recipe"] == "reference"
                  else StepRecipe.for_device(device, bf16=bf16, channels_last=True))
        recipe.setup()
        torch.manual_seed(rank)
        pyramid = recipe.place(FeaturePyramid(channels=opts["channels"]).eval(), device)
        pyramid.requires_grad_(False)
        model = recipe.place(build_cvae(cfg, pyramid.config()), device)
        opt = recipe.optimizer(model.parameters(), 1e-3, device)
        es = torch.rand(opts["volumes"], 1, *grid)
        flow = torch.randn(opts["volumes"], 3, *grid)
        if cuda:  # as in training: the fold's data lives on the GPU
            es, flow = es.to(device), flow.to(device)

        def run(steps: int, epoch: int) -> None:
            train_epoch(model, pyramid, opt, es, flow, cfg, epoch, steps=steps, device=device, recipe=recipe, rank=rank)
            if cuda:
                torch.cuda.synchronize()

        run(opts["warmup"], 0)
        barrier.wait(timeout=opts["timeout"])
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        run(opts["steps"], 1)
        t1 = time.perf_counter()
        queue.put({"rank": rank, "t0": t0, "t1": t1, "samples": opts["steps"] * opts["batch"]})
    except BaseException as exc:  # noqa: BLE001  (report, never hang the barrier)
        barrier.abort()
        queue.put({"rank": rank, "error": f"{exc.__class__.__name__}: {exc}"})


def measure(n: int, opts: dict, threads: int) -> dict:
    """N concurrent fold processes on one device: aggregate throughput and per-fold step time."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, opts, threads, barrier, queue)) for r in range(n)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=opts["timeout"]) for _ in range(n)]
    finally:  # a timeout or a dead fold process: never leave the others running (or blocking exit)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{n} folds per device: {errors[0]}")
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    samples = sum(r["samples"] for r in results)
    per_fold = [(r["t1"] - r["t0"]) / opts["steps"] for r in results]
    return {"folds_per_device": n, "recipe": opts["recipe"], "precision": opts["precision"], "threads_per_fold": threads,
            "measured_wall_s": round(wall, 3), "measured_samples": samples,
            "samples_per_s": round(samples / wall, 3), "step_s_per_fold": round(sum(per_fold) / n, 4)}


def sweep_samples(folds: int, epochs: int, batch: int) -> int:
    """Training samples of a leave-one-out sweep: folds × epochs × ceil((folds − 1) / batch) × batch
    (the fold loop's steps over its folds − 1 training scans)."""
    return folds * epochs * math.ceil((folds - 1) / batch) * batch


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"cuda: {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} logical cores)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--grid", default="32", help="N (N³), IxJxK, or 'paper' (86x86x76 → nearest grid divisible by 2^levels)")
    p.add_argument("--batch", type=int, default=2, help="batch per step (the paper: 16)")
    p.add_argument("--channels", default="16,32,64,96,128", help="pyramid channels (the default config's)")
    p.add_argument("--folds-per-device", default="1,2,4,8", help="N values to measure")
    p.add_argument("--steps", type=int, default=3, help="timed steps per fold process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "both"],
                   help="auto: fp32 on CPU; on GPU fp32 for the reference and bf16 for packing")
    p.add_argument("--volumes", type=int, default=4, help="random training volumes per process")
    p.add_argument("--folds", type=int, default=44, help="folds of the projected sweep (the paper: 44)")
    p.add_argument("--epochs", type=int, default=2000, help="epochs per fold (the paper: 2000)")
    p.add_argument("--recipe-batch", type=int, default=16, help="batch of the projected recipe (the paper: 16)")
    p.add_argument("--fold-startup-s", type=float, default=0.0,
                   help="per-fold start-up cost added to projections (Ray Train start, data loading)")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)

    import torch

    from cardiomotion.train.recipe import StepRecipe

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device.startswith("cuda")
    channels = [int(c) for c in args.channels.split(",")]
    d = 2 ** len(channels)
    if args.grid == "paper":
        grid = [max(d, round(n / d) * d) for n in (86, 86, 76)]
    else:
        try:
            grid = [int(n) for n in args.grid.split("x")]
        except ValueError:
            p.error(f"--grid {args.grid!r}: expected N, IxJxK or 'paper'")
        grid = grid * 3 if len(grid) == 1 else grid
    if len(grid) != 3 or any(n % d for n in grid):
        p.error(f"--grid {args.grid} must be 3 sizes divisible by 2^{len(channels)} = {d}")
    ns = sorted({int(n) for n in args.folds_per_device.split(",")})
    precisions = {"auto": ["bf16"] if cuda else ["fp32"], "fp32": ["fp32"], "bf16": ["bf16"],
                  "both": ["fp32", "bf16"]}[args.precision]
    if not cuda and "bf16" in precisions:
        p.error("bf16 is measured on CUDA only (the training code autocasts on CUDA)")
    cores = os.cpu_count() or 1
    from cardiomotion.config import load_config
    from cardiomotion.train.settings import StepSettings

    settings = StepSettings.from_config(load_config(None, {"train": {
        "batch_size": args.batch, "augment": {"max_shift": max(1, min(grid) // 10)}}}))
    base = {"device": device, "grid": grid, "batch": args.batch, "channels": channels, "steps": args.steps,
            "settings": settings,
            "warmup": args.warmup, "volumes": args.volumes, "timeout": args.timeout}

    def threads(n: int) -> int:
        return 1 if cuda else max(1, cores // n)

    t_start = time.perf_counter()
    # The reference fold may use every core (intra-op threads) or one: on a shared or
    # oversubscribed CPU, spinning intra-op threads can be many times slower than one thread, so
    # both are measured and the faster is the reference (the recipe does not fix the threads).
    ref_opts = {**base, "precision": "fp32", "recipe": "reference"}
    candidates = [measure(1, ref_opts, threads(1))]
    if not cuda and threads(1) > 1:
        candidates.append(measure(1, ref_opts, 1))
    reference = max(candidates, key=lambda r: r["samples_per_s"])
    runs = [measure(n, {**base, "precision": prec, "recipe": "project"}, threads(n))
            for prec in precisions for n in ns]

    steps_per_epoch = math.ceil((args.folds - 1) / args.recipe_batch)
    sweep = sweep_samples(args.folds, args.epochs, args.recipe_batch)

    def project(r: dict) -> dict:
        n = r["folds_per_device"]
        compute_s = sweep / r["samples_per_s"]
        startup_s = math.ceil(args.folds / n) * args.fold_startup_s
        return {**r, "projected_sweep_h": round((compute_s + startup_s) / 3600, 3),
                "speedup_vs_reference": round(r["samples_per_s"] / reference["samples_per_s"], 3)}

    packing = [project(r) for r in runs]
    best = min(packing, key=lambda r: r["projected_sweep_h"])
    out = {
        "benchmark": "cv_wallclock",
        "device": _device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "measured_at": {"grid": grid, "batch": args.batch, "channels": channels,
                        "timed_steps_per_fold": args.steps},
        "recipe": {"folds": args.folds, "epochs": args.epochs, "scans": args.folds, "batch": args.recipe_batch,
                   "steps_per_epoch": steps_per_epoch, "sweep_samples": sweep,
                   "fold_startup_s": args.fold_startup_s},
        "reference": project(reference) | {"recipe": "one fold at a time, fp32, contiguous, plain Adam"},
        "reference_candidates": [{k: c[k] for k in ("threads_per_fold", "samples_per_s", "step_s_per_fold")}
                                 for c in candidates],
        "packing": packing,
        "project_recipe": StepRecipe.for_device(device, bf16="bf16" in precisions).describe(),
        "best": {"folds_per_device": best["folds_per_device"], "precision": best["precision"],
                 "projected_sweep_h": best["projected_sweep_h"], "speedup_vs_reference": best["speedup_vs_reference"]},
        "notes": [
            "samples_per_s: aggregate over the N fold processes, from the first start to the last finish",
            "projected_sweep_h: the whole 44-fold x 2000-epoch sweep on ONE such device; divide by the device count",
            "measured at the grid/batch above: throughput per sample changes with grid and batch, so "
            "project the paper's sweep from a run at its size (--grid 96 --batch 16 on a GPU)",
        ],
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
