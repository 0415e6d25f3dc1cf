"""gemm_int4 against its NumPy oracle (bit for bit), its error bound, packing and argument errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import kernels

from kernels.gemm.int4 import gemm_int4
from kernels.pack.grouped import STEP_BYTES
from kernels.pack.grouped import GROUP_SIZES
from kernels.pack.int4 import pack_int4, pack_int4_codes, quantize_int4
from kernels.pack.ternary import pack_ternary
from tests.levels import level_fixture
from kernels.reference.int4 import dequantize_int4_ref, gemm_int4_ref, quantize_activations_ref

# Every level a grouped variant is written for that this CPU runs (generic always).
MS, NS, KS = (1, 3, 7, 8, 9, 65), (1, 7, 63, 65, 130), (1, 7, 63, 127, 129, 300)
SHAPES = list(itertools.product(MS, NS, KS))


level = level_fixture("gemm_int4")


def _data(rng, m, n, k):
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    return x, w


@pytest.mark.parametrize("symmetric", [True, False], ids=["s4", "u4"])
@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)), ids=["x".join(map(str, s)) for s in SHAPES])
def test_odd_shapes_bit_exact(level, rng, index, shape, symmetric):
    m, n, k = shape
    g = GROUP_SIZES[index % len(GROUP_SIZES)]
    x, w = _data(rng, m, n, k)
    codes, scales, zeros = quantize_int4(w, g, symmetric)
    got = gemm_int4(x, pack_int4(w, g, symmetric))
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, gemm_int4_ref(x, codes, scales, zeros, group_size=g))


@pytest.mark.parametrize("m", range(1, 11))
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_every_gemv_height(level, rng, m, g):
    x, w = _data(rng, m, 130, 1000)
    codes, scales, zeros = quantize_int4(w, g, symmetric=False)
    np.testing.assert_array_equal(gemm_int4(x, pack_int4(w, g, symmetric=False)),
                                  gemm_int4_ref(x, codes, scales, zeros, group_size=g))


@pytest.mark.parametrize("symmetric", [True, False], ids=["s4", "u4"])
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_error_bound(level, rng, g, symmetric):
    """The docstring's bound on |out - x @ W.T|, W the dequantized weights, against float64."""
    m, n, k = 9, 70, 1001
    x, w = _data(rng, m, n, k)
    x[1] *= 1e3  # rows of different magnitude, and an all-zero row
    x[2] = 0
    packed = pack_int4(w, g, symmetric)
    wd = packed.dequantize().astype(np.float64)
    got = gemm_int4(x, packed).astype(np.float64)
    exact = x.astype(np.float64) @ wd.T
    _, sx = quantize_activations_ref(x, g)
    groups = -(-k // g)
    sx_k = np.repeat(sx.astype(np.float64), g, axis=1)[:, :k]
    w_abs = np.abs(wd)
    w_group = np.add.reduceat(w_abs, np.arange(0, k, g), axis=1)  # [N, groups]
    bound = (sx.astype(np.float64) * (0.5 + 2.0**-17)) @ w_group.T
    bound += (groups + 2) * 2.0**-24 * ((np.abs(x) + sx_k) @ w_abs.T)
    err = np.abs(got - exact)
    assert np.all(err <= bound)
    assert np.all(got[2] == 0)
    assert err.max() > 0.01 * bound.max()  # not vacuous (random rounding errors partly cancel)


def test_codes_with_zero_points_and_float16_scales(level, rng):
    n, k, g = 67, 200, 64
    groups = -(-k // g)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    zeros = rng.integers(0, 16, size=(n, groups), dtype=np.uint8)
    scales = rng.uniform(0.01, 1, size=(n, groups)).astype(np.float16)
    x = rng.standard_normal((5, k), dtype=np.float32)
    packed = pack_int4_codes(codes, scales, zeros, group_size=g)
    np.testing.assert_array_equal(gemm_int4(x, packed), gemm_int4_ref(x, codes, scales, zeros, group_size=g))
    np.testing.assert_array_equal(packed.dequantize(), dequantize_int4_ref(codes, scales, zeros, group_size=g))
    signed = rng.integers(-8, 8, size=(n, k), dtype=np.int8)  # -8 included
    packed = pack_int4_codes(signed, scales, group_size=g)
    np.testing.assert_array_equal(gemm_int4(x, packed), gemm_int4_ref(x, signed, scales, group_size=g))


def test_no_rows_and_out_reuse(level, rng):
    x, w = _data(rng, 9, 33, 70)
    packed = pack_int4(w, 32)
    assert gemm_int4(np.zeros((0, 70), np.float32), packed).shape == (0, 33)
    out = np.full((9, 33), np.nan, np.float32)
    assert gemm_int4(x, packed, out=out) is out
    codes, scales, _ = quantize_int4(w, 32)
    np.testing.assert_array_equal(out, gemm_int4_ref(x, codes, scales, group_size=32))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n,k", [(300, 700, 512), (4000, 10, 1024), (1, 8000, 4096)])  # panels; rows; GEMV
def test_threads_give_identical_results(rng, monkeypatch, threads, m, n, k):
    x, w = _data(rng, m, n, k)
    codes, scales, _ = quantize_int4(w, 128)
    packed = pack_int4_codes(codes, scales, group_size=128)
    monkeypatch.setattr(kernels.threads, "_setting", threads)
    np.testing.assert_array_equal(gemm_int4(x, packed), gemm_int4_ref(x, codes, scales, group_size=128))


def test_quantization_formulas(rng):
    w = rng.standard_normal((5, 100), dtype=np.float32)
    w[3] = 0
    codes, scales, zeros = quantize_int4(w, 32, symmetric=True)
    assert zeros is None and codes.dtype == np.int8 and codes.min() >= -7 and codes.max() <= 7
    amax = np.abs(np.pad(w, ((0, 0), (0, 28))).reshape(5, 4, 32)).max(axis=2)
    np.testing.assert_array_equal(scales, np.where(amax > 0, amax, 1) / np.float32(7))
    wd = dequantize_int4_ref(codes, scales, group_size=32)
    assert np.all(np.abs(wd - w) <= np.repeat(scales, 32, axis=1)[:, :100] / 2 * (1 + 1e-6))
    codes, scales, zeros = quantize_int4(w, 32, symmetric=False)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and zeros.dtype == np.uint8
    wd = dequantize_int4_ref(codes, scales, zeros, group_size=32)
    assert np.all(np.abs(wd - w) <= np.repeat(scales, 32, axis=1)[:, :100] * (0.5 + 1e-5))


def test_golden_bytes_and_round_trip():
    """data[((p*S + s)*64 + c)*4 + u] = nib[64p+c, 8s+u] | nib[64p+c, 8s+4+u] << 4, zero padded."""
    n, k = 70, 13
    codes = ((np.arange(n * k) * 7) % 16 - 8).astype(np.int8).reshape(n, k)
    scales = np.ones((n, 1), np.float32)
    packed = pack_int4_codes(codes, scales, group_size=32)
    steps = -(-k // 8)
    assert (packed.n_panels, packed.steps) == (2, steps) and packed.data.size == 2 * steps * STEP_BYTES
    assert packed.data.ctypes.data % 64 == 0
    nib = np.zeros((128, steps * 8), np.int64)
    nib[:n, :k] = codes.astype(np.int64) + 8
    for p, s, c, u in itertools.product(range(2), range(steps), range(64), range(4)):
        row = 64 * p + c
        expected = nib[row, 8 * s + u] | nib[row, 8 * s + 4 + u] << 4
        assert packed.data[((p * steps + s) * 64 + c) * 4 + u] == expected
    np.testing.assert_array_equal(packed.codes(), codes.astype(np.int16) + 8)
    np.testing.assert_array_equal(packed.dequantize(), codes.astype(np.float32))
    assert repr(packed).startswith("PackedInt4(shape=(70, 13), group_size=32")


def test_matches_onnxruntime_matmul_nbits(rng):
    """ORT MatMulNBits (accuracy_level 4) quantizes the activations the same way."""
    pytest.importorskip("onnxruntime")
    from bench.peers import ort_matmul_nbits

    x, w = _data(rng, 3, 130, 300)
    for g, symmetric in [(32, True), (128, False)]:
        packed = pack_int4(w, g, symmetric)
        ort = ort_matmul_nbits(x, packed, 1).call()
        np.testing.assert_allclose(gemm_int4(x, packed), ort, rtol=1e-4, atol=1e-4 * np.abs(ort).max())


def test_errors(rng):
    x, w = _data(rng, 2, 8, 40)
    packed = pack_int4(w, 32)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        gemm_int4(x.astype(np.float64), packed)
    with pytest.raises(ValueError, match="x: expected a 2-D array"):
        gemm_int4(x[0], packed)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm_int4(np.asfortranarray(x), packed)
    with pytest.raises(ValueError, match="expected K = 40"):
        gemm_int4(x[:, :39].copy(), packed)
    with pytest.raises(TypeError, match="expected a PackedInt4"):
        gemm_int4(x, pack_ternary(w))
    with pytest.raises(TypeError, match="expected a PackedInt4"):
        gemm_int4(x, w)
    bad = x.copy()
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="finite"):
        gemm_int4(bad, packed)
    with pytest.raises(ValueError, match="out: expected shape"):
        gemm_int4(x, packed, out=np.empty((2, 7), np.float32))
    with pytest.raises(ValueError, match="group_size: expected one of"):
        pack_int4(w, 48)
    with pytest.raises(TypeError, match="w: expected dtype float32"):
        pack_int4(w.astype(np.float64))
    with pytest.raises(ValueError, match="non-empty"):
        pack_int4(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="codes: values must lie in"):
        pack_int4_codes(np.full((2, 4), 8, np.int8), np.ones((2, 1), np.float32), group_size=32)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 1\)"):
        pack_int4_codes(np.zeros((2, 4), np.int8), np.ones((2, 2), np.float32), group_size=32)
    with pytest.raises(TypeError, match="scales: expected dtype"):
        pack_int4_codes(np.zeros((2, 4), np.int8), np.ones((2, 1)), group_size=32)
    with pytest.raises(TypeError, match="zero_points: expected dtype uint8"):
        pack_int4_codes(np.zeros((2, 4), np.uint8), np.ones((2, 1), np.float32), np.zeros((2, 1), np.int8),
                        group_size=32)


# ---- plans, entries (kernels.entry) and the one-shot plans kept on the packed weight --------------------------------

def _grouped_cases(rng, pack, plan_of, fn):
    """``(plan, x, want)`` for M = 1, 7 and 9 (each a variant of its own on VNNI) and odd N, K."""
    cases = []
    for m, n, k in [(1, 65, 63), (7, 33, 130), (9, 3, 64)]:
        packed = pack(rng.standard_normal((n, k)).astype(np.float32))
        x = rng.standard_normal((m, k)).astype(np.float32)
        cases.append((plan_of(packed, m), x, fn(x, packed)))
    return cases


def check_entries(cases, tmp_path, monkeypatch):
    """Each plan and its entry give the one-shot result bit for bit, from Python, and the first case of each
    entry kernel in one compiled chain (a chain compiles its callees again: one case each proves they type there)."""
    from kernels.entry import In
    from lowbit.runtime.compiled import CompiledSteps

    chained = {}
    for plan, x, want in cases:
        np.testing.assert_array_equal(plan(x), want)
        out = np.empty_like(want)
        entry = plan.entry()
        entry([x], [out])
        np.testing.assert_array_equal(out, want)
        chained.setdefault(entry.fn, (entry, x, want))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    outs = [np.empty_like(want) for _, _, want in chained.values()]
    steps = [(entry, [In(i)], [out]) for i, ((entry, _, _), out) in enumerate(zip(chained.values(), outs))]
    got = CompiledSteps(steps, len(steps), outs)([x for _, x, _ in chained.values()])
    for y, (_, _, want) in zip(got, chained.values()):
        np.testing.assert_array_equal(y, want)


def test_int4_plan_and_entry(level, rng, tmp_path, monkeypatch):
    from kernels.gemm.int4 import gemm_int4_plan

    cases = _grouped_cases(rng, lambda w: pack_int4(w, group_size=32), gemm_int4_plan, gemm_int4)
    check_entries(cases, tmp_path, monkeypatch)
    plan, x, _ = cases[0]
    bad = x.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        plan.entry()([bad], [np.empty((1, plan.packed.n), np.float32)])
    with pytest.raises(ValueError, match="M = 1"):
        plan(np.zeros((2, x.shape[1]), np.float32))


def test_int4_one_shot_keeps_plans_on_the_weight(rng):
    from kernels.gemm.int4 import gemm_int4_plan

    packed = pack_int4(rng.standard_normal((20, 40)).astype(np.float32), group_size=32)
    for m in (1, 3, 1):
        x = rng.standard_normal((m, 40)).astype(np.float32)
        np.testing.assert_array_equal(gemm_int4(x, packed), gemm_int4_plan(packed, m)(x))
    assert len(packed.plans) == 2  # one per M
