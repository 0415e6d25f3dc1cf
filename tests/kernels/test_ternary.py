"""gemm_ternary against its NumPy oracle (bit for bit), TWN packing, golden bytes and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels.gemm.ternary import gemm_ternary
from kernels.pack.grouped import STEP_BYTES
from kernels.pack.int4 import pack_int4
from kernels.pack.ternary import pack_ternary, pack_ternary_codes, quantize_ternary
from kernels.reference.int4 import quantize_activations_ref
from kernels.reference.ternary import gemm_ternary_ref
from tests.levels import level_fixture


SHAPES = list(itertools.product((1, 3, 7, 8, 9, 65), (1, 7, 63, 65, 130), (1, 7, 63, 127, 129, 300)))
GROUPS = (None, 32, 64, 128, 256)


level = level_fixture("gemm_ternary")


@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)), ids=["x".join(map(str, s)) for s in SHAPES])
def test_odd_shapes_bit_exact(level, rng, index, shape):
    m, n, k = shape
    g = GROUPS[index % len(GROUPS)]
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    codes, scales = quantize_ternary(w, g)
    got = gemm_ternary(x, pack_ternary(w, g))
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, gemm_ternary_ref(x, codes, scales, group_size=g))


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 14])
def test_gemv_heights_long_k(level, rng, m):
    x = rng.standard_normal((m, 5000), dtype=np.float32)
    codes = rng.integers(-1, 2, size=(131, 5000), dtype=np.int8)
    scales = rng.uniform(0.1, 1, size=(131, 1)).astype(np.float32)
    np.testing.assert_array_equal(gemm_ternary(x, pack_ternary_codes(codes, scales)),
                                  gemm_ternary_ref(x, codes, scales))


@pytest.mark.parametrize("g", GROUPS)
def test_error_bound(level, rng, g):
    """The gemm_int4 bound with the ternary groups (the whole row per channel)."""
    m, n, k = 6, 70, 777
    x = rng.standard_normal((m, k), dtype=np.float32)
    packed = pack_ternary(rng.standard_normal((n, k), dtype=np.float32), g)
    gs = g or k
    wd = packed.dequantize().astype(np.float64)
    err = np.abs(gemm_ternary(x, packed) - x.astype(np.float64) @ wd.T)
    _, sx = quantize_activations_ref(x, gs)
    groups = -(-k // gs)
    sx_k = np.repeat(sx.astype(np.float64), gs, axis=1)[:, :k]
    bound = (sx.astype(np.float64) * (0.5 + 2.0**-17)) @ np.add.reduceat(np.abs(wd), np.arange(0, k, gs), axis=1).T
    bound += (groups + 2) * 2.0**-24 * ((np.abs(x) + sx_k) @ np.abs(wd).T)
    assert np.all(err <= bound)


def test_twn_formulas(rng):
    w = rng.standard_normal((4, 50), dtype=np.float32)
    w[2] = 0
    codes, scales = quantize_ternary(w)
    mag = np.abs(w)
    threshold = np.float32(0.7) * mag.mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(codes, np.sign(w) * (mag > threshold))
    for n in (0, 1, 3):
        np.testing.assert_allclose(scales[n, 0], mag[n][mag[n] > threshold[n]].mean(), rtol=1e-6)
    assert scales[2, 0] == 1 and not codes[2].any()
    codes, scales = quantize_ternary(w, 32)  # groups of 32 and 18
    assert scales.shape == (4, 2)
    tail = mag[0, 32:]
    np.testing.assert_array_equal(codes[0, 32:] != 0, tail > np.float32(0.7) * (tail.sum() / np.float32(18)))


def test_golden_bytes_and_round_trip():
    """data[((p*S + s)*64 + c)*4 + u] = sum_f (t[64p+c, 16s+4f+u] + 1) << 2f, zero padded."""
    n, k = 65, 21
    codes = ((np.arange(n * k) * 5) % 3 - 1).astype(np.int8).reshape(n, k)
    packed = pack_ternary_codes(codes, np.ones((n, 1), np.float32))
    steps = -(-k // 16)
    assert packed.steps == steps and packed.data.size == 2 * steps * STEP_BYTES
    fields = np.zeros((128, steps * 16), np.int64)
    fields[:n, :k] = codes.astype(np.int64) + 1
    for p, s, c, u in itertools.product(range(2), range(steps), range(64), range(4)):
        expected = sum(fields[64 * p + c, 16 * s + 4 * f + u] << 2 * f for f in range(4))
        assert packed.data[((p * steps + s) * 64 + c) * 4 + u] == expected
    np.testing.assert_array_equal(packed.codes(), codes + 1)
    np.testing.assert_array_equal(packed.dequantize(), codes.astype(np.float32))
    assert packed.data.nbytes == 2 * 64 * steps * 16 // 4


def test_errors(rng):
    x = rng.standard_normal((2, 40), dtype=np.float32)
    w = rng.standard_normal((8, 40), dtype=np.float32)
    packed = pack_ternary(w)
    with pytest.raises(TypeError, match="expected a PackedTernary"):
        gemm_ternary(x, pack_int4(w, 32))
    with pytest.raises(ValueError, match="expected K = 40"):
        gemm_ternary(np.zeros((2, 41), np.float32), packed)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        gemm_ternary(x.astype(np.float16), packed)
    with pytest.raises(ValueError, match="group_size: expected one of"):
        pack_ternary(w, 16)
    with pytest.raises(ValueError, match="codes: values must lie in"):
        pack_ternary_codes(np.full((2, 4), 2, np.int8), np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 1\)"):
        pack_ternary_codes(np.ones((2, 4), np.int8), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="finite"):
        pack_ternary(np.full((2, 4), np.inf, np.float32))


def test_ternary_plan_and_entry(level, rng, tmp_path, monkeypatch):
    from kernels.gemm.ternary import gemm_ternary_plan
    from tests.kernels.test_int4 import _grouped_cases, check_entries

    check_entries(_grouped_cases(rng, pack_ternary, gemm_ternary_plan, gemm_ternary), tmp_path, monkeypatch)
