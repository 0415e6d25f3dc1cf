"""quantize_model, sensitivity and mixed_precision on a small CNN and MLP."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.graph import GraphBuilder, TensorSpec
from lowbit.io import model_size
from lowbit.quantization.metrics import sqnr_db
from lowbit.ptq import QuantConfig, Quantizer, quantize_model
from lowbit.quantization.formats import FORMATS
from lowbit.runtime.session import Session
from lowbit.sensitivity import SensitivityReport, mixed_precision, sensitivity


def make_cnn(rng) -> object:
    g = GraphBuilder({"x": TensorSpec((None, 3, 12, 12))})
    h = g.conv("x", rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0, 0.1, 8), pads=(1, 1, 1, 1), name="conv_a")
    h = g.batch_norm(h, rng.uniform(0.5, 1.5, 8), rng.normal(0, 0.1, 8), rng.normal(0, 0.1, 8), rng.uniform(0.5, 1.5, 8))
    h = g.max_pool(g.relu(h), (2, 2))
    h = g.relu(g.conv(h, rng.normal(0, 0.15, (16, 8, 3, 3)), rng.normal(0, 0.1, 16), pads=(1, 1, 1, 1), name="conv_b"))
    h = g.flatten(g.global_average_pool(h))
    return g.build([g.gemm(h, rng.normal(0, 0.3, (10, 16)), rng.normal(0, 0.1, 10), name="fc")])


def make_mlp(rng, widths=(64, 96, 96, 10)) -> object:
    g = GraphBuilder({"x": TensorSpec((None, widths[0]))})
    h = "x"
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        h = g.gemm(h, rng.normal(0, 1 / np.sqrt(k), (n, k)), rng.normal(0, 0.1, n), name=f"fc{i}")
        if i < len(widths) - 2:
            h = g.relu(h)
    return g.build([h])


@pytest.fixture
def cnn(rng):
    graph = make_cnn(rng)
    data = [rng.normal(size=(8, 3, 12, 12)).astype(np.float32) for _ in range(3)]
    return graph, data, rng.normal(size=(16, 3, 12, 12)).astype(np.float32)


@pytest.fixture
def mlp(rng):
    graph = make_mlp(rng)
    data = [rng.normal(size=(32, 64)).astype(np.float32) for _ in range(3)]
    return graph, data, rng.normal(size=(64, 64)).astype(np.float32)


def outputs(graph, x):
    return Session(graph, fallback=False).run({"x": x})[graph.outputs[0]]


def sqnr(graph, quantized, x):
    return sqnr_db(outputs(graph, x), outputs(quantized, x))


def ops(graph):
    return [n.op for n in graph.nodes]


def test_int8_cnn_is_close_and_chains_quantized_layers(cnn):
    graph, data, x = cnn
    q = quantize_model(graph, data)
    assert sqnr(graph, q, x) > 30
    assert ops(q).count("QLinearConv") == 2 and ops(q).count("lowbit.QGemm") == 1
    assert "BatchNormalization" not in ops(q) and "Relu" not in ops(q)  # folded and fused
    assert all(p.dtype != np.float32 or p.size <= 16 for p in q.params.values())  # only scales / biases stay float
    conv = q.node("conv_a")
    assert q.params[conv.inputs[8]].dtype == np.int32 and conv.attrs["activation"] == "relu"
    assert q.outputs == graph.outputs
    assert outputs(q, x).dtype == np.float32


def test_int8_mlp_passes_codes_between_layers(mlp):
    graph, data, x = mlp
    q = quantize_model(graph, iter(data))  # any iterable, read once
    assert ops(q) == ["QuantizeLinear", "lowbit.QGemm", "lowbit.QGemm", "lowbit.QGemm"]
    last = q.node("fc2")
    assert last.inputs[6:8] == ["", ""]  # the last layer writes floats
    assert q.node("fc0").inputs[6]  # the others write uint8 codes
    assert sqnr(graph, q, x) > 30


def test_int4_ternary_binary(cnn, mlp):
    graph, data, x = cnn
    q4 = quantize_model(graph, data, {"precision": "int4"})
    assert ops(q4).count("lowbit.Int4Conv") == 2 and "lowbit.Int4Gemm" in ops(q4)
    assert sqnr(graph, q4, x) > 15
    qb = quantize_model(graph, data, {"precision": "binary", "keep_first_last": False})
    assert ops(qb).count("lowbit.BinaryConv") == 2 and "lowbit.BinaryGemm" in ops(qb)
    assert np.isfinite(outputs(qb, x)).all()
    graph, data, x = mlp
    qt = quantize_model(graph, data, QuantConfig(precision="ternary", keep_first_last=False))
    assert ops(qt) == ["lowbit.TernaryGemm"] * 3
    codes = qt.params[qt.node("fc1").inputs[1]]
    assert set(np.unique(codes)) <= {-1, 0, 1}
    assert sqnr(graph, qt, x) > 0


def test_keep_first_last(cnn):
    graph, data, _ = cnn
    q = quantize_model(graph, data, {"precision": "binary"})
    assert q.node("conv_a").op == "QLinearConv" and q.node("fc").op == "lowbit.QGemm"
    assert q.node("conv_b").op == "lowbit.BinaryConv"
    with pytest.warns(UserWarning, match="conv_b: ternary not available for Conv, kept int8"):
        q = quantize_model(graph, data, {"precision": "ternary"})  # no ternary Conv: it stays int8
    assert q.node("conv_b").op == "QLinearConv"


#: the smallest output SQNR (dB) of the MLP with every layer in a format (binary: sign activations, no bound)
MLP_SQNR = {"int8": 30, "int4": 15, "nf4": 15, "ternary": 3}


@pytest.mark.parametrize("name", [f for f in FORMATS if f != "int8"])
def test_every_weight_format_on_the_mlp(mlp, name):
    """Each row of the format table quantizes a Gemm to its op, with the codes its storage allows, and runs."""
    graph, data, x = mlp
    fmt = FORMATS[name]
    q = quantize_model(graph, data, {"precision": name, "keep_first_last": False})
    assert ops(q) == [fmt.ops["Gemm"]] * 3
    node = q.node("fc1")
    codes = q.params[node.inputs[1]]
    assert codes.dtype == fmt.qtype.dtype and fmt.qtype.qmin <= codes.min() and codes.max() <= fmt.qtype.qmax
    assert node.attrs.get("group_size") == fmt.group_size(None)
    y = outputs(q, x)
    assert np.isfinite(y).all()
    if name in MLP_SQNR:
        assert sqnr(graph, q, x) > MLP_SQNR[name]


@pytest.mark.parametrize("name", [f for f in FORMATS if f != "int8"])
def test_every_weight_format_on_the_cnn_or_an_honest_substitute(cnn, name):
    """A Conv gets the format's Conv op, or int8 and a line saying so; never a silent change of precision."""
    graph, data, _ = cnn
    quantizer = Quantizer(graph, data, {"precision": name, "keep_first_last": False})
    q = quantizer.build()
    conv_op = FORMATS[name].op("Conv")
    assert q.node("conv_b").op == (conv_op or "QLinearConv")
    lines = quantizer.substitutions()
    assert bool(lines) == (conv_op is None)
    if lines:
        assert lines == [f"conv_a: {name} not available for Conv, kept int8",
                         f"conv_b: {name} not available for Conv, kept int8"]
    table = quantizer.summary().splitlines()
    assert table[2].split()[:3] == ["conv_b", "Conv", "int8" if lines else name]
    assert table[2].endswith(f"{name} not available for Conv") == bool(lines)


