"""The lowbit command line: every subcommand on small inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from lowbit.graph import GraphBuilder, TensorSpec


def test_info_json(capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active_level"] == "generic"


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "active_level" in out and "kernels chosen" in out
    assert all(op in out for op in ("gemm_int8", "gemm_int4", "gemm_ternary", "gemm_binary", "conv_int8"))


def test_bench_table(capsys, monkeypatch):
    monkeypatch.setattr("lowbit.benchmark.ROUNDS", 1)
    assert main(["bench", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "int8 GEMM" in captured.out and "binary conv" in captured.out and "ratio" in captured.out
    assert captured.err.startswith("[1/") and "binary conv" in captured.err  # progress, case by case


def test_warmup(capsys):
    assert main(["warmup"]) == 0
    assert "qlinear_conv2d" in capsys.readouterr().out
    assert main(["warmup"]) == 0  # again: nothing left to compile
    assert "every kernel was already compiled" in capsys.readouterr().out


def test_warmup_covers_every_compiled_kernel():
    """Every public function of ``kernels`` that runs compiled code is among warmup's calls (packing, plans made
    by the functions they prepare, and the NumPy-only helpers aside)."""
    import inspect

    import kernels
    from lowbit.warmup import _calls

    numpy_only = {"cpu_info", "get_num_threads", "set_num_threads", "lookup_table", "max_k_int32"}
    public = {name for name, f in vars(kernels).items() if inspect.isfunction(f) and not name.startswith("_")}
    compiled = {n for n in public - numpy_only if not n.endswith("_plan") and not n.startswith(("pack_", "unpack_"))}
    assert compiled - {name.split()[0] for name, _ in _calls()} == set()


def _model(rng) -> lowbit.graph.Graph:
    g = GraphBuilder({"x": TensorSpec((None, 3, 8, 8))})
    h = g.relu(g.conv("x", rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0, 0.1, 8), pads=(1, 1, 1, 1)))
    return g.build([g.gemm(g.flatten(h), rng.normal(0, 0.05, (10, 512)), np.zeros(10))])


def test_quantize_run_report(tmp_path, capsys, rng):
    model, quantized = tmp_path / "float.lowbit", tmp_path / "int8.lowbit"
    lowbit.save(_model(rng), model)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["quantize", str(model), "-o", str(quantized), "--calibration", str(tmp_path / "x.npy")]) == 0
    assert main(["run", str(quantized), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]) == 0
    assert np.load(tmp_path / "y.npy").shape == (4, 10)
    assert main(["report", str(quantized), "--reference", str(model), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "SQNR" in out and "ran in" in out


def test_demo_quick(capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--quick"]) == 0
    assert "int8" in capsys.readouterr().out


def _onnx_model(tmp_path, rng):
    """A float Conv + Relu ONNX file with a symbolic batch, and one with an op lowbit cannot run."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    good = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(good, str(tmp_path / "conv.onnx"))
    nodes.append(helper.make_node("Unique", ["y"], ["u"]))
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, None)
    bad = helper.make_model(helper.make_graph(nodes, "g", [x], [u], [w]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(bad, str(tmp_path / "unique.onnx"))
    return tmp_path / "conv.onnx", tmp_path / "unique.onnx", good


def test_onnx_run_inspect_bench(tmp_path, capsys, rng):
    from onnx.reference import ReferenceEvaluator

    path, unsupported, model = _onnx_model(tmp_path, rng)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(path), "--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "y.npz")]) == 0
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=1e-4,
                                   atol=1e-5)
    assert main(["inspect", str(path), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "input x: tensor(float) ['N', 3, 8, 8]" in out and "Conv x1, Relu x1" in out and "im2col" in out
    assert main(["inspect", str(unsupported)]) == 1
    assert "Unique (opset 17): 1 node(s)" in capsys.readouterr().out
    assert main(["bench", str(path), "--batch", "2", "--rounds", "1"]) == 0
    assert "lowbit" in capsys.readouterr().out
    assert main(["run", str(path), "--dim", "N"]) == 2
    assert "lowbit run: error: --dim: expected NAME=SIZE" in capsys.readouterr().err


def test_quantize_refuses_static_without_calibration_data(tmp_path, capsys, rng):
    model = tmp_path / "float.lowbit"
    lowbit.save(_model(rng), model)
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.lowbit")]) == 2
    assert "static activations need calibration data: --calibration" in capsys.readouterr().err
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.lowbit"), "--activations", "dynamic"]) == 2
    assert re.search(r"int8 convolutions \(conv_\d+\) are static and need calibration data", capsys.readouterr().err)
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.lowbit"), "--weights", "int4",
                 "--activations", "dynamic"]) == 0  # weight-only layers need no data


def test_quantize_says_which_layers_keep_int8(tmp_path, capsys, rng):
    model = tmp_path / "float.lowbit"
    lowbit.save(_model(rng), model)
    np.save(tmp_path / "x.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    assert main(["quantize", str(model), "-o", str(tmp_path / "t.lowbit"), "--weights", "ternary",
                 "--calibration", str(tmp_path / "x.npy"), "--batch", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "op", "precision", "why"]
    assert lines[1].split()[1:] == ["Conv", "int8", "first", "or", "last", "layer", "(keep_first_last)"]
    assert lines[2].split()[1:] == ["Gemm", "int8", "first", "or", "last", "layer", "(keep_first_last)"]


def test_quantize_onnx_static_from_a_folder_and_dynamic_with_a_target(tmp_path, capsys, rng):
    onnx = pytest.importorskip("onnx")
    from lowbit.onnx import InferenceSession, examples

    cnn, bert = tmp_path / "cnn.onnx", tmp_path / "bert.onnx"
    onnx.save(examples.digits_cnn(), cnn)
    onnx.save(examples.bert_encoder(layers=1, hidden=64), bert)
    folder = tmp_path / "calibration"
    folder.mkdir()
    for i in range(3):  # one batch a file, read when needed
        np.savez(folder / f"{i}.npz", input=rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    assert main(["quantize", str(cnn), "-o", str(tmp_path / "cnn.qdq.onnx"), "--calibration", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "calibration batch 3/3" in captured.err and "QLinearConv" not in captured.out  # QDQ by default
    assert "conv0" in captured.out and InferenceSession(str(tmp_path / "cnn.qdq.onnx")).run(
        None, examples.image_feed(2, 8, channels=1))[0].shape == (2, 10)
    np.savez(tmp_path / "tokens.npz", **examples.token_feed(8, 16))
    assert main(["quantize", str(bert), "-o", str(tmp_path / "b.onnx"), "--activations", "dynamic",
                 "--accuracy-target", "0.99"]) == 2
    assert "--accuracy-target needs --calibration" in capsys.readouterr().err
    assert main(["quantize", str(bert), "-o", str(tmp_path / "b.onnx"), "--activations", "dynamic", "--weights",
                 "int4", "--block-size", "32", "--calibration", str(tmp_path / "tokens.npz"), "--batch", "4",
                 "--accuracy-target", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "accuracy target min cosine >= 0.99: reached" in out and "MatMulNBits" in out


def test_errors_are_one_line_with_exit_code_2_and_a_traceback_with_debug(tmp_path, capsys, rng):
    model, quantized = tmp_path / "float.lowbit", tmp_path / "int8.lowbit"
    lowbit.save(_model(rng), model)
    (tmp_path / "text.lowbit").write_text("not a model")
    assert main(["run", str(tmp_path / "text.lowbit")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit run: error: ") and "\n" not in err and err.endswith("(--debug shows where)")
    with pytest.raises(ValueError, match="not a lowbit model file"):
        main(["--debug", "run", str(tmp_path / "text.lowbit")])
    x = rng.standard_normal((4, 3, 8, 8))  # float64, NumPy's default
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(model), "--input", str(tmp_path / "x.npy")]) == 0
    assert "input 'x' is float64, cast to float32" in capsys.readouterr().err
    assert main(["run", str(model), "--input", str(tmp_path / "x.npy"), "--batch", "2"]) == 2
    assert "--batch: the arrays of --input set the batch" in capsys.readouterr().err
    assert main(["quantize", str(model), "-o", str(quantized), "--calibration", str(tmp_path / "x.npy")]) == 0
    assert main(["quantize", str(quantized), "-o", str(tmp_path / "again.lowbit"),
                 "--calibration", str(tmp_path / "x.npy")]) == 2
    assert "graph: already quantized (nodes" in capsys.readouterr().err


def test_version_and_every_option_documented(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"
    import argparse

    from lowbit import cli

    parsers = []
    real = argparse.ArgumentParser.parse_args
    try:
        argparse.ArgumentParser.parse_args = lambda self, *a, **k: parsers.append(self) or real(self, *a, **k)
        main(["info", "--json"])
    finally:
        argparse.ArgumentParser.parse_args = real
    capsys.readouterr()
    (top,) = parsers
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    undocumented = [f"{name} {' / '.join(a.option_strings) or a.dest}" for name, p in [("lowbit", top), *subs.items()]
                    for a in p._actions if a.help is None and not isinstance(a, argparse._SubParsersAction)]
    assert not undocumented and cli.UsageError
