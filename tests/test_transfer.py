"""Host/device copies (cardiomotion.transfer): same values as the plain copies, on every device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cardiomotion.transfer import small_tensor, to_device, to_host

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_and_back_gives_the_same_values(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 4, 5, 6), generator=g)
    y = to_device(x, device)
    assert y.device.type == device and y.dtype == torch.float32
    half = to_device(x, device, torch.float16)
    assert half.dtype == torch.float16
    ed = (x * 100).round().to(torch.int16)
    a, b, c = to_host(y, to_device(ed, device), half)
    np.testing.assert_array_equal(a, x.numpy())
    np.testing.assert_array_equal(b, ed.numpy())
    np.testing.assert_array_equal(c, x.half().numpy())
    assert a.flags["C_CONTIGUOUS"] and b.dtype == np.int16


@pytest.mark.parametrize("device", DEVICES)
def test_to_host_of_a_channels_last_tensor_is_in_array_order(device):
    x = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)
    cl = to_device(x, device).contiguous(memory_format=torch.channels_last_3d)
    (out,) = to_host(cl)
    np.testing.assert_array_equal(out, x.numpy())
    assert out.flags["C_CONTIGUOUS"]


def test_small_tensor_takes_the_device_and_dtype_of_its_model():
    like = torch.zeros(3, dtype=torch.float64)
    s = small_tensor([0.5, 2.0, 4.0], like)
    assert s.dtype == torch.float64 and s.tolist() == [0.5, 2.0, 4.0]
    assert to_host() == []