def test_group_size_follows_the_format(mlp):
    graph, data, _ = mlp
    q = quantize_model(graph, data, {"precision": "nf4", "group_size": 32, "keep_first_last": False})
    assert q.node("fc0").attrs["group_size"] == 32
    with pytest.raises(ValueError, match=r"config.group_size: int4 takes one of \[32, 64, 128, 256\], got 48"):
        QuantConfig(precision="int4", group_size=48)


def test_per_layer_overrides(cnn):
    graph, data, x = cnn
    q = quantize_model(graph, data, {"layers": {"conv_b": "int4", "fc": "float"}})
    assert q.node("conv_a").op == "QLinearConv"
    assert q.node("conv_b").op == "lowbit.Int4Conv" and q.node("fc").op == "Gemm"
    assert sqnr(graph, q, x) > 15
    q = quantize_model(graph, data, {"precision": "float", "layers": {"fc": "int8"}})
    assert ops(q).count("Conv") == 2 and q.node("fc").op == "lowbit.QGemm"


def test_dynamic_mode_needs_no_data(mlp, cnn):
    graph, data, x = mlp
    q = quantize_model(graph, None, {"activations": "dynamic"})
    assert ops(q) == ["lowbit.DynamicQGemm"] * 3
    assert sqnr(graph, q, x) > 30
    cnn_graph = cnn[0]
    with pytest.raises(ValueError, match="calibration_data: required"):
        quantize_model(cnn_graph, None, {"activations": "dynamic"})  # its Conv layers are static


