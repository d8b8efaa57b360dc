"""Real-4DCT readers: NIfTI 4-D, per-phase NIfTI folders, DICOM series; orientation and errors."""
from __future__ import annotations

import copy
import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cardiomotion.data.dicom import looks_like_dicom, percent_from_description
from cardiomotion.data.nifti import phase_percents_from_names
from cardiomotion.data.scan import ScanFormat, read_scan
from cardiomotion.errors import InputError
from cardiomotion.orientation import axcodes, lps_to_ras

RAS = ("R", "A", "S")


def _canonical_index(scan, world_ras: np.ndarray) -> tuple[int, ...]:
    """Canonical voxel index of a world point that must fall exactly on a voxel centre."""
    c = (np.linalg.inv(scan.affine) @ np.append(world_ras, 1.0))[:3]
    idx = np.rint(c)
    np.testing.assert_allclose(c, idx, atol=1e-6)
    return tuple(int(v) for v in idx)


# --------------------------------------------------------------------------- NIfTI 4-D


def test_nibabel_example4d_las_is_reoriented_to_ras():
    path = Path(data_path) / "example4d.nii.gz"
    img = nib.load(path)
    raw = np.asarray(img.dataobj)  # (128, 96, 24, 2), LAS
    assert axcodes(img.affine) == ("L", "A", "S")

    scan = read_scan(path)
    assert scan.format == ScanFormat.NIFTI_4D
    assert scan.scan_id == "example4d"
    assert scan.n_phases == 2 and scan.phase_percent is None
    assert axcodes(scan.affine) == RAS
    np.testing.assert_array_equal(scan.original_affine, img.affine)
    assert scan.shape == (128, 96, 24)
    for t in range(2):
        vol = scan.phase(t)
        assert vol.dtype == np.float32 and vol.shape == scan.shape
        for ijk in [(0, 0, 0), (5, 17, 3), (127, 95, 23), (64, 48, 12), (100, 20, 7)]:
            world = (img.affine @ np.append(ijk, 1.0))[:3]
            assert vol[_canonical_index(scan, world)] == raw[ijk + (t,)]
        np.testing.assert_array_equal(vol, raw[::-1, :, :, t])  # LAS → RAS flips axis 0 only


def _write_4d(path: Path, data: np.ndarray, affine: np.ndarray, slope=None, inter=None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def _raw(shape=(3, 4, 5, 2)) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)


def test_lps_flipped_4d_is_flipped_exactly(tmp_path):
    raw = _raw()
    affine = np.array([[-2.0, 0, 0, 10], [0, -3.0, 0, 20], [0, 0, 4.0, -30], [0, 0, 0, 1]])
    scan = read_scan(_write_4d(tmp_path / "lps.nii.gz", raw, affine, slope=2.0, inter=-1024.0))
    assert axcodes(affine) == ("L", "P", "S") and axcodes(scan.affine) == RAS
    assert scan.shape == (3, 4, 5)
    expected_affine = np.array([[2.0, 0, 0, 10 - 2 * 2], [0, 3.0, 0, 20 - 3 * 3], [0, 0, 4.0, -30],
                                [0, 0, 0, 1]])
    np.testing.assert_allclose(scan.affine, expected_affine)
    np.testing.assert_allclose(scan.spacing, [2, 3, 4])
    for t in range(2):
        hu = raw[..., t].astype(np.float32) * 2.0 - 1024.0  # scl_slope / scl_inter applied
        np.testing.assert_array_equal(scan.phase(t), hu[::-1, ::-1, :])


def test_permuted_axes_4d_is_transposed_exactly(tmp_path):
    raw = _raw()  # axis 0 → S, axis 1 → L, axis 2 → A
    affine = np.array([[0, -2.0, 0, 5], [0, 0, 3.0, 6], [4.0, 0, 0, 7], [0, 0, 0, 1]])
    scan = read_scan(_write_4d(tmp_path / "perm.nii", raw, affine))
    assert axcodes(affine) == ("S", "L", "A") and axcodes(scan.affine) == RAS
    assert scan.shape == (4, 5, 3)
    # canonical (a, b, c) ← original (i=c, j=J-1-a, k=b)
    expected_affine = np.array([[2.0, 0, 0, 5 - 2 * 3], [0, 3.0, 0, 6], [0, 0, 4.0, 7], [0, 0, 0, 1]])
    np.testing.assert_allclose(scan.affine, expected_affine)
    np.testing.assert_array_equal(scan.original_affine, affine)
    for t in range(2):
        expected = np.transpose(raw[:, ::-1, :, t], (1, 2, 0)).astype(np.float32)
        np.testing.assert_array_equal(scan.phase(t), expected)


# --------------------------------------------------------------------------- per-phase folder


def test_phase_folder_matches_4d_file(tmp_path):
    raw = _raw((3, 4, 5, 3))
    affine = np.array([[0, -2.0, 0, 5], [0, 0, 3.0, 6], [4.0, 0, 0, 7], [0, 0, 0, 1]])
    four_d = read_scan(_write_4d(tmp_path / "whole.nii.gz", raw, affine))
    folder = tmp_path / "pat07"
    folder.mkdir()
    # natural sort: 5 < 40 < 100 (plain string sort would put 100 and 40 first)
    for t, name in enumerate(["ct_5pct.nii.gz", "ct_40pct.nii", "ct_100pct.nii.gz"]):
        nib.save(nib.Nifti1Image(raw[..., t], affine), folder / name)
    (folder / "notes.txt").write_text("ignored")

    scan = read_scan(folder)
    assert scan.format == ScanFormat.NIFTI_PHASES and scan.scan_id == "pat07"
    assert scan.n_phases == 3 and scan.phase_percent == [5.0, 40.0, 100.0]
    assert scan.shape == four_d.shape
    np.testing.assert_allclose(scan.affine, four_d.affine)
    np.testing.assert_array_equal(scan.original_affine, affine)
    for t in range(3):
        np.testing.assert_array_equal(scan.phase(t), four_d.phase(t))


def test_phase_percent_from_names():
    assert phase_percents_from_names(["phase_30.nii.gz", "phase_70.nii.gz"]) == [30.0, 70.0]
    assert phase_percents_from_names(["p01_ct_0.nii", "p01_ct_50.nii"]) == [0.0, 50.0]
    assert phase_percents_from_names(["es.nii", "ed_70.nii"]) is None
    assert phase_percents_from_names(["a_1.nii", "b_1.nii"]) is None  # not distinct
    assert phase_percents_from_names(["a_120.nii", "b_1.nii"]) is None  # not a percentage


# --------------------------------------------------------------------------- DICOM

_TEMPLATE = get_testdata_file("CT_small.dcm")
_ROWS, _COLS, _N_SLICES = 4, 5, 6
_PS = (0.9, 0.7)  # PixelSpacing: (between rows, between columns) mm
_STEP = 2.5
_ORIGIN = np.array([-10.25, 20.5, 30.0])


def _raw_slice(p: int, k: int) -> np.ndarray:
    """Known stored values (rows, cols): written phase p, slice k, row r, column c."""
    r, c = np.mgrid[:_ROWS, :_COLS]
    return (1000 * p + 100 * k + 10 * r + c).astype(np.int16)


def _slope(k: int) -> float:
    return 1.0 + (k % 2)


