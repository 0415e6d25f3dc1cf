"""Small NumPy training code for the demo: layers with forward and backward, Adam, and export to a graph.

Every layer maps ``forward(x, training)`` to ``y`` and ``backward(dL/dy)`` to
``dL/dx``, leaving ``dL/dp`` in ``grads`` for each array of ``params``. A
:class:`Sequential` chains them, :func:`fit` trains one with mini-batches of
softmax cross-entropy and :class:`Adam`, and :func:`export` turns a trained
model into a ``lowbit.graph.Graph``.

Quantization-aware training uses the toolkit's fake quantizers
(``lowbit.quantization.fake``): a ``Conv2d`` / ``Linear`` may carry a weight
quantizer (``"xnor"``: ``alpha * sign(w)`` with ``alpha = mean |w|`` per output
channel, XNOR-Net; ``"twn"``: ternary weights, TWN) and an input quantizer
(``"ste_sign"``: ``sign(x)`` with the straight-through gradient clipped at
``|x| <= 1``). The forward pass uses the quantized values, the backward pass the
quantizers' straight-through gradients, and the optimizer updates the latent
float weights. :func:`export` writes such layers as lowbit's quantized ops
(``lowbit.BinaryConv``, ``lowbit.TernaryGemm``), folding a following batch norm
into their per-channel scale and bias.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lowbit.graph import Graph, GraphBuilder, TensorSpec
from lowbit.quantization import fake, grid
from lowbit.quantization.formats import FORMATS

FLOAT = np.float32


class Layer:
    """A layer without parameters; subclasses with parameters fill ``params`` (and ``grads`` in backward)."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _quantizer(name: str | None) -> fake._Quantizer | None:
    return None if name is None else fake.get(name)


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(FLOAT)


