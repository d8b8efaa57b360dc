"""The training benchmarks run end to end at a toy size and print consistent JSON.

Speed is not asserted (machines are noisy; the figures live in the README): these tests check
that each bench times the recipes it says it times and that its arithmetic is right.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _load(name: str):
    """A bench script as a module (its functions, or its main(), called in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_train_throughput_times_the_reference_and_the_training_recipe():
    out = _bench("train_throughput.py", "--device", "cpu", "--grids", "16,16x16x8", "--batch", "2",
                 "--channels", "4,8", "--steps", "2", "--warmup", "1", "--volumes", "4", "--val-volumes", "2",
                 "--parity-steps", "2")
    assert [r["grid"] for r in out["results"]] == [[16, 16, 16], [16, 16, 8]]
    for row in out["results"]:
        assert row["reference"]["recipe"] == "fp32, eager, contiguous"
        assert row["project"]["recipe"] == "channels_last_3d"  # what `train` runs on a CPU
        assert row["speedup"] == pytest.approx(row["project"]["samples_per_s"] / row["reference"]["samples_per_s"],
                                               rel=1e-2)
        parity = row["parity"]
        assert parity["steps"] == 2 and parity["zero_flow_epe_vox"] > 0
        # the flow head starts at zero: two small steps leave both near the zero-flow error
        for key in ("reference_val_rec_epe_vox", "project_val_rec_epe_vox"):
            assert 0 < parity[key] < 1.5 * parity["zero_flow_epe_vox"]


@pytest.mark.slow
def test_cv_wallclock_projects_the_sweep_from_the_measured_throughput():
    out = _bench("cv_wallclock.py", "--device", "cpu", "--grid", "16", "--batch", "2", "--channels", "4,8",
                 "--folds-per-device", "1,2", "--steps", "2", "--warmup", "1", "--folds", "5", "--epochs", "3",
                 "--recipe-batch", "2")
    rec = out["recipe"]
    assert rec["steps_per_epoch"] == math.ceil((5 - 1) / 2) == 2
    assert rec["sweep_samples"] == 5 * 3 * 2 * 2
    assert out["reference"]["recipe"].startswith("one fold at a time, fp32")
    assert out["reference"]["recipe"] == "one fold at a time, fp32, contiguous, plain Adam"
    assert [r["folds_per_device"] for r in out["packing"]] == [1, 2]
    assert {r["recipe"] for r in out["packing"]} == {"project"}
    for r in [out["reference"], *out["packing"]]:
        assert r["measured_samples"] == r["folds_per_device"] * 2 * 2  # N folds × steps × batch
        assert r["projected_sweep_h"] == pytest.approx(rec["sweep_samples"] / r["samples_per_s"] / 3600, abs=1e-3)
    assert out["best"]["projected_sweep_h"] == min(r["projected_sweep_h"] for r in out["packing"])


def test_cv_wallclock_refuses_a_grid_the_model_cannot_take():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cv_wallclock.py"), "--grid", "20",
                           "--channels", "4,8,16"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "--grid 20 must be 3 sizes divisible by 2^3 = 8" in proc.stderr


def test_prior_recipes_settings_are_relative_to_the_papers_model(tmp_path):
    """The settings are defined against the paper's model (latent = the coarsest pyramid's
    channels), whatever the project's default latent size is: "paper" must not train "paper_z8"."""
    bench = _load("prior_recipes")
    smoke = str(REPO / "configs" / "smoke.yaml")
    paper = bench.setting_config(smoke, "paper", 7).train
    assert paper.model.latent_channels is None and paper.recipe.value == "paper" and paper.epochs == 7
    # a base config with free bits must not leak into the paper's recipe
    base = tmp_path / "fb.yaml"
    base.write_text("train:\n  free_bits: 6.0\n")
    assert bench.setting_config(str(base), "paper", 7).train.free_bits == 0.0
    assert bench.setting_config(str(base), "paper_z8_freebits10", 7).train.free_bits == 10.0
    fb = bench.setting_config(smoke, "paper_z8_freebits6", 7).train
    assert (fb.free_bits, fb.model.latent_channels) == (6.0, 8)
    assert bench.setting_config(smoke, "paper_z8", 7).train.model.latent_channels == 8
    vel = bench.setting_config(smoke, "paper_z8_velocity", 7).train.model
    assert vel.latent_channels == 8 and vel.output.value == "velocity"
    assert bench.setting_config(smoke, "elbo_b1", 7).train.model.latent_channels is None
    # nor the project's default cyclical KL schedule: the paper's KL weight is constant
    paper_default = bench.setting_config(None, "paper", 7).train
    assert (paper_default.kl_schedule.value, paper_default.kl_warmup_epochs) == ("linear", 0)
    cyc = bench.setting_config(None, "paper_z8_cyclical_velocity", 7).train
    assert (cyc.kl_schedule.value, cyc.kl_cycles, cyc.model.output.value) == ("cyclical", 4, "velocity")


def test_prior_recipes_summary_compares_with_the_paper_on_shared_folds(tmp_path):
    """Known numbers in, known ratios out: ES and reconstruction (annotated and exact truth) are
    compared with the paper's recipe on the folds both ran; EF coverage is the overlap of the
    samples' 5th–95th percentiles with the cohort's, over the cohort's range."""
    bench = _load("prior_recipes")

    def row(setting, fold, es, rec, rec_truth, efs):
        return {"setting": setting, "fold": fold, "epochs": 5, "prior_energy_score_vox": es, "rec_epe_vox": rec,
                "rec_truth_epe_vox": rec_truth, "sample_ef": efs}

    rows = [row("paper", 0, 0.4, 0.2, 0.5, [0.55] * 4), row("paper", 1, 0.4, 0.2, 0.5, [0.55] * 4),
            row("z", 0, 0.3, 0.25, 0.55, list(np.linspace(0.50, 0.60, 101))),
            row("z", 2, 9.9, 9.9, 9.9, [0.55])]  # fold 2: the paper never ran it, so it is not compared
    cohort = list(np.linspace(0.50, 0.70, 201))
    summary = bench.summarize(rows, cohort)
    vs = summary["settings"]["z"]["vs_paper"]
    assert vs["folds"] == 1
    assert vs["energy_improvement"] == pytest.approx(0.25)
    assert vs["rec_epe_change"] == pytest.approx(0.25) and vs["rec_truth_epe_change"] == pytest.approx(0.10)
    assert summary["cohort_ef_p5"] == pytest.approx(0.51) and summary["cohort_ef_p95"] == pytest.approx(0.69)
    assert summary["settings"]["paper"]["ef_coverage"] == 0.0  # every sample at one EF covers nothing
    assert summary["settings"]["paper"]["ef_spread_per_scan_pts"] == pytest.approx(0.0)
    z = summary["settings"]["z"]
    assert z["ef_spread_per_scan_pts"] == pytest.approx((10.0 + 0.0) / 2)  # fold 0 spans 50–60 %, fold 2 one sample
    assert z["ef_coverage"] == pytest.approx((0.595 - 0.51) / 0.18, abs=0.01)  # samples' 5–95 % ≈ 50.5–59.5 %
    table = bench.markdown(summary)
    assert "| +25.0% | +25.0% | +10.0% |" in table
    figs = bench.write_ef_figures(rows, cohort, summary, tmp_path / "figs")
    assert sorted(p.name for p in figs) == ["ef_paper.png", "ef_z.png"] and all(p.stat().st_size > 0 for p in figs)


def test_prior_recipes_resumes_after_a_run_killed_mid_write(tmp_path, capsys):
    """A truncated last line (a kill during the append) is dropped with a warning and the file
    rewritten so later appends stay valid JSON lines; a bad line elsewhere names file and line."""
    bench = _load("prior_recipes")
    out = tmp_path / "rows.jsonl"
    out.write_text('{"setting": "paper", "fold": 0}\n{"setting": "paper", "fo')
    assert bench.read_rows(out) == [{"setting": "paper", "fold": 0}]
    assert "line 2 is truncated" in capsys.readouterr().err
    assert out.read_text() == '{"setting": "paper", "fold": 0}\n'
    out.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(SystemExit, match=r"rows.jsonl: line 2 is not JSON"):
        bench.read_rows(out)
    assert bench.read_rows(tmp_path / "absent.jsonl") == []


@pytest.mark.slow
def test_prior_recipes_trains_scores_and_resumes(tmp_path_factory, tmp_path):
    """Two settings × one fold at a toy size: the rows carry the prior's scores and physiology,
    the summary compares with the paper recipe on the shared fold, a rerun skips finished folds."""
    from cv_cohort import cohort

    prepared, flows = cohort(tmp_path_factory)
    out = tmp_path / "prior.jsonl"
    args = ("--prepared", str(prepared), "--flows", str(flows), "--folds", "0", "--epochs", "1",
            "--settings", "paper,elbo_b0.1", "--k", "3", "--jobs", "1", "--threads", "1", "--out", str(out),
            "--table", str(tmp_path / "prior.md"))
    summary = _bench("prior_recipes.py", *args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["setting"] for r in rows) == ["elbo_b0.1", "paper"]
    for r in rows:
        assert r["prior_k"] == 3 and len(r["sample_ef"]) == 3 and r["output"] == "displacement"
        assert r["prior_energy_score_vox"] <= r["prior_mean_error_vox"]
        assert 0.3 < r["truth_ef"] < 0.8  # the phantom's own EF through its exact field
    s = summary["settings"]
    assert s["elbo_b0.1"]["vs_paper"]["folds"] == 1 and "vs_paper" not in s["paper"]
    assert 0.3 < summary["cohort_ef_p5"] <= summary["cohort_ef_p95"] < 0.8
    assert "| paper |" in (tmp_path / "prior.md").read_text()
    again = _bench("prior_recipes.py", *args)  # nothing left to train: the same summary
    assert len(out.read_text().splitlines()) == 2 and again["settings"].keys() == s.keys()


@pytest.mark.slow
def test_estimator_curve_scores_every_arm_on_the_held_out_scan(tmp_path_factory, tmp_path):
    """Learning curves at a toy size. The test cohort's "annotated" flows *are* the exact fields,
    so the annotated and truth arms (same seed, same batches) must give the same curve."""
    import yaml
    from cv_cohort import TINY, cohort

    prepared, flows = cohort(tmp_path_factory)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"prepare": TINY["prepare"], "annotate": TINY["annotate"]}))
    out = tmp_path / "curve.jsonl"
    summary = _bench("estimator_curve.py", "--prepared", str(prepared), "--flows", str(flows), "--config", str(cfg),
                     "--fold", "1", "--arms", "annotated,truth,random,warped,truth_warped", "--steps", "3", "--every", "2",
                     "--n", "5", "--out", str(out), "--figure", str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    runs = {r["arm"]: r for r in summary["runs"]}
    assert set(runs) == {"annotated", "truth", "random", "warped", "truth_warped"}
    assert {r["scan"] for r in runs.values()} == {"phantom_001"} and runs["random"]["n"] == 5
    assert runs["annotated"]["n"] == runs["truth"]["n"] == 3  # the fold's training scans
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    curves = {arm: [r for r in rows if r["arm"] == arm and "step" in r] for arm in runs}
    assert all([r["step"] for r in c] == [2, 3] for c in curves.values())  # every 2 steps and the last
    for x, y in (("annotated", "truth"), ("warped", "truth_warped")):
        for a, b in zip(curves[x], curves[y]):
            assert a["epe_myo_mm"] == pytest.approx(b["epe_myo_mm"]) and a["loss"] == pytest.approx(b["loss"])
    zero = runs["truth"]["zero"]
    assert zero["epe_myo_mm"] > 0 and zero["folding"] == 0 and runs["random"]["zero"] == zero
    assert runs["truth"]["last"] == curves["truth"][-1]
    assert all(r["lr"] == runs["truth"]["lr"] and r["fold"] == 1 for r in curves["truth"])  # rows name their run

    # The annotated arm reads --flows, the truth arm the phantom: halve the annotations and only
    # the annotated curve moves.
    import shutil

    from cardiomotion.flow.io import read_flow, write_flow

    halved = tmp_path / "halved"
    shutil.copytree(flows, halved, ignore=shutil.ignore_patterns("ray_train"))
    for f in halved.glob("*/flow.nii.gz"):
        flow, affine = read_flow(f)
        write_flow(f, 0.5 * flow, affine)
    out2 = tmp_path / "curve2.jsonl"
    again = _bench("estimator_curve.py", "--prepared", str(prepared), "--flows", str(halved), "--config", str(cfg),
                   "--fold", "1", "--arms", "annotated,truth", "--steps", "3", "--every", "2", "--out", str(out2))
    runs2 = {r["arm"]: r for r in again["runs"]}
    assert runs2["truth"]["last"]["loss"] == pytest.approx(runs["truth"]["last"]["loss"])
    assert runs2["annotated"]["last"]["loss"] != pytest.approx(runs["annotated"]["last"]["loss"])
    # --lr-schedule cosine: the same batches at decaying rates, a run that says so
    cosine = _bench("estimator_curve.py", "--prepared", str(prepared), "--flows", str(flows), "--config", str(cfg),
                    "--fold", "1", "--arms", "truth", "--steps", "3", "--every", "2", "--lr-schedule", "cosine",
                    "--out", str(tmp_path / "curve3.jsonl"))["runs"][0]
    assert cosine["lr_schedule"] == "cosine" and "lr_schedule" not in runs["truth"]
    assert cosine["last"]["loss"] != pytest.approx(runs["truth"]["last"]["loss"])
    # --noise-hu: the same batches with noise added, a run that says so
    noise = _bench("estimator_curve.py", "--prepared", str(prepared), "--flows", str(flows), "--config", str(cfg),
                   "--fold", "1", "--arms", "truth", "--steps", "3", "--every", "2", "--noise-hu", "20",
                   "--out", str(tmp_path / "curve4.jsonl"))["runs"][0]
    assert noise["noise_hu"] == 20 and "noise_hu" not in runs["truth"]
    assert noise["last"]["loss"] != pytest.approx(runs["truth"]["last"]["loss"])

    # the transport arm: the fold's 3 training scans, each with its own motion and 1 partner's carried
    # onto it, registered into the config's storage root; a second run reads every pair from that
    # cache and trains on the same pool (the same curve)
    from cardiomotion.layout import transport_pairs_dir

    store = tmp_path / "store"
    with_store = tmp_path / "store.yaml"
    with_store.write_text(yaml.safe_dump({"prepare": TINY["prepare"], "annotate": TINY["annotate"],
                                          "storage_root": str(store)}))
    args = ["--prepared", str(prepared), "--flows", str(flows), "--config", str(with_store), "--fold", "1",
            "--arms", "transport", "--partners", "1", "--steps", "3", "--every", "3"]
    first = _bench("estimator_curve.py", *args, "--out", str(tmp_path / "t1.jsonl"))["runs"][0]
    assert first["partners"] == 1 and first["registered"] == 3 and first["n"] == 3 * 2 - first["dropped"]
    assert len(list(transport_pairs_dir(store).glob("*.pt"))) == 3
    cached = _bench("estimator_curve.py", *args, "--out", str(tmp_path / "t2.jsonl"))["runs"][0]
    assert cached["registered"] == 0 and cached["n"] == first["n"]
    assert cached["last"]["loss"] == pytest.approx(first["last"]["loss"])
    assert cached["last"]["epe_myo_mm"] == pytest.approx(first["last"]["epe_myo_mm"])


def test_warped_ed_is_es_moved_by_the_field_and_rounded_to_whole_hu():
    """Known answers on whole-HU frames: zero flow gives ES; a pull field of +2 voxels along axis 1 gives
    ED(x) = ES(x + 2) inside the grid."""
    bench = _load("estimator_curve")
    rng = np.random.default_rng(0)
    es = np.round(rng.normal(0, 300, (2, 8, 10, 6))).astype(np.float32)  # whole HU, as prepared scans hold
    zero = np.zeros((2, 3, 8, 10, 6), np.float32)
    np.testing.assert_array_equal(bench.warped_ed(es, zero), es)
    shift = zero.copy()
    shift[:, 1] = 2.0
    ed = bench.warped_ed(es, shift)
    np.testing.assert_array_equal(ed[:, :, :-2], es[:, :, 2:])
    import torch

    from cardiomotion.evaluate.utility import Batch

    b = Batch(torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4), None)
    (n,) = list(bench.noisy(iter([b]), 0.1, seed=0))
    assert 0.05 < float(n.es.std()) < 0.2 and not torch.equal(n.es - b.es, n.ed - b.ed)  # independent per frame


