"""``prepare``: scans → common isotropic grid around the heart, as a Ray Data pipeline.

For every scan: read it (lazily, one phase at a time), choose ES/ED (manifest → phantom meta →
detection), centre a ``grid`` box of ``spacing`` mm on the heart in the ED frame, resample ES
and ED into it, and write ``DIR/<scan_id>/es.nii.gz``, ``ed.nii.gz`` (and for a phantom the
truth flow and the ED and ES labels carried onto the same grid) plus a ``prepared.json`` record.
``DIR/scans.parquet`` indexes them. Each scan's folder appears atomically; a rerun skips
finished scans; an input error in any scan is reported (first one, by name) and no table is
written, so nothing downstream sees a half-prepared dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import traceback
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..config import Config, PrepareConfig
from ..errors import CardiomotionError, InputError
from ..fileio import atomic_dir, write_json, write_nifti
from ..layout import ED_FILE, ED_LABELS_FILE, ES_FILE, ES_LABELS_FILE, TRUTH_FLOW_FILE, scan_file
from .phases import choose_phases, read_manifest
from .preprocess import grid_affine, heart_center, resample, resample_flow
from .scan import Scan, ScanFormat, read_scan, scan_id_of
from .table import RECORD, read_record, write_scan_table


def config_fingerprint(cfg: PrepareConfig) -> str:
    """Short hash of the settings that change a prepared volume."""
    keys = cfg.model_dump(mode="json")
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def plan_scans(paths: Iterable[str | Path], id_of: Callable[[Path], str] = scan_id_of) -> list[tuple[str, Path]]:
    """(id, path) per input (ids from ``id_of``: scan ids, or frame ids), validated cheaply
    before any Ray work. Inputs whose ids collide — a cohort laid out as ``case01/ct.nii.gz``,
    ``case02/ct.nii.gz`` or ``*/DICOM`` — are named by :func:`distinct_ids` (``case01``,
    ``case02``); the others keep their ids.

    Raises:
        InputError: no inputs, a path that is missing, or two inputs whose ids stay the same
            (the same file given twice).
    """
    entries: list[tuple[Path, str]] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise InputError(path, "does not exist")
        if path.name.startswith(".") and path.name != "..":
            continue  # temporary or hidden entries of a shell glob ("." and ".." name a folder)
        sid = id_of(path)
        if not sid:
            raise InputError(path, "has no name to take a scan id from: give the scan's folder or file")
        entries.append((path, sid))
    if not entries:
        raise InputError(None, "no scans given")
    ids = [sid for _, sid in entries]
    groups: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        groups.setdefault(sid, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            for i, name in zip(members, distinct_ids([entries[i][0] for i in members], id_of)):
                ids[i] = name
    seen: dict[str, Path] = {}
    for (path, _), sid in zip(entries, ids):
        if sid in seen:
            raise InputError(path, f"duplicate scan id {sid!r} (also {seen[sid]})")
        seen[sid] = path
    return [(sid, path.resolve()) for (path, _), sid in zip(entries, ids)]


def distinct_ids(paths: list[Path], id_of: Callable[[Path], str] = scan_id_of) -> list[str]:
    """Ids for inputs whose own ids (``id_of``) are the same: each one's path below the folder
    they all share, its last part named by ``id_of``, less the trailing parts they all share,
    joined by "_" (``/d/case01/ct.nii.gz``, ``/d/case02/ct.nii.gz`` → ``case01``, ``case02``;
    ``/d/a/x/ct.nii.gz``, ``/d/b/x/ct.nii.gz`` → ``a``, ``b``). Paths are made absolute, not
    resolved (a symlink is named by its link). The same path twice gives the same id twice."""
    parts = [list(Path(os.path.abspath(p)).parent.parts) + [id_of(Path(p))] for p in paths]
    k = 0  # the folder they share
    while all(len(x) > k + 1 for x in parts) and len({x[k] for x in parts}) == 1:
        k += 1
    rel = [x[k:] for x in parts]
    while all(len(x) > 1 for x in rel) and len({x[-1] for x in rel}) == 1:
        rel = [x[:-1] for x in rel]
    return ["_".join(x) for x in rel]


def store_as(vol: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return np.clip(np.rint(vol), -32768, 32767).astype(np.int16)
    return vol.astype(np.float32)


#: below this relative change of the detected blood-pool volume over the phases, (max − min) / max,
#: the detected ES/ED follow noise rather than the heart: a scan without contrast enhancement,
#: whose blood-range voxels are bone, measured 1 %; the phantom's opacified cohort 16-24 %
MIN_BLOOD_CHANGE = 0.03


def reader_notes(left_out, notes) -> list[str]:
    """What a reader left out (``left out …``) and its other notes, one line each: a scan's
    (:attr:`~cardiomotion.data.scan.Scan.left_out`, ``notes``) or a single frame's."""
    return [f"left out {line}" for line in left_out] + list(notes)


