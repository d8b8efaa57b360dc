"""How much motion the annotations and a corpus carry, against the phantom's exact truth.

A generator fitted to annotated flows can only be as calibrated as they are. On a prepared phantom
cohort (exact truth per scan) this prints JSON with, in the ED myocardium:

* ``annotated``: per scan mean ‖annotated‖ / mean ‖truth‖ (:func:`cardiomotion.flow.magnitude_ratio`
  over the true ED myocardium), summarised over the scans;
* per ``--corpus``: each sample's mean ‖u‖ over the myocardium its own flow implies (the ES labels of
  its conditioning scan pulled through it), divided by that scan's truth and by its annotation
  (same means as above), averaged per conditioning scan, then over scans; and the spread of the
  samples of one scan (coefficient of variation of their magnitudes).

    python bench/flow_magnitude.py --prepared P --flows A [--corpus U/folds/phantom_000/corpus ...] [--n 256]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "below_one": int((v < 1).sum()), "count": int(v.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, help="prepared phantom folder (exact truth flows)")
    ap.add_argument("--flows", required=True, help="annotation folder of the same scans")
    ap.add_argument("--corpus", action="append", default=[], help="corpus folder (repeatable)")
    ap.add_argument("--n", type=int, default=256, help="first N samples of each corpus")
    args = ap.parse_args(argv)
    from cardiomotion.data.phantom import LV_MYO
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.physiology import synthetic_ed_labels
    from cardiomotion.flow import magnitude_ratio, read_flow
    from cardiomotion.generate import open_corpus
    from cardiomotion.layout import flow_path

    def myo_mean(u: np.ndarray, mask: np.ndarray) -> float:
        return float(np.linalg.norm(u[:, mask], axis=0).mean())

    try:
        truth, annotated, es_labels, ratios = {}, {}, {}, {}
        for row in read_scan_table(args.prepared).to_dict("records"):
            pair = load_pair(args.prepared, row, with_truth=True)
            if pair.truth_flow is None or pair.ed_labels is None or pair.es_labels is None:
                raise InputError(Path(args.prepared) / pair.scan_id, "has no exact truth flow or labels (a phantom scan is needed)")
            flow, _ = read_flow(flow_path(args.flows, pair.scan_id))
            myo = pair.ed_labels == LV_MYO
            truth[pair.scan_id] = myo_mean(pair.truth_flow, myo)
            annotated[pair.scan_id] = myo_mean(flow, myo)
            ratios[pair.scan_id] = magnitude_ratio(flow, pair.truth_flow, mask=myo)
            es_labels[pair.scan_id] = pair.es_labels
        out = {"prepared": str(args.prepared), "flows": str(args.flows),
               "annotated_vs_truth": _stats(list(ratios.values())),
               "truth_myo_vox": _stats(list(truth.values())), "corpora": {}}
        for path in args.corpus:
            corpus = open_corpus(path)
            n = min(args.n, len(corpus))
            per: dict[str, list[float]] = {}
            temperature = None
            for i in range(n):
                s = corpus[i]
                u = np.asarray(s["flow"], dtype=np.float32)
                sid = str(s["scan_id"])
                if sid not in truth:
                    raise InputError(Path(path), f"sample {i} is conditioned on {sid}, which {args.prepared} does not hold")
                mask = synthetic_ed_labels(es_labels[sid], u) == LV_MYO
                per.setdefault(sid, []).append(myo_mean(u, mask))
                temperature = s["meta"].get("temperature")
            out["corpora"][str(path)] = {
                "samples": n, "temperature": temperature, "conditioning_scans": len(per),
                "vs_truth": _stats([np.mean(v) / truth[k] for k, v in per.items()]),
                "vs_annotated": _stats([np.mean(v) / annotated[k] for k, v in per.items()]),
                "within_scan_cv": float(np.mean([np.std(v) / np.mean(v) for v in per.values() if len(v) > 1] or [np.nan])),
            }
    except InputError as exc:
        print(f"flow_magnitude: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
