"""Generation throughput: the reference path against the project's pipeline, and flat memory.

Side by side in one run, on the same model, ES frames and latents:

* reference decode+warp: one sample at a time, fp32, contiguous, no pipelining (decode → warp
  → quantise → host), and the reference *with the writer* (then serialise + append to a tar, in
  the same thread);
* optimized decode+warp: :class:`cardiomotion.generate.engine.SampleEngine` on blocks of
  ``--batch`` latents (bf16 autocast + channels_last_3d on a GPU, fp32 on a CPU);
* whole pipeline in one process: ``write_shard`` (decode overlapped with a writer thread,
  tar + sha256 + fsync + rename);
* the Ray Data job (``generate_corpus``) in a fresh subprocess at two corpus sizes, which
  also gives the peak RSS of the driver (``ru_maxrss``) and of the actor (sampled after each
  block) at each size: flat memory means the larger corpus does not need more.

Samples/s and MB/s (stored bytes: int16 ES and ED_syn, float16 flow). Prints one JSON document.

Defaults run on a CPU in a few minutes: a random-weight model (channels 8,16,32, 32³). For a GPU
at the paper's grid: ``--grid 96,96,64 --channels 16,32,64,96,128 --batch 16 --n 512``, or
``--model runs:/<id>/model --prepared DIR --config FILE`` for a trained model.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform as _platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# torch + numpy only at import: bench/gpu_suite.py reuses these paths where pydantic, Ray and nibabel are missing
from cardiomotion.generate.engine import SampleEngine, npy_bytes, sample_seed, scan_indices  # noqa: E402
from cardiomotion.generate.shards import write_shard  # noqa: E402
from cardiomotion.generate.model import load_networks  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(n: int, seconds: float, bytes_per_sample: int) -> dict:
    return {"samples": n, "seconds": round(seconds, 4), "samples_per_s": round(n / seconds, 3),
            "mb_per_s": round(n * bytes_per_sample / 2**20 / seconds, 3)}


@torch.no_grad()
def reference(blobs, frames, window, seed: int, n: int, device, writer: bool, tmp: Path, bpp: int) -> dict:
    """One sample at a time, fp32, no batching, no overlap (optionally + serialise + tar), with the
    engine's deterministic cuDNN (like for like: the engine scopes it to its own calls)."""
    from cardiomotion.generate.engine import deterministic_cudnn

    with deterministic_cudnn(torch.device(device).type == "cuda"):
        return _reference(blobs, frames, window, seed, n, device, writer, tmp, bpp)


