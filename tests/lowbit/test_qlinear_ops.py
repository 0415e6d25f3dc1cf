"""The quantized ONNX ops (``lowbit.runtime.quant_ops`` Q/DQ and QLinearConv, ``lowbit.runtime.qlinear_ops``) on
one-node models: bit for bit against ``onnx.reference.ReferenceEvaluator`` (the ONNX spec) where it implements the
op, within one code of ONNX Runtime where it rounds in float32 (the com.microsoft ops), through
``lowbit.onnx.load`` and ``lowbit.Session(graph, fallback=False)``."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ml_dtypes = pytest.importorskip("ml_dtypes")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import lowbit.onnx as lowbit_onnx  # noqa: E402
from kernels.reference.int4 import gemm_int4_ref  # noqa: E402
from lowbit import Session  # noqa: E402
from lowbit.runtime.registry import prepare  # noqa: E402
from tests.levels import ORT_SATURATES_U8S8  # noqa: E402

MS = "com.microsoft"
U8, I8 = np.uint8, np.int8


# ----------------------------------------------------------------------------- one-node models and their runners

def elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def one_node(op: str, inputs: dict, outputs: dict, attrs: dict | None = None, *, constant=(), domain: str = "",
             opset: int = 21):
    """A one-node model and its feeds. ``inputs``: name -> array in the node's input order (None: an absent
    input); those named in ``constant`` are initializers, the rest graph inputs. ``outputs``: name -> dtype."""
    node = helper.make_node(op, [n if v is not None else "" for n, v in inputs.items()], list(outputs),
                            domain=domain, **(attrs or {}))
    present = {n: v for n, v in inputs.items() if v is not None}
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in present.items() if n in constant]
    graph_inputs = [helper.make_tensor_value_info(n, elem(v.dtype), v.shape)
                    for n, v in present.items() if n not in constant]
    graph_outputs = [helper.make_tensor_value_info(n, elem(t), None) for n, t in outputs.items()]
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "one", graph_inputs, graph_outputs, inits),
                              opset_imports=opsets)
    model.ir_version = 10
    return model, {n: v for n, v in present.items() if n not in constant}


def run_lowbit(model, feeds) -> list[np.ndarray]:
    graph = lowbit_onnx.load(model, optimize=False)
    got = Session(graph, fallback=False).run(feeds)
    return [got[name] for name in graph.outputs]


def run_reference(model, feeds) -> list[np.ndarray]:
    return [_codes(y) for y in ReferenceEvaluator(model).run(None, feeds)]


def _uint8_by_int8(model, feeds) -> bool:
    """Whether ``model`` multiplies uint8 codes (given, or quantized by DynamicQuantizeMatMul) by int8 ones."""
    dtypes = {np.dtype(v.dtype) for v in feeds.values()}
    dtypes |= {np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)) for t in model.graph.initializer}
    dynamic = any(node.op_type == "DynamicQuantizeMatMul" for node in model.graph.node)
    return np.dtype(I8) in dtypes and (np.dtype(U8) in dtypes or dynamic)


def run_ort(model, feeds) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    if ORT_SATURATES_U8S8 and _uint8_by_int8(model, feeds):  # the checks against the reference ran before
        pytest.skip("ONNX Runtime's uint8 x int8 product saturates int16 pairs on CPUs without VNNI")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _codes(a: np.ndarray) -> np.ndarray:
    """ml_dtypes' 4-bit arrays as int8 / uint8, as lowbit holds them."""
    a = np.asarray(a)
    if a.dtype.name in ("int4", "uint4"):
        return a.astype(I8 if a.dtype.name == "int4" else U8)
    return a


def assert_exact(model, feeds) -> list[np.ndarray]:
    got, want = run_lowbit(model, feeds), run_reference(model, feeds)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w)
    return got


