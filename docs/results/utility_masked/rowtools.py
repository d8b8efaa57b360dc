"""What stop 41's and stop 43's table scripts (summ41.py, summ43.py) share: a utility run's rows,
one row's figure, and a paired comparison as a table cell (bench/utility_compare.py's library
call, compare_folders)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "platform"))
from cardiomotion.evaluate.compare import Side, compare_folders  # noqa: E402


def rows(folder):
    return [json.loads(line) for line in open(f"{folder}/runs.jsonl")]


def get(rs, scan, arm, k="epe_myo_mm"):
    v = [r[k] for r in rs if r["scan"] == scan and r["arm"] == arm]
    return v[0] if v else float("nan")


def cmp(a, b, arm, barm, n, bn, metric, seeds=None):
    d = compare_folders(Side(Path(a), arm, n, seeds), Side(Path(b), barm, bn, seeds), metric=metric)
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], {d['a_won']}/{len(d['per_scan'])}"
