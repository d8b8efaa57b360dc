"""Where every stage's files live: the one owner of on-disk names (the analogue of nnU-Net's ``paths.py``).

Every stage writes one folder; the names inside it are defined here and only here, with path
helpers for the per-scan files. Modules import the names they use; nothing else spells a file
name of another stage.

``prepare`` → PREPARED/::

    scans.parquet                      SCAN_TABLE (one row per scan; paths relative to PREPARED)
    <scan_id>/es.nii.gz, ed.nii.gz     ES_FILE, ED_FILE (int16 HU on the common grid)
    <scan_id>/truth_flow.nii.gz        TRUTH_FLOW_FILE (phantom: the exact ED←ES pull field)
    <scan_id>/ed_labels.nii.gz         ED_LABELS_FILE, ES_LABELS_FILE (phantom labels)
    <scan_id>/prepared.json            SCAN_RECORD (written last: marks a finished scan)

``annotate`` → FLOWS/::

    <scan_id>/flow.nii.gz              FLOW_FILE (annotated pull flow, intent 1006, RAS mm)
    annotations.parquet                ANNOTATION_TABLE
    pwcnet.pt, feature_pyramid.pt      PWCNET_FILE, PYRAMID_FILE
    fold_pyramids/<scan_id>/           FOLD_PYRAMIDS (cv.pyramid: per_fold — a network trained without that scan)

a trained model (MLflow artifact ``model``, or a folder)::

    cvae.pt, feature_pyramid.pt, model.json     CVAE_FILE, PYRAMID_FILE, MODEL_META

``generate`` → CORPUS/::

    plan.json, manifest.json           CORPUS_PLAN, MANIFEST (the manifest is written last)
    shard-KKKKKK.tar, shard-KKKKKK.json        shard_name(k), sidecar_name(k)
    previews/, frames/                 PREVIEWS, FRAMES (generate --frames: the prepared frames)
    .generate.lock                     GENERATE_LOCK
"""
from __future__ import annotations

from pathlib import Path

# prepare
SCAN_TABLE = "scans.parquet"
SCAN_RECORD = "prepared.json"
ES_FILE = "es.nii.gz"
ED_FILE = "ed.nii.gz"
TRUTH_FLOW_FILE = "truth_flow.nii.gz"
ED_LABELS_FILE = "ed_labels.nii.gz"
ES_LABELS_FILE = "es_labels.nii.gz"

# annotate
FLOW_FILE = "flow.nii.gz"
ANNOTATION_TABLE = "annotations.parquet"
PWCNET_FILE = "pwcnet.pt"
PYRAMID_FILE = "feature_pyramid.pt"

FOLD_PYRAMIDS = "fold_pyramids"  # per-fold protocol: fold_pyramids/<held-out scan>/feature_pyramid.pt

# a trained model
CVAE_FILE = "cvae.pt"
MODEL_META = "model.json"

# generate
CORPUS_PLAN = "plan.json"
MANIFEST = "manifest.json"
GENERATE_LOCK = ".generate.lock"
PREVIEWS = "previews"
FRAMES = "frames"
SHARD_GLOB = "shard-*.tar"


def scan_file(scan_id: str, name: str) -> str:
    """A per-scan file's path relative to its stage folder (as scans.parquet stores it)."""
    return f"{scan_id}/{name}"


def flow_path(flows_dir: str | Path, scan_id: str) -> Path:
    """The annotated flow of ``scan_id`` in an annotation folder."""
    return Path(flows_dir) / str(scan_id) / FLOW_FILE


def fold_pyramid_path(flows_dir: str | Path, held_out_id: str) -> Path:
    """The frozen pyramid of the annotation network trained without scan ``held_out_id``."""
    return Path(flows_dir) / FOLD_PYRAMIDS / str(held_out_id) / PYRAMID_FILE


def shard_name(k: int) -> str:
    return f"shard-{int(k):06d}.tar"


def sidecar_name(k: int) -> str:
    return f"shard-{int(k):06d}.json"
