"""One tiny `cardiomotion utility` run end to end (Ray, MLflow, real files): its table, figure,
paired differences and MLflow run, and how a rerun resumes or is refused. The later arms that
reuse a fold's generator are in test_utility_generators.py (a file per pytest worker: the two
long runs go to both workers)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cv_cohort import cohort, tiny_utility_config


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return cohort(tmp_path_factory)


@pytest.mark.slow
def test_a_tiny_utility_run_writes_the_table_figure_and_mlflow_and_resumes(phantom, tmp_path, ray_session):
    import mlflow

    from cardiomotion.evaluate.utility_job import run_utility

    prepared, flows = phantom
    cfg = tiny_utility_config(tmp_path / "store", ["cvae", "annotated", "cvae>annotated", "transport"],
                              transport_partners=1)
    res = run_utility(prepared, flows, tmp_path / "u", cfg, folds=[0])
    rows = [json.loads(x) for x in (tmp_path / "u" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["n"]) for r in rows) == [("annotated", 3), ("cvae", 4), ("cvae>annotated", 4),
                                                        ("transport", 6)]
    assert [(r["transport_dropped"], r["transport_registered"]) for r in rows if r["arm"] == "transport"] == [(0, 3)]
    assert len(list((tmp_path / "store" / "transport_pairs").glob("*.pt"))) == 3  # the storage root's, for every fold
    assert (tmp_path / "u" / "folds" / "phantom_000" / "transport_pool.pt").is_file()  # for the fold's other seeds
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
    from cardiomotion import tracking
    from cardiomotion.generate import open_corpus

    corpus = open_corpus(tmp_path / "u" / "folds" / "phantom_000" / "corpus")
    assert len(corpus) == 4 and {corpus[i]["scan_id"] for i in range(4)} <= {"phantom_001", "phantom_002", "phantom_003"}
    mlflow.set_tracking_uri(tracking.setup(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], filter_string="tags.stage = 'utility'")
    assert len(runs) == 1 and "metrics.annotated_n3_epe_myo_mm" in runs.columns
    assert "metrics.cvae_then_annotated_n4_epe_myo_mm" in runs.columns  # a name MLflow accepts
    assert json.loads(res.summary.read_text())["settings"]["interval"] == "student_t"
    # a rerun trains nothing again; one with another interval only re-reads the rows (summary.json records it)
    from cardiomotion.choices import IntervalMethod

    reread = cfg.model_copy(deep=True)
    reread.utility.interval = IntervalMethod.PERCENTILE
    run_utility(prepared, flows, tmp_path / "u", reread, folds=[0])
    assert len((tmp_path / "u" / "runs.jsonl").read_text().splitlines()) == 4
    assert json.loads(res.summary.read_text())["settings"]["interval"] == "percentile"
    assert all(r["estimator"]["steps"] == 2 and r["estimator"]["batch_size"] == 2 and r["steps"] == 2 for r in rows)
    # a rerun with another step budget would mix estimators trained two ways: refused before any work
    from cardiomotion.errors import InputError

    longer = cfg.model_copy(deep=True)
    longer.utility.steps = 3
    before = (tmp_path / "u" / "runs.jsonl").read_text()
    with pytest.raises(InputError, match=r"runs.jsonl: row 1 .* other estimator settings \(steps 2 → 3\)"):
        run_utility(prepared, flows, tmp_path / "u", longer, folds=[0])
    assert (tmp_path / "u" / "runs.jsonl").read_text() == before
    # so would a rerun from other annotations (its generators and rows were made from these)
    import shutil

    other = tmp_path / "flows_again"
    shutil.copytree(flows, other)
    with pytest.raises(InputError, match=r"inputs.json: .*made from other inputs \(flows: "):
        run_utility(prepared, other, tmp_path / "u", cfg, folds=[0])
    assert (tmp_path / "u" / "runs.jsonl").read_text() == before
    # a smaller N later reads the first N samples of the fold's larger corpus, which stays whole
    from cardiomotion.config import UtilityArm

    smaller = cfg.model_copy(deep=True)
    smaller.utility.sizes = [2]
    smaller.utility.arms = [UtilityArm.CVAE]
    run_utility(prepared, flows, tmp_path / "u", smaller, folds=[0])
    rows = [json.loads(x) for x in (tmp_path / "u" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["n"]) for r in rows) == [("annotated", 3), ("cvae", 2), ("cvae", 4), ("cvae>annotated", 4),
                                                        ("transport", 6)]
    assert len(open_corpus(tmp_path / "u" / "folds" / "phantom_000" / "corpus")) == 4
