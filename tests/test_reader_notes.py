"""Real-input gaps of the file readers: suffixes in any case (``case.Nii.Gz``, ``X.NRRD``,
``x.MHA``).

Files are written by independent writers (nibabel, and the hand-written NRRD/MetaImage writers of
test_nrrd_metaimage), never by the project's own code.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_nrrd_metaimage import _oblique_lps, _volume, assert_world_positions, write_metaimage, write_nrrd

from cardiomotion.data.scan import ScanFormat, detect_format, read_scan, scan_id_of
from cardiomotion.errors import InputError
from cardiomotion.orientation import lps_to_ras

RAS_AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 3.0, 0, 20.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1]])


def _data(shape=(3, 4, 5, 2)) -> np.ndarray:
    return (np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape) * 7 - 500).astype(np.int16)


def _save_nifti(path: Path, img: nib.Nifti1Image) -> Path:
    """Save with nibabel under a lower-case name, then give the file ``path``'s name (nibabel
    would write a mixed-case name under another one)."""
    tmp = path.with_name("tmp_write" + (".nii.gz" if path.name.lower().endswith(".gz") else ".nii"))
    nib.save(img, str(tmp))
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------- suffixes in any case


@pytest.mark.parametrize("name, klass", [
    ("case.Nii.Gz", nib.Nifti1Image), ("case.Nii", nib.Nifti1Image), ("case.nIi.gz", nib.Nifti1Image),
    ("CASE.NII", nib.Nifti1Image), ("case.NII.GZ", nib.Nifti1Image), ("case.nii.Gz", nib.Nifti1Image),
    ("case.Nii.gz", nib.Nifti2Image),
])
def test_nifti_4d_with_a_suffix_in_any_case_reads_what_was_written(tmp_path, name, klass):
    data = _data()
    path = _save_nifti(tmp_path / name, klass(data, RAS_AFFINE))
    assert detect_format(path) is ScanFormat.NIFTI_4D
    scan = read_scan(path)
    assert scan.scan_id == scan_id_of(path) == name.split(".")[0]
    np.testing.assert_array_equal(scan.original_affine, RAS_AFFINE)
    np.testing.assert_array_equal(scan.affine, RAS_AFFINE)  # already RAS+: nothing reordered
    assert scan.n_phases == 2 and scan.notes == []
    for t in range(2):
        np.testing.assert_array_equal(scan.phase(t), data[..., t])


def test_nifti_phase_folder_of_mixed_case_files_reads_what_was_written(tmp_path):
    data = _data((3, 4, 5, 3))
    folder = tmp_path / "study"
    folder.mkdir()
    for t, pct in enumerate((0, 40, 80)):
        _save_nifti(folder / f"ct_{pct}pct.Nii.Gz", nib.Nifti1Image(data[..., t], RAS_AFFINE))
    scan = read_scan(folder)
    assert scan.format is ScanFormat.NIFTI_PHASES and scan.phase_percent == [0.0, 40.0, 80.0]
    np.testing.assert_array_equal(scan.original_affine, RAS_AFFINE)
    for t in range(3):
        np.testing.assert_array_equal(scan.phase(t), data[..., t])


def test_a_3d_frame_with_a_mixed_case_suffix_reads_what_was_written(tmp_path):
    from cardiomotion.data.volume import read_volume

    data = _data((3, 4, 5))
    vol = read_volume(_save_nifti(tmp_path / "es.Nii.Gz", nib.Nifti1Image(data, RAS_AFFINE)))
    assert vol.frame_id == "es"
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_array_equal(vol.original_affine, RAS_AFFINE)


@pytest.mark.parametrize("name", ["bad.Nii", "bad.Nii.Gz"])
def test_a_mixed_case_name_that_holds_no_nifti_is_one_input_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 600 if name.endswith("Nii") else gzip.compress(b"\x00" * 600))
    with pytest.raises(InputError, match="not a readable NIfTI file .*no NIfTI-1 or NIfTI-2 header") as err:
        read_scan(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, seq_axis_first, detached", [
    ("x.NRRD", True, False), ("x.Seq.Nrrd", True, False), ("x.NHDR", False, True), ("x.Nrrd", False, False),
])
def test_nrrd_with_a_suffix_in_any_case_reads_what_was_written(tmp_path, name, seq_axis_first, detached):
    phases = np.stack([_volume(seed=t) for t in range(2)], axis=-1)
    lps = _oblique_lps()
    path = write_nrrd(tmp_path / name, phases, lps, seq_axis_first=seq_axis_first, encoding="gzip",
                      detached=detached)
    assert detect_format(path) is ScanFormat.NRRD
    scan = read_scan(path)
    assert scan.scan_id == scan_id_of(path) == "x" and scan.notes == []
    np.testing.assert_allclose(scan.original_affine, lps_to_ras(lps), atol=1e-9)
    for t in range(2):
        assert_world_positions(scan.phase(t), scan.affine, phases[..., t], lps)


@pytest.mark.parametrize("name", ["x.MHA", "x.Mha", "x.MHD"])
def test_metaimage_with_a_suffix_in_any_case_reads_what_was_written(tmp_path, name):
    phases = np.stack([_volume(seed=t) for t in range(2)], axis=-1)
    lps = _oblique_lps()
    path = write_metaimage(tmp_path / name, phases, lps)
    assert detect_format(path) is ScanFormat.METAIMAGE
    scan = read_scan(path)
    assert scan.scan_id == scan_id_of(path) == "x" and scan.notes == []
    np.testing.assert_allclose(scan.original_affine, lps_to_ras(lps), atol=1e-6)
    for t in range(2):
        assert_world_positions(scan.phase(t), scan.affine, phases[..., t], lps)