def _reference(blobs, frames, window, seed: int, n: int, device, writer: bool, tmp: Path, bpp: int) -> dict:
    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.flow.warp import warp

    model, pyramid = load_networks(blobs, device)
    es_all = torch.from_numpy(frames["es"].astype(np.float32))[:, None].to(device)
    latent = model.latent_shape(frames["es"].shape[1:])
    scans = scan_indices(seed, len(frames["scan_ids"]), range(n))
    tar = tarfile.open(tmp / f"reference_{writer}.tar", "w") if writer else None
    # warm-up (cuDNN/allocator), not timed
    es = es_all[:1]
    model.decode(torch.zeros((1, *latent), device=device), hu_to_unit(es, window), pyramid(hu_to_unit(es, window)))
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        es = es_all[int(scans[i]):int(scans[i]) + 1]
        es_unit = hu_to_unit(es, window)
        feats = pyramid(es_unit)  # the reference recomputes the conditioning per sample
        z = torch.randn((1, *latent), generator=torch.Generator().manual_seed(sample_seed(seed, i))).to(device)
        flow = model.decode(z, es_unit, feats)
        ed = warp(es, flow)
        flow_np = flow[0].half().cpu().numpy()
        ed_np = ed[0, 0].round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()
        if tar is not None:
            for name, data in ((f"{i:09d}.es.npy", npy_bytes(frames["es"][scans[i]])),
                               (f"{i:09d}.ed_syn.npy", npy_bytes(ed_np)), (f"{i:09d}.flow.npy", npy_bytes(flow_np))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()
    _sync(device)
    return _rate(n, time.perf_counter() - t0, bpp)


def optimized_decode_warp(engine: SampleEngine, n: int, batch: int, device, bpp: int) -> dict:
    engine.decode_block(list(range(min(batch, n))))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        engine.decode_block(list(range(s, min(s + batch, n))))
    _sync(device)
    return _rate(n, time.perf_counter() - t0, bpp)


def optimized_pipeline(engine: SampleEngine, n: int, batch: int, tmp: Path, bpp: int) -> dict:
    out = tmp / "pipeline"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    rec = write_shard(out, 0, n, n, batch, engine, "bench", "bench")
    seconds = time.perf_counter() - t0
    return {**_rate(n, seconds, bpp), "decode_seconds": round(rec["decode_seconds"], 4),
            "written_mb_per_s": round(rec["bytes"] / 2**20 / seconds, 3)}


def _child(args) -> None:
    """Subprocess: one Ray Data generation run; prints its figures as JSON."""
    import resource

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from cardiomotion.config import load_config
    from cardiomotion.generate import generate_corpus

    spec = json.loads(args.child)
    cfg = load_config(spec["config"], spec["overrides"])
    t0 = time.perf_counter()
    man = generate_corpus(spec["model"], spec["prepared"], spec["out"], spec["n"], seed=0, cfg=cfg, track=False)
    wall = time.perf_counter() - t0
    run = json.loads(Path(man).read_text())["run"]
    print(json.dumps({"n": spec["n"], "wall_s_incl_ray_start": round(wall, 3),
                      "samples_per_s": round(run["samples_per_s"], 3), "mb_per_s": round(run["mb_per_s"], 3),
                      "pipeline_seconds": round(run["seconds"], 3), "actors": run["actors"],
                      "steady_samples_per_s": round(run["steady_samples_per_s"], 3),
                      "steady_mb_per_s": round(run["steady_samples_per_s"] * run["bytes"] / max(run["generated"], 1)
                                               / 2**20, 3),
                      "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "actor_peak_rss_mb": round(run["actor_peak_rss_mb"], 1)}))


def ray_runs(args, model: str, prepared: str, tmp: Path) -> list[dict]:
    out = []
    for n in args.rss_sizes:
        overrides = {"storage_root": str(tmp / "store"), "ray": {"dashboard": False},
                     "generate": {"shard_size": args.shard_size, "batch_size": args.batch, "previews": 0,
                                  **({"actors": args.actors} if args.actors else {})}}
        if args.cpus:
            overrides["ray"]["num_cpus"] = args.cpus
        spec = {"config": args.config, "overrides": overrides, "model": model, "prepared": prepared,
                "out": str(tmp / f"corpus_{n}"), "n": n}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if proc.returncode != 0:
            raise SystemExit(f"ray run with n={n} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="32", help="I or I,J,K (random model only)")
    ap.add_argument("--channels", default="8,16,32", help="pyramid/CVAE channels (random model only)")
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--model", help="trained model (runs:/<id>/model or folder) instead of a random one")
    ap.add_argument("--prepared", help="prepared data on the model's grid (default: synthetic frames)")
    ap.add_argument("--config", help="YAML config (tracking store for --model URIs, generate.precision …)")
    ap.add_argument("--n", type=int, default=48, help="samples for the optimized measurements")
    ap.add_argument("--ref-n", type=int, default=16, help="samples for the reference path")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--rss-sizes", default="16,256", help="two corpus sizes for the Ray runs (peak RSS)")
    ap.add_argument("--actors", type=int, help="Ray actors (default: generate.actors / one per GPU or CPU)")
    ap.add_argument("--cpus", type=int, help="num_cpus of the embedded Ray in the subprocess runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the in-process measurements (best of)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray subprocess runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    from cardiomotion.config import load_config
    from cardiomotion.generate.conditioning import load_frames
    from cardiomotion.generate.model import resolve_model

    args.rss_sizes = [int(x) for x in args.rss_sizes.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    cfg = load_config(args.config)
    from cardiomotion.generate.synthetic import make_random_model_dir, make_synthetic_prepared

    with tempfile.TemporaryDirectory(prefix="genbench-") as tmpname:
        tmp = Path(tmpname)
        if args.model:
            resolved = resolve_model(args.model, cfg)
            grid = resolved.grid
            model_src = args.model
        else:
            g = [int(x) for x in args.grid.split(",")]
            grid = tuple(g * 3 if len(g) == 1 else g)
            chans = tuple(int(c) for c in args.channels.split(","))
            model_src = str(make_random_model_dir(tmp / "model", grid=grid, channels=chans,
                                                  latent_channels=args.latent_channels, spacing_mm=4.0))
            resolved = resolve_model(model_src, cfg)
        prepared = args.prepared or str(make_synthetic_prepared(tmp / "prepared", n_scans=4, grid=grid,
                                                                spacing_mm=float(resolved.meta.get("spacing_mm", 4.0))))
        frames = load_frames(prepared)
        blobs = resolved.blobs()
        g = cfg.generate
        bpp = int(np.prod(grid)) * (2 + 2 + (2 if g.flow_dtype == "float16" else 4) * 3)
        spec = {"seed": 0, "temperature": 1.0, "window": list(resolved.window), "flow_dtype": g.flow_dtype,
                "model_uri": model_src, "model_sha256": resolved.cvae_sha256}
        engine = SampleEngine(blobs, frames, spec, device, g.precision, g.channels_last)
        best: dict[str, dict] = {}
        for _ in range(args.repeat):  # rounds interleave the paths: drifting load hits all of them alike
            for name, fn in (
                ("ref", lambda: reference(blobs, frames, resolved.window, 0, args.ref_n, device, False, tmp, bpp)),
                ("ref_w", lambda: reference(blobs, frames, resolved.window, 0, args.ref_n, device, True, tmp, bpp)),
                ("opt", lambda: optimized_decode_warp(engine, args.n, args.batch, device, bpp)),
                ("pipe", lambda: optimized_pipeline(engine, args.n, args.batch, tmp, bpp)),
            ):
                r = fn()
                if name not in best or r["samples_per_s"] > best[name]["samples_per_s"]:
                    best[name] = r
        ref, ref_w, opt, pipe = best["ref"], best["ref_w"], best["opt"], best["pipe"]
        result = {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                                  f"{args.threads} torch thread(s))",
            "host": _platform.node(), "torch": torch.__version__,
            "model": "random weights" if not args.model else args.model, "grid": list(grid),
            "channels": list(resolved.meta["cvae"]["channels"]) if "cvae" in resolved.meta else None,
            "batch": args.batch, "precision": g.precision if device.type == "cuda" else "fp32",
            "repeat": f"best of {args.repeat} interleaved rounds (in-process paths); Ray runs once per size",
            "note": "the reference recomputes the frozen pyramid per sample, as model.sample(es, pyramid(es)) does",
            "bytes_per_sample": bpp,
            "reference": {"decode_warp": ref, "with_writer": ref_w},
            "optimized": {"decode_warp": opt, "pipeline_one_process": pipe},
            "speedup": {"decode_warp": round(opt["samples_per_s"] / ref["samples_per_s"], 2),
                        "pipeline_vs_reference_with_writer": round(pipe["samples_per_s"] / ref_w["samples_per_s"], 2)},
        }
        if not args.no_ray:
            runs = ray_runs(args, model_src, prepared, tmp)
            result["ray_pipeline"] = runs[-1]
            result["speedup"]["ray_pipeline_vs_reference_with_writer"] = round(
                runs[-1]["samples_per_s"] / ref_w["samples_per_s"], 2)
            result["speedup"]["ray_pipeline_steady_vs_reference_with_writer"] = round(
                runs[-1]["steady_samples_per_s"] / ref_w["samples_per_s"], 2)
            result["peak_rss_mb"] = [{**{k: r[k] for k in ("n", "driver_peak_rss_mb", "actor_peak_rss_mb")},
                                      "corpus_mb": round(r["n"] * bpp / 2**20, 1)} for r in runs]
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
