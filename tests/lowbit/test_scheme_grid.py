"""Schemes, presets, and fitting / quantizing / dequantizing under every grid and granularity."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.quantization import grid
from lowbit.quantization.scheme import NF4, PRESETS, QScheme, get, pow2_table

SCHEMES = [f() for f in PRESETS.values()] + [
    lowbit.int8(signed=False, symmetric=False),
    lowbit.int8(granularity="channel", axis=1),
    lowbit.int8(narrow_range=True),
    lowbit.int4(group_size=32, symmetric=False, signed=False),
    lowbit.int4(group_size=None),
    lowbit.ternary(granularity="group", axis=-1, group_size=16),
    lowbit.binary(granularity="tensor"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.granularity}")
@pytest.mark.parametrize("shape", [(7,), (5, 33), (3, 4, 65)])
def test_round_trip_shapes_and_codes(rng, scheme, shape):
    if scheme.granularity != "tensor" and scheme.axis >= len(shape):
        pytest.skip("axis beyond this rank")
    x = rng.standard_t(3, shape).astype(np.float32)
    params = grid.fit(x, scheme)
    assert params.scale.shape == grid.param_shape(shape, scheme) and params.scale.dtype == np.float32
    codes = grid.quantize(x, scheme, params)
    assert codes.shape == shape and codes.dtype == scheme.qtype.dtype
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    back = grid.dequantize(codes, scheme, params)
    assert back.shape == shape and back.dtype == np.float32
    # quantizing the dequantized values again is a fixed point
    np.testing.assert_array_equal(grid.quantize(back, scheme, params), codes)


def test_param_shapes():
    s = lowbit.int4(group_size=4)  # groups along the last axis
    assert grid.param_shape((6, 10), s) == (6, 3)
    assert grid.param_shape((6, 10), lowbit.int8(granularity="channel", axis=0)) == (6,)
    assert grid.param_shape((6, 10), lowbit.int8()) == ()
    scale = np.arange(18, dtype=np.float32).reshape(6, 3)
    full = grid.expand(scale, (6, 10), s)
    np.testing.assert_array_equal(full[1], [3, 3, 3, 3, 4, 4, 4, 4, 5, 5])


def test_reduce_ignores_group_padding():
    x = np.arange(10, dtype=np.float32).reshape(1, 10)
    got = grid.reduce(x, lowbit.int4(group_size=4), np.nanmax)
    np.testing.assert_array_equal(got, [[3, 7, 9]])


def test_uniform_formulas():
    x = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    sym = grid.fit(x, lowbit.int8())
    assert sym.scale == np.float32(2.0) / np.float32(127) and sym.zero_point == 0
    asym = grid.fit(x, lowbit.int8(signed=False, symmetric=False))
    scale = np.float32(3.0) / np.float32(255)
    assert asym.scale == scale and asym.zero_point == np.rint(np.float32(1.0) / scale)
    unsigned_sym = grid.fit(x, lowbit.int8(signed=False))
    assert unsigned_sym.zero_point == 128 and unsigned_sym.scale == np.float32(2.0) / np.float32(127.5)
    q = grid.quantize(x, lowbit.int8(), sym)
    np.testing.assert_array_equal(q, np.clip(np.rint(x / sym.scale), -128, 127))


def test_rounds_half_to_even_and_saturates():
    s = lowbit.int8()
    params = grid.QParams(np.float32(1.0), np.int32(0))
    q = grid.quantize(np.array([0.5, 1.5, 2.5, -0.5, 300.0, -300.0], np.float32), s, params)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, 127, -128])
    narrow = grid.quantize(np.array([-300.0], np.float32), lowbit.int8(narrow_range=True), params)
    assert narrow[0] == -127


def test_stochastic_rounding_is_unbiased():
    s = lowbit.int8().with_(rounding="stochastic")
    params = grid.QParams(np.float32(1.0), np.int32(0))
    x = np.full(200_000, 0.3, np.float32)
    q = grid.quantize(x, s, params, np.random.default_rng(1))
    assert set(np.unique(q)) == {0, 1} and abs(q.mean() - 0.3) < 0.005


def test_codebooks():
    assert len(NF4) == 16 and NF4[0] == -1.0 and NF4[-1] == 1.0 and 0.0 in NF4
    assert pow2_table(4) == tuple(sorted([0.0] + [s * 2.0**-e for s in (-1, 1) for e in range(7)]))
    s = lowbit.nf4(group_size=8)
    x = np.array([[1.0, -1.0, 0.0, 0.5, 0.07, -0.7, 0.2, 0.3]], np.float32)
    params = grid.fit(x, s)
    codes = grid.quantize(x, s, params)
    table = np.array(NF4)
    np.testing.assert_array_equal(codes[0], [np.abs(table - v).argmin() for v in x[0]])


def test_ternary_and_binary_formulas():
    x = np.array([[0.1, -2.0, 1.0, -0.2]], np.float32)
    t = lowbit.ternary()
    params = grid.fit(x, t)
    threshold = 0.7 * np.abs(x).mean()
    assert np.isclose(params.threshold[0], threshold)
    assert np.isclose(params.scale[0], np.abs(x)[np.abs(x) > threshold].mean())
    np.testing.assert_array_equal(grid.quantize(x, t, params), [[0, -1, 1, 0]])
    b = lowbit.binary()
    params = grid.fit(x, b)
    assert np.isclose(params.scale[0], np.abs(x).mean())
    np.testing.assert_array_equal(grid.quantize(np.array([[0.0, -0.0, -1e-9, 3.0]]), b, params), [[1, 1, -1, 1]])


def test_all_zero_groups_get_a_usable_scale():
    for scheme in SCHEMES:
        x = np.zeros((4, 64), np.float32)
        params = grid.fit(x, scheme)
        assert np.all(params.scale > 0)
        assert np.all(grid.dequantize(grid.quantize(x, scheme, params), scheme, params)[x == 0] == 0) \
            or scheme.grid == "binary"


def test_scheme_dict_round_trip_and_registry():
    for scheme in SCHEMES:
        assert QScheme.from_dict(scheme.to_dict()) == scheme
        assert get(scheme.to_dict()) == scheme
    assert get("nf4") == lowbit.nf4()
    with pytest.raises(ValueError, match="scheme: expected a QScheme, a dict or one of .*'int8'"):
        get("int3")
    with pytest.raises(ValueError, match="unknown fields"):
        QScheme.from_dict({"bits": 8, "colour": "blue"})


@pytest.mark.parametrize("kw,match", [
    (dict(grid="log"), "grid: expected one of"),
    (dict(bits=3), "bits: grid 'uniform' takes bits in"),
    (dict(grid="binary", bits=2), "bits: grid 'binary' takes bits in"),
    (dict(granularity="row"), "granularity: expected one of"),
    (dict(granularity="group"), "group_size: required with granularity 'group'"),
    (dict(group_size=32), "group_size: required with granularity 'group' and only then"),
    (dict(granularity="group", group_size=0), "group_size: expected a positive integer"),
    (dict(grid="codebook", bits=4), "codebook: expected 1 to 16 values"),
    (dict(grid="codebook", bits=4, codebook=(0.5, -0.5)), "codebook: values must be sorted"),
    (dict(codebook=(0.0,)), "codebook: only for grid 'codebook'"),
    (dict(grid="ternary", bits=2, signed=False), "grid 'ternary' is always signed and symmetric"),
    (dict(rounding="up"), "rounding: expected one of"),
])
def test_bad_schemes(kw, match):
    with pytest.raises(ValueError, match=match):
        QScheme(**kw)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis: 2 is out of range for a 2-D tensor"):
        grid.fit(np.zeros((3, 4), np.float32), lowbit.int8(granularity="channel", axis=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("preset", ["int8", "int4", "nf4", "ternary", "binary"])
def test_non_finite_values_have_no_code(preset, bad):
    """A NaN or infinite weight is an error naming where it is, never an ordinary code or a row of NaN."""
    import lowbit

    w = np.ones((4, 64), np.float32)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"x: 1 non-finite values \(NaN or inf; the first at index \(2, 5\)\)"):
        lowbit.quantize(w, preset)


def test_a_range_beyond_float32_still_has_a_finite_scale():
    import lowbit

    x = np.array([3e38, -3e38, 1.0, 0.0], np.float32)
    q = lowbit.quantize(x, lowbit.int8(signed=False, symmetric=False))
    y = q.dequantize()
    assert np.isfinite(y).all() and np.abs(y - x).max() <= q.scale.max()
