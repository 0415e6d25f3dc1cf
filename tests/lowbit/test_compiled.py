"""Kernel entries chained into one compiled function (lowbit.runtime.compiled)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from kernels import dispatch
from kernels.entry import Entry, In, Out
from lowbit.graph import Graph, Node, TensorSpec
from lowbit.runtime import Kernel, Session
from lowbit.runtime.compiled import CompiledSteps, cache_folder
from lowbit.runtime.registry import PREPARERS, preparer


@numba.njit(nogil=True)
def _scale_add(x, bias, factor, shape, out):
    """out = x * factor + bias (bias broadcast along the last axis); ``shape`` checks tuple literals."""
    if out.shape != shape:  # (pytest rewrites assert statements, which Numba cannot compile)
        raise ValueError("shape")
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i, j] * factor + bias[j]


@numba.njit(nogil=True)
def _relu(x, out):
    for i in range(x.size):
        out.flat[i] = max(x.flat[i], x.dtype.type(0))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))


def _chain(rng):
    bias = rng.standard_normal(8).astype(np.float32)
    a, b, c = (np.empty((3, 8), np.float32) for _ in range(3))
    steps = [(Entry(_scale_add, (In(0), bias, np.float32(2.0), (3, 8), Out(0))), [In(0)], [a]),
             (Entry(_relu, (In(0), Out(0))), [a], [b]),
             (Entry.view((24,)), [b], [c]),
             (Entry(_scale_add, (In(0), bias, np.float32(-1.0), (3, 8), Out(0))), [In(1)], [a])]
    return steps, bias


def test_one_function_runs_every_entry_and_returns_the_fetched_arrays(rng):
    steps, bias = _chain(rng)
    x, z = (rng.standard_normal((3, 8)).astype(np.float32) for _ in range(2))
    compiled = CompiledSteps(steps, feeds=2, fetch=[steps[2][2][0], steps[3][2][0], In(1)])
    viewed, last, fed = compiled([x, z])
    np.testing.assert_array_equal(viewed, np.maximum(x * 2 + bias, 0).reshape(24))
    np.testing.assert_array_equal(last, -z + bias)
    np.testing.assert_array_equal(fed, z)
    assert compiled.source.count("fn0(") == 2 and "reshape((24, ))" in compiled.source
    assert list(cache_folder().glob("lowbit_graph_*.py"))


def test_python_call_of_an_entry_matches(rng):
    steps, bias = _chain(rng)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out = np.empty((3, 8), np.float32)
    assert steps[0][0]([x], [out]) is None
    np.testing.assert_array_equal(out, x * 2 + bias)
    assert steps[2][0]([out], [None])[0].shape == (24,)


def test_unbindable_arguments_are_refused(rng):
    x = np.empty((4, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        CompiledSteps([(Entry(_relu, (In(0), Out(0))), [x[:, ::2]], [x])], feeds=0, fetch=[x])
    with pytest.raises(TypeError, match="got str"):
        CompiledSteps([(Entry(_relu, (In(0), "nope", Out(0))), [x], [x])], feeds=0, fetch=[x])


# ---- a session chains the nodes whose kernels have an entry ----------------------------------------------------------

@pytest.fixture
def chain_ops():
    """Test ops: ``test.Affine`` (an entry: y = 2 x + bias) and ``test.Negate`` (Python only)."""
    @preparer("test.Affine")
    def prepare_affine(node, graph, inputs):
        (shape, dtype), = inputs
        bias = np.arange(shape[-1], dtype=np.float32)
        entry = Entry(_scale_add, (In(0), bias, np.float32(2.0), tuple(shape), Out(0)))
        return Kernel(lambda ins, outs: entry(ins, outs), [(shape, dtype)], entry=entry)

    @preparer("test.Negate")
    def prepare_negate(node, graph, inputs):
        def run(ins, outs):
            np.negative(ins[0], out=outs[0])

        return Kernel(run, [inputs[0]])

    yield
    del PREPARERS["test.Affine"], PREPARERS["test.Negate"]


def _graph(ops):
    nodes, x = [], "x"
    for i, op in enumerate(ops):
        nodes.append(Node(op, [x], [f"t{i}"], name=f"n{i}"))
        x = f"t{i}"
    return Graph(nodes, {"x": TensorSpec((None, 5))}, [x]).validate()


@pytest.mark.parametrize("ops, chained", [
    (["test.Affine"] * 4, 4),
    (["test.Affine", "test.Affine", "test.Negate", "test.Affine", "test.Affine", "test.Affine"], 5),
    (["test.Affine", "test.Negate", "test.Affine"], 0),  # chains of one node stay Python calls
    (["test.Affine", "Flatten", "test.Affine"], 3),  # views join chains
])
def test_session_chains_entries_and_matches_node_by_node(chain_ops, rng, ops, chained):
    graph = _graph(ops)
    x = {"x": rng.standard_normal((3, 5)).astype(np.float32)}
    expected = Session(graph, compiled=False).run(x)
    session = Session(graph, threads=1)
    got = session.run(x)
    np.testing.assert_array_equal(got[graph.outputs[0]], expected[graph.outputs[0]])
    ((lane,),) = session._lanes.values()
    (plan,) = lane.plans.values()
    assert len(plan.chained) == chained and (plan.program is None) == (chained == 0)
    inner = session.run(x, fetch=["t0", graph.outputs[0]])  # a fetched intermediate leaves the chain too
    np.testing.assert_array_equal(inner["t0"], x["x"] * 2 + np.arange(5, dtype=np.float32))
    rows = session.profile(x, repeat=1).rows
    assert len(rows) == len(ops) and sum(r.note.endswith("chained") for r in rows) == chained  # per node


def test_literals_keep_their_type_and_value():
    from lowbit.runtime.compiled import _literal

    assert _literal(np.float32(-np.inf)) == "np.float32(-np.inf)" and _literal(float("nan")) == "np.nan"
    assert _literal((1, np.int32(2), None, True)) == "(1, np.int32(2), None, True, )"
    assert eval(_literal(np.float32(0.1)), {"np": np}) == np.float32(0.1)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_a_cnn_runs_the_same_chained_and_node_by_node(rng, quantized):
    pytest.importorskip("onnx")
    from lowbit.onnx import load
    from lowbit.onnx.examples import image_feed, resnet
    from lowbit.ptq import quantize_model

    graph = load(resnet(image=12, width=16, blocks=1, stages=2))
    if quantized:
        graph = quantize_model(graph, [image_feed(2, 12, seed=s) for s in range(2)])
    x = image_feed(3, 12, seed=7)
    chained = Session(graph, threads=1, fallback=False)
    want = Session(graph, threads=1, fallback=False, compiled=False).run(x)["logits"]
    np.testing.assert_array_equal(chained.run(x)["logits"], want)
    ((lane,),) = chained._lanes.values()
    (plan,) = lane.plans.values()
    if quantized or dispatch.choose("conv_float32", 144, 16, 144).kind != "blas":  # BLAS: no compiled entry
        assert len(plan.chained) >= 2
