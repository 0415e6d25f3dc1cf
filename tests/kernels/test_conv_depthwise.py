"""kernels.conv.depthwise against the NumPy convolution oracle and finish_ref, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu, dispatch
from kernels.conv.depthwise import (MAX_TAPS_INT32, SPECIALISED, DepthwisePlan, PackedDepthwise, _vnni_taps,
                                    depthwise_int8, pack_depthwise)
from kernels.conv.geometry import conv_geometry
from kernels.epilogue import INTEGER, QUANT, Epilogue
from kernels.gemm.int8 import fused_epilogue
from kernels.reference.conv import conv2d_ref
from kernels.reference.int8 import finish_ref
from tests.levels import level_fixture

ACT_DTYPES = (np.uint8, np.int8)
level = level_fixture("conv_depthwise")


def _random(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _acc_ref(x, w, zx, zw, geo):
    """Exact int64 accumulators [N * OH * OW, C] of the oracle, output pixels in NHWC order."""
    y = conv2d_ref(x.transpose(0, 3, 1, 2), w, x_zero_point=zx, w_zero_point=zw,
                   strides=(geo.stride_h, geo.stride_w), pads=geo.pads,
                   dilations=(geo.dilation_h, geo.dilation_w), group=geo.group)
    return y.transpose(0, 2, 3, 1).reshape(geo.rows, geo.out_channels)


def _check(x, w, zx=0, zw=0, *, strides=1, pads=0, dilations=1, epi=None, out_dtype=np.int32, finish=None):
    """Run the kernel once and compare it with the oracle; ``finish`` maps exact sums to the expected output."""
    c = x.shape[3]
    geo = conv_geometry(x.shape, w.shape[2:], 1, c, strides=strides, pads=pads, dilations=dilations, group=c)
    epi = Epilogue(INTEGER) if epi is None else epi
    out = np.full((geo.rows, c), 77, out_dtype)
    got = depthwise_int8(x, geo, pack_depthwise(w, zw), zx, epi, out)
    assert got is out
    acc = _acc_ref(x, w, zx, zw, geo)
    expected = acc.astype(np.int32) if finish is None else finish(acc)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kernel_hw", [(1, 1), (3, 3), (5, 5), (7, 3)], ids=str)
@pytest.mark.parametrize("strides", [1, 2, (2, 1)], ids=str)
@pytest.mark.parametrize("dilations", [1, 2], ids=str)
@pytest.mark.parametrize("pads", [0, 1, 2, (0, 1, 2, 1), "same"], ids=str)
def test_attributes(level, rng, kernel_hw, strides, dilations, pads):
    c = 65 if kernel_hw == (3, 3) else 7
    x = _random(rng, np.uint8, (1, 13, 13, c))
    w = _random(rng, np.int8, (c, 1) + kernel_hw)
    _check(x, w, 3, 5, strides=strides, pads=pads, dilations=dilations)


@pytest.mark.parametrize("c", [1, 7, 16, 63, 65, 256, 300])
@pytest.mark.parametrize("hw", [1, 5, 13, 28])
def test_channels_and_sizes(level, rng, c, hw):
    """Every specialised kernel, padded so that even a 1x1 input has an output; 300 channels need two blocks."""
    x = _random(rng, np.uint8, (1, hw, hw, c))
    for k, _, s, _ in SPECIALISED:
        w = _random(rng, np.int8, (c, 1, k, k))
        _check(x, w, 128, 0, strides=s, pads=k // 2)


@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_dtypes_and_zero_points(level, rng, dtype, per_channel, batch):
    c = 63
    x = _random(rng, dtype, (batch, 13, 5, c))
    w = _random(rng, np.int8, (c, 1, 3, 3))
    zx = int(_random(rng, dtype, ()))
    zw = _random(rng, np.int8, (c,)) if per_channel else -7
    for strides, dilations in [(1, 1), (2, 1), (1, 2)]:
        _check(x, w, zx, zw, strides=strides, pads="same", dilations=dilations)


def _epilogue_case(rng, c, kind):
    """(fused_epilogue arguments, out dtype) of one epilogue flavour, per-channel weight scales."""
    w_scale = rng.uniform(0.001, 0.02, c).astype(np.float32)
    if kind == "real":
        return dict(a_scale=np.float32(0.02), w_scale=w_scale, bias=rng.normal(size=c).astype(np.float32),
                    activation="relu", out_dtype=np.float32, out_scale=None, out_zero_point=None)
    if kind == "quant_u8":
        return dict(a_scale=np.float32(0.02), w_scale=w_scale, bias=None, activation=None, out_dtype=np.uint8,
                    out_scale=np.float32(0.3), out_zero_point=128)
    if kind == "quant_bias":  # a float bias: the quantized epilogue adds a shift
        return dict(a_scale=np.float32(0.02), w_scale=w_scale, bias=rng.normal(0, 5, c).astype(np.float32),
                    activation="relu", out_dtype=np.uint8, out_scale=np.float32(0.2), out_zero_point=7)
    if kind == "quant_s8":
        return dict(a_scale=np.float32(0.05), w_scale=np.float32(0.01),
                    bias=rng.integers(-5000, 5000, c).astype(np.int32), activation="relu6", out_dtype=np.int8,
                    out_scale=np.float32(0.05), out_zero_point=-3)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["real", "quant_u8", "quant_bias", "quant_s8"])
@pytest.mark.parametrize("spec", [(3, 1), (3, 2), (5, 1), (4, 1)], ids=str)  # (kernel, stride); 4x4 is general
@pytest.mark.parametrize("c", [7, 65, 300])
def test_epilogues(level, rng, kind, spec, c):
    k, s = spec
    x = _random(rng, np.uint8, (2, 11, 9, c))
    w = _random(rng, np.int8, (c, 1, k, k))
    args = _epilogue_case(rng, c, kind)
    epi, out_dtype = fused_epilogue(c, args["a_scale"], args["w_scale"], args["bias"], args["activation"],
                                    args["out_dtype"], args["out_scale"], args["out_zero_point"])
    _check(x, w, 100, 3, strides=s, pads="same", epi=epi, out_dtype=out_dtype,
           finish=lambda acc: finish_ref(acc, **args))


@pytest.mark.parametrize("scales", ["ties", "float64"])
@pytest.mark.parametrize("spec", [(3, 1), (5, 2)], ids=str)  # (kernel, stride)
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8], ids=str)
def test_codes_near_ties(level, rng, scales, spec, out_dtype):
    """Codes float32 cannot settle: exact ties of power-of-two scales, and a multiplier too large for float32
    anywhere; float64 makes them (``kernels.gemm.vnni.single_codes``)."""
    k, s = spec
    c = 37
    x = _random(rng, np.uint8, (2, 15, 15, c))
    w = _random(rng, np.int8, (c, 1, k, k)) // 4
    zp = 0 if out_dtype == np.int8 else 128
    if scales == "ties":  # mult 2**-8: a tie wherever acc = 128 mod 256
        args = dict(a_scale=2.0**-4, w_scale=np.float32(2.0**-3), out_scale=2.0, out_zero_point=zp)
    else:  # mult 64
        args = dict(a_scale=8.0, w_scale=np.float32(8.0), out_scale=1.0, out_zero_point=zp)
        x[:, 5:10, 5:10] = 128  # outputs near the zero point, not all saturated
    args.update(bias=None, activation=None, out_dtype=out_dtype)
    epi, _ = fused_epilogue(c, args["a_scale"], args["w_scale"], None, None, out_dtype, args["out_scale"], zp)
    _check(x, w, 128, 0, strides=s, pads="same", epi=epi, out_dtype=out_dtype,
           finish=lambda acc: finish_ref(acc, **args))


@pytest.mark.parametrize("spec", [(3, 1), (3, 2), (5, 2), (2, 1)], ids=str)
def test_integer_bias(level, rng, spec):
    """An int32 bias goes through finish_tile; without it the sums are stored directly."""
    k, s = spec
    c = 65
    x = _random(rng, np.int8, (1, 9, 9, c))
    w = _random(rng, np.int8, (c, 1, k, k))
    bias = rng.integers(-10**6, 10**6, c)
    _check(x, w, -4, 9, strides=s, pads=1, epi=Epilogue(INTEGER, bias.astype(np.int64)),
           finish=lambda acc: (acc + bias).astype(np.int32))


def test_variant_choice(level, rng):
    """The VNNI kernel takes 3x3 / 5x5 windows, strides 1 or 2, dilation 1, w - w_zp in int8, int32-safe bias."""
    c = 20
    w = _random(rng, np.int8, (c, 1, 3, 3))
    epi = fused_epilogue(c, 0.1, 0.1, None, None, np.uint8, 0.5, 0)[0]

    def kind(packed, epi=epi, **attrs):
        geo = conv_geometry((1, 9, 9, c), packed.kernel_hw, 1, c, pads=1, group=c, **attrs)
        return dispatch.choose("conv_depthwise", geo.rows, c, _vnni_taps(geo, packed, epi)).kind

    fast = "avx512-vnni" if level == cpu.AVX512_VNNI else "generic"
    assert kind(pack_depthwise(w), strides=(2, 1)) == fast
    assert kind(pack_depthwise(w.clip(-100, 100), 27)) == fast
    assert kind(pack_depthwise(w, 1)) == "generic"  # w - zw reaches -129
    assert kind(pack_depthwise(w), dilations=2) == "generic"
    assert kind(pack_depthwise(w), strides=3) == "generic"
    assert kind(pack_depthwise(_random(rng, np.int8, (c, 1, 3, 5)))) == "generic"
    big = epi._replace(col_bias=np.full(c, 2**31 - 2, np.int64))
    assert kind(pack_depthwise(w), big) == "generic"  # the VNNI int32 sums could wrap
    assert kind(pack_depthwise(w), Epilogue(INTEGER, big.col_bias)) == fast  # int32 out wraps either way
    huge = fused_epilogue(c, 100.0, 100.0, None, None, np.uint8, 0.001, 0)[0]
    assert kind(pack_depthwise(w), huge) == "generic"  # sums times 1e7: the rounded codes could pass int32


@pytest.mark.parametrize("out_dtype", [np.uint8, np.float32])
def test_large_bias(level, rng, out_dtype):
    """An int32 bias near the int32 limits: exact float sums, whichever kernel runs."""
    c = 17
    x = _random(rng, np.uint8, (1, 6, 6, c))
    w = _random(rng, np.int8, (c, 1, 3, 3))
    bias = rng.choice([2**31 - 1, -(2**31), 2**31 - 10**6, -(2**31) + 10**6], c).astype(np.int32)
    quant = out_dtype == np.uint8
    args = dict(a_scale=1e-9, w_scale=1.0, bias=bias, out_dtype=out_dtype, out_scale=0.05 if quant else None,
                out_zero_point=100 if quant else None)
    epi, _ = fused_epilogue(c, args["a_scale"], args["w_scale"], bias, None, out_dtype, args["out_scale"],
                            args["out_zero_point"])
    _check(x, w, 9, 0, pads=1, epi=epi, out_dtype=out_dtype, finish=lambda acc: finish_ref(acc, **args))


def test_unnarrowed_epilogue(level, rng):
    """A hand-made QUANT epilogue with just C factors and [lo, hi] wider than the output range."""
    c = 21
    x = _random(rng, np.int8, (2, 7, 8, c))
    w = _random(rng, np.int8, (c, 1, 5, 5)) // 2
    mult = rng.uniform(0.001, 0.01, c)
    epi = Epilogue(QUANT, 0, mult, np.zeros(c), -np.inf, np.inf, 10.0, -128.0, 127.0)
    _check(x, w, -5, 3, strides=2, pads="same", epi=epi, out_dtype=np.int8,
           finish=lambda acc: np.clip(np.rint(acc * mult + 10.0), -128, 127).astype(np.int8))


@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("x_end", ["min", "max"])
@pytest.mark.parametrize("w_end", [-128, 127])
@pytest.mark.parametrize("k", [3, 5, 4])
def test_extremes(level, dtype, x_end, w_end, k):
    """|x - zx| = |w - zw| = 255 in every tap, the largest products the int32 sums take."""
    info = np.iinfo(dtype)
    xv, zx = (info.min, info.max) if x_end == "min" else (info.max, info.min)
    zw = 127 if w_end == -128 else -128
    c = 33
    x = np.full((1, 7, 7, c), xv, dtype)
    w = np.full((c, 1, k, k), w_end, np.int8)
    _check(x, w, int(zx), zw, pads="same")


def test_wide_accumulators(level):
    """Past MAX_TAPS_INT32 taps the sums are int64: 182 x 182 = 33124 taps of 255 * -255 exceed int32."""
    k = 182
    assert k * k > MAX_TAPS_INT32
    x = np.full((1, k, k, 2), 255, np.uint8)
    x[0, 0, 0, 1] = 0  # one tap of channel 1 contributes nothing
    w = np.full((2, 1, k, k), -128, np.int8)
    geo = conv_geometry(x.shape, (k, k), 1, 2, group=2)
    epi, _ = fused_epilogue(2, 1.0, 1.0, None, None, np.float32, None, None)
    out = depthwise_int8(x, geo, pack_depthwise(w, 127), 0, epi, np.zeros((1, 2), np.float32))
    acc = np.array([[k * k, k * k - 1]]) * 255 * -255  # every tap the same: the oracle in closed form
    assert acc.min() < -(2**31)
    np.testing.assert_array_equal(out, finish_ref(acc, a_scale=1.0, w_scale=1.0))


@pytest.fixture
def two_threads():
    kernels.set_num_threads(2)
    yield
    kernels.set_num_threads(1)


@pytest.mark.parametrize("n, hw, c", [(2, 60, 64), (1, 30, 600)])  # rows / channel blocks over threads
def test_threads(level, rng, two_threads, n, hw, c):
    x = _random(rng, np.uint8, (n, hw, hw, c))
    w = _random(rng, np.int8, (c, 1, 3, 3))
    _check(x, w, 7, 1, pads=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.integers(1, 70), h=st.integers(1, 12), w=st.integers(1, 12), kh=st.integers(1, 5), kw=st.integers(1, 5),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 3)] * 4), signed=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property(level, c, h, w, kh, kw, sh, sw, dh, dw, pads, signed, seed):
    rng = np.random.default_rng(seed)
    if h + pads[0] + pads[2] < dh * (kh - 1) + 1 or w + pads[1] + pads[3] < dw * (kw - 1) + 1:
        return  # no output
    dtype = np.int8 if signed else np.uint8
    x = _random(rng, dtype, (2, h, w, c))
    wt = _random(rng, np.int8, (c, 1, kh, kw))
    _check(x, wt, int(_random(rng, dtype, ())), _random(rng, np.int8, (c,)), strides=(sh, sw), pads=pads,
           dilations=(dh, dw))


def test_pack_layout(rng):
    c, kh, kw = 300, 3, 5
    w = _random(rng, np.int8, (c, 1, kh, kw))
    zw = _random(rng, np.int8, (c,))
    packed = pack_depthwise(w, zw)
    assert isinstance(packed, PackedDepthwise) and packed.channels == c and packed.kernel_hw == (kh, kw)
    expected = (w[:, 0].astype(np.int16) - zw[:, None, None]).reshape(c, kh * kw).T
    np.testing.assert_array_equal(packed.weights, expected)
    assert packed.pairs.dtype == np.int16 and packed.pairs.flags.c_contiguous
    assert "channels=300" in repr(packed)


def _valid_call(rng, **changes):
    c = 8
    args = dict(x=_random(rng, np.uint8, (1, 5, 5, c)), zx=0, epi=Epilogue(INTEGER), out=np.zeros((25, c), np.int32))
    args["geo"] = conv_geometry(args["x"].shape, (3, 3), 1, c, pads=1, group=c)
    args["packed"] = pack_depthwise(_random(rng, np.int8, (c, 1, 3, 3)))
    args.update(changes)
    return args


@pytest.mark.parametrize("w, zw, error, match", [
    (np.zeros((4, 2, 3, 3), np.int8), 0, ValueError, r"w: expected shape \(C, 1, KH, KW\)"),
    (np.zeros((4, 3, 3), np.int8), 0, ValueError, "w: expected a 4-D array"),
    (np.zeros((4, 1, 3, 3), np.uint8), 0, TypeError, "w: expected dtype int8, got uint8"),
    (np.zeros((4, 1, 3, 3), np.float32), 0, TypeError, "w: expected dtype int8, got float32"),
    (np.zeros((4, 1, 3, 3), np.int8), 128, ValueError, r"w_zero_point: values must lie in \[-128, 127\]"),
    (np.zeros((4, 1, 3, 3), np.int8), np.zeros(5, np.int64), ValueError,
     r"w_zero_point: expected a scalar or shape \(4,\)"),
    (np.zeros((4, 1, 3, 3), np.int8), 0.5, TypeError, "w_zero_point: expected an integer"),
])
def test_bad_weights(w, zw, error, match):
    with pytest.raises(error, match=match):
        pack_depthwise(w, zw)


def test_bad_calls(rng):
    def call(**changes):
        a = _valid_call(rng, **changes)
        depthwise_int8(a["x"], a["geo"], a["packed"], a["zx"], a["epi"], a["out"])

    call()  # the baseline is valid
    x = _random(rng, np.uint8, (1, 5, 5, 8))
    cases = [
        (dict(x=x.astype(np.int16)), TypeError, "x: expected dtype uint8 or int8, got int16"),
        (dict(x=x[0]), ValueError, "x: expected a 4-D array"),
        (dict(x=_random(rng, np.uint8, (1, 6, 5, 8))), ValueError, r"x: expected NHWC shape \(1, 5, 5, 8\)"),
        (dict(x=np.asfortranarray(x)), ValueError, "x: expected a C-contiguous array"),
        (dict(packed=pack_depthwise(np.zeros((9, 1, 3, 3), np.int8))), ValueError,
         "geo: expected a depthwise convolution of 9 channels"),
        (dict(packed=pack_depthwise(np.zeros((8, 1, 5, 5), np.int8))), ValueError, r"geo: expected kernel \(5, 5\)"),
        (dict(geo=conv_geometry((1, 5, 5, 8), (3, 3), 8, 8, pads=1, group=1)), ValueError,
         "geo: expected a depthwise convolution"),
        (dict(geo=(1, 5, 5)), TypeError, "geo: expected a kernels.conv.geometry.ConvGeometry"),
        (dict(packed=np.zeros((8, 9), np.int16)), TypeError, "packed: expected a PackedDepthwise"),
        (dict(zx=256), ValueError, r"x_zero_point: expected an int in \[0, 255\], got 256"),
        (dict(zx=1.0), ValueError, "x_zero_point: expected an int"),
        (dict(out=np.zeros((25, 8), np.float32)), TypeError, "out: expected dtype int32, got float32"),
        (dict(out=np.zeros((24, 8), np.int32)), ValueError, r"out: expected shape \(25, 8\), got \(24, 8\)"),
        (dict(out=np.zeros((25, 8), np.int32)[:, ::-1]), ValueError, "out: expected a C-contiguous array"),
        (dict(epi=(0, 0)), TypeError, "epi: expected a kernels.epilogue.Epilogue"),
        (dict(epi=Epilogue(INTEGER, np.zeros(3, np.int64))), ValueError, r"epi.col_bias: expected an int64 array"),
        (dict(epi=fused_epilogue(8, 0.1, 0.1, None, None, np.uint8, 0.5, 0)[0]), TypeError,
         "out: expected dtype uint8 or int8, got int32"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            call(**change)
    read_only = np.zeros((25, 8), np.int32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        call(out=read_only)
    epi = fused_epilogue(4, 0.1, 0.1, None, None, np.uint8, 0.5, 0)[0]._replace(mult=np.ones(4))
    with pytest.raises(ValueError, match="epi.mult: expected a float64 array of at least 8 values"):
        call(epi=epi, out=np.zeros((25, 8), np.uint8))



@pytest.mark.parametrize("kind", ["integer", "real", "quant_u8", "quant_s8"])
@pytest.mark.parametrize("spec", [(3, 1), (5, 2), (4, 1)], ids=str)  # (kernel, stride); 4x4 is general
def test_plan_nchw(level, rng, kind, spec):
    """A plan in NCHW gives the NHWC results in NCHW order, call after call, whatever it is given."""
    k, s = spec
    c, n = 37, 2
    x = _random(rng, np.int8, (n, c, 12, 9))
    w = _random(rng, np.int8, (c, 1, k, k))
    geo = conv_geometry((n, 12, 9, c), (k, k), 1, c, strides=s, pads="same", group=c)
    args = None if kind == "integer" else _epilogue_case(rng, c, kind)
    if args is None:
        epi, out_dtype = Epilogue(INTEGER), np.int32
    else:
        epi, out_dtype = fused_epilogue(c, args["a_scale"], args["w_scale"], args["bias"], args["activation"],
                                        args["out_dtype"], args["out_scale"], args["out_zero_point"])

    def finish(acc):
        return acc.astype(np.int32) if args is None else finish_ref(acc, **args)

    plan = DepthwisePlan(geo, pack_depthwise(w, 2), np.int8, -5, epi, "NCHW")
    for _ in range(2):
        x = _random(rng, np.int8, x.shape)
        out = np.full((n, c, geo.out_h, geo.out_w), 9, out_dtype)
        assert plan(x, out) is out
        expected = finish(_acc_ref(x.transpose(0, 2, 3, 1), w, -5, 2, geo))
        np.testing.assert_array_equal(out, expected.reshape(n, geo.out_h, geo.out_w, c).transpose(0, 3, 1, 2))
        entered = np.zeros_like(out)  # the entry: one compiled call with its own scratch, the same result
        plan.entry(out_dtype)([x], [entered])
        np.testing.assert_array_equal(entered, out)


def test_plan_errors(rng):
    c = 8
    geo = conv_geometry((1, 5, 5, c), (3, 3), 1, c, pads=1, group=c)
    packed = pack_depthwise(_random(rng, np.int8, (c, 1, 3, 3)))
    plan = DepthwisePlan(geo, packed, np.uint8, 0, Epilogue(INTEGER), "NCHW")
    x = _random(rng, np.uint8, (1, c, 5, 5))
    out = np.zeros((1, c, 5, 5), np.int32)
    with pytest.raises(ValueError, match=r"x: expected NCHW shape \(1, 8, 5, 5\), got \(1, 5, 5, 8\)"):
        plan(x.transpose(0, 2, 3, 1).copy(), out)
    with pytest.raises(TypeError, match="x: expected dtype uint8, got int8"):
        plan(x.view(np.int8), out)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 8, 5, 5\), got \(1, 8, 25, 1\)"):
        plan(x, np.zeros((1, c, 25, 1), np.int32))
    with pytest.raises(TypeError, match="out_dtype: expected int32, got float32"):
        plan.entry(np.float32)
    with pytest.raises(ValueError, match="layout: expected 'NCHW' or 'NHWC', got 'NWHC'"):
        DepthwisePlan(geo, packed, np.uint8, 0, Epilogue(INTEGER), "NWHC")
    with pytest.raises(TypeError, match="x: expected dtype uint8 or int8, got float32"):
        DepthwisePlan(geo, packed, np.float32, 0, Epilogue(INTEGER))
