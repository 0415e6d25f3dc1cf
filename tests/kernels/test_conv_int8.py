"""int8 convolutions: ``conv2d_int8`` and ``qlinear_conv2d`` against the NumPy oracle, bit for bit.

Every case runs at each CPU level of the int8 products (the VNNI indirect kernel,
the im2col path over the AVX2 and portable micro-kernels), over odd sizes,
asymmetric and 'same' padding, strides, dilations, groups, both layouts and
every accepted dtype; ONNX's ConvInteger and QLinearConv node tests pin the
semantics.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.reference import conv2d_ref, finish_ref
from tests import conformance
from tests.levels import level_fixture

level = level_fixture("conv_int8", "gemm_int8")

# (N, C, H, W, O, KH, KW, strides, pads, dilations, group)
CASES = [
    (1, 4, 5, 5, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (2, 7, 9, 6, 5, 3, 2, (2, 1), (1, 0, 2, 1), (1, 2), 1),
    (1, 16, 7, 7, 65, 3, 3, (1, 1), "same", (1, 1), 1),
    (1, 64, 6, 5, 63, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (3, 12, 4, 9, 12, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),
    (1, 8, 13, 11, 70, 5, 5, (2, 2), (2, 1, 2, 3), (1, 1), 1),
    (1, 8, 10, 10, 6, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 2),
    (2, 12, 6, 7, 9, 3, 1, (1, 2), "same_lower", (1, 1), 3),
    (1, 3, 8, 8, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),
    (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (1, 20, 3, 3, 130, 3, 3, (3, 3), (1, 1, 1, 1), (1, 1), 1),
    (1, 16, 6, 6, 16, 3, 3, (1, 1), (0, 1, 1, 0), (1, 1), 4),
    # 3 channels widened to 4 with padded rows, each kernel row one run: dilated rows, asymmetric pads
    (2, 3, 9, 10, 12, 3, 5, (2, 1), (2, 1, 0, 3), (2, 1), 1),
]


def _case_ids(case) -> str:
    n, c, h, w, o, kh, kw, s, p, d, g = case
    return f"n{n}c{c}h{h}w{w}o{o}k{kh}x{kw}s{s[0]}{s[1]}d{d[0]}{d[1]}g{g}p{p if isinstance(p, str) else ''.join(map(str, p))}"


def _operands(rng, case, x_dtype=np.uint8, w_dtype=np.int8):
    n, c, h, w, o, kh, kw, _, _, _, g = case
    xi, wi = np.iinfo(x_dtype), np.iinfo(w_dtype)
    x = rng.integers(xi.min, xi.max + 1, (n, c, h, w)).astype(x_dtype)
    wt = rng.integers(wi.min, wi.max + 1, (o, c // g, kh, kw)).astype(w_dtype)
    return x, wt


def _attrs(case) -> dict:
    *_, s, p, d, g = case
    return dict(strides=s, pads=p, dilations=d, group=g)


def _ref_pads(case) -> tuple:
    n, c, h, w, o, kh, kw, s, p, d, g = case
    geo = kernels.conv.geometry.conv_geometry((n, h, w, c), (kh, kw), c // g, o, strides=s, pads=p, dilations=d,
                                              group=g)
    return geo.pads


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_conv2d_int8_matches_oracle(level, rng, case, x_dtype):
    x, w = _operands(rng, case, x_dtype)
    o = w.shape[0]
    zx = int(rng.integers(np.iinfo(x_dtype).min, np.iinfo(x_dtype).max + 1))
    zw = rng.integers(-3, 4, o) if case[1] % 2 else 0
    attrs = _attrs(case)
    got = kernels.conv2d_int8(x, w, x_zero_point=zx, w_zero_point=zw, **attrs)
    want = conv2d_ref(x, w, x_zero_point=zx, w_zero_point=zw, strides=attrs["strides"], pads=_ref_pads(case),
                      dilations=attrs["dilations"], group=attrs["group"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=_case_ids)
def test_qlinear_conv2d_matches_oracle(level, rng, case):
    x, w = _operands(rng, case)
    o = w.shape[0]
    attrs = _attrs(case)
    w_scale = rng.uniform(0.002, 0.02, o)
    bias = rng.normal(0, 20, o).astype(np.float32)
    acc = conv2d_ref(x, w, x_zero_point=131, strides=attrs["strides"], pads=_ref_pads(case),
                     dilations=attrs["dilations"], group=attrs["group"])
    rows = acc.transpose(0, 2, 3, 1).reshape(-1, o)
    for activation, out_dtype, y_zp in [(None, np.uint8, 120), ("relu", np.int8, -5), ("relu6", np.float32, None),
                                        (("clip", -1.5, 2.0), np.uint8, 3)]:
        quantized = out_dtype != np.float32
        y_scale = 0.05 if quantized else None
        got = kernels.qlinear_conv2d(x, 0.03, 131, w, w_scale, 0, y_scale, y_zp, bias, activation=activation,
                                     out_dtype=out_dtype, **attrs)
        want = finish_ref(rows, a_scale=0.03, w_scale=w_scale, bias=bias, activation=activation, out_dtype=out_dtype,
                          out_scale=y_scale, out_zero_point=y_zp)
        np.testing.assert_array_equal(got, want.reshape(acc.shape[0], *acc.shape[2:], o).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("shape", [(3, 16, 96, 1, "NHWC"), (3, 3, 20, 1, "NHWC"), (1, 64, 70, 1, "NCHW"),
                                   (3, 12, 40, 2, "NHWC"), (1, 16, 80, 1, "NHWC"), (1, 8, 24, 1, "NHWC")],
                         ids=str)  # (k, C, O, group, layout)
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8], ids=str)
def test_codes_near_ties(level, rng, shape, out_dtype):
    """Power-of-two scales: sums at exact ties, which the tiles' float32 codes leave to float64
    (``kernels.gemm.vnni.single_codes``); through the indirect, im2col, 1x1 NCHW and NHWC and grouped paths."""
    k, c, o, group, layout = shape
    x = rng.integers(0, 256, (2, c, 13, 11), dtype=np.uint8)
    w = rng.integers(-128, 128, (o, c // group, k, k), dtype=np.int8)
    bias = rng.integers(-3000, 3000, o).astype(np.int32)  # an int32 bias keeps the shift 0: integer codes
    pads = (k // 2,) * 4
    acc = conv2d_ref(x, w, x_zero_point=128, pads=pads, group=group) + bias[:, None, None]
    assert np.count_nonzero(acc % 256 == 128) > 10  # ties of y / 256
    zp = -3 if out_dtype == np.int8 else 128
    args = dict(a_scale=np.float32(2.0**-4), w_scale=np.float32(2.0**-3), out_dtype=out_dtype,
                out_scale=np.float32(2.0), out_zero_point=zp)
    rows = acc.transpose(0, 2, 3, 1).reshape(-1, o)
    for activation in (None, "relu"):
        want = finish_ref(rows - bias, bias=bias, activation=activation, **args).reshape(2, 13, 11, o)
        xx = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        got = kernels.qlinear_conv2d(xx, args["a_scale"], 128, w, args["w_scale"], 0, args["out_scale"],
                                     out_dtype(zp), bias, pads=pads, group=group, activation=activation, layout=layout)
        np.testing.assert_array_equal(got if layout == "NHWC" else got.transpose(0, 2, 3, 1), want)


# Groups of 32 or fewer output channels run the narrow 12 x 32 VNNI tiles (kernels.dispatch): every tail of 12
# pixels, 1..33 channels per group, the indirect path, the padded 3-channel stem and the im2col path (3 channels
# per group) over the narrow GEMM tile.
NARROW_CASES = [
    (1, 8, 5, 5, 1, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (2, 4, 7, 3, 7, 3, 3, (1, 1), (1, 0, 1, 2), (1, 1), 1),
    (1, 12, 9, 9, 31, 3, 3, (2, 2), "same", (1, 1), 1),
    (1, 16, 10, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 20, 6, 7, 33, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (1, 3, 13, 13, 32, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (1, 16, 7, 5, 62, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2),
    (2, 12, 5, 7, 9, 3, 3, (1, 1), (0, 1, 1, 0), (1, 1), 3),
    (1, 6, 9, 7, 20, 3, 3, (1, 1), (1, 1, 1, 1), (2, 1), 2),
]


def _narrow_epilogues(rng, o: int) -> list[tuple]:
    """``(w_zero_point, bias, activation, out_dtype, y_zero_point)``: every epilogue of the tiles. A float bias
    shifts (float64 codes), an int32 one does not (float32 codes where exact), weight zero points and an int32 bias
    past int32 sums take ``finish_tile``."""
    zw = rng.integers(-3, 4, o)
    small = rng.integers(-3000, 3000, o).astype(np.int32)
    return [(0, rng.normal(0, 20, o).astype(np.float32), "relu6", np.float32, None),
            (0, rng.normal(0, 20, o).astype(np.float32), None, np.uint8, 120),
            (0, small, ("clip", -1.5, 2.0), np.int8, -5),
            (0, small, None, np.uint8, 3),
            (zw, small, "relu", np.uint8, 7),
            (0, np.full(o, 2**31 - 1000, np.int32), None, np.float32, None)]


def _check_every_epilogue(rng, case, layout: str) -> set[str]:
    """Run ``case`` through ``conv2d_int8`` and every fused epilogue, bit-exact against the oracle; the plan kinds."""
    x, w = _operands(rng, case)
    o = w.shape[0]
    attrs = _attrs(case)
    x_in = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    def ours(result):
        return result if layout == "NCHW" else result.transpose(0, 3, 1, 2)

    ref = dict(strides=attrs["strides"], pads=_ref_pads(case), dilations=attrs["dilations"], group=attrs["group"])
    kinds = set()
    for zw in (0, rng.integers(-3, 4, o)):
        plan = kernels.conv2d_int8_plan(w, x_in.shape, x_zero_point=77, w_zero_point=zw, layout=layout, **attrs)
        kinds.add(plan.kind)
        np.testing.assert_array_equal(ours(plan(x_in)), conv2d_ref(x, w, x_zero_point=77, w_zero_point=zw, **ref))
    w_scale = rng.uniform(0.002, 0.02, o)
    for zw, bias, activation, out_dtype, y_zp in _narrow_epilogues(rng, o):
        y_scale = None if y_zp is None else 0.05
        plan = kernels.qlinear_conv2d_plan(w, x_in.shape, 0.03, 131, w_scale, zw, y_scale, y_zp, bias,
                                           activation=activation, out_dtype=out_dtype, layout=layout, **attrs)
        kinds.add(plan.kind)
        acc = conv2d_ref(x, w, x_zero_point=131, w_zero_point=zw, **ref)
        want = finish_ref(acc.transpose(0, 2, 3, 1).reshape(-1, o), a_scale=0.03, w_scale=w_scale, bias=bias,
                          activation=activation, out_dtype=out_dtype, out_scale=y_scale, out_zero_point=y_zp)
        np.testing.assert_array_equal(ours(plan(x_in)), want.reshape(acc.shape[0], *acc.shape[2:], o).transpose(
            0, 3, 1, 2))
    return kinds


@pytest.mark.parametrize("case", NARROW_CASES, ids=_case_ids)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_narrow_tiles_every_epilogue(level, rng, case, layout):
    kinds = _check_every_epilogue(rng, case, layout)
    n, c, h, w, o, kh, kw, *_, g = case
    if kernels.cpu.allows(kernels.cpu.AVX512_VNNI, level) and (c // g) % 4 == 0 and kh * kw > 1:
        assert kinds == {"avx512-vnni-indirect-narrow" if o // g <= 32 else "avx512-vnni-indirect"}


@pytest.mark.parametrize("case", [CASES[8], CASES[-1], (1, 1, 5, 7, 40, 3, 3, (1, 1), "same", (1, 1), 1),
                                  (2, 2, 9, 11, 24, 5, 5, (2, 2), (2, 1, 2, 2), (1, 1), 1)], ids=_case_ids)
def test_widened_rows_one_run_per_kernel_row(level, rng, case):
    """Images of 1..3 channels: on VNNI their rows are padded, and each kernel row is one run of the indirect
    kernel (``kernels.conv.int8_driver.runs_indirection``), with every epilogue and row sums. Without weight zero
    points a run is the row's ``KW C`` bytes rounded up to a k group where that takes fewer k groups than
    channels widened to 4 (1 channel 3 wide: one group instead of three)."""
    _check_every_epilogue(rng, case, "NHWC")
    n, c, h, w, o, kh, kw, *_ = case
    vnni = kernels.cpu.allows(kernels.cpu.AVX512_VNNI, level)
    for zw in (0, 1):
        plan = kernels.conv2d_int8_plan(np.zeros((o, c, kh, kw), np.int8), (n, h, w, c), layout="NHWC",
                                        w_zero_point=zw, **_attrs(case))
        assert plan.runs == vnni
        compact = vnni and zw == 0 and -(-kw * c // 4) < kw
        assert plan.pixel_channels == (c if compact else 4)


@pytest.fixture
def narrow_everywhere(monkeypatch):
    """Dispatch the narrow tiles for any number of channels: they then run both halves of each 64-channel panel."""
    monkeypatch.setattr(kernels.dispatch, "NARROW_MAX_CHANNELS", 1 << 30)
    kernels.dispatch._choose.cache_clear()
    yield
    monkeypatch.undo()
    kernels.dispatch._choose.cache_clear()


@pytest.mark.skipif(kernels.cpu.AVX512_VNNI not in kernels.cpu.supported_levels(), reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("case", [(1, 8, 7, 6, 70, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
                                  (2, 10, 5, 5, 40, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2)], ids=_case_ids)
def test_narrow_tiles_cover_wide_layers(narrow_everywhere, rng, case):
    """The drivers step channels by the tile's width: a narrow tile over 40 or 70 channels reads panel halves."""
    kinds = _check_every_epilogue(rng, case, "NHWC")
    assert kinds == ({"avx512-vnni-indirect-narrow"} if case[1] % 4 == 0 else {"im2col"})
    a = rng.integers(0, 256, (29, 37), dtype=np.uint8)
    b = rng.integers(-128, 128, (70, 37), dtype=np.int8)
    assert kernels.dispatch.choose("gemm_int8", 29, 70, 37, kernels.cpu.AVX512_VNNI).kind == "avx512-vnni-narrow"
    np.testing.assert_array_equal(kernels.gemm_int8(a, b, a_zero_point=3),
                                  (a.astype(np.int64) - 3) @ b.T.astype(np.int64))


