"""Corpus ingest: Ray Data into a Ray Train loop against reading the shards directly, and
on-the-fly generation against reading a materialised corpus. Prints one JSON document.

Side by side in one run, on one corpus (a random-weight model on synthetic frames, written by
``generate_corpus``):

* ``direct`` — one process streams the tar shards (:func:`cardiomotion.generate.corpus.iter_shard`);
* ``ray_data`` — ``open_corpus(DIR).ray_dataset()`` (``ray.data.read_webdataset``) iterated as
  torch batches in the driver;
* ``ray_train`` — the same dataset passed to a ``TorchTrainer`` and read in the worker through
  ``ray.train.get_dataset_shard`` (one epoch, samples/s measured inside the worker);
* ``on_the_fly`` — ``open_virtual_corpus(...).ray_dataset()``: the same samples decoded by an
  actor pool instead of read from disk.

Defaults run on a 2-core CPU in a few minutes (32³, 256 samples); e.g.
``python bench/corpus_ingest.py --grid 16 --n 1024 --batch 16``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _rate(n: int, seconds: float, bytes_per_sample: int) -> dict:
    return {"samples": n, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 2),
            "mb_per_s": round(n * bytes_per_sample / 2**20 / seconds, 2)}


def _train_loop(config: dict) -> dict:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    # one pass = one epoch; the shard order is reshuffled each time
    rates = _passes(lambda: shard.iter_torch_batches(batch_size=config["batch"],
                                                     local_shuffle_buffer_size=config["buffer"]),
                    config["passes"], config["bytes_per_sample"])
    ray.train.report({"passes": rates["passes"]})
    return rates


def _passes(make_iter, passes: int, bytes_per_sample: int) -> dict:
    """Iterate ``make_iter()`` ``passes`` times: the first pass pays Ray Data's start-up (read
    tasks, actor pools), later ones are what every further epoch of a training loop sees."""
    rates = []
    for _ in range(passes):
        t0, n = time.perf_counter(), 0
        for batch in make_iter():
            n += int(batch["flow"].shape[0])
        rates.append(_rate(n, time.perf_counter() - t0, bytes_per_sample))
    return {**rates[-1], "first_pass": rates[0], "passes": len(rates)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=64, help="local shuffle buffer of the Train loop (samples)")
    ap.add_argument("--cpus", type=int, default=2, help="num_cpus of the embedded Ray")
    ap.add_argument("--passes", type=int, default=2, help="epochs over the corpus per path; the last one is reported "
                                                           "(the first, with Ray Data's start-up, as first_pass)")
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error("--passes must be at least 1")

    import numpy as np
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cardiomotion.config import load_config
    from cardiomotion.generate import generate_corpus, open_corpus, open_virtual_corpus
    from cardiomotion.generate.corpus import iter_shard
    from cardiomotion.generate.synthetic import make_random_model_dir, make_synthetic_prepared
    from cardiomotion.raycluster import init_ray

    grid = (args.grid,) * 3
    bpp = int(np.prod(grid)) * (2 + 2 + 2 * 3)
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmpname:
        tmp = Path(tmpname)
        cfg = load_config(None, {"storage_root": str(tmp / "store"), "ray": {"num_cpus": args.cpus, "dashboard": False},
                                 "generate": {"shard_size": args.shard_size, "batch_size": args.batch, "previews": 0,
                                              "actors": 1}})
        model = make_random_model_dir(tmp / "model", grid=grid, channels=(8, 16), latent_channels=4)
        prepared = make_synthetic_prepared(tmp / "prepared", n_scans=4, grid=grid)
        init_ray(cfg.ray)
        t0 = time.perf_counter()
        generate_corpus(str(model), prepared, tmp / "corpus", args.n, seed=0, cfg=cfg, track=False)
        gen_s = time.perf_counter() - t0
        corpus = open_corpus(tmp / "corpus")

        t0, n = time.perf_counter(), 0
        for k in range(len(corpus.shards)):
            for _ in iter_shard(corpus.shard_path(k)):
                n += 1
        direct = _rate(n, time.perf_counter() - t0, bpp)

        dataset = corpus.ray_dataset(shuffle_seed=0).drop_columns(["scan_id"])
        ray_data = _passes(lambda: dataset.iter_torch_batches(batch_size=args.batch), args.passes, bpp)

        trainer = TorchTrainer(_train_loop, train_loop_config={"batch": args.batch, "buffer": args.buffer,
                                                                  "passes": args.passes, "bytes_per_sample": bpp},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                               datasets={"train": corpus.ray_dataset(shuffle_seed=0).drop_columns(["scan_id"])},
                               run_config=RunConfig(name="ingest", storage_path=str(tmp / "train")))
        t0 = time.perf_counter()
        res = trainer.fit()
        wall = time.perf_counter() - t0
        ray_train = {**res.return_value, "fit_wall_s_incl_startup": round(wall, 2)}

        virtual = open_virtual_corpus(str(model), prepared, args.n, seed=0, cfg=cfg)
        virtual_ds = virtual.ray_dataset(actors=1).drop_columns(["scan_id"])
        on_the_fly = _passes(lambda: virtual_ds.iter_torch_batches(batch_size=args.batch), args.passes, bpp)
        ray.shutdown()
    out = {
        "bench": "corpus_ingest", "grid": list(grid), "n": args.n, "batch": args.batch, "shard_size": args.shard_size,
        "bytes_per_sample": bpp, "cpus": args.cpus, "generate_wall_s": round(gen_s, 2),
        "direct": direct, "ray_data": ray_data, "ray_train": ray_train, "on_the_fly": on_the_fly,
        "ratios": {"ray_data_vs_direct": round(ray_data["samples_per_s"] / direct["samples_per_s"], 3),
                   "ray_train_vs_direct": round(ray_train["samples_per_s"] / direct["samples_per_s"], 3),
                   "on_the_fly_vs_ray_data": round(on_the_fly["samples_per_s"] / ray_data["samples_per_s"], 3)},
        "passes": args.passes,
        "notes": ["every path reads each of the n samples once per pass; the figures are the last pass's, "
                  "first_pass includes Ray Data's start-up",
                  "ray_train: samples/s inside the worker (get_dataset_shard + iter_torch_batches); "
                  "fit_wall_s_incl_startup adds the trainer start-up",
                  "on_the_fly decodes on one CPU actor here: compare with generate's decode rate, not disk"],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