def test_bias_correction_removes_the_mean_shift(mlp, rng):
    graph, _, _ = mlp
    data = [(rng.normal(size=(64, 64)) + 2).astype(np.float32)]  # inputs with a large mean: a visible shift
    config = {"precision": "int4", "group_size": 64, "layers": {"fc1": "float", "fc2": "float"}}
    plain = quantize_model(graph, data, config)
    corrected = quantize_model(graph, data, {**config, "bias_correction": True})
    fc0 = graph.node("fc0")
    ref = Session(graph, optimize=False).run({"x": data[0]}, [fc0.outputs[0]])[fc0.outputs[0]]
    fetch = plain.node("fc0").outputs[0]

    def shift(q):
        return np.abs(np.mean(Session(q, fallback=False).run({"x": data[0]}, [fetch])[fetch] - np.maximum(ref, 0), axis=0)).mean()

    assert shift(corrected) < 0.5 * shift(plain)
    assert not np.array_equal(plain.params[plain.node("fc0").inputs[3]], corrected.params[corrected.node("fc0").inputs[3]])


def test_smoothquant_moves_outliers_into_the_weights(rng):
    graph = make_mlp(rng, (32, 48, 8))
    data = [rng.normal(size=(64, 32)).astype(np.float32) for _ in range(2)]
    for d in data:
        d[:, 3] *= 50  # one outlier input channel
    x = data[0]
    plain = quantize_model(graph, data)
    smooth = quantize_model(graph, data, {"smoothquant": 0.5})
    assert ops(smooth)[0] == "Mul"  # 1 / s on the graph input (no producer to fold it into)
    assert ops(smooth).count("Mul") == 1  # fc0 -> relu -> fc1: folded into fc0's rows
    assert sqnr(graph, smooth, x) > sqnr(graph, plain, x) + 3
    assert sqnr(graph, quantize_model(graph, data, {"smoothquant": 0.5, "precision": "float"}), x) > 100


def test_observers_and_per_tensor(cnn):
    graph, data, x = cnn
    for config in ({"observer": "percentile"}, {"observer": "mse"}, {"per_channel": False}):
        assert sqnr(graph, quantize_model(graph, data, config), x) > 25


def test_config_errors(cnn):
    graph, data, _ = cnn
    with pytest.raises(ValueError, match="config.precision"):
        quantize_model(graph, data, {"precision": "int3"})
    with pytest.raises(ValueError, match="no Conv / Gemm layer named \\['conv_z'\\]"):
        quantize_model(graph, data, {"layers": {"conv_z": "int4"}})
    with pytest.raises(ValueError, match="config.layers\\['fc'\\]"):
        quantize_model(graph, data, {"layers": {"fc": "int2"}})
    with pytest.raises(ValueError, match="unknown fields"):
        quantize_model(graph, data, {"precison": "int8"})
    with pytest.raises(ValueError, match="config.observer"):
        QuantConfig(observer="magic")
    with pytest.raises(ValueError, match="config.smoothquant"):
        QuantConfig(smoothquant=2.0)
    with pytest.raises(ValueError, match="config.group_size"):
        QuantConfig(group_size=48)
    with pytest.raises(TypeError, match="config"):
        quantize_model(graph, data, "int8")
    with pytest.raises(TypeError, match="graph"):
        quantize_model("model.onnx", data)
    with pytest.raises(ValueError, match="calibration_data: no batches"):
        quantize_model(graph, [])
    with pytest.raises(TypeError, match="calibration_data"):
        quantize_model(graph, [[1, 2]])