def differing_codes(got: np.ndarray, want: np.ndarray) -> int:
    """How many codes differ (each by at most one, or the assertion fails)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max(initial=0) <= 1, f"codes differ by up to {diff.max()}"
    return int(np.count_nonzero(diff))


def assert_near_ort(model, feeds, *, share: float = 0.05) -> list[np.ndarray]:
    """lowbit's codes within one of ONNX Runtime's, and differing for at most ``share`` of them."""
    got, want = run_lowbit(model, feeds), run_ort(model, feeds)
    for g, w in zip(got, want):
        assert differing_codes(g, w) <= share * g.size
    return got


def codes(rng, dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def scalar(value, dtype=np.float32) -> np.ndarray:
    return np.asarray(value, dtype)


# ----------------------------------------------------------------------------- QuantizeLinear / DequantizeLinear

@pytest.mark.parametrize("code", ["uint8", "int8", "uint4", "int4"])
@pytest.mark.parametrize("layout", ["tensor", "axis", "blocked"])
@pytest.mark.parametrize("x_dtype, scale_dtype", [(np.float32, np.float32), (np.float32, np.float16),
                                                   (np.float16, np.float16)])
def test_quantize_linear_matches_reference(rng, code, layout, x_dtype, scale_dtype):
    x = rng.normal(0, 4, (2, 7, 65)).astype(x_dtype)
    x.flat[:4] = [0.5, 1.5, -2.5, 3e3]  # ties go to even; saturation (finite in float16, and within int32)
    dtype = getattr(ml_dtypes, code) if code.endswith("4") else np.dtype(code)
    lo, hi = (-8, 7) if code == "int4" else (0, 15) if code == "uint4" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    shape, attrs = {"tensor": ((), {}), "axis": ((7,), {"axis": 1}),
                    "blocked": ((2, 7, 3), {"axis": -1, "block_size": 32})}[layout]
    scale = rng.uniform(0.05, 0.5, shape).astype(scale_dtype)
    zero = rng.integers(lo, hi + 1, shape).astype(dtype)
    model, feeds = one_node("QuantizeLinear", {"x": x, "s": scale, "z": zero}, {"y": U8}, attrs,
                            constant=("s", "z"))
    model.graph.output[0].type.tensor_type.elem_type = elem(dtype)
    assert_exact(model, feeds)


@pytest.mark.parametrize("x_dtype", [U8, I8, np.int32])
@pytest.mark.parametrize("layout", ["tensor", "axis", "blocked"])
def test_dequantize_linear_matches_reference(rng, x_dtype, layout):
    q = codes(rng, x_dtype, (3, 63)) if x_dtype != np.int32 else rng.integers(-2**30, 2**30, (3, 63), np.int32)
    shape, attrs = {"tensor": ((1,), {}), "axis": ((63,), {"axis": -1}),
                    "blocked": ((1, 63), {"axis": 0, "block_size": 4})}[layout]
    scale = rng.uniform(0.001, 0.1, shape).astype(np.float32)
    zero = codes(rng, x_dtype, shape) if x_dtype != np.int32 else np.zeros(shape, np.int32)
    model, feeds = one_node("DequantizeLinear", {"q": q, "s": scale, "z": zero}, {"y": np.float32}, attrs,
                            constant=("s", "z"))
    assert_exact(model, feeds)


def test_dequantize_linear_int4_float16_and_output_dtype(rng):
    q = rng.integers(-8, 8, (7, 6)).astype(I8)  # int4 codes, fed one per int8 as lowbit holds them
    zero = rng.integers(-8, 8, (7,)).astype(ml_dtypes.int4)
    scale = rng.uniform(0.01, 1, (7,)).astype(np.float16)
    for opset, attrs, out in ((21, {}, np.float16), (23, {"output_dtype": TensorProto.FLOAT}, np.float32)):
        model, _ = one_node("DequantizeLinear", {"q": q, "s": scale, "z": zero}, {"y": out}, {"axis": 0, **attrs},
                            constant=("s", "z"), opset=opset)
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT4
        got = run_lowbit(model, {"q": q})[0]
        want = ReferenceEvaluator(model).run(None, {"q": q.astype(ml_dtypes.int4)})[0]
        assert got.dtype == want.dtype == out
        np.testing.assert_array_equal(got, want)


def test_quantize_linear_output_dtype_without_zero_point(rng):
    x = rng.normal(0, 10, (5, 7)).astype(np.float32)
    model, feeds = one_node("QuantizeLinear", {"x": x, "s": scalar(0.7)}, {"y": I8},
                            {"output_dtype": TensorProto.INT4}, constant=("s",))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT4
    got = assert_exact(model, feeds)[0]
    assert got.dtype == I8 and got.min() == -8 and got.max() == 7
    model, feeds = one_node("QuantizeLinear", {"x": x, "s": scalar(0.7)}, {"y": U8}, constant=("s",))
    assert assert_exact(model, feeds)[0].dtype == U8  # no zero point: uint8


def test_quantize_and_dequantize_with_scales_computed_at_run_time(rng):
    x = rng.normal(0, 3, (4, 7)).astype(np.float32)
    for layout in ({}, {"axis": 1}):
        shape = (7,) if layout else ()
        scale, zero = rng.uniform(0.01, 0.2, shape).astype(np.float32), codes(rng, I8, shape)
        model, feeds = one_node("QuantizeLinear", {"x": x, "s": scale, "z": zero}, {"y": I8}, layout)
        q = assert_exact(model, feeds)[0]
        model, feeds = one_node("DequantizeLinear", {"q": q, "s": scale, "z": zero}, {"y": np.float32}, layout)
        assert_exact(model, feeds)


@pytest.mark.parametrize("dtype", [U8, I8])
def test_quantize_dequantize_per_axis_match_onnxruntime(rng, dtype):
    x = rng.normal(0, 3, (2, 7, 5)).astype(np.float32)
    scale, zero = rng.uniform(0.01, 0.2, 7).astype(np.float32), codes(rng, dtype, 7)
    model, feeds = one_node("QuantizeLinear", {"x": x, "s": scale, "z": zero}, {"y": dtype}, {"axis": 1},
                            constant=("s", "z"))
    q = run_lowbit(model, feeds)[0]
    np.testing.assert_array_equal(q, run_ort(model, feeds)[0])
    model, feeds = one_node("DequantizeLinear", {"q": q, "s": scale, "z": zero}, {"y": np.float32}, {"axis": 1},
                            constant=("s", "z"))
    np.testing.assert_array_equal(run_lowbit(model, feeds)[0], run_ort(model, feeds)[0])


def test_dynamic_quantize_linear(rng):
    for x in (rng.normal(0, 2, (7, 65)).astype(np.float32), np.full((1, 3), 2.5, np.float32)):
        model, feeds = one_node("DynamicQuantizeLinear", {"x": x}, {"y": U8, "s": np.float32, "z": U8}, opset=11)
        got = assert_exact(model, feeds)
        for g, w in zip(got, run_ort(model, feeds)):
            np.testing.assert_array_equal(g, w)


def test_quantize_dequantize_errors(rng):
    x = rng.normal(size=(2, 3)).astype(np.float32)
    cases = [
        ({"x": x, "s": np.ones(4, np.float32)}, {}, "the scale must be one value .* or of shape \\[3\\]"),
        ({"x": x, "s": np.ones(3, np.float32), "z": np.zeros(2, U8)}, {}, "zero point must have the scale's shape"),
        ({"x": x, "s": np.ones((2, 1), np.float32)}, {"block_size": 2}, "of shape \\[2, 2\\]"),
        ({"x": x, "s": scalar(1.0)}, {"output_dtype": TensorProto.INT16}, "output type int16 is not supported"),
        ({"x": x, "s": scalar(1.0), "z": np.zeros((), np.int16)}, {}, "int16 is not supported"),
        ({"x": x.astype(np.float64), "s": scalar(1.0)}, {}, "input x must be float32 or float16, got float64"),
        ({"x": x, "s": scalar(-1.0)}, {}, "scales must be positive"),
    ]
    for inputs, attrs, message in cases:
        model, _ = one_node("QuantizeLinear", inputs, {"y": U8}, attrs, constant=tuple(inputs)[1:])
        with pytest.raises(ValueError, match=message):
            run_lowbit(model, {"x": inputs["x"]})


# ----------------------------------------------------------------------------- QLinearMatMul / MatMulInteger

def _qmatmul_inputs(rng, a_dtype, b_dtype, a_shape, b_shape, per_column, scale_dtype=np.float32):
    n = b_shape[-1]
    return {"a": codes(rng, a_dtype, a_shape), "sa": scalar(0.02, scale_dtype), "za": codes(rng, a_dtype, ()),
            "b": codes(rng, b_dtype, b_shape),
            "sb": rng.uniform(0.001, 0.01, n if per_column else ()).astype(scale_dtype),
            "zb": codes(rng, b_dtype, n if per_column else ()),
            "sy": scalar(0.05 if a_shape[-1] < 30 else 0.5, scale_dtype), "zy": codes(rng, a_dtype, ())}


@pytest.mark.parametrize("a_dtype, b_dtype", [(U8, I8), (U8, U8), (I8, I8)])
@pytest.mark.parametrize("a_shape, b_shape", [((1, 7), (7, 63)), ((2, 3, 65), (65, 7)), ((63,), (63, 1)),
                                              ((2, 1, 4, 7), (3, 7, 5))])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("b_constant", [True, False])
def test_qlinear_matmul_matches_reference(rng, a_dtype, b_dtype, a_shape, b_shape, per_column, b_constant):
    inputs = _qmatmul_inputs(rng, a_dtype, b_dtype, a_shape, b_shape, per_column)
    constant = ("sa", "za", "sb", "zb", "sy", "zy") + (("b",) if b_constant else ())
    model, feeds = one_node("QLinearMatMul", inputs, {"y": a_dtype}, constant=constant)
    assert_exact(model, feeds)


def test_qlinear_matmul_float16_scales_and_onnxruntime(rng):
    inputs = _qmatmul_inputs(rng, U8, I8, (2, 7, 65), (65, 63), True, np.float16)
    model, feeds = one_node("QLinearMatMul", inputs, {"y": U8}, constant=("b", "sa", "za", "sb", "zb", "sy", "zy"))
    assert_exact(model, feeds)
    inputs = _qmatmul_inputs(rng, U8, I8, (2, 7, 65), (65, 63), False)
    # ONNX Runtime's uint8 x int8 product on CPUs without VNNI (vpmaddubsw) saturates each pair of products at
    # int16: weights in [-64, 63] keep 2 * 255 * 64 inside it, so its results are exact there too
    inputs["b"] //= 2
    model, feeds = one_node("QLinearMatMul", inputs, {"y": U8}, constant=("b", "sa", "za", "sb", "zb", "sy", "zy"),
                            opset=10)
    assert_near_ort(model, feeds)


def test_qlinear_matmul_errors(rng):
    inputs = _qmatmul_inputs(rng, U8, I8, (2, 7), (7, 5), False)
    for change, message in ((("sa", np.ones(2, np.float32)), "a's scale must be per tensor"),
                            (("zb", np.zeros(5, U8)), "b's zero point must be int8, got uint8"),
                            (("b", np.zeros((6, 5), I8)), "do not multiply"),
                            (("a", np.zeros((2, 7), np.float32)), "input 0 \\(A\\) must be uint8 or int8")):
        bad = {**inputs, change[0]: change[1]}
        model, feeds = one_node("QLinearMatMul", bad, {"y": U8}, constant=("b", "sa", "za", "sb", "zb", "sy", "zy"))
        with pytest.raises(ValueError, match=message):
            run_lowbit(model, feeds)


@pytest.mark.parametrize("a_dtype, b_dtype", [(U8, I8), (U8, U8), (I8, I8), (I8, U8)])
@pytest.mark.parametrize("a_shape, b_shape", [((7, 65), (65, 63)), ((2, 1, 63), (63, 7)), ((3, 7), (2, 7, 1))])
@pytest.mark.parametrize("b_constant", [True, False])
def test_matmul_integer_matches_reference(rng, a_dtype, b_dtype, a_shape, b_shape, b_constant):
    n = b_shape[-1]
    inputs = {"a": codes(rng, a_dtype, a_shape), "b": codes(rng, b_dtype, b_shape), "za": codes(rng, a_dtype, ()),
              "zb": codes(rng, b_dtype, n if len(b_shape) == 2 else ())}
    model, feeds = one_node("MatMulInteger", inputs, {"y": np.int32}, constant=("za", "zb") + ("b",) * b_constant,
                            opset=10)
    got = assert_exact(model, feeds)[0]
    if inputs["zb"].ndim == 0 and a_dtype == U8:  # ONNX Runtime: uint8 A, per-tensor zero points
        np.testing.assert_array_equal(got, run_ort(model, feeds)[0])


# ----------------------------------------------------------------------------- QLinearConv / ConvInteger

CONVS = {
    "1d": ((2, 4, 65), (6, 4, 3), {"pads": [1, 2], "strides": [2]}),
    "2d": ((1, 4, 7, 9), (6, 2, 3, 3), {"pads": [1, 0, 1, 1], "strides": [2, 1], "dilations": [1, 2], "group": 2}),
    "2d-same": ((1, 3, 7, 7), (5, 3, 3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}),
    "3d": ((1, 2, 5, 6, 7), (3, 2, 2, 3, 3), {"pads": [0, 1, 1, 1, 0, 1], "strides": [1, 2, 1]}),
}


def by_channel(op: str, inputs: dict, per_channel: tuple, out_dtype, attrs: dict) -> np.ndarray:
    """ONNX's reference evaluator takes per-channel parameters of 2-D convolutions only: the same result one
    output channel at a time (group 1), each channel's parameters per tensor."""
    parts = []
    for o in range(inputs["w"].shape[0]):
        one = {n: v[o:o + 1] if n == "w" else v[o] if n in per_channel else v for n, v in inputs.items()}
        model, feeds = one_node(op, one, {"y": out_dtype}, attrs, constant=tuple(one)[1:], opset=10)
        parts.append(run_reference(model, feeds)[0])
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("x_dtype, w_dtype", [(U8, I8), (I8, I8), (U8, U8)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_conv_matches_reference(rng, conv, x_dtype, w_dtype, per_channel):
    x_shape, w_shape, attrs = CONVS[conv]
    o = w_shape[0]
    k = int(np.prod(w_shape[1:]))
    inputs = {"x": codes(rng, x_dtype, x_shape), "sx": scalar(0.05), "zx": codes(rng, x_dtype, ()),
              "w": codes(rng, w_dtype, w_shape), "sw": rng.uniform(0.002, 0.01, o if per_channel else ()).astype(
                  np.float32), "zw": codes(rng, w_dtype, o if per_channel else ()),
              "sy": scalar(0.02 * k), "zy": codes(rng, x_dtype, ()), "bias": rng.integers(-500, 500, o, np.int32)}
    if w_dtype == I8 and not per_channel:
        inputs["zw"] = np.zeros_like(inputs["zw"])  # ONNX Runtime takes int8 weights with a zero point of 0 only
    model, feeds = one_node("QLinearConv", inputs, {"y": x_dtype}, attrs, constant=tuple(inputs)[1:], opset=10)
    if per_channel and conv in ("1d", "3d"):
        got = run_lowbit(model, feeds)[0]
        np.testing.assert_array_equal(got, by_channel("QLinearConv", inputs, ("sw", "zw", "bias"), x_dtype, attrs))
    else:
        got = assert_exact(model, feeds)[0]
    if not per_channel:  # ONNX Runtime takes weight zero points per tensor (and 0 for int8 weights) only
        assert differing_codes(got, run_ort(model, feeds)[0]) <= 0.05 * got.size


def prepared(model, feeds):
    """The kernel of a one-node model's node, and its inputs (parameters and feeds) in the node's order."""
    graph = lowbit_onnx.load(model, optimize=False)
    node = graph.nodes[0]
    values = {**graph.params, **feeds}
    ins = [values[t] if t else None for t in node.inputs]
    kernel = prepare(node, graph, [None if x is None else (x.shape, x.dtype) for x in ins])
    return kernel, ins


def call(kernel, ins) -> np.ndarray:
    return kernel(ins, [np.empty(shape, dtype) for shape, dtype in kernel.outputs])[0]


@pytest.mark.parametrize("conv", ["1d", "2d"])
def test_qlinear_conv_float_fallback(rng, conv):
    x_shape, w_shape, attrs = CONVS[conv]
    inputs = {"x": codes(rng, U8, x_shape), "sx": scalar(0.05), "zx": codes(rng, U8, ()),
              "w": codes(rng, I8, w_shape), "sw": rng.uniform(0.002, 0.01, w_shape[0]).astype(np.float32),
              "zw": np.zeros(w_shape[0], I8), "sy": scalar(0.3), "zy": codes(rng, U8, ())}
    model, feeds = one_node("QLinearConv", inputs, {"y": U8}, attrs, constant=tuple(inputs)[1:], opset=10)
    kernel, ins = prepared(model, feeds)
    assert kernel.note.startswith("qlinear_conv2d") and kernel.fallback.outputs == kernel.outputs
    got = call(kernel, ins)
    np.testing.assert_array_equal(got, run_lowbit(model, feeds)[0])
    assert differing_codes(call(kernel.fallback, ins), got) <= 0.05 * got.size


def test_qlinear_conv_weights_computed_at_run_time(rng):
    inputs = {"x": codes(rng, U8, (1, 4, 7, 9)), "sx": scalar(0.05), "zx": codes(rng, U8, ()),
              "w": codes(rng, I8, (6, 2, 3, 3)), "sw": rng.uniform(0.002, 0.01, 6).astype(np.float32),
              "zw": np.zeros(6, I8), "sy": scalar(0.3), "zy": codes(rng, U8, ())}
    model, feeds = one_node("QLinearConv", inputs, {"y": U8}, {"group": 2, "pads": [1, 1, 1, 1]},
                            constant=("sx", "zx", "zw", "sy", "zy"), opset=10)
    assert_exact(model, feeds)


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("x_dtype, w_dtype", [(U8, I8), (I8, I8), (U8, U8)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_integer_matches_reference(rng, conv, x_dtype, w_dtype, per_channel):
    x_shape, w_shape, attrs = CONVS[conv]
    inputs = {"x": codes(rng, x_dtype, x_shape), "w": codes(rng, w_dtype, w_shape), "zx": codes(rng, x_dtype, ()),
              "zw": codes(rng, w_dtype, w_shape[0] if per_channel else ())}
    model, feeds = one_node("ConvInteger", inputs, {"y": np.int32}, attrs, constant=("w", "zx", "zw"), opset=10)
    if per_channel and conv in ("1d", "3d"):
        got = run_lowbit(model, feeds)[0]
        np.testing.assert_array_equal(got, by_channel("ConvInteger", inputs, ("zw",), np.int32, attrs))
    else:
        got = assert_exact(model, feeds)[0]
    if x_dtype == U8 and not per_channel:
        np.testing.assert_array_equal(got, run_ort(model, feeds)[0])


def test_conv_errors(rng):
    x = codes(rng, U8, (1, 4, 5, 5))
    base = {"x": x, "sx": scalar(0.1), "zx": np.uint8(0), "w": codes(rng, I8, (6, 4, 3, 3)), "sw": scalar(0.1),
            "zw": np.int8(0), "sy": scalar(0.1), "zy": np.uint8(0)}
    for change, attrs, message in ((("w", codes(rng, I8, (6, 3, 3, 3))), {}, "input channels 4, weights"),
                                   (("zw", np.uint8(0)), {}, "the weights' zero point must be int8"),
                                   (("zx", np.zeros(4, U8)), {}, "x's zero point must be per tensor"),
                                   ((), {"auto_pad": "SAME"}, "auto_pad must be one of"),
                                   ((), {"kernel_shape": [2, 2]}, "kernel_shape \\[2, 2\\] does not match")):
        inputs = {**base, **dict([change])} if change else base
        model, feeds = one_node("QLinearConv", inputs, {"y": U8}, attrs, constant=tuple(base)[1:], opset=10)
        with pytest.raises(ValueError, match=message):
            run_lowbit(model, feeds)


# ----------------------------------------------------------------------------- com.microsoft: elementwise

def _dq_op_q(inner: str, a, b, scales, attrs=None):
    """The ONNX rule the com.microsoft op follows, as a DQ -> op -> Q model of default-domain ops."""
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["ra"])]
    names = ["ra"]
    if b is not None:
        nodes.append(helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["rb"]))
        names.append("rb")
    nodes += [helper.make_node(inner, names, ["rc"], **(attrs or {})),
              helper.make_node("QuantizeLinear", ["rc", "sc", "zc"], ["c"])]
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in scales.items()]
    inputs = [helper.make_tensor_value_info("a", elem(a.dtype), a.shape)]
    if b is not None:
        inputs.append(helper.make_tensor_value_info("b", elem(b.dtype), b.shape))
    graph = helper.make_graph(nodes, "rule", inputs, [helper.make_tensor_value_info("c", elem(a.dtype), None)],
                              inits)
    feeds = {"a": a} if b is None else {"a": a, "b": b}
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).run(None, feeds)[0]


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("shapes", [((2, 7, 65), (2, 7, 65)), ((7, 63), (63,)), ((1, 7, 1), (3, 1, 5)), ((1,), (1,))])
def test_qlinear_add_mul(rng, op, dtype, shapes):
    a, b = codes(rng, dtype, shapes[0]), codes(rng, dtype, shapes[1])
    # scales without round ratios: with 0.03, 0.07 and 0.1, one sum in ten would be an exact tie, which ONNX
    # Runtime's float32 formula rounds either way
    scales = {"sa": scalar(0.0312), "za": codes(rng, dtype, ()), "sb": scalar(0.0718), "zb": codes(rng, dtype, ()),
              "sc": scalar(0.1043 if op == "QLinearAdd" else 0.5127), "zc": codes(rng, dtype, ())}
    inputs = {"a": a, "sa": scales["sa"], "za": scales["za"], "b": b, "sb": scales["sb"], "zb": scales["zb"],
              "sc": scales["sc"], "zc": scales["zc"]}
    model, feeds = one_node(op, inputs, {"c": dtype}, constant=tuple(scales), domain=MS)
    got = assert_near_ort(model, feeds)[0]
    np.testing.assert_array_equal(got, _dq_op_q(op[len("QLinear"):], a, b, scales))


