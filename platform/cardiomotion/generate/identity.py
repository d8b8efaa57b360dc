"""What a corpus is, and who may write it: its identity (model hashes, seed, settings, scans), the
refusal of a folder holding another corpus, the writer's lock, and which shards are complete.

A corpus folder (docs/corpus.md) is only ever finished by a run with the same identity; anything
else is refused with one line before any work (:func:`check_out`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import InputError
from ..layout import CORPUS_PLAN as PLAN, FRAMES, GENERATE_LOCK as LOCK, MANIFEST, SHARD_GLOB, shard_name, sidecar_name
from .engine import FORMAT, FORMAT_VERSION, num_shards, shard_range
from .model import ResolvedModel


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def corpus_identity(resolved: ResolvedModel, frames: dict[str, Any], seed: int, temperature: float, cfg: Config) -> dict:
    g = cfg.generate
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model_cvae_sha256": resolved.cvae_sha256, "model_pyramid_sha256": resolved.pyramid_sha256,
        "seed": int(seed), "temperature": float(temperature), "shard_size": g.shard_size,
        "batch_size": g.batch_size, "flow_dtype": g.flow_dtype, "precision": g.precision,
        "grid": [int(n) for n in frames["es"].shape[1:]], "window": list(resolved.window),
        "scans": [{"scan_id": s, "es_sha256": h} for s, h in zip(frames["scan_ids"], frames["es_sha256"])],
    }


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def refuse_other_corpus(out: Path, found: dict, want: dict) -> None:
    """InputError naming what differs between an existing corpus' identity and this run's."""
    if found.get("model_cvae_sha256") != want["model_cvae_sha256"] or \
            found.get("model_pyramid_sha256") != want["model_pyramid_sha256"]:
        theirs, ours = str(found.get("model_cvae_sha256"))[:12], want["model_cvae_sha256"][:12]
        raise InputError(out, f"holds a corpus made with another model (cvae sha256 {theirs}…, this model "
                              f"{ours}…); it is never overwritten or mixed: use another --out")
    if found.get("seed") != want["seed"]:
        raise InputError(out, f"holds a corpus made with seed {found.get('seed')}, not {want['seed']}; "
                              "it is never overwritten or mixed: use another --out")
    keys = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
    shown = ", ".join(f"{k}: {found.get(k)!r} → {want.get(k)!r}" if k != "scans" else "the prepared scans differ"
                      for k in keys)
    raise InputError(out, f"holds a corpus made with other settings ({shown}); it is never overwritten or "
                          "mixed: rerun with the same settings to finish it, or use another --out")


def is_temp(p: Path) -> bool:
    return p.name.startswith(".") and ".tmp" in p.name


def check_out(out: Path, identity: dict, n: int, shard_size: int) -> dict | None:
    """Refuse an --out that is not this corpus (or empty); return the existing plan, if any."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; use another --out")
    if not out.exists():
        return None
    plan_path = out / PLAN
    plan = None
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
            found = plan["identity"]
        except (ValueError, KeyError):
            raise InputError(plan_path, "unreadable corpus plan; use another --out") from None
        if found != identity:
            if any(out.glob(SHARD_GLOB)) or (out / MANIFEST).is_file():
                refuse_other_corpus(out, found, identity)
            # A plan without a single shard is only an intention (a run that stopped before any
            # work, e.g. MLflow unreachable): it does not make the folder another corpus.
            plan = None
    else:
        others = sorted(p.name for p in out.iterdir() if not is_temp(p) and p.name != LOCK and p.name != FRAMES
                        and not (p.name.startswith(".") and p.name.endswith(".lock")))
        if others:
            raise InputError(out, f"is not empty and holds no corpus (found {', '.join(others[:3])}"
                                  f"{' …' if len(others) > 3 else ''}); use an empty or new --out")
    if (out / MANIFEST).is_file():
        try:
            man = json.loads((out / MANIFEST).read_text())
        except ValueError:
            man = {}
        if man.get("identity") not in (None, identity):
            refuse_other_corpus(out, man["identity"], identity)
        if int(man.get("n", 0)) > n:
            raise InputError(out, f"holds a complete corpus of {man['n']} samples, more than --n {n}; "
                                  "it is never cut down: use another --out")
    last = num_shards(n, shard_size)
    extra = sorted(p.name for p in out.glob(SHARD_GLOB) if int(p.stem.split("-")[1]) >= last)
    if extra:
        raise InputError(out, f"holds shards beyond --n {n} ({extra[0]} …); it is never cut down: use another --out")
    return plan


@contextlib.contextmanager
def corpus_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(out, "another `generate` is writing this corpus right now") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finished_shard(out: Path, k: int, n: int, shard_size: int, identity_sha: str, verify: str) -> dict | None:
    """The sidecar record of shard k if the shard is complete and belongs to this corpus."""
    from .model import sha256_file

    tar, side = out / shard_name(k), out / sidecar_name(k)
    if not (tar.is_file() and side.is_file()):
        return None
    try:
        rec = json.loads(side.read_text())
    except ValueError:
        return None
    if rec.get("identity") != identity_sha:
        raise InputError(tar, "belongs to another corpus (its sidecar names another plan); use another --out")
    first, count = shard_range(k, n, shard_size)
    if (rec.get("first"), rec.get("count")) != (first, count) or tar.stat().st_size != rec.get("bytes"):
        return None
    if verify == "sha256" and sha256_file(tar) != rec.get("sha256"):
        return None
    return rec
