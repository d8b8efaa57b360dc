"""The scan table ``scans.parquet`` of a prepared dataset, and loading prepared pairs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..errors import InputError
from ..fileio import atomic_path

from ..layout import PREPARED_ID_FILE  # in an annotation folder: the fingerprint of its prepared set
from ..layout import SCAN_RECORD as RECORD, SCAN_TABLE as TABLE  # the record, written last, marks a finished scan
COLUMNS = [
    "scan_id", "source", "format", "es_phase", "ed_phase", "phases_from", "n_phases",
    "spacing_mm", "shape", "center_mm", "original_affine", "es_path", "ed_path",
    "truth_flow_path", "labels_path", "es_labels_path",
]


def write_scan_table(prepared_dir: str | Path, records: list[dict]) -> Path:
    """Write ``scans.parquet`` (sorted by scan_id) atomically; paths are relative to the folder."""
    df = pd.DataFrame(sorted(records, key=lambda r: r["scan_id"]), columns=COLUMNS)
    path = Path(prepared_dir) / TABLE
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_scan_table(prepared_dir: str | Path, check_files: bool = True) -> pd.DataFrame:
    """The scan table of a prepared dataset.

    Raises:
        InputError: the folder or table is missing, or the table names a file that is absent.
    """
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / TABLE
    if not path.is_file():
        raise InputError(path, "no scan table: run `cardiomotion prepare --out "
                               f"{prepared_dir}` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise InputError(path, f"unreadable scan table ({exc.__class__.__name__})") from None
    missing = [c for c in ("scan_id", "es_path", "ed_path") if c not in df.columns]
    if missing:
        raise InputError(path, f"scan table lacks columns {missing}")
    if check_files:
        for col in ("es_path", "ed_path", "truth_flow_path", "labels_path", "es_labels_path"):
            if col not in df.columns:
                continue
            for rel in df[col].dropna():
                if not (prepared_dir / rel).is_file():
                    raise InputError(prepared_dir / rel, f"listed in {TABLE} but missing")
    return df


@dataclass
class PreparedPair:
    """One prepared scan: ES and ED (I, J, K) float32 HU on a shared RAS grid."""

    scan_id: str
    es: np.ndarray
    ed: np.ndarray
    affine: np.ndarray
    truth_flow: np.ndarray | None = None  # (3, I, J, K) voxels, pull ED←ES (phantom only)
    ed_labels: np.ndarray | None = None  # (I, J, K) uint8 (phantom only)
    es_labels: np.ndarray | None = None  # (I, J, K) uint8 (phantom only; older prepared sets lack them)

    @property
    def spacing_mm(self) -> float:
        return float(np.sqrt((self.affine[:3, 0] ** 2).sum()))


def _read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj, dtype=np.float32), img.affine
    except Exception as exc:
        raise InputError(path, f"unreadable prepared volume ({exc.__class__.__name__}: {exc})") from None


def load_pair(prepared_dir: str | Path, row: dict | pd.Series, with_truth: bool = True) -> PreparedPair:
    """Load a prepared pair named by a scan-table row.

    Raises:
        InputError: a file is unreadable, or ES and ED differ in shape or grid.
    """
    from ..flow.io import read_flow

    d = Path(prepared_dir)
    es, aff = _read_volume(d / row["es_path"])
    ed, aff_ed = _read_volume(d / row["ed_path"])
    if es.shape != ed.shape or not np.allclose(aff, aff_ed, atol=1e-4):
        raise InputError(d / row["ed_path"], f"ED grid {ed.shape} does not match ES grid {es.shape} of {row['scan_id']}")
    flow = labels = es_labels = None
    if with_truth and row.get("truth_flow_path"):
        flow, _ = read_flow(d / row["truth_flow_path"])
    if with_truth and row.get("labels_path"):
        labels = np.asarray(nib.load(str(d / row["labels_path"])).dataobj, dtype=np.uint8)
    if with_truth and isinstance(row.get("es_labels_path"), str) and row.get("es_labels_path"):
        es_labels = np.asarray(nib.load(str(d / row["es_labels_path"])).dataobj, dtype=np.uint8)
    return PreparedPair(str(row["scan_id"]), es, ed, aff, flow, labels, es_labels)


def read_record(scan_dir: Path) -> dict | None:
    """The per-scan record of a finished scan, or None."""
    path = scan_dir / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def prepared_fingerprint(prepared_dir: str | Path) -> str:
    """Content hash of a prepared set: sha256 over its scan ids and the bytes of every ES and ED
    file. Annotations record it (``PREPARED_ID_FILE``), so flows made from another prepared set —
    even one with the same scan ids and grid — are refused instead of trained on."""
    prepared_dir = Path(prepared_dir).resolve()
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                  for p in sorted(prepared_dir.glob("*/*.nii.gz")) + [prepared_dir / TABLE] if p.is_file())
    return _fingerprint(str(prepared_dir), stamp)


@lru_cache(maxsize=16)
def _fingerprint(prepared_dir: str, _stamp: tuple) -> str:
    """prepared_fingerprint, cached on the files' (name, mtime, size): cv checks every fold."""
    import hashlib

    prepared_dir = Path(prepared_dir)
    table = read_scan_table(prepared_dir, check_files=False)
    h = hashlib.sha256()
    for row in sorted(table.to_dict("records"), key=lambda r: str(r["scan_id"])):
        h.update(str(row["scan_id"]).encode() + b"\0")
        for col in ("es_path", "ed_path"):
            with open(prepared_dir / row[col], "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def check_prepared_identity(prepared_dir: str | Path, flows_dir: str | Path) -> None:
    """Refuse annotations made from another prepared set (their recorded fingerprint differs).

    Folders without a record (annotations written by hand or by older versions) are accepted.
    """
    path = Path(flows_dir) / PREPARED_ID_FILE
    if not path.is_file():
        return
    want = path.read_text().strip()
    if want != prepared_fingerprint(prepared_dir):
        raise InputError(path, f"these annotations were made from another prepared set than {prepared_dir} "
                               "(content differs): annotate this one, or pass its own --prepared")
