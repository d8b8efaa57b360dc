"""Score fold CVAEs as motion priors at several prior temperatures, without training anything.

For every fold generator of a ``cardiomotion utility`` folder (``folds/<scan>/generator.json``)
the bench draws K prior samples of the fold's held-out ES frame at each temperature T
(z ~ N(0, T²·I), as ``generate.temperature`` draws a corpus) and scores them with the library's
:func:`cardiomotion.evaluate.prior.evaluate_prior` against the exact phantom truth and the
annotated flow: the energy score (strictly proper), spread–skill and magnitude ratios, folding,
and the ejection fraction of the synthetic EDs next to the truth's. The held-out scan was seen by
no generator (utility trains each fold's CVAE without it; with ``cv.pyramid: shared`` its images
were seen, unsupervised, by the frozen pyramid). It answers "at which temperature is a generator's
distribution closest to the truth?" before any estimator is trained on a corpus drawn at it.

    python bench/prior_temperature.py --utility U46 --prepared P --flows A46_001 --config u46.yaml \\
        --temperatures 0.5,1,1.5,2,2.5 --k 16 --out prior_t.jsonl

JSON lines (one per fold and T) stream to ``--out`` (a rerun skips the rows of the same fold, T, K,
seed and generator; the folder's ``inputs.json`` must name ``--prepared`` and ``--flows``); the summary on
stdout (JSON) gives per T the mean over folds of every score and, for the energy score against the
truth, each T's mean difference to the best T with the folds it wins.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utility", required=True, help="a utility --out folder (its fold generators are scored)")
    ap.add_argument("--prepared", required=True, help="the prepared phantom folder it was run on (exact truth)")
    ap.add_argument("--flows", required=True, help="its annotation folder (the held-out annotated flow)")
    ap.add_argument("--config", help="the utility run's config (where the tracking store is)")
    ap.add_argument("--temperatures", default="0.5,1,1.5,2,2.5", help="prior temperatures T, comma separated")
    ap.add_argument("--k", type=int, default=16, help="prior samples per held-out scan and T")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON lines, one per (fold, T); a rerun resumes")
    args = ap.parse_args(argv)

    from cardiomotion.config import load_config
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.errors import CardiomotionError
    from cardiomotion.evaluate.prior import evaluate_prior
    from cardiomotion.evaluate.utility_generators import read_generator_record
    from cardiomotion.evaluate.utility_plan import INPUTS_FILE, check_inputs
    from cardiomotion.fileio import append_json_lines, read_json_lines
    from cardiomotion.generate.model import load_networks, resolve_model
    from cardiomotion.train.fold import load_samples, plan_fold

    try:
        cfg = load_config(args.config)
        temps = _floats(args.temperatures)
        table = {str(r["scan_id"]): r for r in read_scan_table(args.prepared).to_dict("records")}
        ids = sorted(table)
        utility = Path(args.utility)
        folds = sorted((utility / "folds").glob("*/generator.json"))
        if not folds:
            raise CardiomotionError(f"{args.utility}: no fold generators (folds/<scan>/generator.json)")
        if (utility / INPUTS_FILE).is_file():  # the generators were made from these inputs, or refused
            check_inputs(utility, Path(args.prepared).resolve(), Path(args.flows).resolve())
        out = Path(args.out)
        done = {_key(r) for r in read_json_lines(out)} if out.is_file() else set()
        models: set[str] = set()  # the generators scored: what the summary reads
        for record in folds:
            scan = record.parent.name
            rec = read_generator_record(record)
            models.add(rec["model_uri"])
            if scan not in table:
                raise CardiomotionError(f"{record}: its held-out scan {scan} is not in {args.prepared}")
            todo = [t for t in temps if _key({"scan": scan, "temperature": t, "k": args.k, "seed": args.seed,
                                              "model_uri": rec["model_uri"]}) not in done]
            if not todo:
                continue
            resolved = resolve_model(rec["model_uri"], cfg)
            model, pyramid = load_networks(resolved.blobs())
            plan = plan_fold(args.prepared, args.flows, ids.index(scan), pyramid="shared")
            es, flow = load_samples(plan, [scan], resolved.meta["intensity_window"])
            pair = load_pair(args.prepared, table[scan], with_truth=True)
            for t in todo:
                t0 = time.perf_counter()
                rep = evaluate_prior(model, pyramid, es, flow[0], plan.spacing_mm, k=args.k, seed=args.seed,
                                     truth=pair.truth_flow, es_labels=pair.es_labels, temperature=t)
                row = {"scan": scan, "temperature": t, "k": args.k, "seed": args.seed, "model_uri": rec["model_uri"],
                       "seconds": round(time.perf_counter() - t0, 2), **rep.metrics}
                append_json_lines(out, [row])
                print(f"{scan} T {t}: truth energy score {row.get('prior_truth_energy_score_mm', float('nan')):.3f} mm",
                      file=sys.stderr, flush=True)
    except CardiomotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [r for r in read_json_lines(out) if r["temperature"] in temps and r["k"] == args.k
            and r["seed"] == args.seed and r["model_uri"] in models]
    print(json.dumps(summarize(rows, temps), indent=1))
    return 0


def _key(row: dict) -> tuple:
    """What a row measured: a rerun with another K, seed or generator is other rows."""
    return row["scan"], row["temperature"], row["k"], row["seed"], row["model_uri"]


def summarize(rows: list[dict], temps: list[float]) -> dict:
    """Per T the mean over the folds every T has of each score; for the truth energy score each
    T's mean paired difference to the best T and the folds where it is the best."""
    by = {t: {r["scan"]: r for r in rows if r["temperature"] == t} for t in temps}
    scans = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    keys = sorted({k for r in rows for k, v in r.items() if k.startswith(("prior_", "truth_", "reference_"))
                   and isinstance(v, (int, float))})
    per_t = {str(t): {k: float(sum(by[t][s][k] for s in scans) / len(scans))
                      for k in keys if all(k in by[t][s] and math.isfinite(by[t][s][k]) for s in scans)}
             for t in temps} if scans else {}
    score = "prior_truth_energy_score_mm"
    summary: dict = {"scans": scans, "per_temperature": per_t}
    if scans and all(score in per_t[str(t)] for t in temps):
        best = min(temps, key=lambda t: per_t[str(t)][score])
        summary["best_temperature_by_truth_energy"] = best
        summary["truth_energy_vs_best"] = {
            str(t): {"mean_diff_mm": float(sum(by[t][s][score] - by[best][s][score] for s in scans) / len(scans)),
                     "folds_best": sum(min(temps, key=lambda u: by[u][s][score]) == t for s in scans)}
            for t in temps}
    return summary


if __name__ == "__main__":
    sys.exit(main())
