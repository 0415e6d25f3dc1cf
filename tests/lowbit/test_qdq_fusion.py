"""QDQ fusion (lowbit.runtime.qdq_fusion.fuse_qdq): which groups fuse into which integer ops, which must not, and
that the fused graph gives the QDQ graph's codes (onnx.reference on the unfused graph as the oracle)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lowbit import Session
from lowbit.graph.ir import Graph, Node, TensorSpec
from lowbit.runtime.qdq_fusion import ON_CODES, fuse_qdq
from lowbit.runtime.registry import PREPARERS

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same numbers whichever tests ran before it."""
    global RNG
    RNG = np.random.default_rng(7)


class QDQ:
    """A QDQ graph under construction, from one float input ``x``; every helper returns the tensor it writes."""

    def __init__(self, shape: tuple, dtype: str = "float32"):
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self.inputs = {"x": TensorSpec(shape, dtype)}

    def param(self, stem: str, value) -> str:
        name = f"{stem}{len(self.params)}"
        self.params[name] = np.asarray(value)
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        name = f"{op.rpartition('.')[2].lower()}{len(self.nodes)}"
        self.nodes.append(Node(op, inputs, [f"{name}_out"], attrs, name))
        return f"{name}_out"

    def quant(self, tensor: str, scale: float, zero: int, dtype=np.uint8) -> str:
        """QuantizeLinear of ``tensor``: its codes."""
        return self.op("QuantizeLinear", [tensor, self.param("s", np.float32(scale)), self.param("z", dtype(zero))])

    def dequant(self, codes: str, scale, zero=None, **attrs) -> str:
        """DequantizeLinear of ``codes`` (a tensor or an array of constant codes)."""
        if not isinstance(codes, str):
            codes = self.param("w", codes)
        inputs = [codes, self.param("s", np.asarray(scale, np.float32))]
        return self.op("DequantizeLinear", inputs + ([] if zero is None else [self.param("z", zero)]), **attrs)

    def qdq(self, tensor: str, scale: float, zero: int, dtype=np.uint8) -> str:
        """Q then DQ with the same parameters (what ORT's quantizer puts between two ops)."""
        codes = self.quant(tensor, scale, zero, dtype)
        return self.op("DequantizeLinear", [codes, *self.nodes[-1].inputs[1:]])

    def graph(self, *outputs: str) -> Graph:
        return Graph(list(self.nodes), dict(self.inputs), list(outputs), dict(self.params)).validate()


def ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def producer(graph: Graph, tensor: str) -> Node:
    return next(n for n in graph.nodes if tensor in n.outputs)


def int8(shape, lo=-127, hi=127) -> np.ndarray:
    return RNG.integers(lo, hi + 1, shape).astype(np.int8)