def _write_dicom_study(root: Path, iop, specs, n_slices=(_N_SLICES,) * 3, nested=False,
                       seed=0, step=_STEP, decimals=6, one_series=False) -> list[np.ndarray]:
    """Write one series per spec ((kind, percent); kind "temporal" or "trigger": the value is the
    images' TemporalPositionIdentifier or TriggerTime instead), slices in shuffled order, all files in ``root`` or
    (``nested``) in sub-folders, IPP rounded to ``decimals``; ``one_series``: every spec in one
    SeriesInstanceUID (a cine exported as one series); return the IPP (LPS, unrounded) of each
    slice index."""
    template = pydicom.dcmread(_TEMPLATE)
    rng = np.random.default_rng(seed)
    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    ipps = [_ORIGIN + k * step * normal for k in range(max(n_slices))]
    cine_uid = generate_uid()
    for p, (kind, pct) in enumerate(specs):
        uid = cine_uid if one_series else generate_uid()
        for k in rng.permutation(n_slices[p]):
            ds = copy.deepcopy(template)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = int(n_slices[p] - k)  # reversed: must not be used for ordering
            ds.SeriesDescription = "CTA cardiac"
            if kind == "nominal":
                ds.NominalPercentageOfCardiacPhase = float(pct)
            elif kind == "desc":
                ds.SeriesDescription = f"Cardiac {pct}%"
            elif kind == "temporal":
                ds.TemporalPositionIdentifier = int(pct)
            elif kind == "trigger":
                ds.TriggerTime = float(pct)
            elif kind == "nested":
                inner = Dataset()
                inner.NominalPercentageOfCardiacPhase = float(pct)
                outer = Dataset()
                outer.CardiacSynchronizationSequence = [inner]
                ds.PerFrameFunctionalGroupsSequence = [outer]
            ds.ImageOrientationPatient = [float(v) for v in iop]
            ds.ImagePositionPatient = [round(float(v), decimals) for v in ipps[k]]
            ds.PixelSpacing = list(_PS)
            ds.Rows, ds.Columns = _ROWS, _COLS
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = _raw_slice(p, int(k)).astype("<i2").tobytes()
            ds.RescaleSlope = _slope(int(k))
            ds.RescaleIntercept = -1024
            name = f"{generate_uid()[-12:]}.dcm"
            out = root / f"series{p}" / f"sub{k % 2}" / name if nested else root / name
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)
    return ipps


@pytest.mark.parametrize("iop,spacing,nested", [
    ([1, 0, 0, 0, 1, 0], (_PS[1], _PS[0], _STEP), False),  # axial
    ([1, 0, 0, 0, 0, -1], (_PS[1], _STEP, _PS[0]), True),  # coronal
    ([0.6, 0.8, 0, 0, 0, -1], None, True),  # oblique
])
def test_dicom_series_phases_slices_hu_and_geometry(tmp_path, iop, spacing, nested):
    specs = [("nominal", 70), ("desc", 40), ("nested", 0)]
    root = tmp_path / "dcm"
    root.mkdir()
    ipps = _write_dicom_study(root, iop, specs, nested=nested)
    (root / "README.txt").write_text("not dicom")
    # detect_format looks at the folder's own files only: nested layouts name the format
    scan = read_scan(root, ScanFormat.DICOM if nested else None)

    assert scan.format == ScanFormat.DICOM and scan.scan_id == "dcm"
    assert scan.phase_percent == [0.0, 40.0, 70.0]
    written = [2, 1, 0]  # written series index of each sorted phase
    assert axcodes(scan.affine) == RAS
    assert sorted(scan.shape) == sorted((_COLS, _ROWS, _N_SLICES))
    if spacing is not None:
        np.testing.assert_allclose(scan.spacing, spacing, atol=1e-9)
    else:
        np.testing.assert_allclose(sorted(scan.spacing), sorted((_PS[1], _PS[0], _STEP)), atol=1e-9)

    # voxel (column 0, row 0) of slice k sits at the slice's IPP (LPS → RAS)
    for k in range(_N_SLICES):
        world = (scan.original_affine @ np.array([0, 0, k, 1.0]))[:3]
        np.testing.assert_allclose(world, (lps_to_ras(np.eye(4)) @ np.append(ipps[k], 1.0))[:3], atol=1e-6)

    iop = np.asarray(iop, dtype=float)
    for t, p in enumerate(written):
        vol = scan.phase(t)
        assert vol.dtype == np.float32 and vol.shape == scan.shape
        for k in range(_N_SLICES):
            hu = _raw_slice(p, k) * _slope(k) - 1024.0
            for r in range(_ROWS):
                for c in range(_COLS):
                    lps = ipps[k] + c * _PS[1] * iop[:3] + r * _PS[0] * iop[3:]
                    ras = lps * np.array([-1.0, -1.0, 1.0])
                    assert vol[_canonical_index(scan, ras)] == hu[r, c]