@pytest.mark.parametrize("op, attrs", [("QLinearSigmoid", {}), ("QLinearLeakyRelu", {"alpha": 0.1})])
@pytest.mark.parametrize("dtype", [U8, I8])
def test_qlinear_lookup_ops(rng, op, attrs, dtype):
    info = np.iinfo(dtype)
    x = np.arange(info.min, info.max + 1).astype(dtype).reshape(4, 64)  # every code
    sigmoid = op == "QLinearSigmoid"
    scales = {"sa": scalar(0.05), "za": codes(rng, dtype, ()), "sc": scalar(1 / 256 if sigmoid else 0.04),
              "zc": np.asarray(info.min if sigmoid else 0, dtype)}
    model, feeds = one_node(op, {"x": x, **scales}, {"y": dtype}, attrs, constant=tuple(scales), domain=MS)
    got = assert_near_ort(model, feeds)[0]
    rule = _dq_op_q(op[len("QLinear"):], x, None, scales, attrs)
    if op == "QLinearLeakyRelu":
        np.testing.assert_array_equal(got, rule)
    else:  # lowbit's sigmoid rounds once from float64; ONNX's reference computes it in float32
        assert differing_codes(got, rule) <= 2
    model, feeds = one_node(op, {"x": x, **scales}, {"y": dtype}, attrs, domain=MS)  # scales computed at run time
    np.testing.assert_array_equal(run_lowbit(model, feeds)[0], got)


