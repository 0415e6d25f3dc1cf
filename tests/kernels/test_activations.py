"""Float32 elementwise kernels (kernels.activations) against NumPy, their entries, and the float preparers on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kernels
from kernels import activations
from kernels.activations import ERF_CLAMP, ERF_P, ERF_Q
from kernels.entry import In
from lowbit.graph import Graph, Node, TensorSpec
from lowbit.runtime import Session
from lowbit.runtime.compiled import CompiledSteps

SIZES = (0, 1, 7, 63, 65, 1000)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))


def _floats(rng, n, scale=4.0):
    """``n`` float32 values with NaN, inf and -inf among them (from 7 on)."""
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    if n >= 7:
        x[[0, n // 2, n - 1]] = np.nan, np.inf, -np.inf
    return x


# ---- references: NumPy float32 formulas (exact ops), float64 functions rounded once (the others) -----------------

def _erf64(x):
    c = np.clip(x, -ERF_CLAMP, ERF_CLAMP)
    c = np.where(np.isnan(x), x, c)
    u = c * c
    return c * np.polynomial.polynomial.polyval(u, ERF_P) / np.polynomial.polynomial.polyval(u, ERF_Q)


def _sigmoid64(x):
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-x))


F32 = np.float32
EXACT = {  # op -> (params, NumPy float32 formula)
    "clip": ({"lo": -0.5, "hi": 2.0}, lambda x: np.minimum(np.maximum(x, F32(-0.5)), F32(2.0))),
    "leaky_relu": ({"alpha": 0.1}, lambda x: np.where(x >= 0, x, F32(0.1) * x)),
    "hard_sigmoid": ({"alpha": 0.2, "beta": 0.5},
                     lambda x: np.minimum(np.maximum(x * F32(0.2) + F32(0.5), F32(0)), F32(1))),
    "hard_swish": ({}, lambda x: x * np.minimum(np.maximum(x * F32(1 / 6) + F32(0.5), F32(0)), F32(1))),
    "neg": ({}, np.negative), "abs": ({}, np.abs), "sqrt": ({}, np.sqrt), "reciprocal": ({}, np.reciprocal),
}
ROUNDED = {  # op -> (params, float64 function)
    "exp": ({}, np.exp), "sigmoid": ({}, _sigmoid64), "tanh": ({}, np.tanh), "erf": ({}, _erf64),
    "gelu_tanh": ({}, lambda x: x * _sigmoid64(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "quick_gelu": ({"alpha": 1.702}, lambda x: x * _sigmoid64(1.702 * x)),
}


def _call(op, params, x, out=None):
    out = np.empty_like(x) if out is None else out
    assert activations.unary_entry(op, **params)([x], [out]) is None
    return out


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", sorted(EXACT))
def test_exact_unary_ops_match_numpy_bit_for_bit(rng, op, n):
    params, formula = EXACT[op]
    x = _floats(rng, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = formula(x)
    np.testing.assert_array_equal(_call(op, params, x), want)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", sorted(ROUNDED))
def test_transcendental_ops_are_the_float64_function_rounded(rng, op, n):
    params, fn = ROUNDED[op]
    x = _floats(rng, n)
    with np.errstate(invalid="ignore", over="ignore"):
        want = fn(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(_call(op, params, x), want, rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("op", sorted(ROUNDED))
def test_transcendental_ops_over_their_whole_range(op):
    """Overflow, underflow to subnormals and 0, the Taylor / exp switch of tanh, erf's clamp, tiny values."""
    params, fn = ROUNDED[op]
    x = np.concatenate([np.linspace(-120, 120, 4801, dtype=np.float32), np.float32(10) ** np.arange(-30, 2),
                        -np.float32(10) ** np.arange(-30, 2), [0.0625, -0.0625, 0.06249, ERF_CLAMP, 88.72, 88.73]]
                       ).astype(np.float32)
    with np.errstate(over="ignore"):
        want = fn(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(_call(op, params, x), want, rtol=1e-6, atol=1e-44)


def test_erf_is_within_its_bound_of_the_true_erf():
    x = np.concatenate([np.linspace(-6, 6, 20_001, dtype=np.float32),
                        np.float32(10) ** np.linspace(-8, 0.8, 2001, dtype=np.float32)])
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    error = np.abs(_call("erf", {}, x).astype(np.float64) - exact)
    assert error.max() <= 4e-7 and (error / np.maximum(np.abs(exact), 1e-30)).max() <= 4e-7


def _gelu64(x):
    return 0.5 * x * (1 + np.array([math.erf(v) for v in x / math.sqrt(2)]))


@pytest.mark.parametrize("n", SIZES)
def test_gelu_is_within_its_bound(rng, n):
    """kernels.activations.gelu (float32, 16 lanes, masked tail): within 2.5e-7 |x| plus an ulp of the exact value,
    over odd lengths and the whole range (erf's clamp, large and tiny magnitudes); NaN kept."""
    x = np.concatenate([_floats(rng, n), np.linspace(-12, 12, 4001, dtype=np.float32),
                        np.float32(10) ** np.arange(-30, 3), -np.float32(10) ** np.arange(-30, 3)]).astype(np.float32)
    got = _call("gelu", {}, x).astype(np.float64)
    with np.errstate(invalid="ignore"):
        want = _gelu64(x.astype(np.float64))
    finite = np.isfinite(x)
    error = np.abs(got[finite] - want[finite])
    assert (error <= 2.5e-7 * np.abs(x[finite]) + np.spacing(np.abs(want[finite]).astype(np.float32))).all()
    np.testing.assert_array_equal(got[~finite], want[~finite])  # inf, and NaN for NaN and -inf (-inf times 0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 16), (4, 33)], ids=str)
def test_bias_gelu_is_gelu_of_the_sum(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 3
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    out = np.empty_like(x)
    activations.bias_gelu(x, bias, out)
    np.testing.assert_array_equal(out, _call("gelu", {}, x + bias))


def test_any_rank_and_in_place(rng):
    x = _floats(rng, 2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    want = np.tanh(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(_call("tanh", {}, x), want, rtol=1e-6)
    y = x.copy()
    _call("tanh", {}, y, out=y)
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_unary_entry_checks_its_arguments():
    with pytest.raises(ValueError, match="op: expected one of"):
        activations.unary_entry("softplus")
    with pytest.raises(TypeError, match=r"expected parameters \['lo', 'hi'\]"):
        activations.unary_entry("clip", lo=0.0)


# ---- binary ops ----------------------------------------------------------------------------------------------------

NUMPY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}
PATTERNS = [  # (a shape, b shape, kernel)
    ((3, 65), (3, 65), "rows"),  # the same shape
    ((1, 7), (), "planes"), ((2, 4, 3, 5), (1,), "planes"),  # a scalar
    ((), (7, 63), "planes"),  # a scalar first: reversed
    ((2, 3, 65), (65,), "rows"), ((1, 4, 4, 7), (1, 1, 1, 7), "rows"),  # channels last (NHWC, hidden)
    ((7,), (3, 5, 7), "rows"),  # the vector first
    ((2, 7, 3, 5), (1, 7, 1, 1), "planes"), ((7, 1, 1), (1, 7, 3, 3), "planes"),  # axis 1 of NCHW
    ((0, 7), (7,), "rows"), ((1, 0, 3, 3), (0, 1, 1), "planes"),  # empty
]


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("op", sorted(NUMPY))
@pytest.mark.parametrize("a_shape, b_shape, kind", PATTERNS, ids=[f"{a}-{b}" for a, b, _ in PATTERNS])
def test_binary_patterns_match_numpy_bit_for_bit(rng, a_shape, b_shape, kind, op, activation):
    a, b = (rng.standard_normal(s).astype(np.float32) for s in (a_shape, b_shape))
    if a.size and b.size:
        a.reshape(-1)[0], b.reshape(-1)[-1] = np.nan, 0.0  # NaN kept; a division by 0
    entry = activations.binary_entry(op, a_shape, b_shape, activation=activation)
    assert entry.fn.__name__ == f"binary_{kind}"
    with np.errstate(invalid="ignore", divide="ignore"):
        want = NUMPY[op](a, b)
    if activation:
        want = np.clip(want, 0, np.inf if activation == "relu" else 6)
    out = np.empty(want.shape, np.float32)
    entry([a, b], [out])
    np.testing.assert_array_equal(out, want)


def test_binary_entry_binds_constants(rng):
    x, bias = rng.standard_normal((2, 5, 3, 3)).astype(np.float32), rng.standard_normal((5, 1, 1)).astype(np.float32)
    entry = activations.binary_entry("sub", (5, 1, 1), x.shape, a=bias, b=In(0))
    out = np.empty_like(x)
    entry([x], [out])
    np.testing.assert_array_equal(out, bias - x)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 3, 1, 5), (2, 1, 4, 5)), ((2, 3, 4), (2, 1, 4)), ((4, 1), (1, 6))])
