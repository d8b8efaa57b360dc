"""Compare CVAE training recipes as motion priors on the same leave-one-out folds and seeds.

For every (setting, fold) the bench trains the fold's CVAE in this process with the library's
own epoch (:func:`cardiomotion.train.cvae.train_epoch`, the step ``train``/``cv`` run on this
device), then scores K prior samples of the held-out scan (:func:`cardiomotion.evaluate.prior.
evaluate_prior`): energy score against the annotated flow and the exact truth, best-of-K,
spread–skill and magnitude ratios, folding, and the physiology (EF, longitudinal shortening,
myocardial volume change) of every synthetic ED next to the truth's. The held-out scan is seen
by nothing but the evaluation — except the frozen pyramid of ``annotate``, which (as in ``cv``
with ``cv.pyramid: shared``) was fitted on all pairs; ``--pyramid per_fold`` trains each fold's
pyramid without its held-out scan (:func:`cardiomotion.annotate.train_fold_pyramid`, Ray Train)
and labels the rows ``<setting>+fold_pyramid``.

No Ray and no MLflow: a fold here is the fold ``cv`` trains, minus the orchestration, so many
settings fit on a small machine. Results stream to ``--out`` (one JSON line per fold; a rerun
skips finished ones), and the summary (JSON on stdout, a Markdown table in ``--table``)
compares every setting with ``paper`` on the folds both finished.

    python bench/prior_recipes.py --prepared P --flows A --config S --folds 0-7 --epochs 300 \\
        --settings paper,elbo_b0.1 --out prior.jsonl --table prior.md --jobs 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

# name → overrides of the ``train`` section (on top of --config)
SETTINGS: dict[str, dict] = {
    "paper": {"recipe": "paper"},
    "elbo_b10": {"recipe": "elbo", "beta": 10.0},
    "elbo_b3": {"recipe": "elbo", "beta": 3.0},
    "elbo_b1": {"recipe": "elbo", "beta": 1.0},
    "elbo_b0.3": {"recipe": "elbo", "beta": 0.3},
    "elbo_b0.1": {"recipe": "elbo", "beta": 0.1},
    "elbo_b0.03": {"recipe": "elbo", "beta": 0.03},
    "elbo_b0.1_warmup": {"recipe": "elbo", "beta": 0.1, "kl_warmup_epochs": "third"},
    "elbo_b0.1_cyclical": {"recipe": "elbo", "beta": 0.1, "kl_schedule": "cyclical", "kl_cycles": 4},
    "elbo_b0.1_freebits": {"recipe": "elbo", "beta": 0.1, "free_bits": 4.0},
    "elbo_b0.1_z8": {"recipe": "elbo", "beta": 0.1, "model": {"latent_channels": 8}},
    "elbo_b0.1_z64": {"recipe": "elbo", "beta": 0.1, "model": {"latent_channels": 64}},
    "paper_velocity": {"recipe": "paper", "model": {"output": "velocity"}},
    "paper_z8": {"recipe": "paper", "model": {"latent_channels": 8}},
    "paper_z4": {"recipe": "paper", "model": {"latent_channels": 4}},
    "paper_z2": {"recipe": "paper", "model": {"latent_channels": 2}},
    "paper_z16": {"recipe": "paper", "model": {"latent_channels": 16}},
    "paper_z8_velocity": {"recipe": "paper", "model": {"latent_channels": 8, "output": "velocity"}},
    # the paper states an intensity-noise *variance* of 0.015: std sqrt(0.015) = 0.1225 ([0, 1] units)
    "paper_z8_noisevar": {"recipe": "paper", "model": {"latent_channels": 8}, "augment": {"noise_std": 0.1225}},
    "paper_noisevar": {"recipe": "paper", "augment": {"noise_std": 0.1225}},
    "paper_z4_velocity": {"recipe": "paper", "model": {"latent_channels": 4, "output": "velocity"}},
    "paper_cyclical": {"recipe": "paper", "kl_schedule": "cyclical", "kl_cycles": 4},
    "paper_warmup": {"recipe": "paper", "kl_warmup_epochs": "third"},
    "paper_freebits": {"recipe": "paper", "free_bits": 4.0},
    # latent 8 with more information through the latent (issue 12's reconstruction target): free
    # bits above the ~4.9 nats per channel latent 8 keeps at 300 epochs, cyclical annealing, and
    # half the KL weight
    "paper_z8_freebits6": {"recipe": "paper", "free_bits": 6.0, "model": {"latent_channels": 8}},
    "paper_z8_freebits10": {"recipe": "paper", "free_bits": 10.0, "model": {"latent_channels": 8}},
    "paper_z8_cyclical": {"recipe": "paper", "kl_schedule": "cyclical", "kl_cycles": 4,
                          "model": {"latent_channels": 8}},
    "paper_z8_wkl0.025": {"recipe": "paper", "w_kl": 0.025, "model": {"latent_channels": 8}},
    # the chosen default (latent 8, cyclical) with a velocity output: issue 12's folding target
    "paper_z8_cyclical_velocity": {"recipe": "paper", "kl_schedule": "cyclical", "kl_cycles": 4,
                                   "model": {"latent_channels": 8, "output": "velocity"}},
    "elbo_b3_z8": {"recipe": "elbo", "beta": 3.0, "model": {"latent_channels": 8}},
    "elbo_b3_velocity": {"recipe": "elbo", "beta": 3.0, "model": {"output": "velocity"}},
    "elbo_b0.1_velocity": {"recipe": "elbo", "beta": 0.1, "model": {"output": "velocity"}},
    "elbo_b0.3_velocity": {"recipe": "elbo", "beta": 0.3, "model": {"output": "velocity"}},
}


def parse_folds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def setting_config(base_path: str | None, name: str, epochs: int):
    from cardiomotion.config import load_config

    if name not in SETTINGS:
        raise SystemExit(f"prior_recipes: unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    over = json.loads(json.dumps(SETTINGS[name]))
    # every setting is relative to the paper's model: its latent has the coarsest pyramid's
    # channels and its KL no free bits and a constant weight unless the setting says otherwise (the
    # project's defaults are latent 8 and a cyclical schedule since this bench chose them; without
    # this, "paper" would silently be "paper_z8_cyclical")
    over.setdefault("model", {}).setdefault("latent_channels", None)
    over.setdefault("free_bits", 0.0)
    over.setdefault("kl_schedule", "linear")
    over.setdefault("kl_warmup_epochs", 0)
    if over.get("kl_warmup_epochs") == "third":
        over["kl_warmup_epochs"] = max(1, epochs // 3)
    over["epochs"] = epochs
    return load_config(base_path, {"train": over})


def _die_with_parent() -> None:
    """Linux: this worker gets SIGTERM when the bench process dies (a killed bench leaves no
    orphaned workers training on)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_fold(args: dict) -> list[dict]:
    """Train one (setting, fold) in this process and evaluate its prior at each temperature;
    returns one result row per temperature."""
    import torch

    _die_with_parent()
    torch.set_num_threads(args["threads"])
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.evaluate.prior import evaluate_prior
    from cardiomotion.flow.metrics import folding_fraction
    from cardiomotion.models.pyramid import FeaturePyramid
    from cardiomotion.train.cvae import build_cvae, train_epoch
    from cardiomotion.train.fold import PYRAMID_FILE, load_samples, plan_fold
    from cardiomotion.train.recipe import StepRecipe

    cfg = setting_config(args["config"], args["setting"], args["epochs"])
    tc = cfg.train
    plan = plan_fold(args["prepared"], args["flows"], args["fold"])
    pyramid_file = plan.flows / PYRAMID_FILE
    if args.get("pyramid", "shared") == "per_fold":
        from cardiomotion.annotate import train_fold_pyramid
        from cardiomotion.raycluster import init_ray

        ray = init_ray(cfg.ray)
        try:
            pyramid_file = train_fold_pyramid(plan.prepared, plan.flows, plan.val_id, cfg)
        finally:
            ray.shutdown()
    device = torch.device("cpu")
    recipe = StepRecipe.for_device(device, bf16=tc.bf16, channels_last=tc.channels_last)
    torch.manual_seed(cfg.seed)
    es_all, flow_all = load_samples(plan, list(plan.train_ids), cfg.intensity.window)
    es_v, flow_v = load_samples(plan, [plan.val_id], cfg.intensity.window)
    pyramid = FeaturePyramid.load(pyramid_file).eval()
    pyramid.requires_grad_(False)
    recipe.place(pyramid, device)
    model = recipe.place(build_cvae(cfg, pyramid.config()), device)
    opt = recipe.optimizer(model.parameters(), tc.lr, device)
    steps = max(1, math.ceil(len(plan.train_ids) / tc.batch_size))
    t0 = time.perf_counter()
    last = {}
    for epoch in range(tc.epochs):
        last = train_epoch(model, pyramid, opt, es_all, flow_all, cfg, epoch, steps=steps, device=device,
                           recipe=recipe)
    train_s = time.perf_counter() - t0
    model.eval()
    table = read_scan_table(plan.prepared)
    row = table[table.scan_id.astype(str) == plan.val_id].iloc[0].to_dict()
    pair = load_pair(plan.prepared, row, with_truth=True)
    with torch.no_grad():
        feats = pyramid(es_v)
        mu, _ = model.encode(flow_v, es_v, feats)
        rec = model.decode(mu, es_v, feats).float()
    if args.get("models"):
        Path(args["models"]).mkdir(parents=True, exist_ok=True)
        model.save(Path(args["models"]) / f"{args['setting']}_fold{plan.fold:03d}_e{tc.epochs}.pt")
    base = {"fold": plan.fold, "scan": plan.val_id, "epochs": tc.epochs,
            # what was trained, so a row describes itself whatever the defaults are later
            "latent_elements": int(np.prod(model.latent_shape(es_v.shape[2:]))), "output": tc.model.output.value,
            "recipe": tc.recipe.value,
            "train_s": round(train_s, 1), "train_loss": last.get("train_loss"), "train_kl": last.get("train_kl"),
            "rec_epe_vox": float(torch.linalg.vector_norm(rec - flow_v, dim=1).mean()),
            "rec_folding": folding_fraction(rec)}
    if pair.truth_flow is not None:
        base["rec_truth_epe_vox"] = float(torch.linalg.vector_norm(rec[0] - torch.from_numpy(pair.truth_flow), dim=0).mean())
    rows = []
    for temp in args.get("temperatures", [1.0]):
        # the same trained model, its prior drawn at z ~ N(0, T²·I) (generate.temperature)
        rep = evaluate_prior(model, pyramid, es_v, flow_v, plan.spacing_mm, k=args["k"], seed=cfg.seed + 7919,
                             truth=pair.truth_flow, es_labels=pair.es_labels, temperature=temp)
        label = args["setting"] + ("+fold_pyramid" if args.get("pyramid") == "per_fold" else "")
        name = label if temp == 1.0 else f"{label}@T{temp:g}"
        rows.append({"setting": name, "temperature": temp, "pyramid": args.get("pyramid", "shared"), **base, **rep.metrics,
                     "sample_ef": [p.ef for p in rep.samples_physiology]})
    return rows