class Conv2d(Layer):
    """2-D convolution, NCHW, stride 1, zero padding ``pad`` on every side::

        y[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * xp[n, c, i + u, j + v]

    computed as one matmul of the im2col matrix (``sliding_window_view`` of the padded
    input) by ``w`` reshaped to ``[O, C*KH*KW]``. The backward pass is the transposed
    matmuls, and col2im adds each kernel offset's slice back into ``dL/dxp``.
    ``weights`` / ``inputs`` name fake quantizers (``fake.get``) applied to ``w`` / ``x``;
    padding comes after the input quantizer, so a binarized input is padded with 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, pad: int = 1, *,
                 rng: np.random.Generator, weights: str | None = None, inputs: str | None = None,
                 bias: bool = True):
        super().__init__()
        if kernel < 1 or pad < 0:
            raise ValueError(f"kernel, pad: expected kernel >= 1 and pad >= 0, got {kernel}, {pad}")
        self.pad = pad
        self.params["w"] = _he(rng, (out_channels, in_channels, kernel, kernel), in_channels * kernel * kernel)
        if bias:
            self.params["b"] = np.zeros(out_channels, FLOAT)
        self.weight_quantizer, self.input_quantizer = _quantizer(weights), _quantizer(inputs)

    def forward(self, x, training=False):
        if self.input_quantizer is not None:
            x = self.input_quantizer.forward(x)
        w = self.params["w"] if self.weight_quantizer is None else self.weight_quantizer.forward(self.params["w"])
        o, c, kh, kw = w.shape
        p = self.pad
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        cols = sliding_window_view(xp, (kh, kw), axis=(2, 3))  # [N, C, OH, OW, KH, KW]
        n, _, oh, ow = cols.shape[:4]
        cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
        y = cols @ w.reshape(o, -1).T
        if "b" in self.params:
            y += self.params["b"]
        self._cache = cols, w, xp.shape, (n, oh, ow)
        return np.ascontiguousarray(y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2))

    def backward(self, grad):
        cols, w, xp_shape, (n, oh, ow) = self._cache
        o, c, kh, kw = w.shape
        g = grad.transpose(0, 2, 3, 1).reshape(n * oh * ow, o)
        dw = (g.T @ cols).reshape(w.shape)
        self.grads["w"] = dw if self.weight_quantizer is None else self.weight_quantizer.backward(dw)
        if "b" in self.params:
            self.grads["b"] = g.sum(axis=0)
        # col2im in [C, KH, KW, N, OH, OW] order, so that each kernel offset adds a contiguous block
        dcols = (w.reshape(o, -1).T @ g.T).reshape(c, kh, kw, n, oh, ow)
        dxp = np.zeros((c, n) + xp_shape[2:], dcols.dtype)
        for u in range(kh):
            for v in range(kw):
                dxp[:, :, u:u + oh, v:v + ow] += dcols[:, u, v]
        p = self.pad
        dx = np.ascontiguousarray(dxp[:, :, p:xp_shape[2] - p, p:xp_shape[3] - p].transpose(1, 0, 2, 3))
        return dx if self.input_quantizer is None else self.input_quantizer.backward(dx)


class Linear(Layer):
    """``y = x @ w.T + b`` with ``w`` of shape ``[out, in]``; ``weights`` names a fake quantizer for ``w``."""

    def __init__(self, in_features: int, out_features: int, *, rng: np.random.Generator,
                 weights: str | None = None):
        super().__init__()
        self.params["w"] = _he(rng, (out_features, in_features), in_features)
        self.params["b"] = np.zeros(out_features, FLOAT)
        self.weight_quantizer = _quantizer(weights)

    def forward(self, x, training=False):
        w = self.params["w"] if self.weight_quantizer is None else self.weight_quantizer.forward(self.params["w"])
        self._cache = x, w
        return x @ w.T + self.params["b"]

    def backward(self, grad):
        x, w = self._cache
        dw = grad.T @ x
        self.grads["w"] = dw if self.weight_quantizer is None else self.weight_quantizer.backward(dw)
        self.grads["b"] = grad.sum(axis=0)
        return grad @ w


class BatchNorm(Layer):
    """Batch normalization over every axis but the channel axis 1 (BatchNorm1d on [N, C], 2d on NCHW)::

        y = gamma * (x - mu) / sqrt(var + eps) + beta

    with batch statistics in training (and running averages updated with ``momentum``)
    and the running ones in inference. Backward, with ``xh`` the normalized input and
    means over the m values of each channel::

        dL/dx = gamma / sqrt(var + eps) * (g - mean(g) - xh * mean(g * xh))
    """

    def __init__(self, channels: int, *, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.params["gamma"] = np.ones(channels, FLOAT)
        self.params["beta"] = np.zeros(channels, FLOAT)
        self.mean, self.var = np.zeros(channels, FLOAT), np.ones(channels, FLOAT)
        self.momentum, self.eps = momentum, eps

    def _shape(self, x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if x.ndim not in (2, 4):
            raise ValueError(f"x: BatchNorm expects [N, C] or [N, C, H, W], got shape {x.shape}")
        return (0,) if x.ndim == 2 else (0, 2, 3), (1, -1) if x.ndim == 2 else (1, -1, 1, 1)

    def forward(self, x, training=False):
        axes, shape = self._shape(x)
        if training:
            mean, var = x.mean(axis=axes), x.var(axis=axes)
            m = x.size // len(mean)  # values per channel; the running variance is the unbiased one
            self.mean += self.momentum * (mean - self.mean)
            self.var += self.momentum * (var * m / max(m - 1, 1) - self.var)
        else:
            mean, var = self.mean, self.var
        inv = 1 / np.sqrt(var + self.eps)
        xh = (x - mean.reshape(shape)) * inv.reshape(shape)
        self._cache = xh, inv, axes, shape
        return xh * self.params["gamma"].reshape(shape) + self.params["beta"].reshape(shape)

    def backward(self, grad):
        xh, inv, axes, shape = self._cache
        self.grads["gamma"] = (grad * xh).sum(axis=axes)
        self.grads["beta"] = grad.sum(axis=axes)
        g = grad - grad.mean(axis=axes, keepdims=True) - xh * (grad * xh).mean(axis=axes, keepdims=True)
        return g * (self.params["gamma"] * inv).reshape(shape)


class ReLU(Layer):
    def forward(self, x, training=False):
        self._mask = x > 0
        return x * self._mask

    def backward(self, grad):
        return grad * self._mask


class MaxPool2d(Layer):
    """2x2 max pooling, stride 2 (even H and W); the gradient goes to the first maximum of each window."""

    def forward(self, x, training=False):
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"x: MaxPool2d needs even H and W, got shape {x.shape}")
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self._arg, self._shape = windows.argmax(axis=-1), x.shape
        return np.take_along_axis(windows, self._arg[..., None], axis=-1)[..., 0]

    def backward(self, grad):
        n, c, h, w = self._shape
        windows = np.zeros((n, c, h // 2, w // 2, 4), grad.dtype)
        np.put_along_axis(windows, self._arg[..., None], grad[..., None], axis=-1)
        return windows.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(self._shape)


class Flatten(Layer):
    def forward(self, x, training=False):
        self._shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad):
        return grad.reshape(self._shape)


class Sequential:
    """Layers applied in order; ``parameters()`` yields ``(layer, name)`` for the optimizer."""

    def __init__(self, layers: list[Layer]):
        if not layers or not all(isinstance(layer, Layer) for layer in layers):
            raise TypeError("layers: expected a non-empty list of Layer")
        self.layers = layers

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def parameters(self) -> Iterator[tuple[Layer, str]]:
        for layer in self.layers:
            for name in layer.params:
                yield layer, name

    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class indices in inference mode."""
        return np.concatenate([self.forward(x[i:i + batch_size]).argmax(axis=1)
                               for i in range(0, len(x), batch_size)])


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean of ``-log softmax(z)[y]`` over the batch and its gradient ``(softmax(z) - onehot(y)) / N``."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(log_p[np.arange(n), labels].mean())
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1
    return loss, (grad / n).astype(logits.dtype)


