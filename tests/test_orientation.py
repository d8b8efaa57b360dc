"""Known-answer tests of the orientation and unit conventions (cardiomotion.orientation) and of
the flow convention: pull field on the ED grid, ED(x) = ES(x + u(x)), u in voxels along the
canonical (RAS) array axes, u_mm = A[:3, :3] @ u_vox."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from cardiomotion.flow import read_flow, warp, write_flow
from cardiomotion.orientation import (
    axcodes,
    canonical_grid,
    flow_mm_to_vox,
    flow_to_canonical,
    flow_vox_to_mm,
    lps_to_ras,
    ras_to_lps,
    spacing,
    to_canonical,
)

RAS = ("R", "A", "S")
SHAPE = (4, 3, 5)
ORIGIN = np.array([10.0, -20.0, 30.0])


def _affine(cols, origin=ORIGIN) -> np.ndarray:
    """4×4 affine whose voxel axis c steps by the world vector cols[c] (mm)."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(cols, dtype=float).T
    a[:3, 3] = origin
    return a


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, dtype=float) + affine[:3, 3]


def _index_of(affine: np.ndarray, world: np.ndarray) -> tuple[int, ...]:
    c = np.linalg.solve(affine[:3, :3], world - affine[:3, 3])
    idx = np.rint(c)
    np.testing.assert_allclose(c, idx, atol=1e-9)
    return tuple(int(v) for v in idx)


def _assert_world_preserved(src, src_aff, out, out_aff) -> None:
    """Every voxel of ``out`` holds the value the source holds at the same world point."""
    for ijk in itertools.product(*(range(n) for n in out.shape[:3])):
        src_idx = _index_of(src_aff, _world(out_aff, ijk))
        np.testing.assert_array_equal(out[ijk], src[src_idx])


def _data(shape=SHAPE, extra=()) -> np.ndarray:
    return np.arange(np.prod(shape + extra), dtype=np.float32).reshape(shape + extra)


# (name, voxel axis steps in world mm, expected canonical array from the source array a,
#  expected canonical step columns, the source voxel that becomes canonical voxel (0, 0, 0))
CASES = [
    ("RAS", [(2, 0, 0), (0, 3, 0), (0, 0, 4)], lambda a: a,
     [(2, 0, 0), (0, 3, 0), (0, 0, 4)], (0, 0, 0)),
    ("LAS", [(-2, 0, 0), (0, 3, 0), (0, 0, 4)], lambda a: a[::-1],
     [(2, 0, 0), (0, 3, 0), (0, 0, 4)], (3, 0, 0)),
    ("LPS", [(-2, 0, 0), (0, -3, 0), (0, 0, 4)], lambda a: a[::-1, ::-1],
     [(2, 0, 0), (0, 3, 0), (0, 0, 4)], (3, 2, 0)),
    ("LPI", [(-2, 0, 0), (0, -3, 0), (0, 0, -4)], lambda a: a[::-1, ::-1, ::-1],
     [(2, 0, 0), (0, 3, 0), (0, 0, 4)], (3, 2, 4)),
    # axis 0 → world S, axis 1 → R, axis 2 → A: canonical axes are source axes (1, 2, 0)
    ("SRA", [(0, 0, 4), (2, 0, 0), (0, 3, 0)], lambda a: np.moveaxis(a, (1, 2, 0), (0, 1, 2)),
     [(2, 0, 0), (0, 3, 0), (0, 0, 4)], (0, 0, 0)),
    # axis 0 → P, axis 1 → I, axis 2 → L (DICOM-like sagittal LPS storage): permuted and flipped
    ("PIL", [(0, -3, 0), (0, 0, -4), (-2, 0, 0)],
     lambda a: np.moveaxis(a, (2, 0, 1), (0, 1, 2))[::-1, ::-1, ::-1],
     [(2, 0, 0), (0, 3, 0), (0, 0, 4)], (3, 2, 4)),
]


