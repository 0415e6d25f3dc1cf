"""Binary kernels: sign-bit packing, XNOR-popcount GEMM with fused outputs, binary x int8.

Every product is checked against ``kernels.reference.binary`` (exact int64 from the
±1 values) on each binary variant this CPU can run: the portable one
(``LOWBIT_ISA=generic``) and the host's (the AVX-512 tiles on an AVX-512 machine).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu, dispatch
from kernels.gemm.binary import gemm_binary, gemm_binary_int8, gemm_binary_to_bits
from kernels.gemm.popcount import MAX_WORDS
from kernels.pack.bits import from_b1_storage, pack_bits, unpack_bits, word_count
from kernels.qtypes import QTYPES
from kernels.reference import binary as ref
from tests.levels import level_fixture

ODD_K = (1, 7, 63, 64, 65, 127, 129, 1000, 8193)
ODD_MN = (1, 3, 7, 65)
level = level_fixture("gemm_binary", "gemm_binary_int8")


def _signs(rng, shape) -> np.ndarray:
    return rng.choice(np.array([-1, 1], np.int8), size=shape)


def _operands(rng, m, n, k):
    x, y = _signs(rng, (m, k)), _signs(rng, (n, k))
    return x, y, pack_bits(x), pack_bits(y)


# --- packing -----------------------------------------------------------------------------------------------------

def test_pack_golden_words():
    """Bit i of word j is element 64 j + i, set for negatives; zero is +1; padding bits are 0."""
    x = np.ones(70)
    x[[0, 3, 63, 64, 69]] = -1
    x[5] = 0.0
    assert pack_bits(x).tolist() == [(1 << 0) | (1 << 3) | (1 << 63), (1 << 0) | (1 << 5)]
    assert pack_bits(np.full(64, -2.5)).tolist() == [2**64 - 1]
    assert pack_bits(np.array([1, -1, 1])).dtype == np.uint64


@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 127, 128, 129, 1000])
def test_pack_round_trip_and_zero_padding(rng, n):
    x = _signs(rng, (5, n))
    words = pack_bits(x)
    assert words.shape == (5, word_count(n)) and words.flags.c_contiguous
    np.testing.assert_array_equal(words, ref.pack_bits_ref(x))
    np.testing.assert_array_equal(unpack_bits(words, n), x)
    if n % 64:
        assert not np.any(words[:, -1] >> np.uint64(n % 64))  # padding bits of the last word


def test_pack_other_axis(rng):
    x = rng.standard_normal((130, 4, 3)).astype(np.float32)
    words = pack_bits(x, axis=0)
    assert words.shape == (3, 4, 3) and words.flags.c_contiguous
    np.testing.assert_array_equal(unpack_bits(words, 130, axis=0), np.where(x < 0, -1, 1))


def test_b1_storage_repacks(rng):
    x = _signs(rng, (3, 100))
    storage = QTYPES["b1"].pack(x)
    np.testing.assert_array_equal(from_b1_storage(storage, 3, 100), pack_bits(x))
    y = _signs(rng, (2, 128))  # K % 64 == 0: the storage bytes are the words
    np.testing.assert_array_equal(QTYPES["b1"].pack(y).view("<u8").reshape(2, 2), pack_bits(y))


def test_unpack_rejects_a_wrong_count():
    with pytest.raises(ValueError, match="count: 65 values need 2 words, but words has 1"):
        unpack_bits(np.zeros(1, np.uint64), 65)
    with pytest.raises(TypeError, match="words: expected dtype uint64, got int64"):
        unpack_bits(np.zeros(1, np.int64), 3)


# --- XNOR-popcount GEMM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", ODD_K)
def test_dot_identity_odd_k(level, rng, k):
    """``dot = k - 2 popcount(a xor b)`` equals the ±1 dot product for any k."""
    x, y, a, b = _operands(rng, 7, 65, k)
    got = gemm_binary(a, b, k)
    assert got.dtype == np.int32 and got.shape == (7, 65)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ y.T.astype(np.int64))


@pytest.mark.parametrize("m,n", list(itertools.product(ODD_MN + (4, 5), ODD_MN)))
@pytest.mark.parametrize("k", [65, 1000])
def test_gemm_odd_shapes(level, rng, m, n, k):
    _, _, a, b = _operands(rng, m, n, k)
    np.testing.assert_array_equal(gemm_binary(a, b, k), ref.gemm_binary_ref(a, b, k))


def test_gemm_extremes_and_long_k(level, rng):
    """All-equal and all-opposite rows (dot = ±k), past one micro-kernel call's word limit."""
    k = 64 * MAX_WORDS + 200
    x = _signs(rng, (3, k))
    a = pack_bits(np.concatenate([x, -x[:1]]))
    b = pack_bits(x)
    got = gemm_binary(a, b, k)
    assert got[0, 0] == k and got[3, 0] == -k
    np.testing.assert_array_equal(got, ref.gemm_binary_ref(a, b, k))