def _write_gdcm_jpeg(path: Path, img, keep_uids: bool = False) -> None:
    """Write a SimpleITK image as DICOM compressed JPEG Lossless (GDCM's JPEG is the lossless
    process 14); the writer sets the process's locale to "C" and leaves it, so it is restored."""
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL)
    try:
        w = sitk.ImageFileWriter()
        w.SetImageIO("GDCMImageIO")
        w.SetUseCompression(True)
        w.SetCompressor("JPEG")
        if keep_uids:
            w.KeepOriginalImageUIDOn()
        w.SetFileName(str(path))
        w.Execute(img)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_dicom_jpeg_lossless_pixel_data_decodes_to_the_written_values(tmp_path):
    """Slices written JPEG Lossless (1.2.840.10008.1.2.4.70, the usual PACS compression) by an
    independent writer (SimpleITK's GDCM), which pydicom cannot decode without plugins it does
    not bring: every phase reads back as the values written, rescaled by the header's slope and
    intercept. (GDCM's writer crashes on JPEG-LS, JPEG 2000 and RLE here, so those are not
    written.)"""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(0)
    written = {}
    for pct in (40, 70):
        uid = generate_uid()
        vol = written[pct] = rng.integers(-1000, 1000, (4, 6, 5)).astype(np.int16)  # (slices, rows, cols)
        for k in range(vol.shape[0]):
            img = sitk.GetImageFromArray(vol[k:k + 1])
            img.SetSpacing((0.7, 0.9, 1.0))
            img.SetOrigin((0.0, 0.0, 2.5 * k))
            for key, val in {"0020|000e": uid, "0008|0060": "CT", "0020|0013": str(k + 1),
                             "0020|0032": f"0\\0\\{2.5 * k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                             "0028|0030": "0.9\\0.7", "0008|103e": f"Cardiac {pct}%"}.items():
                img.SetMetaData(key, val)
            _write_gdcm_jpeg(tmp_path / f"p{pct}_{k}.dcm", img, keep_uids=True)
    for f in tmp_path.glob("*.dcm"):  # a rescale in the header (the compressed pixel data as written)
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.save_as(f)
    assert pydicom.dcmread(tmp_path / "p40_0.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.phase_percent == [40.0, 70.0] and scan.shape == (5, 6, 4)  # RAS: (cols, rows, slices) here
    for t, pct in enumerate((40, 70)):
        # (column, row, slice) order, flipped in the first two: LPS's +x, +y are RAS's −R, −A
        hu = written[pct].astype(np.float32) * 2 - 1024
        np.testing.assert_array_equal(scan.phase(t), hu.transpose(2, 1, 0)[::-1, ::-1, :])


def test_dicom_jpeg_lossless_multi_frame_decodes_each_frame_with_its_own_rescale(tmp_path):
    """Enhanced CT multi-frame files written JPEG Lossless by an independent writer (SimpleITK's
    GDCM, a phase per file), which pydicom cannot decode without plugins it does not bring: GDCM
    decodes each frame alone, and every frame keeps its own rescale (one frame's per-frame slope
    differs from the shared one, which GDCM's own multi-frame reading would not honour)."""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(1)
    written = {}
    for pct in (40, 70):
        vol = written[pct] = rng.integers(-1000, 1000, (4, 6, 5)).astype(np.int16)  # (slices, rows, cols)
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((0.7, 0.9, 2.5))
        img.SetMetaData("0008|0060", "CT")
        _write_gdcm_jpeg(tmp_path / f"p{pct}.dcm", img)  # a 3-D image: one Enhanced CT file, a frame per slice
    for pct in (40, 70):  # the phase and the rescales, added with the compressed pixel data kept as written
        f = tmp_path / f"p{pct}.dcm"
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = f"Cardiac {pct}%"
        shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        shared.RescaleSlope, shared.RescaleIntercept = 2, -1024
        own = Dataset()
        own.RescaleSlope, own.RescaleIntercept, own.RescaleType = 3, -1000, "HU"
        ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = [own]
        if pct == 70:  # stored values are read as stored (pydicom's way), never inverted as GDCM would
            ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f)
    ds = pydicom.dcmread(tmp_path / "p40.dcm")
    assert (ds.file_meta.TransferSyntaxUID, int(ds.NumberOfFrames)) == ("1.2.840.10008.1.2.4.70", 4)
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.phase_percent == [40.0, 70.0] and scan.shape == (5, 6, 4)  # RAS: (cols, rows, slices) here
    for t, pct in enumerate((40, 70)):
        hu = written[pct].astype(np.float32) * 2 - 1024
        hu[2] = written[pct][2].astype(np.float32) * 3 - 1000
        np.testing.assert_array_equal(scan.phase(t), hu.transpose(2, 1, 0)[::-1, ::-1, :])
    # a frame whose compressed bytes are damaged: one line naming the file, the frame and both decoders
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(tmp_path / "p40.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=4))
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream"] + frames[1:])
    ds.save_as(tmp_path / "p40.dcm")
    with pytest.raises(InputError) as err:
        read_scan(tmp_path, ScanFormat.DICOM).phase(0)
    assert "p40.dcm: frame 1: cannot read pixel data" in str(err.value) and "GDCM:" in str(err.value)
    assert "\n" not in str(err.value)


def test_frame_ids_keep_unknown_dotted_names_whole():
    """generate --frames: the known suffixes come off; a multi-frame file named by the PACS keeps
    its whole name, so two such frames never share an id (scan_id_of does too since stop 46)."""
    from cardiomotion.data.volume import frame_id_of

    assert frame_id_of("a/p12.nii.gz") == "p12" and frame_id_of("a/p12.seq.nrrd") == "p12"
    assert frame_id_of("CT.1.3.12.2.1107.5.1.4.11") != frame_id_of("CT.1.3.12.2.1107.5.1.4.12")


def test_looks_like_dicom(tmp_path):
    assert looks_like_dicom(_TEMPLATE)
    (tmp_path / "x.dcm").write_text("hello")
    assert not looks_like_dicom(tmp_path / "x.dcm")
    assert not looks_like_dicom(Path(data_path) / "example4d.nii.gz")


def test_percent_from_description():
    assert percent_from_description("Cardiac 40%") == 40.0
    assert percent_from_description("CTA 75 % BestDiast") == 75.0
    assert percent_from_description("phase 40") == 40.0
    assert percent_from_description("Cor 0.6 CE") is None
    assert percent_from_description("ASiR-V 40% Cardiac 75%") == 75.0  # the first is a reconstruction's strength
    assert percent_from_description("Cardiac 0.625mm ASIR 50 %") is None
    assert percent_from_description("Multiphase 10 Cardiac phase 3") == 3.0
    assert percent_from_description("CardiacPhase 40") == 40.0 and percent_from_description("BestPhase_75") == 75.0
    assert percent_from_description("Stereoveo 40%") == 40.0  # a name that merely ends in one


def test_dicom_duplicate_phase(tmp_path):
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("nominal", 40), ("desc", 40), ("desc", 80)])
    with pytest.raises(InputError, match=r"duplicate cardiac phase 40%.*as many slices") as err:
        read_scan(tmp_path, ScanFormat.DICOM)
    assert str(tmp_path) in str(err.value)


def test_dicom_two_reconstructions_of_a_phase_keep_the_one_with_more_slices(tmp_path):
    """A thin and a thick reconstruction at 40 %: the thicker (fewer slices) is left out, named."""
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("nominal", 40), ("desc", 40), ("desc", 80)],
                       n_slices=(6, 3, 6))
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.phase_percent == [40.0, 80.0] and scan.shape[2] == 6
    assert len(scan.left_out) == 1 and "'Cardiac 40%'" in scan.left_out[0] and "3 slices" in scan.left_out[0]
    kept = max(float(_raw_slice(0, k).max()) * _slope(k) - 1024 for k in range(6))  # written series 0
    assert scan.phase(0).max() == kept


def test_dicom_files_without_the_preamble_are_read_as_with_it(tmp_path):
    """The same study saved again by pydicom with no 128-byte preamble and no file meta (as files
    written before Part 10, or by some exporters, are), half of them renamed without an
    extension, beside a README and a notes.txt: read as the Part 10 study, voxel for voxel."""
    _write_dicom_study(tmp_path / "p10", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)])
    bare = tmp_path / "bare"
    bare.mkdir()
    for i, f in enumerate(sorted((tmp_path / "p10").glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()  # none written
        out = bare / (f.stem if i % 2 else f.name)
        ds.save_as(out, enforce_file_format=False, implicit_vr=i % 3 == 0, little_endian=True)
        assert out.read_bytes()[128:132] != b"DICM" and out.read_bytes()[:2] == b"\x08\x00"  # group 0008 first
    (bare / "README").write_text("exported by a PACS\n")
    (bare / "notes.txt").write_text("CT 0x0028\n")
    want, got = read_scan(tmp_path / "p10", ScanFormat.DICOM), read_scan(bare, ScanFormat.DICOM)
    assert got.phase_percent == want.phase_percent == [0.0, 40.0] and got.left_out == []
    np.testing.assert_array_equal(got.affine, want.affine)
    for t in range(2):
        np.testing.assert_array_equal(got.phase(t), want.phase(t))


def test_dicom_second_copies_and_images_without_geometry_are_left_out(tmp_path):
    """A PACS export with the same files again in another folder and a dose report (an image with
    no position, orientation or spacing): read as the study alone, both named in ``left_out``."""
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)])
    (tmp_path / "copy").mkdir()
    files = sorted(tmp_path.glob("*.dcm"))
    for f in files[:3]:
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    report = pydicom.dcmread(files[0])
    for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(report, k)
    report.SeriesInstanceUID = generate_uid()
    report.SOPInstanceUID = generate_uid()
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.save_as(tmp_path / "dose_report.dcm")
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.phase_percent == [0.0, 40.0] and scan.shape[2] == _N_SLICES
    assert len(scan.left_out) == 2
    assert scan.left_out[0].startswith("3 second copies") and "dose_report.dcm" in scan.left_out[1]


