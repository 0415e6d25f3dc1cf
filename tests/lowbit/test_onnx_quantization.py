"""lowbit.onnx.quantization against onnxruntime.quantization: the same scripts, files both runtimes run."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from lowbit.onnx import InferenceSession, examples  # noqa: E402
from lowbit.onnx import quantization as lq  # noqa: E402
from lowbit.onnx.quantization._common import _calibration_method, _quant_format, _quant_type  # noqa: E402
from tests.levels import ORT_SATURATES_U8S8  # noqa: E402

MODULES = ["onnxruntime.quantization", "lowbit.onnx.quantization"]


class ImageReader:
    """``batches`` digits-CNN batches, each made when asked for (nothing is kept): any object with get_next."""

    def __init__(self, batches: int, batch: int = 4):
        self.left, self.batch, self.seed = batches, batch, 0

    def get_next(self):
        if self.left == 0:
            return None
        self.left -= 1
        self.seed += 1
        return examples.image_feed(self.batch, 8, seed=self.seed, channels=1)


class TokenReader(lq.CalibrationDataReader):
    def __init__(self, batches: int):
        self.left, self.seed = batches, 0

    def get_next(self):
        if self.left == 0:
            return None
        self.left, self.seed = self.left - 1, self.seed + 1
        return examples.token_feed(2, 16, seed=self.seed)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "cnn.onnx"
    onnx.save(examples.digits_cnn(), path)
    return str(path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "bert.onnx"
    onnx.save(examples.bert_encoder(layers=2, hidden=64), path)
    return str(path)


def _ort(path: str, feed: dict) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)


def _output_scale(path: str, output: str) -> float:
    """The scale of the DequantizeLinear writing graph output ``output``: one step of the quantized output."""
    model = onnx.load(path)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == output)
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    return float(onnx.numpy_helper.to_array(scale))


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# ---- the same script with either module -----------------------------------------------------------------------------

# ONNX Runtime's own advice where its uint8 x int8 products saturate (no VNNI): 7-bit weights, so that the two
# runtimes can be compared there too
REDUCE_RANGE = ORT_SATURATES_U8S8


def static_script(module, model: str, output: str, reader, fmt: str) -> None:
    """A user's static quantization script: only ``module`` changes."""
    module.quantize_static(model, output, reader, quant_format=getattr(module.QuantFormat, fmt), per_channel=True,
                           reduce_range=REDUCE_RANGE, activation_type=module.QuantType.QUInt8,
                           weight_type=module.QuantType.QInt8, calibrate_method=module.CalibrationMethod.MinMax)


def dynamic_script(module, model: str, output: str) -> None:
    module.quantize_dynamic(model, output, weight_type=module.QuantType.QInt8, per_channel=True,
                            reduce_range=REDUCE_RANGE)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
@pytest.mark.parametrize("module_name", MODULES)
def test_static_script_runs_in_both_runtimes(module_name, fmt, cnn, tmp_path):
    pytest.importorskip("onnxruntime")
    module = importlib.import_module(module_name)
    output = str(tmp_path / f"cnn.{fmt}.onnx")
    static_script(module, cnn, output, ImageReader(8), fmt)
    feed = examples.image_feed(16, 8, seed=99, channels=1)
    (y_ort,), session = _ort(output, feed), InferenceSession(output)
    (y_lowbit,) = session.run(None, feed)
    # the logits are dequantized codes: the runtimes agree within one code (plus float rounding)
    assert np.abs(y_lowbit - y_ort).max() <= 1.0001 * _output_scale(output, "logits") + 1e-6
    (y_float,) = _ort(cnn, feed)
    assert np.abs(y_ort - y_float).max() < 0.1 * np.abs(y_float).max()
    ops = [n.op for n in session.graph.nodes]
    assert "QLinearConv" in ops and not {"Conv", "Gemm"} & set(ops), ops  # every product runs on int8 kernels
    if module_name.startswith("lowbit") and fmt == "QDQ":
        assert ops.count("lowbit.QGemm") == 2
        rows = session.profile(feed, repeat=1).rows
        assert {r.precision for r in rows if r.op in ("QLinearConv", "lowbit.QGemm")} == {"int8"}


