"""Plans call their kernel's machine entry (``kernels._jit.machine_entry``) only for arguments of its exact types:
read-only or unaligned arrays go through the dispatcher, with the same results."""

from __future__ import annotations

import numpy as np
import pytest

import kernels


def _unaligned(a: np.ndarray) -> np.ndarray:
    """A writeable, C-contiguous copy of ``a`` whose data starts one byte past an aligned address."""
    raw = np.empty(a.nbytes + 1, np.uint8)
    view = raw[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    return view


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _plans(rng):
    """``(plan, input)`` of each plan with a machine entry."""
    x8 = rng.integers(0, 256, (3, 40), dtype=np.uint8)
    w8 = rng.integers(-127, 128, (24, 40), dtype=np.int8)
    xf = rng.standard_normal((3, 64)).astype(np.float32)
    wf = rng.standard_normal((24, 64)).astype(np.float32)
    xc = rng.integers(0, 256, (1, 6, 6, 8), dtype=np.uint8)
    wc = rng.integers(-127, 128, (16, 8, 3, 3), dtype=np.int8)
    return [
        (kernels.linear_int8_plan(kernels.pack_int8(w8), a_scale=0.02, a_zero_point=7, w_scale=0.01), x8),
        (kernels.gemm_int4_plan(kernels.pack_int4(wf, group_size=32), 3), xf),
        (kernels.gemm_ternary_plan(kernels.pack_ternary(wf), 3), xf),
        (kernels.gemm_binary_plan(kernels.pack_bits(wf), 64, 3), kernels.pack_bits(xf)),
        (kernels.qlinear_conv2d_plan(kernels.pack_conv_int8(wc), xc.shape, 0.02, 7, 0.01, 0, 0.05, np.uint8(3),
                                     pads=(1, 1, 1, 1), layout="NHWC"), xc),
    ]


@pytest.mark.parametrize("index", range(5), ids=["linear_int8", "gemm_int4", "gemm_ternary", "gemm_binary",
                                                 "qlinear_conv2d"])
def test_plans_take_any_layout_of_their_inputs(rng, index):
    kernels.set_num_threads(1)
    plan, x = _plans(rng)[index]
    want = plan(x)
    for a in (x, _readonly(x), _unaligned(x), x.copy(), x):  # exact types again after the others
        np.testing.assert_array_equal(plan(a), want)
        out = _unaligned(np.zeros_like(want))
        np.testing.assert_array_equal(plan(a, out=out), want)
        assert (out == want).all()