@pytest.mark.parametrize("name, cols, expect, canon_cols, corner", CASES, ids=[c[0] for c in CASES])
def test_to_canonical_known_answer(name, cols, expect, canon_cols, corner):
    aff = _affine(cols)
    assert "".join(axcodes(aff)) == name
    a = _data()
    out, out_aff = to_canonical(a, aff)

    np.testing.assert_array_equal(out, expect(a))
    expected_aff = _affine(canon_cols, origin=_world(aff, corner))
    np.testing.assert_allclose(out_aff, expected_aff, atol=1e-12)
    assert axcodes(out_aff) == RAS
    _assert_world_preserved(a, aff, out, out_aff)
    # the grid helper agrees without touching voxels
    shape, grid_aff = canonical_grid(a.shape, aff)
    assert shape == out.shape
    np.testing.assert_allclose(grid_aff, out_aff, atol=1e-12)
    # the input is never modified, and the original affine is returned as a copy
    np.testing.assert_array_equal(a, _data())


def test_to_canonical_carries_trailing_phase_axis():
    aff = _affine([(0, -3, 0), (0, 0, -4), (-2, 0, 0)])  # PIL
    a = _data(extra=(2,))  # (I, J, K, T)
    out, out_aff = to_canonical(a, aff)
    assert out.shape == (5, 4, 3, 2)
    for t in range(2):
        np.testing.assert_array_equal(out[..., t], to_canonical(a[..., t], aff)[0])
    _assert_world_preserved(a, aff, out, out_aff)


def test_to_canonical_of_ras_returns_a_copy_of_the_affine():
    aff = _affine([(2, 0, 0), (0, 3, 0), (0, 0, 4)])
    a = _data()
    out, out_aff = to_canonical(a, aff)
    assert out is a
    out_aff[0, 0] = 99.0
    assert aff[0, 0] == 2.0


def test_to_canonical_oblique_keeps_world_positions():
    """A 20° rotation about z: closest canonical axes, affine still maps every voxel exactly."""
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    cols = (rot @ np.diag([-1.5, -2.0, 2.5])).T  # L-ish, P-ish, S
    aff = _affine(cols)
    assert axcodes(aff) == ("L", "P", "S")
    a = _data()
    out, out_aff = to_canonical(a, aff)
    np.testing.assert_array_equal(out, a[::-1, ::-1])
    assert axcodes(out_aff) == RAS
    _assert_world_preserved(a, aff, out, out_aff)


# ------------------------------------------------------------------------------- LPS ↔ RAS


def test_lps_to_ras_known_answer():
    lps = _affine([(0.5, 0, 0), (0, 0.5, 0), (0, 0, 2.0)], origin=(10.0, 20.0, 30.0))
    ras = lps_to_ras(lps)
    np.testing.assert_array_equal(ras, _affine([(-0.5, 0, 0), (0, -0.5, 0), (0, 0, 2.0)], origin=(-10.0, -20.0, 30.0)))
    # DICOM's LPS patient axes (+x = Left) are NIfTI's L, P, S
    assert axcodes(ras) == ("L", "P", "S")
    for ijk in [(0, 0, 0), (3, 1, 2), (7, 5, 1)]:
        p_lps = _world(lps, ijk)
        np.testing.assert_allclose(_world(ras, ijk), p_lps * [-1, -1, 1])
    np.testing.assert_array_equal(ras_to_lps(ras), lps)


def test_spacing_of_oblique_affine():
    rot = _rotation(0.3, -0.2, 0.5)
    aff = _affine((rot @ np.diag([0.7, 1.3, 2.5])).T)
    np.testing.assert_allclose(spacing(aff), [0.7, 1.3, 2.5])


