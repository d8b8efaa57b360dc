"""Learning curves of the utility estimator: how many Adam steps before it learns anything?

``cardiomotion utility`` trains every arm for one step budget (``utility.steps``) and one
learning rate. This bench chooses them by measurement: it trains the same estimator (the
``annotate.pwc`` PWC-Net, :func:`cardiomotion.evaluate.utility.train_estimator`, in this process,
no Ray) on one leave-one-out fold's training scans and scores it on the held-out scan's real
rendered (ES, ED) pair against the exact phantom truth every ``--every`` steps
(:func:`~cardiomotion.evaluate.utility.score_estimate`, the scores of ``utility``), next to zero
flow. Arms (data of the training scans only):

* ``annotated`` — the real pairs with their annotated flows (``--flows``), as ``utility`` trains it;
* ``truth`` — the real pairs with the phantom's exact fields: the ceiling of supervised training
  on these pairs (not a ``utility`` arm: no real dataset has it);
* ``random`` — SynthMorph-style random smooth fields warping the training ES frames
  (:class:`~cardiomotion.evaluate.utility.RandomFieldSource`, RMS matched to the annotated flows);
* ``warped`` / ``truth_warped`` — a corpus without a generator: each training ES frame warped by
  its own annotated (``warped``) or exact (``truth_warped``) field, ED := round(warp(ES, u)) as a
  corpus stores it, labelled by that field. Against ``annotated`` / ``truth`` (the same fields
  with the real rendered ED) it measures what training on warped rather than rendered images
  costs; against ``cvae`` what the generator's sampled fields cost beyond that;
* ``transport`` — no generator: each training ES frame warped by its own annotated motion and by
  those of ``--partners`` (default ``utility.transport_partners``) other training scans carried onto
  it (:class:`~cardiomotion.evaluate.utility.TransportSource`, the ``utility`` transport arm's pool:
  the partners follow the config's ``seed``, and each pair is read from or written to the storage
  root's pair cache, so a pool ``utility`` built is not registered again);
* ``cvae`` — the first ``--n`` samples of a materialised corpus (``--corpus``: the fold's, e.g.
  ``utility``'s ``OUT/folds/<scan>/corpus``), in this process's shuffled order (``utility`` streams
  the same samples through Ray Data's shuffle, so the batches differ); refused when the held-out
  scan conditioned any sample or trained the corpus's generator.

One JSON line per evaluation streams to ``--out`` (a header line per run first); the summary
(JSON on stdout) gives per run the zero-flow scores, the best and the last evaluation.
``--noise-hu S`` adds independent Gaussian noise of S HU to both frames of every training batch
(any arm; seeded by ``--seed``): an augmentation that breaks the noise a warped ED copies from its
ES. ``--figure PNG`` draws every run of the ``--out`` file (myocardium EPE against step, zero flow as a
line); with ``--arms ''`` it only draws.

    python bench/estimator_curve.py --prepared P --flows A --config S --fold 0 --arms truth,random \\
        --steps 1000 --every 100 --out curve.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

ARMS = ("annotated", "truth", "random", "cvae", "warped", "truth_warped", "transport")


class _Lines:
    """``--out``, opened for appending at the first line: a run refused before training leaves no file."""

    def __init__(self, path: Path):
        self.path, self._f = path, None

    def write(self, text: str) -> None:
        if self._f is None:
            self._f = open(self.path, "a")
        self._f.write(text)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def curve_figure(rows: list[dict], path: Path) -> Path:
    """Held-out myocardium EPE against Adam step, one line per run of ``rows`` (a ``--out`` file:
    a header row, then its evaluations); zero flow dashed, or named under the title when it would
    squash the curves; written atomically."""
    from cardiomotion.evaluate.figures import pyplot, save_figure

    runs: list[tuple[dict, list[dict]]] = []
    for r in rows:
        if "step" not in r:
            runs.append((r, []))
        elif runs:
            runs[-1][1].append(r)
    if not runs:
        raise ValueError("no runs to draw")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    zeros = set()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    data_of = sorted({(h["arm"], h["n"], h.get("noise_hu", 0.0)) for h, _ in runs})  # one colour per training data, one line style per fold
    folds = sorted({h["fold"] for h, _ in runs})
    for head, curve in runs:
        label = f"{head['arm']}" + (f" N {head['n']}" if head["arm"] in ("cvae", "random", "transport") else "") + \
            f" (fold {head['fold']}, seed {head['seed']}, lr {head['lr']:g}" + \
            (f" {head['lr_schedule']}" if head.get("lr_schedule") else "") + \
            (f", noise {head['noise_hu']:g} HU" if head.get("noise_hu") else "") + ")"
        ax.plot([c["step"] for c in curve], [c["epe_myo_mm"] for c in curve], marker="o", ms=3, label=label,
                color=colors[data_of.index((head["arm"], head["n"], head.get("noise_hu", 0.0))) % len(colors)],
                ls=("-", "--", ":", "-.")[folds.index(head["fold"]) % 4])
        zeros.add((head["scan"], round(head["zero"]["epe_myo_mm"], 3)))
    finite = [c["epe_myo_mm"] for _, curve in runs for c in curve if np.isfinite(c["epe_myo_mm"])]
    top = max(finite) if finite else 1.0
    off = []
    for scan, z in sorted(zeros):
        if z <= 1.5 * top:
            ax.axhline(z, color="grey", ls="--", lw=1, label=f"zero flow ({scan})")
        else:  # zero flow would squash the curves: named, not drawn
            off.append(f"{scan} {z:.2f} mm")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("held-out myocardium EPE (mm)")
    title = "Learning curves of the utility estimator"  # zero flow off the axis is named under it, clear of the legend
    ax.set_title(title + (f"\nzero flow (off the axis): {', '.join(off)}" if off else ""), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def _corpus_source(args: argparse.Namespace, plan, window):
    """The cvae arm: the first ``--n`` samples of ``--corpus``, none conditioned on the held-out scan."""
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility import CorpusSource
    from cardiomotion.generate.corpus import open_corpus, read_manifest

    corpus = open_corpus(args.corpus)
    if len(corpus) < args.n:
        raise InputError(Path(args.corpus), f"holds {len(corpus)} samples, fewer than --n {args.n}")
    man = read_manifest(args.corpus)
    seen = {str(s["scan_id"]) for s in man["scans"]}  # every conditioning ES frame
    trained = {str(s) for s in ((man.get("model") or {}).get("meta") or {}).get("train_scans", ())}
    for what, scans in (("was conditioned on", seen), ("comes from a generator trained on", trained)):
        if plan.val_id in scans:
            raise InputError(Path(args.corpus), f"{what} the held-out scan {plan.val_id}: use fold "
                                                f"{plan.fold}'s own corpus")
    return CorpusSource(corpus, window, args.n)


def warped_ed(es_hu: np.ndarray, flows: np.ndarray) -> np.ndarray:
    """ED frames made as a corpus makes them: round(warp(ES, u)) in HU, (n, I, J, K) float32 from
    ES (n, I, J, K) HU and pull fields (n, 3, I, J, K) voxels."""
    import torch

    from cardiomotion.evaluate.utility import warped_ed as warp_as_corpus

    return warp_as_corpus(torch.from_numpy(es_hu)[:, None], torch.from_numpy(flows))[:, 0].numpy()


def noisy(batches, sd_unit: float, seed: int):
    """``batches`` with independent N(0, sd_unit²) added to ES and ED (images in [0, 1] units)."""
    import torch

    from cardiomotion.evaluate.utility import Batch

    gen = torch.Generator().manual_seed(int(seed) + 1000)
    for b in batches:
        yield Batch(b.es + sd_unit * torch.randn(b.es.shape, generator=gen),
                    b.ed + sd_unit * torch.randn(b.ed.shape, generator=gen), b.flow)


def run_curve(arm: str, args: argparse.Namespace, out) -> dict:
    import torch

    from cardiomotion.annotate.pwc import build_pwcnet
    from cardiomotion.config import load_config
    from cardiomotion.data.intensity import hu_to_unit
    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.utility import (PairSource, RandomFieldSource, flow_rms, score_estimate,
                                               source_batches, train_estimator)
    from cardiomotion.evaluate.utility_estimator import held_out_pair, training_arrays
    from cardiomotion.evaluate.utility_plan import estimator_settings
    from cardiomotion.train.fold import plan_fold

    over = {"utility": {"steps": args.steps, **({"lr": args.lr} if args.lr else {}),
                        **({"grad_clip": args.grad_clip} if args.grad_clip else {}),
                        **({"lr_schedule": args.lr_schedule} if args.lr_schedule else {})}}
    cfg = load_config(args.config, over)
    plan = plan_fold(args.prepared, args.flows, args.fold)  # the fold's scans, checked as ``utility`` checks them
    held = held_out_pair(str(args.prepared), plan.val_id)  # exact truth or one clear error, before any training
    # the training data exactly as ``utility`` loads it (annotated flows checked against the grid)
    es, ed, annotated = training_arrays(str(args.prepared), str(args.flows), plan.train_ids)
    es, ed = es.astype(np.float32), ed.astype(np.float32)
    window = cfg.intensity.window
    if arm == "annotated":
        source = PairSource(es, ed, annotated, window)
    elif arm in ("truth", "truth_warped"):  # only these arms need the training scans' exact fields
        table = read_scan_table(args.prepared).set_index("scan_id", drop=False)
        truth = []
        for sid in plan.train_ids:
            pair = load_pair(args.prepared, table.loc[sid].to_dict(), with_truth=True)
            if pair.truth_flow is None:
                raise InputError(Path(args.prepared) / sid, f"has no exact truth flow: the {arm} arm needs phantom scans")
            truth.append(pair.truth_flow)
        truth = np.stack(truth).astype(np.float32)
        source = PairSource(es, warped_ed(es, truth) if arm == "truth_warped" else ed, truth, window)
    elif arm == "warped":
        source = PairSource(es, warped_ed(es, annotated), annotated, window)
    elif arm == "transport":
        from cardiomotion.config import storage_root
        from cardiomotion.evaluate.utility import TransportSource
        from cardiomotion.layout import transport_pairs_dir
        from cardiomotion.train.transport import PairCache

        k = args.partners or cfg.utility.transport_partners
        built = TransportSource.build(es, annotated, plan.train_ids, k, cfg.seed, plan.spacing_mm, window,
                                      cache=PairCache(transport_pairs_dir(storage_root(cfg))))
        # through float16, as utility's pool file holds the fields (utility_estimator.transport_source)
        source = TransportSource(es, plan.train_ids, built.flows.half().float(), built.pairs, built.dropped, window,
                                 registered=built.registered)
    elif arm == "random":
        source = RandomFieldSource(es, args.n, flow_rms(annotated), args.seed, window, cfg.utility.random_scales)
    else:
        source = _corpus_source(args, plan, window)
    torch.manual_seed(args.seed)
    model = build_pwcnet(cfg)
    settings = estimator_settings(cfg, len(model.channels))
    fixed = hu_to_unit(torch.from_numpy(held.ed)[None, None].float(), window)
    moving = hu_to_unit(torch.from_numpy(held.es)[None, None].float(), window)

    def score(flow) -> dict:
        return score_estimate(flow, held.truth_flow, held.spacing_mm, held.ed_labels, held.es_labels).as_dict()

    zero = score(np.zeros((3, *held.es.shape), np.float32))
    header = {"arm": arm, "fold": plan.fold, "scan": plan.val_id, "n": len(source), "lr": settings.lr,
              "grad_clip": settings.grad_clip, "batch_size": settings.batch_size, "seed": args.seed, "zero": zero,
              **({"corpus": str(Path(args.corpus).resolve())} if arm == "cvae" else {}),
              **({"noise_hu": args.noise_hu} if args.noise_hu else {}),
              **({"partners": k, "dropped": len(source.dropped), "registered": source.registered}
                 if arm == "transport" else {}),
              **({"lr_schedule": settings.lr_schedule} if settings.lr_schedule != "constant" else {})}
    out.write(json.dumps(header) + "\n")
    out.flush()
    curve: list[dict] = []
    losses: list[float] = []  # since the last evaluation
    run = {key: header[key] for key in ("arm", "fold", "n", "lr", "grad_clip", "seed", "lr_schedule", "noise_hu",
                                        "partners") if key in header}  # every row says which run
    t0 = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if (step + 1) % args.every and step + 1 != settings.steps:
            return
        model.eval()
        with torch.no_grad():
            pred = model(fixed, moving).flow[0].float()
        model.train()
        row = {**run, "step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
               "loss": float(np.mean(losses)), **score(pred)}
        losses.clear()
        curve.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"{arm} step {step + 1}: loss {row['loss']:.3f}, myocardium EPE {row['epe_myo_mm']:.2f} mm "
              f"(zero flow {zero['epe_myo_mm']:.2f})", file=sys.stderr, flush=True)

    batches = source_batches(source, settings.batch_size, args.seed)
    if args.noise_hu:
        batches = noisy(batches, args.noise_hu / (window[1] - window[0]), args.seed)
    train_estimator(model, batches, settings, on_step=on_step)
    best = min(curve, key=lambda r: r["epe_myo_mm"])
    return {**header, "best": best, "last": curve[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, help="prepared phantom dataset (held-out scans need exact truth)")
    ap.add_argument("--flows", required=True, help="annotation folder (the annotated arm; the random arm's RMS)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--arms", default="annotated,random", help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    ap.add_argument("--n", type=int, default=256, help="random and cvae arms: number of distinct samples")
    ap.add_argument("--corpus", default=None, help="cvae arm: the fold's materialised corpus (its first --n samples)")
    ap.add_argument("--partners", type=int, default=None,
                    help="transport arm: carried motions per ES frame (default utility.transport_partners)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate (default utility.lr / annotate.lr)")
    ap.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clipping (default utility.grad_clip)")
    ap.add_argument("--lr-schedule", default=None, choices=("constant", "cosine"),
                    help="the rate over the --steps (default utility.lr_schedule)")
    ap.add_argument("--noise-hu", type=float, default=0.0,
                    help="independent Gaussian noise (HU) added to ES and ED of every training batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", required=True, help="JSON-lines file (appended)")
    ap.add_argument("--figure", default=None, help="PNG of every run in --out (written after the runs)")
    a = ap.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
    if "cvae" in arms and a.corpus is None:
        ap.error("the cvae arm needs --corpus DIR (a materialised corpus of the fold)")
    if a.noise_hu < 0:
        ap.error("--noise-hu must be >= 0")
    if a.every < 1 or a.steps < 1:
        ap.error("--steps and --every must be positive")
    if a.partners is not None and a.partners < 1:
        ap.error("--partners must be positive")
    import torch

    torch.set_num_threads(a.threads)
    from cardiomotion.errors import InputError

    out = _Lines(Path(a.out))
    try:
        runs = [run_curve(arm, a, out) for arm in arms]
    except InputError as exc:
        print(f"estimator_curve: {exc}", file=sys.stderr)
        return 2
    finally:
        out.close()
    if a.figure:
        from cardiomotion.fileio import read_json_lines

        try:
            rows = read_json_lines(a.out)
        except InputError as exc:
            print(f"estimator_curve: {exc}", file=sys.stderr)
            return 2
        if not any("step" in r for r in rows):
            print(f"estimator_curve: {a.out}: no evaluations to draw", file=sys.stderr)
            return 2
        curve_figure(rows, Path(a.figure))
    print(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