def test_layouts_packed_weights_and_out(level, rng):
    case = CASES[1]
    x, w = _operands(rng, case)
    attrs = _attrs(case)
    packed = kernels.pack_conv_int8(w, group=attrs["group"])
    nchw = kernels.qlinear_conv2d(x, 0.1, 3, packed, 0.01, 0, 0.2, 7, **attrs)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    out = np.empty((nchw.shape[0], nchw.shape[2], nchw.shape[3], nchw.shape[1]), np.uint8)
    nhwc = kernels.qlinear_conv2d(x_nhwc, 0.1, 3, packed, 0.01, 0, 0.2, 7, layout="NHWC", out=out, **attrs)
    assert nhwc is out
    np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), nchw)
    out_nchw = np.empty_like(nchw)
    assert kernels.qlinear_conv2d(x, 0.1, 3, w, 0.01, 0, 0.2, 7, out=out_nchw, **attrs) is out_nchw
    np.testing.assert_array_equal(out_nchw, nchw)


def test_uint8_weights_int32_bias_and_large_bias(level, rng):
    """uint8 weights shift to int8 with their zero point; a bias too large for int32 sums takes the exact int64 path."""
    case = CASES[2]
    x, _ = _operands(rng, case)
    w = rng.integers(0, 256, (case[4], case[1], case[5], case[6])).astype(np.uint8)
    o = w.shape[0]
    zw = rng.integers(100, 156, o).astype(np.uint8)
    attrs = _attrs(case)
    acc = conv2d_ref(x, w, x_zero_point=9, w_zero_point=zw.astype(np.int64), pads=_ref_pads(case))
    rows = acc.transpose(0, 2, 3, 1).reshape(-1, o)
    np.testing.assert_array_equal(kernels.conv2d_int8(x, w, x_zero_point=9, w_zero_point=zw, **attrs), acc)
    for bias in (rng.integers(-1000, 1000, o).astype(np.int32), np.full(o, 2**31 - 1000, np.int32)):
        got = kernels.qlinear_conv2d(x, 0.5, 9, w, 0.25, zw, None, None, bias, out_dtype=np.float32, **attrs)
        want = finish_ref(rows, a_scale=0.5, w_scale=0.25, bias=bias, out_dtype=np.float32)
        np.testing.assert_array_equal(got, want.reshape(1, case[2], case[3], o).transpose(0, 3, 1, 2))


