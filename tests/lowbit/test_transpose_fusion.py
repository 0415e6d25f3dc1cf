"""Layout transposes merged into the quantization next to them (lowbit.runtime.transpose_fusion): which pairs merge,
which do not, and that the rewritten graph gives the original's values bit for bit (lowbit.Session on both,
fallback=False), alone and after lowbit.runtime.layout.nhwc_chains."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit import Session
from lowbit.graph.ir import Graph, Node, TensorSpec
from lowbit.runtime.layout import TO_NHWC, nhwc_chains
from lowbit.runtime.registry import prepare
from lowbit.runtime.transpose_fusion import FUSED_QUANTIZE, fuse_layout_transposes

SHAPE = (2, 3, 5, 7)  # RGB, odd sizes


def _params(**values) -> dict[str, np.ndarray]:
    base = {"s": np.float32(0.0173), "z": np.uint8(128), "zi": np.int8(-3), "sv": np.float32([0.02, 0.03, 0.04])}
    return {**base, **values}


def _graph(nodes: list[Node], outputs: list[str], shape=SHAPE, dtype: str = "float32", **params) -> Graph:
    return Graph(nodes, {"x": TensorSpec(shape, dtype)}, outputs, _params(**params)).validate()


def _quantize_transpose(zero: str = "z", perm=TO_NHWC, **attrs) -> list[Node]:
    return [Node("QuantizeLinear", ["x", "s", zero], ["q"], attrs, "quant"),
            Node("Transpose", ["q"], ["q_nhwc"], {"perm": list(perm)}, "to_nhwc")]


def _feeds(shape=SHAPE, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(0, 2, shape).astype(dtype)
    x.reshape(-1)[:3] = [0.5 * 0.0173, -6e4, 6e4]  # a tie and both saturations (in float16 too)
    return {"x": x}


def _same_values(graph: Graph, rewritten: Graph, feeds: dict[str, np.ndarray]) -> None:
    want = Session(graph, fallback=False).run(feeds)
    got = Session(rewritten, fallback=False).run(feeds)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("zero", ["z", "zi", ""])
def test_quantize_and_transpose_become_one_node(zero):
    graph = _graph(_quantize_transpose(zero), ["q_nhwc"])
    out = fuse_layout_transposes(graph)
    assert [(n.op, n.name, n.inputs, n.outputs) for n in out.nodes] == [
        (FUSED_QUANTIZE, "quant", ["x", "s", zero], ["q_nhwc"])]
    assert [n.op for n in graph.nodes] == ["QuantizeLinear", "Transpose"]  # pure
    assert fuse_layout_transposes(out).nodes == out.nodes  # idempotent
    _same_values(graph, out, _feeds())


@pytest.mark.parametrize("shape", [(2, 4, 65), (1, 3, 2, 3, 4), (3, 5, 17, 16)])
def test_other_ranks_and_channel_counts(shape):
    perm = [0, *range(2, len(shape)), 1]
    graph = _graph(_quantize_transpose(perm=perm), ["q_nhwc"], shape=shape)
    out = fuse_layout_transposes(graph)
    assert [n.op for n in out.nodes] == [FUSED_QUANTIZE]
    _same_values(graph, out, _feeds(shape))


def test_pairs_that_stay_apart():
    others = [
        _graph(_quantize_transpose(), ["q_nhwc", "q"]),  # the codes are a graph output
        _graph(_quantize_transpose() + [Node("Relu", ["q"], ["r"], {}, "relu")], ["q_nhwc", "r"]),  # another reader
        _graph(_quantize_transpose(perm=[0, 3, 1, 2]), ["q_nhwc"]),  # not channels last
        _graph(_quantize_transpose(perm=[0, 2, 1, 3]), ["q_nhwc"]),
        _graph([Node("QuantizeLinear", ["x", "sv", ""], ["q"], {"axis": 1}, "quant"),  # per axis
                Node("Transpose", ["q"], ["q_nhwc"], {"perm": TO_NHWC}, "to_nhwc")], ["q_nhwc"]),
        _graph([Node("QuantizeLinear", ["x", "s", "z"], ["q"], {}, "quant"),
                Node("Transpose", ["q"], ["q_t"], {}, "reverse")], ["q_t"]),  # no perm: reversed axes
    ]
    for graph in others:
        out = fuse_layout_transposes(graph)
        assert [(n.op, n.inputs, n.outputs) for n in out.nodes] == [(n.op, n.inputs, n.outputs) for n in graph.nodes]


def test_after_nhwc_chains_with_a_convolution():
    rng = np.random.default_rng(1)
    params = {"w": rng.integers(-127, 128, (8, 3, 3, 3), dtype=np.int8), "ws": np.full(8, 0.004, np.float32),
              "wz": np.zeros(8, np.int8), "ys": np.float32(0.1), "yz": np.uint8(100),
              "b": rng.integers(-2000, 2000, 8, dtype=np.int32)}
    nodes = [Node("QuantizeLinear", ["x", "s", "z"], ["q"], {}, "quant"),
             Node("QLinearConv", ["q", "s", "z", "w", "ws", "wz", "ys", "yz", "b"], ["c"],
                  {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, "conv"),
             Node("DequantizeLinear", ["c", "ys", "yz"], ["y"], {}, "dq")]
    graph = _graph(nodes, ["y"], **params)
    chains = nhwc_chains(graph)
    out = fuse_layout_transposes(chains)
    assert [n.op for n in chains.nodes][:2] == ["QuantizeLinear", "Transpose"]
    assert [n.op for n in out.nodes] == [FUSED_QUANTIZE, *[n.op for n in chains.nodes][2:]]
    _same_values(graph, out, _feeds())


def test_kernel_paths():
    """Per tensor float32 to 8-bit codes runs the fused kernel; float16 data and sub-byte codes run QuantizeLinear's
    own kernel and transpose after it; both give QuantizeLinear then Transpose."""
    cases = [("float32", {}, "to uint8, NHWC"), ("float16", {}, "then transposed"),
             ("float32", {"output_dtype_name": "uint4"}, "then transposed")]
    for dtype, attrs, note in cases:
        zero = "z4" if attrs else "z"
        graph = _graph(_quantize_transpose(zero, **attrs), ["q_nhwc"], dtype=dtype, z4=np.uint8(9))
        out = fuse_layout_transposes(graph)
        kernel = prepare(out.nodes[0], out, [(SHAPE, np.dtype(dtype))])
        assert kernel.outputs == [((2, 5, 7, 3), np.dtype(np.uint8))] and kernel.note.endswith(note)
        _same_values(graph, out, _feeds(dtype=np.dtype(dtype)))


def test_scale_computed_at_run_time_out_of_the_kernels_range():
    """A zero scale fed at run time (undefined in ONNX) gives what QuantizeLinear then Transpose give."""
    nodes = _quantize_transpose()
    nodes[0].inputs[1] = "scale"
    graph = Graph(nodes, {"x": TensorSpec(SHAPE), "scale": TensorSpec((), "float32")}, ["q_nhwc"],
                  _params()).validate()
    fused = Graph([Node(FUSED_QUANTIZE, ["x", "scale", "z"], ["q_nhwc"], {}, "quant")], dict(graph.inputs),
                  ["q_nhwc"], _params()).validate()
    for scale in (np.array(0.05, np.float32), np.array(0.0, np.float32)):
        _same_values(graph, fused, {**_feeds(), "scale": scale})


def test_rank_one_input_is_refused():
    graph = Graph([Node(FUSED_QUANTIZE, ["x", "s", "z"], ["q"], {}, "quant")], {"x": TensorSpec((5,))}, ["q"],
                  _params()).validate()
    with pytest.raises(ValueError, match=r"node 'quant' \(lowbit.QuantizeToNHWC\): input x must have rank >= 2"):
        prepare(graph.nodes[0], graph, [((5,), np.dtype(np.float32))])
