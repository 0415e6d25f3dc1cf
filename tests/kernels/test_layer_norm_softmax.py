"""kernels.layer_norm and kernels.softmax against float64 NumPy oracles, within the error bounds their modules
state, on odd shapes; their entries are their plans' calls, bit for bit; bad arguments raise clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.entry import In

SHAPES = [(1, 1), (7, 63), (3, 5, 65), (2, 384), (4, 1, 17)]


def _layer_norm_ref(x, gamma, beta, eps, skip=None, bias=None, rms=False):
    h = x.astype(np.float64) + (0 if skip is None else skip) + (0 if bias is None else bias)
    mean = 0 * h.mean(-1, keepdims=True) if rms else h.mean(-1, keepdims=True)
    inv = 1 / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + eps)
    return (h - mean) * inv * gamma + (0 if beta is None else beta), h, mean, inv


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("skip, rms", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["layer", "skip", "rms", "skip-rms"])
def test_layer_norm_matches_oracle(rng, shape, skip, rms):
    d = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)  # a mean far from 0: centring matters
    gamma, beta = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    s = rng.standard_normal(shape).astype(np.float32) if skip else None
    bias = rng.standard_normal(d).astype(np.float32) if skip else None
    got = kernels.layer_norm(x, gamma, None if rms else beta, epsilon=1e-5, skip=s, bias=bias, rms=rms)
    want, h, mean, inv = _layer_norm_ref(x, gamma, None if rms else beta, 1e-5, s, bias, rms)
    bound = 4e-6 * (1 + np.abs(mean) * inv) * np.abs(gamma) + 1e-6 * np.abs(want)
    assert (np.abs(got - want) <= bound).all()

    plan = kernels.layer_norm_plan(shape, gamma, None if rms else beta, epsilon=1e-5, skip=skip, bias=bias, rms=rms)
    names = ("y", "inv", "sum") if skip else ("y", "inv")
    outs = [np.full(shape, np.nan, np.float32), np.full(shape[:-1], np.nan, np.float32)]
    outs += [np.full(shape, np.nan, np.float32)] if skip else []
    plan.entry(names)([x, s] if skip else [x], outs)
    np.testing.assert_array_equal(outs[0], plan(x, s))
    np.testing.assert_allclose(outs[1], inv[..., 0], rtol=1e-5)
    if skip:
        np.testing.assert_allclose(outs[2], h, rtol=1e-6, atol=1e-6)


def test_layer_norm_takes_strided_input_and_writes_out(rng):
    x = rng.standard_normal((6, 40)).astype(np.float32)
    gamma = np.ones(20, np.float32)
    out = np.empty((6, 20), np.float32)
    assert kernels.layer_norm(x[:, ::2], gamma, out=out) is out
    np.testing.assert_allclose(out, _layer_norm_ref(x[:, ::2], gamma, None, 1e-5)[0], atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, g: kernels.layer_norm(x.astype(np.float64), g), TypeError, "float32"),
    (lambda x, g: kernels.layer_norm(x, g[:3]), ValueError, "gamma"),
    (lambda x, g: kernels.layer_norm(x, None), TypeError, "gamma"),
    (lambda x, g: kernels.layer_norm(x, g, bias=g), ValueError, "only with skip"),
    (lambda x, g: kernels.layer_norm(x, g, skip=x[:2]), ValueError, "skip: expected shape"),
    (lambda x, g: kernels.layer_norm(x, g, epsilon=-1.0), ValueError, "epsilon"),
    (lambda x, g: kernels.layer_norm(np.float32(1.0), g), TypeError, "numpy.ndarray"),
    (lambda x, g: kernels.layer_norm(x, g, out=np.empty((4, 8), np.float32)), ValueError, "out"),
    (lambda x, g: kernels.layer_norm_plan(x.shape, g)(x, skip=x), ValueError, "skip: not expected"),
    (lambda x, g: kernels.layer_norm_plan(x.shape, g).entry(("mean",)), ValueError, "outputs"),
])
def test_layer_norm_rejects_bad_arguments(rng, call, error, message):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    with pytest.raises(error, match=message):
        call(x, np.ones(9, np.float32))


def _softmax_ref(x, mask, scale):
    v = scale * x.astype(np.float64) + (0 if mask is None else mask)
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape, mask_shape", [((1, 1), None), ((7, 63), (63,)), ((2, 3, 5, 65), (2, 1, 1, 65)),
                                               ((2, 3, 5, 17), (1, 3, 5, 17)), ((4, 1, 33), None),
                                               ((2, 12, 9, 9), (2, 1, 9, 9))], ids=str)
def test_softmax_matches_oracle(rng, shape, mask_shape):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    mask = None if mask_shape is None else np.where(rng.random(mask_shape) < 0.3, np.finfo(np.float32).min,
                                                    rng.standard_normal(mask_shape)).astype(np.float32)
    if mask is not None:
        mask[..., 0] = 0  # every row attends to something
    got = kernels.softmax(x, mask, scale=0.125)
    want = _softmax_ref(x, mask, 0.125)
    assert (np.abs(got - want) <= (shape[-1] + 5) * 2.0**-24 * want + 1e-30).all()
    plan = kernels.softmax_plan(shape, scale=0.125, mask_shape=mask_shape)
    out = np.full(shape, np.nan, np.float32)
    plan.entry()([x] if mask is None else [x, mask], [out])
    np.testing.assert_array_equal(out, got)


def test_softmax_rows_of_nan_and_of_masked_scores(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    x[0, 2] = np.nan
    mask = np.zeros((3, 8), np.float32)
    mask[1] = -np.inf  # a wholly masked row: the formula's 0 / 0
    y = kernels.softmax(x, mask)
    assert np.isnan(y[0]).all() and np.isnan(y[1]).all()
    np.testing.assert_allclose(y[2], _softmax_ref(x[2:], None, 1.0)[0], rtol=1e-6)
    np.testing.assert_allclose(kernels.softmax(x[2:], out=x[2:]), y[2:], rtol=0)  # in place


def test_softmax_entries_chain(rng, tmp_path, monkeypatch):
    """A layer norm and a masked softmax as one generated function."""
    from lowbit.runtime.compiled import CompiledSteps

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    mask = rng.standard_normal((2, 1, 1, 6)).astype(np.float32)
    y, z = np.empty_like(x), np.empty_like(x)
    norm = kernels.layer_norm_plan(x.shape, np.full(6, 2.0, np.float32), np.ones(6, np.float32))
    soft = kernels.softmax_plan(x.shape, scale=0.5, mask_shape=mask.shape)
    chain = CompiledSteps([(norm.entry(), [In(0)], [y]), (soft.entry(), [y, In(1)], [z])], 2, [z])
    (got,) = chain([x, mask])
    np.testing.assert_array_equal(got, soft(norm(x), mask))


@pytest.mark.parametrize("call, error, message", [
    (lambda x: kernels.softmax(x.astype(np.float16)), TypeError, "float32"),
    (lambda x: kernels.softmax(x, np.zeros((4, 3), np.float32)), ValueError, "last axis"),
    (lambda x: kernels.softmax(x, np.zeros((3, 9), np.float32)), ValueError, "broadcast"),
    (lambda x: kernels.softmax(x, [0.0] * 9), TypeError, "mask"),
    (lambda x: kernels.softmax(x, scale=np.inf), ValueError, "scale"),
    (lambda x: kernels.softmax_plan(x.shape)(x, np.zeros(9, np.float32)), ValueError, "mask: not expected"),
    (lambda x: kernels.softmax_plan(x.shape, mask_shape=(9,))(x), ValueError, "mask: expected"),
    (lambda x: kernels.softmax(x, out=np.empty((4, 8), np.float32)), ValueError, "out"),
    (lambda x: kernels.softmax(x, out=np.empty((9, 4), np.float32).T), ValueError,  # written through a copy else
     "out: expected a C-contiguous array"),
])
def test_softmax_rejects_bad_arguments(rng, call, error, message):
    with pytest.raises(error, match=message):
        call(rng.standard_normal((4, 9)).astype(np.float32))


def test_exp32_within_its_stated_ulps():
    """kernels.math_ir.exp32: within 1.5 ulp of e^x over float32's normal range; 0, inf and NaN at the ends."""
    import numba

    from kernels.math_ir import exp32

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = exp32(x[i])

    x = np.linspace(-87, 88.7, 400_001).astype(np.float32)
    y = np.empty_like(x)
    apply(x, y)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(y - want) <= 1.5 * np.spacing(want.astype(np.float32))).all()
    ends = np.array([-100, -np.inf, 89, np.inf, np.nan], np.float32)
    apply(ends, y[:5])
    assert y[0] == y[1] == 0 and y[2] == y[3] == np.inf and np.isnan(y[4])


