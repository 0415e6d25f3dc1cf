"""Channels-last regions (lowbit.runtime.layout.nhwc_chains) of integer ops: which nodes go NHWC, where the
Transposes go, and that the rewritten graph gives the original's values bit for bit (lowbit.Session on both,
fallback=False), on hand-made graphs and on ONNX Runtime's quantizations of the benchmark's ResNet and MobileNetV2
blocks. Float regions: tests/lowbit/test_float_nhwc.py."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from kernels import dispatch
from lowbit import Session
from lowbit.graph.ir import Graph, Node
from lowbit.runtime.layout import TO_NCHW, TO_NHWC, nhwc_chains
from lowbit.runtime.registry import prepare
from tests.graphs import GraphDraft

RNG = np.random.default_rng(3)
MS = "com.microsoft."


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same numbers whichever tests ran before it."""
    global RNG
    RNG = np.random.default_rng(3)


class Codes(GraphDraft):
    """A uint8 graph under construction from a float input ``x`` (quantized first); helpers return their output."""

    def qparams(self, scale: float = 0.05, zero: int = 128) -> list[str]:
        return [self.param("s", np.float32(scale)), self.param("z", np.uint8(zero))]

    def quant(self, tensor: str = "x", **kwargs) -> str:
        return self.op("QuantizeLinear", [tensor, *self.qparams()], **kwargs)

    def dequant(self, codes: str, **kwargs) -> str:
        return self.op("DequantizeLinear", [codes, *self.qparams()], **kwargs)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, **attrs) -> str:
        """QLinearConv, int8 weights per output channel, int32 bias; ``attrs`` as ONNX's (pads default k // 2)."""
        attrs.setdefault("pads", [k // 2] * 4)
        w = self.param("w", RNG.integers(-127, 128, (cout, cin // group, k, k), dtype=np.int8))
        w_qparams = [self.param("ws", RNG.uniform(0.002, 0.01, cout).astype(np.float32)),
                     self.param("wz", np.zeros(cout, np.int8))]
        bias = self.param("b", RNG.integers(-2000, 2000, cout, dtype=np.int32))
        return self.op("QLinearConv", [x, *self.qparams(), w, *w_qparams, *self.qparams(0.1, 100), bias],
                       kernel_shape=[k, k], group=group, **attrs)

    def binary(self, op: str, a: str, b: str, **kwargs) -> str:
        return self.op(MS + op, [a, *self.qparams(0.1, 100), b, *self.qparams(0.1, 100), *self.qparams(0.15, 120)],
                       **kwargs)

    def unary(self, op: str, x: str, **attrs) -> str:
        """A com.microsoft op of inputs (X, X_scale, X_zero_point, Y_scale, Y_zero_point)."""
        return self.op(MS + op, [x, *self.qparams(0.1, 100), *self.qparams(0.02, 128)], **attrs)

    def graph(self, *outputs: str) -> Graph:
        return Graph(list(self.nodes), dict(self.inputs), list(outputs), dict(self.params)).validate()

    def feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(seed).normal(0, 2, self.shape).astype(np.float32)}


def _ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def _nhwc(graph: Graph) -> list[str]:
    """Names of the nodes the pass laid out NHWC."""
    return [n.name for n in graph.nodes if n.attrs.get("layout") == "NHWC"]


def _transposes(graph: Graph) -> list[tuple[str, str, list[int]]]:
    return [(n.inputs[0], n.outputs[0], n.attrs["perm"]) for n in graph.nodes if n.op == "Transpose"]


def _same_values(graph: Graph, rewritten: Graph, feeds: dict[str, np.ndarray], fetch: list[str] | None = None):
    """Both graphs give bit-identical outputs (and ``fetch`` tensors) on ``feeds``."""
    want = Session(graph, fallback=False).run(feeds, fetch)
    got = Session(rewritten, fallback=False).run(feeds, fetch)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------- structure and values

def test_chain_is_one_region_with_a_transpose_at_each_border():
    b = Codes((2, 3, 13, 11))  # odd sizes
    q = b.quant()
    c1 = b.conv(q, 3, 8, name="c1")
    c2 = b.conv(c1, 8, 8, k=3, group=8, strides=[2, 2], name="dw")  # depthwise, strided
    p = b.op("MaxPool", [c2], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool")
    c3 = b.conv(p, 8, 16, k=1, pads=[0, 0, 0, 0], name="pw")  # 1x1
    g = b.unary("QLinearGlobalAveragePool", c3, name="gap")
    y = b.dequant(g, name="dq")
    graph = b.graph(y)
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1", "dw", "pool", "pw", "gap"]
    assert _transposes(out) == [(q, f"{q}_nhwc", TO_NHWC), (f"{g}_nhwc", g, TO_NCHW)]
    assert _ops(out) == ["QuantizeLinear", "Transpose", "QLinearConv", "QLinearConv", "MaxPool", "QLinearConv",
                         MS + "QLinearGlobalAveragePool", "Transpose", "DequantizeLinear"]
    assert out.node("gap").attrs["channels_last"] == 1
    assert out.node("dq").inputs[0] == g and out.outputs == [y]
    assert _nhwc(graph) == [] and "channels_last" not in graph.node("gap").attrs  # pure
    _same_values(graph, out, b.feeds())


def test_region_without_a_convolution_is_left_alone():
    b = Codes((2, 4, 6, 6))
    p = b.op("MaxPool", [b.quant()], kernel_shape=[2, 2])
    graph = b.graph(b.dequant(b.op("Relu", [p])))
    out = nhwc_chains(graph)
    assert _ops(out) == _ops(graph) and _nhwc(out) == [] and out.nodes[1].inputs == graph.nodes[1].inputs


def test_branches_and_residual_adds_share_the_region():
    b = Codes((2, 5, 9, 7))
    q = b.quant()
    stem = b.conv(q, 5, 8, name="stem")
    left = b.conv(stem, 8, 8, name="left")
    right = b.conv(b.op("Relu", [stem], name="relu"), 8, 8, k=1, pads=[0] * 4, name="right")
    both = b.binary("QLinearAdd", left, right, name="add")
    residual = b.binary("QLinearMul", both, stem, name="mul")
    act = b.unary("QLinearLeakyRelu", residual, alpha=0.1, name="leaky")
    sig = b.unary("QLinearSigmoid", act, name="sigmoid")
    clip = b.op("Clip", [sig, b.param("lo", np.uint8(10)), b.param("hi", np.uint8(200))], name="clip")
    avg = b.unary("QLinearAveragePool", clip, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1],
                  count_include_pad=1, name="avg")
    graph = b.graph(b.dequant(avg))
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["stem", "left", "relu", "right", "add", "mul", "leaky", "sigmoid", "clip", "avg"]
    assert _transposes(out) == [(q, f"{q}_nhwc", TO_NHWC), (f"{avg}_nhwc", avg, TO_NCHW)]
    assert out.node("add").inputs[0] == f"{left}_nhwc" and out.node("mul").inputs[3] == f"{stem}_nhwc"
    assert out.node("clip").inputs[1:] == graph.node("clip").inputs[1:]  # the bounds stay as they are
    _same_values(graph, out, b.feeds())


def test_graph_output_and_outside_readers_inside_a_region_keep_their_name_and_layout():
    b = Codes((3, 4, 8, 6))
    c1 = b.conv(b.quant(), 4, 8, name="c1")
    c2 = b.conv(c1, 8, 8, name="c2")
    outside = b.dequant(c1, name="dq1")  # a float reader of c1 outside the region
    graph = b.graph(c1, b.dequant(c2), outside)
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1", "c2"]
    exits = [t for t in _transposes(out) if t[2] == TO_NCHW]
    assert exits == [(f"{c1}_nhwc", c1, TO_NCHW), (f"{c2}_nhwc", c2, TO_NCHW)]  # one per tensor, both readers
    assert out.outputs == graph.outputs
    _same_values(graph, out, b.feeds())


def test_inner_tensors_get_new_names_so_a_fetch_cannot_see_nhwc():
    b = Codes((2, 4, 5, 5))
    c1 = b.conv(b.quant(), 4, 4)
    graph = b.graph(b.dequant(b.conv(c1, 4, 4)))
    out = nhwc_chains(graph)
    assert c1 not in {t for n in out.nodes for t in n.outputs}
    with pytest.raises(ValueError, match=c1):
        Session(out, fallback=False).run(b.feeds(), [c1])


def test_broadcast_binary_ops_stay_out_of_the_region():
    b = Codes((2, 6, 7, 5))
    c1 = b.conv(b.quant(), 6, 6, name="c1")
    bias = b.param("channel", RNG.integers(0, 255, (6, 1, 1), dtype=np.uint8))  # [C, 1, 1]: another rank
    add = b.binary("QLinearAdd", c1, bias, name="add")
    c2 = b.conv(add, 6, 6, name="c2")
    graph = b.graph(b.dequant(c2))
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1", "c2"]  # two regions, the add between them NCHW
    assert [t[2] for t in _transposes(out)] == [TO_NHWC, TO_NCHW, TO_NHWC, TO_NCHW]
    assert out.node("add").inputs[0] == c1 and "layout" not in out.node("add").attrs
    _same_values(graph, out, b.feeds())


def test_dequantize_quantize_pairs_stay_inside_only_when_their_floats_do():
    b = Codes((2, 4, 6, 6))
    c1 = b.conv(b.quant(), 4, 4, name="c1")
    dq_in = b.op("DequantizeLinear", [c1, b.param("s", np.float32(0.1)), ""], name="dq_in")  # zero point absent
    inner = b.quant(dq_in, name="q_in")  # floats read only by a QuantizeLinear
    c2 = b.conv(inner, 4, 4, name="c2")
    floats = b.dequant(c2, name="dq_out")
    relu = b.op("Relu", [floats], name="float_relu")  # floats read outside
    graph = b.graph(b.dequant(b.conv(b.quant(floats, name="q_out"), 4, 4, name="c3")), relu)
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1", "dq_in", "q_in", "c2", "c3"]
    assert all(t[0] != "dq_in_out" and "dq" not in t[1] for t in _transposes(out))
    _same_values(graph, out, b.feeds())


def test_the_pass_is_idempotent():
    b = Codes((2, 3, 6, 6))
    graph = b.graph(b.dequant(b.unary("QLinearGlobalAveragePool", b.conv(b.conv(b.quant(), 3, 8), 8, 8))))
    once = nhwc_chains(graph)
    twice = nhwc_chains(once)
    assert [(n.op, n.inputs, n.outputs, n.attrs) for n in twice.nodes] == \
        [(n.op, n.inputs, n.outputs, n.attrs) for n in once.nodes]


def test_nodes_already_channels_last_or_with_indices_are_not_taken():
    b = Codes((2, 4, 6, 6))
    c1 = b.conv(b.quant(), 4, 4, name="c1")
    gap = b.unary("QLinearGlobalAveragePool", c1, channels_last=1, name="gap")  # reads c1 as NHWC already
    b.nodes.append(Node("MaxPool", [c1], ["mp", "mp_indices"], {"kernel_shape": [2, 2]}, "mp"))
    graph = b.graph(b.dequant(gap), "mp")
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1"] and out.node("gap").inputs[0] == c1 and out.node("mp").inputs[0] == c1


def test_codes_and_floats_never_share_a_region():
    """A float Conv on a DequantizeLinear of a region's codes starts a float region of its own: the
    DequantizeLinear (read by other than a QuantizeLinear) stays out, and a QuantizeLinear of the float region's
    output joins neither."""
    b = Codes((2, 4, 6, 6))
    c1 = b.conv(b.quant(), 4, 8, name="c1")
    floats = b.dequant(c1, name="dq")
    w = b.param("fw", (RNG.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32))
    f1 = b.op("Conv", [floats, w], kernel_shape=[3, 3], pads=[1] * 4, name="f1")
    relu = b.op("Relu", [b.op("Conv", [f1, w], kernel_shape=[3, 3], pads=[1] * 4, name="f2")], name="relu")
    c2 = b.conv(b.quant(relu, name="q2"), 8, 8, name="c2")
    graph = b.graph(b.dequant(c2), relu)
    out = nhwc_chains(graph)
    floats_too = dispatch.choose("conv_float32", 1, 8, 72).kind == "avx512"
    assert _nhwc(out) == (["c1", "f1", "f2", "relu", "c2"] if floats_too else ["c1", "c2"])
    assert [t[0] for t in _transposes(out)] == [b.nodes[0].outputs[0], f"{c1}_nhwc"] + (
        [floats, f"{relu}_nhwc"] if floats_too else []) + ["q2_out", f"{c2}_nhwc"]
    feeds = b.feeds()
    want, got = (Session(g, fallback=False).run(feeds) for g in (graph, out))
    np.testing.assert_allclose(got[relu], want[relu], rtol=1e-5, atol=1e-5 * np.abs(want[relu]).max())


# ----------------------------------------------------------------------------- the preparers' layout attribute

def _spec(shape, dtype=np.uint8):
    return tuple(shape), np.dtype(dtype)


def test_qlinear_conv_nhwc_paths_match_nchw():
    """The plan (parameters), the exact NumPy path (a scale fed at run time) and the float fallback, on NHWC."""
    b = Codes((2, 4, 7, 5))
    b.conv("x", 4, 6, strides=[2, 1], name="c")
    node = b.nodes[0]
    feeds = [RNG.integers(0, 256, (2, 4, 7, 5), dtype=np.uint8)]
    for scale_fed in (False, True):
        graph = Graph([], {}, [], dict(b.params))
        specs = [_spec((2, 4, 7, 5))] + [_spec(graph.params[t].shape, graph.params[t].dtype) for t in node.inputs[1:]]
        ins = feeds + [graph.params[t] for t in node.inputs[1:]]
        if scale_fed:
            del graph.params[node.inputs[1]]
        nchw = prepare(node, graph, specs)
        want = nchw(ins, [np.empty(*nchw.outputs[0])])[0]
        laid = Node(node.op, node.inputs, node.outputs, {**node.attrs, "layout": "NHWC"}, node.name)
        kernel = prepare(laid, graph, [_spec((2, 7, 5, 4))] + specs[1:])
        assert kernel.outputs[0][0] == (2, 4, 5, 6)
        x = np.ascontiguousarray(feeds[0].transpose(TO_NHWC))
        got = kernel([x, *ins[1:]], [np.empty(*kernel.outputs[0])])[0]
        np.testing.assert_array_equal(got, want.transpose(TO_NHWC))
        if kernel.fallback is not None:  # float32: within one code of the exact codes
            approx = kernel.fallback([x, *ins[1:]], [np.empty(*kernel.fallback.outputs[0])])[0]
            assert np.abs(approx.astype(int) - got).max() <= 1
    assert "NHWC" in kernel.note


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_max_pool_nhwc_matches_nchw(dtype):
    x = (RNG.integers(0, 256, (2, 3, 9, 8)) if dtype == np.uint8 else RNG.normal(size=(2, 3, 9, 8))).astype(dtype)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}
    nchw = prepare(Node("MaxPool", ["x"], ["y"], attrs, "p"), Graph([], {}, []), [_spec(x.shape, dtype)])
    nhwc = prepare(Node("MaxPool", ["x"], ["y"], {**attrs, "layout": "NHWC"}, "p"), Graph([], {}, []),
                   [_spec(x.transpose(TO_NHWC).shape, dtype)])
    want = nchw([x], [np.empty(*nchw.outputs[0])])[0]
    got = nhwc([np.ascontiguousarray(x.transpose(TO_NHWC))], [np.empty(*nhwc.outputs[0])])[0]
    np.testing.assert_array_equal(got, want.transpose(TO_NHWC))


def test_bad_layouts_are_refused():
    b = Codes((2, 4, 7))
    b.nodes.append(Node("MaxPool", ["x"], ["y", "i"], {"kernel_shape": [2, 2], "layout": "NHWC"}, "mp"))
    with pytest.raises(ValueError, match=r"node 'mp' \(MaxPool\): layout NHWC has no Indices"):
        prepare(b.nodes[0], Graph([], {}, []), [_spec((1, 4, 4, 2))])
    with pytest.raises(ValueError, match=r"node 'mp' \(MaxPool\): attribute layout must be 'NCHW' or 'NHWC', got "
                                         r"'NWHC'"):
        prepare(Node("MaxPool", ["x"], ["y"], {"kernel_shape": [2, 2], "layout": "NWHC"}, "mp"), Graph([], {}, []),
                [_spec((1, 4, 4, 2))])
    b.conv("x", 4, 4, k=3, name="c")
    node = b.nodes[-1]
    node.attrs["layout"] = "NHWC"
    w = b.params[node.inputs[3]]
    b.params[node.inputs[3]] = w[:, :, :, 0]  # 1-D
    node.attrs.update(kernel_shape=[3], pads=[1, 1])
    with pytest.raises(ValueError, match=r"node 'c' \(QLinearConv\): layout NHWC needs a 4-D input"):
        prepare(node, Graph([], {}, [], b.params), [_spec((2, 7, 4))])


# ----------------------------------------------------------------------------- ONNX Runtime's quantized models

MODELS = {"resnet_block": 16, "mobilenet_block": 32}  # benchmark model -> its image size


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Paths of the benchmark's ResNet and MobileNetV2 blocks quantized by ``quantize_static`` (per channel), QDQ
    and QOp, and their image sizes."""
    pytest.importorskip("onnxruntime.quantization")
    from bench.onnx_models import Model, model_file

    folder = str(tmp_path_factory.mktemp("layout"))
    return {(name, fmt): (model_file(Model(name, (1,), image=image), fmt, folder), image)
            for name, image in MODELS.items() for fmt in ("qdq", "qop")}


@pytest.mark.parametrize("fmt", ["qdq", "qop"])
@pytest.mark.parametrize("name", MODELS)
def test_quantized_models_are_bit_identical(quantized, name, fmt):
    import lowbit.onnx
    from lowbit.onnx import examples
    from lowbit.runtime.passes import fold_constants
    from lowbit.runtime.qdq_fusion import fuse_qdq

    path, image = quantized[name, fmt]
    graph = fold_constants(fuse_qdq(lowbit.onnx.load(path, optimize=False)))  # the importer's passes before it
    out = nhwc_chains(graph)
    laid = collections.Counter(n.op for n in out.nodes if n.attrs.get("layout") == "NHWC")
    assert laid["QLinearConv"] == collections.Counter(_ops(graph))["QLinearConv"] > 0
    assert laid[MS + "QLinearGlobalAveragePool"] == 1
    assert [t[2] for t in _transposes(out)] == [TO_NHWC, TO_NCHW]  # in after the input's Q, out after the pool
    _same_values(graph, out, examples.image_feed(3, image, 1))
