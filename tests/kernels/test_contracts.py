"""Contracts every kernel keeps at the edges: inputs are only read (read-only arrays are accepted), ``out=``
never overlaps an input, a batch of 0 gives an empty result, and non-finite numbers are refused where they
would otherwise come out as ordinary-looking values."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.reference import linear_int8_ref

RNG = np.random.default_rng(16)
W8 = RNG.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
DW8 = RNG.integers(-127, 128, (8, 1, 3, 3)).astype(np.int8)
WF = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
QCONV = dict(x_scale=0.1, x_zero_point=3, w_scale=0.01, w_zero_point=0, y_scale=0.5, y_zero_point=5)
AVG = dict(x_scale=0.1, x_zero_point=3, y_scale=0.1, y_zero_point=3)
PACKED_INT4 = kernels.pack_int4(RNG.standard_normal((16, 64)).astype(np.float32))
PACKED_TERNARY = kernels.pack_ternary(RNG.standard_normal((16, 64)).astype(np.float32))

# name -> (call(x, layout) on an [N, 8, 6, 6] NCHW or [N, 6, 6, 8] NHWC image, its dtype)
IMAGE_OPS = {
    "conv2d_int8": (lambda x, layout: kernels.conv2d_int8(x, W8, layout=layout), np.uint8),
    "conv2d_int8 packed": (lambda x, layout: kernels.conv2d_int8(x, kernels.pack_conv_int8(W8), layout=layout),
                           np.uint8),
    "conv2d_int8 depthwise": (lambda x, layout: kernels.conv2d_int8(x, DW8, group=8, layout=layout), np.uint8),
    "qlinear_conv2d": (lambda x, layout: kernels.qlinear_conv2d(x, w=W8, layout=layout, **QCONV), np.uint8),
    "qlinear_conv2d depthwise": (lambda x, layout: kernels.qlinear_conv2d(x, w=DW8, group=8, layout=layout,
                                                                          **QCONV), np.uint8),
    "conv2d_int4": (lambda x, layout: kernels.conv2d_int4(x, kernels.pack_conv_int4(WF), layout=layout),
                    np.float32),
    "conv2d_float32": (lambda x, layout: kernels.conv2d_float32(x, WF, layout=layout), np.float32),
    "max_pool2d": (lambda x, layout: kernels.max_pool2d(x, 2, layout=layout), np.uint8),
    "max_pool2d float32": (lambda x, layout: kernels.max_pool2d(x, 2, layout=layout), np.float32),
    "avg_pool2d": (lambda x, layout: kernels.avg_pool2d(x, 2, layout=layout, **AVG), np.uint8),
    "avg_pool2d_float32": (lambda x, layout: kernels.avg_pool2d_float32(x, 2, layout=layout), np.float32),
    "global_avg_pool2d": (lambda x, layout: kernels.global_avg_pool2d(x, layout=layout, **AVG), np.uint8),
}


def _image(batch: int, dtype, layout: str) -> np.ndarray:
    x = RNG.integers(0, 200, (batch, 8, 6, 6)).astype(dtype)
    return x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", IMAGE_OPS)
def test_read_only_inputs_are_accepted(name, layout):
    call, dtype = IMAGE_OPS[name]
    x = _image(2, dtype, layout)
    want = call(x, layout)
    x.flags.writeable = False
    np.testing.assert_array_equal(call(x, layout), want)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", IMAGE_OPS)
def test_batch_of_zero_gives_an_empty_result(name, layout):
    call, dtype = IMAGE_OPS[name]
    one = call(_image(1, dtype, layout), layout)
    empty = call(_image(0, dtype, layout), layout)
    assert empty.shape == (0, *one.shape[1:]) and empty.dtype == one.dtype


@pytest.mark.parametrize("plan", [
    lambda shape, layout: kernels.conv2d_int8_plan(W8, shape, layout=layout),
    lambda shape, layout: kernels.conv2d_float32_plan(WF, shape, layout=layout),
    lambda shape, layout: kernels.max_pool2d_plan(shape, np.uint8, 2, layout=layout),
    lambda shape, layout: kernels.global_avg_pool2d_plan(shape, np.uint8, layout=layout, **AVG),
], ids=["conv2d_int8", "conv2d_float32", "max_pool2d", "global_avg_pool2d"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_plans_for_a_batch_of_zero(plan, layout):
    """Prepared for 0 images, a plan's call and its entry (what compiled chains run) leave an empty output."""
    shape = (0, 8, 6, 6) if layout == "NCHW" else (0, 6, 6, 8)
    prepared = plan(shape, layout)
    dtype = np.float32 if "Float32" in type(prepared).__name__ else np.uint8
    x = np.zeros(shape, dtype)
    y = prepared(x)
    assert y.shape[0] == 0
    prepared.entry()([x], [np.empty_like(y)])


def _overlapping(a_shape, a_dtype, out_shape, out_dtype):
    """``a`` and ``out`` over the same bytes."""
    size = max(np.prod(a_shape) * np.dtype(a_dtype).itemsize, np.prod(out_shape) * np.dtype(out_dtype).itemsize)
    memory = np.zeros(int(size), np.uint8)
    a = memory[: np.prod(a_shape) * np.dtype(a_dtype).itemsize].view(a_dtype).reshape(a_shape)
    out = memory[: np.prod(out_shape) * np.dtype(out_dtype).itemsize].view(out_dtype).reshape(out_shape)
    return a, out


