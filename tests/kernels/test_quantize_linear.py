"""Per-tensor QuantizeLinear / DequantizeLinear (``kernels.quantize``) bit for bit against the ONNX formulas.

The oracles are the ONNX reference steps in NumPy: ``clip(rint(float32(x) / float32(scale)) + zp)``
and ``float32(int32(q) - zp) * float32(scale)``. The kernels have no CPU-specific code; one test
still runs both under every ``LOWBIT_ISA`` level.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.quantize import dequantize_linear, quantize_linear, quantize_linear_to_nhwc

QDTYPES = (np.uint8, np.int8)
SIZES = (0, 1, 7, 63, 65, 1000003)


def quantize_ref(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    v = np.rint(x.astype(np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(v, info.min, info.max).astype(dtype)


def dequantize_ref(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale)


def _zero_points(dtype) -> tuple[int, ...]:
    info = np.iinfo(dtype)
    return info.min, 0, 3, info.max


def _check(x: np.ndarray, scale: float, zp: int, dtype) -> np.ndarray:
    q = quantize_linear(x, scale, zp, dtype=dtype)
    assert q.dtype == dtype and q.shape == x.shape
    np.testing.assert_array_equal(q, quantize_ref(x, scale, zp, dtype))
    y = dequantize_linear(q, scale, zp)
    assert y.dtype == np.float32 and y.shape == q.shape
    np.testing.assert_array_equal(y, dequantize_ref(q, scale, zp))
    return q


# --- values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_random_sizes(rng, dtype, size):
    x = (rng.standard_normal(size) * 4).astype(np.float32)
    for zp in _zero_points(dtype):
        _check(x, 0.0173, zp, dtype)


@pytest.mark.parametrize("dtype", QDTYPES)
def test_ties_round_half_to_even(dtype):
    # a power-of-two scale makes x / scale exactly k + 0.5
    halves = np.arange(-300, 300, dtype=np.float32) + np.float32(0.5)
    for scale in (0.25, 1.0, 4.0):
        x = halves * np.float32(scale)
        for zp in _zero_points(dtype):
            q = _check(x, scale, zp, dtype)
            info = np.iinfo(dtype)
            even = np.clip(2 * np.round(halves / 2) + zp, info.min, info.max)  # halves to the even neighbour
            np.testing.assert_array_equal(q, even.astype(dtype))


@pytest.mark.parametrize("dtype", QDTYPES)
def test_ties_any_scale(rng, dtype):
    # quotients that land exactly on or next to halves in float32, for scales that are not powers of two
    scale = np.float32(0.0371)
    k = rng.integers(-200, 200, 4096).astype(np.float32) + np.float32(0.5)
    x = np.concatenate([k * scale, np.nextafter(k * scale, np.float32(np.inf)),
                        np.nextafter(k * scale, np.float32(-np.inf))])
    for zp in _zero_points(dtype):
        _check(x, scale, zp, dtype)


@pytest.mark.parametrize("dtype", QDTYPES)
def test_saturation_zero_and_infinities(dtype):
    info = np.iinfo(dtype)
    x = np.array([-np.inf, -3e38, -1e6, -300.0, -129.5, -128.5, -0.5, -0.0, 0.0, 0.49, 0.5, 1.5,
                  126.5, 127.5, 254.5, 255.5, 256.0, 1e6, 3e38, np.inf], dtype=np.float32)
    for zp in _zero_points(dtype):
        q = _check(x, 1.0, zp, dtype)
        assert q[0] == info.min and q[-1] == info.max
        assert (q[6:9] == zp).all()  # -0.5, -0.0 and 0.0 round to (negative) zero
    np.testing.assert_array_equal(quantize_linear(np.float32([-0.0, -1e-30]), 1e-3, 7, dtype=dtype), [7, 7])


@pytest.mark.parametrize("dtype", QDTYPES)
def test_tiny_and_huge_scales(rng, dtype):
    x = (rng.standard_normal(257) * 4).astype(np.float32)
    for scale in (1e-40, 1e-20, 3e-5, 7.0, 1e20, 3e38):  # 1e-40 is a float32 subnormal: quotients overflow to inf
        with np.errstate(over="ignore"):
            _check(x, scale, 1, dtype)


def test_scale_rounds_to_float32(rng):
    x = (rng.standard_normal(1000) * 4).astype(np.float32)
    scale = 0.1  # float64; ONNX divides by float32(0.1)
    np.testing.assert_array_equal(quantize_linear(x, scale, 128), quantize_ref(x, np.float32(scale), 128, np.uint8))
    np.testing.assert_array_equal(quantize_linear(x, np.float64(scale), 128), quantize_linear(x, np.float32(scale), 128))


@pytest.mark.parametrize("dtype", (np.uint8, np.int8, np.int32))
def test_dequantize_every_code(rng, dtype):
    info = np.iinfo(dtype)
    if dtype == np.int32:
        q = np.concatenate([[info.min, info.max, -1, 0, 1], rng.integers(info.min, info.max, 1000)]).astype(dtype)
        zps = (0,)
    else:
        q = np.arange(info.min, info.max + 1, dtype=dtype)
        zps = _zero_points(dtype)
    for zp in zps:
        for scale in (1e-40, 0.0173, 3.0, 3e38):
            with np.errstate(over="ignore"):
                np.testing.assert_array_equal(dequantize_linear(q, scale, zp), dequantize_ref(q, scale, zp))


def test_shapes_and_non_contiguous(rng):
    x = (rng.standard_normal((3, 5, 7, 9)) * 4).astype(np.float32)
    for view in (x[:, ::2], x.transpose(0, 2, 3, 1), x[..., 1], np.array(1.25, np.float32)):
        _check(view, 0.05, 128, np.uint8)
    q = quantize_linear(x, 0.05, -3, dtype=np.int8)
    view = q.transpose(3, 1, 0, 2)
    np.testing.assert_array_equal(dequantize_linear(view, 0.05, -3), dequantize_ref(view, 0.05, -3))


def test_out(rng):
    x = (rng.standard_normal((2, 65, 7)) * 4).astype(np.float32)
    out = np.full(x.shape, 99, np.int8)
    assert quantize_linear(x, 0.03, -5, dtype=np.int8, out=out) is out
    np.testing.assert_array_equal(out, quantize_ref(x, 0.03, -5, np.int8))
    y = np.full(x.shape, np.nan, np.float32)
    assert dequantize_linear(out, 0.03, -5, out=y) is y
    np.testing.assert_array_equal(y, dequantize_ref(out, 0.03, -5))


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(rng, monkeypatch, threads):
    monkeypatch.setattr(kernels.threads, "_setting", threads)
    x = (rng.standard_normal(2_000_003) * 4).astype(np.float32)
    x[[0, 999_999, 1_000_001, -1]] = [-np.inf, 0.5, 1.5, np.inf]
    _check(x, 0.0173, 128, np.uint8)


def test_every_level(level, rng):
    x = (rng.standard_normal(1000) * 4).astype(np.float32)
    for dtype in QDTYPES:
        _check(x, 0.0173, 1, dtype)


# --- bad inputs --------------------------------------------------------------------------------------------------

def test_nan_raises():
    x = np.float32([1.0, np.nan, 2.0, np.nan])
    with pytest.raises(ValueError, match="x: 2 NaN value"):
        quantize_linear(x, 0.5, 3)


def test_bad_quantize_arguments():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32, got float64"):
        quantize_linear(x.astype(np.float64), 0.1, 0)
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray, got list"):
        quantize_linear([1.0, 2.0], 0.1, 0)
    with pytest.raises(TypeError, match="dtype: expected uint8 or int8, got <class 'numpy.int16'>"):
        quantize_linear(x, 0.1, 0, dtype=np.int16)
    with pytest.raises(TypeError, match="dtype: expected uint8 or int8, got 'float32'"):
        quantize_linear(x, 0.1, 0, dtype="float32")
    for scale in (0.0, -0.1, np.inf, np.nan, 1e-50, 1e39):
        with pytest.raises(ValueError, match="scale: expected a positive finite float32"):
            quantize_linear(x, scale, 0)
    with pytest.raises(TypeError, match="scale: expected a real scalar, got str"):
        quantize_linear(x, "0.1", 0)
    with pytest.raises(TypeError, match="scale: expected a real scalar, got bool"):
        quantize_linear(x, True, 0)
    with pytest.raises(ValueError, match=r"scale: expected a scalar, got shape \(2,\)"):
        quantize_linear(x, np.float32([0.1, 0.2]), 0)
    assert quantize_linear(x, np.float32([0.5]), 1).tolist() == [[1] * 3] * 2  # one-element arrays are scalars
    with pytest.raises(ValueError, match=r"zero_point: values must lie in \[0, 255\], got range \[256, 256\]"):
        quantize_linear(x, 0.1, 256)
    with pytest.raises(ValueError, match=r"zero_point: values must lie in \[-128, 127\], got range \[128, 128\]"):
        quantize_linear(x, 0.1, 128, dtype=np.int8)
    with pytest.raises(TypeError, match="zero_point: expected an integer scalar"):
        quantize_linear(x, 0.1, 3.0)


def test_bad_dequantize_arguments():
    q = np.zeros((2, 3), np.uint8)
    with pytest.raises(TypeError, match="q: expected dtype uint8 or int8 or int32, got float32"):
        dequantize_linear(q.astype(np.float32), 0.1, 0)
    with pytest.raises(ValueError, match="scale: expected a positive finite float32"):
        dequantize_linear(q, -1.0, 0)
    with pytest.raises(ValueError, match=r"zero_point: values must lie in \[0, 255\], got range \[-1, -1\]"):
        dequantize_linear(q, 0.1, -1)
    with pytest.raises(ValueError, match="zero_point: expected 0 for int32 q, got 3"):
        dequantize_linear(q.astype(np.int32), 0.1, 3)
    with pytest.raises(ValueError, match="zero_point: expected 0 for int32 q, got 0.0"):
        dequantize_linear(q.astype(np.int32), 0.1, 0.0)


def test_bad_out():
    x = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 6\), got \(6, 4\)"):
        quantize_linear(x, 0.1, 0, out=np.zeros((6, 4), np.uint8))
    with pytest.raises(TypeError, match="out: expected dtype int8, got uint8"):
        quantize_linear(x, 0.1, 0, dtype=np.int8, out=np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="out: expected a C-contiguous array"):
        quantize_linear(x, 0.1, 0, out=np.zeros((6, 4), np.uint8).T)
    readonly = np.zeros((4, 6), np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        quantize_linear(x, 0.1, 0, out=readonly)
    with pytest.raises(ValueError, match="out: must not overlap the input array"):
        quantize_linear(x, 0.1, 0, out=x.reshape(-1).view(np.uint8)[:24].reshape(4, 6))
    with pytest.raises(TypeError, match="out: expected dtype float32, got float64"):
        dequantize_linear(np.zeros((4, 6), np.uint8), 0.1, 0, out=np.zeros((4, 6)))
    q = np.zeros(96, np.uint8)
    with pytest.raises(ValueError, match="out: must not overlap the input array"):
        dequantize_linear(q[:24].reshape(4, 6), 0.1, 0, out=q.view(np.float32).reshape(4, 6))


# --- quantize_linear_to_nhwc -------------------------------------------------------------------------------------

def _channels_last(q: np.ndarray) -> np.ndarray:
    return q.transpose(0, *range(2, q.ndim), 1)


# RGB (its own interleaving loop), other channel counts (the tiled loop), pixel counts across the 256-pixel tile
NHWC_SHAPES = ((1, 3, 1, 1), (2, 3, 7, 9), (1, 3, 17, 16), (3, 5, 7, 9), (2, 1, 65), (1, 7, 300), (2, 64, 4, 5),
               (3, 2), (1, 4, 2, 3, 5), (0, 3, 4, 4), (2, 3, 0, 5))


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("shape", NHWC_SHAPES)
def test_to_nhwc(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x.reshape(-1)[:4] = [np.inf, -np.inf, 0.5 * 0.0173, 1e30][:x.size]
    for zp in _zero_points(dtype):
        q = quantize_linear_to_nhwc(x, 0.0173, zp, dtype=dtype)
        assert q.dtype == dtype and q.shape == (shape[0], *shape[2:], shape[1])
        np.testing.assert_array_equal(q, _channels_last(quantize_ref(x, 0.0173, zp, dtype)))


def test_to_nhwc_out_views_and_threads(rng, monkeypatch):
    x = (rng.standard_normal((5, 3, 6, 10)) * 4).astype(np.float32)
    out = np.full((5, 6, 10, 3), 7, np.uint8)
    assert quantize_linear_to_nhwc(x, 0.05, 128, out=out) is out
    np.testing.assert_array_equal(out, _channels_last(quantize_ref(x, 0.05, 128, np.uint8)))
    view = x.transpose(0, 1, 3, 2)  # copied to C order
    np.testing.assert_array_equal(quantize_linear_to_nhwc(view, 0.05, 3, dtype=np.int8),
                                  _channels_last(quantize_ref(view, 0.05, 3, np.int8)))
    monkeypatch.setattr(kernels.threads, "_setting", 2)
    monkeypatch.setattr(kernels.quantize, "SPLIT_ELEMS", 100)  # one image per part: the tiles must not be shared
    for c in (3, 4):
        y = (rng.standard_normal((5, c, 9, 31)) * 4).astype(np.float32)
        np.testing.assert_array_equal(quantize_linear_to_nhwc(y, 0.05, 128),
                                      _channels_last(quantize_ref(y, 0.05, 128, np.uint8)))


def test_to_nhwc_every_level(level, rng):
    x = (rng.standard_normal((2, 3, 5, 7)) * 4).astype(np.float32)
    for c in (3, 5):
        np.testing.assert_array_equal(quantize_linear_to_nhwc(x[:, :c], 0.0173, 1),
                                      _channels_last(quantize_ref(x[:, :c], 0.0173, 1, np.uint8)))


def test_to_nhwc_bad_arguments():
    x = np.zeros((2, 3, 4, 5), np.float32)
    for c in (3, 4):
        y = np.ones((1, c, 2, 2), np.float32)
        y[0, -1, 1, 0] = np.nan
        with pytest.raises(ValueError, match="x: 1 NaN value"):
            quantize_linear_to_nhwc(y, 0.5, 3)
    with pytest.raises(ValueError, match=r"x: expected an array \[N, C, \*spatial\] of rank >= 2, got shape \(5,\)"):
        quantize_linear_to_nhwc(x.reshape(-1)[:5], 0.1, 0)
    with pytest.raises(TypeError, match="x: expected dtype float32, got float64"):
        quantize_linear_to_nhwc(x.astype(np.float64), 0.1, 0)
    with pytest.raises(TypeError, match="dtype: expected uint8 or int8"):
        quantize_linear_to_nhwc(x, 0.1, 0, dtype=np.int16)
    with pytest.raises(ValueError, match="scale: expected a positive finite float32"):
        quantize_linear_to_nhwc(x, 0.0, 0)
    with pytest.raises(ValueError, match=r"zero_point: values must lie in \[-128, 127\]"):
        quantize_linear_to_nhwc(x, 0.1, 200, dtype=np.int8)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 4, 5, 3\), got \(2, 3, 4, 5\)"):
        quantize_linear_to_nhwc(x, 0.1, 0, out=np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(TypeError, match="out: expected dtype int8, got uint8"):
        quantize_linear_to_nhwc(x, 0.1, 0, dtype=np.int8, out=np.zeros((2, 4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="out: must not overlap the input array"):
        quantize_linear_to_nhwc(x, 0.1, 0, out=x.reshape(-1).view(np.uint8)[:120].reshape(2, 4, 5, 3))


def test_quantize_plans_and_entries(rng, tmp_path, monkeypatch):
    from kernels.quantize import dequantize_linear_plan, quantize_linear_plan, quantize_linear_to_nhwc_plan
    from tests.kernels.test_int4 import check_entries

    cases = []
    for shape in [(1, 3, 5, 7), (2, 16, 3, 3), (7,)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        for dtype, zp in ((np.uint8, 130), (np.int8, -3)):
            q = quantize_linear(x, 0.02, zp, dtype=dtype)
            cases += [(quantize_linear_plan(shape, 0.02, zp, dtype=dtype), x, q),
                      (dequantize_linear_plan(shape, dtype, 0.02, zp), q, dequantize_linear(q, 0.02, zp))]
            if len(shape) > 1:
                cases.append((quantize_linear_to_nhwc_plan(shape, 0.02, zp, dtype=dtype), x,
                              quantize_linear_to_nhwc(x, 0.02, zp, dtype=dtype)))
    check_entries(cases, tmp_path, monkeypatch)
    plan, x, want = cases[0]
    bad = x.copy()
    bad.flat[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plan.entry()([bad], [np.empty_like(want)])
    with pytest.raises(ValueError, match="as prepared"):
        plan(np.zeros((2, 3, 5, 7), np.float32))
