"""Pooling (``kernels.conv.pool``) against the NumPy oracles, ONNX conformance and ONNX Runtime.

Max pools and the integer sums of average pools are exact, and the rescale follows
``kernels.reference.pool`` step by step, so every comparison with the oracle is bit
for bit. Float32 pools are compared with the float oracles below (max exactly, NaN
included; means to float32 rounding). The pools have no CPU-specific code (their
vector loops are generic LLVM IR); one test still runs them all under every
``LOWBIT_ISA`` level.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import kernels
from kernels.conv import pool as pool_module
from kernels.conv.geometry import resolve_pads
from kernels.conv.pool import (MAX_TAPS, avg_pool2d, avg_pool2d_float32, global_avg_pool2d, max_pool2d,
                                 max_pool2d_bits)
from kernels.pack.bits import pack_bits
from kernels.reference import pool as ref
from tests import conformance

DTYPES = (np.uint8, np.int8)
# (N, C, H, W): C = 1, 7, 65 and H, W = 1, 5, 14, batch 1 and 2
SHAPES = ((1, 7, 5, 14), (2, 65, 14, 5), (1, 1, 14, 14), (2, 7, 1, 5), (1, 65, 5, 1), (2, 1, 5, 5))
KERNELS = (1, 2, 3, (3, 2))
STRIDES = (1, 2, (1, 2))
DILATIONS = (1, 2)
PADS = (0, 1, (1, 0, 2, 1), "same", "same_lower")
ATTRIBUTES = list(itertools.product(KERNELS, STRIDES, DILATIONS, PADS, (False, True)))


def _attribute_id(attributes) -> str:
    def text(v):
        return v if isinstance(v, str) else "x".join(map(str, v)) if isinstance(v, tuple) else str(v)

    kernel, strides, dilations, pads, ceil_mode = attributes
    return f"k{text(kernel)}-s{text(strides)}-d{text(dilations)}-p{text(pads)}-ceil{int(ceil_mode)}"


def _name(dtype) -> str:
    return np.dtype(dtype).name


def _random(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _oracle_geometry(shape, kernel, strides, dilations, pads, ceil_mode):
    """``(resolved pads, error pattern or None)``: what the pool must do with this input and these attributes."""
    h, w = shape[2:]
    k, s, d = _pair(kernel), _pair(strides), _pair(dilations)
    p = resolve_pads(pads, (h, w), k, s, d)
    outs = [ref.pool_out_size(i, kk, ss, dd, p0, p1, ceil_mode)
            for i, kk, ss, dd, p0, p1 in zip((h, w), k, s, d, p[:2], p[2:])]
    if min(outs) < 1:
        return p, "smaller than the"
    for size, kk, ss, dd, p0, o in zip((h, w), k, s, d, p[:2], outs):
        taps = np.arange(o)[:, None] * ss + np.arange(kk) * dd - p0
        if not ((taps >= 0) & (taps < size)).any(axis=1).all():
            return p, "entirely in the padding"
    return p, None


def _cases(rng):
    """(x NCHW, dtype, layout) over SHAPES, alternating dtypes and layouts."""
    for i, shape in enumerate(SHAPES):
        dtype, layout = DTYPES[i % 2], ("NCHW", "NHWC")[(i // 2) % 2]
        yield _random(rng, dtype, shape), layout


def _to(layout, x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


# --- max pool ----------------------------------------------------------------------------------------------------

@pytest.fixture(params=["planes", "short-rows-transposed"])
def nchw_path(request, monkeypatch):
    """Run NCHW pools both ways: as planes, and (rows of at most 64 bytes, as in these tests) transposed."""
    if request.param == "planes":
        monkeypatch.setattr(pool_module, "SHORT_ROW_BYTES", 0)


@pytest.mark.parametrize("kernel,strides,dilations,pads,ceil_mode", ATTRIBUTES, ids=map(_attribute_id, ATTRIBUTES))
def test_max_pool_matches_oracle(rng, nchw_path, kernel, strides, dilations, pads, ceil_mode):
    attrs = dict(strides=strides, dilations=dilations, pads=pads, ceil_mode=ceil_mode)
    for x, layout in _cases(rng):
        p, error = _oracle_geometry(x.shape, kernel, strides, dilations, pads, ceil_mode)
        if error:
            with pytest.raises(ValueError, match=error):
                max_pool2d(_to(layout, x), kernel, layout=layout, **attrs)
            continue
        want = ref.max_pool2d_ref(x, _pair(kernel), _pair(strides), p, _pair(dilations), ceil_mode)
        got = max_pool2d(_to(layout, x), kernel, layout=layout, **attrs)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, _to(layout, want))


def test_max_pool_golden():
    x = np.array([[1, 9, 2], [3, 4, 8], [7, 5, 6]], np.int8).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(max_pool2d(x, 2)[0, 0], [[9, 9], [7, 8]])
    np.testing.assert_array_equal(max_pool2d(-x, 2, strides=2, pads=(0, 0, 1, 1), ceil_mode=True)[0, 0],
                                  [[-1, -2], [-5, -6]])  # padding is ignored, not read as 0


@pytest.mark.parametrize("channels", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("kernel,strides,dilations,pads,ceil_mode",
                         [(3, 2, 1, 1, False), (2, 1, 1, 0, False), ((3, 2), (1, 2), 2, "same", True),
                          (3, 1, 2, (1, 0, 2, 1), False), (2, 2, 1, "same_lower", True)])
def test_max_pool_bits_is_and_of_words(rng, channels, kernel, strides, dilations, pads, ceil_mode):
    signs = rng.choice(np.array([-1, 1], np.int8), size=(2, channels, 9, 6), p=[0.8, 0.2])  # all -1 windows occur
    p, _ = _oracle_geometry(signs.shape, kernel, strides, dilations, pads, ceil_mode)
    want = ref.max_pool2d_ref(signs, _pair(kernel), _pair(strides), p, _pair(dilations), ceil_mode)
    got = max_pool2d_bits(pack_bits(_to("NHWC", signs), axis=-1), kernel, strides=strides, pads=pads,
                          dilations=dilations, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(got, pack_bits(_to("NHWC", want), axis=-1))


# --- average pools -----------------------------------------------------------------------------------------------

def _quant(rng, dtype):
    info = np.iinfo(dtype)
    return (np.float32(rng.uniform(0.01, 0.1)), int(rng.integers(info.min, info.max + 1)),
            np.float32(rng.uniform(0.005, 0.1)), int(rng.integers(info.min, info.max + 1)))


@pytest.mark.parametrize("kernel,strides,dilations,pads,ceil_mode", ATTRIBUTES, ids=map(_attribute_id, ATTRIBUTES))
def test_avg_pool_matches_oracle(rng, kernel, strides, dilations, pads, ceil_mode):
    attrs = dict(strides=strides, dilations=dilations, pads=pads, ceil_mode=ceil_mode)
    for (x, layout), include in itertools.product(_cases(rng), (False, True)):
        q = _quant(rng, x.dtype)
        p, error = _oracle_geometry(x.shape, kernel, strides, dilations, pads, ceil_mode)
        if error and not (include and error == "entirely in the padding"):
            with pytest.raises(ValueError, match=error):
                avg_pool2d(_to(layout, x), kernel, *q, count_include_pad=include, layout=layout, **attrs)
            continue
        want = ref.avg_pool2d_ref(x, _pair(kernel), *q, _pair(strides), p, _pair(dilations), ceil_mode, include)
        got = avg_pool2d(_to(layout, x), kernel, *q, count_include_pad=include, layout=layout, **attrs)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, _to(layout, want))


def test_avg_pool_rounds_half_to_even_and_saturates():
    x = np.array([1, 2, 2, 3, 5, 6], np.uint8).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(avg_pool2d(x, (1, 2), 1.0, 0, 1.0, 0, strides=2).ravel(), [2, 2, 6])
    s = np.array([-1, -2, -3, -4], np.int8).reshape(1, 1, 1, 4)
    np.testing.assert_array_equal(avg_pool2d(s, (1, 2), 1.0, 0, 1.0, 0, strides=2).ravel(), [-2, -4])
    np.testing.assert_array_equal(avg_pool2d(s, (1, 2), 1.0, 0, 0.01, 0, strides=2).ravel(), [-128, -128])
    np.testing.assert_array_equal(avg_pool2d(x, (1, 2), 1.0, 0, 0.001, 0, strides=2).ravel(), [255, 255, 255])


def test_avg_pool_count_include_pad_counts_padding_as_zero_point():
    x = np.full((1, 1, 2, 2), 10, np.uint8)
    kw = dict(pads=1, strides=3)
    assert avg_pool2d(x, 3, 1.0, 4, 1.0, 0, **kw)[0, 0, 0, 0] == 6  # mean of four (10 - 4)
    assert avg_pool2d(x, 3, 1.0, 4, 1.0, 0, count_include_pad=True, **kw)[0, 0, 0, 0] == 3  # 24 / 9 = 2.67
    # a window wholly in the padding: undefined without count_include_pad, the zero point with it
    y = np.zeros((1, 1, 1, 1), np.uint8)
    with pytest.raises(ValueError, match="entirely in the padding"):
        avg_pool2d(y, 2, 1.0, 0, 1.0, 0, dilations=2, pads=1)
    assert avg_pool2d(y, 2, 1.0, 0, 1.0, 7, dilations=2, pads=1, count_include_pad=True).ravel().tolist() == [7]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 67, 3, 3), (1, 7, 5, 14), (2, 65, 14, 5), (2, 1024, 7, 7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_global_avg_pool_matches_oracle(rng, shape, dtype, layout):
    x = _random(rng, dtype, shape)
    q = _quant(rng, dtype)
    want = ref.global_avg_pool2d_ref(x, *q)
    got = global_avg_pool2d(_to(layout, x), *q, layout=layout)
    np.testing.assert_array_equal(got, _to(layout, want))
    # the same as an average pool whose window is the whole image
    np.testing.assert_array_equal(got, avg_pool2d(_to(layout, x), shape[2:], *q, layout=layout))


# --- float32 pools -----------------------------------------------------------------------------------------------

def _float_pool_ref(x, kernel, strides, pads, dilations, ceil_mode, op, include=False):
    """NumPy oracle of the float pools, NCHW: ``op`` "max" (``numpy.maximum`` over the taps inside ``x``, so a
    NaN anywhere in the window gives NaN, and padding is never a candidate) or "avg" (float64 sum over the taps
    inside ``x`` divided by their count, or by the taps inside the padded input with ``include``)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    oh = ref.pool_out_size(h, kh, sh, dh, top, bottom, ceil_mode)
    ow = ref.pool_out_size(w, kw, sw, dw, left, right, ceil_mode)
    ph = max((oh - 1) * sh + (kh - 1) * dh + 1, top + h + bottom)
    pw = max((ow - 1) * sw + (kw - 1) * dw + 1, left + w + right)
    values = np.zeros((n, c, ph, pw))
    values[:, :, top : top + h, left : left + w] = x
    real, padded = np.zeros((ph, pw), bool), np.zeros((ph, pw), bool)
    real[top : top + h, left : left + w] = True
    padded[: top + h + bottom, : left + w + right] = True
    best, total, count = np.full((n, c, oh, ow), -np.inf), 0.0, 0
    for ky in range(kh):
        for kx in range(kw):
            rows = slice(ky * dh, ky * dh + sh * (oh - 1) + 1, sh)
            cols = slice(kx * dw, kx * dw + sw * (ow - 1) + 1, sw)
            v, inside = values[:, :, rows, cols], real[rows, cols]
            best = np.where(inside, np.maximum(best, v), best)
            with np.errstate(invalid="ignore"):  # inf - inf in the sums of the max tests
                total = total + np.where(inside, v, 0)
            count = count + (padded if include else real)[rows, cols]
    return (best if op == "max" else total / count).astype(np.float32)