def scan_notes(scan: Scan, choice, ed: np.ndarray | None = None,
               blood_hu: tuple[float, float] = PrepareConfig.model_fields["blood_hu"].default) -> list[str]:
    """What ``prepare`` tells about one scan besides its record, one line each: what its reader
    left out (:attr:`~cardiomotion.data.scan.Scan.left_out`), the reader's other notes verbatim
    (:attr:`~cardiomotion.data.scan.Scan.notes`, e.g. an orientation the file does not state),
    an ED volume (HU, as read) that does not look like HU (:func:`~cardiomotion.data.intensity.hu_note`),
    and detected ES/ED whose blood-pool volume barely changes (:data:`MIN_BLOOD_CHANGE`)."""
    from .intensity import hu_note

    notes = reader_notes(scan.left_out, scan.notes)
    if ed is not None and (note := hu_note(ed, blood_hu)):
        notes.append(note)
    if choice.blood_ml:
        v = np.asarray(choice.blood_ml, dtype=float)
        change = float((v.max() - v.min()) / v.max()) if v.max() > 0 else 0.0
        if change < MIN_BLOOD_CHANGE:
            notes.append(f"the blood-pool volume (voxels in prepare.blood_hu) changes by only {100 * change:.1f} % "
                         f"over the phases ({v.min():.0f}-{v.max():.0f} ml): the detected ES/ED are unreliable "
                         "(no contrast enhancement?); give them in a manifest")
    return notes


def prepare_scan(scan: Scan, out_dir: Path, cfg: PrepareConfig, manifest: dict | None = None) -> dict:
    """Prepare one scan into ``out_dir/<scan_id>/``; returns its scan-table record (with
    ``notes``, :func:`scan_notes`, when there are any: not a column of the table)."""
    choice = choose_phases(scan, tuple(cfg.blood_hu), manifest)
    ed = scan.phase(choice.ed_phase)
    es = scan.phase(choice.es_phase)
    center = heart_center(ed, scan.affine, tuple(cfg.blood_hu), cfg.center.value)
    grid = tuple(cfg.grid)
    out_aff = grid_affine(center, grid, cfg.spacing_mm)
    ed_out = resample(ed, scan.affine, out_aff, grid, cval=cfg.pad_hu)
    es_out = resample(es, scan.affine, out_aff, grid, cval=cfg.pad_hu)
    record = {
        "scan_id": scan.scan_id,
        "source": str(scan.source),
        "format": scan.format.value,
        "es_phase": choice.es_phase,
        "ed_phase": choice.ed_phase,
        "phases_from": choice.source,
        "n_phases": scan.n_phases,
        "spacing_mm": float(cfg.spacing_mm),
        "shape": list(grid),
        "center_mm": [float(c) for c in center],
        "original_affine": json.dumps(np.asarray(scan.original_affine).tolist()),
        "es_path": scan_file(scan.scan_id, ES_FILE),
        "ed_path": scan_file(scan.scan_id, ED_FILE),
        "truth_flow_path": None,
        "labels_path": None,
        "es_labels_path": None,
    }
    if notes := scan_notes(scan, choice, ed, tuple(cfg.blood_hu)):  # kept in prepared.json, not a column of the table
        record["notes"] = notes
    final = out_dir / scan.scan_id
    with atomic_dir(final) as tmp:
        write_nifti(tmp / ES_FILE, store_as(es_out, cfg.dtype), out_aff)
        write_nifti(tmp / ED_FILE, store_as(ed_out, cfg.dtype), out_aff)
        if scan.format is ScanFormat.PHANTOM:
            record.update(_carry_phantom_truth(scan, choice, tmp, out_aff, grid))
        write_json(tmp / RECORD, {"record": record, "fingerprint": config_fingerprint(cfg),
                                  "blood_ml": choice.blood_ml})
    return record