def summarize(rows: list[dict], ef_cohort: list[float]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    keys = ["prior_energy_score_vox", "prior_truth_energy_score_vox", "prior_best_of_k_vox", "prior_spread_skill",
            "prior_magnitude_ratio", "rec_epe_vox", "rec_truth_epe_vox", "prior_folding", "prior_ef_mean",
            "prior_ef_std", "truth_ef", "prior_longitudinal_shortening_mean", "truth_longitudinal_shortening",
            "prior_myo_volume_change_mean", "truth_myo_volume_change", "train_s"]
    lo, hi = (np.percentile(ef_cohort, [5, 95]) if ef_cohort else (float("nan"), float("nan")))
    paper_folds = {r["fold"]: r for r in by.get("paper", [])}
    out = {"cohort_ef_p5": float(lo), "cohort_ef_p95": float(hi), "settings": {}}
    for name, rs in by.items():
        s: dict = {"folds": sorted(r["fold"] for r in rs), "epochs": sorted({r["epochs"] for r in rs})}
        for k in keys:
            v = np.asarray([r[k] for r in rs if r.get(k) is not None], float)
            if len(v):
                s[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        efs = np.concatenate([np.asarray(r.get("sample_ef", []), float) for r in rs]) if rs else np.zeros(0)
        if len(efs) and ef_cohort:
            p5, p95 = np.percentile(efs, [5, 95])
            s["ef_coverage"] = float(max(0.0, min(p95, hi) - max(p5, lo)) / (hi - lo)) if hi > lo else float("nan")
            s["ef_samples_p5_p95"] = [float(p5), float(p95)]
        s["ef_spread_per_scan_pts"] = float(np.mean([100 * (max(r["sample_ef"]) - min(r["sample_ef"]))
                                                     for r in rs if r.get("sample_ef")])) if rs else float("nan")
        common = [r for r in rs if r["fold"] in paper_folds and r["epochs"] == paper_folds[r["fold"]]["epochs"]]
        if common and name != "paper":
            es_a = np.mean([paper_folds[r["fold"]]["prior_energy_score_vox"] for r in common])
            es_b = np.mean([r["prior_energy_score_vox"] for r in common])
            rec_a = np.mean([paper_folds[r["fold"]]["rec_epe_vox"] for r in common])
            rec_b = np.mean([r["rec_epe_vox"] for r in common])
            s["vs_paper"] = {"folds": len(common), "energy_improvement": float(1 - es_b / es_a),
                             "rec_epe_change": float(rec_b / rec_a - 1)}
            truth = [r for r in common if r.get("rec_truth_epe_vox") is not None
                     and paper_folds[r["fold"]].get("rec_truth_epe_vox") is not None]
            if truth:  # reconstruction against the exact phantom field (annotation noise is not motion)
                rt_a = np.mean([paper_folds[r["fold"]]["rec_truth_epe_vox"] for r in truth])
                rt_b = np.mean([r["rec_truth_epe_vox"] for r in truth])
                s["vs_paper"]["rec_truth_epe_change"] = float(rt_b / rt_a - 1)
        out["settings"][name] = s
    return out


def markdown(summary: dict) -> str:
    cols = [("ES annot. (vox)", "prior_energy_score_vox", "{:.3f}"), ("ES truth (vox)", "prior_truth_energy_score_vox", "{:.3f}"),
            ("best-of-K", "prior_best_of_k_vox", "{:.3f}"), ("spread/skill", "prior_spread_skill", "{:.2f}"),
            ("magnitude", "prior_magnitude_ratio", "{:.2f}"), ("rec EPE (vox)", "rec_epe_vox", "{:.3f}"),
            ("rec EPE truth (vox)", "rec_truth_epe_vox", "{:.3f}"),
            ("EF samples (%)", "prior_ef_mean", "{:.1%}"), ("EF sd/scan", "prior_ef_std", "{:.1%}"),
            ("folding", "prior_folding", "{:.4f}")]
    head = ("| setting | folds × epochs | " + " | ".join(c[0] for c in cols)
            + " | EF coverage | EF range/scan (pts) | ES vs paper | rec vs paper | rec truth vs paper |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summary["settings"].items():
        cells = [s[k]["mean"] if k in s else None for _, k, _ in cols]
        txt = [("–" if v is None else f.format(v)) for v, (_, _, f) in zip(cells, cols)]
        vp = s.get("vs_paper")
        rt = vp.get("rec_truth_epe_change") if vp else None
        lines.append(f"| {name} | {len(s['folds'])} × {','.join(map(str, s['epochs']))} | " + " | ".join(txt)
                     + f" | {s.get('ef_coverage', float('nan')):.0%} | {s.get('ef_spread_per_scan_pts', float('nan')):.1f} | "
                     + (f"{vp['energy_improvement']:+.1%} | {vp['rec_epe_change']:+.1%} | " if vp else "– | – | ")
                     + ("–" if rt is None else f"{rt:+.1%}") + " |")
    return "\n".join(lines) + "\n"


def write_ef_figures(rows: list[dict], ef_cohort: list[float], summary: dict, folder: Path) -> list[Path]:
    """One EF histogram per summarised setting: the synthetic-ED EFs of all its samples (every
    fold) over the cohort's true EFs."""
    from cardiomotion.evaluate.figures import plot_ef_histogram

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, s in summary["settings"].items():
        efs = [e for r in rows if r["setting"] == name for e in r.get("sample_ef", [])]
        if not efs:
            continue
        title = (f"{name}\n{len(s['folds'])} folds × {','.join(map(str, s['epochs']))} epochs, "
                 f"EF coverage {s.get('ef_coverage', float('nan')):.0%}")
        paths.append(plot_ef_histogram(efs, ef_cohort, folder / f"ef_{name.replace('@', '_')}.png", title=title))
    return paths


def read_rows(path: Path) -> list[dict]:
    """The finished rows of ``path``: a truncated last line (a run killed mid-write) is dropped
    with a warning and its fold trained again; damage elsewhere stops with the file and line."""
    from cardiomotion.errors import InputError
    from cardiomotion.fileio import read_json_lines

    try:
        return read_json_lines(path, log=lambda m: print(f"prior_recipes: {m}", file=sys.stderr))
    except InputError as exc:
        raise SystemExit(f"prior_recipes: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--flows", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--folds", default="0-7")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--settings", default="paper,elbo_b0.1")
    ap.add_argument("--k", type=int, default=16, help="prior samples per held-out scan")
    ap.add_argument("--temperatures", default="1", help="prior temperatures each trained model is scored at (comma list)")
    ap.add_argument("--models", default=None, help="save every trained model here (cvae checkpoints)")
    ap.add_argument("--jobs", type=int, default=1, help="folds trained at once (processes)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per job (0: cores / jobs)")
    ap.add_argument("--pyramid", choices=("shared", "per_fold"), default="shared",
                    help="per_fold: each fold's frozen pyramid trained without its held-out scan (cv.pyramid)")
    ap.add_argument("--out", required=True, help="JSON-lines results file (appended; finished folds skipped)")
    ap.add_argument("--table", default=None, help="write the Markdown table here")
    ap.add_argument("--summary-only", action="store_true", help="only summarise --out")
    ap.add_argument("--figures", default=None,
                    help="write ef_<setting>.png here: every sample's synthetic-ED EF over the cohort's true EFs")
    a = ap.parse_args(argv)

    from cardiomotion.fileio import append_json_lines

    out = Path(a.out)
    rows = read_rows(out)
    done = {(r["setting"].split("@")[0], r["fold"], r["epochs"]) for r in rows}
    settings = [s for s in a.settings.split(",") if s]
    for s in settings:
        setting_config(a.config, s, a.epochs)  # unknown names and bad values fail before any work
    suffix = "+fold_pyramid" if a.pyramid == "per_fold" else ""
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    todo = [{"setting": s, "fold": f, "epochs": a.epochs, "prepared": a.prepared, "flows": a.flows, "config": a.config,
             "k": a.k, "threads": threads, "models": a.models, "pyramid": a.pyramid,
             "temperatures": [float(t) for t in a.temperatures.split(",") if t]}
            for f in parse_folds(a.folds) for s in settings if (s + suffix, f, a.epochs) not in done]
    if not a.summary_only and todo:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(run_fold, t): t for t in todo}
            for i, fut in enumerate(as_completed(futs), 1):
                t = futs[fut]
                try:
                    new = fut.result()
                except Exception as exc:  # report and go on: the other folds are still worth having
                    print(f"prior_recipes: {t['setting']} fold {t['fold']} failed: {exc}", file=sys.stderr)
                    continue
                rows.extend(new)
                append_json_lines(out, new)
                for r in new:
                    print(f"[{i}/{len(todo)}] {r['setting']} fold {r['fold']}: ES {r['prior_energy_score_vox']:.3f} "
                          f"ratio {r['prior_spread_skill']:.2f} mag {r['prior_magnitude_ratio']:.2f} "
                          f"rec {r['rec_epe_vox']:.3f} ({r['train_s']:.0f} s)", file=sys.stderr, flush=True)
    cohort_file = out.with_suffix(".cohort.json")
    if cohort_file.is_file():
        ef = json.loads(cohort_file.read_text())
    else:
        from cardiomotion.evaluate.physiology import cohort_ejection_fractions

        ef = cohort_ejection_fractions(a.prepared)
        tmp = cohort_file.with_name(cohort_file.name + ".tmp")
        tmp.write_text(json.dumps(ef))
        os.replace(tmp, cohort_file)
    summary = summarize([r for r in rows if r["setting"].split("@")[0] in settings
                         or r["setting"].split("@")[0].removesuffix("+fold_pyramid") in settings or a.summary_only], ef)
    if a.table:
        Path(a.table).write_text(markdown(summary))
    if a.figures:
        write_ef_figures(rows, ef, summary, Path(a.figures))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
