"""Where every stage's files live: the one owner of on-disk names (the analogue of nnU-Net's ``paths.py``).

Every stage writes one folder; the names inside it are defined here and only here, with path
helpers for the per-scan files. Modules import the names they use; nothing else spells a file
name of another stage.

``phantom`` → COHORT/<patient_id>/::

    ct.nii.gz, labels.nii.gz           PHANTOM_CT, PHANTOM_LABELS (4-D: every phase)
    truth/flow_ed_from_es.nii.gz       PHANTOM_TRUTH_FLOW (the exact ED←ES pull field)
    meta.json                          PHANTOM_META (ES/ED phases, parameters, measured EF)
    preview.png                        PHANTOM_PREVIEW

``prepare`` → PREPARED/::

    scans.parquet                      SCAN_TABLE (one row per scan; paths relative to PREPARED)
    <scan_id>/es.nii.gz, ed.nii.gz     ES_FILE, ED_FILE (int16 HU on the common grid)
    <scan_id>/truth_flow.nii.gz        TRUTH_FLOW_FILE (phantom: the exact ED←ES pull field)
    <scan_id>/ed_labels.nii.gz         ED_LABELS_FILE, ES_LABELS_FILE (phantom labels)
    <scan_id>/prepared.json            SCAN_RECORD (written last: marks a finished scan)

``annotate`` → FLOWS/::

    <scan_id>/flow.nii.gz              FLOW_FILE (annotated pull flow, intent 1006, RAS mm)
    <scan_id>/quality.json             ANNOTATION_QUALITY (per-pair quality of the annotation)
    annotations.parquet                ANNOTATION_TABLE
    prepared.sha256                    PREPARED_ID_FILE (the fingerprint of the prepared set annotated)
    summary.json                       ANNOTATION_SUMMARY (MLflow run, model URIs, EPE summary)
    settings.json                      ANNOTATION_SETTINGS (what the network was trained with; a rerun
                                       with other settings is refused)
    ray_train/                         ANNOTATE_TRAIN_DIR (the network's Ray Train run: its checkpoints)
    pwcnet.pt, feature_pyramid.pt      PWCNET_FILE, PYRAMID_FILE
    fold_pyramids/<scan_id>/           FOLD_PYRAMIDS (cv.pyramid: per_fold — a network trained without that scan),
                                       with FOLD_PYRAMID_RECORD (what it was trained with)

a Ray Train checkpoint (a folder)::

    state.pt                           TRAIN_CHECKPOINT (state_dicts + epoch; torch.load(weights_only=True))

``cv`` → OUT/::

    cv.json, folds/<k>.json            CV_STATE, CV_FOLDS (per-fold state, written atomically)
    folds.csv, summary.json            CV_TABLE, CV_SUMMARY

``tune`` → OUT/::

    tune.json, best.yaml, trials.csv   TUNE_STATE, TUNE_BEST, TUNE_TRIALS
    search/                            TUNE_EXPERIMENT (Ray Tune's experiment; trial.pt: TRIAL_CHECKPOINT)

a trained model (MLflow artifact ``model``, or a folder)::

    cvae.pt, feature_pyramid.pt, model.json     CVAE_FILE, PYRAMID_FILE, MODEL_META

``generate`` → CORPUS/::

    plan.json, manifest.json           CORPUS_PLAN, MANIFEST (the manifest is written last)
    shard-KKKKKK.tar, shard-KKKKKK.json        shard_name(k), sidecar_name(k)
        <key>.es.npy, <key>.ed_syn.npy, <key>.flow.npy, <key>.json    SAMPLE_MEMBERS (tar members per sample)
    previews/, frames/                 PREVIEWS, FRAMES (generate --frames: the prepared frames)
    .generate.lock                     GENERATE_LOCK

``export`` → OUT/::

    es.nii.gz, ed_syn.nii.gz, flow.nii.gz, sample.json      EXPORT_ES, EXPORT_ED_SYN, EXPORT_FLOW, EXPORT_META
    transition.gif, traversal.png                           EXPORT_GIF, EXPORT_TRAVERSAL

``utility`` → OUT/::

    runs.jsonl, utility.csv            UTILITY_RUNS (one row per estimator), UTILITY_TABLE
    summary.json, utility.png          UTILITY_SUMMARY, UTILITY_FIGURE
    utility_paired.csv                 UTILITY_PAIRED (corpus arms against the others, scan by scan)
    inputs.json                        UTILITY_INPUTS (the prepared and flows folders its rows came from)
    folds/<scan_id>/                   utility_fold_dir(out, scan): generator.json (the fold CVAE),
                                       frames/ (the training scans, linked), corpus/,
                                       target_frames/ (the held-out scan, linked), target_corpus/
                                       (the target arms: conditioned on the held-out ES frame alone),
                                       transport_pool.pt (UTILITY_TRANSPORT_POOL: the transport arm's
                                       fields, registered once per fold)

The storage root (``config.storage_root``: Ray Train runs, the MLflow store) also holds::

    transport_pairs/<sha256>.pt        STORAGE_TRANSPORT_PAIRS: each (target, partner) pair's transported
                                       field, content-addressed (train.transport.PairCache), shared by
                                       every fold, seed and stage that transports (the CVAE's pool with
                                       train.transport_partners, the utility transport and anchored arms)
"""
from __future__ import annotations

from pathlib import Path

# phantom
PHANTOM_CT = "ct.nii.gz"
PHANTOM_LABELS = "labels.nii.gz"
PHANTOM_TRUTH_FLOW = "truth/flow_ed_from_es.nii.gz"
PHANTOM_META = "meta.json"
PHANTOM_PREVIEW = "preview.png"

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