def test_quantized_graph_saves_and_loads(cnn, tmp_path):
    import lowbit.io

    graph, data, x = cnn
    q = quantize_model(graph, data, {"layers": {"conv_b": "int4"}})
    lowbit.io.save(q, tmp_path / "q.lowbit")
    np.testing.assert_array_equal(outputs(lowbit.io.load(tmp_path / "q.lowbit"), x), outputs(q, x))


def test_sensitivity_table(cnn):
    graph, data, _ = cnn

    def agreement(outs):  # top-1 agreement with the float model's outputs
        return float(np.mean(outs["fc"].argmax(1) == reference.argmax(1)))

    reference = np.concatenate([outputs(graph, d) for d in data])
    report = sensitivity(graph, data, {"precision": "int4"}, agreement, precisions=("int8", "binary"))
    assert isinstance(report, SensitivityReport) and report.float_metric == 1.0
    assert [(r.layer, r.precision) for r in report.rows] == [
        (n, p) for n in ("conv_a", "conv_b", "fc") for p in ("int8", "binary")]
    by = {(r.layer, r.precision): r for r in report.rows}
    assert all(by[n, "int8"].sqnr_db > by[n, "binary"].sqnr_db for n in ("conv_a", "conv_b", "fc"))
    assert all(r.size < report.float_size for r in report.rows)
    ranked = report.ranked()
    assert [r.delta for r in ranked] == sorted(r.delta for r in ranked)
    text = str(report).splitlines()
    assert text[0].split() == ["layer", "op", "precision", "sqnr_db", "metric", "delta", "size"]
    assert [line.split()[:3] for line in text[2:]] == [[r.layer, r.op, r.precision] for r in ranked]
    plain = sensitivity(graph, data)
    assert [r.sqnr_db for r in plain.ranked()] == sorted(r.sqnr_db for r in plain.rows)
    with pytest.raises(ValueError, match="precisions"):
        sensitivity(graph, data, precisions=("float",))


def test_sensitivity_plot(cnn, tmp_path):
    pytest.importorskip("matplotlib")
    graph, data, _ = cnn
    sensitivity(graph, data).plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_mixed_precision_meets_a_size_budget(mlp):
    graph, data, x = mlp
    sizes = {p: model_size(quantize_model(graph, data, {"precision": p})) for p in ("int8", "int4")}
    budget = (sizes["int8"] + sizes["int4"]) // 2
    chosen = mixed_precision(graph, data, choices=("int4", "int8"), size_budget=budget)
    assert set(chosen) == {"fc0", "fc1", "fc2"} and "int4" in chosen.values() and "int8" in chosen.values()
    q = quantize_model(graph, data, {"layers": chosen})
    assert model_size(q) <= budget
    everything = mixed_precision(graph, data, choices=("int8", "int4"), size_budget=1)  # unreachable: all lowered
    assert set(everything.values()) == {"int4"}
    with pytest.raises(ValueError, match="at least one"):
        mixed_precision(graph, data)
    with pytest.raises(ValueError, match="metric"):
        mixed_precision(graph, data, accuracy_budget=0.1)


def test_mixed_precision_respects_an_accuracy_budget(mlp):
    graph, data, _ = mlp
    reference = np.concatenate([outputs(graph, d) for d in data])

    def agreement(outs):
        return float(np.mean(outs["fc2"].argmax(1) == reference.argmax(1)))

    chosen = mixed_precision(graph, data, choices=("int8", "int4"), accuracy_budget=0.1, metric=agreement)
    q = quantize_model(graph, data, {"layers": chosen})
    assert agreement({"fc2": np.concatenate([outputs(q, d) for d in data])}) >= 0.9
    assert set(chosen.values()) == {"int8", "int4"}  # some layers lowered, not all
    binary = mixed_precision(graph, data, choices=("int8", "binary"), accuracy_budget=0.1, metric=agreement)
    assert set(binary.values()) == {"int8"}  # every binary layer costs > 40 % agreement here
