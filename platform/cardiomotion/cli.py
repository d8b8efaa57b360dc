"""The ``cardiomotion`` command: one sub-command per stage.

Errors the library raises for bad input become one line on stderr and exit status 2 (the full
traceback with ``--debug``).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import CardiomotionError, one_line


def _say(msg: str) -> None:
    print(msg, flush=True)


def _load(args, overrides: dict | None = None) -> "Config":  # noqa: F821
    """The config file (or the defaults) with command-line flags on top, validated together:
    a flag with an impossible value is refused like a bad config value (one line, exit 2)."""
    from .config import load_config
    from .errors import ConfigError

    path = getattr(args, "config", None)
    cfg = load_config(path)  # a bad file is blamed on the file
    if not overrides or not any(overrides.values()):
        return cfg
    try:
        return load_config(path, overrides=overrides)
    except ConfigError as exc:  # the file alone was fine: a flag is to blame
        raise ConfigError("command line", exc.problem) from None


def _quiet_ray(args) -> None:
    """Keep Ray's INFO chatter off the terminal so stderr carries our own lines (above all the
    one-line error of bad input); ``--debug`` keeps everything. Ray Data's full logs still go to
    its session log folder (/tmp/ray/session_*/logs/ray-data)."""
    if args.debug:
        return
    import logging
    import os

    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")  # read when ray is first imported; Ray Train too
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model download
    import ray.data  # noqa: F401  (configures the 'ray.data' logger: console handler at INFO)

    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "name", None) == "console":
            handler.setLevel(logging.WARNING)


@contextmanager
def _epoch_bar(desc: str, total: int):
    """A terminal progress bar over training epochs; yields the ``on_epoch(epoch, loss)`` callback.

    Like the phantom bar: live on a terminal only, erased when done."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="epoch", disable=None, leave=False) as bar:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.n = min(total, epoch + 1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            bar.refresh()

        yield on_epoch


def _given(**flags) -> dict:
    """The flags the user gave (None = not given)."""
    return {k: v for k, v in flags.items() if v is not None}


# ---------------------------------------------------------------------------- phantom
def cmd_phantom(args) -> int:
    from tqdm import tqdm

    from .data.phantom import make_cohort
    from .errors import InputError

    if args.workers is not None and args.workers < 1:
        raise InputError("--workers", f"must be at least 1, got {args.workers}")
    pc = _load(args, {"phantom": _given(patients=args.patients, grid=args.grid, spacing_mm=args.spacing,
                                        phases=args.phases, seed=args.seed)}).phantom
    n = pc.patients
    t0 = time.perf_counter()
    # A live bar on a terminal only (disable=None), erased when done (leave=False): stderr keeps
    # nothing but an error line, and logs/pipes get no bar frames.
    with tqdm(total=n, desc="phantom", unit="patient", disable=None, leave=False) as bar:
        folders = make_cohort(args.out, patients=n, grid=pc.grid, spacing_mm=pc.spacing_mm,
                              fov_mm=pc.fov_mm, phases=pc.phases, seed=pc.seed, rv_contrast=pc.rv_contrast,
                              workers=args.workers, on_patient=lambda _p: bar.update(1))
    _say(f"wrote {len(folders)} phantom patients to {Path(args.out).resolve()} in {time.perf_counter() - t0:.1f} s")
    if args.preview:
        from .evaluate.figures import plot_phantom_preview

        for folder in folders:
            _say(f"  preview {plot_phantom_preview(folder)}")
    return 0


