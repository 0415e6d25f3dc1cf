"""kernels.linear_dynamic_int8: activations quantized at call time (per tensor as ONNX's DynamicQuantizeLinear,
or per row), then exact integer products scaled in float32; against a NumPy oracle on odd shapes."""

from __future__ import annotations

import numpy as np
import pytest

import kernels


def _quantized(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """ONNX DynamicQuantizeLinear in NumPy float32."""
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32(1.0 if hi == lo else hi - lo) / np.float32(255)
    zero = int(np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)))
    return np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int64), scale, zero


def _oracle(x, w, w_scale, w_zp, bias, per_row):
    rows = x.reshape(-1, x.shape[-1])
    parts = [rows[i:i + 1] for i in range(len(rows))] if per_row else [rows]
    out = []
    for part in parts:
        q, s, z = _quantized(part)
        exact = (q - z) @ (w.astype(np.int64) - np.reshape(w_zp, (-1, 1))).T
        out.append(exact * (np.float64(s) * w_scale) + (0 if bias is None else bias))
    return np.concatenate(out).reshape(x.shape[:-1] + (w.shape[0],))


@pytest.mark.parametrize("shape, n", [((1, 1), 1), ((7, 63), 65), ((2, 5, 40), 17), ((3, 129), 7)], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "row"])
def test_matches_oracle(rng, shape, n, per_row):
    x = (rng.standard_normal(shape) * 2 - 0.5).astype(np.float32)
    w = rng.integers(-128, 128, (n, shape[-1]), dtype=np.int8)
    w_scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    w_zp, bias = rng.integers(-4, 5, n), rng.standard_normal(n).astype(np.float32)
    for zp, b in ((0, None), (w_zp, bias)):
        got = kernels.linear_dynamic_int8(x, kernels.pack_int8(w), w_scale, zp, b, per_row=per_row)
        want = _oracle(x, w, w_scale, zp, b, per_row)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("num_threads", [1, 2])
def test_plan_follows_each_call_range(rng, num_threads, monkeypatch):
    """One per-tensor plan, calls of different ranges and zero points: each call's terms rederived, on the
    threaded split too (any work split between two threads)."""
    monkeypatch.setattr(kernels.threads, "MIN_US_PER_THREAD", 1e-3)
    w = rng.integers(-128, 128, (512, 320), dtype=np.int8)
    w_scale = rng.uniform(0.001, 0.02, 512).astype(np.float32)
    w_zp, bias = rng.integers(-4, 5, 512), rng.standard_normal(512).astype(np.float32)
    plan = kernels.linear_dynamic_int8_plan(w, w_scale, w_zp, bias)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(num_threads)
    try:
        for low, high in ((-1, 1), (0, 3), (-7, -0.5), (-0.2, 9)):
            x = rng.uniform(low, high, (512, 320)).astype(np.float32)
            want = _oracle(x, w, w_scale, w_zp, bias, False)
            np.testing.assert_allclose(plan(x), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    finally:
        kernels.set_num_threads(previous)


def test_no_rows(rng):
    w = rng.integers(-5, 5, (4, 8), dtype=np.int8)
    for per_row in (False, True):
        assert kernels.linear_dynamic_int8(np.zeros((0, 8), np.float32), w, 0.1, per_row=per_row).shape == (0, 4)


def test_per_row_follows_each_row_range(rng):
    """Rows of very different magnitudes: per row, each keeps its own resolution."""
    x = rng.standard_normal((4, 64)).astype(np.float32) * np.array([[1e-3], [1], [10], [100]], np.float32)
    w = rng.integers(-127, 128, (8, 64), dtype=np.int8)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) * 0.01
    errors = [np.abs(kernels.linear_dynamic_int8(x, w, 0.01, per_row=p) - exact)[0].max() for p in (False, True)]
    assert errors[1] < errors[0] / 100  # the small row: one scale for all loses it


@pytest.mark.parametrize("call, error, message", [
    (lambda x, w: kernels.linear_dynamic_int8(x.astype(np.float64), w, 0.1), TypeError, "float32"),
    (lambda x, w: kernels.linear_dynamic_int8(x[:, :5], w, 0.1), ValueError, "K = 8"),
    (lambda x, w: kernels.linear_dynamic_int8(x, w, -0.1), ValueError, "w_scale"),
    (lambda x, w: kernels.linear_dynamic_int8(x, w, 0.1, 300), ValueError, "w_zero_point"),
    (lambda x, w: kernels.linear_dynamic_int8(x, w, [0.1, 0.2]), ValueError, "w_scale"),
    (lambda x, w: kernels.linear_dynamic_int8(np.full((2, 8), np.nan, np.float32), w, 0.1), ValueError, "NaN"),
    (lambda x, w: kernels.linear_dynamic_int8(x, w, 0.1, out=np.empty((2, 3), np.float32)), ValueError, "out"),
])
def test_rejects_bad_arguments(rng, call, error, message):
    with pytest.raises(error, match=message):
        call(rng.standard_normal((2, 8)).astype(np.float32), rng.integers(-5, 5, (4, 8), dtype=np.int8))