def _carry_phantom_truth(scan: Scan, choice, tmp: Path, out_aff: np.ndarray, grid) -> dict:
    """Truth flow and the ED and ES labels of a phantom, on the prepared grid (only for its own ES/ED).

    The ES labels let an evaluation label a *synthetic* ED (pull them through a generated flow)
    and measure its physiology (:mod:`cardiomotion.evaluate.physiology`)."""
    import nibabel as nib

    from ..flow.io import read_flow, write_flow
    from ..layout import PHANTOM_LABELS, PHANTOM_META, PHANTOM_TRUTH_FLOW

    meta = json.loads((scan.source / PHANTOM_META).read_text())
    if (choice.es_phase, choice.ed_phase) != (meta["es_phase"], meta["ed_phase"]):
        return {}
    flow, flow_aff = read_flow(scan.source / PHANTOM_TRUTH_FLOW)
    # The truth file lives on the stored grid; bring it to canonical RAS like the volumes.
    from ..orientation import flow_to_canonical, to_canonical

    flow, flow_aff = flow_to_canonical(flow, flow_aff)
    write_flow(tmp / TRUTH_FLOW_FILE, resample_flow(flow, flow_aff, out_aff, grid), out_aff)
    lab_img = nib.load(str(scan.source / PHANTOM_LABELS))
    for phase, name in ((choice.ed_phase, ED_LABELS_FILE), (choice.es_phase, ES_LABELS_FILE)):
        labels, lab_aff = to_canonical(np.asarray(lab_img.dataobj[..., phase]), lab_img.affine)
        write_nifti(tmp / name, resample(labels, lab_aff, out_aff, grid, order=0, cval=0).astype(np.uint8), out_aff)
    return {"truth_flow_path": scan_file(scan.scan_id, TRUTH_FLOW_FILE),
            "labels_path": scan_file(scan.scan_id, ED_LABELS_FILE), "es_labels_path": scan_file(scan.scan_id, ES_LABELS_FILE)}


def guarded_row(row: dict, work: Callable[[], dict]) -> dict:
    """Run ``work()`` (one item's preparation, returning its record) inside a Ray Data UDF, with
    failures as data: bad input (one line), a file-system refusal (one resumable line) and a bug
    (with its traceback) are told apart for :func:`raise_row_errors` on the driver."""
    try:
        rec = work()
        return {"scan_id": row["scan_id"], "record": json.dumps(rec), "error": "", "internal": False, "os_error": False}
    except CardiomotionError as exc:
        return {"scan_id": row["scan_id"], "record": "", "error": str(exc), "internal": False, "os_error": False}
    except OSError as exc:  # the file system refused (disk full, read-only, permissions): not a bug
        where = exc.filename or row["out"]
        return {"scan_id": row["scan_id"], "record": "", "internal": False, "os_error": True,
                "error": f"{where}: cannot write ({exc.strerror or exc}); finished items are kept: "
                         "free space or fix permissions and rerun the same command to resume"}
    except Exception as exc:  # a bug, not bad input: keep the traceback
        return {"scan_id": row["scan_id"], "record": "", "internal": True, "os_error": False,
                "error": f"{row['path']}: internal error {exc.__class__.__name__}: {exc}\n{traceback.format_exc()}"}


def raise_row_errors(rows: list[dict], stage: str) -> None:
    """On the driver: raise the first failure of :func:`guarded_row` rows (by id) — a bug as a
    RuntimeError with the worker's traceback, a file-system refusal as StageFailed, bad input as
    InputError — naming how many more failed; nothing when all succeeded."""
    errors = sorted((r for r in rows if r["error"]), key=lambda r: r["scan_id"])
    internal = [r for r in errors if r["internal"]]
    if internal:  # a bug: surface the worker's traceback, not a one-line "bad input"
        raise RuntimeError(f"{stage} failed on {internal[0]['scan_id']}: {internal[0]['error']}")
    if errors:
        first = errors[0]["error"].splitlines()[0]
        more = f" ({len(errors) - 1} more failed)" if len(errors) > 1 else ""
        if errors[0].get("os_error"):
            from ..errors import StageFailed

            raise StageFailed(first + more)
        raise InputError(None, first + more)


