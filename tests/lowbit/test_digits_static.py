"""The trained digits CNN (lowbit.demo) through ONNX: exported by lowbit.onnx.exporter, quantized by
lowbit.onnx.quantization.quantize_static (int8, calibrated on training images), accuracy on the held-out split."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")

from lowbit.demo import digits, train as nn  # noqa: E402
from lowbit.graph import Graph, Node, TensorSpec  # noqa: E402
from lowbit.onnx import InferenceSession  # noqa: E402
from lowbit.onnx.exporter import to_onnx  # noqa: E402
from lowbit.onnx.quantization import QuantFormat, quantize_static  # noqa: E402
from tests.levels import ORT_SATURATES_U8S8  # noqa: E402


class Images:
    def __init__(self, x: np.ndarray, batch: int = 64):
        self.batches = [{"x": x[i:i + batch]} for i in range(0, len(x), batch)]

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    x_train, x_test, y_train, y_test = digits.load_digits(0)
    model = digits.cnn(np.random.default_rng(0))
    nn.fit(model, x_train, y_train, epochs=4, seed=0)
    path = tmp_path_factory.mktemp("digits") / "cnn.onnx"
    onnx.save(to_onnx(nn.export(model, quantized=False)), path)
    return str(path), x_train, x_test, y_test


def accuracy(path, x, y) -> float:
    return float((InferenceSession(path).run(None, {"x": x})[0].argmax(1) == y).mean())


@pytest.mark.parametrize("quant_format", [QuantFormat.QDQ, QuantFormat.QOperator])
def test_int8_static_keeps_the_float_accuracy(trained, tmp_path, quant_format):
    path, x_train, x_test, y_test = trained
    out = str(tmp_path / "int8.onnx")
    report = quantize_static(path, out, Images(x_train[:512]), quant_format=quant_format, per_channel=True)
    assert {n.op for n in report.quantized} == {"Conv", "Gemm", "MaxPool", "Flatten"} and not report.kept_float
    float_accuracy, int8_accuracy = accuracy(path, x_test, y_test), accuracy(out, x_test, y_test)
    assert float_accuracy >= 0.97
    assert int8_accuracy >= float_accuracy - 0.003
    ort = pytest.importorskip("onnxruntime")
    if ORT_SATURATES_U8S8:  # its uint8 x int8 products saturate here: no exact peer to agree with
        return
    theirs = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"x": x_test})[0]
    np.testing.assert_array_equal(theirs.argmax(1), InferenceSession(out).run(None, {"x": x_test})[0].argmax(1))


def test_to_onnx_round_trips_and_refuses_what_onnx_cannot_hold(trained, rng):
    path, _, x_test, _ = trained
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [n.op_type for n in model.graph.node][:3] == ["Conv", "BatchNormalization", "Relu"]
    graph = Graph([Node("Relu", ["x"], ["y"], {"activation": "relu"}, "r")], {"x": TensorSpec((None, 4))}, ["y"], {})
    with pytest.raises(ValueError, match="graph: not a valid ONNX model"):
        to_onnx(graph)
    with pytest.raises(TypeError, match="graph: expected a lowbit.graph.Graph"):
        to_onnx(model)


@pytest.mark.parametrize("quant_format", [QuantFormat.QDQ, QuantFormat.QOperator])
def test_an_accuracy_target_keeps_the_most_sensitive_layers_float(trained, tmp_path, quant_format):
    path, x_train, x_test, _ = trained
    reference = InferenceSession(path).run(None, {"x": x_test})[0]

    def worst_cosine(model):
        y = InferenceSession(model).run(None, {"x": x_test})[0].astype(np.float64)
        return float(((y * reference).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(reference, axis=1)).min())

    plain, strict, loose = (str(tmp_path / f"{name}.onnx") for name in ("plain", "strict", "loose"))
    quantize_static(path, plain, Images(x_train[:512]), quant_format=quant_format, per_channel=True)
    report = quantize_static(path, strict, Images(x_train[:512]), quant_format=quant_format, per_channel=True,
                             accuracy_target=0.9999)
    assert report.kept_float and all(n.detail == "kept float by the accuracy target (min cosine >= 0.9999)"
                                     for n in report.kept_float)
    assert any(note.startswith("accuracy target min cosine >= 0.9999: reached ") for note in report.notes)
    assert worst_cosine(strict) > worst_cosine(plain)
    relaxed = quantize_static(path, loose, Images(x_train[:512]), quant_format=quant_format, per_channel=True,
                              accuracy_target={"relative_error": 0.5})
    assert not relaxed.kept_float