# ------------------------------------------------------------------------------- flow units


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_flow_vox_mm_known_answer_and_round_trip():
    rot = _rotation(0.4, -0.3, 1.1)
    aff = _affine((rot @ np.diag([0.7, 1.3, 2.5])).T)
    # a unit voxel step along axis c is the world vector of column c
    for c in range(3):
        u = np.zeros((3, 2, 2, 2), np.float32)
        u[c] = 1.0
        mm = flow_vox_to_mm(u, aff)
        np.testing.assert_allclose(mm[:, 1, 0, 1], aff[:3, c], atol=1e-6)
        assert np.linalg.norm(mm[:, 0, 0, 0]) == pytest.approx([0.7, 1.3, 2.5][c], rel=1e-6)
    rng = np.random.default_rng(0)
    u = rng.normal(0, 2, (3, 4, 5, 6)).astype(np.float32)
    mm = flow_vox_to_mm(u, aff)
    assert mm.dtype == np.float32 and mm.shape == u.shape
    np.testing.assert_allclose(mm[:, 1, 2, 3], aff[:3, :3] @ u[:, 1, 2, 3], rtol=1e-5, atol=1e-5)
    back = flow_mm_to_vox(mm, aff)
    np.testing.assert_allclose(back, u, atol=1e-5)
    np.testing.assert_allclose(flow_mm_to_vox(flow_vox_to_mm(u.astype(np.float64), aff), aff), u, atol=1e-12)


def test_flow_to_canonical_keeps_world_displacements():
    """A flow on an LPS-stored (permuted) grid: at every world point the mm vector is kept."""
    aff = _affine([(0, -3, 0), (0, 0, 4), (-2, 0, 0)])  # P, S, L
    rng = np.random.default_rng(1)
    u = rng.normal(0, 1.5, (3,) + SHAPE).astype(np.float32)
    cu, c_aff = flow_to_canonical(u, aff)
    assert axcodes(c_aff) == RAS
    assert cu.shape == (3, 5, 4, 3)
    mm_src = flow_vox_to_mm(u.astype(np.float64), aff)
    mm_out = flow_vox_to_mm(cu.astype(np.float64), c_aff)
    for ijk in itertools.product(*(range(n) for n in cu.shape[1:])):
        src = _index_of(aff, _world(c_aff, ijk))
        np.testing.assert_allclose(mm_out[(slice(None),) + ijk], mm_src[(slice(None),) + src], atol=1e-5)


def test_flow_to_canonical_constant_flow_known_answer():
    """+1 voxel along a stored axis that steps −2 mm in x (towards L) is −2 mm in world x, i.e.
    −1 voxel along canonical axis 0 (which steps +2 mm in x, towards R); likewise +1 voxel
    along a P axis is −1 canonical voxel along axis 1; the S axis is unchanged."""
    aff = _affine([(-2, 0, 0), (0, -3, 0), (0, 0, 4)])  # LPS
    u = np.zeros((3,) + SHAPE, np.float32)
    u[0], u[1], u[2] = 1.0, 1.0, 1.0
    cu, c_aff = flow_to_canonical(u, aff)
    np.testing.assert_allclose(cu[0], -1.0)
    np.testing.assert_allclose(cu[1], -1.0)
    np.testing.assert_allclose(cu[2], 1.0)
    np.testing.assert_allclose(flow_vox_to_mm(cu, c_aff)[:, 0, 0, 0], [-2.0, -3.0, 4.0])


def test_warp_commutes_with_reorientation():
    """Warping in the stored frame then reorienting equals reorienting image and flow first
    (integer displacements: exact)."""
    aff = _affine([(0, -3, 0), (0, 0, 4), (-2, 0, 0)])  # P, S, L
    rng = np.random.default_rng(2)
    img = rng.normal(0, 100, SHAPE).astype(np.float32)
    u = rng.integers(-2, 3, (3,) + SHAPE).astype(np.float32)
    warped = _warp(img, u)
    expected, _ = to_canonical(warped, aff)
    c_img, c_aff = to_canonical(img, aff)
    c_u, c_aff2 = flow_to_canonical(u, aff)
    np.testing.assert_allclose(c_aff2, c_aff)
    np.testing.assert_array_equal(_warp(np.ascontiguousarray(c_img), c_u), expected)