def test_threads_agree(rng):
    case = (1, 16, 30, 30, 96, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    x, w = _operands(rng, case)
    results = []
    for count in (1, 2):
        kernels.set_num_threads(count)
        try:
            results.append(kernels.qlinear_conv2d(x, 0.1, 128, w, 0.01, 0, 0.5, 128, **_attrs(case)))
        finally:
            kernels.set_num_threads(kernels.threads._available_cores())
    np.testing.assert_array_equal(results[0], results[1])


POINTWISE_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 9, 7), (1, 64, 8, 8, 6), (1, 65, 1, 63, 13), (3, 130, 5, 13, 65),
                    (1, 16, 15, 15, 128)]  # (N, C, H, W, O): every tail of 4 channels, 64 pixels and 6 rows


@pytest.mark.parametrize("shape", POINTWISE_SHAPES, ids=str)
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_pointwise_nchw(level, rng, shape, x_dtype, monkeypatch):
    """1x1 NCHW convolutions: the transposed product of kernels.conv.pointwise on VNNI (on every plane size, even
    those its dispatch leaves to the NHWC path for speed), the NHWC path elsewhere."""
    monkeypatch.setattr("kernels.conv.pointwise.MIN_PIXELS", 0)
    n, c, h, w, o = shape
    x, wt = _operands(rng, (n, c, h, w, o, 1, 1, (1, 1), 0, (1, 1), 1), x_dtype)
    zx = int(rng.integers(np.iinfo(x_dtype).min, np.iinfo(x_dtype).max + 1))
    plan = kernels.conv2d_int8_plan(wt, x.shape, x_dtype, x_zero_point=zx)
    fast = c != o and kernels.cpu.allows(kernels.cpu.AVX512_VNNI, level)  # c == o == 1 is a depthwise convolution
    assert (plan.kind == "avx512-vnni-pointwise") == fast
    acc = conv2d_ref(x, wt, x_zero_point=zx)
    np.testing.assert_array_equal(plan(x), acc)
    rows = acc.transpose(0, 2, 3, 1).reshape(-1, o)
    w_scale = rng.uniform(0.002, 0.02, o)
    bias = rng.integers(-3000, 3000, o).astype(np.int32)
    for activation, out_dtype, y_zp in [(None, np.uint8, 120), ("relu6", np.int8, -5), ("relu", np.float32, None)]:
        y_scale = None if y_zp is None else 0.07
        layer = kernels.qlinear_conv2d_plan(wt, x.shape, 0.03, zx, w_scale, 0, y_scale, y_zp, bias, x_dtype=x_dtype,
                                            activation=activation, out_dtype=out_dtype)
        assert layer.kind == plan.kind
        want = finish_ref(rows, a_scale=0.03, w_scale=w_scale, bias=bias, activation=activation, out_dtype=out_dtype,
                          out_scale=y_scale, out_zero_point=y_zp)
        out = np.full(layer.out_shape, 99, out_dtype)
        assert layer(x, out) is out
        np.testing.assert_array_equal(out, want.reshape(n, h, w, o).transpose(0, 3, 1, 2))


