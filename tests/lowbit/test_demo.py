"""The demo's NumPy training code (gradients by finite differences, export) and a quick run of the digits demo."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lowbit.demo import train as nn
from lowbit.runtime.session import Session


def _numeric_gradient(f, x: np.ndarray, indices: list[tuple], eps: float = 1e-5) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to ``x[i]`` for each index (x changed in place)."""
    grads = []
    for i in indices:
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        grads.append((up - down) / (2 * eps))
    return np.array(grads)


def _check_gradients(layer: nn.Layer, x: np.ndarray, rng: np.random.Generator, training: bool = True) -> None:
    """Compare ``backward`` with finite differences of ``sum(r * forward(x))`` for x and every parameter."""
    for name in layer.params:
        layer.params[name] = layer.params[name].astype(np.float64)  # float64: differences stay accurate
    r = rng.standard_normal(layer.forward(x, training).shape)
    layer.forward(x, training)
    dx = layer.backward(r)

    def loss() -> float:
        return float((r * layer.forward(x, training)).sum())

    for array, grad in [(x, dx)] + [(layer.params[n], layer.grads[n]) for n in layer.params]:
        indices = [tuple(rng.integers(0, s) for s in array.shape) for _ in range(12)]
        np.testing.assert_allclose([grad[i] for i in indices], _numeric_gradient(loss, array, indices),
                                   rtol=1e-4, atol=1e-6)


def test_conv2d_gradients(rng):
    layer = nn.Conv2d(3, 4, kernel=3, pad=1, rng=rng)
    layer.params["b"] = rng.standard_normal(4)
    _check_gradients(layer, rng.standard_normal((2, 3, 5, 6)), rng)


def test_conv2d_without_padding_gradients(rng):
    _check_gradients(nn.Conv2d(2, 3, kernel=2, pad=0, rng=rng), rng.standard_normal((2, 2, 4, 4)), rng)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 3, 3)], ids=["1d", "2d"])
def test_batch_norm_gradients(rng, shape):
    layer = nn.BatchNorm(shape[1])
    layer.params["gamma"] = rng.uniform(0.5, 2, shape[1])
    layer.params["beta"] = rng.standard_normal(shape[1])
    _check_gradients(layer, rng.standard_normal(shape) * 2 + 1, rng)


def test_linear_gradients(rng):
    _check_gradients(nn.Linear(7, 5, rng=rng), rng.standard_normal((4, 7)), rng)


def test_max_pool_gradients(rng):
    _check_gradients(nn.MaxPool2d(), rng.standard_normal((2, 3, 4, 6)), rng)


def test_softmax_cross_entropy_gradient(rng):
    logits, labels = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    _, grad = nn.softmax_cross_entropy(logits, labels)
    indices = [(i, j) for i in range(5) for j in range(4)]
    numeric = _numeric_gradient(lambda: nn.softmax_cross_entropy(logits, labels)[0], logits, indices)
    np.testing.assert_allclose(grad.reshape(-1), numeric, rtol=1e-3, atol=1e-6)


def test_batch_norm_running_statistics(rng):
    layer = nn.BatchNorm(3, momentum=1.0)
    x = rng.standard_normal((10, 3)).astype(np.float32) * 3 + 2
    layer.forward(x, training=True)
    np.testing.assert_allclose(layer.mean, x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(layer.var, x.var(axis=0, ddof=1), rtol=1e-5)
    with pytest.raises(ValueError, match="x: BatchNorm"):
        layer.forward(np.zeros((2, 3, 4)))


def _trained_briefly(model: nn.Sequential, rng: np.random.Generator, shape=(1, 8, 8)) -> nn.Sequential:
    """A few steps on random data, so that batch-norm statistics and weights are not at their defaults."""
    x = rng.random((64, *shape)).astype(np.float32)
    nn.fit(model, x, rng.integers(0, 10, 64), epochs=2, batch_size=16)
    return model


def test_export_float_cnn_matches_numpy(rng):
    from lowbit.demo.digits import cnn, mlp

    x = rng.random((9, 1, 8, 8)).astype(np.float32)
    for model in (cnn(rng), mlp(rng)):
        graph = nn.export(_trained_briefly(model, rng))
        assert {n.op for n in graph.nodes} <= {"Conv", "BatchNormalization", "Relu", "MaxPool", "Flatten", "Gemm"}
        got = Session(graph).run({"x": x})[graph.outputs[0]]
        np.testing.assert_allclose(got, model.forward(x), rtol=1e-4, atol=1e-4)


def test_export_binary_and_ternary_match_numpy(rng):
    from lowbit.demo.digits import binary_cnn, mlp

    x = rng.random((9, 1, 8, 8)).astype(np.float32)
    binary = _trained_briefly(binary_cnn(rng), rng)
    graph = nn.export(binary)
    (conv, _) = [n for n in graph.nodes if n.op == "lowbit.BinaryConv"]
    assert conv.attrs["pad_value"] == 0 and set(np.unique(graph.params[conv.inputs[1]])) == {-1, 1}
    np.testing.assert_allclose(Session(graph).run({"x": x})[graph.outputs[0]], binary.forward(x), rtol=1e-4, atol=1e-4)

    ternary = _trained_briefly(mlp(rng, weights="twn"), rng)
    graph = nn.export(ternary)
    assert [n.op for n in graph.nodes] == ["Flatten"] + ["lowbit.TernaryGemm"] * 3
    want = ternary.forward(x)
    got = Session(graph).run({"x": x})[graph.outputs[0]]
    # the ternary kernel quantizes activations to int8 per row: close, not equal
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_export_rejects_unsupported_quantizers(rng):
    model = nn.Sequential([nn.Conv2d(1, 2, rng=rng, weights="twn"), nn.Flatten()])
    with pytest.raises(ValueError, match="export: no lowbit op"):
        nn.export(model)
    assert [n.op for n in nn.export(model, quantized=False).nodes] == ["Conv", "Flatten"]
    with pytest.raises(TypeError, match="model"):
        nn.export([nn.Flatten()])


def test_demo_without_scikit_learn(monkeypatch):
    from lowbit.demo import digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "lowbit\[demo\]"'):
        digits.load_digits()


def test_quick_demo(capsys):
    pytest.importorskip("sklearn")
    from lowbit.demo import digits

    lines = []
    rows = digits.run(quick=True, progress=lines.append)
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("CNN", "float32"), ("CNN", "int8"), ("CNN", "int4"), ("MLP", "float32"), ("MLP", "int8"), ("MLP", "int4"),
        ("MLP", "ternary"), ("binary CNN", "binary")]
    for row in rows:
        assert set(row) == set(digits.COLUMNS)
        assert row["accuracy"] > 0.6, row
        assert row["size"] > 0 and row["latency_ms"] > 0 and row["speedup"] > 0
    assert rows[0]["accuracy"] > 0.85 and rows[0]["size_ratio"] == 1
    assert rows[1]["size_ratio"] > 3 and rows[-1]["size_ratio"] > 4
    assert "save/load: identical" in "\n".join(lines)
    assert any("epoch 1/1" in line for line in lines)
