"""ONNX conformance of the int8 matrix products.

``MatMulInteger`` maps onto ``kernels.gemm_int8`` and ``QLinearMatMul`` onto
``kernels.linear_int8``, both with ONNX's ``B`` ([K, N]) transposed into our
weights ([N, K], one row per output channel). Expected outputs come from the ONNX
node tests in ``shared/conformance/onnx-node``; the cases skip without onnx or
the data. A random test also checks ``linear_int8`` against ``kernels.reference``
and against ONNX's QLinearMatMul formula in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.reference import linear_int8_ref
from tests import conformance


def _int(zero_point: np.ndarray | None) -> int:
    """A per-tensor ONNX zero point (shape [] or [1]) as a Python int; absent means 0."""
    if zero_point is None:
        return 0
    assert zero_point.size == 1, f"per-tensor zero point expected, got shape {zero_point.shape}"
    return int(zero_point.reshape(-1)[0])


def _weights(b: np.ndarray) -> np.ndarray:
    """ONNX ``B`` [K, N] as our C-contiguous weights [N, K]."""
    return np.ascontiguousarray(b.T)


def _batched(a: np.ndarray, b: np.ndarray, product) -> np.ndarray:
    """Apply the 2-D ``product(a2d, b2d)`` over the leading batch dimension of a 3-D matmul."""
    if a.ndim == 2 and b.ndim == 2:
        return product(np.ascontiguousarray(a), b)
    assert a.ndim == 3 and b.ndim in (2, 3), (a.shape, b.shape)
    if b.ndim == 2:
        b = np.broadcast_to(b, (a.shape[0], *b.shape))
    assert b.shape[0] == a.shape[0], (a.shape, b.shape)
    return np.stack([product(np.ascontiguousarray(a[i]), b[i]) for i in range(a.shape[0])])


@pytest.mark.parametrize("name", conformance.params("MatMulInteger"))
def test_matmulinteger(name):
    case = conformance.load_case(name)
    a, b = case.inputs[:2]
    za = _int(case.inputs[2] if len(case.inputs) > 2 else None)
    zb = _int(case.inputs[3] if len(case.inputs) > 3 else None)
    (expected,) = case.outputs

    def product(a2, b2):
        w = _weights(b2)
        zw = zb
        if w.dtype == np.uint8:  # exact shift to int8: (w - zb) == ((w ^ 0x80) as int8) - (zb - 128)
            w, zw = (w ^ 0x80).view(np.int8), zb - 128
        return kernels.gemm_int8(a2, w, a_zero_point=za, b_zero_point=zw)

    got = _batched(a, b, product)
    assert got.dtype == np.int32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", conformance.params("QLinearMatMul"))
def test_qlinearmatmul(name):
    case = conformance.load_case(name)
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = case.inputs
    (expected,) = case.outputs

    def product(a2, b2):
        return kernels.linear_int8(
            a2, _weights(b2), a_scale=a_scale, a_zero_point=_int(a_zp), w_scale=b_scale,
            w_zero_point=_int(b_zp), out_dtype=y_zp.dtype, out_scale=y_scale, out_zero_point=_int(y_zp),
        )

    got = _batched(a, b, product)
    assert got.dtype == expected.dtype == y_zp.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def _onnx_qlinear_f64(a, za, w, zw, a_scale, w_scale, y_scale, y_zp, out_dtype):
    """ONNX QLinearMatMul in float64: saturate(rint(((a-za) @ (w-zw).T) * (sa*sw/sy) + zy))."""
    acc = (a.astype(np.int64) - za) @ (w.astype(np.int64) - np.asarray(zw, np.int64).reshape(-1, 1)).T
    mult = np.float64(a_scale) * np.asarray(w_scale, np.float64) / np.float64(y_scale)
    info = np.iinfo(out_dtype)
    return np.clip(np.rint(acc.astype(np.float64) * mult + y_zp), info.min, info.max).astype(out_dtype)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8], ids=["u8", "s8"])
def test_linear_int8_random_vs_reference_and_onnx_formula(seed, out_dtype):
    rng = np.random.default_rng(seed)
    shapes = [(1, 1, 1), (2, 3, 4), (5, 7, 13), (17, 33, 70), (64, 48, 257), (130, 260, 300)]
    m, n, k = shapes[seed % len(shapes)]
    a_dtype = (np.uint8, np.int8)[seed % 2]
    w_dtype = (np.int8, np.uint8)[(seed // 2) % 2]
    ia, iw, io = np.iinfo(a_dtype), np.iinfo(w_dtype), np.iinfo(out_dtype)
    a = rng.integers(ia.min, ia.max, (m, k), endpoint=True).astype(a_dtype)
    w = rng.integers(iw.min, iw.max, (n, k), endpoint=True).astype(w_dtype)
    za = int(rng.integers(ia.min, ia.max, endpoint=True))
    # per-tensor w zero point for uint8 weights, per-channel for int8 ones
    zw = int(rng.integers(iw.min, iw.max, endpoint=True)) if w_dtype == np.uint8 else \
        rng.integers(-20, 20, n, endpoint=True).astype(np.int64)
    y_zp = int(rng.integers(io.min, io.max, endpoint=True))

    a_scale = float(rng.uniform(0.005, 0.05))
    w_scale = rng.uniform(0.001, 0.02, n)  # per channel
    acc = (a.astype(np.int64) - za) @ (w.astype(np.int64) - np.asarray(zw).reshape(-1, 1)).T
    # pick y_scale so most outputs land inside the range and some saturate
    spread = float(np.percentile(np.abs(acc * (a_scale * w_scale)), 90)) or 1.0
    y_scale = float(spread / rng.uniform(60, 160))

    # float64 scales: our multiplier equals the float64 formula's, so results are identical
    kw = dict(a_scale=a_scale, a_zero_point=za, w_scale=w_scale, w_zero_point=zw,
              out_dtype=out_dtype, out_scale=y_scale, out_zero_point=y_zp)
    got = kernels.linear_int8(a, w, **kw)
    assert got.dtype == np.dtype(out_dtype) and got.shape == (m, n)
    np.testing.assert_array_equal(got, linear_int8_ref(a, w, **kw))
    expected = _onnx_qlinear_f64(a, za, w, zw, a_scale, w_scale, y_scale, y_zp, out_dtype)
    np.testing.assert_array_equal(got, expected)
    if m * n > 4:
        assert 0 < np.count_nonzero((got != io.min) & (got != io.max)), "test scales saturate everything"

    # float32 scales (as ONNX models carry them): bit-exact with the reference, which forms
    # the multiplier in float32 too; within one step of the float64 formula
    kw32 = dict(kw, a_scale=np.float32(a_scale), w_scale=w_scale.astype(np.float32), out_scale=np.float32(y_scale))
    got32 = kernels.linear_int8(a, w, **kw32)
    np.testing.assert_array_equal(got32, linear_int8_ref(a, w, **kw32))
    assert np.abs(got32.astype(np.int64) - expected).max(initial=0) <= 1

    # pre-packed int8 weights give the same result
    if w.dtype == np.int8:
        np.testing.assert_array_equal(kernels.linear_int8(a, kernels.pack_int8(w), **kw), got)