def test_static_formats_and_types_agree_across_runtimes(cnn, tmp_path):
    """Symmetric int8 activations (Relu kept in float in QOperator), uint8 weights, MSE and percentile ranges: ORT
    and lowbit run lowbit's files within one output step, close to the float model."""
    pytest.importorskip("onnxruntime")
    feed = examples.image_feed(16, 8, seed=98, channels=1)  # 16 images in every test: one set of kernels
    (y_float,) = _ort(cnn, feed)
    for fmt, activation, weight, method in (("QOperator", "int8", "int8", "mse"),
                                            ("QDQ", lq.QuantType.QUInt8, "uint8", "percentile")):
        output = str(tmp_path / "q.onnx")
        report = lq.quantize_static(cnn, output, ImageReader(6), quant_format=fmt, activation_type=activation,
                                    weight_type=weight, calibrate_method=method)
        assert len(report.quantized) == 6 and report.batches == 6, str(report)
        (y_ort,), (y_lowbit,) = _ort(output, feed), InferenceSession(output).run(None, feed)
        assert np.abs(y_lowbit - y_ort).max() <= 1.0001 * _output_scale(output, "logits") + 1e-6, (fmt, activation)
        assert np.abs(y_ort - y_float).max() < 0.15 * np.abs(y_float).max(), (fmt, activation, method)


@pytest.mark.parametrize("module_name", MODULES)
def test_dynamic_script_runs(module_name, bert, tmp_path):
    module = importlib.import_module(module_name)
    output = str(tmp_path / "bert.int8.onnx")
    dynamic_script(module, bert, output)
    feed = examples.token_feed(4, 16)  # 4 x 16 tokens in every test: one set of kernels
    y_lowbit = InferenceSession(output).run(None, feed)
    y_float = _ort(bert, feed)
    assert _min_cosine(y_lowbit[0], y_float[0]) > 0.999
    domains = {n.domain for n in onnx.load(output).graph.node}
    if module_name.startswith("lowbit"):  # lowbit's per-token op: lowbit runs it, ONNX Runtime does not know it
        assert "lowbit" in domains
    else:
        y_ort = _ort(output, feed)
        assert np.abs(y_lowbit[0] - y_ort[0]).max() < 1e-3 * np.abs(y_ort[0]).max()


def test_per_token_accuracy_at_least_ort(bert, tmp_path):
    """lowbit's per-token int8 file, run by lowbit, is at least as close to the float model (smallest cosine over
    the tokens) as ONNX Runtime's own quantize_dynamic of the same file, run by ONNX Runtime."""
    ort_quantization = pytest.importorskip("onnxruntime.quantization")
    ours, theirs = str(tmp_path / "lowbit.onnx"), str(tmp_path / "ort.onnx")
    report = lq.quantize_dynamic(bert, ours)
    ort_quantization.quantize_dynamic(bert, theirs, weight_type=ort_quantization.QuantType.QInt8, per_channel=True)
    assert {n.action for n in report.quantized} == {"lowbit.DynamicQuantizeMatMul"} and len(report.quantized) == 13
    feed = examples.token_feed(4, 16)
    reference = _ort(bert, feed)
    lowbit_out, ort_out = InferenceSession(ours).run(None, feed), _ort(theirs, feed)
    for ours_y, theirs_y, ref in zip(lowbit_out, ort_out, reference):
        assert _min_cosine(ours_y, ref) >= _min_cosine(theirs_y, ref)
    # per token is never worse than lowbit's per-tensor file either
    per_tensor = str(tmp_path / "per_tensor.onnx")
    lq.quantize_dynamic(bert, per_tensor, per_token=False)
    y = InferenceSession(per_tensor).run(None, feed)
    assert _min_cosine(lowbit_out[1], reference[1]) >= _min_cosine(y[1], reference[1]) - 1e-6


@pytest.mark.parametrize("options", [{"per_token": False, "reduce_range": REDUCE_RANGE},
                                     {"weight_type": "int4", "block_size": 32},
                                     {"weight_type": "QUInt4", "block_size": 64}])
