"""Flow files (NIfTI intent 1006, RAS mm vectors): round trip, refusals, ITK cross-check."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cardiomotion.errors import InputError
from cardiomotion.fileio import write_nifti
from cardiomotion.flow import NIFTI_INTENT_DISPVECT, read_flow, warp, write_flow

SHAPE = (24, 20, 16)
SPACING = (0.8, 1.2, 2.5)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_las_affine() -> np.ndarray:
    """Rotated (oblique), anisotropic, x-flipped (LAS) voxel → RAS mm affine."""
    a = np.eye(4)
    a[:3, :3] = _rotation(20, -15, 30) @ np.diag([-SPACING[0], SPACING[1], SPACING[2]])
    a[:3, 3] = [10.0, -20.0, 5.0]
    assert nib.aff2axcodes(a) == ("L", "A", "S")
    return a


def _smooth(shape, sigma, seed) -> np.ndarray:
    return gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma, mode="nearest")


def _smooth_flow(seed=0, max_abs=2.0) -> np.ndarray:
    u = np.stack([_smooth(SHAPE, 3.0, seed + c) for c in range(3)])
    return u / np.abs(u).max() * max_abs


def test_round_trip_oblique_anisotropic_las(tmp_path, oblique_las_affine):
    u = _smooth_flow()
    path = write_flow(tmp_path / "flow.nii.gz", u, oblique_las_affine)
    img = nib.load(str(path))
    assert img.shape == (*SHAPE, 1, 3)
    assert img.get_data_dtype() == np.float32
    assert int(img.header["intent_code"]) == NIFTI_INTENT_DISPVECT
    np.testing.assert_allclose(img.get_sform(), oblique_las_affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), oblique_las_affine, atol=1e-5)
    # on disk: RAS mm vectors u_mm = A[:3,:3] @ u_vox
    on_disk = np.moveaxis(np.asarray(img.dataobj)[:, :, :, 0, :], -1, 0)
    np.testing.assert_allclose(on_disk, np.einsum("ij,j...->i...", oblique_las_affine[:3, :3], u),
                               atol=1e-5)
    back, affine = read_flow(path)
    assert back.shape == (3, *SHAPE) and back.dtype == np.float32
    np.testing.assert_allclose(affine, oblique_las_affine, atol=1e-5)
    np.testing.assert_allclose(back, u, atol=1e-5)


def test_read_refuses_wrong_intent(tmp_path, oblique_las_affine):
    data = np.zeros((*SHAPE, 1, 3), dtype=np.float32)
    path = write_nifti(tmp_path / "not_a_flow.nii.gz", data, oblique_las_affine)  # no intent
    with pytest.raises(InputError, match="intent") as exc:
        read_flow(path)
    assert str(path) in str(exc.value)
    path = write_nifti(tmp_path / "vector.nii.gz", data, oblique_las_affine, intent=1007)
    with pytest.raises(InputError, match="intent") as exc:
        read_flow(path)
    assert str(path) in str(exc.value)


def test_read_refuses_wrong_shape(tmp_path, oblique_las_affine):
    path = write_nifti(tmp_path / "four_d.nii.gz", np.zeros((*SHAPE, 3), dtype=np.float32),
                       oblique_las_affine, intent=NIFTI_INTENT_DISPVECT)
    with pytest.raises(InputError, match="shape") as exc:
        read_flow(path)
    assert str(path) in str(exc.value)
    path = write_nifti(tmp_path / "two_comp.nii.gz", np.zeros((*SHAPE, 1, 2), dtype=np.float32),
                       oblique_las_affine, intent=NIFTI_INTENT_DISPVECT)
    with pytest.raises(InputError, match="shape") as exc:
        read_flow(path)
    assert str(path) in str(exc.value)


def test_read_refuses_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError) as exc:
        read_flow(tmp_path / "missing.nii.gz")
    assert "missing.nii.gz" in str(exc.value)
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(InputError) as exc:
        read_flow(bad)
    assert "corrupt.nii.gz" in str(exc.value)


def test_a_truncated_flow_is_refused_in_one_line(tmp_path, oblique_las_affine):
    """A flow file cut short (an uncompressed .nii, so nibabel reads the header and fails on the
    voxels with a message of two lines): the error names the file, on one line, as the CLI prints it."""
    path = write_flow(tmp_path / "flow.nii", np.ones((3, 6, 6, 6), np.float32), oblique_las_affine)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError) as exc:
        read_flow(path)
    assert str(exc.value).startswith(f"{path}: ") and "\n" not in str(exc.value)
    assert "bytes from" in str(exc.value) and "- could the file be damaged?" in str(exc.value)  # nibabel's two lines, joined


def test_write_refuses_bad_flow(tmp_path, oblique_las_affine):
    with pytest.raises(ValueError):
        write_flow(tmp_path / "f.nii.gz", np.zeros((2, *SHAPE)), oblique_las_affine)
    u = np.zeros((3, *SHAPE))
    u[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        write_flow(tmp_path / "f.nii.gz", u, oblique_las_affine)
    assert not (tmp_path / "f.nii.gz").exists()


def test_itk_resample_agrees_with_warp(tmp_path, oblique_las_affine):
    """SimpleITK reads our file as a displacement-field transform and warps exactly like warp().

    ITK works in LPS: its NIfTI reader (ITK ≥ 5.3.1) turns intent-1006 vectors from RAS into
    LPS and TransformPoint(p) = p + d(p), so Resample(ES, ED grid, T) computes ES(x + u(x)),
    the same pull as warp(ES, u).
    """
    sitk = pytest.importorskip("SimpleITK")
    es = _smooth(SHAPE, 1.5, seed=11)
    es = (es - es.min()) / (es.max() - es.min()) * 1000.0 - 200.0  # a HU-like range
    u = _smooth_flow(seed=3, max_abs=2.0)
    es_path = write_nifti(tmp_path / "es.nii.gz", es.astype(np.float32), oblique_las_affine)
    flow_path = write_flow(tmp_path / "flow.nii.gz", u, oblique_las_affine)

    es_img = sitk.ReadImage(str(es_path), sitk.sitkFloat64)
    field = sitk.ReadImage(str(flow_path), sitk.sitkVectorFloat64)
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == SHAPE
    np.testing.assert_allclose(field.GetDirection(), es_img.GetDirection(), atol=1e-6)
    # ITK holds the vectors in LPS mm: (-x, -y, z) of our RAS mm vectors
    itk_vectors = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)  # (I, J, K, 3)
    ras_mm = np.einsum("ij,j...->...i", oblique_las_affine[:3, :3], u)
    np.testing.assert_allclose(itk_vectors, ras_mm * np.array([-1.0, -1.0, 1.0]), atol=1e-4)

    transform = sitk.DisplacementFieldTransform(field)  # takes the field's buffer
    ed_reference = es_img  # the ED grid is the ES grid here
    resampled = sitk.Resample(es_img, ed_reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    itk_out = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)

    es_t = torch.from_numpy(es.astype(np.float32).astype(np.float64))[None, None]
    ours = warp(es_t, torch.from_numpy(u)[None])[0, 0].numpy()
    inner = (slice(3, -3),) * 3
    value_range = float(es.max() - es.min())
    assert np.abs(ours - es)[inner].max() > 0.02 * value_range  # the flow really moves things
    assert np.abs(itk_out - ours)[inner].max() < 1e-4 * value_range
    # the check is sensitive to the vector convention: RAS x flipped (LPS misread) disagrees
    a = oblique_las_affine[:3, :3]
    u_flipped = np.einsum("ij,j...->i...", np.linalg.inv(a) @ np.diag([-1.0, 1.0, 1.0]) @ a, u)
    wrong = warp(es_t, torch.from_numpy(u_flipped)[None])[0, 0].numpy()
    assert np.abs(itk_out - wrong)[inner].max() > 0.01 * value_range