def test_dicom_slice_step_is_fitted_to_every_position(tmp_path):
    """0.625 mm slices with IPP stored to 2 decimals: the rounding of the first gap alone would
    drift by 0.3 mm over 60 slices; the step fitted to all positions reads them, and slice k sits
    at its written position to within the rounding."""
    ipps = _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)],
                              n_slices=(60, 60), step=0.625, decimals=2)
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert abs(scan.spacing[2] - 0.625) < 1e-3
    for k in (0, 30, 59):
        world = (scan.original_affine @ np.array([0, 0, k, 1.0]))[:3]
        np.testing.assert_allclose(world, (lps_to_ras(np.eye(4)) @ np.append(ipps[k], 1.0))[:3], atol=0.01)


def test_dicom_duplicate_slice_positions_name_the_duplicates(tmp_path):
    """A slice repeated mid-stack (same IPP, another instance): the error names both files."""
    ipps = _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)])
    mid = next(p for p in sorted(tmp_path.glob("*.dcm"))
               if (d := pydicom.dcmread(p)).NominalPercentageOfCardiacPhase == 40
               and np.allclose(d.ImagePositionPatient, ipps[2], atol=1e-4))
    dup = pydicom.dcmread(mid)
    dup.SOPInstanceUID = generate_uid()
    dup.file_meta.MediaStorageSOPInstanceUID = dup.SOPInstanceUID
    dup.save_as(tmp_path / "zz_duplicate.dcm")
    with pytest.raises(InputError) as err:
        read_scan(tmp_path, ScanFormat.DICOM)
    msg = str(err.value)
    assert "share ImagePositionPatient" in msg and "\n" not in msg
    assert mid.name in msg and "zz_duplicate.dcm" in msg


@pytest.mark.parametrize("kind,percent", [("nominal", [0.0, 40.0, 70.0]), ("temporal", None)])
def test_dicom_cine_in_one_series_is_split_per_image(tmp_path, kind, percent):
    """All phases in one SeriesInstanceUID (slices repeat positions), told apart per image by
    NominalPercentageOfCardiacPhase (percent known) or TemporalPositionIdentifier (order known,
    percent not): read as three phases in that order, each the values written for it."""
    values = {"nominal": (70, 0, 40), "temporal": (3, 1, 2)}[kind]
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [(kind, v) for v in values], one_series=True)
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.n_phases == 3 and scan.phase_percent == percent and scan.shape[2] == _N_SLICES
    for t, p in enumerate((1, 2, 0)):  # written spec index of each sorted phase
        hu = max(float(_raw_slice(p, k).max()) * _slope(k) - 1024 for k in range(_N_SLICES))
        assert scan.phase(t).max() == hu


@pytest.mark.parametrize("kind,values", [("temporal", (3, 1, 2)), ("trigger", (700.0, 0.0, 400.0))])
def test_dicom_a_series_per_phase_without_a_percentage_is_ordered_by_its_images_tag(tmp_path, kind, values):
    """A series per phase with no NominalPercentageOfCardiacPhase and no percentage in the
    description (anonymised: "CTA cardiac" everywhere), its images sharing one
    TemporalPositionIdentifier or TriggerTime: read as three phases in that order (percent
    unknown), each the values written for it; a gated series with a TriggerTime of its own on
    another grid (a calcium score) is left out, named, not read as a fourth phase."""
    _write_dicom_study(tmp_path / "cine", [1, 0, 0, 0, 1, 0], [(kind, v) for v in values])
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.n_phases == 3 and scan.phase_percent is None and scan.shape[2] == _N_SLICES and not scan.left_out
    for t, p in enumerate((1, 2, 0)):  # written spec index of each sorted phase
        hu = max(float(_raw_slice(p, k).max()) * _slope(k) - 1024 for k in range(_N_SLICES))
        assert scan.phase(t).max() == hu
    _write_dicom_study(tmp_path / "score", [1, 0, 0, 0, 1, 0], [(kind, 5 if kind == "temporal" else 350.0)],
                       n_slices=(_N_SLICES - 2,), seed=1)
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.n_phases == 3 and len(scan.left_out) == 1 and "not on the cine's grid" in scan.left_out[0]


def test_dicom_tag_ordering_is_for_studies_without_any_percentage_and_picks_a_key_that_tells_apart(tmp_path):
    """Beside series with percentages, a series that lost its own (description blanked) but has a
    TriggerTime is still a phase whose tag is missing (an error), not another cine's phase dropped
    without a word; series that all share TemporalPositionIdentifier 1 are ordered by their
    TriggerTimes, which tell them apart."""
    _write_dicom_study(tmp_path / "a", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("trigger", 400.0), ("nominal", 70)])
    with pytest.raises(InputError, match=r"no cardiac phase.*on the grid of the cine's phases"):
        read_scan(tmp_path / "a", ScanFormat.DICOM)
    _write_dicom_study(tmp_path / "b", [1, 0, 0, 0, 1, 0], [("trigger", v) for v in (700.0, 0.0, 400.0)])
    for f in (tmp_path / "b").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.TemporalPositionIdentifier = 1
        ds.save_as(f)
    scan = read_scan(tmp_path / "b", ScanFormat.DICOM)
    assert scan.n_phases == 3 and scan.phase_percent is None
    for t, p in enumerate((1, 2, 0)):  # written spec index of each sorted phase
        assert scan.phase(t).max() == max(float(_raw_slice(p, k).max()) * _slope(k) - 1024 for k in range(_N_SLICES))


def test_dicom_repeated_positions_with_nothing_to_split_them_by_are_refused(tmp_path):
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("desc", 40), ("desc", 70)], one_series=True)
    with pytest.raises(InputError, match="share ImagePositionPatient.*TemporalPositionIdentifier or TriggerTime"):
        read_scan(tmp_path, ScanFormat.DICOM)


def test_dicom_series_without_phase(tmp_path):
    """Beside a cine, a series without a phase on another grid (a calcium score) is left out,
    named; one on the cine's grid is a phase whose tag is missing (an error, as is one beside a
    single phased series: no cine to read)."""
    _write_dicom_study(tmp_path / "a", [1, 0, 0, 0, 1, 0], [("nominal", 40), ("none", None), ("desc", 80)],
                       n_slices=(6, 4, 6))
    scan = read_scan(tmp_path / "a")
    assert scan.phase_percent == [40.0, 80.0]
    assert len(scan.left_out) == 1 and "'CTA cardiac'" in scan.left_out[0] and "not on the cine's grid" in scan.left_out[0]
    _write_dicom_study(tmp_path / "b", [1, 0, 0, 0, 1, 0], [("nominal", 40), ("none", None), ("desc", 80)])
    with pytest.raises(InputError, match=r"'CTA cardiac'.*no cardiac phase.*on the grid of the cine's phases"):
        read_scan(tmp_path / "b")
    _write_dicom_study(tmp_path / "c", [1, 0, 0, 0, 1, 0], [("nominal", 40), ("none", None)], n_slices=(6, 4))
    with pytest.raises(InputError, match=r"'CTA cardiac'.*no cardiac phase"):
        read_scan(tmp_path / "c")