def test_dynamic_formats_run_in_both_runtimes(bert, tmp_path, options):
    """com.microsoft DynamicQuantizeMatMul and MatMulNBits (bias as input 5) from lowbit run in ONNX Runtime and
    lowbit alike; ModelProto input and external data files work."""
    output = str(tmp_path / "q.onnx")
    report = lq.quantize_dynamic(onnx.load(bert), output, use_external_data_format=True, **options)
    assert (tmp_path / "q.onnx.data").exists()
    op = "com.microsoft.DynamicQuantizeMatMul" if "block_size" not in options else "com.microsoft.MatMulNBits"
    assert {n.action for n in report.quantized} == {op}
    assert [n.name for n in report.kept_float] == [f"encoder.layer.{i}.attention.{m}" for i in (0, 1)
                                                   for m in ("scores", "context")]
    feed = examples.token_feed(4, 16, seed=3)
    y_ort, y_lowbit, y_float = _ort(output, feed), InferenceSession(output).run(None, feed), _ort(bert, feed)
    for a, b, ref in zip(y_lowbit, y_ort, y_float):
        # within a small part of one int8 step of the output's range (activations are int8 in both)
        assert np.abs(a - b).max() <= 0.1 * np.abs(ref).max() / 127
        assert _min_cosine(a, ref) > 0.99


def _linear_model(k: int, n: int, gemm: bool = False):
    """``y = x @ W + b`` as MatMul + Add (or Gemm with transB=1) on ``x [rows, k]``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((k, n)).astype(np.float32) * 0.1, rng.standard_normal(n).astype(np.float32)
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)]
        weight = numpy_helper.from_array(np.ascontiguousarray(w.T), "W")
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                 helper.make_node("Add", ["b", "h"], ["y"], name="add")]
        weight = numpy_helper.from_array(w, "W")
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [weight, numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), w, b


def test_int4_pads_k_and_matches_its_codes(tmp_path):
    """K = 40 in blocks of 16: the last block padded; the file's codes and scales give W within half a step (one
    step where a block's extreme is negative, on code 0, and a large positive value clips at +7), and ONNX Runtime
    (float compute) gives x @ W' + b exactly for those codes; lowbit agrees."""
    model, w, b = _linear_model(40, 24, gemm=True)
    output = str(tmp_path / "int4.onnx")
    report = lq.quantize_dynamic(model, output, weight_type=lq.QuantType.Int4, block_size=16,
                                 extra_options={"accuracy_level": 0})
    assert "K padded" in report.nodes[0].detail and "C as the bias" in report.nodes[0].detail
    saved = onnx.load(output)
    (node,) = saved.graph.node
    assert (node.op_type, node.domain, len(node.input)) == ("MatMulNBits", "com.microsoft", 6)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    packed, scales = values[node.input[1]], values[node.input[2]].reshape(24, 3)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(24, 48)
    assert (codes[:, 40:] == 8).all()  # padding: zeros
    dequantized = (codes[:, :40].astype(np.float32) - 8) * np.repeat(scales, 16, axis=1)[:, :40]
    error, step = np.abs(dequantized - w.T), np.repeat(scales, 16, axis=1)[:, :40]
    assert np.all(error <= step * 1.0001) and np.mean(error <= step / 2 + 1e-7) > 0.98
    x = np.random.default_rng(1).standard_normal((5, 40)).astype(np.float32)
    (y_ort,), (y_lowbit,) = _ort(output, {"x": x}), InferenceSession(output).run(None, {"x": x})
    np.testing.assert_allclose(y_ort, x @ dequantized.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_lowbit, y_ort, rtol=1e-5, atol=1e-5)


