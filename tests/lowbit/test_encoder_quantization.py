"""Quantizing a trained transformer (lowbit.demo.encoder: digits rows as tokens) from its ONNX file: per-token int8
against ONNX Runtime's quantize_dynamic, every weight format of the table, and accuracy targets, each measured on
the held-out test split against the float model's outputs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")

from lowbit.demo.encoder import digits_tokens, encoder_model, feeds  # noqa: E402
from lowbit.onnx import InferenceSession  # noqa: E402
from lowbit.onnx.accuracy import AccuracyTarget, choose_precisions  # noqa: E402
from lowbit.onnx.quantization import quantize_dynamic  # noqa: E402
from lowbit.quantization.formats import FORMATS  # noqa: E402


class Reader:
    """The training split in batches of ``batch`` (any object with get_next will do)."""

    def __init__(self, batch: int = 128):
        self.batches = feeds(digits_tokens("train")[0], batch)

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


def min_cosines(outputs, reference) -> list[float]:
    """Per output, the smallest cosine over its rows (tokens, or samples) against the float model's."""
    found = []
    for y, r in zip(outputs, reference):
        y, r = y.reshape(-1, y.shape[-1]).astype(np.float64), r.reshape(-1, r.shape[-1]).astype(np.float64)
        found.append(float(((y * r).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(r, axis=1)).min()))
    return found


@pytest.fixture(scope="module")
def encoder():
    path = encoder_model()
    x, labels = digits_tokens("test")
    return path, {"pixels": x}, labels, InferenceSession(path).run(None, {"pixels": x})


def run(path, feed):
    return InferenceSession(path).run(None, feed)


def test_per_token_int8_beats_onnx_runtime(encoder, tmp_path):
    """Per-token activations keep the pooled embedding and logits within cosine 0.999 (GPTQ weights: every output,
    the last hidden state's 2880 tokens too); against ONNX Runtime's quantize_dynamic (per tensor) the worst output
    is closer, and with GPTQ every output is."""
    ort_quantization = pytest.importorskip("onnxruntime.quantization")
    path, feed, labels, reference = encoder
    quantize_dynamic(path, tmp_path / "rtn.onnx")
    quantize_dynamic(path, tmp_path / "gptq.onnx", method="gptq", calibration_data_reader=Reader())
    ort_quantization.quantize_dynamic(path, tmp_path / "ort.onnx", weight_type=ort_quantization.QuantType.QInt8,
                                      per_channel=True)
    ours, gptq = min_cosines(run(tmp_path / "rtn.onnx", feed), reference), \
        min_cosines(run(tmp_path / "gptq.onnx", feed), reference)
    import onnxruntime

    theirs = min_cosines(onnxruntime.InferenceSession(tmp_path / "ort.onnx").run(None, feed), reference)
    assert min(ours[1:]) >= 0.999 and min(gptq) >= 0.999
    assert min(ours) > min(theirs) and all(a > b for a, b in zip(gptq, theirs)), (ours, gptq, theirs)
    accuracy = (run(tmp_path / "rtn.onnx", feed)[2].argmax(1) == labels).mean()
    assert accuracy >= (reference[2].argmax(1) == labels).mean() - 0.003


def test_smoothquant_per_token_int8_keeps_every_output_within_0999(encoder, tmp_path):
    """SmoothQuant (alpha 0.5) with per-token activations, weights rounded to nearest: every output's worst row at
    cosine 0.999 or more, each closer than ONNX Runtime's quantize_dynamic; per tensor it helps as much."""
    ort_quantization = pytest.importorskip("onnxruntime.quantization")
    import onnxruntime

    path, feed, _, reference = encoder
    report = quantize_dynamic(path, tmp_path / "sq.onnx", smoothquant=0.5, calibration_data_reader=Reader())
    ort_quantization.quantize_dynamic(path, tmp_path / "ort.onnx", weight_type=ort_quantization.QuantType.QInt8,
                                      per_channel=True)
    ours = min_cosines(run(tmp_path / "sq.onnx", feed), reference)
    theirs = min_cosines(onnxruntime.InferenceSession(tmp_path / "ort.onnx").run(None, feed), reference)
    assert min(ours) >= 0.999 and all(a > b for a, b in zip(ours, theirs)), (ours, theirs)
    assert any(note.startswith("smoothquant alpha 0.5: ") for note in report.notes)
    quantize_dynamic(path, tmp_path / "sq_tensor.onnx", smoothquant=0.5, per_token=False,
                     calibration_data_reader=Reader())
    assert min(min_cosines(run(tmp_path / "sq_tensor.onnx", feed), reference)) > min(theirs)