# (N, C, H, W, O): tails of the 6- and 12-row tiles; 1..33 channels (narrow tiles, their 16-channel tail), 48,
# 96 and 144 (the wide tile's 32- and 16-channel tails); 3 channels (widened to 4); weights past L1 (a panel at a time)
POINTWISE_NHWC_SHAPES = [(1, 4, 1, 1, 1), (2, 8, 3, 5, 24), (1, 20, 7, 3, 33), (3, 12, 5, 5, 48), (1, 3, 4, 9, 16),
                         (1, 24, 5, 7, 144), (2, 40, 3, 3, 96), (1, 160, 4, 5, 200)]


@pytest.mark.parametrize("shape", POINTWISE_NHWC_SHAPES, ids=str)
def test_pointwise_nhwc(level, rng, shape):
    """1x1 NHWC convolutions: a plain GEMM over every image's pixels on VNNI (``kernels.conv.int8_driver``'s 1x1
    driver, int32 and quantized codes; float output keeps the indirect path), the im2col path elsewhere."""
    n, c, h, w, o = shape
    case = (n, c, h, w, o, 1, 1, (1, 1), 0, (1, 1), 1)
    kinds = _check_every_epilogue(rng, case, "NHWC")
    if kernels.cpu.allows(kernels.cpu.AVX512_VNNI, level):
        tile = "avx512-vnni-{}" + ("-narrow" if o <= 32 else "")
        assert kinds == {tile.format("1x1"), tile.format("indirect")}
    for x_dtype in (np.uint8, np.int8):  # int8 activations run as uint8 + 128
        x, wt = _operands(rng, case, x_dtype)
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        got = kernels.qlinear_conv2d(x, 0.03, -7 if x_dtype == np.int8 else 200, wt, 0.01, 0, 0.05, 5, layout="NHWC")
        acc = conv2d_ref(x.transpose(0, 3, 1, 2), wt, x_zero_point=-7 if x_dtype == np.int8 else 200)
        want = finish_ref(acc.transpose(0, 2, 3, 1).reshape(-1, o), a_scale=0.03, w_scale=0.01, out_dtype=x_dtype,
                          out_scale=0.05, out_zero_point=5)
        np.testing.assert_array_equal(got.reshape(-1, o), want)