@pytest.mark.parametrize("size", [0, 1, 7, 15, 16, 17, 63, 64, 65, 200])
def test_lane_exp_sum_is_exp32_lane_by_lane(rng, size):
    """kernels.lanes.lane_exp_sum: each value exactly the scalar exp32 of ``v - centre`` (vectors, the last
    vectors and the tail alike), their sum within float32 rounding of the exact one; -inf gives 0, NaN stays."""
    import numba

    from kernels.math_ir import exp32
    from kernels.lanes import lane_exp_sum

    @numba.njit
    def run(v, centre):
        return lane_exp_sum(v, centre)

    @numba.njit
    def scalar(v, centre, out):
        for i in range(v.size):
            out[i] = exp32(v[i] - centre)

    v = (rng.standard_normal(size) * 30).astype(np.float32)
    v[::11] = -np.inf
    centre = np.float32(v[np.isfinite(v)].max() if np.isfinite(v).any() else 0)
    want = np.empty_like(v)
    scalar(v, centre, want)
    got = v.copy()
    total = run(got, centre)
    np.testing.assert_array_equal(got, want)
    assert abs(total - want.astype(np.float64).sum()) <= (size + 1) * 2**-24 * max(want.sum(), 1)
    v[size // 2:size // 2 + 1] = np.nan
    run(v, centre)
    assert np.isnan(v[size // 2:size // 2 + 1]).all()


def test_softmax_rows_split_over_threads_give_the_same_bits(rng, monkeypatch):
    """A softmax plan split over two threads (whole rows each, the mask rows with them) equals the one-thread run."""
    x = rng.standard_normal((3, 4, 37, 29)).astype(np.float32)
    mask = np.where(rng.random((3, 1, 1, 29)) < 0.2, np.float32(-1e4), np.float32(0))
    plan = kernels.softmax_plan(x.shape, scale=0.3, mask_shape=mask.shape)
    one = plan(x, mask)
    monkeypatch.setattr(kernels.threads, "MIN_US_PER_THREAD", 1e-9)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)
    try:
        np.testing.assert_array_equal(plan(x, mask), one)
        np.testing.assert_array_equal(kernels.softmax_plan(x.shape)(x), kernels.softmax(x))
    finally:
        kernels.set_num_threads(previous)
