"""The float preparers (``lowbit.runtime.float_ops``) and window geometry (``lowbit.runtime.windows``) on ONNX models.

Each case is a one-node ONNX model, imported by ``lowbit.onnx.load`` and run through ``lowbit.Session``, against
``onnx.reference.ReferenceEvaluator``; ONNX Runtime is the oracle for com.microsoft ops, for Softmax below opset
13 (the reference has only the opset-13 form) and for the cases where the reference is wrong (ConvTranspose
with groups or output_shape, MaxPool SAME_LOWER, padded 3-D MaxPool, Indices with storage_order=1, 1-D
GlobalMaxPool). Float outputs within 1e-5 (relative and absolute), integer outputs equal, dtypes and shapes
equal. Bad attributes are checked on graphs built directly.
"""

from __future__ import annotations


import numpy as np
import pytest

from kernels import cpu
from lowbit import Graph, Node, Session, TensorSpec
from lowbit.runtime.windows import conv_transpose_window, conv_window, window_geometry
from tests.levels import level_fixture

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import lowbit.onnx  # noqa: E402

MS = "com.microsoft."
conv_level = level_fixture("conv_float32")


def _value(rng: np.random.Generator, spec) -> np.ndarray:
    """An array for ``spec``: an array or NumPy scalar as is, else a shape of float32 normals."""
    if isinstance(spec, (np.ndarray, np.generic)):
        return np.asarray(spec)
    return rng.standard_normal(spec).astype(np.float32)


def _split(**operands) -> tuple[dict, dict]:
    """``(feeds, params)`` from name -> value, where a value ``("const", v)`` is a constant (initializer)."""
    feeds = {k: v for k, v in operands.items() if not (isinstance(v, tuple) and v[:1] == ("const",))}
    return feeds, {k: v[1] for k, v in operands.items() if k not in feeds}


def _model(op: str, feeds: dict, params: dict, attrs: dict, outputs: int, opset: int, order: list[str] | None):
    domain, _, op_type = op.rpartition(".")
    names = order or [*feeds, *params]
    node = helper.make_node(op_type, names, [f"y{i}" for i in range(outputs)], domain=domain or None, **attrs)
    info = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.UNDEFINED, None) for i in range(outputs)]
    graph = helper.make_graph([node], "one", info, outs, [numpy_helper.from_array(v, k) for k, v in params.items()])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8  # readable by every onnxruntime we meet
    return model


def _expected(model, feeds: dict, oracle: str) -> list[np.ndarray]:
    if oracle == "ref":
        return ReferenceEvaluator(model).run(None, feeds)
    ort = pytest.importorskip("onnxruntime")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for output in model.graph.output:  # onnxruntime infers the types it refuses to read as UNDEFINED
        output.ClearField("type")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check(op: str, feeds: dict, params: dict | None = None, attrs: dict | None = None, *, outputs: int = 1,
          opset: int = 21, oracle: str = "ref", order: list[str] | None = None, tol: float = 1e-5) -> Session:
    """Run ``op`` on ``feeds`` (name -> ndarray or shape) with constant ``params`` through lowbit and the oracle
    (``order``: the node's input names, ``""`` for an absent one; default feeds then params)."""
    rng = np.random.default_rng(0)
    feeds = {k: _value(rng, v) for k, v in feeds.items()}
    params = {k: _value(rng, v) for k, v in (params or {}).items()}
    model = _model(op, feeds, params, attrs or {}, outputs, opset, order)
    expected = _expected(model, feeds, oracle if not op.startswith(MS) else "ort")
    session = Session(lowbit.onnx.load(model))
    got = session.run(feeds)
    for i, want in enumerate(expected):
        y = got[f"y{i}"]
        assert (y.shape, y.dtype) == (want.shape, want.dtype), f"output {i}"
        if want.dtype.kind == "f":
            np.testing.assert_allclose(y, want, rtol=tol, atol=tol, err_msg=f"output {i}")
        else:
            np.testing.assert_array_equal(y, want, err_msg=f"output {i}")
    return session


def _graph(op: str, shapes: list[tuple], attrs: dict, params: dict | None = None, outputs: int = 1,
           opset: int = 21) -> Graph:
    """A one-node graph of ``op`` built directly (no ONNX checks): inputs ``x0, x1 ...``, then ``params``."""
    names = [f"x{i}" for i in range(len(shapes))] + list(params or {})
    return Graph([Node(op, names, [f"y{i}" for i in range(outputs)], attrs, "n")],
                 {f"x{i}": TensorSpec(s) for i, s in enumerate(shapes)}, [f"y{i}" for i in range(outputs)],
                 dict(params or {}), {"": opset})


def refuses(graph: Graph, match: str, error: type[Exception] = ValueError) -> None:
    """Preparing ``graph`` raises ``error`` naming the node and matching ``match``."""
    feeds = {k: np.zeros(s.shape, s.dtype) for k, s in graph.inputs.items()}
    with pytest.raises(error, match=match) as raised:
        Session(graph, optimize=False).run(feeds)
    assert "'n'" in str(raised.value)


