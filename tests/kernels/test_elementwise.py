"""QLinearAdd, QLinearMul and table lookups (``kernels.elementwise``) against their NumPy oracles.

Add and mul: the fast path equals the float32-formula oracle (``*_single_ref``) bit for bit and lies
within one code of the exact float64 oracle, from which it differs on a counted, tiny fraction of
outputs (a few in a million over all code pairs); the exact path (extreme scale ratios) equals the
float64 oracle bit for bit. Lookups and their tables are exact. ONNX Runtime's com.microsoft ops are
compared too when it is installed. The kernels are plain Numba without CPU-specific code (``fma`` and
the float32 bit view are generic LLVM operations): one path, which one test still runs under every
``LOWBIT_ISA`` level.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels.elementwise import (MAX_ADD_RATIO, lookup_table, qlinear_add, qlinear_add_plan, qlinear_lookup,
                                 qlinear_mul, qlinear_mul_plan)
from kernels.reference import elementwise as ref

DTYPES = (np.uint8, np.int8)
OPS = {"add": (qlinear_add, ref.qlinear_add_single_ref, ref.qlinear_add_ref),
       "mul": (qlinear_mul, ref.qlinear_mul_single_ref, ref.qlinear_mul_ref)}
SIZES = (1, 7, 63, 65, 1000003)
# Of all outputs, the fraction the float32 path may round differently from the exact value: measured
# here over every code pair on 120 sets of scales at 3.6e-6 for add and 1.3e-7 for mul, at most 4.6e-5
# for one set.
EXACT_MISS_FRACTION = 1e-4
BROADCASTS = [  # (a shape, b shape): every form the kernel walks in place, and some it copies out first
    ((2, 3, 4, 5), (2, 3, 4, 5)),  # equal
    ((2, 3, 4, 5), ()), ((2, 3, 4, 5), (1,)), ((2, 3, 4, 5), (1, 1, 1, 1)), ((), (2, 3, 4, 5)),  # a scalar
    ((2, 3, 4, 5), (3, 1, 1)), ((2, 3, 4, 5), (1, 3, 1, 1)), ((1, 3, 1, 1), (2, 3, 4, 5)),  # per channel
    ((2, 3, 4, 5), (2, 3, 1, 1)), ((2, 3, 1, 1), (2, 3, 4, 5)),  # per image and channel (squeeze-excitation)
    ((2, 3, 4, 5), (1, 3, 4, 5)), ((1, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 4, 5), (2, 1, 4, 5)),
    ((2, 3, 4, 5), (5,)), ((2, 3, 4, 5), (4, 1)), ((4, 1), (1, 5)), ((2, 1, 4, 5), (2, 3, 4, 1)),
    ((2, 1, 4, 1), (1, 3, 1, 5)), ((1, 3, 1, 5, 1, 2), (2, 1, 4, 1, 3, 1)),  # more than three runs: copied
    ((1,), (1,)), ((), ()), ((7, 1), (7, 1)),
]


def _random(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _zero_point(rng, dtype) -> int:
    info = np.iinfo(dtype)
    return int(rng.integers(info.min, info.max, endpoint=True))


def _every_pair(da, db):
    """Every (a, b) pair of codes, as two arrays of 65536."""
    a = np.arange(np.iinfo(da).min, np.iinfo(da).max + 1).astype(da)
    b = np.arange(np.iinfo(db).min, np.iinfo(db).max + 1).astype(db)
    return np.repeat(a, 256), np.tile(b, 256)


def _scales(rng, op):
    """``(a_scale, b_scale, c_scale)`` as a quantized model has them: outputs span most codes."""
    sa, sb = 10 ** rng.uniform(-3, -1, 2)
    sc = (sa + sb) * 10 ** rng.uniform(-0.5, 0.5) if op == "add" else sa * sb * 10 ** rng.uniform(1, 2.5)
    return sa, sb, sc


def _check(op, args, dtype, activation=None, miss=None):
    """Run ``op``: equal to the float32 oracle, within one code of the exact one; count the misses."""
    kernel, single_ref, exact_ref = OPS[op]
    got = kernel(*args, activation=activation)
    single, exact = single_ref(*args, dtype, activation), exact_ref(*args, dtype, activation)
    assert got.dtype == dtype and got.shape == exact.shape
    np.testing.assert_array_equal(got, single)
    assert np.abs(got.astype(np.int64) - exact).max(initial=0) <= 1
    if miss is not None:
        miss[0] += np.count_nonzero(got != exact)
        miss[1] += got.size
    return got


# --- values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("da", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("db", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dc", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_code_pair(rng, op, da, db, dc):
    """Every pair of codes, uint8 / int8 in any mix, several scales: the miss count stays tiny."""
    a, b = _every_pair(da, db)
    miss = [0, 0]
    for _ in range(4):
        sa, sb, sc = _scales(rng, op)
        c_zero_point = dc(_zero_point(rng, dc))  # a NumPy zero point sets the output dtype
        _check(op, (a, sa, _zero_point(rng, da), b, sb, _zero_point(rng, db), sc, c_zero_point), dc, miss=miss)
    assert miss[0] <= EXACT_MISS_FRACTION * miss[1]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", SIZES)
def test_sizes(rng, op, size):
    a, b = _random(rng, np.uint8, size), _random(rng, np.uint8, size)
    _check(op, (a, 0.02, 131, b, 0.015, 120, 0.031 if op == "add" else 0.005, 127), np.uint8)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("a_shape,b_shape", BROADCASTS, ids=str)
def test_broadcasts(rng, op, a_shape, b_shape):
    a, b = _random(rng, np.uint8, a_shape), _random(rng, np.int8, b_shape)
    got = _check(op, (a, 0.02, 131, b, 0.03, -7, 0.04 if op == "add" else 0.01, 128), np.uint8)
    assert got.shape == np.broadcast_shapes(a_shape, b_shape)


@pytest.mark.parametrize("op", OPS)
def test_broadcast_commutes(rng, op):
    """Swapping a and b swaps the operands of the float32 formula back: the same codes."""
    a, b = _random(rng, np.int8, (2, 5, 3, 7)), _random(rng, np.int8, (5, 1, 1))
    kernel = OPS[op][0]
    np.testing.assert_array_equal(kernel(a, 0.02, 3, b, 0.05, -4, 0.06, 1), kernel(b, 0.05, -4, a, 0.02, 3, 0.06, 1))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dc", DTYPES, ids=lambda d: np.dtype(d).name)
def test_saturation_both_ends(rng, op, dc):
    a, b = _every_pair(np.uint8, np.int8)
    info = np.iinfo(dc)
    for c_scale, c_zero_point in ((0.002, int(info.min) + 10), (0.002, int(info.max) - 10), (0.0004, 0)):
        args = (a, 0.05, 128, b, 0.04, 0, c_scale, dc(c_zero_point))
        got = _check(op, args, dc)
        assert got.min() == info.min and got.max() == info.max


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dc", DTYPES, ids=lambda d: np.dtype(d).name)
def test_relu(rng, op, dc):
    a, b = _every_pair(np.uint8, np.uint8)
    for c_zero_point in (np.iinfo(dc).min, 0, 17, np.iinfo(dc).max):
        args = (a, 0.02, 130, b, 0.03, 120, 0.04 if op == "add" else 0.005, dc(c_zero_point))
        got = _check(op, args, dc, activation="relu")
        np.testing.assert_array_equal(got, np.maximum(OPS[op][0](*args), dc(c_zero_point)))


def test_ties_round_half_to_even():
    """Power-of-two scales make the float32 formula exact: exact halves go to the even code."""
    a, b = _every_pair(np.uint8, np.uint8)
    got = qlinear_add(a, 0.5, 0, b, 0.5, 0, 1.0, 0)  # (a + b) / 2, capped at 255
    np.testing.assert_array_equal(got, np.minimum(np.rint((a.astype(np.int64) + b) / 2), 255))
    got = qlinear_mul(a, 0.25, 0, b, 1.0, 0, 8.0, 0)  # a b / 32
    np.testing.assert_array_equal(got, np.minimum(np.rint(a.astype(np.int64) * b / 32), 255))
    assert qlinear_add(np.uint8([1, 3, 5]), 0.5, 0, np.uint8([0, 0, 0]), 1.0, 0, 1.0, 0).tolist() == [0, 2, 2]


@pytest.mark.parametrize("op,scales", [
    ("add", (MAX_ADD_RATIO, 1.0, 1.0)),  # ratios summing past the float32 path's bound
    ("add", (1e3, 1e-3, 1e-7)),
    ("add", (1e-35, 0.05, 0.1)),  # a factor that would be subnormal in float32
    ("mul", (1e-25, 1e-25, 1e-45)),  # a_scale b_scale underflows float32
    ("mul", (1e20, 1e20, 1.0)),  # and overflows it
    ("mul", (1e-10, 1e-10, 1e20)),  # m far below float32's comfortable range
])
def test_exact_path(rng, op, scales):
    """Scales the float32 formula cannot serve within one code: the float64 formula, bit for bit."""
    a, b = _every_pair(np.int8, np.uint8)
    sa, sb, sc = scales
    args = (a, sa, 3, b, sb, 250, sc, 5)
    got = OPS[op][0](*args)
    np.testing.assert_array_equal(got, OPS[op][2](*args, np.int8))
    np.testing.assert_array_equal(OPS[op][0](*args, activation="relu"), OPS[op][2](*args, np.int8, "relu"))


def test_exact_path_broadcasts(rng):
    for a_shape, b_shape in BROADCASTS:
        a, b = _random(rng, np.uint8, a_shape), _random(rng, np.uint8, b_shape)
        args = (a, 1e4, 128, b, 0.5, 100, 1.0, 0)
        np.testing.assert_array_equal(qlinear_add(*args), ref.qlinear_add_ref(*args, np.uint8))


def test_threads(rng, monkeypatch):
    """Large outputs split over two threads mid-row: the codes of one thread."""
    a, b = _random(rng, np.uint8, (3, 7, 317, 307)), _random(rng, np.uint8, (7, 1, 1))  # 2,043,663 elements
    table = _random(rng, np.int8, 256)
    calls = [lambda: qlinear_add(a, 0.02, 131, b, 0.015, 120, 0.031, 127),
             lambda: qlinear_mul(a, 0.02, 131, b, 0.015, 120, 0.005, 127),
             lambda: qlinear_add(a, 1e4, 131, b, 0.015, 120, 1.0, 127),  # the exact path
             lambda: qlinear_lookup(a, table)]
    monkeypatch.setattr(kernels.threads, "_setting", 1)
    one = [call() for call in calls]
    monkeypatch.setattr(kernels.threads, "_setting", 2)
    for call, want in zip(calls, one):
        np.testing.assert_array_equal(call(), want)
    np.testing.assert_array_equal(one[0], ref.qlinear_add_single_ref(a, 0.02, 131, b, 0.015, 120, 0.031, 127, np.uint8))
    np.testing.assert_array_equal(one[3], ref.qlinear_lookup_ref(a, table))


def test_output_dtype(rng):
    a, b = _random(rng, np.uint8, (3, 4)), _random(rng, np.uint8, (3, 4))
    assert qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, 3).dtype == np.uint8  # a Python int: a's dtype
    assert qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, np.int8(3)).dtype == np.int8
    assert qlinear_mul(a, 0.1, 0, b, 0.1, 0, 0.1, np.array(3, np.int8)).dtype == np.int8
    assert qlinear_add(a.view(np.int8), 0.1, 0, b, 0.1, 0, 0.1, 3).dtype == np.int8


def test_out_and_in_place(rng):
    a, b = _random(rng, np.uint8, (2, 65, 7)), _random(rng, np.uint8, (2, 65, 7))
    want = qlinear_add(a, 0.02, 100, b, 0.03, 110, 0.04, 120)
    out = np.full(a.shape, 7, np.uint8)
    assert qlinear_add(a, 0.02, 100, b, 0.03, 110, 0.04, 120, out=out) is out
    np.testing.assert_array_equal(out, want)
    a_in_place, b_in_place = a.copy(), b.copy()  # the result may overwrite either whole input
    assert qlinear_add(a_in_place, 0.02, 100, b, 0.03, 110, 0.04, 120, out=a_in_place) is a_in_place
    assert qlinear_add(a, 0.02, 100, b_in_place, 0.03, 110, 0.04, 120, out=b_in_place) is b_in_place
    np.testing.assert_array_equal(a_in_place, want)
    np.testing.assert_array_equal(b_in_place, want)
    as_int8 = a.copy()
    qlinear_add(as_int8, 0.02, 100, b, 0.03, 110, 0.04, np.int8(20), out=as_int8.view(np.int8))  # other type
    np.testing.assert_array_equal(as_int8.view(np.int8), qlinear_add(a, 0.02, 100, b, 0.03, 110, 0.04, np.int8(20)))
    x = _random(rng, np.int8, 1000)
    table = _random(rng, np.int8, 256)
    want = ref.qlinear_lookup_ref(x, table)
    assert qlinear_lookup(x, table, out=x) is x
    np.testing.assert_array_equal(x, want)


def test_non_contiguous_inputs(rng):
    a, b = _random(rng, np.uint8, (4, 6, 5)), _random(rng, np.int8, (5, 6, 4))
    for x, y in ((a.transpose(2, 1, 0), b), (a[:, ::2], b[::-1, ::2].transpose(2, 1, 0)), (a[..., 1], b[0, :, 0])):
        for op in OPS:
            _check(op, (x, 0.02, 3, y, 0.03, -3, 0.05 if op == "add" else 0.01, 128), np.uint8)


def test_empty(rng):
    a, b = np.zeros((0, 3), np.uint8), np.zeros((1, 3), np.uint8)
    assert qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, 0).shape == (0, 3)
    assert qlinear_lookup(a, np.zeros(256, np.int8)).shape == (0, 3)


def test_every_level(level, rng):
    a, b = _random(rng, np.uint8, (2, 8, 9, 9)), _random(rng, np.uint8, (8, 1, 1))
    for op in OPS:
        _check(op, (a, 0.02, 131, b, 0.015, 120, 0.031 if op == "add" else 0.005, 127), np.uint8)
    table = _random(rng, np.uint8, 256)
    np.testing.assert_array_equal(qlinear_lookup(a, table), ref.qlinear_lookup_ref(a, table))


# --- lookups -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dx", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dy", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
def test_lookup(rng, dx, dy, size):
    x, table = _random(rng, dx, size), _random(rng, dy, 256)
    got = qlinear_lookup(x, table)
    assert got.dtype == dy and got.shape == x.shape
    np.testing.assert_array_equal(got, ref.qlinear_lookup_ref(x, table))


def test_lookup_every_code_and_shape(rng):
    codes = np.arange(-128, 128, dtype=np.int8).reshape(4, 8, 8)
    table = _random(rng, np.uint8, 256)
    got = qlinear_lookup(codes.transpose(2, 0, 1), table)
    np.testing.assert_array_equal(got, table[codes.transpose(2, 0, 1).astype(np.uint8)])
    assert qlinear_lookup(np.array(-1, np.int8), table).tolist() == table[255]  # 0-d in, 0-d out


def _table_oracle(fn, xs, xz, ys, yz, dx, dy):
    """Each code on its own, in Python floats (float64): ``saturate(round_half_even(fn(real) / ys) + yz)``."""
    info = np.iinfo(dy)
    out = []
    for byte in range(256):
        code = int(np.uint8(byte).view(dx))
        v = fn(np.float64((code - xz) * float(np.float32(xs)))) / float(np.float32(ys))
        out.append(min(max(round(v) + yz, info.min), info.max))  # Python's round is half to even
    return np.array(out).astype(dy)


@pytest.mark.parametrize("dx", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dy", DTYPES, ids=lambda d: np.dtype(d).name)
def test_lookup_table(dx, dy):
    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    def hard_swish(v):
        return v * np.clip(v + 3, 0, 6) / 6

    def leaky_relu(v):
        return np.where(v >= 0, v, 0.1 * v)

    zx, zy = (128 if dx == np.uint8 else 0), (0 if dy == np.uint8 else -128)
    for fn, ys in ((sigmoid, 1 / 256), (hard_swish, 0.05), (leaky_relu, 0.03)):
        table = lookup_table(fn, 0.0625, zx, ys, zy, dx, dy)
        assert table.dtype == dy and table.shape == (256,)
        np.testing.assert_array_equal(table, _table_oracle(fn, 0.0625, zx, ys, zy, dx, dy))


def test_lookup_table_exact_cases():
    identity = lookup_table(lambda v: v, 0.1, 5, 0.1, 5, np.int8, np.int8)
    codes = np.arange(256, dtype=np.uint8).view(np.int8)
    np.testing.assert_array_equal(identity, codes)
    np.testing.assert_array_equal(qlinear_lookup(codes, identity), codes)
    halves = lookup_table(lambda v: v / 2, 1.0, 0, 1.0, 0, np.uint8, np.uint8)  # odd codes are ties
    np.testing.assert_array_equal(halves, np.rint(np.arange(256) / 2))
    assert halves[1] == 0 and halves[3] == 2 and halves[5] == 2
    saturated = lookup_table(lambda v: np.where(v > 0, np.inf, -np.inf), 1.0, 128, 1.0, 0, np.uint8, np.int8)
    assert saturated[:129].tolist() == [-128] * 129 and saturated[129:].tolist() == [127] * 127


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shapes", [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 4, 5), (3, 1, 1)), ((4, 1), (1, 5)),
                                    ((1, 3, 1, 5, 1, 2), (2, 1, 4, 1, 3, 1)), ((7, 1), ())])
def test_plan_equals_the_one_call_function(rng, op, shapes):
    """A plan made once gives, call after call, what the one-call function gives (it is what that one runs)."""
    kernel, make = (qlinear_add, qlinear_add_plan) if op == "add" else (qlinear_mul, qlinear_mul_plan)
    for da, db in ((np.uint8, np.uint8), (np.int8, np.uint8)):
        quantization = (0.0312, _zero_point(rng, da), 0.0718, _zero_point(rng, db), 0.1043, np.int8(-3))
        plan = make(shapes[0], da, shapes[1], db, *quantization, activation="relu")
        for _ in range(2):
            a, b = _random(rng, da, shapes[0]), _random(rng, db, shapes[1])
            want = kernel(a, *quantization[:2], b, *quantization[2:], activation="relu")
            got = plan(a, b)
            assert got.dtype == np.int8 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            out = np.empty_like(want)
            assert plan(a, b, out) is out
            np.testing.assert_array_equal(out, want)


def test_bad_plan_arguments():
    plan = qlinear_add_plan((2, 3), np.uint8, (3,), "uint8", 0.1, 0, 0.1, 0, 0.1, 0)
    a, b = np.zeros((2, 3), np.uint8), np.zeros(3, np.uint8)
    np.testing.assert_array_equal(plan(a[:, ::-1], b), np.zeros((2, 3), np.uint8))  # copied to C order
    with pytest.raises(ValueError, match=r"a: expected shape \(2, 3\) \(as prepared\), got \(3, 2\)"):
        plan(a.T.copy(), b)
    with pytest.raises(ValueError, match=r"b: expected shape \(3,\) \(as prepared\), got \(1, 3\)"):
        plan(a, b[None])
    with pytest.raises(TypeError, match="b: expected dtype uint8, got int8"):
        plan(a, b.view(np.int8))
    with pytest.raises(TypeError, match="a: expected a numpy.ndarray, got list"):
        plan([[0] * 3] * 2, b)
    with pytest.raises(ValueError, match=r"out: expected a 2-D array, got shape \(3,\)"):
        plan(a, b, np.zeros(3, np.uint8))
    with pytest.raises(TypeError, match="b_dtype: expected uint8 or int8, got <class 'numpy.float32'>"):
        qlinear_mul_plan((2, 3), np.uint8, (3,), np.float32, 0.1, 0, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match=r"a, b: shapes \(2, 3\) and \(2,\) do not broadcast"):
        qlinear_add_plan((2, 3), np.uint8, (2,), np.uint8, 0.1, 0, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match=r"a_zero_point: values must lie in \[0, 255\]"):
        qlinear_add_plan((2, 3), np.uint8, (3,), np.uint8, 0.1, -1, 0.1, 0, 0.1, 0)


# --- bad inputs --------------------------------------------------------------------------------------------------

def test_bad_binary_arguments():
    a, b = np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.int8)
    with pytest.raises(TypeError, match="a: expected dtype uint8 or int8, got float32"):
        qlinear_add(a.astype(np.float32), 0.1, 0, b, 0.1, 0, 0.1, 0)
    with pytest.raises(TypeError, match="b: expected a numpy.ndarray, got list"):
        qlinear_mul(a, 0.1, 0, [1, 2], 0.1, 0, 0.1, 0)
    with pytest.raises(TypeError, match="b: expected a numpy.ndarray, got uint8"):
        qlinear_add(a, 0.1, 0, np.uint8(3), 0.1, 0, 0.1, 0)
    for name, position in (("a_scale", 1), ("b_scale", 4), ("c_scale", 6)):
        for bad in (0.0, -0.1, np.inf, np.nan, 1e-50, 1e39):
            args = [a, 0.1, 0, b, 0.1, 0, 0.1, 0]
            args[position] = bad
            with pytest.raises(ValueError, match=f"{name}: expected a positive finite float32"):
                qlinear_add(*args)
    with pytest.raises(TypeError, match="b_scale: expected a real scalar, got str"):
        qlinear_add(a, 0.1, 0, b, "0.1", 0, 0.1, 0)
    with pytest.raises(TypeError, match="c_scale: expected a real scalar, got bool"):
        qlinear_add(a, 0.1, 0, b, 0.1, 0, True, 0)
    with pytest.raises(ValueError, match=r"a_scale: expected a scalar, got shape \(2,\)"):
        qlinear_add(a, np.float32([0.1, 0.2]), 0, b, 0.1, 0, 0.1, 0)
    assert qlinear_add(a, np.float32([0.5]), 0, b, 0.5, 0, 0.5, 0).shape == (2, 3)  # one element is a scalar
    with pytest.raises(ValueError, match=r"a_zero_point: values must lie in \[0, 255\], got range \[256, 256\]"):
        qlinear_add(a, 0.1, 256, b, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match=r"b_zero_point: values must lie in \[-128, 127\], got range \[200, 200\]"):
        qlinear_add(a, 0.1, 0, b, 0.1, 200, 0.1, 0)
    with pytest.raises(ValueError, match=r"c_zero_point: values must lie in \[-128, 127\], got range \[200, 200\]"):
        qlinear_add(b, 0.1, 0, a, 0.1, 0, 0.1, 200)  # output int8, as b is
    with pytest.raises(TypeError, match="a_zero_point: expected an integer scalar"):
        qlinear_add(a, 0.1, 3.0, b, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match=r"b_zero_point: expected a scalar, got shape \(3,\)"):
        qlinear_add(a, 0.1, 0, b, 0.1, np.int8([1, 2, 3]), 0.1, 0)
    with pytest.raises(TypeError, match="c_zero_point: a NumPy zero point sets the output dtype and must be uint8 "
                                        "or int8, got int16"):
        qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, np.int16(3))
    with pytest.raises(ValueError, match="activation: expected None or 'relu', got 'relu6'"):
        qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, 0, activation="relu6")
    with pytest.raises(ValueError, match=r"a, b: shapes \(2, 3\) and \(3, 2\) do not broadcast"):
        qlinear_mul(a, 0.1, 0, b.T.copy(), 0.1, 0, 0.1, 0)


def test_bad_out():
    a, b = np.zeros((4, 6), np.uint8), np.zeros((6,), np.uint8)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 6\), got \(6, 4\)"):
        qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, 0, out=np.zeros((6, 4), np.uint8))
    with pytest.raises(TypeError, match="out: expected dtype int8, got uint8"):
        qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, np.int8(0), out=np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="out: expected a C-contiguous array"):
        qlinear_mul(a, 0.1, 0, b, 0.1, 0, 0.1, 0, out=np.zeros((6, 4), np.uint8).T)
    readonly = np.zeros((4, 6), np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        qlinear_add(a, 0.1, 0, b, 0.1, 0, 0.1, 0, out=readonly)
    big = np.zeros(30, np.uint8)
    with pytest.raises(ValueError, match="out: must not overlap an input, other than being the whole of one"):
        qlinear_add(big[:24].reshape(4, 6), 0.1, 0, b, 0.1, 0, 0.1, 0, out=big[6:].reshape(4, 6))
    with pytest.raises(ValueError, match="out: must not overlap an input, other than being the whole of one"):
        qlinear_add(a, 0.1, 0, big[:6], 0.1, 0, 0.1, 0, out=big[:24].reshape(4, 6))  # b is broadcast: partial
    x = np.zeros(30, np.uint8)
    with pytest.raises(ValueError, match="out: must not overlap an input, other than being the whole of one"):
        qlinear_lookup(x[:20], np.zeros(256, np.uint8), out=x[5:25])
    with pytest.raises(TypeError, match="out: expected dtype int8, got uint8"):
        qlinear_lookup(x, np.zeros(256, np.int8), out=np.zeros(30, np.uint8))


def test_bad_lookup_arguments():
    x = np.zeros(5, np.uint8)
    with pytest.raises(TypeError, match="x: expected dtype uint8 or int8, got int32"):
        qlinear_lookup(x.astype(np.int32), np.zeros(256, np.uint8))
    with pytest.raises(TypeError, match="table: expected dtype uint8 or int8, got float32"):
        qlinear_lookup(x, np.zeros(256, np.float32))
    with pytest.raises(ValueError, match=r"table: expected shape \(256,\), one code per 8-bit input code, "
                                         r"got \(255,\)"):
        qlinear_lookup(x, np.zeros(255, np.uint8))
    with pytest.raises(TypeError, match="table: expected a numpy.ndarray, got list"):
        qlinear_lookup(x, [0] * 256)


def test_bad_lookup_table_arguments():
    def args(**changes):
        base = dict(fn=np.tanh, x_scale=0.1, x_zero_point=0, y_scale=0.01, y_zero_point=0, x_dtype=np.int8,
                    y_dtype=np.int8)
        return {**base, **changes}

    with pytest.raises(TypeError, match="fn: expected a callable, got float"):
        lookup_table(**args(fn=1.0))
    with pytest.raises(TypeError, match="x_dtype: expected uint8 or int8, got <class 'numpy.int16'>"):
        lookup_table(**args(x_dtype=np.int16))
    with pytest.raises(TypeError, match="y_dtype: expected uint8 or int8, got 'float32'"):
        lookup_table(**args(y_dtype="float32"))
    with pytest.raises(ValueError, match="y_scale: expected a positive finite float32"):
        lookup_table(**args(y_scale=-1.0))
    with pytest.raises(ValueError, match=r"x_zero_point: values must lie in \[-128, 127\], got range \[128, 128\]"):
        lookup_table(**args(x_zero_point=128))
    with pytest.raises(ValueError, match=r"fn: expected 256 values for the 256 codes, got shape \(\)"):
        lookup_table(**args(fn=lambda v: 1.0))
    with pytest.raises(ValueError, match=r"fn: NaN for 128 input code\(s\); a code has no NaN"):
        lookup_table(**args(fn=np.log))  # log of the negative inputs


# --- ONNX Runtime ------------------------------------------------------------------------------------------------

def _ort_session(op, inputs: dict, scales: dict, dtype):
    """A one-node com.microsoft ``op`` model: activations ``inputs`` (name -> shape), scalar ``scales``."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names = {"QLinearAdd": ["A", "as", "az", "B", "bs", "bz", "cs", "cz"],
             "QLinearMul": ["A", "as", "az", "B", "bs", "bz", "cs", "cz"],
             "QLinearSigmoid": ["A", "as", "az", "cs", "cz"], "QLinearLeakyRelu": ["A", "as", "az", "cs", "cz"]}[op]
    attributes = {"alpha": 0.1} if op == "QLinearLeakyRelu" else {}
    node = helper.make_node(op, names, ["Y"], domain="com.microsoft", **attributes)
    initializers = [numpy_helper.from_array(np.asarray(np.float32(v) if k.endswith("s") else dtype(v)), k)
                    for k, v in scales.items()]
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(k, elem, list(s)) for k, s in inputs.items()],
                              [helper.make_tensor_value_info("Y", elem, None)], initializer=initializers)
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_onnxruntime(rng, op, dtype):
    """ONNX Runtime's x86 kernels compute the float32 formula too: equal codes (at most 1 apart elsewhere)."""
    a, b = _every_pair(dtype, dtype)
    channel_a, channel_b = b.reshape(256, 256), np.arange(256).astype(np.uint8).view(dtype).reshape(256, 1)
    differ = total = 0
    for _ in range(3):
        sa, sb, sc = _scales(rng, op)
        scales = {"as": sa, "az": _zero_point(rng, dtype), "bs": sb, "bz": _zero_point(rng, dtype), "cs": sc,
                  "cz": _zero_point(rng, dtype)}
        for x, y in ((a, b), (channel_a, channel_b), (channel_b, channel_a)):  # equal, b per row, a per row
            session = _ort_session("QLinear" + op.capitalize(), {"A": x.shape, "B": y.shape}, scales, dtype)
            want = session.run(None, {"A": x, "B": y})[0]
            got = OPS[op][0](x, sa, scales["az"], y, sb, scales["bz"], sc, dtype(scales["cz"]))
            assert np.abs(got.astype(np.int64) - want).max() <= 1
            differ, total = differ + np.count_nonzero(got != want), total + got.size
    assert differ <= EXACT_MISS_FRACTION * total


