"""lowbit.demo.encoder: a transformer encoder trained in NumPy on the digits, exported to ONNX.

Its hand-written gradients against finite differences, deterministic training, the trained model's accuracy, the
NumPy forward pass against ONNX Runtime and lowbit.onnx.InferenceSession on the same file, and lowbit's fusions of
the encoder (attention, LayerNorm, Linear, GELU). The trained model comes from ``encoder_model``'s cache (trained
once, about 10 s on one core, when the cache is cold).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import lowbit.onnx  # noqa: E402
from lowbit.demo import encoder  # noqa: E402
from lowbit.onnx import examples  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
TINY = encoder.EncoderConfig(patch=(4, 2), hidden=8, heads=2, ffn=12, layers=2, classes=10)


@pytest.fixture(scope="module")
def trained():
    """``(path, config, params)`` of the default encoder, seed 0, from the cache."""
    path = encoder.encoder_model(seed=0)
    return path, encoder.config_from_onnx(path), encoder.params_from_onnx(path)


@pytest.fixture(scope="module")
def test_split():
    return encoder.digits_tokens("test")


def _ort(model):
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _lowbit(model):
    return lowbit.onnx.InferenceSession(model if isinstance(model, str) else model.SerializeToString())


# ---- the NumPy model -----------------------------------------------------------------------------------------------

def test_gradients_match_finite_differences(rng):
    """Every entry of every parameter of a tiny encoder (float64), central differences of the loss."""
    params = encoder.init_params(TINY, seed=3, dtype=np.float64)
    for name, value in params.items():  # biases and LayerNorm parameters away from their 0 / 1 start
        if value.ndim == 1:
            params[name] = value + rng.standard_normal(value.shape) * 0.3
    x = rng.random((3, TINY.seq, TINY.features))
    y = rng.integers(0, TINY.classes, 3)
    loss, grads = encoder.loss_and_grads(params, x, y, TINY)
    assert set(grads) == set(params) and np.isfinite(loss)

    def f() -> float:
        return encoder.loss_and_grads(params, x, y, TINY)[0]

    eps = 1e-6
    for name, value in params.items():
        numeric = np.empty_like(value)
        for i in np.ndindex(value.shape):
            old = value[i]
            value[i] = old + eps
            up = f()
            value[i] = old - eps
            numeric[i] = (up - f()) / (2 * eps)
            value[i] = old
        assert grads[name].shape == value.shape and grads[name].dtype == np.float64, name
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_tokens_layout():
    from lowbit.demo.digits import load_digits

    images = load_digits(0)[1]  # the test images [N, 1, 8, 8]
    rows, labels = encoder.digits_tokens("test")
    assert rows.shape == (360, 8, 8) and rows.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(rows, images[:, 0])  # token r = row r
    patches = encoder.to_tokens(images, (2, 2))
    assert patches.shape == (360, 16, 4)
    np.testing.assert_array_equal(patches[:, 5], images[:, 0, 2:4, 2:4].reshape(-1, 4))  # patch row 1, column 1
    batches = encoder.feeds(rows, 100)
    assert [b["pixels"].shape[0] for b in batches] == [100, 100, 100, 60]
    with pytest.raises(ValueError, match="split"):
        encoder.digits_tokens("validation")
    with pytest.raises(ValueError, match="patch"):
        encoder.EncoderConfig(patch=(3, 8))


def test_training_is_deterministic_and_exports_what_it_trained():
    training = encoder.TrainingConfig(epochs=1, batch_size=64)
    first, a = encoder.train_encoder(5, TINY, training)
    second, b = encoder.train_encoder(5, TINY, training)
    _, c = encoder.train_encoder(6, TINY, training)
    assert first.graph.SerializeToString() == second.graph.SerializeToString()  # metadata: the seconds differ
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    assert not np.array_equal(a.params["classifier.weight"], c.params["classifier.weight"])
    assert len(a.history) == 1 and a.history[0]["loss"] < np.log(10)  # learnt something in one epoch
    exported = encoder.params_from_onnx(first)
    assert exported.keys() == a.params.keys()
    assert all(np.array_equal(exported[n], a.params[n]) for n in a.params)
    assert encoder.config_from_onnx(first) == TINY


# ---- the trained model ---------------------------------------------------------------------------------------------

def test_trained_encoder_accuracy(trained, test_split):
    path, config, params = trained
    x, y = test_split
    meta = encoder.model_metadata(path)
    assert float(meta["lowbit.demo.encoder.test_accuracy"]) >= 0.95
    assert config == encoder.EncoderConfig() and (config.seq, config.features, config.hidden) == (8, 8, 64)
    logits = _ort(path).run(["logits"], {"pixels": x})[0]
    assert (logits.argmax(axis=1) == y).mean() == pytest.approx(float(meta["lowbit.demo.encoder.test_accuracy"]))


def test_numpy_lowbit_and_onnxruntime_agree(trained, test_split):
    path, config, params = trained
    x, y = test_split
    mine, theirs = _lowbit(path), _ort(path)
    assert [(i.name, i.shape) for i in mine.get_inputs()] == [("pixels", ["batch", 8, 8])]
    assert [(o.name, o.shape) for o in mine.get_outputs()] == [
        ("last_hidden_state", ["batch", 8, 64]), ("embedding", ["batch", 64]), ("logits", ["batch", 10])]
    for batch in (x, x[:1], x[:7]):  # one session, several batch sizes
        feed = {"pixels": batch}
        expected = dict(zip(encoder.OUTPUTS, theirs.run(None, feed)))
        got = dict(zip(encoder.OUTPUTS, mine.run(None, feed)))
        numpy = encoder.forward(params, batch, config)
        for name in encoder.OUTPUTS:
            for who, value in (("lowbit", got[name]), ("numpy", numpy[name])):
                assert value.dtype == np.float32 and value.shape == expected[name].shape
                np.testing.assert_allclose(value, expected[name], rtol=RTOL, atol=ATOL, err_msg=f"{who} {name}")
        np.testing.assert_allclose(got["embedding"], got["last_hidden_state"].mean(axis=1), rtol=1e-5, atol=1e-6)
    accuracies = [(logits.argmax(axis=1) == y).mean() for logits in (
        mine.run(["logits"], {"pixels": x})[0], theirs.run(["logits"], {"pixels": x})[0],
        encoder.forward(params, x, config)["logits"])]
    assert accuracies[0] == accuracies[1] == accuracies[2] >= 0.95


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_lowbit_fuses_the_encoder(trained, test_split, opset):
    """Attention blocks, LayerNorms (decomposed below opset 17), Linears and GELUs become lowbit's fused ops and
    run on its kernels; the result stays ONNX Runtime's."""
    _, config, params = trained
    model = encoder.export_onnx(params, config, opset)
    session = _lowbit(model)
    ops = collections.Counter(n.op for n in session.graph.nodes)
    layers = config.layers
    assert ops["lowbit.Attention"] == layers
    assert ops["LayerNormalization"] == 2 * layers + 1
    # the patch embedding, Q, K, V, the attention output and the FFN output per layer; the FFN input's bias goes
    # into BiasGelu
    assert ops["lowbit.Linear"] == 1 + 5 * layers
    assert ops["com.microsoft.BiasGelu"] + ops["com.microsoft.Gelu"] == layers
    assert not {"Softmax", "Erf", "Sqrt", "Pow", "Transpose", "lowbit.MaskedSoftmax"} & set(ops)
    x = test_split[0][:16]
    notes = collections.Counter(row.note for row in session.profile({"pixels": x}, repeat=1).rows)
    assert notes["kernels.attention"] == layers and notes["kernels.layer_norm"] == 2 * layers + 1
    for got, expected in zip(session.run(None, {"pixels": x}), _ort(model).run(None, {"pixels": x})):
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