def test_gemm_no_rows(level):
    assert gemm_binary(np.zeros((0, 2), np.uint64), np.zeros((5, 2), np.uint64), 100).shape == (0, 5)


def test_gemm_out_is_reused(level, rng):
    _, _, a, b = _operands(rng, 9, 33, 300)
    out = np.full((9, 33), -7, np.int32)
    assert gemm_binary(a, b, 300, out=out) is out
    np.testing.assert_array_equal(out, ref.gemm_binary_ref(a, b, 300))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 70), k=st.integers(1, 700), generic=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gemm_property(m, n, k, generic, seed):
    rng = np.random.default_rng(seed)
    _, _, a, b = _operands(rng, m, n, k)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOWBIT_ISA", "generic" if generic else cpu.host_level().name)
        np.testing.assert_array_equal(gemm_binary(a, b, k), ref.gemm_binary_ref(a, b, k))


# --- fused outputs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 65, 129), (65, 7, 1000)])
def test_float_output(level, rng, m, n, k):
    _, _, a, b = _operands(rng, m, n, k)
    mult, bias = rng.standard_normal(n), rng.standard_normal(n).astype(np.float32)
    got = gemm_binary(a, b, k, multiplier=mult, bias=bias)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref.gemm_binary_real_ref(a, b, k, mult, bias))
    np.testing.assert_array_equal(gemm_binary(a, b, k, multiplier=0.5), ref.gemm_binary_real_ref(a, b, k, 0.5))
    np.testing.assert_array_equal(gemm_binary(a, b, k, out_dtype=np.float32), ref.gemm_binary_ref(a, b, k))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 65, 129), (7, 130, 1000), (65, 200, 64)])
def test_bits_output(level, rng, m, n, k):
    _, _, a, b = _operands(rng, m, n, k)
    dot = ref.gemm_binary_ref(a, b, k)
    thr = rng.integers(-k, k + 1, n)
    thr[0] = dot[0, 0]  # equality reads as +1 (bit clear)
    got = gemm_binary_to_bits(a, b, k, thr)
    assert got.dtype == np.uint64 and got.shape == (m, word_count(n))
    np.testing.assert_array_equal(got, ref.gemm_binary_to_bits_ref(a, b, k, thr))
    np.testing.assert_array_equal(got, pack_bits(dot - thr))
    assert not got[0, 0] & np.uint64(1)


def test_bits_output_real_thresholds_and_reuse(level, rng):
    _, _, a, b = _operands(rng, 5, 70, 99)
    thr = rng.uniform(-20, 20, 70)
    out = np.full((5, 2), 2**64 - 1, np.uint64)  # stale bits must not survive
    assert gemm_binary_to_bits(a, b, 99, thr, out=out) is out
    np.testing.assert_array_equal(out, ref.gemm_binary_to_bits_ref(a, b, 99, thr))
    np.testing.assert_array_equal(gemm_binary_to_bits(a, b, 99, 0), ref.gemm_binary_to_bits_ref(a, b, 99, 0))


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_identical_results(rng, monkeypatch, threads):
    splits = []
    run_ranges = kernels.threads.run_ranges
    monkeypatch.setattr(kernels.threads, "run_ranges", lambda fn, ranges: (splits.append(ranges), run_ranges(fn, ranges)))
    monkeypatch.setattr(kernels.threads, "_setting", threads)
    monkeypatch.setattr(kernels.threads, "MIN_US_PER_THREAD", 1e-9)
    for m, n in [(40, 300), (300, 5)]:  # split by columns; by rows
        _, _, a, b = _operands(rng, m, n, 777)
        np.testing.assert_array_equal(gemm_binary(a, b, 777), ref.gemm_binary_ref(a, b, 777))
        np.testing.assert_array_equal(gemm_binary_to_bits(a, b, 777, 3), ref.gemm_binary_to_bits_ref(a, b, 777, 3))
        x8 = rng.integers(-128, 128, (m, 777), dtype=np.int8)
        np.testing.assert_array_equal(gemm_binary_int8(x8, b, 777), ref.gemm_binary_int8_ref(x8, b, 777))
    assert len(splits) == 6 and all(len(r) > 1 for r in splits)


# --- binary weights x int8 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n", [(1, 1), (3, 7), (7, 65), (65, 3)])
@pytest.mark.parametrize("k", [1, 63, 65, 1000])
def test_binary_int8(level, rng, m, n, k):
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = pack_bits(_signs(rng, (n, k)))
    got = gemm_binary_int8(a, b, k)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref.gemm_binary_int8_ref(a, b, k))