@pytest.mark.parametrize("op,fn", [("QLinearSigmoid", lambda v: 1 / (1 + np.exp(-v))),
                                   ("QLinearLeakyRelu", lambda v: np.where(v >= 0, v, 0.1 * v))])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_lookup_matches_onnxruntime(op, fn, dtype):
    """ORT builds its tables in float32 (an approximate sigmoid): at most 1 apart, on few codes."""
    codes = np.arange(256, dtype=np.uint8).view(dtype)
    zx, zy = (128, 0) if dtype == np.uint8 else (0, -128)
    ys = 1 / 256 if op == "QLinearSigmoid" else 0.05
    session = _ort_session(op, {"A": codes.shape}, {"as": 0.05, "az": zx, "cs": ys, "cz": zy}, dtype)
    want = session.run(None, {"A": codes})[0]
    got = qlinear_lookup(codes, lookup_table(fn, 0.05, zx, ys, zy, dtype, dtype))
    assert np.abs(got.astype(np.int64) - want).max() <= 1
    assert np.count_nonzero(got != want) <= 8


def test_binary_plans_entries(rng, tmp_path, monkeypatch):
    """Every walk (equal shapes, per channel, a row, two runs, copied operands) and both formulas, both orders."""
    from kernels.entry import In
    from lowbit.runtime.compiled import CompiledSteps

    cases = []
    for a_shape, b_shape in [((2, 3, 4, 5), (2, 3, 4, 5)), ((1, 8, 3, 3), (1, 8, 1, 1)), ((4, 1), (1, 6)),
                             ((2, 1, 3, 1, 5), (1, 4, 1, 6, 1)), ((3, 7, 1), (3, 1, 5))]:
        a = rng.integers(-128, 128, a_shape, dtype=np.int8)
        b = rng.integers(0, 256, b_shape, dtype=np.uint8)
        for make, scales in [(kernels.qlinear_add_plan, (0.02, 3, 0.03, 5, 0.05, -7)),
                             (kernels.qlinear_mul_plan, (0.02, 3, 0.03, 5, 0.05, -7)),
                             (kernels.qlinear_add_plan, (0.02, 3, 1e-3, 5, 1e-7, -7))]:  # the exact formula
            plan = make(a_shape, np.int8, b_shape, np.uint8, *scales, activation="relu")
            want = kernels.qlinear_add(a, *scales[:2], b, *scales[2:]) if make is kernels.qlinear_add_plan else None
            got = plan(a, b)
            if want is not None:
                np.testing.assert_array_equal(got, np.maximum(want, -7))
            out = np.empty_like(got)
            plan.entry()([a, b], [out])
            np.testing.assert_array_equal(out, got)
            cases.append((plan, a, b, got))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    chained = cases[::5]  # three walks and all three formulas: a chain compiles its callees again
    outs = [np.empty_like(got) for *_, got in chained]
    steps = [(plan.entry(), [In(2 * i), In(2 * i + 1)], [out])
             for i, ((plan, *_), out) in enumerate(zip(chained, outs))]
    feeds = [v for _, a, b, _ in chained for v in (a, b)]
    for result, (*_, got) in zip(CompiledSteps(steps, len(feeds), outs)(feeds), chained):
        np.testing.assert_array_equal(result, got)