def _w(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


# ---- windows -------------------------------------------------------------------------------------------------------

def _node(op: str = "MaxPool", **attrs) -> Node:
    return Node(op, ["x"], ["y"], attrs, "n")


@pytest.mark.parametrize("attrs, kernel, ceil, want", [  # a 7-long axis
    ({"strides": [2]}, 3, False, ((2,), (1,), (0, 0), (3,))),  # (7 - 3) // 2 + 1
    ({"strides": [2]}, 2, True, ((2,), (1,), (0, 0), (4,))),  # ceil(5 / 2) + 1; floor gives 3
    ({"strides": [3], "pads": [1, 1]}, 2, True, ((3,), (1,), (1, 1), (3,))),  # a 4th window would start in the pad
    ({"strides": [2], "pads": [1, 1]}, 3, True, ((2,), (1,), (1, 1), (4,))),
    ({"auto_pad": "SAME_UPPER", "strides": [2]}, 3, False, ((2,), (1,), (1, 1), (4,))),
    ({"auto_pad": "SAME_UPPER", "strides": [3]}, 2, False, ((3,), (1,), (0, 1), (3,))),
    ({"auto_pad": "SAME_LOWER", "strides": [3]}, 2, False, ((3,), (1,), (1, 0), (3,))),
    ({"auto_pad": "SAME_LOWER", "dilations": [2]}, 2, True, ((1,), (2,), (1, 1), (7,))),
    ({"auto_pad": "VALID", "pads": [5, 5], "dilations": [2]}, 3, False, ((1,), (2,), (0, 0), (3,))),
])
def test_window_geometry(attrs, kernel, ceil, want):
    w = window_geometry(_node(**attrs), (7,), (kernel,), ceil_mode=ceil)
    assert (w.strides, w.dilations, w.pads, w.out) == want


def test_window_geometry_is_n_dimensional():
    w = window_geometry(_node(strides=[1, 2, 3], pads=[0, 1, 2, 0, 1, 2], dilations=[2, 1, 1]), (9, 8, 7), (2, 3, 4))
    assert w.out == (7, 4, 3) and w.pads == (0, 1, 2, 0, 1, 2)


@pytest.mark.parametrize("attrs, kernel, match", [
    ({"strides": [0, 1]}, (3, 3), "strides must be >= 1"),
    ({"strides": [1]}, (3, 3), "strides must be 2 ints"),
    ({"dilations": [1, -1]}, (3, 3), "dilations must be >= 1"),
    ({"pads": [1, 1]}, (3, 3), "pads must be 4 ints"),
    ({"pads": [0, 0, -1, 0]}, (3, 3), "pads must be >= 0"),
    ({"strides": [1.5, 1]}, (3, 3), "strides must be 2 ints"),
    ({"auto_pad": "SAME"}, (3, 3), "auto_pad must be one of"),
    ({}, (0, 3), "kernel_shape must be 2 ints >= 1"),
    ({}, (3,), "kernel_shape must be 2 ints >= 1"),
    ({"dilations": [4, 1]}, (3, 3), "larger than the padded input"),
])
def test_window_geometry_refuses(attrs, kernel, match):
    with pytest.raises(ValueError, match=match):
        window_geometry(_node(**attrs), (7, 7), kernel)


def test_conv_window_checks_group_channels_and_kernel_shape():
    assert conv_window(_node("Conv", group=2), (1, 4, 5, 5), (6, 2, 3, 3)) == (2, window_geometry(
        _node("Conv"), (5, 5), (3, 3)))
    for attrs, w_shape, match in [({"group": 2.0}, (6, 2, 3, 3), "group must be an int >= 1"),
                                  ({"group": 0}, (6, 4, 3, 3), "group must be an int >= 1"),
                                  ({"group": 3}, (6, 2, 3, 3), "input channels 4"),
                                  ({"kernel_shape": [3, 2]}, (6, 4, 3, 3), "kernel_shape \\[3, 2\\] does not match"),
                                  ({}, (6, 4, 3), "same rank")]:
        with pytest.raises(ValueError, match=match):
            conv_window(_node("Conv", **attrs), (1, 4, 5, 5), w_shape)
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose_window(_node("ConvTranspose", strides=[2], output_padding=[2]), (1, 4, 5), (4, 2, 3))
    # uncropped output 2 (5 - 1) + 3 = 11: output_shape 12 crops -1, split (0, -1): one zero column at the end
    assert conv_transpose_window(_node("ConvTranspose", strides=[2], output_shape=[12]), (1, 4, 5), (4, 2, 3))[1] \
        .pads == (0, -1)


# ---- Conv, ConvTranspose -------------------------------------------------------------------------------------------

CONV = [  # x shape, w shape, bias, attrs
    ((2, 3, 7, 7), (4, 3, 3, 3), True, {"pads": [1, 1, 1, 1]}),
    ((1, 4, 7, 65), (6, 2, 3, 3), True, {"strides": [2, 3], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 2}),
    ((1, 6, 7, 7), (6, 1, 3, 3), True, {"strides": [2, 2], "auto_pad": "SAME_UPPER", "group": 6}),  # depthwise
    ((1, 6, 7, 7), (12, 1, 3, 3), False, {"auto_pad": "SAME_LOWER", "strides": [2, 2], "group": 6}),  # multiplier 2
    ((2, 5, 1, 63), (7, 5, 1, 1), True, {}),  # pointwise
    ((1, 3, 8, 9), (4, 3, 2, 4), False, {"auto_pad": "VALID", "strides": [3, 2]}),
    ((1, 4, 63), (5, 4, 5), True, {"pads": [2, 1], "strides": [2]}),  # 1-D
    ((2, 4, 65), (4, 1, 3), True, {"group": 4, "dilations": [3], "auto_pad": "SAME_UPPER"}),  # 1-D depthwise
    ((1, 6, 7), (4, 3, 2), False, {"group": 2, "auto_pad": "SAME_LOWER", "strides": [2]}),  # 1-D grouped
]


@pytest.mark.parametrize("x, w, bias, attrs", CONV)
def test_conv(conv_level, x, w, bias, attrs):
    """On every level: the AVX-512 register tiles of kernels.conv.float32, or im2col + BLAS."""
    params = {"w": _w(*w), **({"b": _w(w[0])} if bias else {})}
    session = check("Conv", {"x": x}, params, attrs)
    note = next(iter(session.notes.values()))
    assert "evaluator" not in note
    assert note.startswith("conv2d_float32") == (conv_level == cpu.AVX512_VNNI)


CONV_TRANSPOSE = [  # x shape, w shape, bias, attrs, oracle
    ((2, 4, 5, 6), (4, 3, 3, 2), True, {"strides": [2, 3], "pads": [1, 0, 2, 1]}, "ref"),
    ((1, 4, 7, 7), (4, 3, 3, 3), True, {"strides": [2, 2], "dilations": [2, 1], "output_padding": [1, 0]}, "ref"),
    ((1, 4, 5, 6), (4, 2, 3, 2), False, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, "ref"),
    ((1, 4, 5, 6), (4, 2, 3, 3), True, {"strides": [3, 2], "auto_pad": "SAME_LOWER"}, "ref"),
    ((1, 4, 5, 6), (4, 3, 3, 2), True, {"strides": [2, 2], "output_shape": [11, 11]}, "ort"),  # crops (0, 1)
    ((1, 4, 5, 6), (4, 3, 3, 2), False, {"strides": [2, 2], "output_shape": [12, 13]}, "ort"),  # pads with zeros
    ((2, 4, 5, 6), (4, 3, 3, 3), True, {"group": 2, "strides": [2, 1], "pads": [1, 1, 0, 1]}, "ort"),
    ((1, 6, 7, 7), (6, 1, 3, 3), True, {"group": 6, "strides": [2, 2], "pads": [1, 1, 1, 1]}, "ort"),  # depthwise
    ((1, 4, 63), (4, 2, 4), True, {"strides": [2], "pads": [1, 2]}, "ref"),  # 1-D
    ((1, 4, 7), (4, 2, 3), False, {"strides": [3], "output_padding": [2], "group": 2}, "ort"),  # 1-D grouped
]


@pytest.mark.parametrize("x, w, bias, attrs, oracle", CONV_TRANSPOSE)
def test_conv_transpose(x, w, bias, attrs, oracle):
    params = {"w": _w(*w), **({"b": _w(w[1] * attrs.get("group", 1))} if bias else {})}
    session = check("ConvTranspose", {"x": x}, params, attrs, oracle=oracle)
    assert next(iter(session.notes.values())) == "BLAS + col2im"


@pytest.mark.parametrize("op, attrs, w, match", [
    ("Conv", {"strides": [0, 1]}, (4, 3, 3, 3), "strides must be >= 1"),
    ("Conv", {"group": 1.0}, (4, 3, 3, 3), "group must be an int"),
    ("Conv", {"kernel_shape": [2, 2]}, (4, 3, 3, 3), "does not match the weights"),
    ("Conv", {"pads": [1, 1]}, (4, 3, 3, 3), "pads must be 4 ints"),
    ("Conv", {}, (4, 3, 9, 3), "larger than the padded input"),
    ("Conv", {"group": 2}, (4, 3, 3, 3), "group 2 disagree"),
    ("ConvTranspose", {"strides": [2, 2], "output_padding": [2, 0]}, (3, 4, 3, 3), "output_padding"),
    ("ConvTranspose", {"pads": [4, 0, 3, 0]}, (3, 4, 3, 3), "leave no output"),
])
def test_conv_refuses_bad_attributes(op, attrs, w, match):
    refuses(_graph(op, [(1, 3, 5, 5)], attrs, {"w": _w(*w)}), match)


def test_conv_with_computed_weights():
    check("Conv", {"x": (1, 3, 7, 7), "w": (4, 3, 3, 3), "b": (4,)}, {}, {"pads": [1, 1, 1, 1]})
    check("Conv", {"x": (1, 4, 7, 7), "w": (4, 1, 3, 3)}, {}, {"group": 4})
    check("Conv", {"x": (1, 4, 7, 7), "w": (6, 2, 3, 3)}, {"b": (6,)}, {"group": 2}, order=["x", "w", "b"])
    check("ConvTranspose", {"x": (1, 4, 5, 6), "w": (4, 3, 3, 3)}, {}, {"strides": [2, 2]})


@pytest.mark.parametrize("op, x, w, attrs", [
    ("Conv", (1, 2, 5, 6, 7), (3, 2, 3, 3, 3), {"pads": [1, 0, 1, 1, 0, 1], "strides": [1, 2, 1]}),
    ("Conv", (1, 4, 5, 6, 7), (4, 1, 2, 3, 3), {"group": 4, "auto_pad": "SAME_UPPER"}),
    ("Conv", (2, 4, 5, 6, 7), (6, 2, 1, 1, 1), {"group": 2}),
    ("ConvTranspose", (1, 2, 3, 4, 5), (2, 3, 2, 3, 2), {"strides": [2, 1, 2], "pads": [0, 1, 0, 1, 0, 1]}),
])
def test_conv_3d(op, x, w, attrs):
    check(op, {"x": x}, {"w": _w(*w)}, attrs)


# ---- pooling -------------------------------------------------------------------------------------------------------

POOLS = [  # op, x shape, attrs, opset, oracle (the reference is wrong on MaxPool SAME_LOWER, 1-D global pools)
    ("MaxPool", (1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 0], "ceil_mode": 1}, 21,
     "ref"),
    ("MaxPool", (2, 3, 65, 63), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, 21, "ref"),
    ("MaxPool", (1, 2, 7, 7), {"kernel_shape": [2, 3], "strides": [3, 2], "auto_pad": "SAME_LOWER"}, 21, "ort"),
    ("MaxPool", (1, 2, 9, 8), {"kernel_shape": [2, 2], "dilations": [2, 3], "ceil_mode": 1, "strides": [2, 2]}, 21,
     "ref"),
    ("MaxPool", (2, 3, 63), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, 21, "ref"),  # 1-D
    ("MaxPool", (1, 1, 7), {"kernel_shape": [2], "strides": [2], "ceil_mode": 1}, 21, "ref"),
    ("AveragePool", (1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                   "ceil_mode": 1, "count_include_pad": 1}, 21, "ref"),
    ("AveragePool", (1, 2, 7, 6), {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [1, 0, 0, 1]}, 21, "ref"),
    ("AveragePool", (1, 3, 9, 9), {"kernel_shape": [3, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}, 19, "ref"),
    ("AveragePool", (1, 3, 9, 8), {"kernel_shape": [2, 2], "dilations": [2, 1], "ceil_mode": 1, "strides": [2, 2],
                                   "count_include_pad": 1, "pads": [0, 1, 1, 0]}, 19, "ref"),
    ("AveragePool", (2, 3, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, 11, "ref"),
    ("AveragePool", (1, 4, 65), {"kernel_shape": [4], "strides": [3], "pads": [2, 1], "count_include_pad": 1}, 21,
     "ref"),
    ("GlobalMaxPool", (2, 3, 7, 5), {}, 21, "ref"),
    ("GlobalMaxPool", (2, 3, 7), {}, 21, "ort"),
    ("GlobalAveragePool", (1, 3, 4, 5, 6), {}, 21, "ref"),
]


@pytest.mark.parametrize("op, x, attrs, opset, oracle", POOLS)
def test_pool(op, x, attrs, opset, oracle):
    session = check(op, {"x": x}, {}, attrs, opset=opset, oracle=oracle)
    assert "evaluator" not in next(iter(session.notes.values()))


def test_max_pool_of_codes():
    x = np.random.default_rng(1).integers(0, 256, (1, 3, 7, 9), dtype=np.uint8)
    session = check("MaxPool", {"x": x}, {}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    assert next(iter(session.notes.values())) == "max_pool2d on codes"


@pytest.mark.parametrize("op, x, attrs, oracle", [  # the reference fails on padded 3-D MaxPool
    ("MaxPool", (1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2], "ceil_mode": 1}, "ref"),
    ("MaxPool", (1, 2, 3, 4, 5), {"kernel_shape": [2, 2, 2], "pads": [1, 1, 1, 1, 1, 1]}, "ort"),
    ("MaxPool", np.arange(-60, 60, dtype=np.int8).reshape(1, 2, 3, 4, 5), {"kernel_shape": [2, 2, 2],
                                                                         "pads": [1, 0, 1, 0, 1, 1]}, "ort"),
    ("AveragePool", (1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "pads": [1, 1, 0, 0, 1, 1],
                                      "count_include_pad": 1}, "ref"),
    ("AveragePool", (1, 2, 9, 6, 7), {"kernel_shape": [2, 2, 2], "dilations": [3, 2, 1], "ceil_mode": 1,
                                      "strides": [2, 2, 2]}, "ref"),
])
def test_pool_3d(op, x, attrs, oracle):
    check(op, {"x": x}, {}, attrs, opset=19, oracle=oracle)


@pytest.mark.parametrize("x, attrs, oracle", [  # the reference is wrong on storage_order=1 with pads
    ((2, 3, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2]}, "ref"),
    ((1, 2, 7, 6), {"kernel_shape": [3, 2], "pads": [1, 1, 1, 0], "storage_order": 1}, "ort"),
    ((1, 2, 9, 8), {"kernel_shape": [2, 3], "dilations": [2, 1], "ceil_mode": 1, "strides": [2, 3]}, "ref"),
    ((2, 3, 65), {"kernel_shape": [4], "strides": [3], "pads": [1, 2]}, "ref"),
    ((1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "pads": [1, 0, 1, 0, 1, 1]}, "ort"),
])
def test_max_pool_indices(x, attrs, oracle):
    check("MaxPool", {"x": x}, {}, attrs, outputs=2, oracle=oracle)


def test_pool_refuses_bad_attributes():
    refuses(_graph("MaxPool", [(1, 2, 5, 5)], {}), "kernel_shape is required")
    refuses(_graph("MaxPool", [(1, 2, 5, 5)], {"kernel_shape": [3, 3], "strides": [1, 0]}), "strides must be >= 1")
    refuses(_graph("AveragePool", [(1, 2, 5, 5)], {"kernel_shape": [2, 2], "pads": [2, 0, 0, 0]}),
            "wholly in the padding")


# ---- elementwise ---------------------------------------------------------------------------------------------------

def _positive(*shape: int) -> np.ndarray:
    return np.random.default_rng(7).uniform(0.1, 3.0, shape).astype(np.float32)


UNARY = [  # op, attrs, input (shape or array)
    ("Relu", {}, (3, 65)), ("Tanh", {}, (7, 63)), ("Exp", {}, (1, 65)), ("Log", {}, _positive(3, 7)),
    ("Sqrt", {}, _positive(63)), ("Neg", {}, (2, 7)), ("Abs", {}, (2, 7)), ("Reciprocal", {}, _positive(7, 1)),
    ("Sigmoid", {}, (3, 65)), ("LeakyRelu", {}, (3, 65)), ("LeakyRelu", {"alpha": 1.5}, (3, 7)),
    ("LeakyRelu", {"alpha": -0.5}, (3, 7)), ("HardSigmoid", {}, (3, 65)),
    ("HardSigmoid", {"alpha": 0.5, "beta": 0.1}, (3, 7)), ("HardSwish", {}, (3, 65)), ("Erf", {}, (5, 63)),
    ("Gelu", {}, (3, 65)), ("Gelu", {"approximate": "tanh"}, (3, 65)), ("Relu", {}, np.arange(-3, 4, dtype=np.int32)),
    ("Neg", {}, np.arange(-3, 4, dtype=np.int64)), ("Abs", {}, np.arange(-3, 4, dtype=np.int8)),
    ("Tanh", {}, np.linspace(-2, 2, 7)),  # float64
    (MS + "Gelu", {}, (3, 65)), (MS + "QuickGelu", {}, (3, 65)), (MS + "QuickGelu", {"alpha": 1.2}, (1, 7)),
    (MS + "FastGelu", {}, (2, 7, 65)),
]


@pytest.mark.parametrize("op, attrs, x", UNARY, ids=[f"{c[0]}-{i}" for i, c in enumerate(UNARY)])
def test_unary(op, attrs, x):
    check(op, {"x": x}, {}, attrs, opset=20)


@pytest.mark.parametrize("op, bias", [(MS + "FastGelu", "param"), (MS + "FastGelu", "input"),
                                      (MS + "BiasGelu", "param"), (MS + "BiasGelu", "input")])
def test_biased_gelu(op, bias):
    feeds, params = {"x": (2, 7, 65)}, {}
    (feeds if bias == "input" else params)["b"] = (65,)
    check(op, feeds, params)


def test_float64_erf_gelu_and_layer_norm_are_evaluated():
    x = np.linspace(-3, 3, 65)
    assert "float64 input: evaluator" in next(iter(check("Erf", {"x": x}, tol=1e-7).notes.values()))
    check("Gelu", {"x": x}, {}, {"approximate": "tanh"}, tol=1e-7, opset=20)
    check("LayerNormalization", {"x": x.reshape(5, 13)}, {"scale": np.linspace(0.5, 1, 13)}, opset=17)


@pytest.mark.parametrize("feeds, params, order, opset", [
    ({"x": (3, 65)}, {"lo": np.float32(-0.5), "hi": np.float32(0.25)}, None, 13),
    ({"x": (3, 65)}, {"hi": np.float32(0.25)}, ["x", "", "hi"], 13),  # no lower bound
    ({"x": (3, 65)}, {}, None, 13),  # no bounds
    ({"x": (3, 7), "lo": np.float32(-0.5)}, {"hi": np.float32(-1.0)}, None, 13),  # lo > hi: hi everywhere
    ({"x": np.arange(-5, 6, dtype=np.int32)}, {"lo": np.int32(-2), "hi": np.int32(3)}, None, 12),
])
def test_clip(feeds, params, order, opset):
    check("Clip", feeds, params, order=order, opset=opset)


def test_clip_attributes_before_opset_11():  # lowbit.onnx.load reads opsets >= 10, so the graph is built directly
    x = np.linspace(-2, 2, 21, dtype=np.float32).reshape(3, 7)
    for attrs, lo, hi in (({"min": -0.5, "max": 0.75}, -0.5, 0.75), ({"max": 0.75}, None, 0.75)):
        (y,) = Session(_graph("Clip", [(3, 7)], attrs, opset=6)).run({"x0": x}).values()
        np.testing.assert_array_equal(y, np.clip(x, lo, hi))


def test_prelu():
    check("PRelu", {"x": (2, 3, 7, 5)}, {"slope": _positive(3, 1, 1) / 4})
    check("PRelu", {"x": (2, 3, 7, 5)}, {"slope": _w(3, 1, 1)})  # mixed signs and sizes: the general form
    check("PRelu", {"x": (2, 3, 65), "slope": (65,)})


BINARY = [  # op, a, b: a shape, an array, or ("const", array) for an initializer
    ("Add", (7, 1, 65), (1, 63, 1)), ("Sub", (2, 7), (7,)), ("Mul", (1,), (3, 7)), ("Div", (3, 7), _positive(3, 1)),
    ("Pow", _positive(3, 7), (3, 7)), ("Sub", (3, 7), ("const", _w(7))), ("Mul", ("const", _w(3, 1)), (3, 7)),
    ("Div", np.arange(-7, 8, dtype=np.int32), np.array([2, -3, 4, -2, 5], np.int32).repeat(3)),
    ("Div", np.arange(-9, 9, dtype=np.int64).reshape(2, 9), ("const", np.array([[4], [-4]], np.int64))),
    ("Sub", np.arange(6, dtype=np.int64), np.array(3, np.int64)), ("Pow", _positive(3, 7), ("const", np.float32(2))),
    ("Pow", _positive(3, 7), ("const", np.float32(0.5))), ("Pow", _w(3, 7), ("const", np.array(3, np.int64))),
    ("Pow", _w(3, 7), np.array([2], np.int64)), ("Pow", np.arange(1, 6, dtype=np.int32), ("const", np.int32(2))),
    ("Div", np.float32(3), ("const", np.float32(2))), ("Sub", ("const", np.float32(1)), np.float32(3)),  # 0-d
    ("Mul", np.float32(3), (2, 1)),
]


@pytest.mark.parametrize("op, a, b", BINARY, ids=[f"{c[0]}-{i}" for i, c in enumerate(BINARY)])
def test_binary(op, a, b):
    check(op, *_split(a=a, b=b), order=["a", "b"])


def test_binary_dtypes_follow_onnx():
    x = np.linspace(-1, 1, 21, dtype=np.float32).reshape(3, 7)
    for op, ufunc in (("Add", np.add), ("Div", np.divide)):  # a float64 constant is cast, not promoting x
        (y,) = Session(_graph(op, [(3, 7)], {}, {"c": np.array(0.1)})).run({"x0": x}).values()
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, ufunc(x, np.float32(0.1)))
    w = np.linspace(-1, 1, 14).reshape(7, 2)  # float64 constant weights of a float32 MatMul
    (y,) = Session(_graph("MatMul", [(3, 7)], {}, {"w": w})).run({"x0": x}).values()
    np.testing.assert_allclose(y, x @ w.astype(np.float32), rtol=1e-6)
    assert y.dtype == np.float32
    refuses(_graph("Add", [(3, 7), (4, 7)], {}), "do not broadcast")
    graph = _graph("Mul", [(3, 7), (3, 7)], {})
    graph.inputs["x1"] = TensorSpec((3, 7), "int32")
    refuses(graph, "must have one dtype", TypeError)