def _prepare_row(row: dict) -> dict:
    """Ray Data UDF: prepare one scan; input errors come back as data, not exceptions."""
    cfg = PrepareConfig.model_validate_json(row["cfg"])
    manifest = {k: tuple(v) for k, v in json.loads(row["manifest"]).items()} if row["manifest"] else None

    def work() -> dict:
        scan = read_scan(row["path"])
        # the id the plan chose (a symlinked folder is named by its link, not by its target)
        scan.scan_id = row["scan_id"]
        return prepare_scan(scan, Path(row["out"]), cfg, manifest)

    return guarded_row(row, work)


def _check_up_front(sid: str, path: Path, out: Path, phases: tuple[int, int] | None = None,
                    manifest: Path | None = None) -> None:
    """Cheap checks on the driver before any Ray work: the format, and for NIfTI inputs the
    headers (shape, phases, truncation) and the manifest's (es, ed) ``phases`` against the scan's
    phase count; a stray non-empty ``out/<sid>`` without a record.

    DICOM folders are only recognised here: reading every slice header is the workers' job.
    """
    from .scan import detect_format

    target = out / sid
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise InputError(target, "exists but holds no finished prepared scan (no prepared.json); "
                                 "delete it or use another --out")
    fmt = detect_format(path)
    if fmt is not ScanFormat.DICOM:
        scan = read_scan(path, fmt)
        if phases is not None:
            for name, t in zip(("es_phase", "ed_phase"), phases):
                if not 0 <= t < scan.n_phases:
                    raise InputError(manifest, f"{sid}: {name} = {t} is outside the scan's phases "
                                               f"0..{scan.n_phases - 1} ({path})")
            if phases[0] == phases[1]:
                raise InputError(manifest, f"{sid}: the same phase {phases[0]} for ES and ED")