def test_smoothquant_folds_into_a_layer_norm_read_only_by_the_products(tmp_path, rng):
    """Pre-LN form (the norm's output read by two products alone): the factors go into its scale and bias, no Mul."""
    from onnx import TensorProto, helper, numpy_helper

    x_scale = np.ones(32, np.float32)
    x_scale[:4] = 40  # outlier channels, as transformers have
    gamma, beta = (x_scale * rng.uniform(0.5, 1.5, 32)).astype(np.float32), rng.normal(0, 0.1, 32).astype(np.float32)
    w1, w2 = (rng.normal(0, 0.2, (32, n)).astype(np.float32) for n in (24, 40))
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="norm", axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["y1"], name="p1"),
             helper.make_node("MatMul", ["h", "w2"], ["y2"], name="p2")]
    graph = helper.make_graph(nodes, "pre_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2")],
                              [numpy_helper.from_array(v, n) for n, v in (("gamma", gamma), ("beta", beta),
                                                                            ("w1", w1), ("w2", w2))])
    path = tmp_path / "pre_ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    class Data:
        left = 4

        def get_next(self):
            self.left -= 1
            return {"x": rng.normal(size=(64, 32)).astype(np.float32)} if self.left >= 0 else None

    quantize_dynamic(path, tmp_path / "plain.onnx", per_token=False)
    report = quantize_dynamic(path, tmp_path / "sq.onnx", per_token=False, smoothquant=0.5,
                              calibration_data_reader=Data())
    model = onnx.load(tmp_path / "sq.onnx")
    assert "Mul" not in [n.op_type for n in model.graph.node]
    assert model.graph.node[0].input[1].endswith("scale_smoothed")
    assert "smoothquant alpha 0.5: p1, p2: folded into 'norm'" in report.notes
    x = {"x": rng.normal(size=(256, 32)).astype(np.float32)}
    reference = run(path, x)
    assert min(min_cosines(run(tmp_path / "sq.onnx", x), reference)) > \
        min(min_cosines(run(tmp_path / "plain.onnx", x), reference))


@pytest.mark.parametrize("weight_type, block", [("int8", 128), ("int4", 32), ("nf4", 32)])
def test_bias_correction_brings_rounded_weights_closer(encoder, tmp_path, weight_type, block):
    path, feed, _, reference = encoder
    quantize_dynamic(path, tmp_path / "rtn.onnx", weight_type=weight_type, block_size=block)
    quantize_dynamic(path, tmp_path / "bc.onnx", weight_type=weight_type, block_size=block, bias_correction=True,
                     calibration_data_reader=Reader())
    plain, corrected = (min_cosines(run(tmp_path / f, feed), reference) for f in ("rtn.onnx", "bc.onnx"))
    assert all(c > p for c, p in zip(corrected, plain)), (plain, corrected)


def test_int4_with_an_accuracy_target_keeps_most_weights_in_int4(encoder, tmp_path):
    path, feed, _, reference = encoder
    report = quantize_dynamic(path, tmp_path / "mixed.onnx", weight_type="int4", block_size=32, method="gptq",
                              calibration_data_reader=Reader(), accuracy_target=0.99)
    assert min(min_cosines(run(tmp_path / "mixed.onnx", feed), reference)) >= 0.99
    model = onnx.load(tmp_path / "mixed.onnx")
    k_n = {n.name: dict((a.name, a.i) for a in n.attribute) for n in model.graph.node if n.op_type == "MatMulNBits"}
    int4_weights = sum(a["K"] * a["N"] for a in k_n.values())
    all_weights = int4_weights + sum(
        onnx.numpy_helper.to_array(t).size for t in model.graph.initializer if t.name.endswith(".weight_quantized"))
    assert int4_weights >= 0.6 * all_weights
    assert report.notes[0].startswith("accuracy target min cosine >= 0.99: reached ")
    assert any(note.endswith(" alone costs " + note.rpartition(" ")[2]) for note in report.notes[1:])


@pytest.mark.parametrize("name", [f for f in FORMATS if FORMATS[f].ops.get("Gemm", "").startswith("lowbit.")
                                  and f not in ("int8", "int4")])
