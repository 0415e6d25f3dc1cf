"""The lowbit command line: every subcommand on small inputs."""

from __future__ import annotations

import json

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
    out = capsys.readouterr().out
    assert "int8 GEMM" in out and "binary conv" in out and "ratio" in out


def test_warmup(capsys):
    assert main(["warmup"]) == 0
    assert "qlinear_conv2d" in capsys.readouterr().out


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
