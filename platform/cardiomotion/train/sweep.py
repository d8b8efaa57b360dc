"""What the sweeps (``cv``, ``tune``, ``utility``) share: fold selection, cluster capacity, the
fingerprint of their settings and the resume guard (docs/design.md, "Distributed design")."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import Config
from ..errors import InputError

# settings that change where and how fast a fold runs, not what it learns: may differ between reruns
RESOURCE_KEYS = ("num_workers", "resources", "max_failures")  # train keys that change where, not what, it learns
# train keys added after sweeps and fold generators were first recorded, with the value that trains as
# before they existed: a fingerprint leaves them out at that value, so older records still match
LATER_TRAIN_KEYS: dict[str, Any] = {"transport_partners": 0}


def what_trains(train: Mapping[str, Any]) -> dict[str, Any]:
    """A ``train`` dump as a fingerprint holds it: less :data:`RESOURCE_KEYS`, and less each
    :data:`LATER_TRAIN_KEYS` key at its value from before it existed."""
    return {k: v for k, v in train.items()
            if k not in RESOURCE_KEYS and not (k in LATER_TRAIN_KEYS and v == LATER_TRAIN_KEYS[k])}


# --------------------------------------------------------------------------- fold selection
def resolve_folds(spec: str | Sequence[int | str] | None, scan_ids: Sequence[str], where: str = "--folds") -> list[int]:
    """Fold indices from ``"all"``, ``"0,3,7"``, ``"0-21"``, or a list of indices / scan ids
    (scan-id order; a token that is a scan id is always read as one).

    Raises:
        InputError: an index outside 0..N−1, a scan id that is not in the prepared dataset, or
            an empty list.
    """
    n = len(scan_ids)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n))
    items: list[int | str] = ([t.strip() for t in spec.split(",") if t.strip()] if isinstance(spec, str)
                              else list(spec))
    if not items:
        raise InputError(where, "names no fold: give 'all', fold indices (0,3,7) or scan ids")
    index = {sid: i for i, sid in enumerate(scan_ids)}
    out: list[int] = []
    bad: list[str] = []
    expanded: list[int | str] = []
    for item in items:  # ranges "a-b" (inclusive) of fold indices
        m = re.fullmatch(r"(\d+)-(\d+)", item) if isinstance(item, str) and item not in index else None
        expanded.extend(range(int(m[1]), int(m[2]) + 1) if m and int(m[1]) <= int(m[2]) else [item])
    for item in expanded:
        if isinstance(item, str) and item in index:
            k = index[item]
        else:
            try:
                k = int(item)
            except (TypeError, ValueError):
                bad.append(repr(item))
                continue
            if not 0 <= k < n:
                bad.append(str(item))
                continue
        if k not in out:
            out.append(k)
    if bad:
        shown = ", ".join(scan_ids[:4]) + (", ..." if n > 4 else "")
        raise InputError(where, f"no such fold or scan: {', '.join(bad)} (the prepared dataset has {n} scans, "
                                f"folds 0..{n - 1}: {shown})")
    return out


# --------------------------------------------------------------------------- tables
def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with ``columns`` (missing or None → empty; other keys ignored), atomically."""
    import csv
    import io

    from ..fileio import atomic_path

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


# --------------------------------------------------------------------------- resources
def fold_demand(cfg: Config, use_gpu: bool) -> tuple[int, dict[str, float]]:
    """(workers, resources per worker) one fold's trainer requests.

    Raises:
        InputError: several DDP ranks with a fraction of a GPU each (two ranks on one GPU fail
            under NCCL: pack folds, not ranks).
    """
    tc = cfg.train
    bundle = tc.resources.bundle(use_gpu)
    if use_gpu:
        if tc.resources.gpus < 1 and tc.num_workers > 1:
            raise InputError("train.num_workers", f"{tc.num_workers} DDP ranks with resources.gpus "
                             f"{tc.resources.gpus}: ranks of one fold could share a GPU, which NCCL refuses; "
                             "with fractional GPUs (fold packing) use num_workers: 1")
    return tc.num_workers, bundle


