"""NRRD (3D Slicer) and MetaImage (ITK) readers, against files written by independent writers.

The files are written here by hand from their specifications (NRRD0004 text headers with raw or
gzip data, attached or detached; MetaImage ``.mhd``/``.mha`` text headers), never by the library
that reads them, on oblique, flipped, anisotropic grids in LPS (Slicer's default). Each test
checks the world position of known voxels: voxel v of the file sits at LPS ``origin + D·v``, so
after reading, the canonical array must hold the file's value of v at the canonical index whose
world position (``scan.affine``) is the same point in RAS.
"""
from __future__ import annotations

import copy
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cardiomotion.data.metaimage import read_metaimage_volume
from cardiomotion.data.nrrd import read_nrrd_volume
from cardiomotion.data.scan import ScanFormat, detect_format, read_scan
from cardiomotion.errors import InputError
from cardiomotion.orientation import lps_to_ras

SHAPE = (5, 6, 7)  # I, J, K: distinct, so a transposed read cannot pass


def _oblique_lps() -> np.ndarray:
    """Voxel→LPS affine: rotated 30° about S, axis 1 flipped, spacings 0.7 / 1.1 / 2.5 mm."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.7, -1.1, 2.5])  # columns: each axis' step in LPS mm
    a[:3, 3] = [-12.5, 30.25, -101.0]
    return a


def _volume(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def _vec(v) -> str:
    return "(" + ",".join(repr(float(x)) for x in v) + ")"


def write_nrrd(path: Path, data: np.ndarray, lps: np.ndarray, *, seq_axis_first: bool = False,
               encoding: str = "raw", detached: bool = False, space: str = "left-posterior-superior") -> Path:
    """NRRD0004 from the spec. ``data`` is (I, J, K) or (I, J, K, T); with ``seq_axis_first`` the
    T axis is written first with kind ``list`` (3D Slicer's .seq.nrrd layout)."""
    if data.ndim == 4 and seq_axis_first:
        arr = np.moveaxis(data, 3, 0)
        dirs = ["none"] + [_vec(lps[:3, a]) for a in range(3)]
        kinds = ["list", "domain", "domain", "domain"]
    else:
        arr = data
        dirs = [_vec(lps[:3, a]) for a in range(3)] + (["none"] if data.ndim == 4 else [])
        kinds = ["domain"] * 3 + (["time"] if data.ndim == 4 else [])
    raw = arr.astype("<i2").tobytes(order="F")  # the first header axis varies fastest
    payload = gzip.compress(raw) if encoding == "gzip" else raw
    lines = ["NRRD0004", "type: short", f"dimension: {arr.ndim}", f"space: {space}",
             "sizes: " + " ".join(str(n) for n in arr.shape), "space directions: " + " ".join(dirs),
             "kinds: " + " ".join(kinds), "endian: little", f"encoding: {encoding}",
             f"space origin: {_vec(lps[:3, 3])}"]
    if detached:
        data_file = path.with_suffix(".raw.gz" if encoding == "gzip" else ".raw")
        data_file.write_bytes(payload)
        path.write_text("\n".join(lines + [f"data file: {data_file.name}"]) + "\n")
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + payload)
    return path


def write_metaimage(path: Path, data: np.ndarray, lps: np.ndarray) -> Path:
    """MetaImage from the spec: ``TransformMatrix`` lists each axis' direction in turn; a 4th
    (phase) axis gets unit spacing and direction. ``.mha`` holds the data (``LOCAL``), ``.mhd``
    names a ``.raw`` file beside it."""
    nd = data.ndim
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    direction = np.eye(nd)
    direction[:3, :3] = lps[:3, :3] / spacing
    matrix = " ".join(repr(float(x)) for x in direction.T.ravel())  # axis 0's vector, then axis 1's, …
    header = ["ObjectType = Image", f"NDims = {nd}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
              "CompressedData = False", f"TransformMatrix = {matrix}",
              "Offset = " + " ".join(repr(float(x)) for x in [*lps[:3, 3], 0.0][:nd]),
              "ElementSpacing = " + " ".join(repr(float(x)) for x in [*spacing, 1.0][:nd]),
              "DimSize = " + " ".join(str(n) for n in data.shape), "ElementType = MET_SHORT"]
    raw = data.astype("<i2").tobytes(order="F")  # x fastest
    if path.suffix.lower() == ".mha":
        path.write_bytes(("\n".join(header + ["ElementDataFile = LOCAL"]) + "\n").encode() + raw)
    else:
        raw_path = path.with_suffix(".raw")
        raw_path.write_bytes(raw)
        path.write_text("\n".join(header + [f"ElementDataFile = {raw_path.name}"]) + "\n")
    return path


