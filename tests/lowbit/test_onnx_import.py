"""lowbit.onnx: loading ONNX files (paths, bytes, protos, external data), ONNX Runtime's session API, hostile files."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lowbit  # noqa: E402
import lowbit.onnx as ort  # noqa: E402


def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _dense(rng, batch="batch"):
    """y = relu(x @ w + b): an input with a symbolic batch dimension and a Reshape whose shape is computed."""
    w = numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    return _model(nodes, [_value("x", TensorProto.FLOAT, [batch, 6])], [_value("y", TensorProto.FLOAT, [batch, 4])],
                  [w, b])


def _reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def test_path_bytes_and_proto_load_the_same_graph(rng, tmp_path):
    model = _dense(rng)
    path = tmp_path / "dense.onnx"
    onnx.save(model, str(path))
    x = rng.normal(size=(5, 6)).astype(np.float32)
    expected = _reference(model, {"x": x})[0]
    for source in (str(path), path, model.SerializeToString(), model):
        got = ort.InferenceSession(source).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    graph = lowbit.load(str(path))  # lowbit.load reads .onnx files too
    assert isinstance(graph, lowbit.Graph) and graph.inputs["x"].shape == ("batch", 6)
    assert lowbit.Session(model).run({"x": x})["y"].shape == (5, 4)


def test_session_api_matches_onnxruntime(rng):
    model = _dense(rng)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (arg,) = session.get_inputs()
    assert (arg.name, arg.shape, arg.type) == ("x", ["batch", 6], "tensor(float)")
    assert [(o.name, o.shape, o.type) for o in session.get_outputs()] == [("y", ["batch", 4], "tensor(float)")]
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert ort.get_available_providers() == ["CPUExecutionProvider"]
    assert session.get_modelmeta().graph_name == "g"
    for batch in (1, 3, 8):  # one session, several batch sizes
        x = rng.normal(size=(batch, 6)).astype(np.float32)
        got = session.run(["y"], {"x": x})
        np.testing.assert_allclose(got[0], _reference(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert session.run([], {"x": x})[0].shape == (8, 4)  # [] and None: all outputs
    assert session.run(["h"], {"x": x})[0].shape == (8, 4)  # an intermediate tensor by name
    with pytest.raises(ValueError, match=r"\['xw'\] were fused .*ORT_DISABLE_ALL"):  # into lowbit.Linear
        session.run(["xw"], {"x": x})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(model.SerializeToString(), options)
    np.testing.assert_allclose(unfused.run(["xw"], {"x": x})[0], x @ numpy_helper.to_array(model.graph.initializer[0]),
                               rtol=1e-5, atol=1e-6)


def test_session_options(rng, tmp_path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prof")
    session = ort.InferenceSession(_dense(rng).SerializeToString(), sess_options=options)
    session.run(None, {"x": np.ones((2, 6), np.float32)})
    path = session.end_profiling()
    assert os.path.exists(path) and "nodes" in open(path).read()
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        bad = ort.SessionOptions()
        bad.intra_op_num_threads = -1
        ort.InferenceSession(_dense(rng), bad)


def test_input_errors_name_the_input(rng):
    session = ort.InferenceSession(_dense(rng))
    with pytest.raises(ValueError, match=r"missing input 'x' \(tensor\(float\)"):
        session.run(None, {})
    with pytest.raises(ValueError, match="unknown inputs"):
        session.run(None, {"x": np.ones((1, 6), np.float32), "z": np.ones(1)})
    with pytest.raises(TypeError, match=r"input 'x': expected tensor\(float\).*got float64"):
        session.run(None, {"x": np.ones((1, 6))})
    with pytest.raises(ValueError, match="input 'x': expected rank 2"):
        session.run(None, {"x": np.ones(6, np.float32)})
    with pytest.raises(ValueError, match="input 'x': dimension 1 must be 6"):
        session.run(None, {"x": np.ones((1, 5), np.float32)})
    with pytest.raises(TypeError, match="output_names"):
        session.run("y", {"x": np.ones((1, 6), np.float32)})


def test_a_symbol_binds_one_size_per_run():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    model = _model(nodes, [_value("a", TensorProto.FLOAT, ["n", 3]), _value("b", TensorProto.FLOAT, ["n", 3])],
                   [_value("y", TensorProto.FLOAT, ["n", 3])])
    session = ort.InferenceSession(model)
    assert session.run(None, {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)})[0].sum() == 12
    with pytest.raises(ValueError, match="'n' = 2 elsewhere in this run, got 1"):
        session.run(None, {"a": np.ones((2, 3), np.float32), "b": np.ones((1, 3), np.float32)})


def test_shape_subgraph_folds_per_input_shape(rng):
    """Reshape to [batch, -1] with the batch read by Shape / Gather / Unsqueeze / Concat, as exporters write it."""
    shape_nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    consts = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
              numpy_helper.from_array(np.array([0], np.int64), "axes"),
              numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    model = _model(shape_nodes, [_value("x", TensorProto.FLOAT, ["b", 2, 3])], [_value("y", TensorProto.FLOAT,
                                                                                       ["b", 6])], consts)
    session = ort.InferenceSession(model)
    for batch in (1, 4):
        x = rng.normal(size=(batch, 2, 3)).astype(np.float32)
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], x.reshape(batch, 6))
    assert "folded" in str(session.profile({"x": x}))


def test_unsupported_ops_are_all_listed_at_load():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("NonMaxSuppression", ["a", "a"], ["b"]),
             helper.make_node("StringNormalizer", ["x"], ["c"]), helper.make_node("NonMaxSuppression", ["a", "a"],
                                                                                  ["d"]),
             helper.make_node("Frob", ["x"], ["e"], domain="example.custom")]
    outputs = [_value(t, TensorProto.FLOAT, None) for t in "bcde"]
    model = _model(nodes, [_value("x", TensorProto.FLOAT, [2])], outputs,
                   extra_opsets=[helper.make_opsetid("example.custom", 1)])
    with pytest.raises(ort.UnsupportedModelError) as caught:
        ort.load(model)
    message = str(caught.value)
    assert "4 node(s) of 3 op type(s)" in message
    assert "NonMaxSuppression (opset 17): 2 node(s): NonMaxSuppression_1, NonMaxSuppression_3" in message
    assert "StringNormalizer" in message and "example.custom.Frob" in message
    assert set(caught.value.unsupported) == {"NonMaxSuppression", "StringNormalizer", "example.custom.Frob"}


def test_truncated_and_foreign_files(rng, tmp_path):
    data = _dense(rng).SerializeToString()
    for bad in (data[: len(data) // 2], b"\x00\x01garbage" * 10, b""):
        with pytest.raises(ValueError, match="not a valid ONNX model|not an ONNX model|does not match"):
            ort.load(bad)
    with pytest.raises(FileNotFoundError, match="no file"):
        ort.load(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="expected a path, bytes or an onnx.ModelProto"):
        ort.load(3.5)


def test_initializer_data_that_disagrees_with_its_shape(rng):
    model = _dense(rng)
    model.graph.initializer[0].dims[0] = 600  # claims 600 x 4, holds 6 x 4
    with pytest.raises(ValueError, match="initializer 'w': its data does not match its shape"):
        ort.load(model)


def test_a_cycle_is_refused():
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    model = _model(nodes, [_value("x", TensorProto.FLOAT, [2])], [_value("b", TensorProto.FLOAT, [2])])
    with pytest.raises(ValueError, match="a cycle, or an undefined tensor"):
        ort.load(model)


def test_opset_out_of_range():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", TensorProto.FLOAT, [2])],
                   [_value("y", TensorProto.FLOAT, [2])], opset=9)
    with pytest.raises(ValueError, match="opset 9 is outside"):
        ort.load(model)


def _external_model(rng, tmp_path, location):
    from onnx.external_data_helper import set_external_data

    model = _dense(rng)
    w = model.graph.initializer[0]
    values = numpy_helper.to_array(w)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16 + values.tobytes())
    set_external_data(w, location=location, offset=16, length=values.nbytes)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, values


def test_external_data_loads_from_the_model_folder(rng, tmp_path):
    path, values = _external_model(rng, tmp_path, "weights.bin")
    graph = ort.load(path)
    np.testing.assert_array_equal(graph.params["w"], values)
    with pytest.raises(ValueError, match="load the model from its path"):
        ort.load(path.read_bytes())


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd", "sub/../../weights.bin"])
def test_external_data_cannot_leave_the_model_folder(rng, tmp_path, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    path, _ = _external_model(rng, inner, location)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 200)
    with pytest.raises(ValueError, match="relative to the model|leads out of the model's folder"):
        ort.load(path)


def test_external_data_through_a_link_cannot_leave_the_folder(rng, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    path, _ = _external_model(rng, inner, "link.bin")
    (tmp_path / "outside.bin").write_bytes(b"\x00" * 200)
    os.symlink(tmp_path / "outside.bin", inner / "link.bin")
    with pytest.raises(ValueError, match="leads out of the model's folder"):
        ort.load(path)


def test_external_data_past_the_end_of_its_file(rng, tmp_path):
    path, _ = _external_model(rng, tmp_path, "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    entries = model.graph.initializer[0].external_data
    next(e for e in entries if e.key == "length").value = str(10**6)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="lie outside"):
        ort.load(path)


def test_optional_outputs_and_constants():
    nodes = [helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
             helper.make_node("Dropout", ["x"], ["d", ""]),
             helper.make_node("Add", ["d", "c"], ["y"])]
    model = _model(nodes, [_value("x", TensorProto.FLOAT, [2])], [_value("y", TensorProto.FLOAT, [2])])
    got = ort.InferenceSession(model).run(None, {"x": np.array([1, 1], np.float32)})[0]
    np.testing.assert_array_equal(got, [2, 3])


def test_fetching_a_fused_tensor_says_how_to_keep_it(rng):
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["y"])]
    model = _model(nodes, [_value("x", TensorProto.FLOAT, [1, 3, 5, 5])], [_value("y", TensorProto.FLOAT, None)],
                   [w])
    x = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"\['conv'\] were fused.*ORT_DISABLE_ALL"):
        ort.InferenceSession(model).run(["conv"], {"x": x})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    conv, y = ort.InferenceSession(model, options).run(["conv", "y"], {"x": x})
    np.testing.assert_array_equal(y, np.maximum(conv, 0))


def test_an_imported_float_cnn_stays_nchw_and_quantizes():
    """Loading keeps ONNX's layout (a Session lays convolution chains out channels-last when it runs them), so the
    graph can be quantized and saved like any lowbit graph."""
    from lowbit.onnx.examples import image_feed, resnet
    from lowbit.ptq import quantize_model

    graph = ort.load(resnet(image=12, width=8, blocks=1, stages=2))
    assert not any(n.attrs.get("layout") for n in graph.nodes)
    feeds = [image_feed(2, 12, seed=s) for s in range(2)]
    quantized = quantize_model(graph, feeds)
    x = image_feed(2, 12, seed=5)
    got = lowbit.Session(quantized).run(x)["logits"]
    want = lowbit.Session(graph).run(x)["logits"]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