def test_other_broadcasts_have_no_entry(a_shape, b_shape):
    assert activations.binary_entry("add", a_shape, b_shape) is None


def test_binary_entry_checks_its_arguments():
    with pytest.raises(ValueError, match="op: expected one of"):
        activations.binary_entry("pow", (3,), (3,))
    with pytest.raises(ValueError, match="activation: expected"):
        activations.binary_entry("add", (3,), (3,), activation="gelu")
    with pytest.raises(TypeError, match="b: expected dtype float32, got float64"):
        activations.binary_entry("add", (3,), (3,), b=np.zeros(3))
    with pytest.raises(ValueError, match=r"b: expected shape \(3,\), got \(4,\)"):
        activations.binary_entry("add", (3,), (3,), b=np.zeros(4, np.float32))


def test_entries_run_inside_compiled_steps(rng):
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    h, y = np.empty_like(x), np.empty_like(x)
    steps = [(activations.binary_entry("add", x.shape, bias.shape, b=bias, activation="relu6"), [In(0)], [h]),
             (activations.unary_entry("gelu"), [h], [y])]
    (got,) = CompiledSteps(steps, feeds=1, fetch=[y])([x])
    want = np.empty_like(x)
    steps[0][0]([x], [h])
    steps[1][0]([h], [want])
    np.testing.assert_array_equal(got, want)