def test_lowbit_formats_are_written_in_the_lowbit_domain(encoder, tmp_path, name):
    """nf4 / ternary / binary weights: the table's op, in ONNX's sub-byte types, which lowbit reads back and runs."""
    path, feed, labels, reference = encoder
    report = quantize_dynamic(path, tmp_path / f"{name}.onnx", weight_type=name, block_size=32)
    fmt = FORMATS[name]
    model = onnx.load(tmp_path / f"{name}.onnx")
    ops = {f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain == "lowbit"}
    assert ops == {fmt.ops["Gemm"]}
    codes = [t for t in model.graph.initializer if t.name.endswith(".codes")]
    stored = onnx.TensorProto.UINT4 if name == "nf4" else onnx.TensorProto.INT2
    assert codes and {t.data_type for t in codes} == {stored}
    assert all(n.action == fmt.ops["Gemm"] for n in report.quantized)
    outputs = run(tmp_path / f"{name}.onnx", feed)
    assert all(np.isfinite(y).all() for y in outputs)
    if name == "nf4":  # 4-bit codebook weights keep the classifier
        assert (outputs[2].argmax(1) == labels).mean() >= 0.95


def test_accuracy_target_errors(encoder, tmp_path):
    path = encoder[0]
    with pytest.raises(ValueError, match="calibration_data_reader: accuracy_target needs calibration data"):
        quantize_dynamic(path, tmp_path / "x.onnx", accuracy_target=0.99)
    with pytest.raises(ValueError, match=r"accuracy_target: cosine must be a number in \(0, 1\], got 1.5"):
        quantize_dynamic(path, tmp_path / "x.onnx", accuracy_target=1.5, calibration_data_reader=Reader())
    with pytest.raises(ValueError, match="accuracy_target: the metric must be one of"):
        quantize_dynamic(path, tmp_path / "x.onnx", accuracy_target={"snr": 30}, calibration_data_reader=Reader())
    with pytest.raises(TypeError, match="accuracy_target: expected a minimum cosine"):
        quantize_dynamic(path, tmp_path / "x.onnx", accuracy_target="high", calibration_data_reader=Reader())
    with pytest.raises(ValueError, match="method: 'gptq' fits int8 and int4 weights; nf4"):
        quantize_dynamic(path, tmp_path / "x.onnx", weight_type="nf4", method="gptq", calibration_data_reader=Reader())
    with pytest.raises(ValueError, match=r"smoothquant: expected None or a migration strength in \[0, 1\]"):
        quantize_dynamic(path, tmp_path / "x.onnx", smoothquant=2, calibration_data_reader=Reader())
    with pytest.raises(ValueError, match="calibration_data_reader: smoothquant needs calibration data"):
        quantize_dynamic(path, tmp_path / "x.onnx", smoothquant=0.5)
    with pytest.raises(ValueError, match="bias_correction: corrects rounded-to-nearest weights; method='gptq'"):
        quantize_dynamic(path, tmp_path / "x.onnx", bias_correction=True, method="gptq",
                         calibration_data_reader=Reader())
    with pytest.raises(ValueError, match="calibration_data_reader: bias_correction needs calibration data"):
        quantize_dynamic(path, tmp_path / "x.onnx", bias_correction=True)
    with pytest.raises(ValueError, match=r"group_size: nf4 takes one of \[32, 64, 128, 256\], got 16"):
        quantize_dynamic(path, tmp_path / "x.onnx", weight_type="nf4", block_size=16)


def test_the_search_raises_to_float_then_lowers_by_bytes_per_loss():
    """choose_precisions on a model whose metric is known exactly: layer a may not go to int4, b must go to float."""
    costs = {"int4": {"a": 0.02, "b": 0.001, "c": 0.001}, "int8": {"a": 0.0, "b": 0.02, "c": 0.0}}
    nbytes = {"float": 4, "int8": 1, "int4": 0.5}

    def evaluate(assignment):
        return 1.0 - sum(costs.get(p, {}).get(n, 0.0) for n, p in assignment.items())

    choices, value = choose_precisions(["a", "b", "c"], ["int4", "int8", "float"],
                                       lambda n, p: int(100 * nbytes[p]), evaluate, AccuracyTarget.of(0.99))
    assert {n: c.precision for n, c in choices.items()} == {"a": "int8", "b": "float", "c": "int4"}
    assert value == pytest.approx(0.999) and choices["a"].alone_loss == pytest.approx(0.02)
    assert AccuracyTarget.of({"relative_error": 0.1}).met(0.05) and not AccuracyTarget.of(0.99).met(0.98)