@pytest.mark.parametrize("dtype", [U8, I8])
def test_qlinear_concat(rng, dtype):
    xs = [codes(rng, dtype, (2, n, 5)) for n in (1, 7, 3)]
    inputs = {"sy": scalar(0.1), "zy": codes(rng, dtype, ())}
    for i, (x, s) in enumerate(zip(xs, (0.05, 0.1, 0.3))):
        z = inputs["zy"] if s == 0.1 else codes(rng, dtype, ())  # the second input is already in Y's quantization
        inputs.update({f"x{i}": x, f"s{i}": scalar(s), f"z{i}": z})
    constant = [n for n in inputs if not n.startswith("x")]
    model, feeds = one_node("QLinearConcat", inputs, {"y": dtype}, {"axis": -2}, constant=constant, domain=MS)
    got = assert_near_ort(model, feeds, share=0)[0]
    rule = [_dq_op_q("Identity", x, None, {"sa": inputs[f"s{i}"], "za": inputs[f"z{i}"], "sc": inputs["sy"],
                                          "zc": inputs["zy"]}) for i, x in enumerate(xs)]
    np.testing.assert_array_equal(got, np.concatenate(rule, axis=1))
    model, feeds = one_node("QLinearConcat", {k: inputs[k] for k in list(inputs)[:4]}, {"y": dtype}, {"axis": 1},
                            domain=MS)
    with pytest.raises(ValueError, match="triples"):
        run_lowbit(model, feeds)