@pytest.mark.slow
def test_estimator_curve_trains_on_a_fold_corpus_and_refuses_one_that_saw_the_held_out_scan(
        tmp_path_factory, tmp_path, ray_session, capsys):
    """The cvae arm reads the first --n samples of a corpus conditioned on the fold's training
    scans; the same corpus is refused for a fold whose held-out scan conditioned it."""
    import yaml
    from cv_cohort import TINY, cohort

    from cardiomotion.config import load_config
    from cardiomotion.evaluate.utility_generators import training_view
    from cardiomotion.generate import generate_corpus
    from cardiomotion.generate.synthetic import make_random_model_dir

    prepared, flows = cohort(tmp_path_factory)
    train_ids = ["phantom_000", "phantom_002", "phantom_003"]  # fold 1 holds out phantom_001
    view = training_view(prepared, train_ids, tmp_path / "frames")
    model = make_random_model_dir(tmp_path / "model", grid=(32, 32, 32), channels=(8, 16, 32), latent_channels=4)
    cfg = load_config(None, {**TINY, "storage_root": str(tmp_path / "store"),
                             "generate": {"shard_size": 4, "batch_size": 2, "actors": 1, "previews": 0}})
    generate_corpus(model, view, tmp_path / "corpus", 6, cfg=cfg, track=False)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump({"prepare": TINY["prepare"], "annotate": TINY["annotate"]}))
    args = ["--prepared", str(prepared), "--flows", str(flows), "--config", str(conf), "--arms", "cvae",
            "--corpus", str(tmp_path / "corpus"), "--steps", "2", "--every", "2", "--n", "5"]
    summary = _bench("estimator_curve.py", *args, "--fold", "1", "--out", str(tmp_path / "c.jsonl"))
    (run,) = summary["runs"]
    assert (run["arm"], run["scan"], run["n"], run["last"]["step"]) == ("cvae", "phantom_001", 5, 2)
    assert run["corpus"] == str((tmp_path / "corpus").resolve())  # the header names what it trained on
    assert np.isfinite(run["last"]["epe_myo_mm"]) and run["last"]["epe_myo_mm"] > 0
    bench = _load("estimator_curve")
    import torch

    threads = torch.get_num_threads()  # main() sets its own
    fig_args = [*args[:6], "--arms", "", "--fold", "1"]  # no training: only the figure of --out's runs
    try:
        assert bench.main([*args, "--fold", "0", "--out", str(tmp_path / "c0.jsonl")]) == 2
        assert "conditioned on the held-out scan phantom_000" in capsys.readouterr().err
        assert not (tmp_path / "c0.jsonl").exists()  # refused before anything was written
        assert bench.main([*fig_args, "--out", str(tmp_path / "c0.jsonl"), "--figure", str(tmp_path / "no.png")]) == 2
        assert "no evaluations to draw" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
        assert bench.main([*fig_args, "--out", str(tmp_path / "c.jsonl"), "--figure", str(tmp_path / "c.png")]) == 0
        # a generator trained on the held-out scan is a leak too, whatever conditioned the samples
        man_path = tmp_path / "corpus" / "manifest.json"
        man = json.loads(man_path.read_text())
        man["model"].setdefault("meta", {})["train_scans"] = ["phantom_001", "phantom_002"]
        man_path.write_text(json.dumps(man))
        assert bench.main([*args, "--fold", "1", "--out", str(tmp_path / "c1.jsonl")]) == 2
        assert "comes from a generator trained on the held-out scan phantom_001" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def _runs(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_utility_compare_pairs_two_folders_scan_by_scan(tmp_path, capsys):
    """A's cvae is exactly 0.1 mm better than B's on the three shared scans (two seeds averaged on
    one); a scan only A scored is left out; Dice counts higher as better; other estimator settings
    and a missing arm are one-line refusals unless the setting is named in --vary; --seeds pairs
    one seed; another corpus temperature is compared, and reported."""
    mod = _load("utility_compare")
    est = {"steps": 1000, "lr": 0.001}

    def row(scan, arm, n, seed, myo, dice=0.9, e=est):
        return {"scan": scan, "arm": arm, "n": n, "seed": seed, "epe_myo_mm": myo, "epe_mm": myo,
                "dice": dice, "folding": 0.0, "estimator": e}

    b = _runs(tmp_path / "old", [row("s0", "cvae", 256, 0, 2.5), row("s1", "cvae", 256, 0, 2.0),
                                 row("s2", "cvae", 256, 0, 3.0), row("s0", "annotated", 43, 0, 2.3)])
    a = _runs(tmp_path / "new", [row("s0", "cvae", 256, 0, 2.3, 0.95), row("s0", "cvae", 256, 1, 2.5, 0.95),
                                 row("s1", "cvae", 256, 0, 1.9), row("s2", "cvae", 256, 0, 2.9, 0.8),
                                 row("s3", "cvae", 256, 0, 9.0)])
    assert mod.main(["--a", str(a), "--b", str(b)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scans"] == ["s0", "s1", "s2"] and out["rows_a"] == 4 and out["rows_b"] == 3
    assert out["per_scan"]["s0"]["a"] == pytest.approx(2.4)
    assert out["mean"] == pytest.approx(-0.1) and out["ci_low"] == pytest.approx(-0.1)
    assert out["ci_high"] == pytest.approx(-0.1) and out["a_won"] == 3
    assert mod.main(["--a", str(a), "--b", str(b), "--metric", "dice"]) == 0
    dice = json.loads(capsys.readouterr().out)
    assert dice["mean"] == pytest.approx((0.05 + 0 - 0.1) / 3) and dice["a_won"] == 1
    # against another arm of B
    assert mod.main(["--a", str(a), "--b", str(b), "--b-arm", "annotated", "--b-n", "43"]) == 0
    assert json.loads(capsys.readouterr().out)["per_scan"]["s0"]["delta"] == pytest.approx(0.1)
    other = _runs(tmp_path / "other", [row("s0", "cvae", 256, 0, 2.0, e={"steps": 3000, "lr": 0.001})])
    assert mod.main(["--a", str(a), "--b", str(other)]) == 2
    assert "other estimator settings" in capsys.readouterr().err
    # ... unless that setting is the one under study: compared, and each side's value reported
    assert mod.main(["--a", str(a), "--b", str(other), "--vary", "steps"]) == 0
    studied = json.loads(capsys.readouterr().out)
    assert studied["varied_settings"] == {"a": [{"steps": 1000}], "b": [{"steps": 3000}]}
    assert studied["per_scan"]["s0"]["delta"] == pytest.approx(2.4 - 2.0)
    # one seed on both sides: A's s0 is its seed-0 row alone (2.3, not the two seeds' 2.4)
    assert mod.main(["--a", str(a), "--b", str(b), "--seeds", "0"]) == 0
    seed0 = json.loads(capsys.readouterr().out)
    assert seed0["per_scan"]["s0"]["a"] == pytest.approx(2.3) and seed0["rows_a"] == 3
    assert seed0["a"].endswith("[seeds 0]") and seed0["varied_settings"] == {}
    assert mod.main(["--a", str(a), "--b", str(b), "--seeds", "1"]) == 2  # B has no seed-1 row
    assert "no row of arm cvae at N 256 of seed 1" in capsys.readouterr().err
    assert mod.main(["--a", str(a), "--b", str(b), "--seeds", "zero"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert mod.main(["--a", str(a), "--b", str(b), "--seeds", ","]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert mod.main(["--a", str(a), "--b", str(other), "--vary", "step"]) == 2  # a misspelt setting
    assert "'step' named to vary" in capsys.readouterr().err
    # a side whose rows mix two values of the varied setting would average them: refused
    mixed = _runs(tmp_path / "mixed", [row("s0", "cvae", 256, 0, 2.0, e={"steps": 3000, "lr": 0.001}),
                                       row("s1", "cvae", 256, 0, 2.0)])
    assert mod.main(["--a", str(a), "--b", str(mixed), "--vary", "steps"]) == 2
    assert "among themselves" in capsys.readouterr().err
    # a generator sampled at another temperature is what a comparison of two folders is for: compared,
    # and the corpus settings of each side reported
    warm = _runs(tmp_path / "warm", [row("s0", "cvae", 256, 0, 2.0, e={**est, "corpus_temperature": 2.5})])
    cool = _runs(tmp_path / "cool", [row("s0", "cvae", 256, 0, 2.2, e={**est, "corpus_temperature": 2.0})])
    assert mod.main(["--a", str(warm), "--b", str(cool)]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["mean"] == pytest.approx(-0.2)
    assert both["corpus_settings"] == {"a": [{"corpus_temperature": 2.5}], "b": [{"corpus_temperature": 2.0}]}
    assert mod.main(["--a", str(a), "--b", str(b), "--arm", "random"]) == 2
    err = capsys.readouterr().err
    assert "no row of arm random at N 256" in err and "runs.jsonl" in err
    assert mod.main(["--a", str(tmp_path / "nothing"), "--b", str(b)]) == 2
    assert "not a utility output folder" in capsys.readouterr().err
    # a row a live run is still appending (truncated last line) is skipped and the file left alone
    live = b / "runs.jsonl"
    torn = live.read_text() + '{"scan": "s3", "arm": "cvae"'
    live.write_text(torn)
    assert mod.main(["--a", str(a), "--b", str(b)]) == 0 and live.read_text() == torn
    assert json.loads(capsys.readouterr().out)["scans"] == ["s0", "s1", "s2"]
    # a row without the score is one line, not a traceback
    _runs(tmp_path / "broken", [{**row("s0", "cvae", 256, 0, 2.0), "epe_myo_mm": None}])
    assert mod.main(["--a", str(a), "--b", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no epe_myo_mm score" in err[0] and "broken/runs.jsonl" in err[0]


def test_flow_magnitude_measures_the_annotations_against_the_truth(tmp_path_factory, tmp_path):
    """The test cohort's annotated flows are the exact fields: ratio 1 on every scan; the same
    flows scaled by 0.8 give 0.8 and are below one on every scan; a missing flow is one line, exit 2."""
    import shutil

    from cv_cohort import cohort

    from cardiomotion.flow.io import read_flow, write_flow

    prepared, flows = cohort(tmp_path_factory)
    exact = _bench("flow_magnitude.py", "--prepared", str(prepared), "--flows", str(flows))
    assert exact["annotated_vs_truth"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert exact["annotated_vs_truth"]["count"] == 4 and exact["corpora"] == {}
    short = tmp_path / "short"
    shutil.copytree(flows, short)
    for f in short.glob("*/flow.nii.gz"):
        u, affine = read_flow(f)
        write_flow(f, 0.8 * u, affine)
    scaled = _bench("flow_magnitude.py", "--prepared", str(prepared), "--flows", str(short))["annotated_vs_truth"]
    assert scaled["mean"] == pytest.approx(0.8, abs=1e-5) and scaled["below_one"] == scaled["count"] == exact["annotated_vs_truth"]["count"]
    next(short.glob("*/flow.nii.gz")).unlink()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "flow_magnitude.py"), "--prepared", str(prepared),
                           "--flows", str(short)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("flow_magnitude:") and "flow.nii.gz" in proc.stderr


def test_refine_sweep_scores_known_flows_and_parses_its_grid():
    """The truth scores EPE 0 and magnitude 1; half the truth magnitude 0.5 and an EPE of half the
    truth's mean length; scan selection by id, index and range; every combination of the lists."""
    import argparse

    rs = _load("refine_sweep")
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(3, 8, 8, 8)).astype(np.float32)
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 2
    labels[0, :, :] = 1
    exact = rs.score(truth, truth, 4.0, labels)
    assert exact["epe_mm"] == exact["epe_myo_mm"] == exact["epe_heart_mm"] == 0.0
    assert exact["magnitude_myo"] == pytest.approx(1.0)
    half = rs.score(0.5 * truth, truth, 4.0, labels)
    myo = labels == 2
    assert half["magnitude_myo"] == pytest.approx(0.5)
    assert half["epe_myo_mm"] == pytest.approx(4.0 * 0.5 * np.linalg.norm(truth, axis=0)[myo].mean(), rel=1e-5)
    assert "epe_far_mm" not in exact  # no voxel of the 8³ grid is 30 mm from the heart
    rv = labels.copy()
    rv[6:8, 6:8, 6:8] = 4  # RV wall
    assert rs.score(0.5 * truth, truth, 4.0, rv)["magnitude_rv_wall"] == pytest.approx(0.5)
    assert "epe_rv_wall_mm" not in half  # no RV wall: not scored
    # 16³ at 4 mm with the heart in one corner: the far region is the voxels > 30 mm from it
    big = np.zeros((16, 16, 16), np.uint8)
    big[:2, :2, :2] = 2
    ii, jj, kk = np.meshgrid(*(np.arange(16),) * 3, indexing="ij")
    dist_mm = 4.0 * np.sqrt(sum(np.maximum(a - 1, 0) ** 2 for a in (ii, jj, kk)))  # to the nearest heart voxel
    flow = np.zeros((3, 16, 16, 16), np.float32)
    flow[0] = np.where(dist_mm > rs.FAR_MM, 1.0, 3.0)  # zero flow misses the far tissue by 4 mm, the rest by 12
    far = rs.score(np.zeros_like(flow), flow, 4.0, big)
    assert (dist_mm > rs.FAR_MM).any() and far["epe_far_mm"] == pytest.approx(4.0) and far["magnitude_far"] == 0.0
    assert "epe_far_mm" not in rs.score(flow, flow, 4.0, np.zeros_like(big))  # no heart: no distance to it
    ids = [f"phantom_{i:03d}" for i in range(6)]
    assert rs.select_scans(ids, None) == ids
    assert rs.select_scans(ids, "1-3,phantom_005,1") == ids[1:4] + ["phantom_005"]
    from cardiomotion.errors import InputError

    with pytest.raises(InputError, match="no such fold or scan: 'phantom_099'"):
        rs.select_scans(ids, "phantom_099")
    ns = argparse.Namespace(sigma=[2.0, 3.0], smooth_weight=[0.0, 0.01, 0.1], steps=[300], lr=[0.2], levels=[3],
                            similarity=["mse"], edge_weight=[0.0, 10.0], window=[[-200.0, 800.0]],
                            support_mm=[0.0], support_mode=["mask"], blood_hu=[[200.0, 800.0]], alpha=[0.85],
                            volume_weight=[0.0], tissue_hu=[[0.0, 200.0]])
    grid = rs.settings_grid(ns)
    assert len(grid) == 12 and len({rs.setting_key(s) for s in grid}) == 12
    assert {s["smooth_weight"] for s in grid} == {0.0, 0.01, 0.1}
    # a row written before edge_weight, window and the support existed was made at edge 0, the
    # default window and no support
    old = {k: v for k, v in grid[0].items() if k not in ("edge_weight", "window", "support_mm", "support_mode")}
    assert grid[0]["edge_weight"] == 0.0 and rs.setting_key(old) == rs.setting_key(grid[0])
    wide = argparse.Namespace(**{**vars(ns), "window": [[-1000.0, 800.0]]})
    assert rs.setting_key(rs.settings_grid(wide)[0]) != rs.setting_key(grid[0])  # another window: not resumed from it
    # without a support its mode is no setting; with one, each mode is its own setting
    modes = rs.settings_grid(argparse.Namespace(**{**vars(ns), "sigma": [3.0], "smooth_weight": [0.01],
                                                   "edge_weight": [0.0], "support_mm": [0.0, 20.0],
                                                   "support_mode": ["mask", "confine"]}))
    assert len(modes) == 4 and len({rs.setting_key(s) for s in modes}) == 3
    other_blood = {**modes[-1], "blood_hu": [150.0, 800.0]}  # another blood range: another support
    assert rs.setting_key(other_blood) != rs.setting_key(modes[-1])
    assert rs.setting_key({**modes[0], "blood_hu": [150.0, 800.0]}) == rs.setting_key(modes[0])  # no support
    # each setting is the refinement annotate runs with a config holding the same values
    from cardiomotion.annotate.stage import Refinement
    from cardiomotion.config import load_config

    def annotates(annotate, blood=(200.0, 800.0)):  # the grid above holds no volume term: λ 0 unless given
        annotate = {"refine_volume_weight": 0.0, **annotate}
        return Refinement.from_config(load_config(None, {"annotate": annotate, "prepare": {"blood_hu": list(blood)}}))

    confine = {**modes[-1], "blood_hu": [150.0, 700.0]}
    assert confine["support_mode"] == "confine" and confine["support_mm"] == 20.0
    assert rs.refinement(confine) == annotates({"refine_sigma": 3.0, "refine_smooth_weight": 0.01,
                                                "refine_support_mm": 20.0, "refine_support_mode": "confine"},
                                               (150.0, 700.0))
    assert rs.refinement(modes[0]) == annotates({"refine_sigma": 3.0, "refine_smooth_weight": 0.01,
                                                 "refine_support_mm": 0.0}).without_support()
    ssim = {**modes[0], "similarity": "ssim_l1", "alpha": 0.6}
    assert rs.refinement(ssim) == annotates({"refine_sigma": 3.0, "refine_smooth_weight": 0.01, "refine_support_mm": 0.0,
                                             "refine_similarity": "ssim_l1", "ssim_alpha": 0.6}).without_support()
    assert rs.setting_key(ssim) != rs.setting_key({**ssim, "alpha": 0.85})
    # the incompressibility term: a row from before it had none; its tissue range is a setting only with it
    held = {**modes[0], "volume_weight": 0.003, "tissue_hu": [-20.0, 180.0]}
    before = {k: v for k, v in modes[0].items() if k not in ("volume_weight", "tissue_hu")}
    assert rs.setting_key(before) == rs.setting_key(modes[0]) != rs.setting_key(held)
    assert rs.setting_key({**modes[0], "tissue_hu": [-20.0, 180.0]}) == rs.setting_key(modes[0])
    assert rs.setting_key({**held, "tissue_hu": [0.0, 200.0]}) != rs.setting_key(held)
    assert rs.refinement(held) == annotates({"refine_sigma": 3.0, "refine_smooth_weight": 0.01, "refine_support_mm": 0.0,
                                             "refine_volume_weight": 0.003,
                                             "refine_tissue_hu": [-20.0, 180.0]}).without_support()


@pytest.mark.slow
def test_refine_sweep_refines_from_zero_flow_and_resumes(tmp_path_factory, tmp_path):
    """Zero steps leave zero flow (EPE = the truth's own length, magnitude 0); a short refinement
    lowers the myocardium EPE; a rerun adds no rows and reports the same summary."""
    from cv_cohort import cohort

    from cardiomotion.data.table import load_pair, read_scan_table
    from cardiomotion.evaluate.physiology import LV_MYO
    from cardiomotion.flow.metrics import endpoint_error

    prepared, _ = cohort(tmp_path_factory)
    out = tmp_path / "sweep.jsonl"
    args = ["--prepared", str(prepared), "--scans", "0", "--steps", "0,40", "--levels", "2", "--out", str(out)]
    first = _bench("refine_sweep.py", *args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and first["scans"] == ["phantom_000"]
    by_steps = {r["setting"]["steps"]: r for r in rows}
    pair = load_pair(prepared, read_scan_table(prepared).iloc[0])
    zero_epe = endpoint_error(np.zeros_like(pair.truth_flow), pair.truth_flow, spacing_mm=(pair.spacing_mm,) * 3,
                              mask=pair.ed_labels == LV_MYO).epe_mm
    assert by_steps[0]["epe_myo_mm"] == pytest.approx(zero_epe) and by_steps[0]["magnitude_myo"] == 0.0
    assert by_steps[40]["epe_myo_mm"] < 0.8 * zero_epe and by_steps[40]["magnitude_myo"] > 0.3
    assert [s["setting"]["steps"] for s in first["summary"]] == [40, 0]  # best myocardium EPE first
    again = _bench("refine_sweep.py", *args, "--figure", str(tmp_path / "sweep.png"))
    assert len(out.read_text().splitlines()) == 2 and again["summary"] == first["summary"]
    assert (tmp_path / "sweep.png").stat().st_size > 0 and again["figure"] == str(tmp_path / "sweep.png")
    # a masked setting weights the same refinement by the support (made once per invocation and
    # scan: the masked row reuses it, seconds included): never more motion anywhere
    masked_out = tmp_path / "masked.jsonl"
    masked = _bench("refine_sweep.py", "--prepared", str(prepared), "--scans", "0", "--steps", "40", "--levels", "2",
                    "--support-mm", "0,20", "--support-mode", "mask", "--out", str(masked_out))
    plain, mask = [json.loads(line) for line in masked_out.read_text().splitlines()]
    assert mask["setting"]["support_mode"] == "mask" and masked["blood_hu"] == [200.0, 800.0]
    assert mask["seconds"] == plain["seconds"] and plain["epe_myo_mm"] == pytest.approx(by_steps[40]["epe_myo_mm"])
    assert 0.0 < mask["support_share"] <= 1.0 and 0.0 < mask["support_heart"] <= 1.0
    assert mask["magnitude_myo"] <= plain["magnitude_myo"] + 1e-9


def test_prior_temperature_summary_ranks_temperatures_by_the_truth_energy_score():
    """Per T the mean over the scans every T has; the best T by the truth energy score, each T's
    paired difference to it and the scans where each T is best."""
    pt = _load("prior_temperature")
    rows = [{"scan": s, "temperature": t, "prior_truth_energy_score_mm": e, "prior_spread_skill": 0.5}
            for s, t, e in [("a", 1.0, 2.0), ("a", 2.0, 1.5), ("b", 1.0, 1.0), ("b", 2.0, 1.2),
                            ("c", 1.0, 9.0)]]  # c lacks T 2: left out
    s = pt.summarize(rows, [1.0, 2.0])
    assert s["scans"] == ["a", "b"]
    assert s["per_temperature"]["1.0"]["prior_truth_energy_score_mm"] == pytest.approx(1.5)
    assert s["per_temperature"]["2.0"]["prior_truth_energy_score_mm"] == pytest.approx(1.35)
    assert s["best_temperature_by_truth_energy"] == 2.0
    assert s["truth_energy_vs_best"]["1.0"] == {"mean_diff_mm": pytest.approx(0.15), "folds_best": 1}
    assert s["truth_energy_vs_best"]["2.0"] == {"mean_diff_mm": 0.0, "folds_best": 1}


@pytest.mark.slow
def test_prior_temperature_scores_a_utility_folders_generators_at_each_temperature(tmp_path_factory, tmp_path):
    """A fold generator (a model folder) of the held-out scan scored at T 0, 1, 2: at T 0 every
    sample is the prior mean (no spread, energy score = mean error = skill); the spread grows with
    T; the flows are the exact truth here, so the scores against the annotation and the truth
    agree; a rerun adds no row; a folder without generators is one error."""
    from cv_cohort import cohort

    from cardiomotion.data.table import read_scan_table
    from cardiomotion.generate.synthetic import make_random_model_dir

    prepared, flows = cohort(tmp_path_factory)
    scan = sorted(read_scan_table(prepared).scan_id.astype(str))[1]
    model = make_random_model_dir(tmp_path / "model", grid=(32, 32, 32), channels=(8, 16, 32), latent_channels=4)
    (tmp_path / "u" / "folds" / scan).mkdir(parents=True)
    (tmp_path / "u" / "folds" / scan / "generator.json").write_text(json.dumps({"model_uri": str(model)}))
    out = tmp_path / "t.jsonl"
    args = ("--utility", str(tmp_path / "u"), "--prepared", str(prepared), "--flows", str(flows),
            "--temperatures", "0,1,2", "--k", "4", "--out", str(out))
    summary = _bench("prior_temperature.py", *args)
    rows = {r["temperature"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [0.0, 1.0, 2.0] and all(r["scan"] == scan and r["k"] == 4 for r in rows.values())
    zero = rows[0.0]
    assert zero["prior_truth_spread_vox"] == pytest.approx(0.0, abs=1e-6)
    assert zero["prior_truth_energy_score_vox"] == pytest.approx(zero["prior_truth_mean_error_vox"], rel=1e-5)
    assert zero["prior_truth_mean_error_vox"] == pytest.approx(zero["prior_truth_skill_vox"], rel=1e-5)
    assert 0 < rows[1.0]["prior_truth_spread_vox"] < rows[2.0]["prior_truth_spread_vox"]
    for r in rows.values():
        assert r["prior_energy_score_vox"] == pytest.approx(r["prior_truth_energy_score_vox"], rel=1e-4)
        assert 0.3 < r["truth_ef"] < 0.8
    assert summary["scans"] == [scan] and summary["best_temperature_by_truth_energy"] in (0.0, 1.0, 2.0)
    _bench("prior_temperature.py", *args)
    assert len(out.read_text().splitlines()) == 3
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "prior_temperature.py"), "--utility", str(tmp_path),
                           "--prepared", str(prepared), "--flows", str(flows), "--out", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 2 and "no fold generators" in proc.stderr
    # generators recorded as made from other annotations are not scored against these
    (tmp_path / "u" / "inputs.json").write_text(json.dumps({"prepared": str(Path(prepared).resolve()),
                                                             "flows": str(tmp_path / "elsewhere"), "flows_sha256": "0"}))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "prior_temperature.py"), *args[:-1],
                           str(tmp_path / "y.jsonl")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 2 and "made from other inputs" in proc.stderr and not (tmp_path / "y.jsonl").exists()


def test_utility_power_plans_folds_and_seeds_from_a_two_seed_comparison(tmp_path, capsys):
    """Two arms with two seeds on every scan: the spread's parts, one plan per (folds, seeds), each
    with its paired and separate smallest differences; one-seed rows are a one-line refusal."""
    mod = _load("utility_power")
    est = {"steps": 1000}
    rng = np.random.default_rng(0)
    rows = []
    for s in range(6):
        shared = 2.0 + rng.normal(0, 0.2)
        for seed in (0, 1):
            rows += [{"scan": f"s{s}", "arm": "cvae", "n": 256, "seed": seed, "epe_myo_mm": shared + 0.1 + rng.normal(0, 0.1),
                      "estimator": est},
                     {"scan": f"s{s}", "arm": "annotated", "n": 43, "seed": seed, "epe_myo_mm": shared + rng.normal(0, 0.1),
                      "estimator": est}]
    u = _runs(tmp_path / "u", rows)
    args = ["--a", str(u), "--b", str(u), "--b-arm", "annotated", "--b-n", "43", "--trials", "200"]
    assert mod.main([*args, "--plan-folds", "8,44", "--plan-seeds", "1,3", "--figure", str(tmp_path / "plan.png")]) == 0
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    out = json.loads(capsys.readouterr().out)
    assert out["spread"]["scans"] == 6 and out["spread"]["seeds_a"] == 2.0
    assert [(p["folds"], p["seeds"]) for p in out["plans"]] == [(8, 1), (8, 3), (44, 1), (44, 3)]
    widths = [p["halfwidth"] for p in out["plans"]]
    assert widths[0] > widths[1] > widths[3] and widths[0] > widths[2] > widths[3]  # more of either narrows it
    assert all(p["smallest_resolved_separate"] > p["smallest_resolved_paired"] > 0 for p in out["plans"])
    one = _runs(tmp_path / "one", [r for r in rows if r["seed"] == 0])
    assert mod.main(["--a", str(one), "--b", str(one), "--b-arm", "annotated", "--b-n", "43"]) == 2
    assert "no scan holds two seeds" in capsys.readouterr().err
    assert mod.main([*args, "--plan-folds", "0"]) == 2
    assert "--plan-folds" in capsys.readouterr().err


def test_process_cpu_attributes_a_grandchilds_cpu_to_its_kind_and_fails_cleanly_without_a_command(capsys):
    """A parent that sleeps starts a child that spins 0.8 s of CPU: both are counted (the child
    only because it descends from the command), the child's spin is in their CPU seconds, the
    machine was busy at least that long, and the command's exit code comes back. The child then
    idles 0.4 s, so that a sample sees its whole spin however late the sampler wakes on a loaded
    machine (CPU spent after a process's last sample is not seen: 0.70 s was read once)."""
    mod = _load("process_cpu")
    child = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\ntime.sleep(0.4)"
    parent = (f"import subprocess, sys, time\ntime.sleep(0.3)\n"
              f"subprocess.run([sys.executable, '-c', {child!r}])\nsys.exit(3)")
    out = mod.measure([sys.executable, "-c", parent], interval=0.1)
    assert out["rc"] == 3 and out["wall_s"] >= 1.1
    kinds = {k["kind"]: k for k in out["processes"]["by_kind"]}
    name = Path(sys.executable).name
    assert kinds[name]["processes"] == 2  # parent and child: one program name
    assert 0.75 <= kinds[name]["cpu_s"] <= 0.8 + 0.6  # the child's spin, plus two interpreter start-ups
    assert out["machine"]["busy_core_s"] >= 0.75
    with pytest.raises(SystemExit):
        mod.main([])
    assert "no command given" in capsys.readouterr().err
