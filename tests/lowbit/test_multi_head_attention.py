"""ONNX Runtime's com.microsoft.MultiHeadAttention through lowbit.onnx.InferenceSession: the same outputs as ONNX
Runtime with and without its optional inputs (bias, key padding mask, attention bias), on one thread and on a team
(kernels.attention where the inputs allow it), and a clear error for the forms lowbit does not run."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit.onnx as lo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

B, S, L, H, D, DV = 2, 5, 7, 3, 4, 6


def _feeds(rng) -> dict[str, np.ndarray]:
    return {"q": rng.standard_normal((B, S, H * D)).astype(np.float32),
            "k": rng.standard_normal((B, L, H * D)).astype(np.float32),
            "v": rng.standard_normal((B, L, H * DV)).astype(np.float32),
            "bias": rng.standard_normal(2 * H * D + H * DV).astype(np.float32),
            "kpm": (rng.random((B, L)) < 0.7).astype(np.int32),
            "ab": rng.standard_normal((B, 1, S, L)).astype(np.float32)}


def _model(inputs: list[str], feeds: dict, outputs: int = 1, **attrs) -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("MultiHeadAttention", inputs, ["y", "present_key", "present_value"][:outputs],
                            domain="com.microsoft", **attrs)
    types = {"kpm": TensorProto.INT32}
    graph = helper.make_graph(
        [node], "mha", [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), list(feeds[n].shape))
                        for n in inputs if n],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


@pytest.mark.parametrize("inputs, attrs, note", [
    (["q", "k", "v"], {}, "kernels.attention"),
    (["q", "k", "v", "", "", "ab"], {"scale": 0.3}, "kernels.attention"),
    (["q", "k", "v", "bias"], {}, "evaluator"),
    (["q", "k", "v", "", "kpm"], {}, "evaluator"),
    (["q", "k", "v", "bias", "kpm", "ab"], {"mask_filter_value": -1000.0}, "evaluator"),
])
def test_multi_head_attention_matches_onnxruntime(rng, inputs, attrs, note):
    feeds = _feeds(rng)
    data = _model(inputs, feeds, num_heads=H, **attrs)
    given = {n: feeds[n] for n in inputs if n}
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, given)[0]
    for threads in (None, 2):
        options = lo.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = lo.InferenceSession(data, options)
        np.testing.assert_allclose(session.run(None, given)[0], want, rtol=0, atol=2e-6)
    assert note in session.profile(given, repeat=1).rows[0].note


@pytest.mark.parametrize("inputs, feeds_of, attrs, outputs, message", [
    (["q", "k", "v", "", "", "", "pk", "pv"], {"pk": (B, H, 3, D), "pv": (B, H, 3, DV)}, {}, 1, "past key / value"),
    (["q", "k", "v"], {}, {"unidirectional": 1}, 1, "unidirectional"),
    (["q", "k", "v"], {}, {}, 3, "present outputs"),
    (["q", "k", "v"], {"k": (B, H, L, D)}, {}, 1, "separate 3-D query, key and value"),
    (["q", "k", "v", "", "kpm"], {"kpm": (B,)}, {}, 1, "key_padding_mask: lowbit takes the [batch, key length]"),
    (["q", "k", "v"], {"v": (B, L, 7)}, {}, 1, "do not make 3 heads"),
])
def test_multi_head_attention_forms_lowbit_does_not_run(rng, inputs, feeds_of, attrs, outputs, message):
    feeds = _feeds(rng) | {n: np.zeros(shape, np.int32 if n == "kpm" else np.float32)
                           for n, shape in feeds_of.items()}
    data = _model(inputs, feeds, outputs, num_heads=H, **attrs)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        lo.InferenceSession(data).run(None, {n: feeds[n] for n in inputs if n})
