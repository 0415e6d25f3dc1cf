"""gemm_int8 and linear_int8 against the NumPy oracle, bit for bit, on every tested CPU level."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import reference
from kernels.pack.panels import KGROUP, PANEL
from kernels.qtypes import QTYPES

ACT_DTYPES = [q.dtype for q in QTYPES.values() if q.bits == 8]  # the activation types the products accept
ODD = (1, 7, 64, 65, 127)
SWEEP = (1, 3, 7, 63, 64, 65, 127, 1000)


def _random(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _check_gemm(rng, dtype, m, n, k, packed=True):
    a = _random(rng, dtype, (m, k))
    b = _random(rng, np.int8, (n, k))
    got = kernels.gemm_int8(a, kernels.pack_int8(b) if packed else b)
    assert got.dtype == np.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, reference.gemm_int8_ref(a, b))


@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", list(itertools.product(ODD, ODD, ODD)))
def test_gemm_odd_shapes(level, rng, dtype, m, n, k):
    _check_gemm(rng, dtype, m, n, k)


@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("axis", "MNK")
@pytest.mark.parametrize("size", SWEEP)
def test_gemm_sweep_one_dimension(level, rng, dtype, axis, size):
    dims = {"M": 9, "N": 67, "K": 131}  # past the GEMV limit, a partial panel, K % 4 == 3
    dims[axis] = size
    _check_gemm(rng, dtype, dims["M"], dims["N"], dims["K"], packed=axis != "N")


@pytest.mark.parametrize("m", range(1, 10))
def test_gemv_rows(level, rng, m):
    """Every decode-style row count, and the first one past it."""
    _check_gemm(rng, np.uint8, m, 2 * PANEL + 5, 4 * KGROUP * 17 + 1)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 200), k=st.integers(1, 300), signed=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gemm_property(m, n, k, signed, seed):
    _check_gemm(np.random.default_rng(seed), np.int8 if signed else np.uint8, m, n, k)


def test_gemm_no_rows(level):
    got = kernels.gemm_int8(np.zeros((0, 9), np.uint8), np.ones((5, 9), np.int8))
    assert got.shape == (0, 5) and got.dtype == np.int32


def test_gemm_extreme_values(level):
    """All-extreme operands: the largest magnitudes the u8 x s8 products can reach."""
    k = 4099
    for a_val, b_val, dtype in [(255, -128, np.uint8), (-128, -128, np.int8), (127, 127, np.int8)]:
        a = np.full((7, k), a_val, dtype)
        b = np.full((65, k), b_val, np.int8)
        np.testing.assert_array_equal(kernels.gemm_int8(a, b), reference.gemm_int8_ref(a, b))


@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_gemm_zero_points(level, rng, dtype):
    m, n, k = 13, 70, 99
    a = _random(rng, dtype, (m, k))
    b = _random(rng, np.int8, (n, k))
    za = int(_random(rng, dtype, ()))
    for zb in (int(rng.integers(-128, 128)), _random(rng, np.int8, (n,))):
        got = kernels.gemm_int8(a, b, a_zero_point=za, b_zero_point=zb)
        np.testing.assert_array_equal(got, reference.gemm_int8_ref(a, b, za, zb))


def test_gemm_out_is_reused(level, rng):
    b = _random(rng, np.int8, (33, 70))
    packed = kernels.pack_int8(b)
    out = np.full((9, 33), -1, np.int32)
    for _ in range(2):
        a = _random(rng, np.uint8, (9, 70))
        assert kernels.gemm_int8(a, packed, out=out) is out
        np.testing.assert_array_equal(out, reference.gemm_int8_ref(a, b))


def test_gemm_longest_exact_k():
    """At the documented bound the result is still exact; one past it is refused."""
    for dtype, limit in [(np.uint8, 65793), (np.int8, 131071)]:
        assert kernels.max_k_int32(dtype) == limit
        a = np.full((1, limit), np.iinfo(dtype).min if dtype == np.int8 else 255, dtype)
        b = np.full((2, limit), -128, np.int8)
        np.testing.assert_array_equal(kernels.gemm_int8(a, b), reference.gemm_int8_ref(a, b))
        with pytest.raises(ValueError, match=f"K = {limit + 1} exceeds {limit}"):
            kernels.gemm_int8(np.zeros((1, limit + 1), dtype), np.zeros((1, limit + 1), np.int8))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n,k", [(600, 700, 512), (16000, 10, 1024)])  # split by panels; by rows
def test_threads_give_identical_results(rng, monkeypatch, threads, m, n, k):
    a = _random(rng, np.int8, (m, k))
    b = _random(rng, np.int8, (n, k))
    splits = []
    run_ranges = kernels.threads.run_ranges
    monkeypatch.setattr(kernels.threads, "run_ranges", lambda fn, ranges: (splits.append(ranges), run_ranges(fn, ranges)))
    monkeypatch.setattr(kernels.threads, "_setting", threads)
    monkeypatch.setattr(kernels.threads, "MIN_US_PER_THREAD", 1e-9)  # every thread pays, whatever the kernel's speed
    np.testing.assert_array_equal(kernels.gemm_int8(a, b), reference.gemm_int8_ref(a, b))
    assert [len(r) for r in splits] == ([threads] if threads > 1 else [])


def test_packed_layout_golden_bytes():
    """The documented formula data[((p*Kq + q)*64 + c)*4 + u] = w[64p + c, 4q + u], zero padded."""
    n, k = 70, 6
    w = (np.arange(n * k) % 251 - 125).astype(np.int8).reshape(n, k)
    packed = kernels.pack_int8(w)
    kq = packed.k_groups
    assert (packed.n_panels, kq) == (2, 2)
    assert packed.data.size == 2 * PANEL * kq * KGROUP and packed.data.ctypes.data % 64 == 0
    for p, q, c, u in itertools.product(range(2), range(kq), range(PANEL), range(KGROUP)):
        row, col = p * PANEL + c, q * KGROUP + u
        expected = w[row, col] if row < n and col < k else 0
        assert packed.data[((p * kq + q) * PANEL + c) * KGROUP + u] == expected
    np.testing.assert_array_equal(packed.col_sums, w.sum(axis=1))
    assert repr(packed).startswith("PackedInt8(shape=(70, 6)")