def _floats(rng, shape, special=False):
    """Normal float32 values; with ``special``, also some -inf, +inf and NaN."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if special:
        x[rng.random(shape) < 0.05] = -np.inf
        x[rng.random(shape) < 0.02] = np.inf
        x[rng.random(shape) < 0.03] = np.nan
    return x


def _float_cases(rng):
    """(x NCHW float32, layout) over SHAPES, alternating layouts."""
    for i, shape in enumerate(SHAPES):
        yield _floats(rng, shape), ("NCHW", "NHWC")[i % 2]


@pytest.mark.parametrize("kernel,strides,dilations,pads,ceil_mode", ATTRIBUTES, ids=map(_attribute_id, ATTRIBUTES))
def test_float_pools_match_oracle(rng, nchw_path, kernel, strides, dilations, pads, ceil_mode):
    attrs = dict(strides=strides, dilations=dilations, pads=pads, ceil_mode=ceil_mode)
    for (x, layout), include in zip(_float_cases(rng), itertools.cycle((False, True))):
        p, error = _oracle_geometry(x.shape, kernel, strides, dilations, pads, ceil_mode)
        args = (_pair(kernel), _pair(strides), p, _pair(dilations), ceil_mode)
        if error:
            with pytest.raises(ValueError, match=error):
                max_pool2d(_to(layout, x), kernel, layout=layout, **attrs)
            if not (include and error == "entirely in the padding"):
                with pytest.raises(ValueError, match=error):
                    avg_pool2d_float32(_to(layout, x), kernel, count_include_pad=include, layout=layout, **attrs)
                continue
        else:
            got = max_pool2d(_to(layout, x), kernel, layout=layout, **attrs)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, _to(layout, _float_pool_ref(x, *args, "max")))
        got = avg_pool2d_float32(_to(layout, x), kernel, count_include_pad=include, layout=layout, **attrs)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, _to(layout, _float_pool_ref(x, *args, "avg", include)), rtol=1e-5,
                                   atol=1e-6)


# Row lengths around the 16-float vectors and their tails, wide kernels (more than three taps per pass),
# strides 3 (phases without the two-phase shortcut), large pads and dilations.
WIDE_CASES = [((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), ((5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),
              ((4, 7), (3, 3), (1, 3, 2, 0), (1, 1)), ((2, 3), (2, 3), (1, 1, 0, 2), (3, 2)),
              ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1)), ((7, 1), (1, 1), (3, 0, 3, 0), (1, 1))]


@pytest.mark.parametrize("width", [1, 7, 16, 17, 63, 65])
@pytest.mark.parametrize("kernel,strides,pads,dilations", WIDE_CASES)
def test_float_pools_wide_rows(rng, width, kernel, strides, pads, dilations):
    x = _floats(rng, (2, 3, 9, width), special=True)
    if ref.pool_out_size(width, kernel[1], strides[1], dilations[1], pads[1], pads[3], True) < 1:
        return
    for layout, ceil_mode in (("NCHW", False), ("NHWC", True)):
        _, error = _oracle_geometry(x.shape, kernel, strides, dilations, pads, ceil_mode)
        if error:
            continue
        attrs = dict(strides=strides, pads=pads, dilations=dilations, ceil_mode=ceil_mode, layout=layout)
        args = (kernel, strides, pads, dilations, ceil_mode)
        np.testing.assert_array_equal(max_pool2d(_to(layout, x), kernel, **attrs),
                                      _to(layout, _float_pool_ref(x, *args, "max")))
        np.testing.assert_array_equal(max_pool2d(_to(layout, x[:, :, :, ::-1].copy()).astype(np.float32), kernel,
                                                 **attrs), _to(layout, _float_pool_ref(x[:, :, :, ::-1], *args, "max")))
        finite = np.nan_to_num(x, nan=0.5, posinf=2.0, neginf=-2.0)
        for include in (False, True):
            np.testing.assert_allclose(avg_pool2d_float32(_to(layout, finite), kernel, count_include_pad=include,
                                                          **attrs),
                                       _to(layout, _float_pool_ref(finite, *args, "avg", include)), rtol=1e-5,
                                       atol=1e-6)
        codes = _random(rng, np.int8, x.shape)
        np.testing.assert_array_equal(max_pool2d(_to(layout, codes), kernel, **attrs),
                                      _to(layout, ref.max_pool2d_ref(codes, kernel, strides, pads, dilations,
                                                                     ceil_mode)))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_float_max_pool_nan_and_infinities(layout):
    """-inf inputs stay -inf (padding never wins); a NaN anywhere in a window makes that output NaN."""
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    got = max_pool2d(_to(layout, x), 3, strides=2, pads=1, layout=layout)
    assert np.all(got == -np.inf) and got.size == 4
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan  # in the windows of outputs (0, 0), (0, 1), (1, 0), (1, 1) of 3x3/1 with pads 1...
    x[0, 0, 3, 3] = np.inf
    got = max_pool2d(_to(layout, x), 3, pads=1, layout=layout)
    got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
    want = _float_pool_ref(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, "max")
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[0, 0, :3, :3]).all() and not np.isnan(got[0, 0, 3]).any()  # ... whatever the tap order
    assert got[0, 0, 3, 3] == np.inf
    # every position of the NaN in a 3x3 window, and a NaN window next to an infinite one
    for pos in range(9):
        x = np.zeros((1, 1, 3, 3), np.float32)
        x.flat[pos] = np.nan
        assert np.isnan(max_pool2d(_to(layout, x), 3, layout=layout)).all()
    avg = avg_pool2d_float32(_to(layout, x), 3, layout=layout)
    assert np.isnan(avg).all()  # a sum with a NaN is NaN


def test_float_out_and_strided_input(rng):
    x = _floats(rng, (2, 7, 9, 6))
    for layout in ("NCHW", "NHWC"):
        xl = _to(layout, x)
        for fn in (max_pool2d, avg_pool2d_float32):
            want = fn(xl, 3, strides=2, pads="same", layout=layout)
            out = np.empty_like(want)
            assert fn(xl, 3, strides=2, pads="same", layout=layout, out=out) is out
            np.testing.assert_array_equal(out, want)
    view = x[:, ::2, :, 1:]
    np.testing.assert_array_equal(max_pool2d(view, (2, 3)), max_pool2d(np.ascontiguousarray(view), (2, 3)))
    frozen = x.copy()
    frozen.flags.writeable = False  # short NCHW rows are pooled as planes then, not transposed
    np.testing.assert_array_equal(max_pool2d(frozen, 3, strides=2), max_pool2d(x, 3, strides=2))
    np.testing.assert_array_equal(avg_pool2d_float32(frozen, 3, pads=1), avg_pool2d_float32(x, 3, pads=1))
    with pytest.raises(TypeError, match="out: expected dtype float32, got float64"):
        max_pool2d(x, 2, out=np.empty((2, 7, 8, 5)))
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 8, 5, 7\), got \(2, 7, 8, 5\)"):
        avg_pool2d_float32(_to("NHWC", x), 2, layout="NHWC", out=np.empty((2, 7, 8, 5), np.float32))
    xh = _to("NHWC", x)
    with pytest.raises(ValueError, match="out: must not overlap the input"):
        avg_pool2d_float32(xh, 1, layout="NHWC", out=xh)
    with pytest.raises(TypeError, match="count_include_pad: expected a bool"):
        avg_pool2d_float32(x, 2, count_include_pad=None)


# --- layouts, out=, threads, levels ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_out_is_filled_and_returned(rng, layout):
    x = _random(rng, np.int8, (2, 7, 9, 6))
    q = _quant(rng, np.int8)
    xl = _to(layout, x)
    for fn, args in ((max_pool2d, ()), (avg_pool2d, q)):
        want = fn(xl, 3, *args, strides=2, pads="same", layout=layout)
        out = np.empty_like(want)
        assert fn(xl, 3, *args, strides=2, pads="same", layout=layout, out=out) is out
        np.testing.assert_array_equal(out, want)
    want = global_avg_pool2d(xl, *q, layout=layout)
    out = np.empty_like(want)
    assert global_avg_pool2d(xl, *q, layout=layout, out=out) is out
    np.testing.assert_array_equal(out, want)
    bits = pack_bits(_to("NHWC", x), axis=-1)
    out = np.empty((2, 5, 3, 1), np.uint64)
    assert max_pool2d_bits(bits, 3, strides=2, pads=1, out=out) is out


def test_strided_input_is_accepted(rng):
    x = _random(rng, np.uint8, (2, 9, 8, 12))
    view = x[:, ::2, :, 1:]
    want = ref.max_pool2d_ref(np.ascontiguousarray(view), (2, 3), (1, 1), (0, 0, 0, 0), (1, 1), False)
    np.testing.assert_array_equal(max_pool2d(view, (2, 3)), want)
    q = _quant(rng, np.uint8)
    np.testing.assert_array_equal(global_avg_pool2d(view, *q), ref.global_avg_pool2d_ref(view, *q))


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_rows(rng, monkeypatch, threads):
    monkeypatch.setattr(kernels.threads, "_setting", threads)
    x = _random(rng, np.uint8, (2, 64, 56, 56))
    q = _quant(rng, np.uint8)
    want = ref.max_pool2d_ref(x, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False)
    np.testing.assert_array_equal(max_pool2d(x, 3, strides=2, pads=1), want)
    want = ref.avg_pool2d_ref(x, (3, 3), *q, (1, 1), (1, 1, 1, 1), (1, 1), False, True)
    np.testing.assert_array_equal(avg_pool2d(x, 3, *q, pads=1, count_include_pad=True), want)
    x = _random(rng, np.uint8, (64, 256, 7, 7))
    np.testing.assert_array_equal(global_avg_pool2d(x, *q), ref.global_avg_pool2d_ref(x, *q))
    f = _floats(rng, (2, 64, 56, 56))
    for layout in ("NCHW", "NHWC"):
        want = _float_pool_ref(f, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False, "max")
        np.testing.assert_array_equal(max_pool2d(_to(layout, f), 3, strides=2, pads=1, layout=layout),
                                      _to(layout, want))
        want = _float_pool_ref(f, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, "avg", True)
        np.testing.assert_allclose(avg_pool2d_float32(_to(layout, f), 3, pads=1, count_include_pad=True,
                                                      layout=layout), _to(layout, want), rtol=1e-5, atol=1e-6)


def test_every_level(level, rng):
    x = _random(rng, np.uint8, (1, 65, 7, 5))
    q = _quant(rng, np.uint8)
    np.testing.assert_array_equal(max_pool2d(x, 3, pads=1),
                                  ref.max_pool2d_ref(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False))
    np.testing.assert_array_equal(avg_pool2d(x, 2, *q), ref.avg_pool2d_ref(x, (2, 2), *q))
    np.testing.assert_array_equal(global_avg_pool2d(x, *q), ref.global_avg_pool2d_ref(x, *q))
    signs = np.where(x > 128, -1, 1).astype(np.int8)
    np.testing.assert_array_equal(max_pool2d_bits(pack_bits(_to("NHWC", signs), axis=-1), 2),
                                  pack_bits(_to("NHWC", ref.max_pool2d_ref(signs, (2, 2))), axis=-1))
    f = _floats(rng, (1, 65, 7, 5), special=True)
    for layout in ("NCHW", "NHWC"):
        np.testing.assert_array_equal(max_pool2d(_to(layout, f), 3, strides=2, pads=1, layout=layout),
                                      _to(layout, _float_pool_ref(f, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False,
                                                                  "max")))
        finite = np.nan_to_num(f, nan=0.0, posinf=1.0, neginf=-1.0)
        np.testing.assert_allclose(avg_pool2d_float32(_to(layout, finite), 2, layout=layout),
                                   _to(layout, _float_pool_ref(finite, (2, 2), (1, 1), (0, 0, 0, 0), (1, 1), False,
                                                               "avg")), rtol=1e-5, atol=1e-6)


# --- bad inputs --------------------------------------------------------------------------------------------------

def test_bad_inputs(rng):
    x = _random(rng, np.uint8, (1, 3, 5, 5))
    q = (0.1, 0, 0.1, 0)
    with pytest.raises(TypeError, match="x: expected dtype uint8 or int8 or float32, got float64"):
        max_pool2d(x.astype(np.float64), 2)
    with pytest.raises(TypeError, match="x: expected dtype uint8 or int8, got float32"):
        avg_pool2d(x.astype(np.float32), 2, *q)
    with pytest.raises(TypeError, match="x: expected dtype float32, got uint8"):
        avg_pool2d_float32(x, 2)
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray"):
        avg_pool2d_float32(x.tolist(), 2)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        avg_pool2d_float32(x[0].astype(np.float32), 2)
    with pytest.raises(ValueError, match="entirely in the padding"):
        avg_pool2d_float32(x.astype(np.float32), 2, pads=2)
    with pytest.raises(TypeError, match="x: expected dtype uint8 or int8, got int16"):
        avg_pool2d(x.astype(np.int16), 2, *q)
    with pytest.raises(TypeError, match="x: expected dtype uint8 or int8, got uint64"):
        global_avg_pool2d(x.astype(np.uint64), *q)
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray"):
        max_pool2d(x.tolist(), 2)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        max_pool2d(x[0], 2)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        global_avg_pool2d(x[0], *q)
    with pytest.raises(ValueError, match="x: expected non-empty images"):
        global_avg_pool2d(x[:, :, :0], *q)
    with pytest.raises(ValueError, match="layout: expected 'NCHW' or 'NHWC'"):
        max_pool2d(x, 2, layout="NCWH")
    with pytest.raises(ValueError, match="layout"):
        global_avg_pool2d(x, *q, layout="nhwc")
    with pytest.raises(ValueError, match="smaller than the 7x7 kernel"):
        max_pool2d(x, 7, pads=(1, 1, 0, 0))
    with pytest.raises(ValueError, match="kernel_shape: expected values >= 1"):
        max_pool2d(x, (0, 2))
    with pytest.raises(TypeError, match="kernel_shape: expected an int or a pair"):
        max_pool2d(x, (2, 2, 2))
    with pytest.raises(ValueError, match="strides: expected values >= 1"):
        max_pool2d(x, 2, strides=0)
    with pytest.raises(TypeError, match="strides: expected an int or a pair"):
        avg_pool2d(x, 2, *q, strides=(1.5, 1))
    with pytest.raises(ValueError, match="dilations: expected values >= 1"):
        max_pool2d(x, 2, dilations=(1, 0))
    with pytest.raises(ValueError, match="pads: expected values >= 0"):
        max_pool2d(x, 2, pads=(0, -1, 0, 0))
    with pytest.raises(ValueError, match="pads: expected 4 ints"):
        max_pool2d(x, 2, pads="same_upper_left")
    with pytest.raises(TypeError, match="ceil_mode: expected a bool"):
        max_pool2d(x, 2, ceil_mode=2)
    with pytest.raises(TypeError, match="count_include_pad: expected a bool"):
        avg_pool2d(x, 2, *q, count_include_pad="yes")
    with pytest.raises(ValueError, match="entirely in the padding"):
        max_pool2d(x, 2, pads=2)


def test_bad_quantization(rng):
    x = _random(rng, np.int8, (1, 3, 5, 5))
    for bad, match in (((0.0, 0, 0.1, 0), "x_scale: expected a finite positive scale"),
                       ((0.1, 0, float("nan"), 0), "y_scale: expected a finite positive scale"),
                       ((np.ones(2), 0, 0.1, 0), "x_scale: expected a scalar"),
                       ((0.1, 200, 0.1, 0), "x_zero_point: values must lie in \\[-128, 127\\]"),
                       ((0.1, 0, 0.1, -129), "y_zero_point: values must lie in \\[-128, 127\\]")):
        with pytest.raises(ValueError, match=match):
            avg_pool2d(x, 2, *bad)
        with pytest.raises(ValueError, match=match):
            global_avg_pool2d(x, *bad)
    with pytest.raises(TypeError, match="x_zero_point: expected an integer"):
        avg_pool2d(x, 2, 0.1, 1.5, 0.1, 0)
    with pytest.raises(TypeError, match="y_scale: expected a real scalar"):
        global_avg_pool2d(x, 0.1, 0, "0.1", 0)
    with pytest.raises(ValueError, match=f"at most {MAX_TAPS} pixels"):
        global_avg_pool2d(np.zeros((1, 1, 1, MAX_TAPS + 1), np.uint8), 0.1, 0, 0.1, 0)


def test_bad_bits_and_out(rng):
    x = _random(rng, np.uint8, (1, 3, 5, 5))
    bits = pack_bits(_to("NHWC", x.astype(np.int8)), axis=-1)
    with pytest.raises(TypeError, match="x_bits: expected dtype uint64, got uint8"):
        max_pool2d_bits(_to("NHWC", x), 2)
    with pytest.raises(ValueError, match="x_bits: expected a 4-D array"):
        max_pool2d_bits(bits[0], 2)
    with pytest.raises(ValueError, match="x_bits: expected a C-contiguous array"):
        max_pool2d_bits(bits[:, :, ::2], 2)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 4, 4, 1\), got \(1, 1, 4, 4\)"):
        max_pool2d_bits(bits, 2, out=np.empty((1, 1, 4, 4), np.uint64))
    with pytest.raises(TypeError, match="out: expected dtype uint8, got int8"):
        max_pool2d(x, 2, out=np.empty((1, 3, 4, 4), np.int8))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 3, 4, 4\)"):
        max_pool2d(x, 2, out=np.empty((1, 4, 4, 3), np.uint8))  # NHWC out for an NCHW call
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 1, 1, 3\)"):
        global_avg_pool2d(_to("NHWC", x), 0.1, 0, 0.1, 0, layout="NHWC", out=np.empty((1, 3, 1, 1), np.uint8))
    with pytest.raises(ValueError, match="out: the array is read-only"):
        out = np.empty((1, 3, 4, 4), np.uint8)
        out.flags.writeable = False
        max_pool2d(x, 2, out=out)
    xh = _to("NHWC", x)
    with pytest.raises(ValueError, match="out: must not overlap the input"):
        max_pool2d(xh, 1, layout="NHWC", out=xh)
    with pytest.raises(ValueError, match="out: must not overlap the input"):
        global_avg_pool2d(x, 0.1, 0, 0.1, 0, out=x.reshape(-1)[:3].reshape(1, 3, 1, 1))


# --- ONNX conformance --------------------------------------------------------------------------------------------

AUTO_PAD = {"SAME_UPPER": "same", "SAME_LOWER": "same_lower", "VALID": "valid"}


def _is_2d(param) -> bool:
    name = param.values[0]
    return name is None or ("_2d_" in name and "argmax" not in name) or name.startswith("test_globalaveragepool")


def _onnx_attributes(attrs: dict) -> dict:
    auto_pad = attrs.get("auto_pad", "NOTSET")
    return dict(strides=tuple(attrs.get("strides", (1, 1))), dilations=tuple(attrs.get("dilations", (1, 1))),
                ceil_mode=bool(attrs.get("ceil_mode", 0)),
                pads=AUTO_PAD[auto_pad] if auto_pad != "NOTSET" else tuple(attrs.get("pads", (0, 0, 0, 0))))


def _quantize(x, scale):
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8)


@pytest.mark.parametrize("name", [p for p in conformance.params("MaxPool") if _is_2d(p)])
def test_onnx_maxpool(name):
    """Exact: max commutes with the monotone quantizer, so pooling the codes gives the codes of ONNX's result."""
    case = conformance.load_case(name)
    (x,), (want,) = case.inputs, case.outputs
    kw = _onnx_attributes(case.attributes)
    if x.dtype == np.uint8:
        got = max_pool2d(x, tuple(case.attributes["kernel_shape"]), **kw)
        np.testing.assert_array_equal(got, want)
        return
    np.testing.assert_array_equal(max_pool2d(x, tuple(case.attributes["kernel_shape"]), **kw), want)  # float32
    scale = float(np.abs(x).max()) / 127
    got = max_pool2d(_quantize(x, scale), tuple(case.attributes["kernel_shape"]), **kw)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, _quantize(want, scale))


