"""Real-input gaps of the file readers: suffixes in any case (``case.Nii.Gz``, ``X.NRRD``,
``x.MHA``), and files that do not state their orientation (NIfTI with qform_code = sform_code = 0,
MetaImage without TransformMatrix), read with the library's assumed orientation and a note in
``Scan.notes`` that ``prepare`` passes on; NRRD without an orientation is refused.

Files are written by independent writers (nibabel, and the hand-written NRRD/MetaImage writers of
test_nrrd_metaimage), never by the project's own code.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_nrrd_metaimage import _oblique_lps, _volume, assert_world_positions, write_metaimage, write_nrrd

from cardiomotion.data.scan import ScanFormat, detect_format, read_scan, scan_id_of
from cardiomotion.errors import InputError
from cardiomotion.orientation import lps_to_ras

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
RAS_AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 3.0, 0, 20.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1]])
NO_ORIENTATION = "NIfTI qform_code and sform_code are both 0: orientation unknown"


def _data(shape=(3, 4, 5, 2)) -> np.ndarray:
    return (np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape) * 7 - 500).astype(np.int16)


def _save_nifti(path: Path, img: nib.Nifti1Image) -> Path:
    """Save with nibabel under a lower-case name, then give the file ``path``'s name (nibabel
    would write a mixed-case name under another one)."""
    tmp = path.with_name("tmp_write" + (".nii.gz" if path.name.lower().endswith(".gz") else ".nii"))
    nib.save(img, str(tmp))
    tmp.rename(path)
    return path


def _no_codes(img: nib.Nifti1Image) -> nib.Nifti1Image:
    img.set_qform(img.affine, code=0)
    img.set_sform(img.affine, code=0)
    return img


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


def _nrrd(seq_axis_first: bool, detached: bool):
    return lambda path, phases, lps: write_nrrd(path, phases, lps, seq_axis_first=seq_axis_first, encoding="gzip",
                                                detached=detached)


@pytest.mark.parametrize("name, fmt, write", [
    ("x.NRRD", ScanFormat.NRRD, _nrrd(True, False)), ("x.Seq.Nrrd", ScanFormat.NRRD, _nrrd(True, False)),
    ("x.NHDR", ScanFormat.NRRD, _nrrd(False, True)), ("x.Nrrd", ScanFormat.NRRD, _nrrd(False, False)),
    ("x.MHA", ScanFormat.METAIMAGE, write_metaimage), ("x.Mha", ScanFormat.METAIMAGE, write_metaimage),
    ("x.MHD", ScanFormat.METAIMAGE, write_metaimage),
])
def test_nrrd_and_metaimage_with_a_suffix_in_any_case_read_what_was_written(tmp_path, name, fmt, write):
    phases = np.stack([_volume(seed=t) for t in range(2)], axis=-1)
    lps = _oblique_lps()
    path = write(tmp_path / name, phases, lps)
    assert detect_format(path) is fmt
    scan = read_scan(path)
    assert scan.scan_id == scan_id_of(path) == "x" and scan.notes == []
    np.testing.assert_allclose(scan.original_affine, lps_to_ras(lps), atol=1e-6)
    for t in range(2):
        assert_world_positions(scan.phase(t), scan.affine, phases[..., t], lps)


# --------------------------------------------------------------------------- NIfTI without orientation


def test_nifti_4d_with_both_codes_0_is_read_with_nibabels_fallback_and_a_note(tmp_path):
    """nibabel's fallback: voxel sizes only, the first axis flipped (-x), centred on the volume."""
    data = _data()
    path = _save_nifti(tmp_path / "nocodes.nii.gz", _no_codes(nib.Nifti1Image(data, RAS_AFFINE)))
    header = nib.load(str(path)).header
    assert int(header["qform_code"]) == int(header["sform_code"]) == 0
    scan = read_scan(path)
    np.testing.assert_allclose(scan.original_affine[:3, :3], np.diag([-2.0, 3.0, 4.0]))  # what the note says
    assert scan.notes == [f"nocodes.nii.gz: {NO_ORIENTATION}, read as nibabel's fallback (voxel sizes along "
                          "-x,+y,+z, centred on the volume); check left/right and head/foot"]
    np.testing.assert_array_equal(scan.phase(1), data[::-1, :, :, 1])  # -x to RAS+: axis 0 reversed


@pytest.mark.parametrize("qform_code, sform_code", [(1, 0), (0, 2), (1, 1)])
def test_nifti_that_states_its_orientation_has_no_note(tmp_path, qform_code, sform_code):
    img = nib.Nifti1Image(_data(), RAS_AFFINE)
    img.set_qform(RAS_AFFINE, code=qform_code)
    img.set_sform(RAS_AFFINE, code=sform_code)
    scan = read_scan(_save_nifti(tmp_path / "coded.nii.gz", img))
    np.testing.assert_allclose(scan.original_affine, RAS_AFFINE)
    assert scan.notes == []