ANNOTATION_QUALITY = "quality.json"
PREPARED_ID_FILE = "prepared.sha256"
FOLD_PYRAMIDS = "fold_pyramids"  # per-fold protocol: fold_pyramids/<held-out scan>/feature_pyramid.pt
FOLD_PYRAMID_RECORD = "pyramid.json"
ANNOTATION_SUMMARY = "summary.json"
ANNOTATION_SETTINGS = "settings.json"
ANNOTATE_TRAIN_DIR = "ray_train"

# training checkpoints, cv, tune
TRAIN_CHECKPOINT = "state.pt"
CV_STATE = "cv.json"
CV_FOLDS = "folds"
CV_TABLE = "folds.csv"
CV_SUMMARY = "summary.json"
TUNE_STATE = "tune.json"
TUNE_BEST = "best.yaml"
TUNE_TRIALS = "trials.csv"
TUNE_EXPERIMENT = "search"
TRIAL_CHECKPOINT = "trial.pt"

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
SAMPLE_ES = "es.npy"
SAMPLE_ED_SYN = "ed_syn.npy"
SAMPLE_FLOW = "flow.npy"
SAMPLE_META = "json"
SAMPLE_MEMBERS = (SAMPLE_ES, SAMPLE_ED_SYN, SAMPLE_FLOW, SAMPLE_META)  # per sample, in this order

# export
EXPORT_ES = "es.nii.gz"
EXPORT_ED_SYN = "ed_syn.nii.gz"
EXPORT_FLOW = "flow.nii.gz"
EXPORT_META = "sample.json"
EXPORT_GIF = "transition.gif"
EXPORT_TRAVERSAL = "traversal.png"

# utility
UTILITY_RUNS = "runs.jsonl"
UTILITY_TABLE = "utility.csv"
UTILITY_SUMMARY = "summary.json"
UTILITY_FIGURE = "utility.png"
UTILITY_PAIRED = "utility_paired.csv"
UTILITY_INPUTS = "inputs.json"
UTILITY_FOLDS = "folds"
UTILITY_GENERATOR = "generator.json"
UTILITY_FRAMES = "frames"
UTILITY_CORPUS = "corpus"
UTILITY_TARGET_FRAMES = "target_frames"
UTILITY_TARGET_CORPUS = "target_corpus"
UTILITY_TRANSPORT_POOL = "transport_pool.pt"


STORAGE_TRANSPORT_PAIRS = "transport_pairs"


def transport_pairs_dir(storage_root: str | Path) -> Path:
    """The folder of transported pair fields (:class:`~cardiomotion.train.transport.PairCache`)."""
    return Path(storage_root) / STORAGE_TRANSPORT_PAIRS


def transport_pair_file(cache_dir: str | Path, key: str) -> Path:
    """One pair's transported field in a :class:`~cardiomotion.train.transport.PairCache` folder
    (``key``: the sha256 of what made it)."""
    return Path(cache_dir) / f"{key}.pt"


def utility_fold_dir(out_dir: str | Path, scan_id: str) -> Path:
    """Fold ``scan_id``'s folder of a utility experiment (its CVAE record, training view, corpus)."""
    return Path(out_dir) / UTILITY_FOLDS / str(scan_id)


def scan_file(scan_id: str, name: str) -> str:
    """A per-scan file's path relative to its stage folder (as scans.parquet stores it)."""
    return f"{scan_id}/{name}"


def flow_path(flows_dir: str | Path, scan_id: str) -> Path:
    """The annotated flow of ``scan_id`` in an annotation folder."""
    return Path(flows_dir) / str(scan_id) / FLOW_FILE


def fold_pyramid_path(flows_dir: str | Path, held_out_id: str) -> Path:
    """The frozen pyramid of the annotation network trained without scan ``held_out_id``."""
    return Path(flows_dir) / FOLD_PYRAMIDS / str(held_out_id) / PYRAMID_FILE


def lock_name(target_name: str, stage: str) -> str:
    """The advisory lock file next to ``target_name`` that one ``stage`` run holds (``fileio.exclusive_lock``)."""
    return f".{target_name}.{stage}.lock"


def cv_fold_state_name(k: int) -> str:
    """Fold ``k``'s state file inside ``CV_FOLDS``."""
    return f"{int(k):03d}.json"


def fold_figure_name(fold: int) -> str:
    """A fold's validation figure (slices of the held-out pair, reconstruction, prior samples)."""
    return f"fold_{int(fold):03d}.png"


def annotation_figure_name(scan_id: str) -> str:
    return f"annotation_{scan_id}.png"


def prepared_figure_name(scan_id: str) -> str:
    return f"prepared_{scan_id}.png"


def preview_sample_name(key: str) -> str:
    """Corpus preview of the sample with tar key ``key`` (inside ``PREVIEWS``)."""
    return f"sample_{key}.png"


def preview_transition_name(key: str) -> str:
    return f"transition_{key}.gif"


def preview_traversal_name(scan_id: str) -> str:
    return f"traversal_{scan_id}.png"


def fold_ef_figure_name(fold: int) -> str:
    """The per-fold histogram of the synthetic-ED ejection fractions (a validation figure)."""
    return f"fold_{int(fold):03d}_ef.png"


def shard_name(k: int) -> str:
    return f"shard-{int(k):06d}.tar"


def sidecar_name(k: int) -> str:
    return f"shard-{int(k):06d}.json"