@pytest.mark.parametrize("op, x, attrs, opset", [
    ("Softmax", (2, 3, 65), {}, 13), ("Softmax", (2, 3, 7), {"axis": 1}, 13), ("Softmax", (2, 3, 7), {"axis": 0}, 13),
    ("Softmax", (2, 3, 4, 5), {}, 11), ("Softmax", (2, 3, 4, 5), {"axis": 2}, 11),
    ("Softmax", (2, 3, 63), {"axis": -1}, 11), ("LogSoftmax", (2, 3, 65), {}, 13),
    ("LogSoftmax", (2, 7, 3), {"axis": -2}, 13), ("LogSoftmax", (3, 4, 5), {}, 11),
    ("LogSoftmax", (3, 4, 5), {"axis": 0}, 11),
])
def test_softmax(op, x, attrs, opset):
    check(op, {"x": x}, {}, attrs, opset=opset, oracle="ref" if opset >= 13 else "ort")


def test_softmax_refuses_an_axis_out_of_range():
    refuses(_graph("Softmax", [(2, 3)], {"axis": 2}), "axis 2 is out of range for rank 2")


# ---- normalization -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, axis, bias, outputs", [
    ((2, 7, 65), -1, True, 3), ((2, 7, 65), 1, True, 1), ((2, 7, 63), 0, False, 3), ((3, 65), -2, True, 2),
    ((1, 7), -1, False, 1), ((2, 3, 4, 5), 2, True, 3),
])
def test_layer_normalization(x, axis, bias, outputs):
    shape = x[axis:] if axis != -2 else x[-2:]
    params = {"scale": _w(*shape), **({"bias": _w(*shape)} if bias else {})}
    check("LayerNormalization", {"x": x}, params, {"axis": axis, "epsilon": 1e-4}, outputs=outputs, opset=17)