@pytest.mark.parametrize("name", [p for p in conformance.params("AveragePool", "GlobalAveragePool") if _is_2d(p)])
def test_onnx_averagepool(name):
    """Shapes exact; values within the quantization error: ``scale / 2`` in, half an output step out."""
    case = conformance.load_case(name)
    (x,), (want,) = case.inputs, case.outputs
    scale = float(np.abs(x).max()) / 127
    q = _quantize(x, scale)
    if case.op == "GlobalAveragePool":
        got = global_avg_pool2d(q, scale, 0, scale, 0)
    else:
        kw = dict(count_include_pad=bool(case.attributes.get("count_include_pad", 0)),
                  **_onnx_attributes(case.attributes))
        got = avg_pool2d(q, tuple(case.attributes["kernel_shape"]), scale, 0, scale, 0, **kw)
        np.testing.assert_allclose(avg_pool2d_float32(x, tuple(case.attributes["kernel_shape"]), **kw), want,
                                   rtol=1e-5, atol=1e-4)  # some expected outputs are stored to 4 decimals
    assert got.shape == want.shape
    np.testing.assert_allclose(got * scale, want, rtol=0, atol=scale * (1 + 1e-6))


def test_ceil_mode_overhang_counts_as_onnx_reference(rng):
    """With ceil_mode and count_include_pad, taps past the padded input do not count (ONNX's reference;
    ORT's QLinearAveragePool divides by KH * KW there, its float AveragePool agrees with this)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    x = _random(rng, np.uint8, (1, 3, 6, 6))
    attrs = dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=1, count_include_pad=1)
    graph = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    want = np.rint(ReferenceEvaluator(model).run(None, {"x": x.astype(np.float32)})[0])  # means are k / count
    got = avg_pool2d(x, 3, 1.0, 0, 1.0, 0, strides=2, pads=1, ceil_mode=True, count_include_pad=True)
    assert got.shape == (1, 3, 4, 4)  # the last row and column of windows overhang the padding
    np.testing.assert_array_equal(got, want)


# --- ONNX Runtime ------------------------------------------------------------------------------------------------

def _ort_run(node, x, initializers=()):
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", elem, list(x.shape))],
                              [helper.make_tensor_value_info("y", elem, None)],
                              initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in initializers])
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


ORT_CASES = [  # (kernel, strides, pads, dilations, ceil_mode, count_include_pad); ORT needs pads < kernel
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False, False),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False, True),
    ((2, 2), (1, 1), (0, 0, 0, 0), (1, 1), False, False),
    ((3, 2), (1, 2), (0, 1, 2, 0), (1, 1), True, False),
    ((3, 3), (2, 1), (2, 0, 1, 2), (1, 1), False, True),
    ((2, 3), (2, 2), (1, 1, 1, 1), (2, 1), True, False),
]


ORT_UNDILATED = [c for c in ORT_CASES if c[3] == (1, 1)]  # QLinearAveragePool has no dilations


def _case_id(case) -> str:
    kernel, strides, pads, dilations, ceil_mode, include = case
    return (f"k{kernel[0]}x{kernel[1]}-s{strides[0]}x{strides[1]}-p{''.join(map(str, pads))}"
            f"-d{dilations[0]}x{dilations[1]}-ceil{int(ceil_mode)}-inc{int(include)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("kernel,strides,pads,dilations,ceil_mode,include", ORT_CASES, ids=map(_case_id, ORT_CASES))
def test_matches_onnxruntime_maxpool(rng, dtype, kernel, strides, pads, dilations, ceil_mode, include):
    from onnx import helper

    x = _random(rng, dtype, (2, 7, 13, 10))
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=kernel, strides=strides, pads=pads,
                            dilations=dilations, ceil_mode=int(ceil_mode))
    got = max_pool2d(x, kernel, strides=strides, pads=pads, dilations=dilations, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(got, _ort_run(node, x))


def _qlinear_inputs(q, dtype):
    xs, xz, ys, yz = q
    return [("xs", np.float32(xs)), ("xz", dtype(xz)), ("ys", np.float32(ys)), ("yz", dtype(yz))]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kernel,strides,pads,dilations,ceil_mode,include", ORT_UNDILATED,
                         ids=map(_case_id, ORT_UNDILATED))
def test_matches_onnxruntime_qlinear_average_pool(rng, dtype, layout, kernel, strides, pads, dilations, ceil_mode,
                                                  include):
    """Equal but for float32 rounding in ORT: at most 1 apart, and rarely (ORT has no dilations)."""
    from onnx import helper

    x = _random(rng, dtype, (2, 13, 10, 7) if layout == "NHWC" else (2, 7, 13, 10))
    q = _quant(rng, dtype)
    node = helper.make_node("QLinearAveragePool", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft",
                            kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=int(ceil_mode),
                            count_include_pad=int(include), channels_last=int(layout == "NHWC"))
    want = _ort_run(node, x, _qlinear_inputs(q, dtype))
    got = avg_pool2d(x, kernel, *q, strides=strides, pads=pads, ceil_mode=ceil_mode, count_include_pad=include,
                     layout=layout)
    diff = np.abs(got.astype(np.int64) - want)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= max(2, diff.size // 100)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("hw", [(1, 1), (3, 3), (7, 7), (5, 13)])
def test_matches_onnxruntime_qlinear_global_average_pool(rng, dtype, layout, hw):
    """Exact sums in both; ORT rescales in float32, so at most 1 apart, and rarely."""
    from onnx import helper

    x = _random(rng, dtype, (2, *hw, 67) if layout == "NHWC" else (2, 67, *hw))
    q = _quant(rng, dtype)
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft",
                            channels_last=int(layout == "NHWC"))
    want = _ort_run(node, x, _qlinear_inputs(q, dtype))
    got = global_avg_pool2d(x, *q, layout=layout)
    diff = np.abs(got.astype(np.int64) - want)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= max(2, diff.size // 100)


@pytest.mark.parametrize("kernel,strides,pads,dilations,ceil_mode,include", ORT_CASES, ids=map(_case_id, ORT_CASES))
def test_matches_onnxruntime_float_pools(rng, kernel, strides, pads, dilations, ceil_mode, include):
    """Float32 MaxPool equal, AveragePool to float32 rounding (no NaN: ORT keeps a NaN only where it is the
    last tap its loop reads, see ``max_pool2d``). Opset 13's AveragePool has no dilations."""
    from onnx import helper

    x = _floats(rng, (2, 7, 13, 10))
    attrs = dict(kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=int(ceil_mode))
    got = max_pool2d(x, kernel, strides=strides, pads=pads, dilations=dilations, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(got, _ort_run(helper.make_node("MaxPool", ["x"], ["y"], dilations=dilations,
                                                                 **attrs), x))
    if dilations == (1, 1):
        got = avg_pool2d_float32(x, kernel, strides=strides, pads=pads, ceil_mode=ceil_mode, count_include_pad=include)
        want = _ort_run(helper.make_node("AveragePool", ["x"], ["y"], count_include_pad=int(include), **attrs), x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pool_plans_and_entries(rng, tmp_path, monkeypatch):
    from kernels.conv.pool import avg_pool2d_float32_plan, global_avg_pool2d_plan, max_pool2d_plan
    from tests.kernels.test_int4 import check_entries

    cases = []
    for n, c, h, w in [(1, 3, 7, 7), (2, 5, 3, 3), (1, 8, 40, 33)]:  # NCHW rows transposed or not
        for layout in ("NCHW", "NHWC"):
            shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
            for dtype in (np.float32, np.uint8, np.int8):
                x = (rng.standard_normal(shape) * 50).astype(dtype)
                if dtype == np.float32:
                    x[0, 0, 0, 0] = -np.inf  # the identity of max is -inf, bound as an array
                window = dict(kernel_shape=(3, 2), strides=2, pads=1, layout=layout)
                cases.append((max_pool2d_plan(shape, dtype, **window), x, kernels.max_pool2d(x, **window)))
                if dtype == np.float32:
                    cases.append((avg_pool2d_float32_plan(shape, **window), x, kernels.avg_pool2d_float32(x, **window)))
                else:
                    q = (0.02, 3, 0.03, 5 if dtype == np.uint8 else -2)
                    cases.append((global_avg_pool2d_plan(shape, dtype, *q, layout=layout), x,
                                  kernels.global_avg_pool2d(x, *q, layout=layout)))
    check_entries(cases, tmp_path, monkeypatch)
