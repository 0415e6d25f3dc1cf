"""lowbit.runtime.transformer_fusion: torch.onnx's GELU, attention-softmax and attention-block patterns become
single ops, and the fused graph computes what the original does."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.graph import Graph, Node, TensorSpec
from lowbit.runtime import Session
from lowbit.runtime.transformer_fusion import fuse_transformer_ops

SCALARS = {"sqrt2": np.array(math.sqrt(2.0), np.float32), "inv_sqrt2": np.array(1 / math.sqrt(2.0), np.float32),
           "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}


def _gelu_nodes(x: str, order: str, scaling: str = "Div") -> list[Node]:
    scaled = Node(scaling, [x, "sqrt2" if scaling == "Div" else "inv_sqrt2"], ["d"])
    head = [scaled, Node("Erf", ["d"], ["e"]), Node("Add", ["e", "one"], ["a"])]
    if order == "x_first":
        return head + [Node("Mul", [x, "a"], ["m"]), Node("Mul", ["m", "half"], ["y"])]
    if order == "half_first":
        return head + [Node("Mul", ["a", "half"], ["m"]), Node("Mul", [x, "m"], ["y"])]
    return [scaled, Node("Mul", [x, "half"], ["m"]), *head[1:], Node("Mul", ["m", "a"], ["y"])]


def _graph(nodes: list[Node], inputs: dict, outputs: list[str], params: dict) -> Graph:
    return Graph(nodes, {n: TensorSpec(s) for n, s in inputs.items()}, outputs, params).validate()


def _same_outputs(graph: Graph, fused: Graph, feeds: dict) -> None:
    want = Session(graph, optimize=False).run(feeds)
    got = Session(fused, optimize=False).run(feeds)
    for name in graph.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("order", ["x_first", "half_first", "x_half_first"])
@pytest.mark.parametrize("scaling", ["Div", "Mul"])
def test_gelu_orders_fuse(rng, order, scaling):
    graph = _graph(_gelu_nodes("x", order, scaling), {"x": (3, 17)}, ["y"], dict(SCALARS))
    fused = fuse_transformer_ops(graph)
    assert [n.op for n in fused.nodes] == ["com.microsoft.Gelu"]
    _same_outputs(graph, fused, {"x": (rng.standard_normal((3, 17)) * 3).astype(np.float32)})


def test_gelu_takes_its_bias_add_along(rng):
    params = {**SCALARS, "b": rng.standard_normal(17).astype(np.float32)}
    graph = _graph([Node("Add", ["b", "t"], ["x"]), *_gelu_nodes("x", "x_first")], {"t": (3, 17)}, ["y"], params)
    fused = fuse_transformer_ops(graph)
    assert [(n.op, n.inputs) for n in fused.nodes] == [("com.microsoft.BiasGelu", ["t", "b"])]
    _same_outputs(graph, fused, {"t": rng.standard_normal((3, 17)).astype(np.float32)})


def test_gelu_leaves_tensors_others_read(rng):
    params = {**SCALARS, "b": rng.standard_normal(17).astype(np.float32)}
    nodes = [Node("Add", ["b", "t"], ["x"]), *_gelu_nodes("x", "x_first"), Node("Add", ["x", "y"], ["z"])]
    fused = fuse_transformer_ops(_graph(nodes, {"t": (3, 17)}, ["z"], params))
    assert [n.op for n in fused.nodes] == ["Add", "com.microsoft.Gelu", "Add"]  # x is read after the GELU too
    graph = _graph(_gelu_nodes("x", "x_first"), {"x": (3, 17)}, ["y", "e"], dict(SCALARS))
    assert [n.op for n in fuse_transformer_ops(graph).nodes] == [n.op for n in graph.nodes]  # e is an output


@pytest.mark.parametrize("scaling, value", [("Div", 8.0), ("Mul", 0.125)])
def test_attention_softmax_fuses(rng, scaling, value):
    params = {"c": np.array(value, np.float32)}
    nodes = [Node(scaling, ["qk", "c"], ["s"]), Node("Add", ["s", "mask"], ["v"]),
             Node("Softmax", ["v"], ["p"], {"axis": -1})]
    graph = _graph(nodes, {"qk": (2, 3, 5, 5), "mask": (2, 1, 1, 5)}, ["p"], params)
    fused = fuse_transformer_ops(graph)
    assert [(n.op, n.inputs, n.attrs) for n in fused.nodes] == [("lowbit.MaskedSoftmax", ["qk", "mask"],
                                                                  {"scale": 0.125})]
    mask = np.where(rng.random((2, 1, 1, 5)) < 0.3, -1e4, 0).astype(np.float32)
    _same_outputs(graph, fused, {"qk": rng.standard_normal((2, 3, 5, 5)).astype(np.float32) * 4, "mask": mask})


def test_attention_softmax_of_another_axis_stays(rng):
    nodes = [Node("Div", ["qk", "c"], ["s"]), Node("Add", ["s", "mask"], ["v"]),
             Node("Softmax", ["v"], ["p"], {"axis": 1})]
    graph = _graph(nodes, {"qk": (2, 5), "mask": (2, 5)}, ["p"], {"c": np.array(2.0, np.float32)})
    assert [n.op for n in fuse_transformer_ops(graph).nodes] == ["Div", "Add", "Softmax"]


def test_masked_softmax_with_a_mask_kernels_cannot_take(rng):
    """A mask broadcasting along the last axis (one value per row) runs NumPy's three steps instead."""
    nodes = [Node("Div", ["qk", "c"], ["s"]), Node("Add", ["s", "mask"], ["v"]), Node("Softmax", ["v"], ["p"])]
    graph = _graph(nodes, {"qk": (2, 4, 6), "mask": (2, 4, 1)}, ["p"], {"c": np.array(2.0, np.float32)})
    fused = fuse_transformer_ops(graph)
    assert fused.nodes[0].op == "lowbit.MaskedSoftmax"
    _same_outputs(graph, fused, {"qk": rng.standard_normal((2, 4, 6)).astype(np.float32),
                                 "mask": rng.standard_normal((2, 4, 1)).astype(np.float32)})