def test_layer_normalization_is_stable_for_large_means():
    x = (np.random.default_rng(3).standard_normal((4, 65)) + 1e4).astype(np.float32)  # spread 1, float32 ulp 1e-3
    graph = _graph("LayerNormalization", [x.shape], {}, {"scale": np.ones(65, np.float32)})
    (y,) = Session(graph).run({"x0": x}).values()
    exact = x.astype(np.float64) - x.mean(axis=-1, keepdims=True, dtype=np.float64)
    exact /= np.sqrt((exact ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, exact, atol=3e-3)  # E[x^2] - E[x]^2 in float32 would lose every digit


@pytest.mark.parametrize("skip, beta, bias, outputs", [
    ((2, 7, 65), True, True, 4), ((2, 7, 65), False, False, 1), ((7, 65), True, False, 3), ((1, 7, 65), False, True, 4),
])
def test_skip_layer_normalization(skip, beta, bias, outputs):
    params = {"gamma": (65,), "beta": (65,), "bias": (65,)}
    order = ["x", "skip", "gamma", "beta" if beta else "", "bias" if bias else ""]
    params = {k: v for k, v in params.items() if k in order}
    check(MS + "SkipLayerNormalization", {"x": (2, 7, 65), "skip": skip}, params, {"epsilon": 1e-5},
          outputs=outputs, order=order)


@pytest.mark.parametrize("op, feeds, params, order, attrs, outputs", [
    ("SimplifiedLayerNormalization", {"x": (2, 7, 65)}, {"scale": (65,)}, None, {}, 2),
    ("SimplifiedLayerNormalization", {"x": (2, 7, 65)}, {"scale": (7, 65)}, None, {"axis": 1, "epsilon": 1e-3}, 1),
    (MS + "SkipSimplifiedLayerNormalization", {"x": (2, 7, 65), "skip": (2, 7, 65)}, {"gamma": (65,), "b": (65,)},
     None, {"epsilon": 1e-5}, 1),
    (MS + "SkipSimplifiedLayerNormalization", {"x": (14, 65), "skip": (14, 65)}, {"gamma": (65,)},
     ["x", "skip", "gamma", ""], {}, 1),
])
def test_simplified_layer_normalization(op, feeds, params, order, attrs, outputs):
    check(op, feeds, params, attrs, outputs=outputs, order=order, oracle="ort")


def test_skip_simplified_layer_normalization_outputs():
    rng = np.random.default_rng(5)
    x, skip, gamma = (rng.standard_normal(s).astype(np.float32) for s in ((2, 7, 65), (2, 7, 65), (65,)))
    graph = Graph([Node(MS + "SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y", "", "inv", "sum"], {}, "n")],
                  {"x": TensorSpec(x.shape), "s": TensorSpec(skip.shape)}, ["y", "inv", "sum"], {"g": gamma})
    got = Session(graph).run({"x": x, "s": skip})
    h = x + skip
    inv = 1 / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(got["sum"], h)
    np.testing.assert_allclose(got["inv"], inv, rtol=1e-5)
    np.testing.assert_allclose(got["y"], h * inv * gamma, rtol=1e-5, atol=1e-5)
    graph.nodes[0].outputs[1] = "mean"
    with pytest.raises(ValueError, match="output mean is not defined"):
        Session(graph).run({"x": x, "s": skip})