# ----------------------------------------------------------------------------- com.microsoft: pooling

def _pool_scales(rng, dtype):
    return {"sx": scalar(0.05), "zx": codes(rng, dtype, ()), "sy": scalar(0.03), "zy": codes(rng, dtype, ())}


def _avg_rule(x, s, kernel, attrs):
    """kernels.avg_pool2d's rule in NumPy over NC* ``x``: exact window sums of ``x - zx``, rescaled in float64."""
    nd = len(kernel)
    pads = attrs.get("pads", [0] * 2 * nd)
    strides = attrs.get("strides", [1] * nd)
    values = np.pad(x.astype(np.int64) - s["zx"], [(0, 0), (0, 0)] + list(zip(pads[:nd], pads[nd:])))
    inside = np.pad(np.ones(x.shape[2:], np.int64), list(zip(pads[:nd], pads[nd:])))
    counted = np.ones_like(inside) if attrs.get("count_include_pad") else inside
    out = [(values.shape[2 + a] - kernel[a]) // strides[a] + 1 for a in range(nd)]
    y = np.empty(x.shape[:2] + tuple(out), np.float64)
    for index in np.ndindex(*out):
        window = tuple(slice(i * s_, i * s_ + k) for i, s_, k in zip(index, strides, kernel))
        total = values[(Ellipsis, *window)].sum(axis=tuple(range(2, 2 + nd)))
        y[(Ellipsis, *index)] = total * (float(s["sx"]) / (float(s["sy"]) * counted[window].sum()))
    info = np.iinfo(x.dtype)
    return np.clip(np.rint(y + s["zy"]), info.min, info.max).astype(x.dtype)


@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("x_shape, kernel, attrs", [
    ((2, 3, 65), [3], {"pads": [1, 1], "strides": [2]}),
    ((1, 7, 9, 8), [3, 2], {"pads": [1, 0, 1, 1], "strides": [2, 2], "count_include_pad": 1}),
    ((1, 2, 5, 6, 7), [2, 3, 2], {"pads": [1, 1, 0, 0, 1, 1], "strides": [1, 2, 2]}),
])
@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_average_pool(rng, dtype, x_shape, kernel, attrs, channels_last):
    x = codes(rng, dtype, x_shape)
    s = _pool_scales(rng, dtype)
    want = _avg_rule(x, s, kernel, attrs)
    fed = np.moveaxis(x, 1, -1).copy() if channels_last else x
    model, feeds = one_node("QLinearAveragePool", {"x": fed, **s}, {"y": dtype},
                            {"kernel_shape": kernel, "channels_last": channels_last, **attrs}, constant=tuple(s),
                            domain=MS)
    got = run_lowbit(model, feeds)[0]
    np.testing.assert_array_equal(np.moveaxis(got, -1, 1) if channels_last else got, want)
    if len(kernel) < 3 or not channels_last:  # ONNX Runtime: no 3-D channels_last pool
        assert differing_codes(got, run_ort(model, feeds)[0]) <= 0.05 * got.size
    model, feeds = one_node("QLinearAveragePool", {"x": fed, **s}, {"y": dtype},  # scales computed at run time
                            {"kernel_shape": kernel, "channels_last": channels_last, **attrs}, domain=MS)
    np.testing.assert_array_equal(run_lowbit(model, feeds)[0], got)


def test_qlinear_average_pool_ceil_mode_and_errors(rng):
    x = codes(rng, U8, (1, 3, 7, 7))
    s = _pool_scales(rng, U8)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [0, 0, 1, 1]}
    model, feeds = one_node("QLinearAveragePool", {"x": x, **s}, {"y": U8}, attrs, constant=tuple(s), domain=MS)
    got = run_lowbit(model, feeds)[0]
    assert got.shape == (1, 3, 4, 4)
    assert differing_codes(got, run_ort(model, feeds)[0]) <= 0.05 * got.size
    model, feeds = one_node("QLinearAveragePool", {"x": x, **s}, {"y": U8}, {"kernel_shape": [3]}, constant=tuple(s),
                            domain=MS)
    with pytest.raises(ValueError, match="kernel_shape must be 2 ints"):
        run_lowbit(model, feeds)


