"""Two ``cardiomotion utility`` folders, scan by scan: arm X of folder A against arm Y of folder B.

For questions one folder cannot answer — a corpus from a generator trained another way (its own
folder, its own fold generators) against the first one's, on the held-out scans both scored:

    python bench/utility_compare.py --a U_new --b U_old --arm cvae --n 256
    python bench/utility_compare.py --a U_new --b U_old --arm cvae --n 256 --b-arm annotated --b-n 43
    python bench/utility_compare.py --a U_cos --b U --arm cvae --n 256 --vary lr_schedule --seeds 0

Prints JSON (:func:`cardiomotion.evaluate.compare.compare_folders`): per scan A, B and A − B (seed
means), the mean difference with a 95 % interval over the shared scans (``--interval``), scans A won.
Rows trained with other estimator settings are refused (exit 2, one line), not compared — except
the settings named in ``--vary`` (the question under study, reported as ``varied_settings``).
``--seeds`` keeps only those estimator seeds on both sides (a one-seed run against the same seed of
a three-seed folder).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def add_sides(ap: argparse.ArgumentParser) -> None:
    """The two sides' arguments (--a, --b, --arm, --n, --b-arm, --b-n, --metric) and how the
    comparison's intervals are formed (--interval); bench/utility_power.py reads them too."""
    from cardiomotion.choices import IntervalMethod

    ap.add_argument("--a", required=True, help="utility output folder A (the subject)")
    ap.add_argument("--b", required=True, help="utility output folder B (the reference; may be A)")
    ap.add_argument("--arm", default="cvae", help="arm read from A")
    ap.add_argument("--n", type=int, default=256, help="corpus size N of A's arm (real arms: their pair count)")
    ap.add_argument("--b-arm", default=None, help="arm read from B (default: --arm)")
    ap.add_argument("--b-n", type=int, default=None, help="N of B's arm (default: --n)")
    ap.add_argument("--metric", default="epe_myo_mm", help="epe_myo_mm, epe_mm, dice or folding")
    ap.add_argument("--interval", default=IntervalMethod.STUDENT_T.value, choices=[m.value for m in IntervalMethod],
                    help="the 95 %% interval over the shared scans (utility.interval's choices)")


def sides(args: argparse.Namespace, seeds: tuple[int, ...] | None = None):
    """(Side A, Side B) of :func:`add_sides`' arguments."""
    from cardiomotion.evaluate.compare import Side

    return (Side(Path(args.a), args.arm, args.n, seeds),
            Side(Path(args.b), args.b_arm or args.arm, args.n if args.b_n is None else args.b_n, seeds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sides(ap)
    ap.add_argument("--vary", default="", help="estimator settings allowed to differ, comma-separated (e.g. lr_schedule)")
    ap.add_argument("--seeds", default=None, help="estimator seeds read on both sides, comma-separated (default: all)")
    args = ap.parse_args(argv)
    from cardiomotion.errors import InputError
    from cardiomotion.evaluate.compare import compare_folders

    try:
        seeds = None if args.seeds is None else tuple(int(v) for v in args.seeds.split(",") if v.strip())
        if seeds == ():
            raise ValueError("empty")
    except ValueError:
        print(f"utility_compare: --seeds: not a comma-separated list of integers: {args.seeds!r}", file=sys.stderr)
        return 2
    vary = tuple(v.strip() for v in args.vary.split(",") if v.strip())
    try:
        out = compare_folders(*sides(args, seeds), metric=args.metric, vary=vary, method=args.interval)
    except InputError as exc:
        print(f"utility_compare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