@pytest.mark.parametrize("x", [(2, 3), (2, 3, 7), (1, 3, 4, 65)])
def test_batch_normalization_alone(x):
    params = {"scale": (3,), "b": (3,), "mean": (3,), "var": _positive(3)}
    check("BatchNormalization", {"x": x}, params, {"epsilon": 1e-3}, opset=15)


@pytest.mark.parametrize("outputs", [1, 3])
def test_batch_normalization_training_mode(outputs):
    params = {"scale": (3,), "b": (3,), "mean": (3,), "var": _positive(3)}
    check("BatchNormalization", {"x": (2, 3, 7, 5)}, params, {"training_mode": 1, "momentum": 0.8}, outputs=outputs,
          opset=15)


def test_batch_normalization_refuses_running_statistics_at_inference():
    params = {"s": np.ones(3), "b": np.zeros(3), "m": np.zeros(3), "v": np.ones(3)}
    refuses(_graph("BatchNormalization", [(2, 3, 5)], {}, params, outputs=3), "need training_mode=1")
    refuses(_graph("BatchNormalization", [(2, 3, 5)], {"training_mode": 1}, params, outputs=3, opset=13),
            "opset >= 14")


def test_batch_normalization_of_computed_statistics():
    check("BatchNormalization", {"x": (2, 3, 5), "scale": (3,), "b": (3,), "mean": (3,), "var": _positive(3)},
          opset=15)


