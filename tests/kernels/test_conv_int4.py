"""int4-weight convolution: exactly ``gemm_int4`` of a NumPy im2col, plus the bias, on every grouped level."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.pack.int4 import quantize_int4
from kernels.reference import gemm_int4_ref
from tests.levels import level_fixture

level = level_fixture("gemm_int4")


def im2col_ref(x: np.ndarray, kh: int, kw: int, strides, pads, dilations, c0: int, cg: int) -> np.ndarray:
    """NCHW ``x`` as rows ``[N * OH * OW, KH * KW * cg]`` in ``(ky, kx, c)`` order, zero border."""
    n, _, h, w = x.shape
    top, left, bottom, right = pads
    xp = np.zeros((n, cg, h + top + bottom, w + left + right), np.float32)
    xp[:, :, top : top + h, left : left + w] = x[:, c0 : c0 + cg]
    (sh, sw), (dh, dw) = strides, dilations
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    taps = [xp[:, :, ky * dh : ky * dh + sh * (oh - 1) + 1 : sh, kx * dw : kx * dw + sw * (ow - 1) + 1 : sw]
            for ky in range(kh) for kx in range(kw)]
    return np.stack(taps, axis=1).transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, kh * kw * cg), (oh, ow)


CASES = [  # (N, C, H, W, O, KH, KW, strides, pads, dilations, group, group_size, symmetric)
    (1, 16, 7, 7, 33, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 32, True),
    (2, 24, 9, 5, 16, 3, 1, (2, 1), (0, 1, 2, 0), (2, 1), 1, 64, False),
    (1, 40, 6, 6, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 2, 128, True),
    (1, 7, 11, 11, 65, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1), 1, 32, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"g{c[10]}G{c[11]}")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv2d_int4_is_gemm_int4_of_im2col(level, rng, case, layout):
    n, c, h, w, o, kh, kw, strides, pads, dilations, group, gs, symmetric = case
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    wt = rng.standard_normal((o, c // group, kh, kw), dtype=np.float32)
    bias = rng.standard_normal(o, dtype=np.float32)
    packed = kernels.pack_conv_int4(wt, group=group, group_size=gs, symmetric=symmetric)
    og, cg = o // group, c // group
    parts = []
    for g in range(group):
        rows = wt[g * og : (g + 1) * og].transpose(0, 2, 3, 1).reshape(og, -1)
        codes, scales, zeros = quantize_int4(np.ascontiguousarray(rows), gs, symmetric)
        cols, (oh, ow) = im2col_ref(x, kh, kw, strides, pads, dilations, g * cg, cg)
        parts.append(gemm_int4_ref(cols, codes, scales, zeros, group_size=gs))
    want = (np.concatenate(parts, axis=1) + bias).reshape(n, oh, ow, o)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = kernels.conv2d_int4(xin, packed, bias, strides=strides, pads=pads, dilations=dilations, layout=layout)
    np.testing.assert_array_equal(got, want if layout == "NHWC" else want.transpose(0, 3, 1, 2))


def test_conv2d_int4_is_close_to_the_float_convolution(rng):
    x = rng.standard_normal((1, 32, 8, 8), dtype=np.float32)
    wt = rng.standard_normal((16, 32, 3, 3), dtype=np.float32)
    packed = kernels.pack_conv_int4(wt, group_size=32)
    got = kernels.conv2d_int4(x, packed, pads="same")
    cols, _ = im2col_ref(x, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0, 32)
    filters = packed.dequantize().transpose(0, 2, 3, 1).reshape(16, -1)
    exact = (cols.astype(np.float64) @ filters.T.astype(np.float64)).reshape(1, 8, 8, 16).transpose(0, 3, 1, 2)
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


def test_out_argument_and_errors(rng):
    x = rng.standard_normal((1, 8, 5, 5), dtype=np.float32)
    packed = kernels.pack_conv_int4(rng.standard_normal((4, 8, 3, 3), dtype=np.float32), group_size=32)
    out = np.empty((1, 4, 3, 3), np.float32)
    assert kernels.conv2d_int4(x, packed, out=out) is out
    with pytest.raises(TypeError, match="w: expected a PackedConvInt4"):
        kernels.conv2d_int4(x, np.zeros((4, 8, 3, 3), np.float32))
    with pytest.raises(TypeError, match="x: expected dtype float32, got float64"):
        kernels.conv2d_int4(x.astype(np.float64), packed)
    with pytest.raises(ValueError, match="w: expected 6 input channels per filter"):
        kernels.conv2d_int4(np.zeros((1, 6, 5, 5), np.float32), packed)
    with pytest.raises(ValueError, match=r"bias: expected a scalar or shape \(4,\)"):
        kernels.conv2d_int4(x, packed, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="group: expected a positive divisor of the 4 output channels"):
        kernels.pack_conv_int4(np.ones((4, 8, 3, 3), np.float32), group=3)


def test_one_shot_calls_keep_their_geometry_on_the_packed_filters(rng):
    x = rng.standard_normal((1, 32, 6, 5)).astype(np.float32)
    packed = kernels.pack_conv_int4(rng.standard_normal((8, 32, 3, 3)).astype(np.float32), group_size=32)
    first = kernels.conv2d_int4(x, packed, pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(kernels.conv2d_int4(x, packed, pads=[1, 1, 1, 1]), first)  # a list: normalised
    np.testing.assert_array_equal(kernels.conv2d_int4(x, packed, pads=(1, 1, 1, 1)), first)
    assert len(packed.plans) == 2
    strided = kernels.conv2d_int4(x, packed, pads=(1, 1, 1, 1), strides=2)
    assert strided.shape == (1, 8, 3, 3) and len(packed.plans) == 3
    with pytest.raises(ValueError, match="layout"):
        kernels.conv2d_int4(x, packed, layout="NCWH")
