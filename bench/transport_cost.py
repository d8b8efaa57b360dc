"""What motion transport costs per pair as the grid grows: registration, conjugation, pool memory.

``train.transport_partners`` and the ``transport`` utility arm register the ES frames of two
training scans (demons, :data:`cardiomotion.train.transport.TRANSPORT_ITERATIONS` per level) and
carry the partner's motion through the correspondence (:func:`~cardiomotion.train.transport.transport_flow`:
one inversion, two compositions). The schedule was chosen at 32³ (docs/results/motion_transport/probe.md);
this bench times it at larger grids, side by side with the reference path — the demons baseline's
default schedule (400/200/100), which the probe found no more accurate — on the same pairs, in one
run, so the ratio holds on a noisy machine.

Two scans' ES frames of a prepared folder are resampled (trilinear) to each grid with the spacing
scaled to keep the field of view; their annotated flows likewise, in voxels of the new grid.

    python bench/transport_cost.py --prepared P --flows A46_001 --grids 32,64,96 --pairs 2

JSON on stdout: per grid the seconds per pair of each schedule (mean over pairs), their ratio, the
seconds of the conjugation, and the bytes a pool of ``--partners`` k holds per training scan
(1 + k ES frames and flows, float32, as :class:`~cardiomotion.train.transport.TransportPool` keeps them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", required=True, help="a prepared folder (its first scans' ES frames are used)")
    ap.add_argument("--flows", required=True, help="their annotation folder (the partner's motion)")
    ap.add_argument("--grids", default="32,64,96", help="cubic grids to time, comma separated")
    ap.add_argument("--pairs", type=int, default=2, help="ordered scan pairs timed per grid (scans 0..pairs)")
    ap.add_argument("--reference", default="400,200,100", help="the reference demons schedule (per level)")
    ap.add_argument("--partners", type=int, default=4, help="k of the pool-memory figure")
    ap.add_argument("--threads", type=int, default=1, help="SimpleITK threads (transport uses 1 per worker)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.errors import CardiomotionError
    from cardiomotion.flow.io import read_flow
    from cardiomotion.layout import flow_path
    from cardiomotion.config import load_config
    from cardiomotion.train.transport import TRANSPORT_ITERATIONS, register_frames, transport_flow

    try:
        window = load_config(None).intensity.window
        rows = sorted(read_scan_table(args.prepared).to_dict("records"), key=lambda r: str(r["scan_id"]))
        if len(rows) < args.pairs + 1:
            raise CardiomotionError(f"{args.prepared}: {len(rows)} scans, {args.pairs + 1} needed for {args.pairs} pairs")
        scans = []
        for r in rows[:args.pairs + 1]:
            pair = load_pair(args.prepared, r, with_truth=False)
            flow, _ = read_flow(flow_path(args.flows, str(r["scan_id"])))
            if len(set(pair.es.shape)) != 1:
                raise CardiomotionError(f"{args.prepared}: scan {r['scan_id']} is on a {pair.es.shape} grid; the bench "
                                        "resamples cubic grids only (one spacing keeps the field of view)")
            scans.append((hu_to_unit(torch.from_numpy(pair.es).float(), tuple(window)), torch.from_numpy(flow).float(),
                          float(pair.spacing_mm), pair.es.shape))
        reference = tuple(_ints(args.reference))
    except (CardiomotionError, OSError, ValueError) as exc:
        print(f"transport_cost: {exc}", file=sys.stderr)
        return 2

    out = {"pairs": args.pairs, "threads": args.threads, "transport_iterations": list(TRANSPORT_ITERATIONS),
           "reference_iterations": list(reference), "grids": []}
    for g in _ints(args.grids):
        def resample(es, flow, spacing, shape):
            scale = [g / n for n in shape]
            es_g = F.interpolate(es[None, None], size=(g, g, g), mode="trilinear", align_corners=False)[0, 0]
            fl_g = F.interpolate(flow[None], size=(g, g, g), mode="trilinear", align_corners=False)[0]
            fl_g = fl_g * torch.tensor(scale).view(3, 1, 1, 1)  # voxels of the new grid
            return es_g.numpy(), fl_g, spacing * shape[0] / g

        grid_scans = [resample(*s) for s in scans]
        t_ours, t_ref, t_conj = [], [], []
        for n in range(args.pairs):
            (es_i, _, sp), (es_j, fl_j, _) = grid_scans[n + 1], grid_scans[n]
            t0 = time.perf_counter()
            p = register_frames(es_i, es_j, sp, threads=args.threads)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            register_frames(es_i, es_j, sp, iterations=reference, threads=args.threads)
            t_ref.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            w = transport_flow(fl_j[None], torch.from_numpy(p)[None])
            t_conj.append(time.perf_counter() - t0)
            assert torch.isfinite(w).all()
        ours, ref = float(np.mean(t_ours)), float(np.mean(t_ref))
        row = {"grid": g, "transport_s_per_pair": round(ours, 3), "reference_s_per_pair": round(ref, 3),
               "reference_over_transport": round(ref / ours, 2), "conjugation_s_per_pair": round(float(np.mean(t_conj)), 3),
               "pool_bytes_per_scan": (1 + args.partners) * 4 * g ** 3 * 4}
        out["grids"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