def test_dicom_a_thin_best_phase_beside_a_thick_cine_is_left_out(tmp_path):
    """Coronary CT: every phase thick (4 slices) plus a thin reconstruction of 40 % (6 slices):
    the cine's grid wins at 40 %, the thin series is left out, named."""
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40), ("nominal", 80), ("desc", 40)],
                       n_slices=(4, 4, 4, 6))
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.phase_percent == [0.0, 40.0, 80.0] and scan.shape[2] == 4
    assert len(scan.left_out) == 1 and "'Cardiac 40%'" in scan.left_out[0] and "grid more phases share" in scan.left_out[0]


@pytest.mark.parametrize("key", ["TriggerTime", "NominalCardiacTriggerDelayTime"])
def test_dicom_cine_in_one_series_with_trigger_times_that_differ_within_a_phase_is_split_by_their_gaps(tmp_path, key):
    """A cine exported as one series whose images carry each its own trigger delay (700, 0, 400 ms
    per phase, each image off by up to 20 ms): the phases are the images grouped by the wide gaps
    between the values, ordered by their medians, each the values written for it, and a note
    says how they were told apart."""
    _write_dicom_study(tmp_path, [1, 0, 0, 0, 1, 0], [("trigger", v) for v in (700.0, 0.0, 400.0)], one_series=True)
    rng = np.random.default_rng(3)
    for f in sorted(tmp_path.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        base = float(ds.TriggerTime)
        del ds.TriggerTime
        setattr(ds, key, round(base + float(rng.uniform(-20, 20)), 1))
        ds.save_as(f)
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.n_phases == 3 and scan.phase_percent is None and scan.shape[2] == _N_SLICES and not scan.left_out
    for t, p in enumerate((1, 2, 0)):  # written spec index of each sorted phase
        assert scan.phase(t).max() == max(float(_raw_slice(p, k).max()) * _slope(k) - 1024 for k in range(_N_SLICES))
    assert len(scan.notes) == 1 and f"one series of 3 phases whose {key} differs image to image" in scan.notes[0]


def test_dicom_a_key_with_a_value_per_image_does_not_split_a_series(tmp_path):
    """TriggerTime different on every image (as some scanners write it) splits nothing: a cine in
    one series with nothing else is refused naming the repeated positions, and a study of one
    series per phase with a duplicated slice still names that slice."""
    def trigger_per_image(folder):
        for i, f in enumerate(sorted(folder.glob("*.dcm"))):
            ds = pydicom.dcmread(f)
            ds.TriggerTime = float(i)
            ds.save_as(f)

    _write_dicom_study(tmp_path / "a", [1, 0, 0, 0, 1, 0], [("desc", 40), ("desc", 70)], one_series=True)
    trigger_per_image(tmp_path / "a")
    with pytest.raises(InputError, match="share ImagePositionPatient"):
        read_scan(tmp_path / "a", ScanFormat.DICOM)
    ipps = _write_dicom_study(tmp_path / "b", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)])
    mid = next(p for p in sorted((tmp_path / "b").glob("*.dcm"))
               if (d := pydicom.dcmread(p)).NominalPercentageOfCardiacPhase == 40
               and np.allclose(d.ImagePositionPatient, ipps[2], atol=1e-4))
    dup = pydicom.dcmread(mid)
    dup.SOPInstanceUID = generate_uid()
    dup.save_as(tmp_path / "b" / "zz_duplicate.dcm")
    trigger_per_image(tmp_path / "b")
    with pytest.raises(InputError, match="share ImagePositionPatient"):
        read_scan(tmp_path / "b", ScanFormat.DICOM)


def test_dicom_a_cine_in_one_series_beside_a_best_phase_series(tmp_path):
    """A cine exported as one series told apart by TemporalPositionIdentifier, and a separate
    "Cardiac 75%" series: the cine (three phases) is read, the other series left out, named."""
    _write_dicom_study(tmp_path / "cine", [1, 0, 0, 0, 1, 0], [("temporal", 1), ("temporal", 2), ("temporal", 3)],
                       one_series=True)
    _write_dicom_study(tmp_path / "best", [1, 0, 0, 0, 1, 0], [("desc", 75)])
    scan = read_scan(tmp_path, ScanFormat.DICOM)
    assert scan.n_phases == 3 and scan.phase_percent is None
    assert len(scan.left_out) == 1 and "'Cardiac 75%'" in scan.left_out[0] and "another cine" in scan.left_out[0]


@pytest.mark.parametrize("one_file", [False, True])
def test_dicom_phases_that_reach_further_are_cut_to_the_slices_all_phases_share(tmp_path, one_file):
    """Three phases of 12, 12 and 11 slices on one lattice (slice k at the same place in each; a
    series per phase, or the whole cine in one Enhanced CT file): read as 11 slices each, the
    values written there (no resampling); the slice the 0 % and 40 % phases have beyond the others
    is left out, named. Phases that share fewer than 90 % of the longest one's slices, or whose
    slices are off that lattice (another step), are still refused."""
    n = (12, 12, 11)
    if one_file:
        _enhanced_ct(tmp_path / "a" / "cine.dcm", [1, 0, 0, 0, 1, 0],
                     [(p, k, {"NominalPercentageOfCardiacPhase": pct}) for p, pct in enumerate((0, 40, 80))
                      for k in range(n[p])])
    else:
        _write_dicom_study(tmp_path / "a", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40), ("nominal", 80)],
                           n_slices=n)
    scan = read_scan(tmp_path / "a", ScanFormat.DICOM)
    assert scan.phase_percent == [0.0, 40.0, 80.0] and scan.shape == (_COLS, _ROWS, 11)
    assert len(scan.left_out) == 2 and all("1 of its 12 slices, beyond the 11 slices every phase has" in line
                                           for line in scan.left_out)
    assert "at 0%" in scan.left_out[0] and "at 40%" in scan.left_out[1]
    for t in range(3):
        # RAS from LPS flips columns and rows: (column, row, slice) reversed in the first two
        want = np.stack([_raw_slice(t, k) * _slope(k) - 1024.0 for k in range(11)], -1).transpose(1, 0, 2)[::-1, ::-1]
        np.testing.assert_array_equal(scan.phase(t), want)
    _write_dicom_study(tmp_path / "b", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)], n_slices=(12, 10))
    with pytest.raises(InputError, match=r"at 40%: grid \(shape \(5, 4, 10\)\) differs"):
        read_scan(tmp_path / "b")  # 10 of 12 slices shared: not cut
    _write_dicom_study(tmp_path / "c", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)])
    _write_dicom_study(tmp_path / "c", [1, 0, 0, 0, 1, 0], [("nominal", 80)], step=2.0, seed=1)
    with pytest.raises(InputError, match=r"at 80%: grid \(shape \(5, 4, 6\)\) differs"):
        read_scan(tmp_path / "c")


# --------------------------------------------------------------------------- multi-frame DICOM