def test_pointwise_applies_only_where_exact(rng):
    """Weight zero points, strides, padding and int32-overflowing biases keep the general path."""
    x, w = _operands(rng, (1, 8, 6, 6, 16, 1, 1, (1, 1), 0, (1, 1), 1))
    kinds = {kernels.qlinear_conv2d_plan(w, x.shape, 0.1, 3, 0.1, zw, 0.5, 0, bias, **attrs).kind
             for zw, bias, attrs in [(1, None, {}), (0, None, dict(strides=2)), (0, None, dict(pads=1)),
                                     (0, np.full(16, 2**31 - 1, np.int32), {})]}
    assert "avx512-vnni-pointwise" not in kinds


def test_pointwise_threads_agree(rng):
    x, w = _operands(rng, (2, 64, 56, 56, 128, 1, 1, (1, 1), 0, (1, 1), 1))  # enough work for two threads
    results = []
    for count in (1, 2):
        kernels.set_num_threads(count)
        try:
            results.append(kernels.qlinear_conv2d(x, 0.1, 128, w, 0.01, 0, 0.5, 128))
        finally:
            kernels.set_num_threads(kernels.threads._available_cores())
    np.testing.assert_array_equal(results[0], results[1])


def _scalar(value):
    return None if value is None else (value.reshape(-1)[0] if value.size == 1 else value)