def check_manifest_ids(manifest: Path, ids: Iterable[str], known: Iterable[str]) -> None:
    """Refuse manifest rows whose scan id names none of the scans given (a typo would otherwise
    send that scan to ES/ED detection silently), naming the closest scan ids."""
    import difflib

    known = sorted(set(known))
    for sid in sorted(ids):
        if sid not in known:
            close = difflib.get_close_matches(sid, known, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise InputError(manifest, f"scan id {sid!r} matches none of the {len(known)} scans given{hint}")


def prepare_scans(
    scans: Iterable[str | Path],
    out_dir: str | Path,
    cfg: Config,
    manifest: str | Path | None = None,
    on_skip: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Path:
    """Prepare scans in parallel on Ray Data; returns the path of ``scans.parquet``.

    ``on_skip(scan_id)``: a scan already prepared in ``out_dir``; ``on_note(line)``: a note on a
    scan, prepared now or kept from an earlier call ("<scan_id>: …", :func:`scan_notes`: what its
    reader left out or noted, detected phases to doubt; kept in its ``prepared.json``).

    Scans an earlier call finished in ``out_dir`` stay in the table (adding scans merges). One
    ``prepare`` at a time per ``out_dir`` (:func:`~cardiomotion.fileio.exclusive_lock`).

    Raises:
        InputError: bad input (first problem, by file). Duplicate ids, missing paths, unknown
            formats, unreadable/truncated NIfTI headers, 3-D or single-phase files and phase
            files that disagree are found on the driver before Ray starts or anything is
            written; problems only the voxels show (NaN/inf, DICOM series, ES/ED detection)
            after the other scans finished (theirs are complete; no scans.parquet is written).
        StageFailed: the file system refused a write (disk full, read-only); finished scans are kept.
        RuntimeError: a bug in a worker (with the worker's traceback), never reported as bad input.
    """
    from ..fileio import exclusive_lock

    with exclusive_lock(out_dir, "prepare"):  # one prepare per folder: a second is refused in one line
        from ..raycluster import init_ray

        out = Path(out_dir).resolve()
        items = plan_scans(scans)
        man = read_manifest(manifest) if manifest else None
        if man:
            check_manifest_ids(Path(manifest), man, (sid for sid, _ in items))
        fingerprint = config_fingerprint(cfg.prepare)
        done: list[dict] = []
        todo: list[dict] = []
        if out.exists() and not out.is_dir():
            raise InputError(out, "exists and is not a folder; use another --out")
        def tell(record: dict) -> None:  # a prepared scan's notes, skipped or made now
            for line in record.get("notes") or []:
                if on_note:
                    on_note(f"{record['scan_id']}: {line}")

        earlier = (_earlier_records(out, fingerprint, {sid for sid, _ in items}, {str(p): sid for sid, p in items})
                   if out.is_dir() else [])
        for sid, path in items:
            rec = read_record(out / sid)
            if rec is not None:
                if rec.get("fingerprint") != fingerprint:
                    raise InputError(out / sid, "was prepared with different prepare settings; "
                                                "use another --out or delete it")
                record = rec["record"]
                if record.get("source") not in (None, str(path)):  # ids of inputs named alike follow the others given
                    raise InputError(out / sid, f"holds the scan prepared from {record['source']}, not {path}, which "
                                                "this call names the same: use another --out")
                if man and sid in man and tuple(man[sid]) != (record["es_phase"], record["ed_phase"]):
                    raise InputError(out / sid, f"was prepared with (es_phase, ed_phase) = "
                                                f"({record['es_phase']}, {record['ed_phase']}), the manifest says "
                                                f"{tuple(man[sid])}; use another --out or delete it")
                done.append(record)
                if on_skip:
                    on_skip(sid)
                tell(record)
                continue
            _check_up_front(sid, path, out, tuple(man[sid]) if man and sid in man else None,
                            Path(manifest) if manifest else None)
            todo.append({"scan_id": sid, "path": str(path), "out": str(out),
                         "cfg": cfg.prepare.model_dump_json(), "manifest": json.dumps(man) if man else ""})
        if todo:
            ray = init_ray(cfg.ray)
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            rows = ds.map(_prepare_row, num_cpus=1).take_all()
            made = [json.loads(r["record"]) for r in rows if not r["error"]]
            for rec in sorted(made, key=lambda r: r["scan_id"]):  # before any failure is raised: these are kept
                tell(rec)
            raise_row_errors(rows, "prepare")
            done.extend(made)
        done.extend(earlier)
        return write_scan_table(out, done)


def _earlier_records(out: Path, fingerprint: str, given: set[str], sources: dict[str, str]) -> list[dict]:
    """Records of scans an earlier ``prepare`` finished in ``out`` that this call was not given
    (by id): adding scans to a prepared folder merges them into its table instead of dropping the
    others. ``sources``: this call's inputs (resolved path → id).

    Raises:
        InputError: such a scan was prepared with other settings (one table, one grid), or from one
            of this call's inputs under another id (ids of inputs named alike follow the others
            given: the table would hold that scan twice).
    """
    found = []
    for rec_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in given):
        rec = read_record(rec_dir)
        if rec is None:
            continue
        if rec.get("fingerprint") != fingerprint:
            raise InputError(rec_dir, "was prepared with different prepare settings than the scans given now; "
                                      "one prepared folder holds one setting: use another --out")
        if (src := rec["record"].get("source")) in sources:
            raise InputError(rec_dir, f"holds {src} prepared under the id {rec_dir.name!r}; this call names it "
                                      f"{sources[src]!r}: use another --out, or remove {rec_dir}")
        found.append(rec["record"])
    return found


def prepared_pairs(prepared_dir: str | Path, with_truth: bool = False):
    """A Ray Data dataset of prepared pairs: rows {scan_id, es, ed (I, J, K) float32 HU, spacing_mm}.

    With ``with_truth`` the phantom's truth flow (3, I, J, K) voxels is included (zeros and
    ``has_truth = False`` for real scans).
    """
    import ray

    from .table import load_pair, read_scan_table

    prepared_dir = Path(prepared_dir).resolve()
    table = read_scan_table(prepared_dir)
    rows = table.to_dict("records")

    def load(row: dict) -> dict:
        pair = load_pair(prepared_dir, row, with_truth=with_truth)
        out = {"scan_id": pair.scan_id, "es": pair.es, "ed": pair.ed, "spacing_mm": pair.spacing_mm}
        if with_truth:
            has = pair.truth_flow is not None
            out["has_truth"] = has
            out["truth_flow"] = pair.truth_flow if has else np.zeros((3,) + pair.es.shape, np.float32)
        return out

    return ray.data.from_items(plain_rows(rows), override_num_blocks=max(1, len(rows))).map(load)


def plain_rows(rows: list[dict]) -> list[dict]:
    """Scan-table rows with numpy values as plain Python (for Ray's serialised items)."""
    out = []
    for row in rows:
        out.append({k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
                    for k, v in row.items()})
    return out