@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("x_shape", [(2, 7, 9, 1), (1, 65, 3, 5, 2), (3, 4, 63)])
@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_global_average_pool(rng, dtype, x_shape, channels_last):
    x = codes(rng, dtype, x_shape)
    s = _pool_scales(rng, dtype)
    channels_first = np.moveaxis(x, -1, 1) if channels_last else x
    spatial = channels_first.shape[2:]
    want = _avg_rule(channels_first, s, list(spatial), {})
    model, feeds = one_node("QLinearGlobalAveragePool", {"x": x, **s}, {"y": dtype}, {"channels_last": channels_last},
                            constant=tuple(s), domain=MS)
    got = assert_near_ort(model, feeds)[0]
    np.testing.assert_array_equal(np.moveaxis(got, -1, 1) if channels_last else got, want)


# ----------------------------------------------------------------------------- com.microsoft: matrix products

@pytest.mark.parametrize("a_dtype, b_dtype", [(U8, I8), (U8, U8), (I8, I8)])
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 1)])
@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("c_shape", [None, (63,), (7, 63)])
def test_qgemm(rng, a_dtype, b_dtype, trans_a, trans_b, quantized, c_shape):
    m, k, n = 7, 65, 63
    a = codes(rng, a_dtype, (k, m) if trans_a else (m, k))
    b = codes(rng, b_dtype, (n, k) if trans_b else (k, n))
    inputs = {"a": a, "sa": scalar(0.02), "za": codes(rng, a_dtype, ()), "b": b,
              "sb": rng.uniform(0.001, 0.01, n).astype(np.float32), "zb": codes(rng, b_dtype, n),
              "c": None if c_shape is None else rng.integers(-3000, 3000, c_shape, np.int32),
              "sy": scalar(0.3) if quantized else None, "zy": codes(rng, a_dtype, ()) if quantized else None}
    if b_dtype == I8:
        inputs["zb"] = np.zeros(n, I8)  # ONNX Runtime takes int8 B with a zero point of 0 only
    model, feeds = one_node("QGemm", inputs, {"y": a_dtype if quantized else np.float32},
                            {"transA": trans_a, "transB": trans_b, "alpha": 0.75},
                            constant=[x for x in inputs if x != "a"], domain=MS)
    if quantized:
        assert_near_ort(model, feeds)
    else:
        np.testing.assert_allclose(run_lowbit(model, feeds)[0], run_ort(model, feeds)[0], rtol=1e-6, atol=1e-5)