def test_dynamic_quantize_linear_matches_onnx(rng):
    """kernels.dynamic_quantize_linear: ONNX DynamicQuantizeLinear of all of x, codes into ``out``; empty x has the
    range [0, 0]; NaN and other dtypes are errors."""
    for x in ((rng.standard_normal((3, 7, 5)) * 2 + 0.5).astype(np.float32), np.float32([2.0, 3.0]),
              np.float32([-1.0, -4.0])):
        want, scale, zero = _quantized(x)
        out = np.empty(x.shape, np.uint8)
        codes, got_scale, got_zero = kernels.dynamic_quantize_linear(x, out)
        assert codes is out and got_scale == scale and int(got_zero) == zero
        np.testing.assert_array_equal(codes, want)
    codes, scale, zero = kernels.dynamic_quantize_linear(np.zeros((0, 4), np.float32))
    assert codes.shape == (0, 4) and scale == np.float32(1) / np.float32(255) and zero == 0
    with pytest.raises(ValueError, match="NaN"):
        kernels.dynamic_quantize_linear(np.float32([1.0, np.nan]))
    with pytest.raises(TypeError, match="x: expected a float32"):
        kernels.dynamic_quantize_linear(np.zeros(3))


def test_plan_on_shared_codes(rng):
    """DynamicLinearPlan.quantized: the product of codes quantized once (MatMulIntegerToFloat's A, scale, zero
    point), equal to the plan on the float activations they came from; bad codes are clear errors."""
    x = (rng.standard_normal((2, 9, 40)) * 3).astype(np.float32)
    w = rng.integers(-128, 128, (17, 40), dtype=np.int8)
    w_scale, bias = rng.uniform(0.001, 0.02, 17).astype(np.float32), rng.standard_normal(17).astype(np.float32)
    plan = kernels.linear_dynamic_int8_plan(w, w_scale, rng.integers(-3, 4, 17), bias)
    codes, scale, zero = kernels.dynamic_quantize_linear(x)
    np.testing.assert_array_equal(plan.quantized(codes, np.asarray(scale), np.asarray(zero)), plan(x))
    for bad, error, message in ((codes.astype(np.int8), TypeError, "codes: expected a uint8"),
                                (codes[..., :7], ValueError, "K = 40"), (codes, ValueError, "scale, zero_point")):
        with pytest.raises(error, match=message):
            plan.quantized(bad, 0.0 if bad is codes else scale, zero)
    with pytest.raises(ValueError, match="one value each"):
        plan.quantized(codes, np.float32([scale, scale]), zero)
    with pytest.raises(ValueError, match="per_row"):
        kernels.linear_dynamic_int8_plan(w, w_scale, per_row=True).quantized(codes, scale, zero)


@pytest.mark.parametrize("k", [0, 1, 7, 16, 17, 63, 64, 65, 385])
def test_row_ranges_are_each_rows_min_and_max(rng, k):
    """kernels.quantize.row_ranges: per-row min and max in 16 lanes, equal to NumPy's; NaN skipped; empty rows give
    inf and -inf (the range [0, 0] for dynamic quantization)."""
    from kernels.quantize import row_ranges

    x = (rng.standard_normal((5, k)) * 10).astype(np.float32)
    if k > 3:
        x[2, 3] = np.nan
    lows, highs = np.empty(5, np.float32), np.empty(5, np.float32)
    row_ranges(x, lows, highs)
    if k:
        np.testing.assert_array_equal(lows, np.nanmin(x, axis=1))
        np.testing.assert_array_equal(highs, np.nanmax(x, axis=1))
    else:
        assert (lows == np.inf).all() and (highs == -np.inf).all()


def test_one_shot_keeps_its_plan_on_the_packed_weight(rng):
    """linear_dynamic_int8 with a packed weight prepares once per set of arguments; new arguments, a new plan."""
    w = kernels.pack_int8(rng.integers(-128, 128, (9, 20), dtype=np.int8))
    x = rng.standard_normal((3, 20)).astype(np.float32)
    scale = np.full(9, 0.01, np.float32)
    first = kernels.linear_dynamic_int8(x, w, scale)
    assert len(w.plans) == 1
    np.testing.assert_array_equal(kernels.linear_dynamic_int8(x, w, scale), first)
    assert len(w.plans) == 1
    kernels.linear_dynamic_int8(x, w, scale * 2, per_row=True)
    assert len(w.plans) == 2