def _attention_block(q_shape, k_shape, v_shape) -> list[Node]:
    """Heads split by Reshape + Transpose, the scaled and masked softmax, heads merged: as torch.onnx writes it."""
    split = [Node("Reshape", ["q", "q_shape"], ["q4"]), Node("Transpose", ["q4"], ["qh"], {"perm": [0, 2, 1, 3]}),
             Node("Reshape", ["k", "k_shape"], ["k4"]), Node("Transpose", ["k4"], ["kt"], {"perm": [0, 2, 3, 1]}),
             Node("Reshape", ["v", "v_shape"], ["v4"]), Node("Transpose", ["v4"], ["vh"], {"perm": [0, 2, 1, 3]})]
    return split + [Node("MatMul", ["qh", "kt"], ["qk"]), Node("Div", ["qk", "c"], ["s"]),
                    Node("Add", ["s", "mask"], ["a"]), Node("Softmax", ["a"], ["p"], {"axis": -1}),
                    Node("MatMul", ["p", "vh"], ["ctx"]), Node("Transpose", ["ctx"], ["y"], {"perm": [0, 2, 1, 3]})]


def _attention_graph(shapes: dict, targets: dict, outputs: list[str]) -> Graph:
    params = {f"{n}_shape": np.array(t, np.int64) for n, t in targets.items()} | {"c": np.array(2.0, np.float32)}
    return _graph(_attention_block(*(targets[n] for n in "qkv")), shapes, outputs, params)


def _attention_feeds(rng, shapes: dict) -> dict:
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["mask"] = np.where(rng.random(shapes["mask"]) < 0.3, np.float32(np.finfo(np.float32).min), 0).astype(
        np.float32)
    return feeds


def test_attention_block_fuses_into_one_node(rng):
    shapes = {"q": (2, 6, 8), "k": (2, 5, 8), "v": (2, 5, 12), "mask": (2, 1, 1, 5)}
    targets = {"q": [2, 6, 2, 4], "k": [0, 0, 2, 4], "v": [2, -1, 2, 6]}  # 0 copies a dimension, -1 is inferred
    graph = _attention_graph(shapes, targets, ["y"])
    fused = fuse_transformer_ops(graph)
    assert [(n.op, n.inputs, n.outputs) for n in fused.nodes] == [
        ("lowbit.Attention", ["q", "q_shape", "k", "k_shape", "v", "v_shape", "mask"], ["y"])]
    assert fused.nodes[0].attrs == {"scale": 0.5}
    _same_outputs(graph, fused, _attention_feeds(rng, shapes))
    rows = Session(fused, optimize=False).profile(_attention_feeds(rng, shapes), repeat=1).rows
    assert [row.note for row in rows] == ["kernels.attention"]


def test_attention_block_with_heads_in_another_layout_runs_the_evaluator(rng):
    shapes = {"q": (2, 6, 2, 4), "k": (2, 5, 2, 4), "v": (2, 5, 2, 3), "mask": (1, 5)}  # already split into heads
    targets = {"q": [2, 6, 2, 4], "k": [2, 5, 2, 4], "v": [2, 5, 2, 3]}
    graph = _attention_graph(shapes, targets, ["y"])
    fused = fuse_transformer_ops(graph)
    assert [n.op for n in fused.nodes] == ["lowbit.Attention"]
    _same_outputs(graph, fused, _attention_feeds(rng, shapes))


