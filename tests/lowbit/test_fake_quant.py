"""Fake quantization: forward values against grid, gradients against the published formulas."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.quantization import fake, grid
from lowbit.quantization import scheme as S
from lowbit.quantization.grid import QParams

INT4 = S.QScheme(4, name="int4-tensor")  # signed, zero point 0: codes -8 .. 7


def lsq_sample(rng, step_shape_of_x, scheme, zero=0):
    """x and step with x / step = k + u, |u| in [0.05, 0.45]: at least 0.05 away from any
    k + 0.5 and from the (integer) clip edges qmin - zp and qmax - zp; about a third clipped."""
    shape = step_shape_of_x
    step = rng.uniform(0.05, 0.5, grid.param_shape(shape, scheme))
    lo, hi = scheme.qmin - zero, scheme.qmax - zero
    k = rng.integers(lo - 4, hi + 5, shape)
    u = rng.uniform(0.05, 0.45, shape) * rng.choice([-1, 1], shape)
    return (k + u) * grid.expand(step, shape, scheme), step


SCHEMES = [
    S.int8(),
    S.int8(signed=False, symmetric=False, granularity="channel", axis=1),
    S.QScheme(4, granularity="group", axis=-1, group_size=4),
    S.ternary(), S.binary(axis=1), S.nf4(group_size=5), S.pow2(),
]


# ---------------------------------------------------------------------------- forward

@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.granularity}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fake_quantize_equals_grid_round_trip(scheme, dtype):
    x = np.random.default_rng(0).normal(size=(6, 7, 11)).astype(dtype)
    params = grid.fit(x, scheme)
    expected = grid.dequantize(grid.quantize(x, scheme, params), scheme, params, dtype=dtype)
    out = fake.fake_quantize(x, scheme)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(fake.fake_quantize(x, scheme, params), expected)


def test_lsq_forward_is_fake_quantize_with_the_step():
    rng = np.random.default_rng(1)
    scheme = S.QScheme(4, granularity="channel", axis=0)
    x, step = lsq_sample(rng, (5, 9), scheme)
    expected = fake.fake_quantize(x, scheme, QParams(step, np.zeros(5, np.int32)))
    np.testing.assert_array_equal(fake.lsq_forward(x, step, scheme), expected)
    v = x / step[:, None]
    np.testing.assert_allclose(fake.lsq_forward(x, step, scheme), np.clip(np.rint(v), -8, 7) * step[:, None])


# ---------------------------------------------------------------------------- STE

@pytest.mark.parametrize("signed", [True, False])
def test_ste_masks_exactly_the_out_of_range_elements(signed):
    rng = np.random.default_rng(2)
    scheme = S.QScheme(8, signed=signed, symmetric=False, granularity="channel", axis=1)
    scale = np.array([0.01, 0.02, 0.05], np.float32)
    zero = np.array([0, 10, -20 if signed else 200], np.int32)
    params = QParams(scale, zero)
    x = rng.uniform(-8, 8, (50, 3)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    lo, hi = (scheme.qmin - zero) * scale, (scheme.qmax - zero) * scale
    outside = (x < lo) | (x > hi)
    assert 0 < outside.sum() < outside.size
    out = fake.ste_backward(g, x, scheme, params)
    np.testing.assert_array_equal(out, np.where(outside, 0, g))
    # every masked element is one that the forward clips
    codes = np.rint(x / scale) + zero
    assert np.all((codes[outside] < scheme.qmin) | (codes[outside] > scheme.qmax))


def test_ste_on_a_codebook_clips_at_the_table_ends():
    scheme = S.nf4(group_size=4)
    x = np.array([[-3.0, -1.0, 0.5, 2.1]])
    out = fake.ste_backward(np.ones_like(x), x, scheme, QParams(np.array([[2.0]])))
    np.testing.assert_array_equal(out, [[0, 1, 1, 0]])


# ---------------------------------------------------------------------------- LSQ

def paper_grad_step(x, s, lo, hi):
    """Esser et al. 2020, eq. 3, per element."""
    v = x / s
    return np.where(v <= lo, lo, np.where(v >= hi, hi, -v + np.round(v)))


@pytest.mark.parametrize("zero", [0, 3])
def test_lsq_grad_step_against_finite_differences(zero):
    rng = np.random.default_rng(3)
    scheme = INT4 if zero == 0 else S.QScheme(4, signed=False, symmetric=False)
    lo, hi = scheme.qmin - zero, scheme.qmax - zero
    x, step = lsq_sample(rng, (40, 30), scheme, zero)
    w = rng.normal(size=x.shape)
    v = x / step
    inside = (v > lo) & (v < hi)
    assert 0.3 < inside.mean() < 0.9

    gx, gs = fake.lsq_backward(w, x, step, scheme, zero_point=zero, grad_scale=False)
    np.testing.assert_allclose(gs, np.sum(w * paper_grad_step(x, step, lo, hi)), rtol=1e-10)
    np.testing.assert_array_equal(gx, np.where(inside, w, 0))

    # The real forward is piecewise linear in s; its derivative differs from LSQ's only by
    # the straight-through term d rint(x/s)/ds := -x/s^2 on the unclipped elements.
    eps = 1e-6 * step

    def loss(s):
        return np.sum(w * fake.lsq_forward(x, np.asarray(s), scheme, zero_point=zero))

    fd = (loss(step + eps) - loss(step - eps)) / (2 * eps)
    np.testing.assert_allclose(gs, fd - np.sum(w * v * inside), rtol=1e-6)

    # LSQ's gradients are exact for its surrogate s * clip(x/s) + s * stop_gradient(residual).
    residual = fake.lsq_forward(x, step, scheme, zero_point=zero) / step - np.clip(v, lo, hi)

    def surrogate(xx, s):
        return np.sum(w * (s * np.clip(xx / s, lo, hi) + s * residual))

    fd_s = (surrogate(x, step + eps) - surrogate(x, step - eps)) / (2 * eps)
    np.testing.assert_allclose(gs, fd_s, rtol=1e-6)
    h = 1e-7
    for i, j in rng.integers(0, 30, (20, 2)):
        e = np.zeros_like(x)
        e[i, j] = h
        fd_x = (surrogate(x + e, step) - surrogate(x - e, step)) / (2 * h)
        np.testing.assert_allclose(gx[i, j], fd_x, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scheme, shape, step_shape", [
    (INT4, (7, 3), ()),
    (S.QScheme(4, granularity="channel", axis=1), (3, 5, 4), (5,)),
    (S.QScheme(4, granularity="group", axis=-1, group_size=3), (4, 10), (4, 4)),
    (S.QScheme(8, granularity="group", axis=0, group_size=4), (9, 2), (3, 2)),
])
def test_lsq_per_group_shapes_sums_and_gradient_scale(scheme, shape, step_shape):
    rng = np.random.default_rng(4)
    x, step = lsq_sample(rng, shape, scheme)
    w = rng.normal(size=shape)
    gx, gs = fake.lsq_backward(w, x, step, scheme, grad_scale=False)
    assert gx.shape == shape and gs.shape == step_shape == step.shape
    per_element = w * paper_grad_step(x, grid.expand(step, shape, scheme), scheme.qmin, scheme.qmax)
    np.testing.assert_allclose(gs, grid.reduce(per_element, scheme, np.nansum), rtol=1e-10)
    if step_shape == (4, 4):  # groups of 3 along 10: the last group holds one column
        np.testing.assert_allclose(gs[:, 3], per_element[:, 9])
    # g = 1 / sqrt(N * Q_P), N counting the elements of each (possibly short) group
    count = grid.reduce(np.ones(shape), scheme, np.nansum)
    _, gs_scaled = fake.lsq_backward(w, x, step, scheme)
    np.testing.assert_allclose(gs_scaled, gs / np.sqrt(count * scheme.qmax), rtol=1e-12)
    _, gs_fixed = fake.lsq_backward(w, x, step, scheme, grad_scale=0.25)
    np.testing.assert_allclose(gs_fixed, gs * 0.25)


def test_lsq_gradient_scale_per_tensor_value():
    x = np.linspace(-1, 1, 24).reshape(4, 6)
    _, off = fake.lsq_backward(np.ones_like(x), x, np.float64(0.1), INT4, grad_scale=False)
    _, on = fake.lsq_backward(np.ones_like(x), x, np.float64(0.1), INT4)
    np.testing.assert_allclose(on, off / np.sqrt(24 * 7))


def test_lsq_init_step_and_a_few_descent_steps():
    rng = np.random.default_rng(5)
    scheme = S.QScheme(4, granularity="channel", axis=0)
    x = rng.normal(size=(3, 200)) * np.array([[0.5], [1.0], [2.0]])
    step = fake.lsq_init_step(x, scheme)
    np.testing.assert_allclose(step, 2 * np.abs(x).mean(axis=1) / np.sqrt(7))
    step = step * 3  # a poor start

    def mse(s):
        return np.mean((fake.lsq_forward(x, s, scheme) - x) ** 2)

    start = mse(step)
    for _ in range(50):
        err = fake.lsq_forward(x, step, scheme) - x
        gx, gs = fake.lsq_backward(2 * err / x.size, x, step, scheme, grad_scale=False)
        step = step - 0.5 * gs
    assert mse(step) < 0.5 * start


# ---------------------------------------------------------------------------- binary / ternary

def test_sign_forward_and_clipped_backward():
    x = np.array([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 1.5])
    np.testing.assert_array_equal(fake.sign_forward(x), [-1, -1, -1, 1, 1, 1, 1])
    np.testing.assert_array_equal(fake.sign_forward(x, 0.5), [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5])
    g = np.arange(1.0, 8.0)
    np.testing.assert_array_equal(fake.sign_backward(g, x), [0, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(fake.sign_backward(g, x, clip_value=0.35), [0, 0, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(fake.sign_backward(g, x, clip_value=None), g)
    np.testing.assert_array_equal(fake.sign_backward(g, x, scale=2.0), [0, 4, 6, 8, 10, 12, 0])


def test_xnor_forward_and_backward():
    rng = np.random.default_rng(6)
    scheme = S.binary(axis=0)
    x = rng.normal(size=(4, 9)) * 1.5
    alpha = np.abs(x).mean(axis=1, keepdims=True)
    signs = np.where(x < 0, -1.0, 1.0)
    np.testing.assert_allclose(fake.xnor_forward(x, scheme), alpha * signs, rtol=1e-6)
    g = rng.normal(size=x.shape)
    plain = fake.xnor_backward(g, x, scheme)
    np.testing.assert_allclose(plain, alpha * g * (np.abs(x) <= 1), rtol=1e-6)
    np.testing.assert_allclose(fake.xnor_backward(g, x, scheme, clip_value=None), alpha * g, rtol=1e-6)
    # through alpha: the extra term is the derivative of sum(g * mean|x| * sign(x0)), signs held fixed
    extra = fake.xnor_backward(g, x, scheme, through_scale=True) - plain
    h = 1e-6
    for i, j in [(0, 0), (1, 4), (3, 8), (2, 2)]:
        e = np.zeros_like(x)
        e[i, j] = h

        def loss(xx):
            return np.sum(g * np.abs(xx).mean(axis=1, keepdims=True) * signs)

        np.testing.assert_allclose(extra[i, j], (loss(x + e) - loss(x - e)) / (2 * h), rtol=1e-5)


def test_ternary_forward_follows_twn_and_backward_passes_through():
    rng = np.random.default_rng(7)
    scheme = S.ternary(axis=0)
    x = rng.normal(size=(3, 50))
    out = fake.ternary_forward(x, scheme)
    for row, got in zip(x, out):
        delta = 0.7 * np.abs(row).mean()
        keep = np.abs(row) > delta
        alpha = np.abs(row[keep]).mean()
        np.testing.assert_allclose(got, alpha * np.sign(row) * keep, rtol=1e-6)
    g = rng.normal(size=x.shape)
    np.testing.assert_array_equal(fake.ternary_backward(g, x), g)
    np.testing.assert_array_equal(fake.ternary_backward(g, x, clip_value=1.0), np.where(np.abs(x) <= 1, g, 0))


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, error, words", [
    (lambda x: fake.lsq_forward(x, np.float64(0.0), INT4), ValueError, "step"),
    (lambda x: fake.lsq_forward(x, np.float64(-1.0), INT4), ValueError, "step"),
    (lambda x: fake.lsq_forward(x, np.ones(3), INT4), ValueError, "step: expected shape ()"),
    (lambda x: fake.lsq_forward(x, np.ones(4), S.QScheme(4, granularity="channel")), ValueError, "step"),
    (lambda x: fake.lsq_backward(np.ones(3), x, np.float64(1), INT4), ValueError, "grad_out"),
    (lambda x: fake.lsq_forward(x, np.float64(1), S.binary()), ValueError, "uniform"),
    (lambda x: fake.lsq_forward(x, np.float64(1), "int4"), TypeError, "scheme"),
    (lambda x: fake.lsq_forward(x, np.float64(1), S.QScheme(4, symmetric=False)), ValueError, "zero_point"),
    (lambda x: fake.lsq_forward(x, np.float64(1), INT4, zero_point=0.5), TypeError, "zero_point"),
    (lambda x: fake.lsq_forward(x, np.float64(1), INT4, zero_point=9), ValueError, "zero_point"),
    (lambda x: fake.lsq_forward(x, np.float64(1), INT4.with_(rounding="stochastic")), ValueError, "rounding"),
    (lambda x: fake.lsq_backward(x, x, np.float64(1), INT4, grad_scale=-1), ValueError, "grad_scale"),
    (lambda x: fake.ste_backward(x, x, S.binary(), QParams(np.ones(2))), ValueError, "ste_backward needs grid"),
    (lambda x: fake.ste_backward(x, x, INT4, None), ValueError, "params"),
    (lambda x: fake.ste_backward(x, x, INT4, (1.0, 0)), TypeError, "params"),
    (lambda x: fake.fake_quantize(x, S.int8(granularity="channel"), QParams(np.ones(3))), ValueError, "params"),
    (lambda x: fake.fake_quantize(np.array(["a"]), INT4), TypeError, "x"),
    (lambda x: fake.fake_quantize(x, INT4, QParams(np.float32(1))), ValueError, "params.zero_point"),
    (lambda x: fake.ternary_forward(x, S.ternary(granularity="tensor"), QParams(np.float32(1))), ValueError,
     "params.threshold"),
    (lambda x: fake.xnor_forward(x, S.ternary()), ValueError, "binary"),
    (lambda x: fake.ternary_forward(x, S.binary()), ValueError, "ternary"),
    (lambda x: fake.sign_backward(x, x, clip_value=0), ValueError, "clip_value"),
    (lambda x: fake.ternary_backward(x[:1], x), ValueError, "grad_out"),
    (lambda x: fake.FakeQuantizer(S.nf4(), method="lsq"), ValueError, "uniform"),
    (lambda x: fake.FakeQuantizer(method="dorefa"), ValueError, "method"),
])
def test_bad_inputs_name_the_argument(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call(np.array([[0.1, -0.2], [0.3, 0.4]]))


# ---------------------------------------------------------------------------- classes, registry

@pytest.mark.parametrize("name", list(fake.QUANTIZERS))
def test_every_registered_quantizer_runs_forward_and_backward(name):
    rng = np.random.default_rng(8)
    q = fake.get(name)
    assert fake.get(q) is q and 1 <= q.precision <= 8
    with pytest.raises(RuntimeError, match="forward first"):
        q.backward(np.ones((4, 6)))
    x = rng.normal(size=(4, 6)).astype(np.float32)
    y = q(x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert q.backward(np.ones_like(x)).shape == x.shape


def test_fake_quantizer_matches_the_functions():
    rng = np.random.default_rng(9)
    scheme = S.QScheme(4, granularity="channel", axis=0)
    x = rng.normal(size=(3, 20))
    g = rng.normal(size=x.shape)
    q = fake.get("lsq", scheme=scheme)
    y = q.forward(x)
    step = fake.lsq_init_step(x, scheme)
    np.testing.assert_array_equal(q.step, step)
    np.testing.assert_array_equal(y, fake.lsq_forward(x, step, scheme))
    gx, gs = fake.lsq_backward(g, x, step, scheme)
    np.testing.assert_array_equal(q.backward(g), gx)
    np.testing.assert_array_equal(q.grad_step, gs)
    s = fake.FakeQuantizer(scheme)
    np.testing.assert_array_equal(s.forward(x), fake.fake_quantize(x, scheme))
    np.testing.assert_array_equal(s.backward(g), fake.ste_backward(g, x, scheme, grid.fit(x, scheme)))


def test_get_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="ste_sign"):
        fake.get("dorefa")
    with pytest.raises(ValueError, match="quantizer"):
        fake.get(None)