# ---- cache and builder ---------------------------------------------------------------------------------------------

def test_encoder_model_trains_once(tmp_path, monkeypatch):
    training = encoder.TrainingConfig(epochs=1, batch_size=128)
    monkeypatch.setenv(encoder.CACHE_ENV, str(tmp_path))
    path = encoder.encoder_model(seed=1, config=TINY, training=training)
    assert path.startswith(str(tmp_path)) and encoder.config_from_onnx(path) == TINY
    given = encoder.encoder_model(tmp_path / "mine.onnx", seed=1, config=TINY, training=training)

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(encoder, "train_encoder", refuse)
    assert encoder.encoder_model(seed=1, config=TINY, training=training) == path
    assert encoder.encoder_model(tmp_path / "mine.onnx", seed=1, config=TINY, training=training) == given
    with pytest.raises(AssertionError, match="trained again"):  # another seed: another file
        encoder.encoder_model(seed=2, config=TINY, training=training)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"mine.onnx", path.rsplit("/", 1)[-1]})


def test_patch_encoder_checks_given_weights():
    params = encoder.init_params(TINY)
    build = dict(seq=TINY.seq, features=TINY.features, hidden=TINY.hidden, heads=TINY.heads, ffn=TINY.ffn,
                 layers=TINY.layers)
    examples.patch_encoder(**build, params=params)
    with pytest.raises(ValueError, match=r"params\['classifier.bias'\]: expected shape \[10\], got \[3\]"):
        examples.patch_encoder(**build, params={**params, "classifier.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="no initializer named"):
        examples.patch_encoder(**build, params={**params, "pooler.weight": np.zeros(3, np.float32)})
    random = examples.patch_encoder(**build)  # drawn weights, as the other examples
    assert [o.name for o in random.graph.output] == list(encoder.OUTPUTS)
