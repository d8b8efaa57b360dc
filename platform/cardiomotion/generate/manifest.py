"""``manifest.json``: written last, when every shard of the corpus is complete (docs/corpus.md)."""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..layout import MANIFEST, SAMPLE_MEMBERS
from .engine import FORMAT, FORMAT_VERSION, num_shards
from .identity import finished_shard, now_utc
from .model import ResolvedModel


def write_manifest(out: Path, n: int, plan: dict, resolved: ResolvedModel, frames: dict, identity: dict,
                    ident_sha: str, seed: int, temperature: float, cfg: Config, stats: dict,
                    run_id: str | None) -> Path:
    from ..fileio import write_json

    g = cfg.generate
    shards = []
    per_scan: dict[str, int] = {s: 0 for s in frames["scan_ids"]}
    devices = set()
    for k in range(num_shards(n, g.shard_size)):
        rec = finished_shard(out, k, n, g.shard_size, ident_sha, "size")
        if rec is None:
            raise RuntimeError(f"shard {k} is missing or incomplete after the run")
        shards.append({key: rec[key] for key in ("index", "name", "first", "count", "bytes", "sha256", "device")})
        for sid, c in rec["scan_counts"].items():
            per_scan[sid] = per_scan.get(sid, 0) + int(c)
        devices.add(rec["device"])
    total = sum(s["count"] for s in shards)
    if total != n:
        raise RuntimeError(f"shards hold {total} samples, expected {n}")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "created": now_utc(),
        "n": n, "n_shards": len(shards), "shard_size": g.shard_size, "batch_size": g.batch_size,
        "seed": seed, "temperature": temperature,
        "model": {"uri": plan["model_uri"], "cvae_sha256": resolved.cvae_sha256,
                  "pyramid_sha256": resolved.pyramid_sha256, "meta": resolved.meta,
                  **({"tracking_uri": resolved.store} if resolved.store else {})},
        "prepared": plan["prepared"],
        "grid": identity["grid"], "spacing_mm": frames["spacing_mm"], "intensity_window": list(resolved.window),
        "dtypes": {"es": "int16", "ed_syn": "int16", "flow": g.flow_dtype},
        "members": list(SAMPLE_MEMBERS), "key_format": "9-digit zero-padded sample index",
        "convention": "flow: pull field on the ED grid in voxels, channel c along array axis c; "
                      "ED_syn = round(warp(ES, flow)) in HU; affine = the grid's RAS affine (mm)",
        "scans": [{"scan_id": s, "es_sha256": h, "affine": a.tolist(), "count": per_scan.get(s, 0), **prov}
                  for s, h, a, prov in zip(frames["scan_ids"], frames["es_sha256"], frames["affines"],
                                           frames.get("provenance") or [{}] * len(frames["scan_ids"]))],
        "counts": {"samples": n, "shards": len(shards), "bytes": int(sum(s["bytes"] for s in shards)),
                   "per_scan": per_scan},
        "devices": sorted(devices),
        "config": g.model_dump(mode="json"),
        "identity": identity, "identity_sha256": ident_sha,
        "run": {"mlflow_run_id": run_id, **{k: v for k, v in stats.items() if k != "shards"}},
        "shards": shards,
    }
    return write_json(out / MANIFEST, manifest)