class Adam:
    """Adam (Kingma & Ba 2015): ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
    ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected ``m_hat``, ``v_hat``."""

    def __init__(self, model: Sequential, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.model, self.lr, self.betas, self.eps, self.t = model, lr, betas, eps, 0
        self.state = {(id(layer), name): (np.zeros_like(layer.params[name]), np.zeros_like(layer.params[name]))
                      for layer, name in model.parameters()}

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for layer, name in self.model.parameters():
            m, v = self.state[id(layer), name]
            g = layer.grads[name]
            m += (1 - b1) * (g - m)
            v += (1 - b2) * (g * g - v)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            layer.params[name] -= (self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(FLOAT)


def accuracy(model: Sequential, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x) == y).mean())


def fit(model: Sequential, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int = 32, lr: float = 3e-3,
        seed: int = 0, validation: tuple[np.ndarray, np.ndarray] | None = None,
        progress: Callable[[str], None] | None = None, name: str = "model") -> list[dict]:
    """Train with Adam on shuffled mini-batches, the learning rate decaying by a cosine over the epochs.

    Returns one dict per epoch (``epoch``, ``loss``, ``train_acc`` and, with ``validation``,
    ``val_acc``) and reports each through ``progress``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs, batch_size: expected positive integers, got {epochs}, {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x, y: expected as many labels as examples, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    optimizer = Adam(model, lr)
    history = []
    for epoch in range(epochs):
        optimizer.lr = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        order = rng.permutation(len(x))
        losses, correct = [], 0
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            logits = model.forward(x[batch], training=True)
            loss, grad = softmax_cross_entropy(logits, y[batch])
            model.backward(grad)
            optimizer.step()
            losses.append(loss * len(batch))
            correct += int((logits.argmax(axis=1) == y[batch]).sum())
        row = {"epoch": epoch + 1, "loss": sum(losses) / len(x), "train_acc": correct / len(x)}
        line = f"  {name} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, train acc {100 * row['train_acc']:.1f}%"
        if validation is not None:
            row["val_acc"] = accuracy(model, *validation)
            line += f", test acc {100 * row['val_acc']:.1f}%"
        history.append(row)
        if progress is not None:
            progress(line)
    return history


# ---------------------------------------------------------------------------- export

def _kind(layer: Layer) -> str:
    """"float", "binary" (XNOR weights and sign inputs) or "ternary" (TWN weights)."""
    wq = getattr(layer, "weight_quantizer", None)
    iq = getattr(layer, "input_quantizer", None)
    if wq is None and iq is None:
        return "float"
    if isinstance(wq, fake.XnorQuantizer) and isinstance(iq, fake.SignQuantizer) and isinstance(layer, Conv2d):
        return "binary"
    if isinstance(wq, fake.TernaryQuantizer) and iq is None and isinstance(layer, Linear):
        return "ternary"
    raise ValueError(f"export: no lowbit op for {type(layer).__name__} with weight quantizer "
                     f"{type(wq).__name__} and input quantizer {type(iq).__name__} (supported: binary Conv2d "
                     "with 'xnor' weights and 'ste_sign' inputs, ternary Linear with 'twn' weights)")


def _fold(scale: np.ndarray, bias: np.ndarray, bn: BatchNorm | None) -> tuple[np.ndarray, np.ndarray]:
    """Fold a following batch norm into ``y = scale * acc + bias``:
    ``scale' = scale * s``, ``bias' = (bias - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``."""
    if bn is None:
        return scale, bias
    s = bn.params["gamma"] / np.sqrt(bn.var + bn.eps)
    return scale * s, (bias - bn.mean) * s + bn.params["beta"]


def _positive(codes: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move the sign of a negative per-channel scale (from folding a batch norm) into the codes."""
    sign = np.where(scale < 0, -1, 1).astype(np.int8)
    return codes * sign.reshape((-1,) + (1,) * (codes.ndim - 1)), np.abs(scale)


def _quantized_layer(builder: GraphBuilder, h: str, layer: Layer, kind: str, bn: BatchNorm | None,
                     relu: bool) -> str:
    w = layer.params["w"]
    bias = layer.params.get("b", np.zeros(len(w), FLOAT))
    scheme = layer.weight_quantizer.scheme
    params = grid.fit(w, scheme)
    codes = grid.quantize(w, scheme, params).astype(np.int8)
    scale, bias = _fold(params.scale.reshape(-1), bias, bn)
    codes, scale = _positive(codes, scale)
    attrs = {"activation": "relu"} if relu else {}
    if kind == "binary":
        p = layer.pad
        attrs.update(kernel_shape=list(w.shape[2:]), strides=[1, 1], pads=[p] * 4, dilations=[1, 1], group=1,
                     pad_value=0)  # training pads the signs with zeros
    inputs = [h, builder.param("codes", codes), builder.param("scales", scale.astype(FLOAT)),
              builder.param("b", bias.astype(FLOAT))]
    return builder.add_node(FORMATS[kind].op("Conv" if w.ndim == 4 else "Gemm"), inputs, attrs)


def export(model: Sequential, input_shape: tuple[int, ...] = (1, 8, 8), *, quantized: bool = True) -> Graph:
    """The trained model as a graph with input ``"x"`` of shape ``(None, *input_shape)``.

    Float layers become ``Conv`` / ``BatchNormalization`` / ``Relu`` / ``MaxPool`` /
    ``Flatten`` / ``Gemm`` in inference mode (running statistics). Quantization-aware
    layers become ``lowbit.BinaryConv`` (``w`` the ±1 signs, ``alpha`` the XNOR scale,
    ``pad_value=0``) or ``lowbit.TernaryGemm`` (codes and the TWN scale), with a
    following ``BatchNorm`` folded into scale and bias and a following ``ReLU`` fused
    as ``activation="relu"``. ``quantized=False`` exports every layer in float (the
    latent weights of quantized layers, without their input quantizer): the float
    network of the same shapes, a baseline for speed and size.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a Sequential, got {type(model).__name__}")
    builder = GraphBuilder({"x": TensorSpec((None, *input_shape))})
    h, layers, i = "x", model.layers, 0
    while i < len(layers):
        layer = layers[i]
        kind = _kind(layer) if quantized else "float"
        if kind != "float":
            bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], BatchNorm) else None
            i += bn is not None
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], ReLU)
            i += relu
            h = _quantized_layer(builder, h, layer, kind, bn, relu)
        elif isinstance(layer, Conv2d):
            h = builder.conv(h, layer.params["w"], layer.params.get("b"), pads=(layer.pad,) * 4)
        elif isinstance(layer, Linear):
            h = builder.gemm(h, layer.params["w"], layer.params["b"])
        elif isinstance(layer, BatchNorm):
            h = builder.batch_norm(h, layer.params["gamma"], layer.params["beta"], layer.mean, layer.var,
                                   epsilon=layer.eps)
        elif isinstance(layer, ReLU):
            h = builder.relu(h)
        elif isinstance(layer, MaxPool2d):
            h = builder.max_pool(h, (2, 2))
        elif isinstance(layer, Flatten):
            h = builder.flatten(h)
        else:
            raise TypeError(f"export: no graph op for layer {type(layer).__name__}")
        i += 1
    return builder.build([h])


__all__ = ["Adam", "BatchNorm", "Conv2d", "Flatten", "Layer", "Linear", "MaxPool2d", "ReLU", "Sequential",
           "accuracy", "export", "fit", "softmax_cross_entropy"]