def assert_world_positions(canon: np.ndarray, canon_affine: np.ndarray, data: np.ndarray, lps: np.ndarray) -> None:
    """Every voxel v of ``data`` (file order, LPS affine ``lps``) is where the canonical read puts it."""
    ras = lps_to_ras(lps)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape[:3]], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ ras[:3, :3].T + ras[:3, 3]
    q = (world - canon_affine[:3, 3]) @ np.linalg.inv(canon_affine[:3, :3]).T
    qi = np.rint(q).astype(int)
    np.testing.assert_allclose(q, qi, atol=1e-6)  # a permutation/flip of the grid: integer indices
    np.testing.assert_array_equal(canon[qi[:, 0], qi[:, 1], qi[:, 2]], data[idx[:, 0], idx[:, 1], idx[:, 2]])


@pytest.mark.parametrize("encoding, detached, name", [("raw", False, "v.nrrd"), ("gzip", False, "v.nrrd"),
                                                      ("gzip", True, "v.nhdr"), ("raw", True, "v.nhdr")])
def test_nrrd_volume_world_coordinates(tmp_path, encoding, detached, name):
    data, lps = _volume(), _oblique_lps()
    path = write_nrrd(tmp_path / name, data, lps, encoding=encoding, detached=detached)
    canon, affine, original = read_nrrd_volume(path)
    np.testing.assert_allclose(original, lps_to_ras(lps), atol=1e-9)
    assert canon.dtype == np.float32 and sorted(canon.shape) == sorted(SHAPE)
    assert_world_positions(canon, affine, data, lps)


def test_nrrd_in_ras_space_needs_no_flip(tmp_path):
    data, lps = _volume(), _oblique_lps()
    ras_affine = lps_to_ras(lps)
    path = write_nrrd(tmp_path / "ras.nrrd", data, ras_affine, space="right-anterior-superior")
    canon, affine, original = read_nrrd_volume(path)
    np.testing.assert_allclose(original, ras_affine, atol=1e-9)
    assert_world_positions(canon, affine, data, lps)


@pytest.mark.parametrize("seq_axis_first", [True, False])
def test_nrrd_sequence_is_a_4dct(tmp_path, seq_axis_first):
    phases = np.stack([_volume(seed=t) for t in range(3)], axis=-1)  # (I, J, K, T)
    lps = _oblique_lps()
    path = write_nrrd(tmp_path / "patient7.seq.nrrd", phases, lps, seq_axis_first=seq_axis_first, encoding="gzip")
    assert detect_format(path) is ScanFormat.NRRD
    scan = read_scan(path)
    assert (scan.scan_id, scan.format, scan.n_phases) == ("patient7", ScanFormat.NRRD, 3)
    np.testing.assert_allclose(scan.original_affine, lps_to_ras(lps), atol=1e-9)
    for t in range(3):
        assert_world_positions(scan.phase(t), scan.affine, phases[..., t], lps)


@pytest.mark.parametrize("name", ["v.mha", "v.mhd"])
def test_metaimage_volume_world_coordinates(tmp_path, name):
    data, lps = _volume(), _oblique_lps()
    path = write_metaimage(tmp_path / name, data, lps)
    canon, affine, original = read_metaimage_volume(path)
    np.testing.assert_allclose(original, lps_to_ras(lps), atol=1e-6)
    assert_world_positions(canon, affine, data, lps)


def test_metaimage_4d_is_a_4dct(tmp_path):
    phases = np.stack([_volume(seed=t) for t in range(2)], axis=-1)
    lps = _oblique_lps()
    path = write_metaimage(tmp_path / "study.mha", phases, lps)
    scan = read_scan(path)
    assert (scan.scan_id, scan.format, scan.n_phases) == ("study", ScanFormat.METAIMAGE, 2)
    for t in range(2):
        assert_world_positions(scan.phase(t), scan.affine, phases[..., t], lps)


