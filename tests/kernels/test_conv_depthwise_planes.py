"""Depthwise NCHW plans on kernels.conv.depthwise_planes, against the NumPy oracle and finish_ref, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu
from kernels.conv.depthwise import DepthwisePlan, pack_depthwise
from kernels.conv.geometry import conv_geometry
from kernels.epilogue import INTEGER, SINGLE_MARGIN_UNIT, Epilogue, single_precision_codes
from kernels.gemm.int8 import fused_epilogue
from kernels.reference.conv import conv2d_ref
from kernels.reference.int8 import finish_ref
from tests.levels import level_fixture

level = level_fixture("conv_depthwise", "conv_depthwise_nchw")


@pytest.fixture(autouse=True)
def planes_on_small_planes(monkeypatch):
    """The planes kernel on every plane size, even those its dispatch leaves to the NHWC kernel for speed."""
    monkeypatch.setattr("kernels.conv.depthwise.PLANES_MIN_PIXELS", 0)


def _random(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _quant(c, a_scale=0.02, w_scale=None, bias=None, activation=None, out_dtype=np.uint8, out_scale=0.3,
           out_zero_point=7, rng=None):
    """finish_ref arguments of a quantized epilogue (per-channel weight scales unless given)."""
    if w_scale is None:
        w_scale = rng.uniform(0.001, 0.02, c).astype(np.float32)
    return dict(a_scale=a_scale, w_scale=w_scale, bias=bias, activation=activation, out_dtype=out_dtype,
                out_scale=out_scale, out_zero_point=out_zero_point)


def _check(level, x, w, zx, zw, args, pads, expect_planes=True):
    """One NCHW plan, run twice, against the oracle; on VNNI it must be the planes kernel."""
    n, c, h, wd = x.shape
    k = w.shape[2:]
    geo = conv_geometry((n, h, wd, c), k, 1, c, pads=pads, group=c)
    epi, out_dtype = fused_epilogue(c, args["a_scale"], args["w_scale"], args["bias"], args["activation"],
                                    args["out_dtype"], args["out_scale"], args["out_zero_point"])
    plan = DepthwisePlan(geo, pack_depthwise(w, zw), x.dtype, zx, epi, "NCHW")
    planes = level == cpu.AVX512_VNNI and expect_planes
    assert (plan.kind == "avx512-vnni-planes") == planes, plan.kind
    acc = conv2d_ref(x, w, x_zero_point=zx, w_zero_point=zw, pads=geo.pads, group=c)
    expected = finish_ref(acc.transpose(0, 2, 3, 1).reshape(-1, c), **args)
    expected = expected.reshape(n, geo.out_h, geo.out_w, c).transpose(0, 3, 1, 2)
    for _ in range(2):  # the scratch planes are reused: a second call must not see the first
        out = np.full((n, c, geo.out_h, geo.out_w), 99, out_dtype)
        assert plan(x, out) is out
        np.testing.assert_array_equal(out, expected)
    return plan


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("pads", [0, 1, 2, (0, 1, 2, 1), (2, 0, 1, 3), "same"], ids=str)
@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (13, 31), (5, 33), (6, 63), (3, 65), (2, 130)], ids=str)
def test_shapes(level, rng, k, pads, hw):
    """Planes narrower and wider than one 32- and 64-byte copy, every padding, ragged last chunks."""
    h, w = hw
    pad = (pads,) * 4 if isinstance(pads, int) else pads
    if pads != "same" and (h + pad[0] + pad[2] < k or w + pad[1] + pad[3] < k):
        return  # no output
    c = 7
    x = _random(rng, np.uint8, (1, c, h, w))
    wt = _random(rng, np.int8, (c, 1, k, k)).clip(-120, 120)
    _check(level, x, wt, 131, 4, _quant(c, rng=rng), pads)


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8], ids=str)
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8], ids=str)
@pytest.mark.parametrize("c", [1, 16, 65])
def test_dtypes_and_channels(level, rng, x_dtype, out_dtype, c):
    x = _random(rng, x_dtype, (2, c, 11, 9))
    w = _random(rng, np.int8, (c, 1, 3, 3))
    zx = int(_random(rng, x_dtype, ()))
    args = _quant(c, out_dtype=out_dtype, out_zero_point=-3 if out_dtype == np.int8 else 130, rng=rng)
    _check(level, x, w, zx, 0, args, "same")


@pytest.mark.parametrize("case", ["float_bias", "int_bias_relu6", "relu_per_tensor"])
def test_epilogues(level, rng, case):
    """A float bias (a shift), an int32 bias with ReLU6 (narrow codes), ReLU with per-tensor scales."""
    c = 40
    x = _random(rng, np.uint8, (1, c, 14, 14))
    w = _random(rng, np.int8, (c, 1, 5, 5)) // 2
    args = {
        "float_bias": _quant(c, bias=rng.normal(0, 5, c).astype(np.float32), activation="relu", rng=rng),
        "int_bias_relu6": _quant(c, bias=rng.integers(-5000, 5000, c).astype(np.int32), activation="relu6",
                                 out_dtype=np.int8, out_scale=0.05, out_zero_point=-3, rng=rng),
        "relu_per_tensor": _quant(c, w_scale=np.float32(0.01), activation="relu", out_zero_point=0),
    }[case]
    _check(level, x, w, 100, -2, args, 2)


@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8], ids=str)
def test_ties(level, rng, out_dtype):
    """Power-of-two scales: every 256th sum is an exact tie, which float32 cannot settle, so float64 does."""
    c = 20
    x = _random(rng, np.uint8, (1, c, 28, 28))
    w = _random(rng, np.int8, (c, 1, 3, 3)) // 4
    args = _quant(c, a_scale=2.0**-4, w_scale=np.float32(2.0**-3), out_dtype=out_dtype, out_scale=2.0**1,
                  out_zero_point=0 if out_dtype == np.int8 else 128)
    acc = conv2d_ref(x, w, x_zero_point=128, pads=(1, 1, 1, 1), group=c)
    assert np.count_nonzero(acc % 256 == 128) > 20  # y / 256 is a tie there
    _check(level, x, w, 128, 0, args, 1)


def test_float64_everywhere(level, rng):
    """A multiplier so large that float32 is never exact enough: every chunk goes in float64."""
    c = 9
    x = _random(rng, np.uint8, (1, c, 9, 9))
    x[:, :, 3:6, 3:6] = 100  # some outputs near the zero point, not all saturated
    w = _random(rng, np.int8, (c, 1, 3, 3))
    args = _quant(c, a_scale=8.0, w_scale=np.float32(8.0), out_scale=1.0, out_zero_point=128)
    _check(level, x, w, 100, 0, args, 1)


@pytest.fixture
def two_threads():
    kernels.set_num_threads(2)
    yield
    kernels.set_num_threads(1)


def test_threads(level, rng, two_threads):
    c = 48
    x = _random(rng, np.int8, (3, c, 30, 30))
    w = _random(rng, np.int8, (c, 1, 3, 3)).clip(-120, 120)
    _check(level, x, w, -7, 1, _quant(c, rng=rng), 1)


def test_where_it_does_not_apply(level, rng):
    """Stride 2, dilation, a 4x4 kernel, w - w_zp past int8, an int32 or float32 output: another kernel."""
    c = 8
    w = _random(rng, np.int8, (c, 1, 3, 3))
    w[0, 0, 0, 0] = -128
    packed = pack_depthwise(w)
    epi = fused_epilogue(c, 0.02, 0.01, None, None, np.uint8, 0.3, 7)[0]

    def kind(geo_args, epi=epi, packed=packed):
        geo = conv_geometry((1, 9, 9, c), packed.kernel_hw, 1, c, group=c, **geo_args)
        return DepthwisePlan(geo, packed, np.uint8, 0, epi, "NCHW").kind

    assert kind(dict(pads=1)) == ("avx512-vnni-planes" if level == cpu.AVX512_VNNI else "generic")
    assert kind(dict(pads=1, strides=2)) != "avx512-vnni-planes"
    assert kind(dict(pads=2, dilations=2)) != "avx512-vnni-planes"
    assert kind(dict(pads=1), packed=pack_depthwise(_random(rng, np.int8, (c, 1, 4, 4)))) != "avx512-vnni-planes"
    assert kind(dict(pads=1), packed=pack_depthwise(w, 1)) != "avx512-vnni-planes"  # -128 - 1
    assert kind(dict(pads=1), epi=Epilogue(INTEGER)) != "avx512-vnni-planes"
    real = fused_epilogue(c, 0.02, 0.01, None, None, np.float32, None, None)[0]
    assert kind(dict(pads=1), epi=real) != "avx512-vnni-planes"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.integers(1, 40), h=st.integers(1, 20), w=st.integers(1, 70), k=st.sampled_from([3, 5]),
       pads=st.tuples(*[st.integers(0, 3)] * 4), signed=st.booleans(), signed_out=st.booleans(),
       scale_exp=st.integers(-12, 0), seed=st.integers(0, 2**32 - 1))
def test_property(level, c, h, w, k, pads, signed, signed_out, scale_exp, seed):
    """Random planes, paddings and dtypes; scales a power of two (many ties) or not."""
    rng = np.random.default_rng(seed)
    if h + pads[0] + pads[2] < k or w + pads[1] + pads[3] < k:
        return  # no output
    dtype = np.int8 if signed else np.uint8
    x = _random(rng, dtype, (2, c, h, w))
    wt = _random(rng, np.int8, (c, 1, k, k)).clip(-100, 100)
    w_scale = np.float32(2.0**scale_exp) if seed % 2 else rng.uniform(0.001, 0.02, c).astype(np.float32)
    args = _quant(c, a_scale=np.float32(0.0625), w_scale=w_scale, out_dtype=np.int8 if signed_out else np.uint8,
                  out_scale=np.float32(0.125), out_zero_point=-5 if signed_out else 120,
                  bias=rng.integers(-300, 300, c).astype(np.int32) if seed % 3 == 0 else None)
    _check(level, x, wt, int(_random(rng, dtype, ())), _random(rng, np.int8, (c,)) // 8, args, pads)


def test_single_precision_codes(rng):
    """The error model: float32 codes within eps of float64 ones; unusable multipliers mean float64 always."""
    largest = 600_000
    mult = np.concatenate([rng.uniform(1e-5, 1e-2, 200), [np.nan, np.inf, 1e3, 0.0, -0.01, 2.0**-8]])
    shift = np.concatenate([rng.normal(0, 20, 200), [0, 0, 0, 0, 0, 0.5]])
    zp = 17.0
    factors = single_precision_codes(mult, shift, zp, largest)
    assert factors.dtype == np.float32 and factors.shape == (206, 3)
    # NaN, inf and 1e3 (eps > 1/4) are never trusted: limit 0 (and b = 0, so no NaN reaches the check)
    np.testing.assert_array_equal(factors[200:203], 0)
    assert (factors[[203, 204, 205], 2] > 0.49).all()  # zero or negative multipliers are bounded too
    m32, c32, limit = factors[:200].T.astype(np.float64)
    eps = 0.5 - limit  # the margin the kernel keeps: eps, rounded outwards to float32
    exact = SINGLE_MARGIN_UNIT * (largest * mult[:200] + abs(shift[:200]) + zp + 1)
    assert (eps >= exact).all() and (eps - exact <= 2.0**-24).all()
    y = rng.integers(-largest, largest, (200, 2000), endpoint=True)
    b = y.astype(np.float32).astype(np.float64) * m32[:, None] + c32[:, None]  # the fma, to 2**-53
    reference = (y * mult[:200, None] + shift[:200, None]) + zp
    # the roundings it neglects make at most 3/4 of eps
    assert (np.abs(b - reference) <= 0.75 * eps[:, None]).all()


def test_bad_calls(rng):
    """A planes plan checks x and out before any compiled code runs."""
    c = 8
    geo = conv_geometry((1, 6, 6, c), (3, 3), 1, c, pads=1, group=c)
    epi = fused_epilogue(c, 0.02, 0.01, None, None, np.uint8, 0.3, 7)[0]
    plan = DepthwisePlan(geo, pack_depthwise(_random(rng, np.int8, (c, 1, 3, 3)).clip(-120, 120)), np.uint8, 3, epi,
                         "NCHW")
    x = _random(rng, np.uint8, (1, c, 6, 6))
    out = np.zeros((1, c, 6, 6), np.uint8)
    cases = [
        (dict(x=x.view(np.int8)), TypeError, "x: expected dtype uint8, got int8"),
        (dict(x=np.ascontiguousarray(x[:, :, :5])), ValueError,
         r"x: expected NCHW shape \(1, 8, 6, 6\), got \(1, 8, 5, 6\)"),
        (dict(x=x.transpose(0, 1, 3, 2)), ValueError, "x: expected a C-contiguous array"),
        (dict(out=out.astype(np.int32)), TypeError, "out: expected dtype uint8 or int8, got int32"),
        (dict(out=np.zeros((1, c, 6, 5), np.uint8)), ValueError,
         r"out: expected shape \(1, 8, 6, 6\), got \(1, 8, 6, 5\)"),
        (dict(out=out[:, :, :, ::-1]), ValueError, "out: expected a C-contiguous array"),
    ]
    for change, error, match in cases:
        args = {"x": x, "out": out, **change}
        with pytest.raises(error, match=match):
            plan(args["x"], args["out"])
    assert plan(x, out) is out