def test_qgemm_b_computed_at_run_time(rng):
    inputs = {"a": codes(rng, U8, (7, 65)), "sa": scalar(0.02), "za": codes(rng, U8, ()),
              "b": codes(rng, I8, (65, 5)), "sb": scalar(0.01), "zb": np.int8(0), "c": None, "sy": scalar(0.3),
              "zy": codes(rng, U8, ())}
    constant = ("sa", "za", "sb", "zb", "sy", "zy")
    model, feeds = one_node("QGemm", inputs, {"y": U8}, constant=constant, domain=MS)
    assert_near_ort(model, feeds)


@pytest.mark.parametrize("b_dtype", [I8, U8])
@pytest.mark.parametrize("a_shape", [(1, 65), (2, 7, 63)])
@pytest.mark.parametrize("per_column", [False, True])
def test_dynamic_quantize_matmul(rng, b_dtype, a_shape, per_column):
    k, n = a_shape[-1], 7
    inputs = {"a": rng.normal(0, 1, a_shape).astype(np.float32), "b": codes(rng, b_dtype, (k, n)),
              "sb": rng.uniform(0.001, 0.01, n if per_column else ()).astype(np.float32),
              "zb": codes(rng, b_dtype, n if per_column else ()) if b_dtype == U8 else None,
              "bias": rng.normal(0, 1, n).astype(np.float32)}
    model, feeds = one_node("DynamicQuantizeMatMul", inputs, {"y": np.float32}, constant=("b", "sb", "zb", "bias"),
                            domain=MS)
    got = run_lowbit(model, feeds)[0]
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=1e-5, atol=1e-4)
    model, feeds = one_node("DynamicQuantizeMatMul", inputs, {"y": np.float32}, constant=("sb", "zb", "bias"),
                            domain=MS)  # B computed at run time: the exact NumPy path
    np.testing.assert_allclose(run_lowbit(model, feeds)[0], got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("a_dtype, b_dtype", [(U8, I8), (U8, U8), (I8, I8)])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("b_constant", [True, False])
def test_matmul_integer_to_float(rng, a_dtype, b_dtype, per_column, b_constant):
    k, n = 63, 7
    inputs = {"a": codes(rng, a_dtype, (2, 5, k)), "b": codes(rng, b_dtype, (k, n)), "sa": scalar(0.02),
              "sb": rng.uniform(0.001, 0.01, n if per_column else ()).astype(np.float32),
              "za": codes(rng, a_dtype, ()), "zb": codes(rng, b_dtype, n if per_column else ()),
              "bias": rng.normal(0, 1, n).astype(np.float32)}
    constant = ("sa", "sb", "za", "zb", "bias") + ("b",) * b_constant
    model, feeds = one_node("MatMulIntegerToFloat", inputs, {"y": np.float32}, constant=constant, domain=MS)
    got = run_lowbit(model, feeds)[0]
    acc = (inputs["a"].astype(np.int64) - inputs["za"]) @ (inputs["b"].astype(np.int64) - inputs["zb"])
    want = (acc * (inputs["sa"] * inputs["sb"]).astype(np.float64) + inputs["bias"]).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=1e-5, atol=1e-4)