def test_attention_block_with_an_inner_output_keeps_its_nodes():
    shapes = {"q": (2, 6, 8), "k": (2, 5, 8), "v": (2, 5, 8), "mask": (2, 1, 1, 5)}
    targets = {"q": [2, 6, 2, 4], "k": [2, 5, 2, 4], "v": [2, 5, 2, 4]}
    fused = fuse_transformer_ops(_attention_graph(shapes, targets, ["y", "p"]))
    assert "lowbit.Attention" not in [n.op for n in fused.nodes]
    assert "lowbit.MaskedSoftmax" in [n.op for n in fused.nodes]


def test_matmul_and_its_bias_fuse_into_a_linear(rng):
    params = {"w": rng.standard_normal((8, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
              "b2": rng.standard_normal((3, 5)).astype(np.float32)}
    nodes = [Node("MatMul", ["x", "w"], ["t"]), Node("Add", ["b", "t"], ["y"]),
             Node("MatMul", ["x", "w"], ["t2"]), Node("Add", ["t2", "b2"], ["y2"])]  # a bias of three rows stays
    graph = _graph(nodes, {"x": (2, 3, 8)}, ["y", "y2"], params)
    fused = fuse_transformer_ops(graph)
    assert [(n.op, n.inputs) for n in fused.nodes] == [("lowbit.Linear", ["x", "w", "b"]), ("MatMul", ["x", "w"]),
                                                       ("Add", ["t2", "b2"])]
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    _same_outputs(graph, fused, feeds)
    rows = Session(fused, optimize=False).profile(feeds, repeat=1).rows
    assert rows[0].note == "kernels.linear_float32"
    as_float64 = graph.copy()
    as_float64.params = {n: v.astype(np.float64) for n, v in params.items()}
    assert fuse_transformer_ops(as_float64).nodes[0].op == "MatMul"  # float32 weights only


def _layer_norm_nodes(axes_input: bool) -> list[Node]:
    """torch.onnx's LayerNorm below opset 17 (ReduceMean's axes an input from opset 18)."""
    def mean(x, y):
        return Node("ReduceMean", [x, "axes"], [y]) if axes_input else Node("ReduceMean", [x], [y], {"axes": [-1]})

    return [mean("x", "mu"), Node("Sub", ["x", "mu"], ["c"]), Node("Pow", ["c", "two"], ["p"]), mean("p", "var"),
            Node("Add", ["var", "eps"], ["v"]), Node("Sqrt", ["v"], ["s"]), Node("Div", ["c", "s"], ["n"]),
            Node("Mul", ["n", "gamma"], ["m"]), Node("Add", ["beta", "m"], ["y"])]


@pytest.mark.parametrize("axes_input", [False, True], ids=["axes-attribute", "axes-input"])
def test_decomposed_layer_norm_fuses(rng, axes_input):
    params = {"two": np.array(2.0, np.float32), "eps": np.array(1e-12, np.float32),
              "gamma": rng.standard_normal(16).astype(np.float32), "beta": rng.standard_normal(16).astype(np.float32),
              "axes": np.array([-1], np.int64)}
    graph = _graph(_layer_norm_nodes(axes_input), {"x": (2, 5, 16)}, ["y"], params)
    graph.opset[""] = 18 if axes_input else 13
    fused = fuse_transformer_ops(graph)
    assert [(n.op, n.inputs, n.attrs) for n in fused.nodes] == [
        ("LayerNormalization", ["x", "gamma", "beta"], {"axis": -1, "epsilon": pytest.approx(1e-12)})]
    _same_outputs(graph, fused, {"x": (rng.standard_normal((2, 5, 16)) * 3 + 1).astype(np.float32)})


def test_decomposed_layer_norm_over_another_axis_or_read_inside_stays(rng):
    params = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
              "gamma": np.ones(16, np.float32), "beta": np.zeros(16, np.float32)}
    nodes = _layer_norm_nodes(False)
    nodes[0].attrs["axes"] = [1]
    for nodes, outputs, opset in ((nodes, ["y"], 13),  # the mean over another axis
                                  (_layer_norm_nodes(False), ["y", "c"], 13),  # the centred x is an output
                                  (_layer_norm_nodes(False), ["y"], 18)):  # from 18 an axes attribute is no axes
        graph = _graph(nodes, {"x": (2, 5, 16)}, outputs, params)
        graph.opset[""] = opset
        assert "LayerNormalization" not in [n.op for n in fuse_transformer_ops(graph).nodes]