def test_binary_int8_extremes(level):
    k = 4099
    a = np.full((2, k), -128, np.int8)
    b = pack_bits(np.stack([np.full(k, -1), np.ones(k)]))
    np.testing.assert_array_equal(gemm_binary_int8(a, b, k), [[128 * k, -128 * k]] * 2)


# --- errors --------------------------------------------------------------------------------------------------------

A = np.zeros((4, 2), np.uint64)
B = np.zeros((3, 2), np.uint64)


@pytest.mark.parametrize("a,b,k,error,match", [
    (A.astype(np.int64), B, 100, TypeError, "a_bits: expected dtype uint64, got int64"),
    (A, B.tolist(), 100, TypeError, "b_bits: expected a numpy.ndarray"),
    (A[0], B, 100, ValueError, r"a_bits: expected a 2-D array, got shape \(2,\)"),
    (np.zeros((4, 3), np.uint64), B, 100, ValueError, r"a_bits: expected 2 words per row to match b_bits"),
    (np.zeros((4, 4), np.uint64)[:, ::2], B, 100, ValueError, "a_bits: expected a C-contiguous array"),
    (A, np.zeros((3, 4), np.uint64)[:, ::2], 100, ValueError, "b_bits: expected a C-contiguous array"),
    (A, B, 64, ValueError, "k: 64 bits need 1 words of 64, but b_bits has 2 words per row"),
    (A, B, 129, ValueError, "k: 129 bits need 3 words"),
    (A, B, 0, ValueError, "k: expected 1 <= k"),
    (A, B, 100.0, TypeError, "k: expected an int, got float"),
])
def test_gemm_bad_operands(a, b, k, error, match):
    with pytest.raises(error, match=match):
        gemm_binary(a, b, k)


@pytest.mark.parametrize("kw,error,match", [
    (dict(out=np.zeros((4, 3), np.int64)), TypeError, "out: expected dtype int32, got int64"),
    (dict(out=np.zeros((3, 4), np.int32)), ValueError, r"out: expected shape \(4, 3\)"),
    (dict(out_dtype=np.int8), TypeError, "out_dtype: expected int32 or float32, got int8"),
    (dict(multiplier=1.0, out_dtype=np.int32), ValueError, "out_dtype: multiplier and bias give float32"),
    (dict(multiplier=np.ones(4)), ValueError, r"multiplier: expected a scalar or shape \(3,\)"),
    (dict(bias="x"), TypeError, "bias: expected a real"),
])
def test_gemm_bad_options(kw, error, match):
    with pytest.raises(error, match=match):
        gemm_binary(A, B, 100, **kw)


@pytest.mark.parametrize("thr,kw,error,match", [
    (np.zeros(4), {}, ValueError, r"thresholds: expected a scalar or shape \(3,\)"),
    (np.array([0.0, np.nan, 0.0]), {}, ValueError, "thresholds: NaN"),
    ("high", {}, TypeError, "thresholds: expected a real"),
    (0, dict(out=np.zeros((4, 1), np.int64)), TypeError, "out: expected dtype uint64"),
])
def test_bits_bad_arguments(thr, kw, error, match):
    with pytest.raises(error, match=match):
        gemm_binary_to_bits(A, B, 100, thr, **kw)


@pytest.mark.parametrize("a,k,error,match", [
    (np.zeros((4, 100), np.uint8), 100, TypeError, "a: expected dtype int8, got uint8"),
    (np.zeros((4, 99), np.int8), 100, ValueError, r"a: expected k = 100 columns, got shape \(4, 99\)"),
    (np.zeros((4, 200), np.int8)[:, ::2], 100, ValueError, "a: expected a C-contiguous array"),
    (np.zeros((4, 100), np.int8), 2**24, ValueError, "k: expected 1 <= k <= 16777215"),
])
def test_binary_int8_bad_arguments(a, k, error, match):
    with pytest.raises(error, match=match):
        gemm_binary_int8(a, B, k)


def test_generic_level_chooses_the_portable_variants(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    assert dispatch.choose("gemm_binary", 8, 8, 64).kind == "generic"
    assert dispatch.choose("gemm_binary_int8", 8, 8, 64).kind == "generic"
    monkeypatch.setenv("LOWBIT_ISA", cpu.host_level().name)
    fast = next((lv.name for lv in (cpu.AVX512_VPOPCNTDQ, cpu.AVX512_VNNI) if cpu.allows(lv, cpu.host_level())),
                None)
    assert dispatch.choose("gemm_binary", 8, 8, 64).kind == (fast or "generic")
    assert dispatch.choose("gemm_binary", 1, 8, 64).kind == (f"{fast}-gemv" if fast else "generic")


@pytest.mark.skipif(cpu.AVX512_VPOPCNTDQ not in cpu.supported_levels(), reason="this CPU has no AVX512-VPOPCNTDQ")
def test_vpopcntdq_is_chosen_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", cpu.AVX512_VPOPCNTDQ.name)
    assert dispatch.choose("gemm_binary", 1024, 1024, 8192).kind == "avx512-vpopcntdq"
    monkeypatch.setenv("LOWBIT_ISA", cpu.AVX512_VNNI.name)  # forced below it: the Harley-Seal tiles
    assert dispatch.choose("gemm_binary", 1024, 1024, 8192).kind == "avx512-vnni"


@pytest.mark.parametrize("kind", ["avx512-vpopcntdq", "avx512-vpopcntdq-gemv"])
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (7, 5, 63), (9, 13, 65), (4, 4, 512), (5, 3, 705), (3, 7, 2565),
                                     (1, 1, 64 * 9)])