def _nbits_model(rng, k, n, bits, block, level, zero, a_shape, constant=True):
    blocks = -(-k // block)
    q = rng.integers(0, 1 << bits, (n, blocks * block)).astype(np.uint8)
    per = 8 // bits
    packed = np.zeros((n, blocks * block // per), np.uint8)
    for j in range(per):
        packed |= (q[:, j::per] << (j * bits)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    if zero == "packed":
        zq = rng.integers(0, 1 << bits, (n, -(-blocks // per) * per)).astype(np.uint8)
        zp = np.zeros((n, zq.shape[1] // per), np.uint8)
        for j in range(per):
            zp |= (zq[:, j::per] << (j * bits)).astype(np.uint8)
        z = zq[:, :blocks].astype(np.float32)
    elif zero == "float":
        zp = z = rng.uniform(0, (1 << bits) - 1, (n, blocks)).astype(np.float32)
    else:
        zp, z = None, np.full((n, blocks), 1 << bits - 1, np.float32)
    w = (q[:, :k] - np.repeat(z, block, axis=1)[:, :k]) * np.repeat(scales, block, axis=1)[:, :k]
    inputs = {"a": rng.normal(0, 1, a_shape).astype(np.float32), "b": packed.reshape(n, blocks, -1),
              "scales": scales, "zp": zp, "g_idx": None, "bias": rng.normal(0, 1, n).astype(np.float32)}
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": level}
    names = ("b", "scales", "zp", "bias") if constant else ("bias",)
    model, feeds = one_node("MatMulNBits", inputs, {"y": np.float32}, attrs, constant=names, domain=MS)
    return model, feeds, w.astype(np.float32), (q[:, :k], scales, z.astype(np.uint8) if zero != "float" else None)


@pytest.mark.parametrize("bits, block", [(4, 16), (4, 32), (8, 32), (2, 64)])
@pytest.mark.parametrize("zero", ["none", "packed", "float"])
def test_matmul_nbits_float_path(rng, bits, block, zero):
    model, feeds, w, _ = _nbits_model(rng, 65, 7, bits, block, 0, zero, (2, 3, 65))
    got = run_lowbit(model, feeds)[0]
    np.testing.assert_allclose(got, feeds["a"] @ w.T + model_bias(model), rtol=1e-5, atol=1e-5)
    if bits == 4 or zero != "float":
        np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=1e-4, atol=1e-4)


def model_bias(model) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "bias")


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("zero", ["none", "packed"])
def test_matmul_nbits_int4_kernel(rng, block, zero):
    model, feeds, w, (q, scales, z) = _nbits_model(rng, 257, 63, 4, block, 4, zero, (7, 257))
    graph = lowbit_onnx.load(model, optimize=False)
    session = Session(graph, fallback=False)
    got = session.run(feeds)["y"]
    assert "gemm_int4" in session.notes[graph.nodes[0].name]
    codes_s4 = (q.astype(np.int16) - np.repeat(z, block, axis=1)[:, :257]).astype(np.int8)  # s4 of the same w
    if zero == "none":
        want = gemm_int4_ref(feeds["a"], codes_s4, scales, group_size=block) + model_bias(model)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    exact = feeds["a"] @ w.T + model_bias(model)
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=0.02, atol=0.02 * np.abs(exact).max())
    kernel, ins = prepared(model, feeds)  # the float path, as the fallback the session may race
    np.testing.assert_allclose(call(kernel.fallback, ins), exact, rtol=1e-5, atol=1e-5)
    model, feeds, w, _ = _nbits_model(rng, 257, 63, 4, block, 4, zero, (7, 257), constant=False)
    np.testing.assert_allclose(run_lowbit(model, feeds)[0], feeds["a"] @ w.T + model_bias(model), rtol=1e-5,
                               atol=1e-5)  # weights computed at run time: dequantized per call, float


def test_matmul_nbits_errors(rng):
    model, feeds, _, _ = _nbits_model(rng, 64, 7, 4, 32, 0, "none", (2, 64))
    model.graph.node[0].attribute[0].i = 65  # K no longer matches A
    with pytest.raises(ValueError, match="A must be float32 \\[..., K = 65\\]"):
        run_lowbit(model, feeds)
    model, feeds, _, _ = _nbits_model(rng, 64, 7, 4, 32, 0, "none", (2, 64))
    g_idx = numpy_helper.from_array(np.arange(64, dtype=np.int32) % 2, "g_idx")
    model.graph.initializer.append(g_idx)
    model.graph.node[0].input[4] = "g_idx"
    with pytest.raises(ValueError, match="g_idx other than the identity"):
        run_lowbit(model, feeds)


# ----------------------------------------------------------------------------- QLinearSoftmax

def _softmax_model(x, dtype, attrs, *, x_scale=0.07, y_scale=1 / 256, y_zero=None, constant=("xs", "xz", "ys", "yz")):
    y_zero = (0 if dtype == U8 else -128) if y_zero is None else y_zero
    inputs = {"x": x, "xs": scalar(x_scale), "xz": scalar(3, dtype), "ys": scalar(y_scale), "yz": scalar(y_zero, dtype)}
    return one_node("QLinearSoftmax", inputs, {"y": dtype}, attrs, constant=constant, domain=MS)


@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("shape, opset, axis", [((2, 3, 5, 128), 13, -1), ((3, 4, 33), 13, 1), ((2, 3, 4, 5), 13, 0),
                                                ((6, 3, 17), 11, 1), ((2, 3, 4, 5), 12, 2), ((5, 1), 13, 1)])
@pytest.mark.parametrize("x_scale, y_scale", [(0.07, 1 / 256), (0.004, 1 / 255), (0.6, 0.0039)])
def test_qlinear_softmax_matches_ort(rng, dtype, shape, opset, axis, x_scale, y_scale):
    """ONNX Runtime's exp table, float32 formula and summation order: the very same codes."""
    x = codes(rng, dtype, shape)
    x.reshape(-1)[:3] = np.iinfo(dtype).max  # ties for the row maximum
    model, feeds = _softmax_model(x, dtype, {"axis": axis, "opset": opset}, x_scale=x_scale, y_scale=y_scale)
    got = run_lowbit(model, feeds)[0]
    np.testing.assert_array_equal(got, run_ort(model, feeds)[0])


def test_qlinear_softmax_defaults_and_run_time_scales(rng):
    x = codes(rng, U8, (3, 4, 9))
    for opset in (11, 13):  # default axis -1 at every opset (ONNX Runtime's schema)
        model, feeds = _softmax_model(x, U8, {"opset": opset})
        np.testing.assert_array_equal(run_lowbit(model, feeds)[0], run_ort(model, feeds)[0])
    model, feeds = _softmax_model(x, U8, {"opset": 13}, constant=())  # scales fed: the table made per call
    np.testing.assert_array_equal(run_lowbit(model, feeds)[0], run_ort(model, feeds)[0])
    model, feeds = _softmax_model(np.zeros((2, 0, 5), U8), U8, {"opset": 13})
    assert run_lowbit(model, feeds)[0].shape == (2, 0, 5)


def test_qlinear_softmax_saturates():
    """A row holding all the mass is code 256 - 128 = 128 in int8: saturated to 127, as ONNX Runtime does."""
    x = np.array([[5], [-7]], I8)
    model, feeds = _softmax_model(x, I8, {"opset": 13}, x_scale=0.5)
    got = run_lowbit(model, feeds)[0]
    np.testing.assert_array_equal(got, [[127], [127]])
    np.testing.assert_array_equal(got, run_ort(model, feeds)[0])


def test_qlinear_softmax_errors(rng):
    model, feeds = _softmax_model(codes(rng, U8, (2, 3)), U8, {"opset": 13, "axis": 2})
    with pytest.raises(ValueError, match="axis 2 is out of range for a 2-D input"):
        run_lowbit(model, feeds)
    model, feeds = _softmax_model(codes(rng, U8, (2, 3)), U8, {"opset": 13})
    feeds["x"] = feeds["x"].astype(np.int32)
    model.graph.input[0].type.tensor_type.elem_type = elem(np.int32)
    with pytest.raises(ValueError, match="input 0 \\(X\\) must be uint8 or int8, got int32"):
        run_lowbit(model, feeds)