def _enhanced_ct(path: Path, iop, frames, *, series_uid=None, shuffle_seed=0, description="CTA cardiac",
                 per_frame_geometry=True, rle=False) -> None:
    """Write one Enhanced CT Image Storage file with pydicom: ``frames`` is a list of (written
    phase p, slice k, {per-frame tags}: phase tags, or FrameType); frame (p, k) holds :func:`_raw_slice` (p, k) at the IPP
    of slice k (:data:`_ORIGIN` + k·step·normal) with RescaleSlope :func:`_slope` (k) in its own
    PixelValueTransformationSequence; orientation and pixel spacing are shared. Frames are
    stored in shuffled order; ``rle``: the pixel data compressed RLE Lossless (pydicom's encoder)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian

    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    order = np.random.default_rng(shuffle_seed).permutation(len(frames))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid or generate_uid()
    ds.SeriesDescription = description
    ds.Rows, ds.Columns, ds.NumberOfFrames = _ROWS, _COLS, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = list(_PS), _STEP
    plane.ImageOrientationPatient = [float(v) for v in iop]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [plane]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame, pixels = [], []
    for i in order:
        p, k, tags = frames[i]
        item, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in _ORIGIN + k * _STEP * normal]
        if per_frame_geometry:
            item.PlanePositionSequence = [position]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = _slope(k), -1024, "HU"
        item.PixelValueTransformationSequence = [transform]
        content, sync = Dataset(), Dataset()
        content.InStackPositionNumber = k + 1
        for key, value in tags.items():
            if key == "FrameType":  # its CT Image Frame Type functional group
                kind = Dataset()
                kind.FrameType = list(value)
                item.CTImageFrameTypeSequence = [kind]
            elif key == "TemporalPositionIndex":
                content.TemporalPositionIndex = int(value)
            else:  # NominalPercentageOfCardiacPhase, NominalCardiacTriggerDelayTime
                setattr(sync, key, float(value))
        item.FrameContentSequence = [content]
        if len(sync):
            item.CardiacSynchronizationSequence = [sync]
        per_frame.append(item)
        pixels.append(_raw_slice(p, k))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack(pixels).astype("<i2").tobytes()
    if rle:
        from pydicom.uid import RLELossless

        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _assert_same_scan(a, b) -> None:
    assert (a.shape, a.n_phases, a.phase_percent) == (b.shape, b.n_phases, b.phase_percent)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)
    np.testing.assert_allclose(a.original_affine, b.original_affine, atol=1e-9)
    for t in range(a.n_phases):
        np.testing.assert_array_equal(a.phase(t), b.phase(t))


@pytest.mark.parametrize("iop,rle", [([1, 0, 0, 0, 1, 0], False), ([0.6, 0.8, 0, 0, 0, -1], False),
                                     ([1, 0, 0, 0, 1, 0], True)])
def test_dicom_enhanced_ct_one_file_per_phase_reads_as_the_single_frame_study(tmp_path, iop, rle):
    """A phase per Enhanced CT file (frames shuffled, rescale per frame, orientation and spacing
    shared; uncompressed or RLE Lossless, each frame decoded alone): the same scan, voxel for
    voxel, as the single-frame study of the same slices."""
    _write_dicom_study(tmp_path / "single", iop, [("nominal", 70), ("nominal", 0), ("nominal", 40)])
    for p, pct in enumerate((70, 0, 40)):
        _enhanced_ct(tmp_path / "multi" / f"phase{p}.dcm", iop,
                     [(p, k, {"NominalPercentageOfCardiacPhase": pct}) for k in range(_N_SLICES)], shuffle_seed=p,
                     rle=rle)
    multi = read_scan(tmp_path / "multi", ScanFormat.DICOM)
    assert multi.phase_percent == [0.0, 40.0, 70.0] and multi.left_out == []
    _assert_same_scan(multi, read_scan(tmp_path / "single", ScanFormat.DICOM))


def test_dicom_enhanced_ct_without_the_preamble_reads_as_with_it(tmp_path):
    """The Enhanced CT files of one phase each, saved again by pydicom with no preamble and no file
    meta (implicit VR): the same scan, voxel for voxel (pydicom's frame iterator refuses such a
    file by path; it is decoded from the dataset read with force)."""
    iop = [1, 0, 0, 0, 1, 0]
    for p, pct in enumerate((70, 0, 40)):
        _enhanced_ct(tmp_path / "p10" / f"phase{p}.dcm", iop,
                     [(p, k, {"NominalPercentageOfCardiacPhase": pct}) for k in range(_N_SLICES)], shuffle_seed=p)
        ds = pydicom.dcmread(tmp_path / "p10" / f"phase{p}.dcm")
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        (tmp_path / "bare").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "bare" / f"phase{p}", enforce_file_format=False, implicit_vr=True, little_endian=True)
    bare = read_scan(tmp_path / "bare", ScanFormat.DICOM)
    assert bare.phase_percent == [0.0, 40.0, 70.0] and bare.left_out == []
    _assert_same_scan(bare, read_scan(tmp_path / "p10", ScanFormat.DICOM))


@pytest.mark.parametrize("key,percent", [("NominalPercentageOfCardiacPhase", [0.0, 40.0, 70.0]),
                                         ("TemporalPositionIndex", None),
                                         ("NominalCardiacTriggerDelayTime", None)])
def test_dicom_enhanced_ct_cine_in_one_file_is_split_per_frame(tmp_path, key, percent):
    """The whole cine in one Enhanced CT file (3 phases × 6 slices, frames shuffled), its phases
    told apart by the frames' own tags: three phases in the tags' order, each the values written
    for it, as the single-frame study of one series per phase reads."""
    values = {"NominalPercentageOfCardiacPhase": (70, 0, 40), "TemporalPositionIndex": (3, 1, 2),
              "NominalCardiacTriggerDelayTime": (560.0, 0.0, 320.0)}[key]
    iop = [1, 0, 0, 0, 1, 0]
    _enhanced_ct(tmp_path / "multi" / "cine.dcm", iop,
                 [(p, k, {key: v}) for p, v in enumerate(values) for k in range(_N_SLICES)])
    _write_dicom_study(tmp_path / "single", iop, [("nominal", v) for v in (70, 0, 40)])
    multi = read_scan(tmp_path / "multi", ScanFormat.DICOM)
    assert multi.n_phases == 3 and multi.phase_percent == percent
    alone = read_scan(tmp_path / "multi" / "cine.dcm")  # the file itself is a scan too
    assert alone.format == ScanFormat.DICOM and alone.scan_id == "cine"
    _assert_same_scan(alone, multi)
    single = read_scan(tmp_path / "single", ScanFormat.DICOM)
    single.phase_percent = percent
    _assert_same_scan(multi, single)


def test_dicom_enhanced_ct_as_a_single_volume(tmp_path):
    """``read_volume`` (``generate --frames``) of one Enhanced CT file, or of a folder holding it
    with a second copy and a dose report beside it: the single-frame series' array and affines;
    what the folder held besides is named in ``left_out`` and in the prepared frame's notes."""
    from cardiomotion.config import PrepareConfig
    from cardiomotion.data.frames import prepare_frame
    from cardiomotion.data.volume import VolumeFormat, read_volume

    iop = [1, 0, 0, 0, 0, -1]
    _enhanced_ct(tmp_path / "multi" / "ed.dcm", iop, [(1, k, {}) for k in range(_N_SLICES)])
    _write_dicom_study(tmp_path / "single", iop, [("desc", 0), ("desc", 40)])
    for f in (tmp_path / "single").glob("*.dcm"):  # keep the written phase 1 only
        if pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription == "Cardiac 0%":
            f.unlink()
    want = read_volume(tmp_path / "single")
    assert want.left_out == ()
    alone = read_volume(tmp_path / "multi" / "ed.dcm")
    assert (alone.format, alone.frame_id, alone.left_out) == (VolumeFormat.DICOM, "ed", ())
    (tmp_path / "multi" / "copy").mkdir()
    (tmp_path / "multi" / "copy" / "ed_again.dcm").write_bytes((tmp_path / "multi" / "ed.dcm").read_bytes())
    report = pydicom.dcmread(sorted((tmp_path / "single").glob("*.dcm"))[0])
    del report.ImagePositionPatient
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.save_as(tmp_path / "multi" / "dose_report.dcm")
    folder = read_volume(tmp_path / "multi")
    for got in (alone, folder):
        np.testing.assert_array_equal(got.array, want.array)
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-9)
        np.testing.assert_allclose(got.original_affine, want.original_affine, atol=1e-9)
    assert folder.left_out[0].startswith("1 second copy of images already read")
    assert len(folder.left_out) == 2 and folder.left_out[1].startswith("1 image with no position")
    assert "dose_report.dcm" in folder.left_out[1]
    record = prepare_frame(folder, "multi", tmp_path / "prepared", PrepareConfig(grid=[8, 8, 8], spacing_mm=2.0))
    # then the note that the test's synthetic values (no air or lung) do not look like HU
    assert record["notes"][:2] == [f"left out {line}" for line in folder.left_out]
    assert [n.split(":")[0] for n in record["notes"][2:]] == ["intensities do not look like HU"]
    with pytest.raises(InputError, match="single-frame DICOM image: give the folder"):
        read_volume(sorted((tmp_path / "single").glob("*.dcm"))[0])