def _warp(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    out = warp(torch.from_numpy(np.ascontiguousarray(img))[None, None].double(),
               torch.from_numpy(np.ascontiguousarray(u))[None].double())
    return out[0, 0].numpy().astype(np.float32)


# ------------------------------------------------------------------------------- flow convention


@pytest.mark.parametrize("t_mm", [6.0, -4.0])
def test_pull_field_of_a_translation(t_mm):
    """ES is ED moved by +t mm along world x: the pull field is u = +t/spacing along axis 0 and
    warp(ES, u) reproduces ED exactly wherever x + u stays inside the grid."""
    s = 2.0
    n = 12
    m = int(t_mm / s)
    rng = np.random.default_rng(3)
    big = rng.normal(0, 100, (n + 8, 6, 5)).astype(np.float32)
    k = 4
    ed = big[k:k + n]
    es = big[k - m:k - m + n]  # ES(p) = ED(p − t): content moved by +t along x
    aff = _affine([(s, 0, 0), (0, 2.5, 0), (0, 0, 3.0)])
    # the content of ED voxel i sits at voxel i + m in ES
    np.testing.assert_array_equal(es[max(m, 0) + 2], ed[max(m, 0) + 2 - m])
    u = np.zeros((3,) + ed.shape, np.float32)
    u[0] = t_mm / s
    np.testing.assert_allclose(flow_vox_to_mm(u, aff)[:, 0, 0, 0], [t_mm, 0.0, 0.0])
    w = _warp(es, u)
    inside = slice(0, n - m) if m > 0 else slice(-m, n)
    np.testing.assert_array_equal(w[inside], ed[inside])
    assert not np.array_equal(_warp(es, -u)[inside], ed[inside])  # the opposite sign is wrong


def test_pull_field_of_a_translation_through_an_las_file(tmp_path):
    """The same translation stored the way a scanner might: LAS voxel order, the flow written as
    a displacement file (+t mm along world x) — after reorientation u = +t/spacing on axis 0."""
    s, t_mm, n = 2.0, 4.0, 10
    m = int(t_mm / s)
    rng = np.random.default_rng(4)
    big = rng.normal(0, 100, (n + 4, 5, 4)).astype(np.float32)
    ed_ras, es_ras = big[2:2 + n], big[2 - m:2 - m + n]
    ras_aff = _affine([(s, 0, 0), (0, 2.5, 0), (0, 0, 3.0)], origin=(0.0, 0.0, 0.0))
    las_aff = ras_aff.copy()
    las_aff[0, 0] = -s
    las_aff[0, 3] = s * (n - 1)  # LAS voxel 0 is RAS voxel n−1: the same world box
    es_las = es_ras[::-1]
    u_las_mm = np.zeros((3,) + es_las.shape, np.float32)
    u_las_mm[0] = t_mm  # world +x
    path = write_flow(tmp_path / "flow.nii.gz", flow_mm_to_vox(u_las_mm, las_aff), las_aff)
    assert nib.load(str(path)).header["intent_code"] == 1006
    u_vox, f_aff = read_flow(path)
    np.testing.assert_allclose(u_vox[0], -t_mm / s)  # stored frame: axis 0 points to −x
    c_u, c_aff = flow_to_canonical(u_vox, f_aff)
    c_es, c_aff2 = to_canonical(es_las, las_aff)
    np.testing.assert_allclose(c_aff, ras_aff, atol=1e-6)
    np.testing.assert_allclose(c_aff2, ras_aff, atol=1e-6)
    np.testing.assert_allclose(c_u[0], t_mm / s)
    np.testing.assert_allclose(c_u[1:], 0.0)
    w = _warp(np.ascontiguousarray(c_es), c_u)
    np.testing.assert_array_equal(w[: n - m], ed_ras[: n - m])