# ---- matrix products -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("feeds, params", [
    ({"a": (2, 1, 7, 5), "b": (3, 5, 4)}, {}), ({"a": (7,), "b": (7,)}, {}), ({"a": (7,), "b": (2, 7, 3)}, {}),
    ({"a": (2, 3, 7, 5), "b": (5,)}, {}), ({"a": (2, 7, 65)}, {"b": (65, 63)}), ({"a": (65,)}, {"b": (65, 7)}),
    ({"b": (2, 5, 3)}, {"a": (7, 5)}),
    ({"a": np.arange(12, dtype=np.int32).reshape(3, 4), "b": np.arange(8, dtype=np.int32).reshape(4, 2)}, {}),
])
def test_matmul(feeds, params):
    check("MatMul", feeds, params, order=["a", "b"])


@pytest.mark.parametrize("a, b, attrs", [
    ((2, 3, 7, 5), (2, 3, 5, 4), {"alpha": 0.5}), ((2, 3, 5, 7), (2, 3, 4, 5), {"transA": 1, "transB": 1}),
    ((2, 3, 7, 5), (5, 2, 3, 4), {"transBatchB": 1}), ((7, 3, 5), (3, 5, 4), {"transBatchA": 1, "alpha": 2.0}),
    ((5, 3, 4, 2), (2, 3, 4, 5), {"transA": 1, "transBatchA": 1, "transB": 1, "transBatchB": 1}),
    ((2, 7, 65), ("const", _w(63, 65)), {"transB": 1, "alpha": 0.25}), ((7, 5), ("const", _w(4, 5)), {"transB": 1}),
    ((2, 3, 5, 7), ("const", _w(2, 3, 4, 5)), {"transA": 1, "transB": 1, "alpha": 3.0}),
])
def test_fused_matmul(a, b, attrs):
    check(MS + "FusedMatMul", *_split(a=a, b=b), attrs, order=["a", "b"])


