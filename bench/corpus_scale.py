"""Corpus scale run: N samples through the whole Ray generation pipeline, read back through Ray Data.

For each corpus size N (default 10 000 and 100 000 at a 16³ grid), in fresh subprocesses so that
each peak RSS belongs to one run:

1. **generate** — ``generate_corpus`` (Ray Data actor pool, tar shards, manifest with per-shard
   sha256): wall time, samples/s, MB/s, the driver's peak RSS (``ru_maxrss``), the actors' RSS
   after every shard (first, last and peak: flat memory means the last shard needs no more than
   the first);
2. **read back** — ``open_corpus(DIR).ray_dataset()`` (``ray.data.read_webdataset``) iterated in
   batches by the driver: rows counted, every ``index`` checked to be unique and the set to be
   exactly 0 … N − 1, samples/s, the reader's peak RSS; then ``Corpus.verify()`` re-hashes every
   shard against the manifest.

Prints one JSON document (and writes it to ``--out`` if given). A random-weight model
(:mod:`cardiomotion.generate.synthetic`) and synthetic prepared frames stand in for a trained
model: the pipeline does the same work per sample. Example (the README's run)::

    python bench/corpus_scale.py --sizes 10000,100000 --grid 16 --work /tmp/scale --out scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _generate(spec: dict) -> dict:
    from cardiomotion.config import load_config
    from cardiomotion.generate import generate_corpus

    cfg = load_config(None, spec["overrides"])
    t0 = time.perf_counter()
    man = generate_corpus(spec["model"], spec["prepared"], spec["corpus"], spec["n"], seed=0, cfg=cfg, track=False)
    wall = time.perf_counter() - t0
    manifest = json.loads(Path(man).read_text())
    run = manifest["run"]
    rss = run.get("actor_rss_mb_by_shard") or [0.0]
    return {"wall_s_incl_ray_start": round(wall, 2), "pipeline_seconds": round(run["seconds"], 2),
            "samples_per_s": round(run["samples_per_s"], 1), "mb_per_s": round(run["mb_per_s"], 2),
            "actors": run["actors"], "shards": len(manifest["shards"]), "bytes": int(run["bytes"]),
            "driver_peak_rss_mb": _peak_rss_mb(), "actor_rss_mb_first_shard": rss[0],
            "actor_rss_mb_last_shard": rss[-1], "actor_peak_rss_mb": round(run["actor_peak_rss_mb"], 1)}


def _read(spec: dict) -> dict:
    import numpy as np
    import ray

    from cardiomotion.config import load_config
    from cardiomotion.generate import open_corpus
    from cardiomotion.raycluster import init_ray

    init_ray(load_config(None, spec["overrides"]).ray)
    corpus = open_corpus(spec["corpus"])
    n = len(corpus)
    seen = np.zeros(n, dtype=np.int64)  # how often each index came back (8 bytes per sample)
    rows = 0
    t0 = time.perf_counter()
    for batch in corpus.ray_dataset().iter_batches(batch_size=256, batch_format="numpy"):
        idx = np.asarray(batch["index"], dtype=np.int64)
        if idx.min() < 0 or idx.max() >= n:
            raise SystemExit(f"read back an index outside 0 … {n - 1}")
        np.add.at(seen, idx, 1)
        rows += len(idx)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    t1 = time.perf_counter()
    bad = corpus.verify()
    return {"rows": rows, "unique": int((seen > 0).sum()), "duplicates": int((seen > 1).sum()),
            "missing": int((seen == 0).sum()), "exactly_n_unique": bool(rows == n and (seen == 1).all()),
            "ray_data_seconds": round(seconds, 2), "ray_data_samples_per_s": round(rows / seconds, 1),
            "reader_peak_rss_mb": _peak_rss_mb(), "shards_verified": len(corpus.shards) - len(bad),
            "shards_bad": bad, "verify_seconds": round(time.perf_counter() - t1, 2)}


def _run_child(mode: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                          "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"corpus_scale: the {mode} run with n={spec['n']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="corpus sizes N, comma-separated")
    ap.add_argument("--grid", type=int, default=16, help="cubic grid of the random model and frames")
    ap.add_argument("--channels", default="8,16", help="pyramid/CVAE channels of the random model")
    ap.add_argument("--scans", type=int, default=8, help="synthetic ES frames the samples are drawn from")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64, help="latents decoded together")
    ap.add_argument("--actors", type=int, help="actor pool size (default: one per CPU)")
    ap.add_argument("--work", help="scratch folder (corpora are written here; ~46 KB per sample at 16³)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora (default: each is deleted after its read)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, spec = args.child
        print(json.dumps((_generate if mode == "generate" else _read)(json.loads(spec))))
        return

    if not args.work:
        ap.error("--work is required")
    from cardiomotion.generate.synthetic import make_random_model_dir, make_synthetic_prepared

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    grid = (args.grid,) * 3
    model = make_random_model_dir(work / "model", grid=grid, channels=[int(c) for c in args.channels.split(",")])
    prepared = make_synthetic_prepared(work / "prepared", n_scans=args.scans, grid=grid)
    overrides = {"storage_root": str(work / "store"), "ray": {"dashboard": False},
                 "generate": {"shard_size": args.shard_size, "batch_size": args.batch, "previews": 0,
                              **({"actors": args.actors} if args.actors else {})}}
    result = {"bench": "corpus_scale", "grid": list(grid), "channels": args.channels, "scans": args.scans,
              "shard_size": args.shard_size, "batch": args.batch, "cpus": os.cpu_count(),
              "machine": _platform.platform(), "runs": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        spec = {"overrides": overrides, "model": str(model), "prepared": str(prepared),
                "corpus": str(work / f"corpus_{n}"), "n": n}
        run = {"n": n, "generate": _run_child("generate", spec), "read": _run_child("read", spec)}
        run["disk_gb"] = round(run["generate"]["bytes"] / 1e9, 3)
        result["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work / f"corpus_{n}", ignore_errors=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