def test_dicom_enhanced_ct_localizer_frames_are_skipped_as_scouts_are(tmp_path):
    """A MIXED Enhanced CT file whose frames include a localizer (FrameType LOCALIZER, placed far
    off the stack) reads as the single-frame study of the stack alone; before, the localizer was
    a slice of the stack and broke its spacing."""
    iop = [1, 0, 0, 0, 1, 0]
    axial, scout = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"], ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    for p, pct in enumerate((0, 40)):
        frames = [(p, k, {"NominalPercentageOfCardiacPhase": pct, "FrameType": axial}) for k in range(_N_SLICES)]
        frames.append((p, 40, {"NominalPercentageOfCardiacPhase": pct, "FrameType": scout}))
        _enhanced_ct(tmp_path / "multi" / f"phase{p}.dcm", iop, frames, shuffle_seed=p)
    _write_dicom_study(tmp_path / "single", iop, [("nominal", 0), ("nominal", 40)])
    multi = read_scan(tmp_path / "multi", ScanFormat.DICOM)
    assert multi.phase_percent == [0.0, 40.0] and multi.left_out == []
    _assert_same_scan(multi, read_scan(tmp_path / "single", ScanFormat.DICOM))
    # a file of localizer frames only, given as the scan: named as such
    _enhanced_ct(tmp_path / "scout.dcm", iop, [(0, k, {"FrameType": scout}) for k in (40, 41)])
    with pytest.raises(InputError, match=r"scout\.dcm: a localizer \(scout\) image only"):
        read_scan(tmp_path / "scout.dcm", ScanFormat.DICOM)


def test_dicom_enhanced_ct_of_one_frame_per_file_and_classic_multi_frame(tmp_path):
    """Enhanced CT files of one frame each (NumberOfFrames 1, the position in the functional
    groups only) read as the single-frame study; a classic multi-frame file (one top-level
    position for every frame, no functional groups) is one error saying to convert it, as is a
    frame without PixelSpacing, naming the frame. A file named by its UID keeps its whole name as
    the scan id."""
    from cardiomotion.data.scan import scan_id_of

    iop = [1, 0, 0, 0, 1, 0]
    for p, pct in enumerate((0, 40)):
        uid = generate_uid()  # a series of one-frame files per phase
        for k in range(_N_SLICES):
            _enhanced_ct(tmp_path / "a" / f"p{p}k{k}.dcm", iop, [(p, k, {"NominalPercentageOfCardiacPhase": pct})],
                         series_uid=uid)
    _write_dicom_study(tmp_path / "single", iop, [("nominal", 0), ("nominal", 40)])
    _assert_same_scan(read_scan(tmp_path / "a", ScanFormat.DICOM), read_scan(tmp_path / "single", ScanFormat.DICOM))
    classic = tmp_path / "b" / "1.2.840.113619.2.55.3.1"
    _enhanced_ct(classic, iop, [(0, k, {}) for k in range(3)])
    ds = pydicom.dcmread(classic)
    del ds.PerFrameFunctionalGroupsSequence
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.save_as(classic)
    with pytest.raises(InputError, match=r"multi-frame DICOM \(3 frames\) without per-frame functional groups.*"
                                         "convert it to NIfTI"):
        read_scan(tmp_path / "b", ScanFormat.DICOM)
    assert scan_id_of(classic) == "1.2.840.113619.2.55.3.1"
    # named by the PACS, a modality and a UID: the whole name, so a study's files keep ids of their own
    assert scan_id_of(tmp_path / "CT.1.3.12.2.1107.5.1.4.11") == "CT.1.3.12.2.1107.5.1.4.11"
    assert scan_id_of(tmp_path / "CT.1.3.12.2.1107.5.1.4.12") == "CT.1.3.12.2.1107.5.1.4.12"
    assert scan_id_of(tmp_path / "case01.IMA") == "case01" and scan_id_of(tmp_path / "CT.v2") == "CT"
    assert scan_id_of(tmp_path / "patient.001") == "patient" and scan_id_of(tmp_path / "ct_v1.2") == "ct_v1"
    spaceless = tmp_path / "c" / "cine.dcm"
    _enhanced_ct(spaceless, iop, [(0, k, {}) for k in range(3)])
    ds = pydicom.dcmread(spaceless)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    ds.save_as(spaceless)
    with pytest.raises(InputError, match=r"cine\.dcm: frame 1: missing or invalid PixelSpacing"):
        read_scan(spaceless)


def test_dicom_enhanced_ct_without_frame_positions_is_left_out_and_a_bad_frame_count_refused(tmp_path):
    """A multi-frame image whose frames have no position beside a single-frame study is left out,
    named; one whose per-frame groups do not match NumberOfFrames is one error naming the file."""
    _write_dicom_study(tmp_path / "a", [1, 0, 0, 0, 1, 0], [("nominal", 0), ("nominal", 40)])
    _enhanced_ct(tmp_path / "a" / "zz_placeless.dcm", [1, 0, 0, 0, 1, 0], [(0, k, {}) for k in range(3)],
                 per_frame_geometry=False)
    scan = read_scan(tmp_path / "a", ScanFormat.DICOM)
    assert scan.phase_percent == [0.0, 40.0]
    assert len(scan.left_out) == 1 and "zz_placeless.dcm" in scan.left_out[0] and "no position" in scan.left_out[0]
    bad = tmp_path / "b" / "bad.dcm"
    _enhanced_ct(bad, [1, 0, 0, 0, 1, 0], [(0, k, {"NominalPercentageOfCardiacPhase": 0}) for k in range(3)])
    ds = pydicom.dcmread(bad)
    ds.NumberOfFrames = 4
    ds.save_as(bad)
    with pytest.raises(InputError, match=r"bad\.dcm.*NumberOfFrames 4 but 3 PerFrameFunctionalGroupsSequence"):
        read_scan(tmp_path / "b", ScanFormat.DICOM)
    one = sorted((tmp_path / "a").glob("*.dcm"))[0]  # a single-frame image is not a scan by itself
    with pytest.raises(InputError, match="single-frame DICOM image: give the folder"):
        read_scan(one)