def capacity(nodes: Iterable[Mapping[str, float]], workers: int, bundle: Mapping[str, float]) -> int:
    """How many trainers of ``workers`` × ``bundle`` the nodes hold at once (bundles never span nodes)."""
    bundles = 0
    for res in nodes:
        fits = [math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        bundles += min(fits) if fits else 0
    return bundles // max(1, workers)


def fmt_resources(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def check_capacity(nodes: Sequence[Mapping[str, float]], workers: int, bundle: Mapping[str, float],
                   max_concurrent: int | None, what: str = "fold", setting: str = "cv.max_concurrent") -> int:
    """Capacity (see :func:`capacity`), or an InputError if the cluster can never hold one
    ``what`` or ``max_concurrent`` of them at once."""
    nodes = [{k: float(v) for k, v in n.items() if k in ("CPU", "GPU")} for n in nodes]
    need = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        raise InputError("train.resources.cpus" if "GPU" not in bundle or largest.get("GPU") else "train.resources.gpus",
                         f"a {what} worker needs {{{need}}} but the largest node has {fmt_resources(largest) or '{}'}: "
                         f"it can never be scheduled (lower train.resources.cpus / gpus)")
    cap = capacity(nodes, workers, bundle)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    if cap < 1:
        raise InputError("train.num_workers", f"a {what} needs {workers} workers × {{{need}}} but the cluster "
                         f"has {fmt_resources(total)} in all: it can never be scheduled")
    if max_concurrent is not None and max_concurrent > cap:
        raise InputError(setting, f"{max_concurrent} concurrent {what}s requested but the cluster holds at most "
                         f"{cap} at once (each {what}: {workers} × {{{need}}}; cluster {fmt_resources(total)})")
    return cap


def alive_nodes(ray) -> list[dict[str, float]]:
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def sweep_fingerprint(prepared: Path, flows: Path, cfg: Config, drop: Sequence[str] = (),
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a sweep's results depend on: inputs (the flows folder's path and content,
    :func:`~cardiomotion.annotate.stage.flows_fingerprint`: annotated again in place, it is other
    flows), seed, intensity and the ``train`` settings (less :data:`RESOURCE_KEYS` and ``drop``,
    e.g. the keys a search varies), with ``cv.pyramid: per_fold`` the settings of the fold
    pyramids, plus ``extra``. A rerun with another fingerprint is refused
    (:func:`refuse_other_settings`)."""
    from ..annotate.stage import flows_fingerprint

    train = what_trains(cfg.train.model_dump(mode="json"))
    for k in drop:
        train.pop(k, None)
    fp = {"prepared": str(prepared), "flows": str(flows), "flows_sha256": flows_fingerprint(flows), "seed": cfg.seed,
          "intensity": cfg.intensity.model_dump(mode="json"), "train": train, **(extra or {})}
    if cfg.cv.pyramid.value != "shared":  # (absent for shared: sweeps made before the setting existed resume)
        from ..annotate.stage import pyramid_settings

        fp["pyramid"] = cfg.cv.pyramid.value
        fp["pyramid_settings"] = pyramid_settings(cfg)  # each fold trains its own: annotate's settings count
    return fp


def recorded_fingerprint(recorded: Any, current: Mapping[str, Any]) -> Any:
    """A recorded :func:`sweep_fingerprint` as today's would hold it, for one written before stop
    40: the fold pyramids' settings lose the refinement's keys
    (:func:`cardiomotion.annotate.stage.current_pyramid_record`), and a record without the flows' content
    hash adopts ``current``'s (what the folder holds now: unknowable then), so that sweep resumes."""
    if not isinstance(recorded, dict):
        return recorded
    from ..annotate.stage import current_pyramid_record

    recorded = current_pyramid_record(recorded, "pyramid_settings")
    if "flows_sha256" not in recorded and "flows_sha256" in current:
        recorded = {**recorded, "flows_sha256": current["flows_sha256"]}
    return recorded


def resume_state(state_file: Path, fingerprint: Mapping[str, Any], what: str, cfg: Config):
    """Open a sweep's state for a (re)run: the recorded state (empty when new), refused with one
    line if it was made with other settings or its MLflow parent run is not in this store.
    Returns (state, tracking URI, MLflow client, parent run id or None)."""
    import mlflow

    from .. import tracking

    state = read_json(state_file) or {}
    refuse_other_settings(state_file, recorded_fingerprint(state.get("fingerprint"), fingerprint), fingerprint, what)
    uri = tracking.setup(cfg)
    client = mlflow.MlflowClient(uri)
    parent_id = state.get("parent_run_id")
    check_parent_run(client, state_file, parent_id, uri)
    return state, uri, client, parent_id


def check_parent_run(client, state_file: Path, parent_id: str | None, uri: str) -> None:
    """A resumed sweep's MLflow parent run must be in this tracking store (else one InputError)."""
    if not parent_id:
        return
    try:
        client.get_run(parent_id)
    except Exception:
        raise InputError(state_file, f"its MLflow parent run {parent_id} is not in {uri}: use the same "
                                     "tracking store, or another --out") from None


def refuse_other_settings(state_file: Path, recorded: Mapping[str, Any] | None, fingerprint: Mapping[str, Any],
                          what: str) -> None:
    """The resume guard: an InputError naming the first difference when ``state_file`` recorded
    another fingerprint (``what``: "cross-validation", "search", …)."""
    if recorded and recorded != fingerprint:
        raise InputError(state_file, f"this {what} was run with other settings ({first_difference(recorded, fingerprint)}): "
                                     "rerun it with the same ones, or use another --out")


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {json.dumps(a)} then, {json.dumps(b)} now"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
