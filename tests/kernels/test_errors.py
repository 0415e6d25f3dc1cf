"""Bad input gets a TypeError or ValueError that names the argument, before any compiled code runs."""

from __future__ import annotations

import numpy as np
import pytest

import kernels

A = np.zeros((4, 8), np.uint8)
W = np.zeros((3, 8), np.int8)
LAYER = dict(a_scale=0.1, a_zero_point=0, w_scale=0.1)


@pytest.mark.parametrize("a,b,error,match", [
    (A.astype(np.float32), W, TypeError, "a: expected dtype uint8 or int8, got float32"),
    (A.tolist(), W, TypeError, "a: expected a numpy.ndarray"),
    (A, W.astype(np.int16), TypeError, "b: expected dtype int8, got int16"),
    (A, W.astype(np.uint8), TypeError, "b: expected dtype int8, got uint8"),
    (A[0], W, ValueError, r"a: expected a 2-D array, got shape \(8,\)"),
    (A, W[None], ValueError, r"b: expected a 2-D array, got shape \(1, 3, 8\)"),
    (np.zeros((4, 7), np.uint8), W, ValueError, r"a: expected K = 8 columns to match b of shape \(3, 8\), got shape \(4, 7\)"),
    (np.zeros((4, 16), np.uint8)[:, ::2], W, ValueError, "a: expected a C-contiguous array"),
    (A, np.zeros((3, 16), np.int8)[:, ::2], ValueError, "b: expected a C-contiguous array"),
    (A, np.zeros((0, 8), np.int8), ValueError, "b: expected a non-empty matrix"),
])
def test_gemm_bad_operands(a, b, error, match):
    with pytest.raises(error, match=match):
        kernels.gemm_int8(a, b)


@pytest.mark.parametrize("out,error,match", [
    (np.zeros((4, 3), np.int64), TypeError, "out: expected dtype int32, got int64"),
    (np.zeros((3, 4), np.int32), ValueError, r"out: expected shape \(4, 3\), got \(3, 4\)"),
    (np.zeros((4, 6), np.int32)[:, ::2], ValueError, "out: expected a C-contiguous array"),
])
def test_gemm_bad_out(out, error, match):
    with pytest.raises(error, match=match):
        kernels.gemm_int8(A, W, out=out)


def test_gemm_read_only_out():
    out = np.zeros((4, 3), np.int32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        kernels.gemm_int8(A, W, out=out)


@pytest.mark.parametrize("kw,error,match", [
    (dict(a_zero_point=256), ValueError, r"a_zero_point: values must lie in \[0, 255\]"),
    (dict(a_zero_point=1.5), TypeError, "a_zero_point: expected an integer"),
    (dict(a_zero_point=[1, 2]), ValueError, "a_zero_point: expected a scalar"),
    (dict(b_zero_point=200), ValueError, r"b_zero_point: values must lie in \[-128, 127\]"),
    (dict(b_zero_point=np.zeros(4, np.int8)), ValueError, r"b_zero_point: expected a scalar or shape \(3,\)"),
])
def test_gemm_bad_zero_points(kw, error, match):
    with pytest.raises(error, match=match):
        kernels.gemm_int8(A, W, **kw)


def test_gemm_k_past_overflow_bound_names_the_limit():
    k = kernels.max_k_int32(np.uint8, 0, 0) + 1
    with pytest.raises(ValueError, match=f"K = {k} exceeds {k - 1}.*linear_int8"):
        kernels.gemm_int8(np.zeros((1, k), np.uint8), np.zeros((1, k), np.int8))


def test_gemm_bound_shrinks_with_zero_points():
    limit = kernels.max_k_int32(np.uint8, a_zero_point=255, b_zero_point=127)
    assert limit == (2**31 - 1) // (255 * 255)
    k = limit + 1
    with pytest.raises(ValueError, match=f"exceeds {limit}"):
        kernels.gemm_int8(np.zeros((1, k), np.uint8), np.zeros((1, k), np.int8), a_zero_point=255, b_zero_point=127)


@pytest.mark.parametrize("kw,error,match", [
    (dict(activation="gelu"), ValueError, r"activation: expected one of .* got 'gelu'"),
    (dict(out_dtype=np.int32), TypeError, "out_dtype: expected one of float32, uint8, int8, got int32"),
    (dict(out_dtype=np.uint8), ValueError, "out_scale: required for out_dtype uint8"),
    (dict(out_scale=0.5), ValueError, "out_scale, out_zero_point: only for integer out_dtype"),
    (dict(out_dtype=np.int8, out_scale=0.5, out_zero_point=200), ValueError, r"out_zero_point: values must lie in \[-128, 127\]"),
    (dict(out_dtype=np.int8, out_scale=-1.0), ValueError, "out_scale: scales must be finite and positive"),
    (dict(a_scale=0.0), ValueError, "a_scale: scales must be finite and positive"),
    (dict(a_scale=np.ones(3)), ValueError, "a_scale: expected a scalar"),
    (dict(w_scale=np.ones(4)), ValueError, r"w_scale: expected a scalar or shape \(3,\), got shape \(4,\)"),
    (dict(w_scale="big"), TypeError, "w_scale: expected a float"),
    (dict(w_scale=np.array([0.1, np.nan, 0.1])), ValueError, "w_scale: scales must be finite and positive"),
    (dict(bias=np.zeros(4, np.float32)), ValueError, r"bias: expected shape \(3,\), got \(4,\)"),
    (dict(bias=np.zeros(3, np.int64)), TypeError, "bias: expected float .* or int32"),
    (dict(w_zero_point=np.array([0, 1, 2, 3])), ValueError, r"w_zero_point: expected a scalar or shape \(3,\)"),
])
def test_linear_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        kernels.linear_int8(A, W, **{**LAYER, **kw})


def test_linear_bad_out():
    with pytest.raises(TypeError, match="out: expected dtype uint8, got float32"):
        kernels.linear_int8(A, W, **LAYER, out_dtype=np.uint8, out_scale=1.0, out=np.zeros((4, 3), np.float32))


def test_linear_uint8_weight_zero_point_range():
    with pytest.raises(ValueError, match=r"w_zero_point: values must lie in \[0, 255\]"):
        kernels.linear_int8(A, W.view(np.uint8), **LAYER, w_zero_point=-1)


def test_bad_thread_env(monkeypatch):
    monkeypatch.setenv("LOWBIT_NUM_THREADS", "many")
    from kernels import threads
    monkeypatch.setattr(threads, "_setting", None)
    with pytest.raises(ValueError, match="LOWBIT_NUM_THREADS must be a positive integer, got 'many'"):
        kernels.get_num_threads()