@pytest.mark.parametrize("feeds, params, attrs", [
    ({"a": (7, 5), "b": (5, 4)}, {}, {}), ({"a": (5, 7), "b": (4, 5)}, {"c": (7, 1)}, {"transA": 1, "transB": 1}),
    ({"a": (7, 5)}, {"b": (5, 4), "c": (1,)}, {"beta": 0.5, "alpha": 2.0}),
    ({"a": (7, 5), "c": (7, 4)}, {"b": (4, 5)}, {"transB": 1, "beta": 2.0}),
    ({"a": (7, 5), "b": (5, 4), "c": (4,)}, {}, {}),
])
def test_gemm(feeds, params, attrs):
    order = ["a", "b", "c"] if "c" in feeds or "c" in params else ["a", "b"]
    check("Gemm", feeds, params, attrs, order=order)


def test_gemm_refuses_bad_shapes():
    refuses(_graph("Gemm", [(7, 5), (4, 5)], {}), "do not multiply")
    refuses(_graph("Gemm", [(7, 5), (5, 4), (3,)], {}), "do not broadcast")
    refuses(_graph("Gemm", [(7, 5, 1), (5, 4)], {}), "must be 2-D")


# ---- layout --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, shape, allowzero, opset", [
    ((2, 3, 4), [0, -1], 0, 13), ((2, 3, 4), [4, 0, 2], 0, 14), ((0, 3), [3, 0], 1, 14), ((2, 3, 4), [-1], 0, 21),
])
def test_reshape(x, shape, allowzero, opset):
    attrs = {"allowzero": allowzero} if opset >= 14 else {}
    check("Reshape", {"x": np.zeros(x, np.float32) + 1}, {"shape": np.array(shape, np.int64)}, attrs, opset=opset)