@pytest.mark.parametrize("name", conformance.params("ConvInteger", "QLinearConv"))
def test_onnx_conformance(name):
    case = conformance.load_case(name)
    attrs = case.attributes
    kwargs = dict(strides=tuple(attrs.get("strides", (1, 1))), pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
                  dilations=tuple(attrs.get("dilations", (1, 1))), group=attrs.get("group", 1))
    if case.op == "ConvInteger":
        x, w, zx, zw = (case.inputs + [None, None])[:4]
        got = kernels.conv2d_int8(x, w, x_zero_point=0 if zx is None else int(zx),
                                  w_zero_point=0 if zw is None else _scalar(zw), **kwargs)
    else:
        x, xs, xz, w, ws, wz, ys, yz, *rest = case.inputs
        got = kernels.qlinear_conv2d(x, xs.reshape(-1)[0], xz.reshape(()), w, _scalar(ws), _scalar(wz),
                                     ys.reshape(-1)[0], yz.reshape(()), rest[0] if rest else None, **kwargs)
    np.testing.assert_array_equal(got, case.outputs[0])


BAD = [
    (dict(x=np.zeros((1, 4, 5, 5), np.float32)), TypeError, "x: expected dtype uint8 or int8, got float32"),
    (dict(x=np.zeros((4, 5, 5), np.uint8)), ValueError, "x: expected a 4-D NCHW array"),
    (dict(w=np.zeros((8, 4, 3, 3), np.float32)), TypeError, "w: expected dtype int8 or uint8"),
    (dict(w=np.zeros((8, 3, 3, 3), np.int8)), ValueError, "w: expected 4 input channels per filter"),
    (dict(group=3), ValueError, "group: expected a positive divisor"),
    (dict(strides=(0, 1)), ValueError, "strides: expected values >= 1"),
    (dict(dilations=(1, 2, 3)), TypeError, "dilations: expected an int or a pair"),
    (dict(pads=(1, -1, 0, 0)), ValueError, "pads: expected values >= 0"),
    (dict(pads="middle"), ValueError, "pads: expected 4 ints"),
    (dict(layout="CHWN"), ValueError, "layout: expected 'NCHW' or 'NHWC'"),
    (dict(x=np.zeros((1, 4, 2, 2), np.uint8), dilations=(2, 2)), ValueError, "is smaller than the 3x3 kernel"),
    (dict(x_zero_point=300), ValueError, "x_zero_point: values must lie in"),
    (dict(w_zero_point=np.zeros(3, np.int64)), ValueError, r"w_zero_point: expected a scalar or shape \(8,\)"),
    (dict(out=np.zeros((1, 8, 5, 5), np.int64)), TypeError, "out: expected dtype int32"),
    (dict(out=np.zeros((1, 8, 4, 4), np.int32)), ValueError, r"out: expected shape \(1, 8, 5, 5\)"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[b[2][:40] for b in BAD])
def test_conv2d_int8_rejects_bad_arguments(change, error, message):
    args = dict(x=np.zeros((1, 4, 5, 5), np.uint8), w=np.zeros((8, 4, 3, 3), np.int8), pads=(1, 1, 1, 1))
    args.update(change)
    x, w = args.pop("x"), args.pop("w")
    with pytest.raises(error, match=message):
        kernels.conv2d_int8(x, w, **args)


def test_conv2d_int8_rejects_overflowing_filters_and_packed_group_mismatch():
    x = np.zeros((1, 4000, 3, 3), np.uint8)
    w = np.zeros((1, 4000, 3, 3), np.int8)
    with pytest.raises(ValueError, match="filters of 36000 values .* exceed 33025"):
        kernels.conv2d_int8(x, w, w_zero_point=127)
    with pytest.raises(ValueError, match="a filter of 73800 values .* exceeds the supported 65792"):
        kernels.conv2d_int8(np.zeros((1, 8200, 3, 3), np.uint8), np.zeros((1, 8200, 3, 3), np.int8))
    packed = kernels.pack_conv_int8(np.zeros((4, 2, 1, 1), np.int8), group=2)
    with pytest.raises(ValueError, match="group: the weights were packed for group=2, got group=1"):
        kernels.conv2d_int8(np.zeros((1, 4, 2, 2), np.uint8), packed)


@pytest.mark.parametrize("change, message", [
    (dict(x_scale=0.0), "x_scale: scales must be finite and positive"),
    (dict(y_scale=None), "y_scale: required for out_dtype uint8"),
    (dict(w_scale=np.ones(3)), r"w_scale: expected a scalar or shape \(8,\)"),
    (dict(activation="gelu"), "activation: expected one of"),
    (dict(bias=np.zeros(8, np.int64)), "bias: expected float"),
    (dict(out_dtype=np.float32), "y_scale, y_zero_point: only for integer out_dtype"),
])
def test_qlinear_conv2d_rejects_bad_arguments(change, message):
    args = dict(x_scale=0.1, w_scale=0.1, y_scale=0.1, bias=None, activation=None, out_dtype=None)
    args.update(change)
    x, w = np.zeros((1, 4, 5, 5), np.uint8), np.zeros((8, 4, 3, 3), np.int8)
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.qlinear_conv2d(x, args["x_scale"], 0, w, args["w_scale"], 0, args["y_scale"], np.uint8(0),
                               args["bias"], activation=args["activation"], out_dtype=args["out_dtype"])


@pytest.mark.parametrize("group, o, k", [(1, 24, 1), (16, 16, 3)], ids=["pointwise", "depthwise"])
def test_direct_kernels_take_strided_views(rng, group, o, k):
    """The plans that take the caller's NCHW array directly copy a strided view first."""
    x, w = _operands(rng, (1, 16, 9, 12, o, k, k, (1, 1), 0, (1, 1), group))
    wide = np.zeros((1, 16, 9, 15), np.uint8)
    wide[..., :12] = x
    view = wide[..., :12]
    assert not view.flags.c_contiguous
    plan = kernels.qlinear_conv2d_plan(w, x.shape, 0.1, 128, 0.01, 0, 0.5, 128, pads=k // 2, group=group)
    np.testing.assert_array_equal(plan(view), plan(x))


# (N, C, H, W, O, K, stride, pads, group): one case per kind the plans choose (indirect wide / narrow, 1x1 NHWC,
# widened rows, groups, depthwise); per level: im2col elsewhere
ENTRY_CASES = [
    (1, 8, 7, 6, 24, 3, 1, "same", 1),
    (2, 8, 5, 5, 70, 3, 2, (1, 1, 1, 1), 1),
    (1, 16, 6, 6, 20, 1, 1, 0, 1),
    (1, 3, 9, 9, 8, 3, 2, "same", 1),
    (1, 7, 5, 5, 9, 3, 1, "same", 1),
    (1, 8, 6, 6, 12, 3, 1, "same", 2),
    (1, 16, 12, 12, 16, 3, 1, "same", 16),
    (1, 16, 6, 6, 16, 3, 2, "same", 16),
]


def _entry_plan(rng, case, layout, x_dtype, mode, per_channel):
    n, c, h, w, o, k, s, p, g = case
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, shape).astype(x_dtype)
    wt = rng.integers(-128, 128, (o, c // g, k, k)).astype(np.int8)
    zw = rng.integers(-3, 4, o) if per_channel else 0
    attrs = dict(strides=s, pads=p, group=g, layout=layout)
    if mode == "int32":
        return x, kernels.conv2d_int8_plan(wt, shape, x_dtype, x_zero_point=5, w_zero_point=zw, **attrs)
    real = mode == "float32"
    return x, kernels.qlinear_conv2d_plan(
        wt, shape, 0.02, 5, rng.uniform(0.001, 0.01, o), zw, None if real else 0.1, None if real else np.uint8(100),
        rng.integers(-500, 500, o).astype(np.int32), x_dtype=x_dtype, activation="relu",
        out_dtype=np.float32 if real else None, **attrs)


@pytest.mark.parametrize("case", ENTRY_CASES, ids=lambda case: "x".join(map(str, case[:6])) + f"g{case[-1]}")
@pytest.mark.parametrize("layout, x_dtype, mode, per_channel", [
    ("NHWC", np.uint8, "uint8", False), ("NCHW", np.int8, "float32", False), ("NCHW", np.uint8, "int32", True),
    ("NHWC", np.int8, "uint8", True)], ids=["nhwc-u8-quant", "nchw-i8-float", "nchw-u8-int32-zw", "nhwc-i8-zw"])
def test_entry_matches_the_plan(level, rng, case, layout, x_dtype, mode, per_channel):
    """Every kind's entry (one compiled call: layout copies, widening, int8 codes, row sums, every group) is the
    plan's call, bit for bit."""
    x, plan = _entry_plan(rng, case, layout, x_dtype, mode, per_channel)
    want = plan(x)
    got = np.zeros_like(want)
    assert plan.entry()([x], [got]) is None
    np.testing.assert_array_equal(got, want)


def test_entries_run_in_one_compiled_chain(rng, monkeypatch, tmp_path):
    """The indirect, pointwise, planes and depthwise entries, as one generated function (one compilation)."""
    from lowbit.runtime.compiled import CompiledSteps

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("kernels.conv.pointwise.MIN_PIXELS", 0)
    cases = [_entry_plan(rng, case, layout, np.int8, "uint8", False) for case, layout in
             ((ENTRY_CASES[0], "NCHW"), (ENTRY_CASES[2], "NCHW"), (ENTRY_CASES[6], "NCHW"), (ENTRY_CASES[7], "NHWC"))]
    wants = [plan(x) for x, plan in cases]
    outs = [np.zeros_like(w) for w in wants]
    steps = [(plan.entry(), [kernels.entry.In(i)], [out]) for i, ((_, plan), out) in enumerate(zip(cases, outs))]
    results = CompiledSteps(steps, feeds=len(cases), fetch=outs)([x for x, _ in cases])
    for result, want in zip(results, wants):
        np.testing.assert_array_equal(result, want)


def test_one_shot_calls_keep_their_plans_on_the_packed_weights(rng):
    x, w = _operands(rng, CASES[2])
    packed = kernels.pack_conv_int8(w)
    w_scale = rng.uniform(0.001, 0.01, w.shape[0])
    call = dict(pads="same", activation="relu")
    first = kernels.qlinear_conv2d(x, 0.02, 3, packed, w_scale, 0, 0.1, np.uint8(7), **call)
    plan = next(iter(packed.plans.values()))
    np.testing.assert_array_equal(kernels.qlinear_conv2d(x, 0.02, 3, packed, w_scale.copy(), 0, 0.1, np.uint8(7),
                                                         **call), first)
    assert len(packed.plans) == 1 and next(iter(packed.plans.values())) is plan
    # what the plan depends on makes a new one: an array's values, a zero point's type (the output dtype), lists
    w_scale[0] *= 2
    changed = kernels.qlinear_conv2d(x, 0.02, 3, packed, w_scale, 0, 0.1, np.uint8(7), **call)
    assert len(packed.plans) == 2 and not np.array_equal(changed, first)
    signed = kernels.qlinear_conv2d(x, 0.02, 3, packed, w_scale, 0, 0.1, np.int8(7), **call)
    assert signed.dtype == np.int8 and len(packed.plans) == 3
    raw = kernels.conv2d_int8(x, packed, x_zero_point=3, pads=[1, 1, 1, 1])
    np.testing.assert_array_equal(kernels.conv2d_int8(x, packed, x_zero_point=3, pads=[1, 1, 1, 1]), raw)
    assert len(packed.plans) == 4
    for _ in range(kernels.pack.plans.PLANS_PER_WEIGHT + 2):
        x = np.concatenate([x, x[:1]])
        kernels.conv2d_int8(x, packed, pads="same")
    assert len(packed.plans) == kernels.pack.plans.PLANS_PER_WEIGHT  # bounded


def test_one_shot_calls_share_plans_across_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    x, w = _operands(rng, CASES[1])
    packed = kernels.pack_conv_int8(w)
    inputs = [rng.integers(0, 256, x.shape).astype(np.uint8) for _ in range(8)]
    want = [kernels.conv2d_int8(v, w, x_zero_point=9, strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2))
            for v in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda v: kernels.conv2d_int8(v, packed, x_zero_point=9, strides=(2, 1),
                                                          pads=(1, 0, 2, 1), dilations=(1, 2)), inputs * 4))
    for i, result in enumerate(got):
        np.testing.assert_array_equal(result, want[i % len(inputs)])
    assert len(packed.plans) == 1
