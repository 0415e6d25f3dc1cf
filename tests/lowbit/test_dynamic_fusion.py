"""``lowbit.runtime.dynamic_fusion.fuse_dynamic_matmul`` on small ``quantize_dynamic`` models: the structure after
fusion, outputs against the unfused graph and ONNX Runtime, and patterns that must not fuse."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lowbit.onnx as lowbit_onnx  # noqa: E402
from lowbit import Session, TensorSpec  # noqa: E402
from lowbit.runtime.dynamic_fusion import fuse_dynamic_matmul  # noqa: E402
from tests.levels import ORT_SATURATES_U8S8  # noqa: E402

FUSED, SHARED = "com.microsoft.DynamicQuantizeMatMul", "com.microsoft.MatMulIntegerToFloat"


def _float_model(rng, k: int = 24, n: int = 10, heads: int = 3):
    """``x [2, 5, k]`` times ``heads`` weights sharing x (as Q, K, V), the first with a bias, the sum out."""
    w = [numpy_helper.from_array(rng.normal(0, 0.3, (k, n)).astype(np.float32), f"w{i}") for i in range(heads)]
    bias = numpy_helper.from_array(rng.normal(0, 0.1, n).astype(np.float32), "bias")
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"]) for i in range(heads)]
    nodes += [helper.make_node("Add", ["p0", "bias"], ["q"]), helper.make_node("Sum", ["q", *[f"p{i}" for i in
                                                                                         range(1, heads)]], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], w + [bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _dynamic(tmp_path, model, per_channel=False):
    src, dst = tmp_path / "f.onnx", tmp_path / "d.onnx"
    onnx.save(model, src)
    quantization.quantize_dynamic(str(src), str(dst), per_channel=per_channel,  # 7-bit where ORT would saturate
                                  weight_type=quantization.QuantType.QInt8, reduce_range=ORT_SATURATES_U8S8)
    return onnx.load(dst)


def _run(graph, feeds):
    return Session(graph, fallback=False).run(feeds)[graph.outputs[0]]


@pytest.mark.parametrize("per_channel", [False, True])
def test_fuses_and_matches_unfused_and_ort(rng, tmp_path, per_channel):
    model = _dynamic(tmp_path, _float_model(rng), per_channel)
    graph = lowbit_onnx.load(model, optimize=False)  # not yet fused
    fused = fuse_dynamic_matmul(graph)  # three products of one quantized x: they share its codes
    ops = [n.op for n in fused.nodes]
    assert ops.count(SHARED) == 3 and ops.count("DynamicQuantizeLinear") == 1 and "MatMulInteger" not in ops
    assert "Cast" not in ops and ops.count("Add") == 0  # the bias went into the first product
    assert [n.op for n in graph.nodes].count("MatMulInteger") == 3  # the input graph is untouched
    feeds = {"x": rng.normal(0, 1, (2, 5, 24)).astype(np.float32)}
    session = Session(fused, fallback=False)
    got, unfused = session.run(feeds)[fused.outputs[0]], _run(graph, feeds)
    assert list(session.notes.values()).count("linear_dynamic_int8, codes shared") == 3
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    per_token = fuse_dynamic_matmul(graph, per_token=True)  # each product quantizes its own tokens
    ops = [n.op for n in per_token.nodes]
    assert ops.count(FUSED) == 3 and "DynamicQuantizeLinear" not in ops
    assert all(n.attrs["per_row"] == 1 for n in per_token.nodes if n.op == FUSED)


def test_does_not_fuse_observed_or_foreign_patterns(rng, tmp_path):
    model = _dynamic(tmp_path, _float_model(rng, heads=1))
    graph = lowbit_onnx.load(model, optimize=False)  # not yet fused
    cast = next(n for n in graph.nodes if n.op == "Cast")
    observed = graph.copy()
    observed.outputs.append(cast.outputs[0])  # the float product is a graph output: it must stay
    assert FUSED not in [n.op for n in fuse_dynamic_matmul(observed).nodes]
    runtime_weights = graph.copy()
    matmul = next(n for n in runtime_weights.nodes if n.op == "MatMulInteger")
    runtime_weights.inputs["wq"] = TensorSpec((24, 10), "int8")
    runtime_weights.params.pop(matmul.inputs[1])
    matmul.inputs[1] = "wq"  # weights fed at run time: not fused
    assert FUSED not in [n.op for n in fuse_dynamic_matmul(runtime_weights).nodes]
    cast_int = graph.copy()
    next(n for n in cast_int.nodes if n.op == "Cast").attrs["to"] = TensorProto.DOUBLE
    assert FUSED not in [n.op for n in fuse_dynamic_matmul(cast_int).nodes]
    plain = lowbit_onnx.load(_float_model(rng), optimize=False)  # nothing to fuse: the same nodes
    assert [n.op for n in fuse_dynamic_matmul(plain).nodes] == [n.op for n in plain.nodes]


def test_per_token_sessions_quantize_each_row(rng, tmp_path):
    """``session.lowbit.dynamic_per_token``: each token with its own range, closer to the float model."""
    import lowbit.onnx

    float_model = _float_model(rng)
    model = _dynamic(tmp_path, float_model)
    x = rng.normal(0, 1, (2, 5, 24)).astype(np.float32)
    x[0] *= 30  # one batch item far larger: one scale for all costs the other its resolution
    options = lowbit.onnx.SessionOptions()
    options.add_session_config_entry(lowbit.onnx.session.DYNAMIC_PER_TOKEN, "1")
    per_token = lowbit.onnx.InferenceSession(model.SerializeToString(), options)
    assert "per token" in str(per_token.profile({"x": x}))
    per_tensor = lowbit.onnx.InferenceSession(model.SerializeToString())
    exact = ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    errors = [np.abs(s.run(None, {"x": x})[0] - exact)[1].max() for s in (per_tensor, per_token)]
    assert errors[1] < errors[0] / 5
