"""How many held-out scans and seeds resolve a difference between two utility arms: the spread of
a paired comparison with several seeds, and what other fold and seed counts would resolve.

    python bench/utility_power.py --a U --b U --arm cvae --n 256 --b-arm annotated --b-n 43
    python bench/utility_power.py --a U --b U --arm cvae --n 256 --b-arm annotated --b-n 43 \\
        --delta 0.1 --plan-folds 8,16,44 --plan-seeds 1,3,10

Reads the two arms as ``bench/utility_compare.py`` does (:func:`cardiomotion.evaluate.compare.compare_folders`:
the same refusals of rows trained with other estimator settings), estimates the seed noise of
each arm and how much the true difference varies from scan to scan
(:func:`cardiomotion.evaluate.power.spread_of`; each arm needs two seeds on some scan), then
simulates the comparison ``utility`` makes (intervals by ``--interval``) for every planned (folds, seeds): the median half-width
of the paired 95 % interval, how often it excludes zero at the true difference ``--delta`` (on its
side) and at 0 (a tie read as a difference: ``tie_read_as_difference``, which depends on the scans alone), how often the two arms' own intervals do not overlap, and the
smallest difference resolved in ``--power`` (80 %) of comparisons, both ways (the paired interval
excludes zero; the arms' own intervals do not overlap). Prints JSON; ``--figure F.png`` also draws
the smallest resolved difference against the folds.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from utility_compare import add_sides, sides  # noqa: E402  (the two sides read as utility_compare reads them)


def _ints(text: str, flag: str, least: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise ValueError(f"{flag}: not a comma-separated list of integers of at least {least}: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sides(ap)
    ap.add_argument("--delta", type=float, default=0.1, help="the true mean difference to resolve (metric's unit)")
    ap.add_argument("--plan-folds", default="4,8,16,44", help="held-out scans to plan for, comma-separated (at least 2)")
    ap.add_argument("--plan-seeds", default="1,3,10", help="seeds per arm and scan to plan for, comma-separated")
    ap.add_argument("--power", type=float, default=0.8, help="the share of comparisons the smallest resolved difference needs")
    ap.add_argument("--trials", type=int, default=1000, help="simulated comparisons per plan")
    ap.add_argument("--figure", default=None, help="also draw the smallest resolved difference against the folds (PNG)")
    args = ap.parse_args(argv)
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.compare import compare_folders
    from cardiomotion.evaluate.power import (Criterion, plan_figure, resolution, smallest_resolved, spread_of,
                                             tie_read_as_difference)

    try:
        folds, seeds = _ints(args.plan_folds, "--plan-folds", 2), _ints(args.plan_seeds, "--plan-seeds", 1)
        if not 0 < args.power < 1 or args.trials < 1:
            raise ValueError(f"--power must lie in (0, 1) and --trials be positive, got {args.power}, {args.trials}")
        cmp = compare_folders(*sides(args), metric=args.metric, method=args.interval)
        spread = spread_of(cmp["per_scan"])
    except (InputError, ValueError) as exc:
        print(f"utility_power: {exc}", file=sys.stderr)
        return 2
    plans = []
    for f in folds:
        for s in seeds:
            at = resolution(spread, f, s, args.delta, args.trials, method=args.interval)
            plans.append({**asdict(at), "tie_read_as_difference": tie_read_as_difference(f, method=args.interval),
                          **{f"smallest_resolved_{c.value}": smallest_resolved(spread, f, s, args.power, c, args.trials,
                                                                              method=args.interval)
                             for c in Criterion}})
    if args.figure:
        plan_figure(plans, args.figure, args.delta)
    print(json.dumps({"a": cmp["a"], "b": cmp["b"], "metric": args.metric, "interval": args.interval, "scans": cmp["scans"],
                      "spread": asdict(spread), "power": args.power, "plans": plans}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