# --------------------------------------------------------------------------- bad input


def _noise_4d(path: Path, shape=(16, 16, 16, 3)) -> Path:
    data = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_nifti(tmp_path, name):
    path = _noise_4d(tmp_path / name)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"truncated") as err:
        read_scan(path)
    assert str(err.value).startswith(f"{path}: ")


def test_truncated_gzip_header(tmp_path):
    path = _noise_4d(tmp_path / "tiny.nii.gz")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match=r"tiny\.nii\.gz: not a readable NIfTI file"):
        read_scan(path)


def test_not_nifti_content(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(InputError, match=r"text\.nii\.gz: not a readable NIfTI file"):
        read_scan(path)
    plain = tmp_path / "text.nii"
    plain.write_bytes(os.urandom(400))
    with pytest.raises(InputError, match=r"text\.nii: "):
        read_scan(plain)


def test_3d_file_as_scan(tmp_path):
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    with pytest.raises(InputError, match=r"vol\.nii\.gz: 3-D image: a 4DCT needs a 4-D"):
        read_scan(path)


def test_5d_file_as_scan(tmp_path):
    path = tmp_path / "flow.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2, 3), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=r"flow\.nii\.gz: 5-D image"):
        read_scan(path)


def test_single_phase_4d(tmp_path):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1), np.int16), np.eye(4)), path)
    with pytest.raises(InputError, match=r"one\.nii\.gz: single phase"):
        read_scan(path)


def test_nan_in_a_phase_fails_when_loaded(tmp_path):
    data = np.zeros((4, 4, 4, 3), np.float32)
    data[1, 2, 3, 2] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    scan = read_scan(path)
    scan.phase(1)
    with pytest.raises(InputError, match=r"nan\.nii\.gz: phase 2 holds NaN"):
        scan.phase(2)


def test_intact_gzip_is_not_decompressed_at_read(tmp_path, monkeypatch):
    import cardiomotion.data.nifti as nifti_mod

    class NoGzip:
        @staticmethod
        def open(*args, **kwargs):
            raise AssertionError("the cheap length check decompressed an intact file")

    path = _noise_4d(tmp_path / "ok.nii.gz")
    monkeypatch.setattr(nifti_mod, "gzip", NoGzip)
    assert read_scan(path).n_phases == 3


@pytest.mark.parametrize("name", ["late.nii.gz", "late.nii"])
def test_data_errors_while_loading_surface_as_input_error(tmp_path, name):
    path = _noise_4d(tmp_path / name)
    scan = read_scan(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # the file changes after its header was read
    with pytest.raises(InputError, match=r"truncated or corrupt NIfTI data") as err:
        scan.phase(scan.n_phases - 1)
    assert str(err.value).startswith(f"{path}: ")


def _phase_files(folder: Path, shapes, affines=None) -> list[Path]:
    folder.mkdir(exist_ok=True)
    out = []
    for t, shape in enumerate(shapes):
        aff = np.eye(4) if affines is None else affines[t]
        p = folder / f"phase_{10 * t}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), aff), p)
        out.append(p)
    return out


def test_phase_folder_shape_mismatch(tmp_path):
    files = _phase_files(tmp_path / "f", [(4, 4, 4), (4, 4, 4), (4, 5, 4)])
    with pytest.raises(InputError) as err:
        read_scan(tmp_path / "f")
    assert str(err.value) == f"{files[2]}: shape (4, 5, 4) differs from phase 0 (4, 4, 4) (phase_0.nii.gz)"


def test_phase_folder_affine_mismatch(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    files = _phase_files(tmp_path / "f", [(4, 4, 4)] * 3, [np.eye(4), shifted, np.eye(4)])
    with pytest.raises(InputError, match=r"affine differs from phase 0") as err:
        read_scan(tmp_path / "f")
    assert str(err.value).startswith(f"{files[1]}: ")


def test_phase_folder_with_4d_file(tmp_path):
    files = _phase_files(tmp_path / "f", [(4, 4, 4), (4, 4, 4, 2)])
    with pytest.raises(InputError, match=r"4-D image .* per-phase folder") as err:
        read_scan(tmp_path / "f")
    assert str(err.value).startswith(f"{files[1]}: ")


def test_phase_folder_single_file(tmp_path):
    _phase_files(tmp_path / "f", [(4, 4, 4)])
    with pytest.raises(InputError, match=r"single phase"):
        read_scan(tmp_path / "f")


def test_a_case_folder_holding_one_4d_file_is_that_files_scan(tmp_path):
    """case01/ct.nii.gz (4-D, 3 phases) given as the folder case01: read as the 4-D file would be,
    named by the folder; each phase the values written for it."""
    data = np.stack([np.full((4, 5, 6), 10 * t, np.int16) for t in range(3)], -1)
    (tmp_path / "case01").mkdir()
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "case01" / "ct.nii.gz")
    scan = read_scan(tmp_path / "case01")
    assert scan.scan_id == "case01" and scan.n_phases == 3 and scan.shape == (4, 5, 6)
    assert [float(scan.phase(t).max()) for t in range(3)] == [0.0, 10.0, 20.0]


def test_phase_folder_truncated_member(tmp_path):
    files = _phase_files(tmp_path / "f", [(8, 8, 8)] * 3)
    blob = gzip.compress(os.urandom(10))  # a valid gzip stream that holds garbage
    files[1].write_bytes(blob)
    with pytest.raises(InputError) as err:
        read_scan(tmp_path / "f")
    assert str(err.value).startswith(f"{files[1]}: ")


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match=r"empty folder") as err:
        read_scan(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: ")


def test_folder_of_unrelated_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.csv").write_text("1,2,3")
    with pytest.raises(InputError, match=r"neither NIfTI files nor DICOM files") as err:
        read_scan(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: ")
    with pytest.raises(InputError, match=r"no DICOM image files found"):
        read_scan(tmp_path, ScanFormat.DICOM)
    with pytest.raises(InputError, match=r"no NIfTI files"):
        read_scan(tmp_path, ScanFormat.NIFTI_PHASES)


def test_a_phantom_folder_without_meta_json_says_so(tmp_path):
    import nibabel as nib
    import numpy as np

    from cardiomotion.data.scan import read_scan
    from cardiomotion.errors import InputError

    folder = tmp_path / "phantom_000"
    folder.mkdir()
    for name in ("ct.nii.gz", "labels.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), str(folder / name))
    with pytest.raises(InputError, match=r"meta.json: missing: the folder looks like a phantom patient"):
        read_scan(folder)