def test_reshape_refuses_bad_shapes():
    refuses(_graph("Reshape", [(2, 3)], {}, {"s": np.array([-1, -1])}), "one -1 at most")
    refuses(_graph("Reshape", [(2, 3)], {}, {"s": np.array([4, -1])}), "cannot reshape")
    refuses(_graph("Reshape", [(2, 3)], {"allowzero": 1}, {"s": np.array([0, -1])}), "not with a 0")


@pytest.mark.parametrize("axis", [0, 1, 3, -1, -3])
def test_flatten(axis):
    check("Flatten", {"x": (2, 3, 4)}, {}, {"axis": axis})


def test_concat_transpose_identity_dropout():
    check("Concat", {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.arange(4, dtype=np.int64).reshape(2, 2)},
          {}, {"axis": -1})
    check("Concat", {"a": (2, 3, 7), "b": (1, 3, 7)}, {"c": (3, 3, 7)}, {"axis": 0})
    check("Transpose", {"x": (2, 3, 65)}, {}, {"perm": [2, 0, 1]})
    check("Transpose", {"x": (2, 3, 7)}, {})
    check("Identity", {"x": (3, 7)})
    check("Dropout", {"x": (3, 7)}, {"ratio": np.array(0.5, np.float32)}, outputs=2, opset=13)
    check("Dropout", {"x": (3, 7)}, {}, {"ratio": 0.3}, opset=10)
    refuses(_graph("Dropout", [(3, 7)], {}, {"r": np.float32(0.5), "t": np.array(True)}), "training_mode")
    graph = _graph("Concat", [(2, 3), (2, 3)], {"axis": 0})
    graph.inputs["x1"] = TensorSpec((2, 3), "int64")
    refuses(graph, "one dtype", TypeError)
    refuses(_graph("Concat", [(2, 3), (2, 4)], {"axis": 0}), "differ outside axis 0")
    refuses(_graph("Transpose", [(2, 3)], {"perm": [0, 0]}), "not a permutation")