def test_vpopcntdq_tiles_are_exact_on_any_cpu(kind, m, n, k, rng):
    """The vpopcntq tiles are generic LLVM (ctpop, masked loads): on a CPU without VPOPCNTDQ, LLVM lowers them to
    other instructions, so their logic (tails, clamped rows and columns) is checked everywhere; the dispatch test
    above and the suite's level runs check them as vpopcntq where the CPU has it."""
    from kernels.gemm.binary_driver import INTEGER, POPCOUNT_DRIVERS

    x, y = rng.choice(np.array([-1, 1], np.int8), (m, k)), rng.choice(np.array([-1, 1], np.int8), (n, k))
    a, b = pack_bits(x), pack_bits(y)
    out = np.zeros((m, n), np.int32)
    unused = np.zeros(n)
    POPCOUNT_DRIVERS[kind, INTEGER](a, b, k, a.shape[1], 0, m, 0, n, 64, unused, unused, np.zeros(n, np.int64), out)
    np.testing.assert_array_equal(out, x.astype(np.int32) @ y.astype(np.int32).T)


VPOPCNTDQ_ASM = """
from numba import types
from kernels.gemm.binary_driver import INTEGER, POPCOUNT_DRIVERS
words, ints, floats = (types.Array(dtype, ndim, "C") for dtype, ndim in ((types.uint64, 2), (types.int64, 1),
                                                                        (types.float64, 1)))
sig = (words, words, *[types.int64] * 7, floats, floats, ints, types.Array(types.int32, 2, "C"))
driver = POPCOUNT_DRIVERS["avx512-vpopcntdq", INTEGER]
driver.compile(sig)
asm = driver.inspect_asm(sig)
print(asm.count("vpopcntq"), asm.count("vpternlogq"))
"""


@pytest.mark.skipif(cpu.host_arch() != "x86_64", reason="an x86-64 code generation check")
def test_vpopcntdq_tile_compiles_to_vpopcntq(tmp_path):
    """Compiled (not run) for a Zen 4 in a child process: the tile counts with vpopcntq, without carry-save trees."""
    import os
    import subprocess
    import sys

    features = "+avx,+avx2,+fma,+bmi,+bmi2,+popcnt,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,+avx512vpopcntdq"
    env = {**os.environ, "NUMBA_CPU_NAME": "znver4", "NUMBA_CPU_FEATURES": features,
           "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", VPOPCNTDQ_ASM], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    vpopcntq, vpternlogq = map(int, done.stdout.split())
    assert vpopcntq >= 16 and vpternlogq == 0


def test_binary_plan_and_entry(level, rng, tmp_path, monkeypatch):
    from kernels.gemm.binary import gemm_binary_plan
    from tests.kernels.test_int4 import check_entries

    cases = []
    for m, n, k in [(1, 65, 63), (7, 33, 130), (3, 5, 64)]:
        a, b = pack_bits(rng.standard_normal((m, k))), pack_bits(rng.standard_normal((n, k)))
        for fused in ({}, {"multiplier": rng.standard_normal(n), "bias": 0.25}):
            cases.append((gemm_binary_plan(b, k, m, **fused), a, gemm_binary(a, b, k, **fused)))
    check_entries(cases, tmp_path, monkeypatch)


def test_binary_one_shot_keeps_plans(rng):
    from kernels.gemm.binary import _ONE_SHOT

    a, b = pack_bits(rng.standard_normal((2, 70))), pack_bits(rng.standard_normal((9, 70)))
    want = ref.gemm_binary_ref(a, b, 70)
    np.testing.assert_array_equal(gemm_binary(a, b, 70), want)
    plan = next(p for key, p in _ONE_SHOT.items() if key[0] == id(b))
    np.testing.assert_array_equal(gemm_binary(a, b, 70), want)
    assert next(p for key, p in _ONE_SHOT.items() if key[0] == id(b)) is plan
    with pytest.raises(ValueError, match="a_bits"):
        gemm_binary(pack_bits(rng.standard_normal((2, 200))), b, 70)
