"""What the stops' table scripts (summ41.py, summ43.py, summ44.py, summ45.py, summ46.py, summ47.py, transport_arm/summ49.py, transport_scaling/summ50*.py, anchored_temperature/summ51*.py) share: a utility
run's rows, one row's figure, an arm's rows pooled over several folders, and a paired comparison
as a table cell (bench/utility_compare.py's library call, compare_folders).

The stops' tables up to stop 52 were made with percentile bootstrap intervals; ``cmp`` and
``paired_table`` keep that as their default (``method``) so that those scripts still print the
tables committed beside them. Tables made since stop 53 pass ``method="student_t"``, the library's
default (README, "Which interval over few scans")."""
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


def cmp(a, b, arm, barm, n, bn, metric, seeds=None, vary=(), method="percentile"):
    d = compare_folders(Side(Path(a), arm, n, seeds), Side(Path(b), barm, bn, seeds), metric=metric, vary=vary,
                        method=method)
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], {d['a_won']}/{len(d['per_scan'])}"


def paired_table(dirs, n, pairs, seed=0, vary=(), method="percentile"):
    """Each pair (a, b) of ``pairs`` compared scan by scan (a − b: myocardium EPE, whole-grid EPE,
    Dice, over ``seed``'s rows), ``dirs`` and ``n`` the arms' folders and N, ``vary`` the estimator
    settings the pairs may differ in (compare_folders'), as Markdown lines."""
    lines = [f"| paired over the held-out scans (seed {seed}) | myocardium EPE | whole-grid EPE | Dice |", "|---|---|---|---|"]
    lines += [f"| {a} − {b} | " + " | ".join(cmp(dirs[a], dirs[b], a, b, n[a], n[b], m, seeds=[seed], vary=vary,
                                                 method=method)
                                            for m in ("epe_myo_mm", "epe_mm", "dice")) + " |" for a, b in pairs]
    return lines


def load(where):
    """The rows of a utility folder, or of a runs.jsonl file."""
    return rows(where) if Path(where).is_dir() else [json.loads(line) for line in open(where)]


def renamed(source, arm, new_arm, tmp):
    """``source``'s rows of ``arm`` as ``new_arm`` (two runs of one arm side by side), written to a
    runs.jsonl file under ``tmp``; returns its path (a source for :func:`pool`)."""
    path = Path(tmp) / f"{new_arm}.jsonl"
    path.write_text("".join(json.dumps({**r, "arm": new_arm}) + "\n" for r in load(source) if r["arm"] == arm))
    return str(path)


def pool(sources, arms, tmp, scans=None):
    """Each arm's rows pooled over ``sources`` (folders or runs.jsonl files; a held-out scan and
    seed in one of them only), those of ``scans`` only if given, and a folder per arm under ``tmp``
    holding them (what compare_folders reads): (rows per arm, folder per arm)."""
    pooled = {arm: [r for f in sources for r in load(f) if r["arm"] == arm and (scans is None or r["scan"] in scans)]
              for arm in arms}
    dirs = {}
    for arm, rs in pooled.items():
        keys = [(r["scan"], r["seed"]) for r in rs]
        assert len(keys) == len(set(keys)), f"{arm}: a scan and seed in two folders"
        d = dirs[arm] = Path(tmp) / arm.replace(">", "_then_").replace("+", "_and_")
        d.mkdir()
        d.joinpath("runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return pooled, dirs


def one_seed(pooled, seed=0):
    """``pooled`` (rows per arm, as :func:`pool` gives them) with each arm's rows of one estimator
    ``seed``, and each arm's N (that of its first row; an arm left without rows has none):
    (rows per arm, N per arm)."""
    kept = {arm: [r for r in rs if r["seed"] == seed] for arm, rs in pooled.items()}
    return kept, {arm: rs[0]["n"] for arm, rs in kept.items() if rs}


def scan_table(pooled, arms, scans, metric="epe_myo_mm", label="held-out scan (seed 0, myocardium EPE mm)"):
    """Each scan's row of each arm's ``metric``, as Markdown lines."""
    lines = [f"| {label} | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{get(pooled[a], s, a, metric):.2f}" for a in arms) + " |" for s in scans]
    return lines


def magnitude_table(pooled, arms, scans):
    """Each arm's mean ``magnitude_myo`` over its rows of ``scans`` (a calibration: summarised,
    not paired), as Markdown lines."""
    lines = ["| arm | rows | mean magnitude_myo (estimate / truth motion in the myocardium) |", "|---|---|---|"]
    for arm in arms:
        m = [r["magnitude_myo"] for r in pooled[arm] if "magnitude_myo" in r and r["scan"] in scans]
        lines.append(f"| {arm} | {len(m)} | {sum(m) / max(len(m), 1):.3f} |")
    return lines