@pytest.mark.parametrize("damage, message", [
    ("no_space", "no 'space' field"),
    ("truncated", "truncated or corrupt NRRD data"),
    ("garbage", "not a readable NRRD header"),
    ("3d", "3-D NRRD: a 4DCT needs a 4-D sequence"),
])
def test_bad_nrrd_is_one_input_error_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "bad.nrrd"
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 not nrrd at all")
    elif damage == "3d":
        write_nrrd(path, _volume(), _oblique_lps())
    else:
        write_nrrd(path, np.stack([_volume()] * 2, -1), _oblique_lps(), seq_axis_first=True)
        text = path.read_bytes()
        if damage == "no_space":
            path.write_bytes(text.replace(b"space: left-posterior-superior\n", b""))
        else:
            path.write_bytes(text[: len(text) - 100])
    with pytest.raises(InputError, match=message) as err:
        read_scan(path).phase(0)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_metaimage_is_one_input_error_naming_the_file(tmp_path):
    path = write_metaimage(tmp_path / "v.mhd", np.stack([_volume()] * 2, -1), _oblique_lps())
    path.with_suffix(".raw").write_bytes(b"short")
    with pytest.raises(InputError, match="truncated or corrupt MetaImage data") as err:
        read_scan(path).phase(0)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ one study, three formats


def _write_dicom_series(root: Path, phases: np.ndarray, lps: np.ndarray) -> None:
    """One DICOM series per phase from (I, J, K, T) data on the voxel→LPS grid ``lps``: slice k of
    axis 2, pixel (row r, column c) = voxel (c, r, k), IOP = (axis 0, axis 1) directions."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    dirs = lps[:3, :3] / spacing
    for t in range(phases.shape[3]):
        uid = generate_uid()
        for k in range(phases.shape[2]):
            ds = copy.deepcopy(template)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesDescription = "CTA"
            ds.NominalPercentageOfCardiacPhase = float(10 * t)
            ds.ImageOrientationPatient = [float(v) for v in (*dirs[:, 0], *dirs[:, 1])]
            ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
            ds.Rows, ds.Columns = phases.shape[1], phases.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            ds.PixelData = np.ascontiguousarray(phases[:, :, k, t].T).astype("<i2").tobytes()
            ds.save_as(root / f"p{t:02d}_s{k:03d}.dcm")


@pytest.mark.slow
def test_one_study_in_nifti_nrrd_metaimage_and_dicom_prepares_to_identical_arrays(tmp_path):
    """A phantom 4DCT stored on a flipped, axis-swapped grid in four formats; ES/ED detected from
    the images; the prepared ES and ED must be the same arrays on the same grid."""
    from cardiomotion.config import load_config
    from cardiomotion.data.phantom import make_cohort
    from cardiomotion.data.prepare import prepare_scan

    folder = make_cohort(tmp_path / "cohort", patients=1, grid=24, workers=1)[0]
    img = nib.load(str(Path(folder) / "ct.nii.gz"))
    ras_data = np.asarray(img.dataobj).astype(np.int16)  # (I, J, K, T) RAS+
    ornt = np.array([[1, -1], [0, 1], [2, -1]])  # store it swapped and flipped: a non-canonical layout
    data = nib.orientations.apply_orientation(ras_data, ornt)
    ras = img.affine @ nib.orientations.inv_ornt_aff(ornt, ras_data.shape[:3])
    lps = lps_to_ras(ras)  # the same grid in LPS (the flip is its own inverse)

    paths = {"nifti": tmp_path / "s_nifti.nii.gz", "nrrd": tmp_path / "s_nrrd.seq.nrrd",
             "metaimage": tmp_path / "s_mha.mha", "dicom": tmp_path / "s_dicom"}
    nib.save(nib.Nifti1Image(data, ras), str(paths["nifti"]))
    write_nrrd(paths["nrrd"], data, lps, seq_axis_first=True, encoding="gzip")
    write_metaimage(paths["metaimage"], data, lps)
    paths["dicom"].mkdir()
    _write_dicom_series(paths["dicom"], data, lps)

    cfg = load_config(None, {"prepare": {"grid": [16, 16, 16], "spacing_mm": 6.0},
                             "annotate": {"pwc": {"channels": [8, 16]}}}).prepare
    arrays = {}
    for fmt, path in paths.items():
        scan = read_scan(path)
        out = tmp_path / f"prep_{fmt}"
        rec = prepare_scan(scan, out, cfg)
        es = nib.load(str(out / rec["es_path"]))
        ed = nib.load(str(out / rec["ed_path"]))
        arrays[fmt] = (rec["es_phase"], rec["ed_phase"], es.affine, np.asarray(es.dataobj), np.asarray(ed.dataobj))
    ref = arrays["nifti"]
    for fmt, got in arrays.items():
        assert got[:2] == ref[:2], fmt
        np.testing.assert_allclose(got[2], ref[2], atol=1e-6, err_msg=fmt)
        np.testing.assert_array_equal(got[3], ref[3], err_msg=fmt)
        np.testing.assert_array_equal(got[4], ref[4], err_msg=fmt)
