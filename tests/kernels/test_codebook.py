"""gemm_codebook against its NumPy oracle (bit for bit), its error bound, packing and argument errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import kernels
from kernels.pack.codebook import PackedCodebook, pack_codebook, pack_codebook_weights, quantize_codebook
from kernels.pack.int4 import pack_int4
from kernels.reference import dequantize_codebook_ref, gemm_codebook_ref, quantize_activations_ref
from lowbit.quantization.scheme import NF4, pow2_table
from tests.levels import level_fixture

MS, NS, KS, GS = (1, 3, 8, 9, 65), (1, 63, 65, 130), (7, 127, 300), (32, 128)
SHAPES = list(itertools.product(MS, NS, KS))
POW2 = pow2_table(4)  # 15 values: 0, +-2**-e for e = 0..6
SHORT = (-1.0, -0.25, 0.0, 0.5, 0.75)  # fewer than 16 entries, asymmetric
TABLES = {"nf4": NF4, "pow2": POW2, "short": SHORT}

level = level_fixture("gemm_codebook")


def _data(rng, m, n, k):
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)


@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_odd_shapes_bit_exact(level, rng, shape, g):
    m, n, k = shape
    x, w = _data(rng, m, n, k)
    for name, table in TABLES.items():
        codes, scales = quantize_codebook(w, table, g)
        got = kernels.gemm_codebook(x, pack_codebook_weights(w, table, g))
        assert got.dtype == np.float32 and got.shape == (m, n)
        np.testing.assert_array_equal(got, gemm_codebook_ref(x, codes, scales, table, group_size=g), err_msg=name)


@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 9])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_random_codes_every_height(level, rng, m, g):
    """Codes uniform over the table (extreme T8 values everywhere), float16 scales, large |x|."""
    n, k = 130, 1000
    x = rng.standard_normal((m, k), dtype=np.float32) * 100
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0, 2, size=(n, -(-k // g))).astype(np.float16)
    packed = pack_codebook(codes, scales, NF4, group_size=g)
    np.testing.assert_array_equal(kernels.gemm_codebook(x, packed),
                                  gemm_codebook_ref(x, codes, scales, NF4, group_size=g))
    np.testing.assert_array_equal(packed.dequantize(), dequantize_codebook_ref(codes, scales, NF4, group_size=g))
    np.testing.assert_array_equal(packed.codes(), codes)


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("g", GS)
def test_error_bound(level, rng, g, name):
    """The docstring's bound on |out - x @ W.T|, W = scale * table[code], against float64."""
    table = TABLES[name]
    m, n, k = 9, 70, 1001
    x, w = _data(rng, m, n, k)
    x[1] *= 1e3  # rows of different magnitude, and an all-zero row
    x[2] = 0
    packed = pack_codebook_weights(w, table, g)
    wd = packed.dequantize().astype(np.float64)
    w8 = np.abs(packed.kernel_weights().astype(np.float64))
    got = kernels.gemm_codebook(x, packed).astype(np.float64)
    exact = x.astype(np.float64) @ wd.T
    _, sx = quantize_activations_ref(x, g)
    groups = -(-k // g)
    u = 2.0**-24
    sx_k = np.repeat(sx.astype(np.float64), g, axis=1)[:, :k]
    scale_k = np.repeat(packed.scales.astype(np.float64), g, axis=1)[:, :k]
    tmax = float(packed.table_max)
    w_group = np.add.reduceat(w8, np.arange(0, k, g), axis=1)
    bound = (sx.astype(np.float64) * (0.5 + 2.0**-17)) @ w_group.T
    bound += (groups + 2) * u * ((np.abs(x) + sx_k) @ w8.T)
    bound += np.abs(x).astype(np.float64) @ (scale_k * tmax * (1 / 254 + 3 * u)).T
    err = np.abs(got - exact)
    assert np.all(err <= bound)
    assert np.all(got[2] == 0)
    assert err.max() > 0.01 * bound.max()
    # the table approximation itself
    t = np.asarray(table, np.float32).astype(np.float64)
    t8 = packed.table8[: t.size].astype(np.float64)
    assert np.all(np.abs(t - t8 * tmax / 127) <= tmax / 254)


def test_quantization_and_packing(rng):
    w = rng.standard_normal((5, 100), dtype=np.float32)
    w[3] = 0
    codes, scales = quantize_codebook(w, NF4, 32)
    amax = np.abs(np.pad(w, ((0, 0), (0, 28))).reshape(5, 4, 32)).max(axis=2)
    np.testing.assert_array_equal(scales, np.where(amax > 0, amax, 1))
    ratio = w / np.repeat(scales, 32, axis=1)[:, :100]
    nearest = np.abs(ratio[..., None] - np.asarray(NF4, np.float32)).min(axis=-1)
    chosen = np.abs(ratio - np.asarray(NF4, np.float32)[codes])
    np.testing.assert_allclose(chosen, nearest, atol=1e-7)
    assert np.all(codes[3] == 7)  # NF4's exact zero
    packed = pack_codebook_weights(w, NF4, 32)
    assert isinstance(packed, PackedCodebook) and packed.table8.dtype == np.int8
    np.testing.assert_array_equal(packed.table8, np.rint(127 * np.asarray(NF4)).astype(np.int8))
    small = pack_codebook(np.zeros((2, 4), np.uint8), np.ones((2, 1), np.float32), (-0.5, 0.25), group_size=32)
    np.testing.assert_array_equal(small.table8, [-127, 64] + [0] * 14)
    assert repr(small).startswith("PackedCodebook(shape=(2, 4), group_size=32, entries=2")


def test_no_rows_and_out_reuse(level, rng):
    x, w = _data(rng, 9, 33, 70)
    packed = pack_codebook_weights(w, POW2, 32)
    assert kernels.gemm_codebook(np.zeros((0, 70), np.float32), packed).shape == (0, 33)
    out = np.full((9, 33), np.nan, np.float32)
    assert kernels.gemm_codebook(x, packed, out=out) is out
    codes, scales = quantize_codebook(w, POW2, 32)
    np.testing.assert_array_equal(out, gemm_codebook_ref(x, codes, scales, POW2, group_size=32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_identical_results(rng, monkeypatch, threads):
    x, w = _data(rng, 300, 700, 512)
    codes, scales = quantize_codebook(w, NF4, 128)
    monkeypatch.setattr(kernels.threads, "_setting", threads)
    np.testing.assert_array_equal(kernels.gemm_codebook(x, pack_codebook(codes, scales, NF4, group_size=128)),
                                  gemm_codebook_ref(x, codes, scales, NF4, group_size=128))


def test_errors(rng):
    x, w = _data(rng, 2, 8, 40)
    packed = pack_codebook_weights(w, NF4, 32)
    codes = np.zeros((8, 40), np.uint8)
    ones = np.ones((8, 2), np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        kernels.gemm_codebook(x.astype(np.float64), packed)
    with pytest.raises(ValueError, match="expected K = 40"):
        kernels.gemm_codebook(x[:, :39].copy(), packed)
    with pytest.raises(TypeError, match="packed: expected a PackedCodebook"):
        kernels.gemm_codebook(x, pack_int4(w, 32))
    with pytest.raises(TypeError, match="packed: expected a PackedInt4"):
        kernels.gemm_int4(x, packed)
    with pytest.raises(ValueError, match="out: expected shape"):
        kernels.gemm_codebook(x, packed, out=np.empty((2, 7), np.float32))
    bad = x.copy()
    bad[0, 3] = np.inf
    with pytest.raises(ValueError, match="x: values must be finite"):
        kernels.gemm_codebook(bad, packed)
    with pytest.raises(ValueError, match=r"codes: values must lie in \[0, 15\]"):
        pack_codebook(np.full((8, 40), 16, np.uint8), ones, NF4, group_size=32)
    with pytest.raises(ValueError, match=r"codes: values must lie in \[0, 4\]"):
        pack_codebook(np.full((8, 40), 5, np.uint8), ones, SHORT, group_size=32)
    with pytest.raises(TypeError, match="codes: expected dtype uint8"):
        pack_codebook(codes.astype(np.int8), ones, NF4, group_size=32)
    with pytest.raises(ValueError, match="codes: expected a 2-D array"):
        pack_codebook(codes[0], ones, NF4, group_size=32)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\)"):
        pack_codebook(codes, np.ones((8, 3), np.float32), NF4, group_size=32)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\)"):
        pack_codebook(codes, np.ones((7, 2), np.float32), NF4, group_size=32)
    with pytest.raises(ValueError, match="scales: values must be finite and non-negative"):
        pack_codebook(codes, -ones, NF4, group_size=32)
    with pytest.raises(ValueError, match="table: values must be sorted"):
        pack_codebook(codes, ones, NF4[::-1], group_size=32)
    with pytest.raises(ValueError, match="table: values must be sorted"):
        pack_codebook(codes, ones, (0.0, 0.5, 0.5), group_size=32)
    with pytest.raises(ValueError, match=r"table: values must be finite and lie in \[-1, 1\]"):
        pack_codebook(codes, ones, (-1.5, 0.0, 1.0), group_size=32)
    with pytest.raises(ValueError, match=r"table: values must be finite and lie in \[-1, 1\]"):
        pack_codebook(codes, ones, (0.0, np.nan), group_size=32)
    with pytest.raises(ValueError, match="table: expected 1 to 16 values"):
        pack_codebook(codes, ones, np.linspace(-1, 1, 17), group_size=32)
    with pytest.raises(ValueError, match="table: expected 1 to 16 values"):
        pack_codebook(codes, ones, np.zeros((4, 4)), group_size=32)
    with pytest.raises(ValueError, match="table: needs a nonzero value"):
        pack_codebook(codes, ones, (0.0,), group_size=32)
    with pytest.raises(TypeError, match="table: expected real values"):
        pack_codebook(codes, ones, ["a", "b"], group_size=32)
    with pytest.raises(TypeError, match="table: expected a 1-D array"):
        pack_codebook(codes, ones, "nf4", group_size=32)
    with pytest.raises(ValueError, match="group_size: expected one of"):
        pack_codebook(codes, ones, NF4, group_size=48)
    with pytest.raises(TypeError, match="w: expected dtype float32"):
        pack_codebook_weights(w.astype(np.float64), NF4, 32)


def test_codebook_plan_and_entry(level, rng, tmp_path, monkeypatch):
    from kernels.gemm.codebook import gemm_codebook_plan
    from tests.kernels.test_int4 import _grouped_cases, check_entries

    cases = _grouped_cases(rng, lambda w: pack_codebook_weights(w, NF4, 32), gemm_codebook_plan,
                           kernels.gemm_codebook)
    check_entries(cases, tmp_path, monkeypatch)
