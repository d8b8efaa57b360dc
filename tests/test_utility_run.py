"""Tiny `cardiomotion utility` runs end to end (Ray, MLflow, real files). One first run (a fold
CVAE, its corpus, four arms' estimators) is shared: its table, figure, paired differences and MLflow
run, how a rerun resumes or is refused, and then the arms added later that reuse the fold's
generator (the transductive arms, another prior temperature with `--generators`, the anchored arm)
on a copy of that folder. Every Ray Train fit costs about 25 s of CPU whatever it trains (README,
"Where the suite's time goes"), so the later arms do not train the fold CVAE and the common arms
again."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from cv_cohort import cohort, tiny_utility_config

if TYPE_CHECKING:
    import pandas as pd

    from cardiomotion.config import Config
    from cardiomotion.evaluate.utility_job import UtilitySummary

FIRST_ARMS = ["cvae", "annotated", "cvae>annotated", "transport"]


@dataclass(frozen=True)
class FirstRun:
    """The shared first run: its inputs and settings, the folder it wrote (``out``, which the first
    test then reruns into), an untouched copy of that folder as it was (``pristine``), its result,
    and what the storage root held right after it: the utility-stage MLflow runs and the cached
    transport pairs."""

    prepared: Path
    flows: Path
    cfg: Config
    store: Path
    out: Path
    pristine: Path
    result: UtilitySummary
    mlflow_runs: pd.DataFrame
    transport_pairs: int


@pytest.fixture(scope="module")
def first(tmp_path_factory, ray_session):
    import mlflow

    from cardiomotion import tracking
    from cardiomotion.evaluate.utility_job import run_utility
    from cardiomotion.layout import transport_pairs_dir

    prepared, flows = cohort(tmp_path_factory)
    root = tmp_path_factory.mktemp("utility")
    cfg = tiny_utility_config(root / "store", FIRST_ARMS, transport_partners=1)
    res = run_utility(prepared, flows, root / "u", cfg, folds=[0])
    mlflow.set_tracking_uri(tracking.setup(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], filter_string="tags.stage = 'utility'")
    pairs = len(list(transport_pairs_dir(root / "store").glob("*.pt")))
    shutil.copytree(root / "u", root / "u_pristine")
    return FirstRun(prepared, flows, cfg, root / "store", root / "u", root / "u_pristine", res, runs, pairs)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "runs.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_tiny_utility_run_writes_the_table_figure_and_mlflow_and_resumes(first):
    from cardiomotion.evaluate.utility_job import run_utility

    prepared, flows, cfg, res, tmp = first.prepared, first.flows, first.cfg, first.result, first.out.parent
    rows = _rows(first.out)
    assert sorted((r["arm"], r["n"]) for r in rows) == [("annotated", 3), ("cvae", 4), ("cvae>annotated", 4),
                                                        ("transport", 6)]
    assert [(r["transport_dropped"], r["transport_registered"]) for r in rows if r["arm"] == "transport"] == [(0, 3)]
    assert first.transport_pairs == 3  # in the storage root's pair cache, for every fold
    assert (first.out / "folds" / "phantom_000" / "transport_pool.pt").is_file()  # for the fold's other seeds
    assert all(np.isfinite(r["epe_myo_mm"]) and r["epe_mm"] > 0 for r in rows)
    import pandas as pd

    table = pd.read_csv(res.table)
    assert set(table.arm) == {"cvae", "annotated", "cvae>annotated", "transport", "zero"}
    assert set(table.metric) == {"epe_mm", "epe_myo_mm", "dice", "folding", "magnitude_myo"}
    assert all(r["magnitude_myo"] >= 0 for r in rows)  # every row records its estimate's motion
    zero_mag = table[(table.arm == "zero") & (table.metric == "magnitude_myo")]["mean"]
    assert list(zero_mag) == [0.0]
    paired = pd.read_csv(res.paired_file)  # cvae against annotated and zero flow on the held-out scan
    assert {(r.arm, r.vs_arm, r.scans) for r in paired.itertuples() if r.metric == "epe_myo_mm"} == {
        ("cvae", "annotated", 1), ("cvae", "zero", 1), ("cvae", "transport", 1),
        ("cvae>annotated", "annotated", 1), ("cvae>annotated", "zero", 1), ("cvae>annotated", "cvae", 1),
        ("cvae>annotated", "transport", 1), ("transport", "annotated", 1), ("transport", "zero", 1)}
    assert "magnitude_myo" not in set(paired.metric)  # a calibration: summarised, not paired
    assert res.figure.is_file() and res.figure.stat().st_size > 0
    # the corpus was conditioned on the training scans only
    from cardiomotion.generate import open_corpus

    corpus = open_corpus(first.out / "folds" / "phantom_000" / "corpus")
    assert len(corpus) == 4 and {corpus[i]["scan_id"] for i in range(4)} <= {"phantom_001", "phantom_002", "phantom_003"}
    runs = first.mlflow_runs  # right after the first run
    assert len(runs) == 1 and "metrics.annotated_n3_epe_myo_mm" in runs.columns
    assert "metrics.cvae_then_annotated_n4_epe_myo_mm" in runs.columns  # a name MLflow accepts
    assert json.loads(res.summary.read_text())["settings"]["interval"] == "student_t"
    # a rerun trains nothing again; one with another interval only re-reads the rows (summary.json records it)
    from cardiomotion.choices import IntervalMethod

    reread = cfg.model_copy(deep=True)
    reread.utility.interval = IntervalMethod.PERCENTILE
    run_utility(prepared, flows, first.out, reread, folds=[0])
    assert len((first.out / "runs.jsonl").read_text().splitlines()) == 4
    assert json.loads(res.summary.read_text())["settings"]["interval"] == "percentile"
    assert all(r["estimator"]["steps"] == 2 and r["estimator"]["batch_size"] == 2 and r["steps"] == 2 for r in rows)
    # a rerun with another step budget would mix estimators trained two ways: refused before any work
    from cardiomotion.errors import InputError

    longer = cfg.model_copy(deep=True)
    longer.utility.steps = 3
    before = (first.out / "runs.jsonl").read_text()
    with pytest.raises(InputError, match=r"runs.jsonl: row 1 .* other estimator settings \(steps 2 → 3\)"):
        run_utility(prepared, flows, first.out, longer, folds=[0])
    assert (first.out / "runs.jsonl").read_text() == before
    # so would a rerun from other annotations (its generators and rows were made from these)
    other = tmp / "flows_again"
    shutil.copytree(flows, other)
    with pytest.raises(InputError, match=r"inputs.json: .*made from other inputs \(flows: "):
        run_utility(prepared, other, first.out, cfg, folds=[0])
    assert (first.out / "runs.jsonl").read_text() == before
    # a smaller N later reads the first N samples of the fold's larger corpus, which stays whole
    from cardiomotion.config import UtilityArm

    smaller = cfg.model_copy(deep=True)
    smaller.utility.sizes = [2]
    smaller.utility.arms = [UtilityArm.CVAE]
    run_utility(prepared, flows, first.out, smaller, folds=[0])
    rows = _rows(first.out)
    assert sorted((r["arm"], r["n"]) for r in rows) == [("annotated", 3), ("cvae", 2), ("cvae", 4), ("cvae>annotated", 4),
                                                        ("transport", 6)]
    assert len(open_corpus(first.out / "folds" / "phantom_000" / "corpus")) == 4


@pytest.mark.slow
def test_the_target_arms_and_another_temperature_reuse_the_folds_generator(first, tmp_path):
    import pandas as pd

    from cardiomotion.config import UtilityArm
    from cardiomotion.evaluate.utility_job import run_utility
    from cardiomotion.generate import open_corpus

    prepared, flows = first.prepared, first.flows
    cfg = first.cfg.model_copy(deep=True)  # the first run's settings and store (its fold CVAE)
    shutil.copytree(first.pristine, tmp_path / "u")  # the first run's folder as it was
    fold = tmp_path / "u" / "folds" / "phantom_000"
    # the transductive arms, added later: the same fold CVAE conditioned on the held-out ES frame
    # alone (a view holding only that scan), the training corpus left as it was
    corpus_files = sorted((p.name, p.stat().st_mtime_ns) for p in (fold / "corpus").rglob("*"))
    model_uri = json.loads((fold / "generator.json").read_text())["model_uri"]
    targeted = cfg.model_copy(deep=True)
    targeted.utility.arms = [UtilityArm.TARGET, UtilityArm.ANNOTATED_TARGET]
    res = run_utility(prepared, flows, tmp_path / "u", targeted, folds=[0])
    rows = _rows(tmp_path / "u")
    assert sorted((r["arm"], r["n"]) for r in rows) == [("annotated", 3), ("annotated+target", 4), ("cvae", 4),
                                                        ("cvae>annotated", 4), ("target", 4), ("transport", 6)]
    assert json.loads((fold / "generator.json").read_text())["model_uri"] == model_uri  # not trained again
    target = open_corpus(fold / "target_corpus")
    assert len(target) == 4 and {target[i]["scan_id"] for i in range(4)} == {"phantom_000"}
    assert sorted(p.name for p in (fold / "target_frames").iterdir()) == ["phantom_000", "scans.parquet"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (fold / "corpus").rglob("*")) == corpus_files
    paired = pd.read_csv(res.paired_file)
    assert {(r.arm, r.vs_arm) for r in paired.itertuples() if r.metric == "epe_myo_mm" and "target" in r.arm} == {
        ("target", "annotated"), ("target", "zero"), ("target", "cvae"), ("target", "transport"),
        ("annotated+target", "annotated"), ("annotated+target", "zero"), ("annotated+target", "target"),
        ("annotated+target", "transport")}
    # another prior temperature into a new folder, reusing this folder's fold CVAE (--generators):
    # the same model, a new corpus sampled at the new temperature, nothing trained again
    colder = cfg.model_copy(deep=True)
    colder.generate.temperature = cfg.generate.temperature / 2
    colder.utility.arms = [UtilityArm.CVAE]
    run_utility(prepared, flows, tmp_path / "u_cold", colder, folds=[0], generators=tmp_path / "u")
    mine = json.loads((tmp_path / "u_cold" / "folds" / "phantom_000" / "generator.json").read_text())
    assert mine["model_uri"] == model_uri
    cold = open_corpus(tmp_path / "u_cold" / "folds" / "phantom_000" / "corpus")
    assert len(cold) == 4 and cold.manifest["temperature"] == colder.generate.temperature
    assert [r["arm"] for r in _rows(tmp_path / "u_cold")] == ["cvae"]
    # the anchored arm, added later: the same fold CVAE varying the fold's transport pool (N 4 of the
    # pool's 3·(1 + 1) fields), nothing trained again but the estimator
    anchored = cfg.model_copy(deep=True)
    anchored.utility.arms = [UtilityArm.ANCHORED]
    anchored.utility.transport_partners = 1
    res = run_utility(prepared, flows, tmp_path / "u", anchored, folds=[0])
    rows = _rows(tmp_path / "u")
    (row,) = [r for r in rows if r["arm"] == "anchored"]
    assert row["n"] == 4 and row["transport_dropped"] == 0 and row["epe_mm"] > 0
    assert json.loads((fold / "generator.json").read_text())["model_uri"] == model_uri
    assert (fold / "transport_pool.pt").is_file()
    paired = pd.read_csv(res.paired_file)
    assert {r.vs_arm for r in paired.itertuples() if r.metric == "epe_myo_mm" and r.arm == "anchored"} == {
        "annotated", "zero", "cvae", "transport"}
