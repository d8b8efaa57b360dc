"""Where the time goes in the two GPU targets ``gpu_suite.py`` found short on an H200.

    python3 bench/gpu_profile.py --out DIR            # on a machine with one CUDA device (~2 minutes)
    python3 bench/gpu_profile.py --smoke --out DIR    # tiny grids on the CPU: the script's own check

The suite measured the project's CVAE training step at 1.53x the reference (target 2x) and the
generation engine's decode + warp at 0.94x the one-sample-at-a-time reference (target 4x), both at
96x96x64, batch 16. This splits each into its parts, timed side by side in one process:

* ``generate``: one decode block of :class:`~cardiomotion.generate.engine.SampleEngine` as it
  runs (``decode_block``), its device work alone (latents, decode, warp, quantise; no copy to the
  host), the device-to-host copy alone (pageable ``.cpu()`` against a copy into pinned buffers),
  the CPU-side latents alone, and the device work with cuDNN's deterministic algorithms (what the
  engine pins, for byte-identical corpora) against autotuned ones; at batch 16 and 64.
* ``train``: the project's step (``train_epoch`` with ``StepRecipe.for_device``) under
  ``torch.profiler``: wall time per step against the device's busy time per step (a step whose
  device is idle most of the time is bound by the host: launches, syncs, CPU work), and the
  operators with the most device time.

Prints JSON and writes ``DIR/gpu_profile.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "platform"))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpu_suite as gs  # noqa: E402


def _timed(fn, device, repeat: int) -> float:
    """Seconds per call of ``fn`` (one warm-up call, then ``repeat`` timed, device synchronised)."""
    fn()
    gs.sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    gs.sync(device)
    return (time.perf_counter() - t) / repeat


def section_generate(scale, device, repeat: int) -> dict:
    from cardiomotion.generate.engine import SampleEngine

    out: dict = {"grid": list(scale.gen_grid), "precision": "bf16" if device.type == "cuda" else "fp32"}
    with tempfile.TemporaryDirectory(prefix="gpu-profile-") as name:
        blobs, frames, window, bpp = gs.random_generator(scale, Path(name))
    spec = {"seed": 0, "temperature": 2.0, "window": list(window), "flow_dtype": "float16",
            "model_uri": "random", "model_sha256": "random"}
    engine = SampleEngine(blobs, frames, spec, device, out["precision"], channels_last=True)
    out["bytes_per_sample"] = bpp
    rows = []
    for batch in scale.profile_batches:
        idx = list(range(batch))
        row: dict = {"batch": batch}
        row["decode_block_s"] = _timed(lambda: engine.decode_block(idx), device, repeat)
        row["device_work_s"] = _timed(lambda: engine.decode_on_device(idx), device, repeat)
        row["latents_cpu_s"] = _timed(lambda: engine.latents(idx), device, repeat)
        _, ed, flow = engine.decode_on_device(idx)
        row["copy_pageable_s"] = _timed(lambda: (ed.cpu().numpy(), flow.cpu().numpy()), device, repeat)
        if device.type == "cuda":
            ed_h = torch.empty(ed.shape, dtype=ed.dtype, pin_memory=True)
            flow_h = torch.empty(flow.shape, dtype=flow.dtype, pin_memory=True)

            def pinned():
                ed_h.copy_(ed, non_blocking=True)
                flow_h.copy_(flow, non_blocking=True)
                torch.cuda.current_stream().synchronize()
            row["copy_pinned_s"] = _timed(pinned, device, repeat)
            with gs.cudnn_flags_restored():
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
                was, engine.deterministic = engine.deterministic, False  # lift the engine's own scope to time autotuning
                try:
                    row["device_work_autotuned_s"] = _timed(lambda: engine.decode_on_device(idx), device, repeat)
                finally:
                    engine.deterministic = was
        gb = (ed.numel() * ed.element_size() + flow.numel() * flow.element_size()) / 1e9  # what is copied
        row["samples_per_s"] = {k[:-2]: round(batch / v, 1) for k, v in row.items() if k.endswith("_s")}
        row["copy_gb_per_s"] = {k: round(gb / row[k + "_s"], 2) for k in ("copy_pageable", "copy_pinned") if k + "_s" in row}
        rows.append(row)
    out["blocks"] = rows
    return out


def section_train(scale, device, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from train_throughput import Run, make_volumes

    from cardiomotion.train.recipe import StepRecipe

    grid = scale.train_grids[0]
    cfg = gs.step_settings_for(grid, scale.batch)
    es, flow = make_volumes(max(2 * scale.batch, 8), grid, seed=0)
    if device.type == "cuda":
        es, flow = es.to(device), flow.to(device)
    run = Run(StepRecipe.for_device(device), cfg, scale.channels, device)
    run.train(es, flow, 3)  # warm-up: autotuning, allocator
    gs.sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        run.train(es, flow, steps)
        gs.sync(device)
    wall = (time.perf_counter() - t) / steps
    plain = _timed(lambda: run.train(es, flow, steps), device, 1) / steps
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels) / steps
    top = sorted(events, key=lambda e: getattr(e, dev_attr), reverse=True)[:15]
    return {
        "grid": list(grid), "batch": scale.batch, "steps": steps,
        "step_s_profiled": round(wall, 4), "step_s_plain": round(plain, 4),
        "device_busy_s_per_step": round(busy_us / 1e6, 4),
        "device_busy_fraction": round(busy_us / 1e6 / plain, 3) if device.type == "cuda" else None,
        "kernels_per_step": round(len(kernels) / steps, 1),
        "host_ms_per_step_top": [{"op": e.key, "cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3)}
                                 for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]],
        "top_device_ops": [{"op": e.key, "device_ms_per_step": round(getattr(e, dev_attr) / 1e3 / steps, 3),
                            "calls_per_step": round(e.count / steps, 1)} for e in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_profile_out")
    ap.add_argument("--smoke", action="store_true", help="tiny grids on the CPU")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print(json.dumps({"status": "skipped", "reason": "no CUDA device"}))
        return
    base = gs.SMOKE if args.smoke else gs.FULL
    scale = type("S", (), {**{f: getattr(base, f) for f in base.__dataclass_fields__},
                           "profile_batches": (2, 4) if args.smoke else (16, 64)})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    t0 = time.perf_counter()
    res["generate"] = section_generate(scale, device, repeat=2 if args.smoke else 8)  # restores cuDNN's flags itself
    res["train"] = section_train(scale, device, steps=2 if args.smoke else 10)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    (out_dir / "gpu_profile.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
