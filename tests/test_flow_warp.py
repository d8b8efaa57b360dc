"""warp(): known answers that pin the pull convention and the channel ↔ axis order."""
from __future__ import annotations

import pytest
import torch

from cardiomotion.flow import identity_grid, warp

SHAPE = (7, 6, 5)


def _arange() -> torch.Tensor:
    return torch.arange(7 * 6 * 5, dtype=torch.float64).reshape(1, 1, *SHAPE)


def _const_flow(d0: float, d1: float, d2: float, dtype=torch.float64) -> torch.Tensor:
    flow = torch.zeros(1, 3, *SHAPE, dtype=dtype)
    for c, d in enumerate((d0, d1, d2)):
        flow[:, c] = d
    return flow


def test_identity_grid_channels_are_axis_indices():
    g = identity_grid(SHAPE)
    assert g.shape == (1, 3, *SHAPE)
    assert g[0, 0, 3, 1, 2] == 3 and g[0, 1, 3, 1, 2] == 1 and g[0, 2, 3, 1, 2] == 2


def test_identity_flow_reproduces_image_exactly():
    img = torch.rand(2, 2, *SHAPE, dtype=torch.float64)
    out = warp(img, torch.zeros(2, 3, *SHAPE, dtype=torch.float64))
    torch.testing.assert_close(out, img, rtol=0, atol=1e-12)


def test_integer_translation_moves_by_exactly_that():
    img = _arange()
    out = warp(img, _const_flow(2.0, 0.0, -1.0))[0, 0]
    ref = img[0, 0]
    # out[i, j, k] = img[i + 2, j, k - 1] wherever both are inside the grid
    torch.testing.assert_close(out[:-2, :, 1:], ref[2:, :, :-1], rtol=0, atol=1e-9)
    # border padding: beyond the edge the edge value is repeated
    torch.testing.assert_close(out[-1, :, 1:], ref[-1, :, :-1], rtol=0, atol=1e-9)
    torch.testing.assert_close(out[:-2, :, 0], ref[2:, :, 0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_single_axis_translation_pins_channel_to_axis(axis):
    img = _arange()
    d = [0.0, 0.0, 0.0]
    d[axis] = 1.0
    out = warp(img, _const_flow(*d))[0, 0]
    ref = img[0, 0]
    n = SHAPE[axis]
    torch.testing.assert_close(out.narrow(axis, 0, n - 1), ref.narrow(axis, 1, n - 1), rtol=0, atol=1e-9)


def test_fractional_translation_interpolates_linearly():
    img = _arange()  # value = 30 i + 5 j + k, linear in the index
    out = warp(img, _const_flow(0.25, 0.5, -0.75))[0, 0]
    i, j, k = 2, 3, 2
    expected = 30 * (i + 0.25) + 5 * (j + 0.5) + (k - 0.75)
    assert float(out[i, j, k]) == pytest.approx(expected, abs=1e-9)
    inner = out[:-1, :-1, 1:]
    g = identity_grid(SHAPE, dtype=torch.float64)[0]
    ref = 30 * (g[0] + 0.25) + 5 * (g[1] + 0.5) + (g[2] - 0.75)
    torch.testing.assert_close(inner, ref[:-1, :-1, 1:], rtol=0, atol=1e-9)


def test_batch_broadcast_and_shape_errors():
    img = torch.rand(1, 1, *SHAPE)
    flows = torch.zeros(3, 3, *SHAPE)
    assert warp(img, flows).shape == (3, 1, *SHAPE)
    with pytest.raises(ValueError):
        warp(img, torch.zeros(1, 2, *SHAPE))
    with pytest.raises(ValueError):
        warp(img, torch.zeros(1, 3, 4, 4, 4))


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_gradcheck_wrt_flow_and_image(padding):
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 3)
    img = torch.rand(1, 1, *shape, dtype=torch.float64, generator=gen, requires_grad=True)
    # random non-integer displacements keep samples off voxel boundaries (kinks of trilinear)
    flow = (0.3 + 0.4 * torch.rand(1, 3, *shape, dtype=torch.float64, generator=gen)) * \
        torch.where(torch.rand(1, 3, *shape, generator=gen) > 0.5, 1.0, -1.0).double()
    flow.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, u: warp(a, u, padding=padding), (img, flow), eps=1e-6, atol=1e-5)
