"""The classical demons baseline returns a pull field ED←ES in the project's convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cardiomotion.evaluate.baseline import DemonsSettings, default_iterations, demons_flow
from cardiomotion.flow import warp

SHIFT = np.array([2.0, 0.0, -1.0])  # voxels along axes (I, J, K)


def _blob(shape: tuple[int, int, int], centre: np.ndarray) -> np.ndarray:
    """A smooth anisotropic Gaussian blob in HU (−100 background, ~400 peak)."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    r2 = (((x - centre.reshape(3, 1, 1, 1)) ** 2) / np.array([16.0, 9.0, 20.0]).reshape(3, 1, 1, 1)).sum(0)
    return (-100.0 + 500.0 * np.exp(-r2 / 2.0)).astype(np.float32), r2


def _pair(shape=(32, 32, 32)):
    centre = np.array(shape, dtype=np.float64) / 2.0 - 0.5
    es, r2 = _blob(shape, centre)
    # ED(x) = ES(x + SHIFT): the ED blob sits at centre − SHIFT; exact, no interpolation.
    ed, r2_ed = _blob(shape, centre - SHIFT)
    return es, ed, r2_ed


def _warp(vol: np.ndarray, u: np.ndarray) -> np.ndarray:
    return warp(torch.from_numpy(vol)[None, None], torch.from_numpy(u)[None]).numpy()[0, 0]


@pytest.mark.parametrize("shape,spacing", [((32, 32, 32), 4.0), ((32, 28, 24), (1.0, 2.0, 3.0))])
def test_demons_recovers_a_known_shift_with_our_sign(shape, spacing):
    es, ed, r2_ed = _pair(shape)
    u = demons_flow(es, ed, spacing, iterations=(200, 100), levels=2)
    assert u.shape == (3, *shape) and u.dtype == np.float32
    inside = r2_ed < 4.0  # the blob's core on the ED grid, where the field is defined
    mean = u[:, inside].mean(axis=1)
    np.testing.assert_allclose(mean, SHIFT, atol=0.3)
    # warp(ES, u) ≈ ED: the registration explains the difference.
    err_before = np.abs(es - ed).mean()
    err_after = np.abs(_warp(es, u) - ed).mean()
    assert err_after < 0.2 * err_before


def test_identical_frames_give_near_zero_flow():
    es, _, _ = _pair()
    u = demons_flow(es, es.copy(), 2.0, iterations=20, levels=2)
    assert np.abs(u).max() < 0.05


def test_default_schedule_and_settings():
    assert default_iterations(3) == (400, 200, 100)
    assert default_iterations(1) == (100,)
    assert DemonsSettings().iterations == default_iterations(DemonsSettings().levels)
    d = DemonsSettings().to_dict()
    assert d["iterations"] == [400, 200, 100] and d["window_hu"] == [-200.0, 800.0]


def test_bad_arguments_are_refused():
    es, ed, _ = _pair()
    with pytest.raises(ValueError, match="one shape"):
        demons_flow(es, ed[:-1], 4.0)
    with pytest.raises(ValueError, match="levels"):
        demons_flow(es, ed, 4.0, iterations=(10, 10), levels=3)
    with pytest.raises(ValueError, match="spacing"):
        demons_flow(es, ed, 0.0)
    with pytest.raises(ValueError, match="method"):
        demons_flow(es, ed, 4.0, method="optical-flow")


def test_bench_reports_zero_error_for_a_perfect_annotation_and_draws_the_figure(ray_session, tmp_path, capsys):
    """bench/annotation_baseline.py end to end on one phantom pair: an 'annotation' that is the
    truth field itself scores EPE 0, demons beats zero flow, and --figure writes the PNG."""
    import importlib.util
    import json
    from pathlib import Path

    from cardiomotion.config import load_config
    from cardiomotion.data.phantom import make_cohort
    from cardiomotion.data.prepare import prepare_scans
    from cardiomotion.data.table import read_scan_table
    from cardiomotion.flow import read_flow, write_flow

    cfg = load_config(None, {"prepare": {"spacing_mm": 4.0, "grid": [32, 32, 32]}, "ray": {"num_cpus": 2}})
    cohort = make_cohort(tmp_path / "cohort", patients=1, grid=32, workers=1)
    prepare_scans(cohort, tmp_path / "prepared", cfg)
    row = read_scan_table(tmp_path / "prepared").iloc[0]
    truth, affine = read_flow(tmp_path / "prepared" / row["truth_flow_path"])
    ann = tmp_path / "annotations" / row["scan_id"]
    ann.mkdir(parents=True)
    write_flow(ann / "flow.nii.gz", truth, affine)

    spec = importlib.util.spec_from_file_location("annotation_baseline",
                                                  Path(__file__).parents[1] / "bench" / "annotation_baseline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    png = tmp_path / "epe.png"
    assert bench.main(["--prepared", str(tmp_path / "prepared"), "--annotations", str(tmp_path / "annotations"),
                       "--iterations", "20", "--levels", "2", "--threads", "1", "--figure", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    methods = result["per_scan"][0]["methods"]
    assert methods["annotation"]["epe_myo_mm"] == pytest.approx(0.0, abs=1e-4)
    assert methods["demons"]["epe_myo_mm"] < 0.7 * methods["zero"]["epe_myo_mm"]
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and result["figure"] == str(png)