# ---- the float preparers chain them in a session -------------------------------------------------------------------

def _elementwise_graph(rng, shape, channel):
    """x -> a chain of every op with a kernel (channel: the broadcast shape of the per-channel constants)."""
    vector = rng.standard_normal(channel).astype(np.float32)
    params = {"v": vector, "s": np.array(0.5, np.float64), "lo": np.array(-1.5, np.float32),
              "hi": np.array([1.5], np.float32), "pos": np.abs(vector) + 1}
    nodes, t = [], "x"
    chain = [("Add", [None, "v"], {"activation": "relu"}), ("Sub", ["s", None], {}), ("Clip", [None, "lo", "hi"], {}),
             ("Tanh", [], {}), ("Mul", [None, "x"], {}), ("Div", [None, "pos"], {}), ("Sigmoid", [], {}),
             ("LeakyRelu", [], {"alpha": 0.2}), ("HardSigmoid", [], {}), ("HardSwish", [], {}), ("Neg", [], {}),
             ("Erf", [], {}), ("Gelu", [], {"approximate": "tanh"}), ("Gelu", [], {}), ("Abs", [], {}),
             ("Sqrt", [], {}), ("Reciprocal", [], {}), ("Exp", [], {}), ("Relu", [], {}),
             ("Add", ["x", None], {})]
    for i, (op, ins, attrs) in enumerate(chain):
        ins = [t if n is None else n for n in ins] or [t]
        nodes.append(Node(op, ins, [f"t{i}"], attrs, name=f"n{i}"))
        t = f"t{i}"
    return Graph(nodes, {"x": TensorSpec(shape)}, [t], params, {"": 20}).validate()


@pytest.mark.parametrize("shape, channel", [((1, 384), (384,)), ((2, 6, 5, 3), (6, 1, 1))], ids=["hidden", "nchw"])
def test_session_chains_the_elementwise_ops(rng, shape, channel):
    graph = _elementwise_graph(rng, shape, channel)
    x = {"x": rng.standard_normal(shape).astype(np.float32)}
    want = Session(graph, threads=1, compiled=False).run(x)[graph.outputs[0]]
    session = Session(graph, threads=1)
    np.testing.assert_array_equal(session.run(x)[graph.outputs[0]], want)
    ((lane,),) = session._lanes.values()
    (plan,) = lane.plans.values()
    assert len(plan.chained) == len(graph.nodes)


def test_float64_and_unserved_broadcasts_keep_numpy(rng):
    params = {"col": rng.standard_normal((4, 1)).astype(np.float32)}
    nodes = [Node("Add", ["x", "col"], ["y"], name="add"), Node("Tanh", ["y"], ["z"], name="tanh")]
    graph = Graph(nodes, {"x": TensorSpec((1, 6))}, ["z"], params).validate()
    x = rng.standard_normal((1, 6)).astype(np.float32)
    got = Session(graph, threads=1).run({"x": x})["z"]
    np.testing.assert_allclose(got, np.tanh((x + params["col"]).astype(np.float64)), rtol=1e-6)
    graph64 = Graph([Node("Sigmoid", ["x"], ["y"], name="s")], {"x": TensorSpec((3,), np.float64)}, ["y"]).validate()
    x64 = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(Session(graph64).run({"x": x64})["y"], 1 / (1 + np.exp(-x64)), rtol=1e-15)


def test_unary_and_bias_gelu_splits_give_the_same_bits(rng, monkeypatch):
    """unary_split and bias_gelu_split over two threads (flat ranges, whole rows) equal one call."""
    x = rng.standard_normal((37, 29)).astype(np.float32) * 3
    bias = rng.standard_normal(29).astype(np.float32)
    entry = activations.unary_entry("gelu")
    one, biased = _call("gelu", {}, x), np.empty_like(x)
    activations.bias_gelu(x, bias, biased)
    monkeypatch.setattr(kernels.threads, "MIN_US_PER_THREAD", 1e-9)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)
    try:
        split, split_biased = np.empty_like(x), np.empty_like(x)
        activations.unary_split(entry, x, split)
        activations.bias_gelu_split(x, bias, split_biased)
    finally:
        kernels.set_num_threads(previous)
    np.testing.assert_array_equal(split, one)
    np.testing.assert_array_equal(split_biased, biased)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, b, y: activations.bias_gelu_split(x.astype(np.float64), b, y), TypeError, "x: expected a C-contiguous"),
    (lambda x, b, y: activations.bias_gelu_split(x[:, ::2], b[::2], y[:, ::2]), TypeError, "x: expected"),
    (lambda x, b, y: activations.bias_gelu_split(x, b[:3], y), ValueError, r"bias of shape \(8,\)"),
    (lambda x, b, y: activations.bias_gelu_split(x, b, y[:2]), ValueError, "out of shape"),
])
def test_bias_gelu_split_rejects_bad_arguments(call, error, message):
    x, bias = np.ones((4, 8), np.float32), np.ones(8, np.float32)
    with pytest.raises(error, match=message):
        call(x, bias, np.empty_like(x))