def test_nifti_phase_folder_gets_one_note_for_all_its_files(tmp_path):
    data = _data((3, 4, 5, 3))
    folder = tmp_path / "study"
    folder.mkdir()
    for t in range(3):
        _save_nifti(folder / f"p{t}.nii.gz", _no_codes(nib.Nifti1Image(data[..., t], RAS_AFFINE)))
    scan = read_scan(folder)
    assert len(scan.notes) == 1
    assert scan.notes[0].startswith(f"all 3 phase files (p0.nii.gz to p2.nii.gz): {NO_ORIENTATION}")


def test_nifti_phase_folder_names_the_one_file_without_orientation(tmp_path):
    data = _data((3, 4, 5, 3))
    folder = tmp_path / "study"
    folder.mkdir()
    fallback = nib.load(str(_save_nifti(tmp_path / "probe.nii", _no_codes(nib.Nifti1Image(data[..., 0], RAS_AFFINE))))).affine
    for t in range(3):
        img = nib.Nifti1Image(data[..., t], fallback)  # the same grid, stated
        _save_nifti(folder / f"p{t}.nii.gz", _no_codes(img) if t == 1 else img)
    scan = read_scan(folder)
    assert len(scan.notes) == 1 and scan.notes[0].startswith(f"p1.nii.gz (1 of 3 phase files): {NO_ORIENTATION}")


def _unenhanced(tmp_path: Path, name: str) -> Path:
    """test_prepare's unenhanced 4-D scan (a static bright block, one voxel that flickers), its
    header without orientation."""
    rng = np.random.default_rng(0)
    data = rng.normal(40.0, 5.0, (24, 24, 24, 4)).astype(np.float32)
    data[8:16, 8:16, 8:16, :] = 500.0
    data[4, 4, 4, 1] = 500.0
    data[20:] = -800.0  # lung: the intensities are HU
    return _save_nifti(tmp_path / name, _no_codes(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))))


def test_prepare_keeps_reader_notes_after_what_was_left_out(tmp_path):
    from cardiomotion.config import load_config
    from cardiomotion.data.phases import PhaseChoice
    from cardiomotion.data.prepare import prepare_scan, scan_notes

    scan = read_scan(_unenhanced(tmp_path, "quiet.nii.gz"))
    assert len(scan.notes) == 1 and NO_ORIENTATION in scan.notes[0]
    more = dataclasses.replace(scan, left_out=["a dose report"])
    assert scan_notes(more, PhaseChoice(1, 0, "manifest")) == ["left out a dose report", scan.notes[0]]

    cfg = load_config(SMOKE).prepare
    record = prepare_scan(scan, tmp_path / "out", cfg, {"quiet": (0, 1)})
    assert record["notes"] == scan.notes
    kept = json.loads((tmp_path / "out" / "quiet" / "prepared.json").read_text())["record"]
    assert kept["notes"] == scan.notes