class CorrelatedReader:
    """Activations with correlated channels of very different scales, made batch by batch."""

    def __init__(self, k: int, batches: int, seed: int = 0):
        rng = np.random.default_rng(123)
        self.mix = (rng.standard_normal((k, k)) * 0.9 ** np.arange(k)[:, None]).astype(np.float32)
        self.scale = np.exp(rng.standard_normal(k)).astype(np.float32)
        self.left, self.seed, self.k = batches, seed, k

    def sample(self, rows: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((rows, self.k)).astype(np.float32)
        return (z @ self.mix) * self.scale

    def get_next(self):
        if self.left == 0:
            return None
        self.left, self.seed = self.left - 1, self.seed + 1
        return {"x": self.sample(64, self.seed)}


def test_gptq_and_awq_beat_round_to_nearest(tmp_path):
    model, w, b = _linear_model(96, 40)
    x = CorrelatedReader(96, 0).sample(512, seed=1000)
    reference = x @ w + b
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        output = str(tmp_path / f"{method}.onnx")
        reader = CorrelatedReader(96, 20) if method != "rtn" else None
        lq.quantize_dynamic(model, output, weight_type="int4", block_size=32, method=method,
                            calibration_data_reader=reader)
        (y,) = InferenceSession(output).run(None, {"x": x})
        errors[method] = np.linalg.norm(y - reference) / np.linalg.norm(reference)
        if method == "awq":  # the activation scaling is a Mul before the product
            assert [n.op_type for n in onnx.load(output).graph.node] == ["Mul", "MatMulNBits"]
    assert errors["gptq"] < 0.5 * errors["rtn"] and errors["awq"] < errors["rtn"], errors


def test_calibration_memory_is_bounded(cnn, tmp_path):
    """Calibrating on 100 batches made on the fly peaks at the same memory as on 10: observers keep statistics,
    never batches. Bound: the model's bytes + 16 MB, whatever the number of batches."""
    output = str(tmp_path / "q.onnx")
    lq.quantize_static(cnn, output, ImageReader(2), calibrate_method="entropy")  # compile and cache first
    peaks = {}
    for batches in (10, 100):
        tracemalloc.start()
        report = lq.quantize_static(cnn, output, ImageReader(batches, batch=32), calibrate_method="entropy")
        peaks[batches] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report.batches == batches
    batch_bytes = 32 * 64 * 4
    assert peaks[100] <= peaks[10] * 1.05 + 8 * batch_bytes, peaks  # 90 more batches: not 90 batches more memory
    assert peaks[100] < len(open(cnn, "rb").read()) + 16 * 2**20, peaks


# ---- arguments -------------------------------------------------------------------------------------------------------

def test_enum_arguments_accept_onnxruntime_members_and_strings(cnn, tmp_path):
    ort_quantization = pytest.importorskip("onnxruntime.quantization")
    assert _quant_type(ort_quantization.QuantType.QUInt8, "t") is lq.QuantType.QUInt8
    assert _quant_type("int4", "t") is lq.QuantType.QInt4 is lq.QuantType.Int4
    for text, member in (("QINT8", lq.QuantType.QInt8), ("uint8", lq.QuantType.QUInt8), ("nf4", lq.QuantType.NF4),
                         ("Ternary", lq.QuantType.Ternary), ("binary", lq.QuantType.Binary),
                         ("quint4", lq.QuantType.QUInt4)):
        assert lq.QuantType.from_string(text) is member
    assert _quant_format(ort_quantization.QuantFormat.QOperator, "f") is lq.QuantFormat.QOperator
    assert _quant_format("qdq", "f") is lq.QuantFormat.QDQ
    assert _calibration_method(ort_quantization.CalibrationMethod.Entropy, "m") is lq.CalibrationMethod.Entropy
    assert _calibration_method("MSE", "m") is lq.CalibrationMethod.MSE
    assert isinstance(ImageReader(1), lq.CalibrationDataReader)  # any object with get_next
    report = lq.quantize_static(cnn, str(tmp_path / "q.onnx"), ImageReader(2),
                                quant_format=ort_quantization.QuantFormat.QDQ,
                                activation_type=ort_quantization.QuantType.QInt8,
                                calibrate_method=ort_quantization.CalibrationMethod.Percentile,
                                nodes_to_exclude=["fc1"], extra_options={"SomethingElse": 1})
    assert [(n.name, n.action, n.detail) for n in report.kept_float] == [("fc1", "float", "listed in nodes_to_exclude")]
    text = str(report)
    assert "fc1" in text and "conv0" in text and "SomethingElse" in text


def test_dynamic_keeps_conv_float_and_records_why(cnn, tmp_path):
    report = lq.quantize_dynamic(cnn, str(tmp_path / "q.onnx"), op_types_to_quantize=["Gemm"])
    kept = {n.name: n.detail for n in report.kept_float}
    assert set(kept) == {"conv0", "conv1"} and "quantize_static" in kept["conv0"]
    assert [n.name for n in report.quantized] == ["fc0", "fc1"]


class ListReader:
    def __init__(self, batches):
        self.batches = list(batches)

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


def test_errors_name_the_argument(cnn, bert, tmp_path):
    out = str(tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="weight_type: expected a QuantType"):
        lq.quantize_dynamic(bert, out, weight_type="int3")
    with pytest.raises(ValueError, match="weight_type"):
        lq.quantize_dynamic(bert, out, weight_type="QInt16")
    with pytest.raises(ValueError, match="weight_type: quantize_static writes QInt8 or QUInt8, got QInt4"):
        lq.quantize_static(cnn, out, ImageReader(1), weight_type="int4")
    with pytest.raises(ValueError, match="activation_type"):
        lq.quantize_static(cnn, out, ImageReader(1), activation_type="QInt16")
    with pytest.raises(ValueError, match="quant_format"):
        lq.quantize_static(cnn, out, ImageReader(1), quant_format="QONNX")
    with pytest.raises(ValueError, match="calibrate_method: CalibrationMethod.Distribution"):
        lq.quantize_static(cnn, out, ImageReader(1), calibrate_method="distribution")
    with pytest.raises(ValueError, match=r"nodes_to_exclude: no node is named \['conv9'\]"):
        lq.quantize_static(cnn, out, ImageReader(1), nodes_to_exclude=["conv9"])
    with pytest.raises(ValueError, match=r"nodes_to_quantize: no node is named \['nope'\]"):
        lq.quantize_dynamic(bert, out, nodes_to_quantize=["nope"])
    with pytest.raises(ValueError, match="calibration_data_reader: quantize_static needs calibration data"):
        lq.quantize_static(cnn, out)
    for method in ("gptq", "awq"):
        with pytest.raises(ValueError, match=f"calibration_data_reader: method='{method}' needs calibration data"):
            lq.quantize_dynamic(bert, out, weight_type="int4", method=method)
    with pytest.raises(TypeError, match="calibration_data_reader: expected a CalibrationDataReader"):
        lq.quantize_static(cnn, out, [examples.image_feed(1, 8, channels=1)])
    with pytest.raises(TypeError, match="get_next\\(\\) must return a dict of input name -> numpy array.*list"):
        lq.quantize_static(cnn, out, ListReader([[np.zeros((1, 1, 8, 8), np.float32)]]))
    with pytest.raises(TypeError, match="batch 0 has \\{'input': 'list'\\}"):
        lq.quantize_static(cnn, out, ListReader([{"input": [[0.0] * 8] * 8}]))
    with pytest.raises(ValueError, match="calibration_data_reader: get_next\\(\\) returned None at once"):
        lq.quantize_static(cnn, out, ListReader([]))
    with pytest.raises(ValueError, match="calibration_data_reader: get_next\\(\\) returned None at once"):
        lq.quantize_dynamic(bert, out, weight_type="int4", method="gptq", calibration_data_reader=TokenReader(0))
    with pytest.raises(ValueError, match="calibration_data_reader: batch 0 does not fit the model"):
        lq.quantize_static(cnn, out, ListReader([{"pixels": np.zeros((1, 1, 8, 8), np.float32)}]))
    with pytest.raises(ValueError, match="block_size: expected a power of two from 16 to 256"):
        lq.quantize_dynamic(bert, out, weight_type="int4", block_size=48)
    with pytest.raises(ValueError, match="method: expected 'rtn', 'gptq' or 'awq'"):
        lq.quantize_dynamic(bert, out, method="hqq")
    with pytest.raises(TypeError, match="model_input: expected a path or an onnx.ModelProto"):
        lq.quantize_dynamic(123, out)
