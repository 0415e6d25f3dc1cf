"""kernels.conv2d_float32 / conv2d_float32_plan against the float64 NumPy oracle of kernels.reference.conv."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.reference.conv import conv2d_float32_ref

RTOL = 1e-5
BOUNDS = {None: (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}


def operands(n, c, h, w, o, cg, kh, kw, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    wt = rng.standard_normal((o, cg, kh, kw), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32) if bias else None
    return x, wt, b


def check(y, x, w, bias, activation=None, **attrs):
    """``y`` equals the float64 oracle within float32 rounding: ``RTOL`` of the sum of the magnitudes it adds."""
    lo, hi = BOUNDS[activation] if not isinstance(activation, tuple) else activation[1:]
    want = conv2d_float32_ref(x, w, bias, lo=lo, hi=hi, **attrs)
    scale = conv2d_float32_ref(np.abs(x), np.abs(w), None if bias is None else np.abs(bias), **attrs)
    assert y.dtype == np.float32 and y.shape == want.shape
    err = np.abs(y.astype(np.float64) - want)
    ok = (err <= RTOL * scale + 1e-30) | (np.isnan(y) & np.isnan(want))
    assert ok.all(), f"max error {err.max():.3g} vs scale {scale.max():.3g}"


# (N, C, H, W, O, KH, KW, strides, pads, dilations, group): every kernel kind and its edges
CASES = [
    (1, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),         # im2col, stride 1, rows of 8
    (3, 9, 9, 11, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),         # pixel tiles of 64 channels, small planes
    (2, 128, 5, 6, 96, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),        # small planes, large filters: NHWC tiles
    (2, 64, 17, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),       # pixel tiles of 64 channels
    (1, 33, 21, 19, 32, 3, 3, (1, 1), (0, 1, 1, 0), (1, 1), 1),       # pixel tiles of 32, asymmetric pads
    (1, 65, 7, 5, 96, 3, 3, (2, 2), (0, 1, 2, 0), (1, 1), 1),         # pixel tiles of 32, stride 2, asymmetric
    (1, 16, 12, 13, 64, 3, 3, (1, 2), (0, 0, 0, 0), (2, 1), 2),       # pixel tiles, groups, unpadded, dilation
    (3, 64, 1, 1, 128, 1, 1, (1, 1), (1, 1, 1, 1), (1, 1), 1),        # pixel tiles, all padding but one pixel
    (3, 7, 33, 17, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),         # wide panels, O < MR
    (1, 63, 9, 65, 65, 3, 3, (1, 1), (0, 2, 1, 0), (1, 1), 1),        # wide, asymmetric pads, O > 64
    (3, 7, 9, 11, 5, 3, 3, (2, 2), (1, 0, 2, 1), (1, 1), 1),          # im2col stride 2, asymmetric
    (1, 65, 7, 7, 63, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),         # pointwise, partial panel
    (3, 64, 8, 8, 7, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),          # pointwise, full panels
    (1, 65, 5, 5, 63, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),         # strided 1x1
    (1, 3, 33, 35, 17, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),        # a stem
    (3, 6, 7, 7, 9, 3, 3, (1, 1), (1, 1, 1, 1), (2, 2), 3),           # groups, dilation
    (1, 6, 13, 12, 4, 3, 2, (3, 1), (2, 1, 0, 2), (1, 2), 2),         # stride 3: the scalar copy
    (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),           # one value
    (1, 1, 7, 7, 3, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),           # one input channel
    (3, 12, 9, 9, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 12),        # depthwise 3x3 s1 (unrolled)
    (1, 63, 16, 16, 63, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 63),      # depthwise 3x3 s2 (unrolled)
    (1, 7, 11, 10, 7, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1), 7),         # depthwise 5x5 s2
    (3, 5, 8, 9, 5, 5, 5, (1, 1), (2, 1, 2, 3), (1, 1), 5),           # depthwise 5x5 s1, asymmetric
    (1, 6, 10, 10, 6, 3, 3, (2, 1), (1, 1, 1, 1), (1, 2), 6),         # depthwise general: strides, dilation
    (1, 65, 8, 8, 65, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 65),        # depthwise unpadded
    (2, 5, 9, 12, 5, 3, 3, (1, 2), (1, 1, 1, 1), (1, 1), 5),          # depthwise 3x3 unrolled, strides (1, 2)
    (1, 5, 12, 9, 5, 3, 3, (2, 1), (0, 1, 1, 0), (1, 1), 5),          # depthwise 3x3 unrolled, strides (2, 1)
    (2, 9, 11, 12, 9, 3, 3, (1, 1), (2, 0, 1, 2), (2, 3), 9),         # depthwise general: equal strides, dilation
    (1, 4, 9, 13, 4, 2, 3, (3, 3), (1, 1, 0, 0), (1, 1), 4),          # depthwise general: stride 3
    (1, 7, 6, 6, 7, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 7),           # depthwise 1x1
    (3, 4, 7, 7, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),           # depthwise with 2 filters per channel
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"-s{c[7][0]}{c[7][1]}-g{c[10]}")
@pytest.mark.parametrize("bias, activation", [(True, "relu"), (False, None), (True, "relu6")])
def test_matches_oracle(case, bias, activation):
    n, c, h, w, o, kh, kw, strides, pads, dilations, group = case
    x, wt, b = operands(n, c, h, w, o, c // group, kh, kw, bias=bias)
    attrs = dict(strides=strides, pads=pads, dilations=dilations, group=group)
    y = kernels.conv2d_float32(x, wt, b, activation=activation, **attrs)
    check(y, x, wt, b, activation, **attrs)


# Depthwise on small planes, channels along the vectors (N, C, H, W, K, strides, pads): channels around the block of
# 64 and its vectors of 16, planes down to one value, padding taps everywhere
SMALL_DEPTHWISE = [
    (2, 1, 1, 1, 3, (1, 1), (1, 1, 1, 1)),
    (1, 15, 2, 3, 3, (1, 1), (1, 1, 1, 1)),
    (3, 16, 3, 3, 3, (2, 2), (1, 1, 1, 1)),
    (1, 17, 5, 5, 3, (2, 1), (0, 1, 2, 0)),
    (2, 63, 6, 6, 3, (1, 1), (1, 1, 1, 1)),
    (1, 960, 3, 3, 3, (1, 1), (1, 1, 1, 1)),
    (2, 65, 6, 6, 3, (2, 2), (0, 0, 1, 1)),
    (1, 16, 7, 7, 5, (1, 1), (2, 2, 2, 2)),
    (1, 17, 7, 7, 3, (1, 2), (1, 0, 0, 2)),
    (2, 63, 5, 5, 3, (1, 1), (0, 0, 0, 0)),
    (1, 15, 2, 3, 3, (2, 2), (0, 1, 2, 1)),
    (1, 64, 6, 6, 3, (1, 1), (3, 3, 3, 3)),  # outputs with no tap inside the plane: the clamped bias
]


@pytest.mark.parametrize("case", SMALL_DEPTHWISE,
                         ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[5][0]}{c[5][1]}-p{''.join(map(str, c[6]))}")
@pytest.mark.parametrize("bias, activation", [(True, "relu"), (False, None), (True, "relu6")])
def test_small_plane_depthwise(case, bias, activation):
    n, c, h, w, k, strides, pads = case
    x, wt, b = operands(n, c, h, w, c, 1, k, k, bias=bias)
    attrs = dict(strides=strides, pads=pads, group=c)
    plan = kernels.conv2d_float32_plan(wt, x.shape, b, activation=activation, **attrs)
    assert plan.kind == "depthwise" and plan.scratch_sizes == (64 * h * w, 64 * plan.out_shape[2] * plan.out_shape[3])
    out = np.full(plan.out_shape, np.nan, np.float32)
    for scale in (1.0, -3.0):  # a second call on the scratch kept
        assert plan(x * scale, out) is out
        check(out, x * scale, wt, b, activation, **attrs)


def test_plan_kinds_and_reuse():
    x, w, b = operands(2, 32, 16, 16, 24, 32, 3, 3)
    w64 = np.concatenate([w] * 3)[:64]
    deep = operands(2, 128, 6, 6, 64, 128, 3, 3)  # filters out of L2, few pixels per image
    expected = {"wide": (x, w), "im2col": (x[:, :, :8, :8].copy(), w), "pointwise": (x, w[:, :, :1, :1].copy()),
                "pixels": (x, w64), "nhwc-pixels": deep[:2]}
    for kind, (xs, ws) in expected.items():
        pads = (0, 0, 0, 0) if kind == "pointwise" else (1, 1, 1, 1)
        bs = np.resize(b, ws.shape[0])
        plan = kernels.conv2d_float32_plan(ws, xs.shape, bs, pads=pads, activation="relu")
        assert plan.kind == kind, plan
        out = np.full(plan.out_shape, np.nan, np.float32)
        for scale in (1.0, -2.0):  # a second call on other values
            assert plan(xs * scale, out) is out
            check(out, xs * scale, ws, bs, "relu", pads=pads)
    dw = kernels.conv2d_float32_plan(w[:, :1].repeat(2, axis=0)[:32], x.shape, group=32, pads="same")
    assert dw.kind == "depthwise" and dw.out_shape == (2, 32, 16, 16)


def test_string_pads_and_clip():
    x, w, b = operands(1, 5, 9, 8, 6, 5, 3, 3)
    for pads, resolved in (("same", (1, 1, 1, 1)), ("valid", (0, 0, 0, 0)), ("same_lower", (1, 1, 1, 0))):
        strides = 2 if pads == "same_lower" else 1
        y = kernels.conv2d_float32(x, w, b, pads=pads, strides=strides, activation=("clip", -0.5, 0.25))
        check(y, x, w, b, ("clip", -0.5, 0.25), pads=resolved, strides=(strides, strides))


@pytest.mark.parametrize("group", [1, 8])
def test_nan_propagates_through_relu(group):
    x, w, b = operands(1, 8, 6, 6, 8, 8 // group, 3, 3)
    x[0, 3, 2, 2] = np.nan
    y = kernels.conv2d_float32(x, w, b, pads=1, group=group, activation="relu")
    check(y, x, w, b, "relu", pads=(1, 1, 1, 1), group=group)
    assert np.isnan(y).any() and not np.isnan(y[:, :, 5, 5]).any()


@pytest.mark.parametrize("n, c, size, o, group, kind", [(2, 64, 24, 48, 1, "wide"), (2, 64, 24, 64, 1, "pixels"),
                                                      (4, 128, 32, 128, 128, "depthwise"),
                                                      (8, 960, 8, 960, 960, "depthwise")])
def test_threads_split(n, c, size, o, group, kind):
    x, w, b = operands(n, c, size, size, o, c // group, 3, 3)
    plan = kernels.conv2d_float32_plan(w, x.shape, b, pads=1, group=group)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)
    try:
        y = plan(x)
    finally:
        kernels.set_num_threads(previous)
    assert plan.kind == kind and len(plan.scratch) == 2  # two threads, each with its scratch
    check(y, x, w, b, pads=(1, 1, 1, 1), group=group)
    check(plan(x), x, w, b, pads=(1, 1, 1, 1), group=group)  # again, on the scratch kept


def test_non_contiguous_input_is_copied():
    x, w, b = operands(2, 9, 10, 12, 4, 9, 3, 3)
    view = x[:, :, :, ::2]
    y = kernels.conv2d_float32(view, w, b, pads=1)
    check(y, np.ascontiguousarray(view), w, b, pads=(1, 1, 1, 1))
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    check(kernels.conv2d_float32(nhwc, w, b, pads=1), x, w, b, pads=(1, 1, 1, 1))


def test_float64_weights_are_used_as_float32():
    x, w, b = operands(1, 4, 6, 6, 3, 4, 3, 3)
    y = kernels.conv2d_float32(x, w.astype(np.float64), b.astype(np.float64))
    check(y, x, w, b)


def test_bad_input():
    x, w, b = operands(1, 4, 6, 6, 3, 4, 3, 3)
    plan = kernels.conv2d_float32_plan(w, x.shape, b)
    with pytest.raises(TypeError, match="x: expected dtype float32, got float64"):
        plan(x.astype(np.float64))
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray of float32, got list"):
        plan(x.tolist())
    with pytest.raises(ValueError, match=r"x: expected NCHW shape \(1, 4, 6, 6\) as prepared, got \(1, 4, 6, 7\)"):
        plan(np.zeros((1, 4, 6, 7), np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 3, 4, 4\)"):
        plan(x, np.empty((1, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype float32, got float64"):
        plan(x, np.empty((1, 3, 4, 4), np.float64))
    with pytest.raises(ValueError, match="out: expected a C-contiguous array"):
        plan(x, np.empty((1, 3, 4, 8), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="x: expected a 4-D NCHW array, got shape"):
        kernels.conv2d_float32(x[0], w)
    with pytest.raises(TypeError, match="w: expected a float dtype, got int8"):
        kernels.conv2d_float32(x, w.astype(np.int8))
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\), one value per filter, got \(4,\)"):
        kernels.conv2d_float32(x, w, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="group: expected a positive divisor of both the input channels"):
        kernels.conv2d_float32(x, w, group=2)
    with pytest.raises(ValueError, match="w: expected 2 input channels per filter"):
        kernels.conv2d_float32(x, np.zeros((4, 4, 3, 3), np.float32), group=2)
    with pytest.raises(ValueError, match="activation: expected one of"):
        kernels.conv2d_float32(x, w, activation="gelu")
    with pytest.raises(ValueError, match="x_shape: expected 4 ints"):
        kernels.conv2d_float32_plan(w, (1, 4, 6))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        kernels.conv2d_float32(x[:, :, :2], w)


# ---- NHWC ----------------------------------------------------------------------------------------------------------

def nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def run_nhwc(x, w, b, activation=None, kind=None, **attrs):
    """The NHWC plan on ``nhwc(x)``, checked against the oracle (NCHW ``x``); returns the plan."""
    plan = kernels.conv2d_float32_plan(w, nhwc(x).shape, b, activation=activation, layout="NHWC", **attrs)
    assert kind is None or plan.kind == kind, plan
    out = np.full(plan.out_shape, np.nan, np.float32)
    for scale in (1.0, -2.0):  # a second call on the scratch kept
        assert plan(nhwc(x * scale), out) is out
        check(out.transpose(0, 3, 1, 2), x * scale, w, b, activation, **attrs)
    return plan


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"-s{c[7][0]}{c[7][1]}-g{c[10]}")
@pytest.mark.parametrize("bias, activation", [(True, "relu6"), (False, None)])
def test_nhwc_matches_oracle(case, bias, activation):
    n, c, h, w, o, kh, kw, strides, pads, dilations, group = case
    x, wt, b = operands(n, c, h, w, o, c // group, kh, kw, bias=bias)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": group}
    y = kernels.conv2d_float32(nhwc(x), wt, b, activation=activation, layout="NHWC", **attrs)
    check(y.transpose(0, 3, 1, 2), x, wt, b, activation, **attrs)


# NHWC kinds and their edges (N, C, H, W, O, K, strides, pads, dilations, group, kind)
NHWC_CASES = [
    (2, 3, 7, 7, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "pixels"),     # one filter: one masked vector
    (1, 1, 7, 1, 7, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "pixels"),     # one channel, one column
    (2, 7, 1, 7, 24, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, "pixels"),    # pointwise, tail of 2 vectors
    (3, 65, 7, 7, 65, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, "pixels"),   # pointwise: a block of 64 and one of 1
    (2, 65, 7, 7, 40, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, "pixels"),   # tail of 3 vectors, stride 2
    (2, 24, 7, 7, 63, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1, "pixels"),   # strided 1x1, a masked whole block
    (2, 96, 5, 5, 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "pixels"),   # K = 864: two chunks of partial sums
    (3, 7, 20, 20, 16, 3, (1, 1), (1, 0, 2, 1), (2, 1), 1, "pixels"),  # several items, tiles across images
    (1, 3, 13, 11, 96, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, "pixels"),  # a stem, 64 + 32 filters
    (2, 8, 7, 7, 32, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, "pixels"),    # groups of 16 filters
    (2, 6, 7, 7, 9, 3, (1, 1), (1, 1, 1, 1), (1, 1), 3, "nchw-im2col"),  # groups of 3 filters: through NCHW
    (2, 4, 7, 7, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, "nchw-im2col"),  # depthwise, 2 filters per channel
    (2, 7, 7, 7, 7, 1, (1, 1), (0, 0, 0, 0), (1, 1), 7, "nchw-depthwise"),
    (1, 3, 9, 9, 3, 7, (1, 1), (3, 3, 3, 3), (1, 1), 3, "nchw-depthwise"),
    (2, 65, 7, 7, 65, 3, (1, 1), (1, 1, 1, 1), (1, 1), 65, "depthwise"),  # 4 whole vectors and 1 channel
    (1, 1, 1, 1, 2, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "pixels"),     # one value, all padding but one tap
    (2, 1, 1, 1, 1, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "depthwise"),
    (2, 7, 7, 1, 7, 3, (2, 1), (1, 1, 1, 1), (1, 1), 7, "depthwise"),
    (1, 24, 7, 7, 24, 3, (2, 2), (0, 1, 2, 0), (1, 2), 24, "depthwise"),
    (2, 17, 9, 8, 17, 5, (1, 2), (2, 2, 1, 2), (1, 1), 17, "depthwise"),
    (1, 16, 6, 6, 16, 3, (1, 1), (3, 3, 3, 3), (1, 1), 16, "depthwise"),  # outputs with no tap inside
    (1, 32, 7, 7, 32, 3, (1, 1), (0, 0, 0, 0), (1, 1), 32, "depthwise"),  # unpadded
]


@pytest.mark.parametrize("case", NHWC_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6][0]}{c[6][1]}-g{c[9]}")
@pytest.mark.parametrize("activation", ["relu", None])
def test_nhwc_kinds(case, activation):
    n, c, h, w, o, k, strides, pads, dilations, group, kind = case
    x, wt, b = operands(n, c, h, w, o, c // group, k, k)
    run_nhwc(x, wt, b, activation, kind, strides=strides, pads=pads, dilations=dilations, group=group)


def test_nhwc_clip_nan_and_no_bias():
    x, w, _ = operands(2, 16, 6, 6, 16, 1, 3, 3)
    x[1, 3, 2, 2] = np.nan
    for group, kind in ((16, "depthwise"), (1, "pixels")):
        wg = w if group == 16 else np.concatenate([w] * 16, axis=1)
        plan = run_nhwc(x, wg, None, ("clip", -0.5, 0.25), kind, pads=(1, 1, 1, 1), group=group)
        y = plan(nhwc(x))
        assert np.isnan(y[1]).any() and not np.isnan(y[0]).any() and not np.isnan(y[1, 5, 5]).any()


@pytest.mark.parametrize("n, c, size, group, kind", [(4, 64, 16, 1, "pixels"), (8, 128, 32, 128, "depthwise")])
def test_nhwc_threads_split(n, c, size, group, kind):
    x, w, b = operands(n, c, size, size, c, c // group, 3, 3)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)
    try:
        plan = run_nhwc(x, w, b, None, kind, pads=(1, 1, 1, 1), group=group)
    finally:
        kernels.set_num_threads(previous)
    assert len(plan.scratch) == 2  # two threads, each with its scratch


def test_nhwc_non_contiguous_input_and_out():
    x, w, b = operands(2, 9, 10, 12, 4, 9, 3, 3)
    view = nhwc(x)[:, :, ::2]
    y = kernels.conv2d_float32(view, w, b, pads=1, layout="NHWC")
    check(y.transpose(0, 3, 1, 2), x[:, :, :, ::2], w, b, pads=(1, 1, 1, 1))
    out = np.empty((2, 10, 6, 4), np.float32)
    assert kernels.conv2d_float32(view, w, b, pads=1, layout="NHWC", out=out) is out
    np.testing.assert_array_equal(out, y)


def test_nhwc_bad_input():
    x, w, b = operands(1, 4, 6, 6, 3, 4, 3, 3)
    xn = nhwc(x)
    with pytest.raises(ValueError, match="layout: expected 'NCHW' or 'NHWC', got 'nhwc'"):
        kernels.conv2d_float32_plan(w, xn.shape, layout="nhwc")
    with pytest.raises(ValueError, match="layout: expected 'NCHW' or 'NHWC', got None"):
        kernels.conv2d_float32(xn, w, layout=None)
    plan = kernels.conv2d_float32_plan(w, xn.shape, b, layout="NHWC")
    assert plan.out_shape == (1, 4, 4, 3)
    with pytest.raises(ValueError, match=r"x: expected NHWC shape \(1, 6, 6, 4\) as prepared, got \(1, 4, 6, 6\)"):
        plan(x)
    with pytest.raises(TypeError, match="x: expected dtype float32, got float16"):
        plan(xn.astype(np.float16))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 4, 4, 3\)"):
        plan(xn, np.empty((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="x: expected a 4-D NHWC array, got shape"):
        kernels.conv2d_float32(xn[0], w, layout="NHWC")
    with pytest.raises(ValueError, match=r"x_shape: expected 4 ints \(N, H, W, C\)"):
        kernels.conv2d_float32_plan(w, (1, 6, 6), layout="NHWC")
    with pytest.raises(ValueError, match="w: expected 8 input channels per filter for x with 8 channels"):
        kernels.conv2d_float32(np.zeros((1, 6, 6, 8), np.float32), w, layout="NHWC")


ENTRY_CASES = [dict(c=16, o=64, k=3, pads=(1, 1, 1, 1)),  # pixels
               dict(c=8, o=8, k=3, group=8, pads=(1, 1, 1, 1)),  # depthwise
               dict(c=3, o=10, k=3, strides=(2, 2)),  # channel-major panels
               dict(c=16, o=24, k=1)]


def _entry_plan(rng, layout: str, case: dict):
    c, o, k, group = case["c"], case["o"], case["k"], case.get("group", 1)
    w = rng.standard_normal((o, c // group, k, k)).astype(np.float32)
    shape = (2, c, 9, 7) if layout == "NCHW" else (2, 9, 7, c)
    plan = kernels.conv2d_float32_plan(w, shape, rng.standard_normal(o).astype(np.float32), group=group,
                                       strides=case.get("strides", (1, 1)), pads=case.get("pads", (0, 0, 0, 0)),
                                       activation="relu", layout=layout)
    return rng.standard_normal(shape).astype(np.float32), plan


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", ENTRY_CASES)
def test_entry_matches_the_plan(rng, layout, case):
    x, plan = _entry_plan(rng, layout, case)
    entry = plan.entry()
    if entry is None:
        pytest.skip(f"kind {plan.kind} runs another plan between transposes")
    want = plan(x)
    got = np.empty_like(want)
    entry([x], [got])
    np.testing.assert_array_equal(got, want)


def test_entries_run_in_one_compiled_chain(rng, monkeypatch, tmp_path):
    """Every kind's entry, both layouts, as one generated function (one compilation)."""
    from kernels.entry import In
    from lowbit.runtime.compiled import CompiledSteps

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    cases = [_entry_plan(rng, layout, case) for layout in ("NCHW", "NHWC") for case in ENTRY_CASES]
    cases = [(x, plan) for x, plan in cases if plan.entry() is not None]
    wants = [plan(x) for x, plan in cases]
    outs = [np.zeros_like(w) for w in wants]
    steps = [(plan.entry(), [In(i)], [out]) for i, ((_, plan), out) in enumerate(zip(cases, outs))]
    for result, want in zip(CompiledSteps(steps, feeds=len(cases), fetch=outs)([x for x, _ in cases]), wants):
        np.testing.assert_array_equal(result, want)


def test_one_plan_serves_several_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    w = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    plan = kernels.conv2d_float32_plan(w, (1, 16, 9, 7), pads=(1, 1, 1, 1))
    xs = [rng.standard_normal((1, 16, 9, 7)).astype(np.float32) for _ in range(4)]
    wants = [plan(x) for x in xs]
    with ThreadPoolExecutor(8) as pool:
        gots = list(pool.map(lambda i: plan(xs[i % 4]), range(200)))
    for i, got in enumerate(gots):
        np.testing.assert_array_equal(got, wants[i % 4])