# ---------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    from .data.prepare import prepare_scans

    cfg = _load(args)
    skipped: list[str] = []
    t0 = time.perf_counter()
    table = prepare_scans(args.scans, args.out, cfg, manifest=args.manifest, on_skip=skipped.append,
                          on_note=lambda line: _say(f"note: {line}"))
    if skipped:
        _say(f"skipped {len(skipped)} scans already prepared")
    _say(f"wrote {table} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- annotate
def cmd_annotate(args) -> int:
    import pandas as pd

    from .annotate import annotate, summarize

    cfg = _load(args)
    t0 = time.perf_counter()
    with _epoch_bar("PWC-Net", cfg.annotate.epochs) as on_epoch:
        table = annotate(args.prepared, args.out, cfg, log=_say, on_epoch=on_epoch, network=args.network)
    summary = summarize(pd.read_parquet(table))
    _say(f"wrote {table} in {time.perf_counter() - t0:.0f} s")
    for key in ("mean_epe_myo_mm_zero", "mean_epe_myo_mm_net", "mean_epe_myo_mm_refined",
                "mean_magnitude_myo_net", "mean_magnitude_myo_refined"):
        if key in summary:
            _say(f"  {key:28s} {summary[key]:.3f}")
    return 0


# ---------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .train.cvae import train_fold

    cfg = _load(args)
    t0 = time.perf_counter()
    with _epoch_bar(f"fold {args.fold}", cfg.train.epochs) as on_epoch:
        res = train_fold(args.prepared, args.flows, args.fold, cfg, log=_say, on_epoch=on_epoch)
    m = res.metrics
    _say(f"fold {res.fold} (held out {res.val_id}) finished in {time.perf_counter() - t0:.0f} s")
    for key in ("val_epe_rec_mm", "val_epe_prior_mm", "val_epe_zero_mm", "val_kl", "val_mse_rec"):
        if key in m:
            _say(f"  {key:20s} {m[key]:.4f}")
    _say(f"  model   {res.model_uri}")
    _say(f"  figure  {res.figure}")
    return 0


# ---------------------------------------------------------------------------- config
def cmd_config(args) -> int:
    from .config import dump_config, reference_markdown

    _say(reference_markdown() if args.reference else dump_config(_load(args)))
    return 0


# ---------------------------------------------------------------------------- cv
def cmd_cv(args) -> int:
    from .train.cv import run_cv

    cfg = _load(args)
    _quiet_ray(args)
    t0 = time.perf_counter()
    res = run_cv(args.prepared, args.flows, args.out, cfg, folds=args.folds,
                 on_progress=lambda p: _say(p.line()), log=_say)
    s = res.summary
    _say(f"cross-validation: {s['done']} of {s['folds']} folds done, {s['failed']} failed, in "
         f"{time.perf_counter() - t0:.0f} s (parent run {res.parent_run_id})")
    _say(res.format_table())
    _say(f"  table    {res.folds_csv}")
    _say(f"  summary  {res.summary_json}")
    return 1 if s["failed"] else 0


# ---------------------------------------------------------------------------- tune
def cmd_tune(args) -> int:
    from .train.tune import format_trials, run_tune

    cfg = _load(args)
    _quiet_ray(args)
    t0 = time.perf_counter()
    res = run_tune(args.prepared, args.flows, args.out, cfg, samples=args.samples, log=_say)
    _say(f"tune: {len(res.trials)} trials in {time.perf_counter() - t0:.0f} s (parent run {res.parent_run_id})")
    _say(format_trials(res.trials))
    _say(f"  best config  {res.best_yaml}   (cardiomotion cv --config {res.best_yaml} ...)")
    _say(f"  trials       {res.trials_csv}")
    return 0


# ---------------------------------------------------------------------------- utility
def cmd_utility(args) -> int:
    from .evaluate.utility_job import run_utility
    from .evaluate.utility_report import format_paired, format_table

    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()] if args.sizes else None
    except ValueError:
        from .errors import ConfigError

        raise ConfigError("command line", f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    cfg = _load(args, {"utility": _given(steps=args.steps, seeds=args.seeds, corpus=args.corpus, sizes=sizes)})
    _quiet_ray(args)
    t0 = time.perf_counter()
    bar = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(desc="utility estimators", unit="run", total=None, disable=None)
    except ImportError:  # progress bars are a nicety
        pass

    def on_run(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        res = run_utility(args.prepared, args.flows, args.out, cfg, folds=args.folds, log=_say, on_run=on_run,
                          generators=args.generators)
    finally:
        if bar is not None:
            bar.close()
    _say(f"utility: {len(res.folds)} folds in {time.perf_counter() - t0:.0f} s")
    _say(format_table(res.rows))
    if res.paired:
        _say("paired, scan by scan (delta = corpus arm - other; < 0: the corpus arm has the lower EPE):")
        _say(format_paired(res.paired, n_boot=cfg.utility.bootstrap, seed=cfg.seed, method=cfg.utility.interval))
    _say(f"  table    {res.table}")
    _say(f"  paired   {res.paired_file}")
    _say(f"  figure   {res.figure}")
    _say(f"  runs     {res.runs}")
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .pipeline import run_demo
    from .tracking import ui_hint

    cfg = _load(args)
    t0 = time.perf_counter()
    res = run_demo(cfg, args.out, log=_say)
    if res.cv_table:
        _say("")
        _say(res.cv_table)
    _say("")
    _say(f"demo finished in {time.perf_counter() - t0:.0f} s. Everything is under {res.out}:")
    _say(f"  phantom cohort   {res.cohort}   (ct.nii.gz, labels.nii.gz, truth/flow_ed_from_es.nii.gz, meta.json)")
    _say(f"  prepared pairs   {res.prepared}   (scans.parquet, <scan>/es.nii.gz, ed.nii.gz)")
    _say(f"  annotations      {res.annotations}   (annotations.parquet, <scan>/flow.nii.gz, pwcnet.pt, feature_pyramid.pt)")
    if res.cv:
        _say(f"  cross-validation {res.cv}   (folds.csv, summary.json)")
    if res.corpus:
        _say(f"  corpus           {res.corpus}   (shard-*.tar, manifest.json, previews/; read with cardiomotion.generate.open_corpus)")
    _say(f"  MLflow store     {res.tracking_uri}")
    _say(f"                   browse it: {ui_hint(res.tracking_uri)}")
    for fig in res.figures:
        _say(f"  figure           {fig}")
    return 0


# ---------------------------------------------------------------------------- doctor
def cmd_doctor(args) -> int:
    from .cluster import doctor

    cfg = _load(args)
    checks = doctor(cfg, args.cluster, connect=not args.offline)
    _say(f"cardiomotion {__version__}: pre-flight checks{' (config ' + args.config + ')' if args.config else ''}")
    for c in checks:
        _say(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:13s} {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"error: {len(failed)} of {len(checks)} checks failed ({', '.join(c.name for c in failed)})",
              file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------- generate / export
def cmd_generate(args) -> int:
    from .generate import generate_corpus

    cfg = _load(args, {"generate": _given(seed=args.seed, temperature=args.temperature)})
    t0 = time.perf_counter()
    if args.frames:
        from .generate import generate_from_frames

        manifest = generate_from_frames(args.model, args.frames, args.out, args.n, cfg=cfg, track=not args.no_track,
                                        log=_say)
    else:
        manifest = generate_corpus(args.model, args.prepared, args.out, args.n, cfg=cfg, track=not args.no_track,
                                   log=_say)
    _say(f"corpus {manifest.parent} complete ({args.n} samples) in {time.perf_counter() - t0:.0f} s")
    _say(f"  manifest {manifest}")
    return 0


def cmd_export(args) -> int:
    from .generate import export_sample

    cfg = _load(args)
    paths = export_sample(args.corpus, args.index, args.out, gif=not args.no_gif, traversal=args.traversal,
                          model=args.model, cfg=cfg)
    _say(f"exported sample {args.index} of {args.corpus}:")
    for name, path in paths.items():
        _say(f"  {name:9s} {path}")
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors on one line, as every other refusal (argparse's own prints the
    usage block first); ``--help`` is named for the usage. Sub-command parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="cardiomotion", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"cardiomotion {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantom", help="write the analytic beating-heart cohort")
    s.add_argument("--out", required=True, help="output folder (one sub-folder per patient)")
    s.add_argument("--patients", type=int, help="number of patients (config phantom.patients)")
    s.add_argument("--grid", type=int, help="voxels per axis (config phantom.grid)")
    s.add_argument("--spacing", type=float, help="voxel size in mm (default: field of view / grid)")
    s.add_argument("--phases", type=int, help="cardiac phases (config phantom.phases, 10)")
    s.add_argument("--seed", type=int, help="cohort seed (config phantom.seed)")
    s.add_argument("--workers", type=int, help="parallel processes (default: all cores)")
    s.add_argument("--preview", action="store_true", help="also write <patient>/preview.png (ES, ED, |ED-ES|, true flow)")
    s.add_argument("--config", help="YAML config (e.g. configs/default.yaml; default: the built-in settings)")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("prepare", help="resample ES/ED of 4DCT scans to the common grid (Ray Data)")
    s.add_argument("--scans", nargs="+", required=True, help="4-D NIfTI files, per-phase NIfTI/DICOM folders or phantom patient folders")
    s.add_argument("--out", required=True, help="prepared dataset folder")
    s.add_argument("--manifest", help="CSV/JSON with scan_id, es_phase, ed_phase (else detected)")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("annotate", help="train the 3D PWC-Net and write ED←ES flows for prepared pairs")
    s.add_argument("--prepared", required=True, help="prepared dataset folder (from `prepare`)")
    s.add_argument("--out", required=True, help="output folder for flows, annotations.parquet and the pyramid")
    s.add_argument("--network", help="annotation folder of the same prepared set whose trained PWC-Net to reuse "
                                     "instead of training one (same network settings; only annotate.refine* may differ)")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_annotate)

    s = sub.add_parser("train", help="train the CVAE on one leave-one-out fold (Ray Train, MLflow)")
    s.add_argument("--prepared", required=True, help="prepared dataset folder")
    s.add_argument("--flows", required=True, help="annotation folder (flows + feature_pyramid.pt)")
    s.add_argument("--fold", type=int, required=True, help="index of the held-out scan (scan-id order)")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("config", help="print the effective configuration, or the reference of every key")
    s.add_argument("--config", help="YAML config to merge over the defaults")
    s.add_argument("--reference", action="store_true", help="Markdown table of every key, default and meaning")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("cv", help="leave-one-out cross-validation, folds concurrently on Ray (MLflow parent run)")
    s.add_argument("--prepared", required=True, help="prepared dataset folder")
    s.add_argument("--flows", required=True, help="annotation folder (flows + feature_pyramid.pt)")
    s.add_argument("--out", required=True, help="sweep folder: folds.csv, summary.json, per-fold state (rerun to resume)")
    s.add_argument("--folds", default="all", help="'all' (default), or fold indices, ranges or scan ids: 0,3,7 or 0-21 or phantom_003")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_cv)

    s = sub.add_parser("tune", help="Ray Tune search over loss weights, learning rate and KL warm-up (ASHA)")
    s.add_argument("--prepared", required=True, help="prepared dataset folder")
    s.add_argument("--flows", required=True, help="annotation folder (flows + feature_pyramid.pt)")
    s.add_argument("--out", required=True, help="search folder: best.yaml, trials.csv, Tune state (rerun to resume)")
    s.add_argument("--samples", type=int, help="number of trials (config tune.samples)")
    s.add_argument("--config", help="YAML config (search space: the tune section)")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("utility", help="downstream utility: the same estimator trained on CVAE corpus, random fields, "
                                        "annotated and unsupervised real pairs; scored on held-out truth (Ray)")
    s.add_argument("--prepared", required=True, help="prepared phantom dataset folder (held-out scans need exact truth)")
    s.add_argument("--flows", required=True, help="annotation folder (flows + feature_pyramid.pt)")
    s.add_argument("--out", required=True, help="experiment folder: utility.csv, summary.json, utility.png, runs.jsonl "
                                                "(rerun to resume)")
    s.add_argument("--folds", default="all", help="'all' (default), or fold indices, ranges or scan ids: 0-7")
    s.add_argument("--sizes", help="corpus sizes N, comma separated (config utility.sizes)")
    s.add_argument("--seeds", type=int, help="estimator seeds (config utility.seeds)")
    s.add_argument("--steps", type=int, help="Adam steps per estimator (config utility.steps)")
    s.add_argument("--corpus", choices=["materialized", "on_the_fly"], help="config utility.corpus")
    s.add_argument("--generators", help="an earlier utility --out made from the same inputs: reuse its fold CVAEs "
                                        "(e.g. to sample them at another generate.temperature) instead of training")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_utility)

    s = sub.add_parser("demo", help="run the whole pipeline on a phantom cohort")
    s.add_argument("--config", help="YAML config (make demo uses configs/smoke.yaml)")
    s.add_argument("--out", default="demo_output", help="output folder")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("doctor", help="check storage root, MLflow server and Ray cluster (and a cluster.yaml) before a run")
    s.add_argument("--config", help="YAML config (e.g. configs/cluster.yaml)")
    s.add_argument("--cluster", help="also validate this Ray cluster-launcher file against Ray's schema")
    s.add_argument("--offline", action="store_true", help="do not attach to the configured Ray cluster")
    s.set_defaults(func=cmd_doctor)
    s = sub.add_parser("generate", help="generate a sharded (ES, ED_syn, flow) corpus from a trained CVAE (Ray Data)")
    s.add_argument("--model", required=True, help="model URI (runs:/<run_id>/model, models:/<name>@<alias>) or model folder")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prepared", help="prepared dataset folder (ES frames on the model's grid)")
    src.add_argument("--frames", nargs="+", metavar="PATH",
                     help="single 3-D frames to condition on (NIfTI, NRRD, MetaImage, or a folder holding one DICOM "
                          "series): prepared on the model's grid into OUT/frames, their sources kept in the manifest")
    s.add_argument("--out", required=True, help="corpus folder (new, or an unfinished corpus to resume)")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--seed", type=int, help="corpus seed (config generate.seed, else seed)")
    s.add_argument("--temperature", type=float, help="prior temperature T: z ~ N(0, T²I) (config generate.temperature)")
    s.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("export", help="export a corpus sample: NIfTI (flow as displacement field), GIF, traversal")
    s.add_argument("--corpus", required=True, help="corpus folder (from `generate`)")
    s.add_argument("--index", type=int, required=True, help="sample index")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--traversal", action="store_true", help="also the latent-traversal mosaic of the sample's scan")
    s.add_argument("--model", help="model to decode the traversal with (default: the corpus' model URI)")
    s.add_argument("--no-gif", action="store_true", help="skip the ES→ED transition GIF")
    s.add_argument("--config", help="YAML config")
    s.set_defaults(func=cmd_export)
    for s in sub.choices.values():  # --debug after the command too (SUPPRESS: absent, it leaves the top level's)
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("phantom",):
        _quiet_ray(args)  # every other stage may start Ray
    try:
        return int(args.func(args) or 0)
    except CardiomotionError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (permissions, disk full, a file in the way)
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