W = RNG.integers(-127, 128, (16, 64)).astype(np.int8)
OVERLAPS = {  # name -> (input shape, dtype, output shape, dtype, call(x, out))
    "gemm_int8": ((16, 64), np.uint8, (16, 16), np.int32, lambda x, out: kernels.gemm_int8(x, W, out=out)),
    "gemm_int8 packed": ((16, 64), np.uint8, (16, 16), np.int32,
                         lambda x, out: kernels.gemm_int8(x, kernels.pack_int8(W), out=out)),
    "linear_int8": ((16, 64), np.uint8, (16, 16), np.float32,
                    lambda x, out: kernels.linear_int8(x, W, a_scale=0.1, a_zero_point=0, w_scale=0.1, out=out)),
    "linear_dynamic_int8": ((16, 64), np.float32, (16, 16), np.float32,
                            lambda x, out: kernels.linear_dynamic_int8(x, kernels.pack_int8(W), w_scale=0.1,
                                                                       out=out)),
    "gemm_int4": ((16, 64), np.float32, (16, 16), np.float32, lambda x, out: kernels.gemm_int4(x, PACKED_INT4, out=out)),
    "gemm_ternary": ((16, 64), np.float32, (16, 16), np.float32,
                     lambda x, out: kernels.gemm_ternary(x, PACKED_TERNARY, out=out)),
    "conv2d_int8": ((1, 8, 6, 6), np.uint8, (1, 16, 4, 4), np.int32, lambda x, out: kernels.conv2d_int8(x, W8, out=out)),
    "qlinear_conv2d": ((1, 8, 6, 6), np.uint8, (1, 16, 4, 4), np.uint8,
                       lambda x, out: kernels.qlinear_conv2d(x, w=W8, out=out, **QCONV)),
    "conv2d_float32": ((1, 8, 6, 6), np.float32, (1, 16, 4, 4), np.float32,
                       lambda x, out: kernels.conv2d_float32(x, WF, out=out)),
    "max_pool2d": ((1, 8, 6, 6), np.uint8, (1, 8, 5, 5), np.uint8, lambda x, out: kernels.max_pool2d(x, 2, out=out)),
    "dynamic_quantize_linear": ((16, 64), np.float32, (16, 64), np.uint8,
                                lambda x, out: kernels.dynamic_quantize_linear(x, out=out)),
}


@pytest.mark.parametrize("name", OVERLAPS)
def test_out_overlapping_an_input_is_refused(name):
    a_shape, a_dtype, out_shape, out_dtype, call = OVERLAPS[name]
    x, out = _overlapping(a_shape, a_dtype, out_shape, out_dtype)
    with pytest.raises(ValueError, match="out: must not overlap the input"):
        call(x, out)
    call(x, np.zeros(out_shape, out_dtype))  # the same call into its own array runs


def test_pack_bits_refuses_nan():
    with pytest.raises(ValueError, match="x: 1 NaN value"):
        kernels.pack_bits(np.array([[np.nan, 1.0, -1.0]], np.float32))


@pytest.mark.parametrize("scale", [0.0, np.float16(0), np.float32(0), -1.0, np.nan, np.inf, np.float16(np.inf),
                                   1e-50])
def test_quantize_linear_scale_must_be_positive_and_finite(scale):
    with pytest.raises(ValueError, match="scale: expected a positive finite float32"):
        kernels.quantize_linear(np.ones(4, np.float32), scale, 3)


def test_linear_int8_refuses_non_finite_bias_and_multiplier():
    a = RNG.integers(0, 256, (4, 64)).astype(np.uint8)
    with pytest.raises(ValueError, match="bias: 1 value"):
        kernels.linear_int8(a, W, a_scale=0.1, a_zero_point=0, w_scale=0.1,
                            bias=np.array([np.nan] + [0] * 15, np.float32))
    with pytest.raises(ValueError, match="over- or underflows float32"):  # formed in the scales' float32
        kernels.linear_int8(a, W, a_scale=np.float32(1e30), a_zero_point=0, w_scale=np.float32(1e30))
    with pytest.raises(ValueError, match="over- or underflows float32"):
        kernels.linear_int8(a, W, a_scale=np.float32(1e-30), a_zero_point=0, w_scale=np.float32(1e-30))


@pytest.mark.parametrize("a_scale", [0.0123456789, np.float64(0.0123456789), np.float32(0.0123456789)])
@pytest.mark.parametrize("w_scale", [0.00731, np.float32(0.00731),
                                     RNG.uniform(0.001, 0.01, 16).astype(np.float32), RNG.uniform(0.001, 0.01, 16)])
def test_linear_int8_matches_its_oracle_whatever_the_scalar_types(a_scale, w_scale):
    """The multiplier is formed in the scales' own types as NumPy promotes them, a Python float being a float64."""
    a = RNG.integers(0, 256, (7, 65)).astype(np.uint8)
    w = RNG.integers(-127, 128, (16, 65)).astype(np.int8)
    args = dict(a_scale=a_scale, a_zero_point=3, w_scale=w_scale, bias=RNG.standard_normal(16).astype(np.float32))
    np.testing.assert_array_equal(kernels.linear_int8(a, w, **args), linear_int8_ref(a, w, **args))


def test_out_overlapping_through_a_misaligned_view_is_refused():
    """An ``out`` that fails a plan's inline checks (here: misaligned) goes through the full checks, overlap
    included."""
    memory = np.zeros(16 * 64 + 4, np.uint8)
    x, out = memory[:16 * 64].reshape(16, 64), memory[1:16 * 64 + 1].view(np.int32).reshape(16, 16)
    assert not out.flags.aligned
    with pytest.raises(ValueError, match="out: must not overlap the input a"):
        kernels.gemm_int8(x, kernels.pack_int8(W), out=out)