def conv_graph(*, act: str | None = None, bias: bool = True, per_channel: bool = True, x_dtype=np.uint8,
               pow2: bool = True, w_dtype=np.int8, group: int = 1) -> Graph:
    """x [2, 4, 7, 6] -> Q -> DQ -> Conv(3x3, pads 1, stride (1, 2)) [-> act] -> Q: the output codes.

    With ``pow2`` every scale is a power of two, so the float32 reference is exact too."""
    b = QDQ((2, 4, 7, 6))
    x_scale, y_scale = (2.0**-4, 2.0**-2) if pow2 else (0.0371, 0.1173)
    x = b.qdq("x", x_scale, 128 if x_dtype == np.uint8 else 3, x_dtype)
    w_scale = (2.0 ** -RNG.integers(5, 8, 6) if pow2 else RNG.uniform(0.004, 0.02, 6)).astype(np.float32)
    if not per_channel:
        w_scale = w_scale[:1].reshape(())
    codes = int8((6, 4 // group, 3, 3))
    w_zero = np.zeros(w_scale.shape, np.int8)
    if w_dtype == np.uint8:
        codes, w_zero = (codes.astype(np.int16) + 128).astype(np.uint8), np.full(w_scale.shape, 120, np.uint8)
    w = b.dequant(codes, w_scale, w_zero, axis=0)
    inputs = [x, w]
    if bias:
        unit = (np.float32(x_scale) * w_scale).astype(np.float32)
        inputs.append(b.dequant(RNG.integers(-3000, 3000, 6).astype(np.int32), unit, np.zeros(unit.shape, np.int32),
                                axis=0))
    y = b.op("Conv", inputs, pads=[1, 1, 1, 1], strides=[1, 2], group=group)
    if act == "relu":
        y = b.op("Relu", [y])
    elif act == "relu6":
        y = b.op("Clip", [y, b.param("lo", np.float32(0)), b.param("hi", np.float32(6))])
    return b.graph(b.quant(y, y_scale, 100 if pow2 else 7, np.uint8))


# ---- the oracle ----------------------------------------------------------------------------------------------------

def onnx_model(graph: Graph):
    """``graph`` as an ONNX model (default domain at opset 21, com.microsoft at 1)."""
    onnx = pytest.importorskip("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    nodes = [helper.make_node(n.op.rpartition(".")[2], n.inputs, n.outputs, n.name, domain=n.op.rpartition(".")[0],
                              **n.attrs) for n in graph.nodes]
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), spec.shape)
              for name, spec in graph.inputs.items()]
    outputs = [helper.make_empty_tensor_value_info(t) for t in graph.outputs]
    initializers = [numpy_helper.from_array(value, name) for name, value in graph.params.items()]
    return helper.make_model(helper.make_graph(nodes, "qdq", inputs, outputs, initializers),
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def run_fused(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs of the fused graph, run with the quantized kernels always on (skips while an op of the fused
    graph has no preparer in this tree)."""
    fused = fuse_qdq(graph)
    missing = sorted({n.op for n in fused.nodes} - set(PREPARERS))
    if missing:
        pytest.skip(f"no preparer yet for {missing}")
    return Session(fused, fallback=False).run(feeds)


def codes_off(graph: Graph, feeds: dict[str, np.ndarray]) -> int:
    """How many output codes of the fused graph differ from the unfused graph's (onnx.reference); each by at
    most one."""
    reference = pytest.importorskip("onnx.reference")
    want = reference.ReferenceEvaluator(onnx_model(graph)).run(None, feeds)
    got = run_fused(graph, feeds)
    off = 0
    for name, expected in zip(graph.outputs, want):
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
        diff = np.abs(got[name].astype(np.int32) - expected.astype(np.int32))
        assert diff.max(initial=0) <= 1, name
        off += int(np.count_nonzero(diff))
    return off


def x_feed(shape) -> dict[str, np.ndarray]:
    return {"x": RNG.normal(0, 2.5, shape).astype(np.float32)}


# ---- Conv ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_conv_fuses_with_bias_and_activation(act):
    graph = conv_graph(act=act)
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", "QLinearConv"]
    conv = fused.nodes[1]
    assert conv.attrs.get("activation") == act and conv.attrs["pads"] == [1, 1, 1, 1] and len(conv.inputs) == 9
    assert conv.outputs == graph.outputs
    assert fused.params[conv.inputs[8]].dtype == np.int32  # the bias codes, as the DQ read them


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_conv_codes_exact(act, x_dtype):
    """Power-of-two scales: the float reference is exact, so every code must agree."""
    assert codes_off(conv_graph(act=act, x_dtype=x_dtype), x_feed((2, 4, 7, 6))) == 0


@pytest.mark.parametrize("per_channel", [True, False])
def test_conv_codes_within_one(per_channel):
    """Arbitrary scales: the float32 reference may round across a tie; the integer op follows the real value."""
    graph = conv_graph(pow2=False, per_channel=per_channel, act="relu")
    off = codes_off(graph, x_feed((2, 4, 7, 6)))
    assert off <= 0.01 * 2 * 6 * 7 * 3


def test_conv_uint8_weights_become_int8_codes():
    graph = conv_graph(w_dtype=np.uint8, bias=False, group=2)
    fused = fuse_qdq(graph)
    conv = fused.nodes[1]
    w, zero = fused.params[conv.inputs[3]], fused.params[conv.inputs[5]]
    dq = producer(graph, next(n for n in graph.nodes if n.op == "Conv").inputs[1])
    assert w.dtype == zero.dtype == np.int8
    np.testing.assert_array_equal(w.astype(np.int32) - zero.reshape(-1, 1, 1, 1),
                                  graph.params[dq.inputs[0]].astype(np.int32)
                                  - graph.params[dq.inputs[2]].astype(np.int32).reshape(-1, 1, 1, 1))
    assert codes_off(graph, x_feed((2, 4, 7, 6))) == 0


# ---- MatMul and Gemm -----------------------------------------------------------------------------------------------

def matmul_graph(x_shape, *, bias: str | None = None, act: str | None = None, pow2: bool = True) -> Graph:
    """x -> Q -> DQ -> MatMul(DQ(w [K, 5], per column)) [-> Add(bias)] [-> act] -> Q.

    bias: "int32" (a DQ in accumulator units), "int8" (a DQ with its own scale) or "float" (a constant)."""
    b = QDQ(x_shape)
    x_scale = 2.0**-4 if pow2 else 0.0413
    x = b.qdq("x", x_scale, 120)
    w_scale = (2.0 ** -RNG.integers(5, 8, 5) if pow2 else RNG.uniform(0.004, 0.02, 5)).astype(np.float32)
    y = b.op("MatMul", [x, b.dequant(int8((x_shape[-1], 5)), w_scale, np.zeros(5, np.int8), axis=1)])
    if bias == "int32":
        unit = (np.float32(x_scale) * w_scale).astype(np.float32)
        y = b.op("Add", [y, b.dequant(RNG.integers(-900, 900, 5).astype(np.int32), unit, axis=0)])
    elif bias == "int8":
        y = b.op("Add", [b.dequant(int8((5,)), np.float32(2.0**-6), np.int8(3)), y])
    elif bias == "float":
        y = b.op("Add", [y, b.param("bias", (RNG.integers(-64, 64, 5) / 32).astype(np.float32))])
    if act:
        y = b.op("Relu", [y])
    return b.graph(b.quant(y, 2.0**-1 if pow2 else 0.231, 90))


def test_matmul_any_rank_fuses_to_qlinear_matmul():
    fused = fuse_qdq(matmul_graph((2, 3, 8)))
    assert ops(fused) == ["QuantizeLinear", "QLinearMatMul"]
    matmul = fused.nodes[1]
    assert fused.params[matmul.inputs[3]].shape == (8, 5) and fused.params[matmul.inputs[4]].shape == (5,)


@pytest.mark.parametrize("x_shape", [(3, 8), (2, 3, 8)])
def test_matmul_codes_exact(x_shape):
    assert codes_off(matmul_graph(x_shape), x_feed(x_shape)) == 0


@pytest.mark.parametrize("bias", ["int32", "int8", "float", None])
def test_matmul_with_bias_or_relu_fuses_to_qgemm(bias):
    graph = matmul_graph((3, 8), bias=bias, act="relu")
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", "lowbit.QGemm"]
    gemm = fused.nodes[1]
    assert gemm.attrs == {"activation": "relu"} and len(gemm.inputs) == (8 if bias is None else 9)
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    w_dq = producer(graph, matmul.inputs[1])
    np.testing.assert_array_equal(fused.params[gemm.inputs[3]], graph.params[w_dq.inputs[0]].T)  # [N, K]
    if bias is not None:
        assert fused.params[gemm.inputs[8]].dtype == (np.int32 if bias == "int32" else np.float32)
    assert codes_off(graph, x_feed((3, 8))) == 0


def test_matmul_with_bias_on_3d_x_stays_float():
    """lowbit.QGemm reads 2-D x only; nothing else folds the bias: the MatMul and Add stay, on float weights."""
    fused = fuse_qdq(matmul_graph((2, 3, 8), bias="float"))
    assert ops(fused) == ["QuantizeLinear", "DequantizeLinear", "MatMul", "Add", "QuantizeLinear"]
    matmul = fused.nodes[2]
    assert fused.params[matmul.inputs[1]].dtype == np.float32  # the weights' DQ folded once


def gemm_graph(*, trans_a=0, trans_b=1, alpha=1.0, act=None) -> Graph:
    b = QDQ((4, 6) if trans_a else (6, 4))
    x_scale, w_scale = 2.0**-3, (2.0 ** -RNG.integers(5, 8, 7)).astype(np.float32)
    x = b.qdq("x", x_scale, 5, np.int8)
    w = b.dequant(int8((7, 4) if trans_b else (4, 7)), w_scale, np.zeros(7, np.int8), axis=0 if trans_b else 1)
    unit = (np.float32(alpha * x_scale) * w_scale).astype(np.float32)
    c = b.dequant(RNG.integers(-500, 500, 7).astype(np.int32), unit, axis=0)
    y = b.op("Gemm", [x, w, c], transA=trans_a, transB=trans_b, alpha=alpha)
    if act:
        y = b.op("Relu", [y])
    return b.graph(b.quant(y, 2.0**-1, -4, np.int8))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_fuses_to_qgemm(trans_b):
    graph = gemm_graph(trans_b=trans_b, act="relu")
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", "lowbit.QGemm"]
    gemm = fused.nodes[1]
    assert fused.params[gemm.inputs[3]].shape == (7, 4) and gemm.attrs == {"activation": "relu"}
    assert codes_off(graph, x_feed((6, 4))) == 0


@pytest.mark.parametrize("options", [{"trans_a": 1}, {"alpha": 0.5}])
def test_gemm_otherwise_fuses_to_com_microsoft_qgemm(options):
    graph = gemm_graph(**options)
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", "com.microsoft.QGemm"]
    gemm = fused.nodes[1]
    assert len(gemm.inputs) == 9 and fused.params[gemm.inputs[6]].dtype == np.int32
    assert {k: gemm.attrs[k] for k in ("transA", "alpha") if k in gemm.attrs} == \
        {"transA": options.get("trans_a", 0), "alpha": options.get("alpha", 1.0)}
    assert codes_off(graph, x_feed((4, 6) if options.get("trans_a") else (6, 4))) == 0


def test_com_microsoft_qgemm_takes_no_activation():
    fused = fuse_qdq(gemm_graph(trans_a=1, act="relu"))
    assert "com.microsoft.QGemm" not in ops(fused) and "Gemm" in ops(fused)


# ---- element-wise, pooling, Concat ---------------------------------------------------------------------------------

def two_input_graph(op: str, b_dtype=np.uint8) -> Graph:
    """Scales with no simple ratio between them, so that exact results rarely sit near a rounding tie."""
    b = QDQ((2, 3, 4, 5))
    x = b.qdq("x", 0.0473, 128)
    other = b.qdq(b.op("Tanh", ["x"]), 0.0117, 128 if b_dtype == np.uint8 else 0, b_dtype)
    return b.graph(b.quant(b.op(op, [x, other]), 0.0731, 100))


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_add_mul_fuse_to_com_microsoft(op):
    graph = two_input_graph(op)
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", "Tanh", "QuantizeLinear", f"com.microsoft.QLinear{op}"]
    assert len(fused.nodes[3].inputs) == 8
    assert codes_off(graph, x_feed((2, 3, 4, 5))) <= 2


def test_add_of_codes_of_two_types_stays_float():
    assert "Add" in ops(fuse_qdq(two_input_graph("Add", np.int8)))


UNARY_CASES = [("AveragePool", {"kernel_shape": [2, 2], "strides": [1, 2], "pads": [0, 1, 1, 0]}),
               ("GlobalAveragePool", {}), ("Sigmoid", {}), ("LeakyRelu", {"alpha": 0.2})]


@pytest.mark.parametrize("op, attrs", UNARY_CASES)
def test_unary_fuse_to_com_microsoft(op, attrs):
    """Scales 0.0473 and 0.0219: with 0.05 and 0.02 (ratio 2.5) a window's exact average would often sit a
    float32 rounding away from a tie, where the float reference goes either way."""
    b = QDQ((2, 3, 5, 6))
    graph = b.graph(b.quant(b.op(op, [b.qdq("x", 0.0473, 128)], **attrs), 0.0219, 10))
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", f"com.microsoft.QLinear{op}"]
    assert fused.nodes[1].attrs == attrs and len(fused.nodes[1].inputs) == 5
    assert codes_off(graph, x_feed((2, 3, 5, 6))) <= 2


def test_average_pool_with_dilations_stays_float():
    b = QDQ((1, 2, 6, 6))
    y = b.op("AveragePool", [b.qdq("x", 0.05, 128)], kernel_shape=[2, 2], dilations=[2, 2])
    assert "AveragePool" in ops(fuse_qdq(b.graph(b.quant(y, 0.05, 128))))


@pytest.mark.parametrize("same", [True, False])
def test_concat(same):
    b = QDQ((2, 3, 4))
    a = b.qdq("x", 0.0473, 128)
    c = b.qdq(b.op("Relu", ["x"]), 0.0473 if same else 0.0311, 128 if same else 0)
    graph = b.graph(b.quant(b.op("Concat", [a, c, a], axis=1), 0.0473, 128))
    fused = fuse_qdq(graph)
    assert ops(fused)[-1] == ("Concat" if same else "com.microsoft.QLinearConcat")
    concat = fused.nodes[-1]
    assert concat.attrs == {"axis": 1} and len(concat.inputs) == (3 if same else 11)
    assert codes_off(graph, x_feed((2, 3, 4))) <= (0 if same else 2)


# ---- ops on the codes ----------------------------------------------------------------------------------------------

def on_codes_graph(op: str, y_scale: float = 0.05, y_zero: int = 128) -> Graph:
    """x [2, 1, 4, 6] -> Q -> DQ -> op -> Q (``y_scale``, ``y_zero``: the DQ's are 0.05 and 128)."""
    b = QDQ((2, 1, 4, 6))
    x = b.qdq("x", 0.05, 128)
    extra = {"MaxPool": ([], {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 1]}),
             "Reshape": ([b.param("shape", np.array([2, -1], np.int64))], {}),
             "Flatten": ([], {"axis": 2}),
             "Transpose": ([], {"perm": [0, 2, 3, 1]}),
             "Squeeze": ([b.param("axes", np.array([1], np.int64))], {}),
             "Unsqueeze": ([b.param("axes", np.array([0], np.int64))], {}),
             "Slice": ([b.param("starts", np.array([1], np.int64)), b.param("ends", np.array([5], np.int64)),
                        b.param("axes", np.array([3], np.int64))], {}),
             "Gather": ([b.param("indices", np.array([[0, 3], [2, 2]], np.int64))], {"axis": 2}),
             "Identity": ([], {}),
             "Resize": (["", b.param("scales", np.array([1, 1, 2, 1.5], np.float32))], {"mode": "nearest"})}
    inputs, attrs = extra[op]
    return b.graph(b.quant(b.op(op, [x, *inputs], **attrs), y_scale, y_zero))


@pytest.mark.parametrize("op", ON_CODES)
def test_on_codes(op):
    graph = on_codes_graph(op)
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", op]
    node = next(n for n in graph.nodes if n.op == op)
    assert fused.nodes[1].inputs[1:] == node.inputs[1:] and fused.nodes[1].attrs == node.attrs
    assert fused.nodes[1].inputs[0] == fused.nodes[0].outputs[0]  # the codes of x
    assert codes_off(graph, x_feed((2, 1, 4, 6))) == 0


@pytest.mark.parametrize("op", ON_CODES)
@pytest.mark.parametrize("y_scale, y_zero", [(0.04, 128), (0.05, 127)])
def test_on_codes_needs_the_same_scale_and_zero_point(op, y_scale, y_zero):
    fused = ops(fuse_qdq(on_codes_graph(op, y_scale, y_zero)))
    assert op in fused and fused.count("DequantizeLinear") == 1


@pytest.mark.parametrize("attrs", [{"mode": "linear"}, {"mode": "nearest",
                                                         "coordinate_transformation_mode": "tf_crop_and_resize"}])
def test_resize_that_makes_new_values_stays_float(attrs):
    b = QDQ((1, 1, 2, 2))
    y = b.op("Resize", [b.qdq("x", 0.05, 128), "", b.param("scales", np.array([1, 1, 2, 2], np.float32))], **attrs)
    assert "DequantizeLinear" in ops(fuse_qdq(b.graph(b.quant(y, 0.05, 128))))


# ---- rounding ties -------------------------------------------------------------------------------------------------

def _tie_weights(shape) -> tuple:
    return int8(shape, -4, 4), np.float32(2.0**-4)


def _tie_bias(b, n: int) -> str:
    """An int32 bias DQ in accumulator units (2^-3 2^-4): odd codes make ties too."""
    return b.dequant(RNG.integers(-9, 10, n).astype(np.int32), np.float32(2.0**-7))


def _tie_add(b, x):
    y = b.op("Relu", [b.op("DequantizeLinear", [b.nodes[0].outputs[0], *b.nodes[0].inputs[1:]])])
    return b.op("Add", [x, b.qdq(y, 2.0**-4, 0, np.int8)])


#: Groups whose exact results, with the scales of :func:`test_ties_round_half_to_even`, are whole numbers of half
#: codes (half of them ties): fused op -> (x's shape, the float ops on DQ(x)).
TIES = {"QLinearConv": ((1, 2, 3, 3), lambda b, x: b.op("Conv", [x, b.dequant(*_tie_weights((3, 2, 2, 2))),
                                                                 _tie_bias(b, 3)])),
        "QLinearMatMul": ((2, 3, 6), lambda b, x: b.op("MatMul", [x, b.dequant(*_tie_weights((6, 5)))])),
        "lowbit.QGemm": ((3, 6), lambda b, x: b.op("Gemm", [x, b.dequant(*_tie_weights((5, 6))), _tie_bias(b, 5)],
                                                    transB=1)),
        "com.microsoft.QGemm": ((6, 3), lambda b, x: b.op("Gemm", [x, b.dequant(*_tie_weights((5, 6))),
                                                                     _tie_bias(b, 5)], transA=1, transB=1)),
        "com.microsoft.QLinearAdd": ((2, 9), _tie_add),
        "com.microsoft.QLinearAveragePool": ((1, 2, 3, 3), lambda b, x: b.op("AveragePool", [x],
                                                                             kernel_shape=[1, 2]))}


@pytest.mark.parametrize("y_zero", [0, -4])
@pytest.mark.parametrize("fused_op", TIES)
def test_ties_round_half_to_even(fused_op, y_zero):
    """x on a grid of 2^-3 (codes -4..4), weights 2^-4, output 2^-6 (Add and AveragePool: 2^-4 and 2^-2): every
    exact result is k / 2 codes, so about half of them are ties, which ONNX rounds to even. Every float here is
    exact: the reference's codes are the spec's. (The zero points are even: with an odd one, QuantizeLinear's
    ``rint(v) + zp`` and the reference QLinearConv / QLinearMatMul's ``rint(v + zp)`` part at ties.)"""
    shape, build = TIES[fused_op]
    b = QDQ(shape)
    x = b.qdq("x", 2.0**-3, 0, np.int8)
    small = fused_op in ("com.microsoft.QLinearAdd", "com.microsoft.QLinearAveragePool")
    graph = b.graph(b.quant(build(b, x), 2.0**-2 if small else 2.0**-6, y_zero, np.int8))
    assert fused_op in ops(fuse_qdq(graph))
    assert codes_off(graph, {"x": (RNG.integers(-4, 5, shape) / 8).astype(np.float32)}) == 0


# ---- chains, shared DQs, weight-only DQs ---------------------------------------------------------------------------

def test_chain_keeps_only_the_first_q_and_the_last_dq():
    """Q -> DQ pairs between fused ops vanish: each integer op reads the previous one's codes."""
    b = QDQ((1, 2, 6, 6))
    x = b.qdq("x", 2.0**-4, 128)
    c1 = b.op("Conv", [x, b.dequant(int8((4, 2, 3, 3)), np.float32(2.0**-6))], pads=[1, 1, 1, 1])
    p = b.op("MaxPool", [b.qdq(c1, 2.0**-2, 0)], kernel_shape=[2, 2], strides=[2, 2])
    f = b.op("Flatten", [b.qdq(p, 2.0**-2, 0)])
    g = b.op("Gemm", [b.qdq(f, 2.0**-2, 0), b.dequant(int8((3, 36)), np.float32(2.0**-7))], transB=1)
    graph = b.graph(b.dequant(b.quant(g, 2.0**-1, 128), np.float32(2.0**-1), np.uint8(128)))
    fused = fuse_qdq(graph)
    assert ops(fused) == ["QuantizeLinear", "QLinearConv", "MaxPool", "Flatten", "lowbit.QGemm", "DequantizeLinear"]
    feeds = x_feed((1, 2, 6, 6))
    want = pytest.importorskip("onnx.reference").ReferenceEvaluator(onnx_model(graph)).run(None, feeds)[0]
    np.testing.assert_array_equal(run_fused(graph, feeds)[graph.outputs[0]], want)


@pytest.mark.parametrize("other", ["AveragePool", "Softmax"])
def test_shared_dq_goes_once_all_its_readers_fused(other):
    """ORT's quantizer gives one DQ to all readers of a tensor: each group fuses, the DQ stays while read."""
    b = QDQ((1, 2, 4, 4))
    x = b.qdq("x", 0.05, 128)
    conv = b.quant(b.op("Conv", [x, b.dequant(int8((2, 2, 1, 1)), np.float32(0.01))]), 0.1, 128)
    if other == "AveragePool":
        fused = fuse_qdq(b.graph(conv, b.quant(b.op("AveragePool", [x], kernel_shape=[2, 2]), 0.05, 128)))
        assert ops(fused) == ["QuantizeLinear", "QLinearConv", "com.microsoft.QLinearAveragePool"]
    else:
        fused = fuse_qdq(b.graph(conv, b.op("Softmax", [x])))
        assert ops(fused) == ["QuantizeLinear", "DequantizeLinear", "QLinearConv", "Softmax"]


def test_weight_only_dq_becomes_a_float_constant():
    b = QDQ((1, 2, 4, 4))
    codes, scale, zero = int8((3, 2, 1, 1)), np.array([0.5, 0.25, 0.125], np.float32), np.array([1, 0, -2], np.int8)
    w = b.dequant(codes, scale, zero, axis=0)
    graph = b.graph(b.op("Conv", ["x", w]))
    fused = fuse_qdq(graph)
    assert ops(fused) == ["Conv"]
    expected = (codes.astype(np.float32) - zero.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(fused.params[w], expected)
    assert set(fused.params) == {w}  # the codes, scale and zero point are gone


def test_weight_dq_whose_scale_does_not_fit_is_an_error():
    b = QDQ((1, 2, 4, 4))
    w = b.dequant(int8((3, 2, 1, 1)), np.ones(4, np.float32), axis=0)
    graph = b.graph(b.op("Conv", ["x", w]))
    with pytest.raises(ValueError, match=r"node 'dequantizelinear0' \(DequantizeLinear\): codes \[3, 2, 1, 1\], "
                                         r"scale \[4\]"):
        fuse_qdq(graph)


# ---- groups that must not fuse -------------------------------------------------------------------------------------

def test_intermediate_with_two_readers_does_not_fuse():
    graph = conv_graph(act="relu")
    conv = next(n for n in graph.nodes if n.op == "Conv")
    graph.nodes.append(Node("Sigmoid", [conv.outputs[0]], ["side"], name="side"))
    graph.outputs.append("side")
    assert "QLinearConv" not in ops(fuse_qdq(graph.validate()))


@pytest.mark.parametrize("op", ["Conv", "Relu"])
def test_intermediate_graph_output_does_not_fuse(op):
    graph = conv_graph(act="relu")
    graph.outputs.append(next(n for n in graph.nodes if n.op == op).outputs[0])
    fused = fuse_qdq(graph)
    assert "QLinearConv" not in ops(fused) and "Relu" in ops(fused)


def test_weights_read_at_run_time_do_not_fuse():
    b = QDQ((1, 2, 4, 4))
    b.inputs["w"] = TensorSpec((3, 2, 1, 1), "int8")
    w = b.dequant("w", np.float32(0.01), np.int8(0))
    graph = b.graph(b.quant(b.op("Conv", [b.qdq("x", 0.05, 128), w]), 0.1, 128))
    assert "Conv" in ops(fuse_qdq(graph))


def mutate(graph: Graph, op: str, change) -> Graph:
    """``graph`` after ``change(graph, node)`` on its first node whose op is ``op``."""
    change(graph, next(n for n in graph.nodes if n.op == op))
    return graph.validate()


def _bias_scale_off(g, conv):
    dq = producer(g, conv.inputs[2])
    g.params[dq.inputs[1]] = g.params[dq.inputs[1]] * np.float32(1.01)


def _weights_per_input_channel(g, conv):
    dq = producer(g, conv.inputs[1])
    dq.attrs["axis"] = 1
    g.params[dq.inputs[1]] = g.params[dq.inputs[1]][:4]
    g.params[dq.inputs[2]] = g.params[dq.inputs[2]][:4]


def _float_bias(g, conv):
    g.params["float_bias"] = np.ones(6, np.float32)
    conv.inputs[2] = "float_bias"


@pytest.mark.parametrize("change", [_bias_scale_off, _weights_per_input_channel, _float_bias])
def test_conv_with_unusable_bias_or_weights_does_not_fuse(change):
    assert "QLinearConv" not in ops(fuse_qdq(mutate(conv_graph(), "Conv", change)))


def test_clip_other_than_relu6_does_not_fuse():
    def clip_to_4(g, clip):
        g.params[clip.inputs[2]] = np.float32(4)

    assert "QLinearConv" not in ops(fuse_qdq(mutate(conv_graph(act="relu6"), "Clip", clip_to_4)))


def test_q_to_4_bit_codes_does_not_fuse():
    graph = conv_graph()
    graph.nodes[-1].attrs["output_dtype_name"] = "uint4"  # as the importer marks a 4-bit QuantizeLinear
    assert "QLinearConv" not in ops(fuse_qdq(graph))


def test_activation_dq_without_zero_point_does_not_fuse():
    """Its codes' type is unknown without the zero point: no integer op can be typed."""
    b = QDQ((2, 3))
    x = b.dequant(b.quant("x", 0.05, 0, np.uint8), np.float32(0.05))
    graph = b.graph(b.quant(b.op("Sigmoid", [x]), 1 / 256, 0))
    assert "Sigmoid" in ops(fuse_qdq(graph))


# ---- purity, size ----------------------------------------------------------------------------------------------------

def test_input_graph_and_arrays_are_unchanged():
    graph = conv_graph(act="relu6", w_dtype=np.uint8)
    for value in graph.params.values():
        value.setflags(write=False)  # any in-place write raises
    before = [(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name) for n in graph.nodes]
    params = dict(graph.params)
    fused = fuse_qdq(graph)
    assert [(n.op, n.inputs, n.outputs, n.attrs, n.name) for n in graph.nodes] == before
    assert graph.params.keys() == params.keys() and all(graph.params[k] is v for k, v in params.items())
    assert fused.nodes[1] not in graph.nodes and fused.params is not graph.params


def test_large_graph_fuses_in_linear_time():
    """24 002 nodes, 3 000 new weight arrays: a pass that scans the graph per group or per new name would take
    minutes."""
    b = QDQ((4, 16))
    x = b.qdq("x", 2.0**-4, 128)
    codes, bias = int8((16, 16)), b.param("bias", np.zeros(16, np.float32))
    for _ in range(3000):
        w = b.dequant(codes, np.float32(2.0**-7))
        h = b.qdq(b.op("Add", [b.op("MatMul", [x, w]), bias]), 2.0**-4, 128)  # lowbit.QGemm on new [N, K] codes
        x = b.qdq(b.op("Reshape", [h, b.param("shape", np.array([4, 16], np.int64))]), 2.0**-4, 128)
    graph = b.graph(x)
    assert len(graph.nodes) == 24002
    start = time.perf_counter()
    fused = fuse_qdq(graph)
    assert time.perf_counter() - start < 10
    assert ops(fused).count("lowbit.QGemm") == 3000 and ops(fused).count("Reshape") == 3000
    assert len(fused.nodes) == 6002


# ---- a model quantized by ONNX Runtime -----------------------------------------------------------------------------

def test_onnxruntime_quantize_static_model(tmp_path):
    """Conv -> Relu -> MaxPool -> Conv -> Flatten -> Gemm, quantized by ORT (QDQ, per channel): every group fuses,
    and the output stays within a couple of codes of the QDQ model's (onnx.reference)."""
    onnx = pytest.importorskip("onnx")
    quantization = pytest.importorskip("onnxruntime.quantization")
    from onnx import helper, numpy_helper

    from lowbit.onnx import load

    weights = {"w1": RNG.normal(0, 0.3, (4, 3, 3, 3)), "b1": RNG.normal(0, 0.1, 4),
               "w2": RNG.normal(0, 0.2, (6, 4, 3, 3)), "w3": RNG.normal(0, 0.1, (5, 6 * 3 * 3)),
               "b3": RNG.normal(0, 0.1, 5)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "float.onnx")
    batches = [x_feed((2, 3, 6, 6)) for _ in range(4)]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    quantization.quantize_static(tmp_path / "float.onnx", tmp_path / "qdq.onnx", Reader(),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    qdq = load(tmp_path / "qdq.onnx", optimize=False)
    fused = fuse_qdq(qdq)
    assert ops(fused) == ["QuantizeLinear", "QLinearConv", "MaxPool", "QLinearConv", "Flatten", "lowbit.QGemm",
                          "DequantizeLinear"]
    reference = pytest.importorskip("onnx.reference")
    want = reference.ReferenceEvaluator(str(tmp_path / "qdq.onnx")).run(None, batches[0])[0]
    got = run_fused(qdq, batches[0])["y"]
    y_scale = fused.params[fused.nodes[-1].inputs[1]]
    assert np.abs(got - want).max() <= 2.01 * y_scale