def test_prepare_prints_the_orientation_note(ray_session, tmp_path, capsys):
    from cardiomotion.cli import main

    path = _unenhanced(tmp_path, "quiet.Nii.Gz")
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["prepare", "--scans", str(path), "--out", str(out), "--config", str(SMOKE)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lines = [line.removeprefix("note: quiet: ") for line in printed.splitlines() if line.startswith("note: ")]
    assert lines[0].startswith(f"quiet.Nii.Gz: {NO_ORIENTATION}")  # then the flat blood pool's note
    assert json.loads((out / "quiet" / "prepared.json").read_text())["record"]["notes"] == lines


# --------------------------------------------------------------------------- MetaImage and NRRD


def _metaimage_header_edit(path: Path, old: bytes, new: bytes) -> Path:
    raw = path.read_bytes()
    cut = raw.index(b"ElementDataFile")
    head = raw[:cut]
    assert old in head
    path.write_bytes(head.replace(old, new) + raw[cut:])
    return path


@pytest.mark.parametrize("orientation", [None, b"AnatomicalOrientation = LPI\n"])
def test_metaimage_without_transform_matrix_is_read_as_itk_does_with_a_note(tmp_path, orientation):
    phases = np.stack([_volume(seed=t) for t in range(2)], axis=-1)
    lps = _oblique_lps()
    path = write_metaimage(tmp_path / "x.mha", phases, lps)
    line = path.read_bytes().split(b"TransformMatrix", 1)[1].split(b"\n", 1)[0]
    _metaimage_header_edit(path, b"TransformMatrix" + line + b"\n", orientation or b"")
    scan = read_scan(path)
    assumed = np.diag([*np.sqrt((lps[:3, :3] ** 2).sum(0)), 1.0])  # identity directions in LPS
    assumed[:3, 3] = lps[:3, 3]
    np.testing.assert_allclose(scan.original_affine, lps_to_ras(assumed), atol=1e-6)
    for t in range(2):
        assert_world_positions(scan.phase(t), scan.affine, phases[..., t], assumed)
    assert len(scan.notes) == 1
    assert scan.notes[0].startswith("x.mha: MetaImage has no TransformMatrix: orientation unknown, read as ITK's "
                                    "default (axes along L, P, S)")
    assert scan.notes[0].endswith("check left/right and head/foot")
    assert ("AnatomicalOrientation ignored" in scan.notes[0]) == (orientation is not None)


@pytest.mark.parametrize("synonym", [b"Rotation", b"Orientation"])
def test_metaimage_with_a_synonym_of_transform_matrix_has_no_note(tmp_path, synonym):
    phases = np.stack([_volume(seed=t) for t in range(2)], axis=-1)
    lps = _oblique_lps()
    path = _metaimage_header_edit(write_metaimage(tmp_path / "x.mhd", phases, lps), b"TransformMatrix", synonym)
    scan = read_scan(path)
    np.testing.assert_allclose(scan.original_affine, lps_to_ras(lps), atol=1e-6)
    assert scan.notes == []


@pytest.mark.parametrize("pattern, replacement, message", [
    (rb"space directions: [^\n]*\n", b"", "no 'space directions' field: voxel size and orientation are unknown"),
    (rb"space: left-posterior-superior", b"space dimension: 3", "no 'space' field"),
    (rb"space: left-posterior-superior", b"space: scanner-xyz", "unsupported world space 'scanner-xyz'"),
])
def test_nrrd_without_an_anatomical_orientation_is_refused(tmp_path, pattern, replacement, message):
    path = write_nrrd(tmp_path / "x.nrrd", np.stack([_volume()] * 2, -1), _oblique_lps(), seq_axis_first=True)
    raw = path.read_bytes()
    cut = raw.index(b"\n\n")
    head, n = re.subn(pattern, replacement, raw[:cut])
    assert n == 1
    path.write_bytes(head + raw[cut:])
    with pytest.raises(InputError, match=message) as err:
        read_scan(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_nrrd_with_spacings_and_no_space_is_refused(tmp_path):
    """The old NRRD way of giving voxel sizes (``spacings``, no ``space``) has no orientation."""
    data = np.stack([_volume()] * 2, -1)
    path = tmp_path / "old.nrrd"
    header = ("NRRD0004\ntype: short\ndimension: 4\nsizes: 2 5 6 7\nspacings: nan 0.7 1.1 2.5\n"
              "kinds: list domain domain domain\nendian: little\nencoding: raw\n\n")
    path.write_bytes(header.encode() + np.moveaxis(data, 3, 0).astype("<i2").tobytes(order="F"))
    with pytest.raises(InputError, match="no 'space' field: the NRRD has no anatomical orientation"):
        read_scan(path)


def test_a_3d_frame_that_states_no_orientation_carries_the_note_into_its_prepared_record(tmp_path):
    """``generate --frames``: a 3-D NIfTI with both codes 0 and a 3-D MetaImage without
    TransformMatrix are read with their library's assumed orientation and the same note a scan
    gets; the prepared frame's record keeps it; a frame that states its orientation has none."""
    from cardiomotion.config import PrepareConfig
    from cardiomotion.data.frames import prepare_frame
    from cardiomotion.data.volume import read_volume

    data = _data((6, 5, 4))
    quiet = read_volume(_save_nifti(tmp_path / "quiet.nii.gz", _no_codes(nib.Nifti1Image(data, RAS_AFFINE))))
    assert quiet.notes == (f"quiet.nii.gz: {NO_ORIENTATION}, read as nibabel's fallback (voxel sizes along "
                           "-x,+y,+z, centred on the volume); check left/right and head/foot",)
    stated = read_volume(_save_nifti(tmp_path / "stated.nii.gz", nib.Nifti1Image(data, RAS_AFFINE)))
    assert stated.notes == () and stated.left_out == ()
    mha = write_metaimage(tmp_path / "m.mha", _volume(seed=0), _oblique_lps())
    assert read_volume(mha).notes == ()
    line = mha.read_bytes().split(b"TransformMatrix", 1)[1].split(b"\n", 1)[0]
    _metaimage_header_edit(mha, b"TransformMatrix" + line + b"\n", b"")
    (note,) = read_volume(mha).notes
    assert note.startswith("m.mha: MetaImage has no TransformMatrix: orientation unknown")
    record = prepare_frame(quiet, "quiet", tmp_path / "prepared", PrepareConfig(grid=[8, 8, 8], spacing_mm=2.0))
    assert record["notes"] == list(quiet.notes)
    assert json.loads((tmp_path / "prepared" / "quiet" / "prepared.json").read_text())["record"]["notes"] == record["notes"]
    assert "notes" not in prepare_frame(stated, "stated", tmp_path / "prepared", PrepareConfig(grid=[8, 8, 8], spacing_mm=2.0))
