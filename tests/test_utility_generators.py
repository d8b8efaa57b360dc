"""The utility arms that reuse a fold's generator after the first run (Ray, MLflow, real files):
the transductive arms conditioned on the held-out ES frame, and `--generators` (another prior
temperature into a new folder, the same fold CVAE). Split from test_utility_run.py so the two long
runs go to both pytest workers."""
from __future__ import annotations

import json

import pytest

from cv_cohort import cohort, tiny_utility_config


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return cohort(tmp_path_factory)


@pytest.mark.slow
def test_the_target_arms_and_another_temperature_reuse_the_folds_generator(phantom, tmp_path, ray_session):
    import pandas as pd

    from cardiomotion.config import UtilityArm
    from cardiomotion.evaluate.utility_job import run_utility
    from cardiomotion.generate import open_corpus

    prepared, flows = phantom
    cfg = tiny_utility_config(tmp_path / "store", ["cvae", "annotated"])
    run_utility(prepared, flows, tmp_path / "u", cfg, folds=[0])
    fold = tmp_path / "u" / "folds" / "phantom_000"
    # the transductive arms, added later: the same fold CVAE conditioned on the held-out ES frame
    # alone (a view holding only that scan), the training corpus left as it was
    corpus_files = sorted((p.name, p.stat().st_mtime_ns) for p in (fold / "corpus").rglob("*"))
    model_uri = json.loads((fold / "generator.json").read_text())["model_uri"]
    targeted = cfg.model_copy(deep=True)
    targeted.utility.arms = [UtilityArm.TARGET, UtilityArm.ANNOTATED_TARGET]
    res = run_utility(prepared, flows, tmp_path / "u", targeted, folds=[0])
    rows = [json.loads(x) for x in (tmp_path / "u" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["n"]) for r in rows) == [("annotated", 3), ("annotated+target", 4), ("cvae", 4),
                                                        ("target", 4)]
    assert json.loads((fold / "generator.json").read_text())["model_uri"] == model_uri  # not trained again
    target = open_corpus(fold / "target_corpus")
    assert len(target) == 4 and {target[i]["scan_id"] for i in range(4)} == {"phantom_000"}
    assert sorted(p.name for p in (fold / "target_frames").iterdir()) == ["phantom_000", "scans.parquet"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (fold / "corpus").rglob("*")) == corpus_files
    paired = pd.read_csv(res.paired_file)
    assert {(r.arm, r.vs_arm) for r in paired.itertuples() if r.metric == "epe_myo_mm" and "target" in r.arm} == {
        ("target", "annotated"), ("target", "zero"), ("target", "cvae"),
        ("annotated+target", "annotated"), ("annotated+target", "zero"), ("annotated+target", "target")}
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
    assert [json.loads(x)["arm"] for x in (tmp_path / "u_cold" / "runs.jsonl").read_text().splitlines()] == ["cvae"]
    # the anchored arm, added later: the same fold CVAE varying the fold's transport pool (N 4 of the
    # pool's 3·(1 + 1) fields), nothing trained again but the estimator
    anchored = cfg.model_copy(deep=True)
    anchored.utility.arms = [UtilityArm.ANCHORED]
    anchored.utility.transport_partners = 1
    res = run_utility(prepared, flows, tmp_path / "u", anchored, folds=[0])
    rows = [json.loads(x) for x in (tmp_path / "u" / "runs.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["arm"] == "anchored"]
    assert row["n"] == 4 and row["transport_dropped"] == 0 and row["epe_mm"] > 0
    assert json.loads((fold / "generator.json").read_text())["model_uri"] == model_uri
    assert (fold / "transport_pool.pt").is_file()
    paired = pd.read_csv(res.paired_file)
    assert {r.vs_arm for r in paired.itertuples() if r.metric == "epe_myo_mm" and r.arm == "anchored"} == {
        "annotated", "zero", "cvae"}
