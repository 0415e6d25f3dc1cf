"""Example ONNX models built in code: a digits CNN, a ResNet, a MobileNetV2, a BERT encoder and a patch-token
encoder classifier, float32, seeded random weights (or given ones: ``lowbit.demo.encoder`` fills
:func:`patch_encoder` with weights it trained).

Each builder returns an ``onnx.ModelProto`` that passes ``onnx.checker.check_model``, with the structure an
exporter such as ``torch.onnx`` writes for the real network (not a simplified one): batch normalization as its own
node, Clip's bounds as constant inputs, attention shapes computed at run time with Shape / Gather / Concat, layer
normalization decomposed below opset 17. The batch (and for the encoder the sequence) dimension is symbolic unless
an int is given, so one session serves several sizes. onnx is imported inside the builders: this module imports
without it.

Weights are He-normal for convolutions (variance ``2 / fan_in``, so activations keep their scale through ReLU
layers), N(0, 0.02) for the encoder as BERT initializes it; batch-norm statistics are drawn near 0 / 1.
"""

from __future__ import annotations

import math

import numpy as np

#: The IR version written: one every onnxruntime from 1.18 on reads (onnx writes a newer one by default).
IR_VERSION = 9
BERT_OPSETS = range(13, 22)  # LayerNormalization from 17


class _Builder:
    """Nodes and initializers of one graph under construction, with unique names and a seeded generator.

    ``params`` (stem -> array) replaces the values drawn for the initializers of those stems (same shape, cast to
    the drawn dtype); :meth:`model` refuses stems that no initializer took.
    """

    def __init__(self, seed: int, params: dict[str, np.ndarray] | None = None):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers, self._count = [], [], {}
        self.params, self._taken = dict(params or {}), set()

    def name(self, stem: str) -> str:
        self._count[stem] = self._count.get(stem, -1) + 1
        return f"{stem}_{self._count[stem]}" if self._count[stem] else stem

    def const(self, stem: str, value) -> str:
        """An initializer holding ``value`` (an ndarray keeps its dtype)."""
        from onnx import numpy_helper

        name, value = self.name(stem), np.asarray(value)
        if stem in self.params:
            given = np.asarray(self.params[stem])
            if given.shape != value.shape:
                raise ValueError(f"params[{stem!r}]: expected shape {list(value.shape)}, got {list(given.shape)}")
            value = given.astype(value.dtype)
            self._taken.add(stem)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def constant(self, stem: str, value) -> str:
        """A Constant node holding ``value``: how torch.onnx writes scalars and shape arguments."""
        from onnx import helper, numpy_helper

        node = self.name(stem)
        self.nodes.append(helper.make_node("Constant", [], [node], name=node,
                                           value=numpy_helper.from_array(np.asarray(value), node)))
        return node

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs) -> str:
        """Append one node; the name of its output."""
        from onnx import helper

        node = self.name(stem or op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [f"{node}_out"], name=node, **attrs))
        return f"{node}_out"

    def rename(self, tensor: str, name: str) -> None:
        """Give the output ``tensor`` of the last node the name ``name`` (a graph output's name)."""
        node = self.nodes[-1]
        node.output[list(node.output).index(tensor)] = name

    def normal(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def model(self, inputs: list, outputs: list, opset: int, name: str):
        """The checked ModelProto of the nodes so far."""
        import onnx
        from onnx import helper

        unused = sorted(set(self.params) - self._taken)
        if unused:
            raise ValueError(f"params: no initializer named {unused}")
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="lowbit.onnx.examples", ir_version=IR_VERSION)
        onnx.checker.check_model(model, full_check=True)
        return model


def _dim(value: int | str, argument: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 1):
        raise ValueError(f"{argument}: expected a positive int or a dimension name, got {value!r}")
    return value


def _positive(**values: int) -> None:
    for argument, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{argument}: expected a positive int, got {value!r}")


# ---- convolutional networks ----------------------------------------------------------------------------------------

def _conv_bn(b: _Builder, x: str, cin: int, cout: int, kernel: int, stride: int = 1, group: int = 1,
             stem: str = "conv", gamma: tuple[float, float] = (0.5, 1.5)) -> str:
    """Conv (no bias, 'same' padding) followed by BatchNormalization: ``(conv(x) - mean) / sqrt(var + eps) * g + b``,
    ``g`` uniform in ``gamma``."""
    w = b.normal((cout, cin // group, kernel, kernel), math.sqrt(2.0 / (cin // group * kernel * kernel)))
    pad = kernel // 2
    y = b.op("Conv", [x, b.const(f"{stem}.weight", w)], stem, kernel_shape=[kernel, kernel],
             pads=[pad] * 4, strides=[stride, stride], group=group)
    gamma = b.rng.uniform(*gamma, cout).astype(np.float32)
    beta, mean = b.normal(cout, 0.1), b.normal(cout, 0.1)
    var = b.rng.uniform(0.5, 1.5, cout).astype(np.float32)
    params = [b.const(f"{stem}.bn.{n}", v) for n, v in (("weight", gamma), ("bias", beta), ("mean", mean),
                                                        ("var", var))]
    return b.op("BatchNormalization", [y, *params], f"{stem}.bn", epsilon=1e-5)


def _image_model(b: _Builder, x: str, features: int, batch, image: int, classes: int, name: str):
    """The model ending in GlobalAveragePool, Flatten and a Gemm ``logits = x W' + c`` (``transB=1``, as torch
    exports a Linear), opset 13."""
    from onnx import TensorProto, helper

    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    w = b.normal((classes, features), math.sqrt(1.0 / features))
    b.rename(b.op("Gemm", [pooled, b.const("fc.weight", w), b.const("fc.bias", b.normal(classes, 0.01))], "fc",
                  alpha=1.0, beta=1.0, transB=1), "logits")
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image, image])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    return b.model(inputs, outputs, 13, name)


def resnet(batch: int | str = "batch", image: int = 32, width: int = 16, blocks: int = 2, classes: int = 10,
           seed: int = 0, *, stages: int = 3, imagenet_stem: bool = False):
    """A ResNet of basic blocks (opset 13) on ``input`` float32 ``[batch, 3, image, image]`` -> ``logits``.

    Stem: Conv 3x3 (pads 1) + BatchNormalization + Relu; with ``imagenet_stem`` Conv 7x7 / 2 (pads 3) + BN + Relu +
    MaxPool 3x3 / 2 (pads 1), as torchvision's ResNets. Then ``stages`` stages of ``blocks`` basic blocks each,
    ``width * 2**s`` channels; the first block of every stage after the first has stride 2 and a 1x1 Conv + BN
    projection shortcut. Block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``. Head: GlobalAveragePool,
    Flatten, Gemm to ``classes``. ``batch``: an int fixes it, a str names the symbolic dimension.
    """
    _positive(image=image, width=width, blocks=blocks, classes=classes, stages=stages)
    batch = _dim(batch, "batch")
    b = _Builder(seed)
    if imagenet_stem:
        x = b.op("Relu", [_conv_bn(b, "input", 3, width, 7, 2, stem="stem")], "stem.relu")
        x = b.op("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    else:
        x = b.op("Relu", [_conv_bn(b, "input", 3, width, 3, stem="stem")], "stem.relu")
    channels = width
    for s in range(stages):
        out = width << s
        for k in range(blocks):
            stride = 2 if s and not k else 1
            stem = f"layer{s + 1}.{k}"
            y = b.op("Relu", [_conv_bn(b, x, channels, out, 3, stride, stem=f"{stem}.conv1")], f"{stem}.relu1")
            # small scales on the branch's last BN, as trained ResNets have, so activations do not double per block
            y = _conv_bn(b, y, out, out, 3, stem=f"{stem}.conv2", gamma=(0.1, 0.5))
            shortcut = x if stride == 1 and channels == out else \
                _conv_bn(b, x, channels, out, 1, stride, stem=f"{stem}.downsample")
            x = b.op("Relu", [b.op("Add", [y, shortcut], f"{stem}.add")], f"{stem}.relu2")
            channels = out
    return _image_model(b, x, channels, batch, image, classes, "resnet")


def digits_cnn(batch: int | str = "batch", classes: int = 10, seed: int = 0):
    """A small CNN for 8x8 one-channel images (scikit-learn's digits), opset 13: ``input`` float32
    ``[batch, 1, 8, 8]`` -> ``logits``.

    Conv 3x3 (pads 1) to 16 + Relu, Conv 3x3 (pads 1) to 32 + Relu, MaxPool 2x2 / 2, Flatten, Gemm to 64 + Relu,
    Gemm to ``classes``: the size at which per-node overhead, not arithmetic, decides latency.
    """
    from onnx import TensorProto, helper

    _positive(classes=classes)
    batch = _dim(batch, "batch")
    b = _Builder(seed)
    x = "input"
    for i, (cin, cout) in enumerate(((1, 16), (16, 32))):
        w = b.normal((cout, cin, 3, 3), math.sqrt(2.0 / (cin * 9)))
        x = b.op("Conv", [x, b.const(f"conv{i}.weight", w), b.const(f"conv{i}.bias", b.normal(cout, 0.1))],
                 f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        x = b.op("Relu", [x], f"conv{i}.relu")
    x = b.op("Flatten", [b.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])], "flatten", axis=1)
    for i, (fan_in, fan_out) in enumerate(((32 * 16, 64), (64, classes))):
        w = b.normal((fan_out, fan_in), math.sqrt(2.0 / fan_in))
        x = b.op("Gemm", [x, b.const(f"fc{i}.weight", w), b.const(f"fc{i}.bias", b.normal(fan_out, 0.1))], f"fc{i}",
                 transB=1)
        if i == 0:
            x = b.op("Relu", [x], "fc0.relu")
    b.rename(x, "logits")
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    return b.model(inputs, outputs, 13, "digits_cnn")


#: MobileNetV2's inverted residual stages as (expansion, channels, repeats, stride), as in the paper and torchvision
#: (whose full network also ends in a 1x1 Conv to 1280 channels).
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))


def _multiple_of_8(channels: float) -> int:
    """Channels rounded to a multiple of 8, never below 90% of the request (MobileNet's ``_make_divisible``)."""
    rounded = max(8, int(channels + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels else rounded


def _relu6(b: _Builder, x: str, stem: str) -> str:
    """``Clip(x, 0, 6)`` with its bounds as constant inputs (opset 11 onwards)."""
    low, high = b.const("relu6.min", np.float32(0)), b.const("relu6.max", np.float32(6))
    return b.op("Clip", [x, low, high], stem)


def mobilenet_v2(batch: int | str = "batch", image: int = 32, width: float = 1.0, classes: int = 10, seed: int = 0,
                 *, stages: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_STAGES[:4], last: int = 256):
    """A MobileNetV2 (opset 13) on ``input`` float32 ``[batch, 3, image, image]`` -> ``logits``.

    Stem: Conv 3x3 / 2 + BN + Clip(0, 6) to 32 channels. Inverted residual block of input ``c``, expansion ``t``,
    output ``o``, stride ``s``: 1x1 Conv to ``t c`` + BN + Clip(0, 6) (absent when ``t`` = 1), depthwise 3x3 Conv
    (group = ``t c``, stride ``s``) + BN + Clip(0, 6), 1x1 Conv to ``o`` + BN, plus ``x`` when ``s`` = 1 and
    ``o = c``. ``stages`` rows are (t, o, repeats, s) as in the paper; channels are scaled by ``width`` (to multiples
    of 8). Head: 1x1 Conv to ``last`` + BN + Clip(0, 6), GlobalAveragePool, Flatten, Gemm to ``classes``.
    """
    _positive(image=image, classes=classes, last=last)
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
        raise ValueError(f"width: expected a positive multiplier, got {width!r}")
    batch = _dim(batch, "batch")
    b = _Builder(seed)
    channels = _multiple_of_8(32 * width)
    x = _relu6(b, _conv_bn(b, "input", 3, channels, 3, 2, stem="stem"), "stem.relu6")
    index = 0
    for t, out, repeats, stride in stages:
        out = _multiple_of_8(out * width)
        for k in range(repeats):
            stem, hidden = f"features.{index}", channels * t
            y = x if t == 1 else _relu6(b, _conv_bn(b, x, channels, hidden, 1, stem=f"{stem}.expand"),
                                        f"{stem}.expand.relu6")
            y = _relu6(b, _conv_bn(b, y, hidden, hidden, 3, stride if k == 0 else 1, group=hidden,
                                   stem=f"{stem}.depthwise"), f"{stem}.depthwise.relu6")
            y = _conv_bn(b, y, hidden, out, 1, stem=f"{stem}.project")
            if k or (stride == 1 and channels == out):
                y = b.op("Add", [x, y], f"{stem}.add")
            x, channels, index = y, out, index + 1
    x = _relu6(b, _conv_bn(b, x, channels, last, 1, stem="head"), "head.relu6")
    return _image_model(b, x, last, batch, image, classes, "mobilenet_v2")


# ---- BERT encoder --------------------------------------------------------------------------------------------------

def _scalar(b: _Builder, stem: str, value: float) -> str:
    return b.constant(stem, np.float32(value))


def _ints(b: _Builder, stem: str, values) -> str:
    return b.constant(stem, np.asarray(values, np.int64))


def _layer_norm(b: _Builder, x: str, hidden: int, opset: int, stem: str) -> str:
    """``(x - mean) / sqrt(var + 1e-12) * gamma + beta`` over the last axis: one LayerNormalization from opset 17,
    below it ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div / Mul / Add as torch.onnx writes it."""
    gamma = b.const(f"{stem}.weight", (1 + b.rng.standard_normal(hidden) * 0.05).astype(np.float32))
    beta = b.const(f"{stem}.bias", b.normal(hidden, 0.02))
    if opset >= 17:
        return b.op("LayerNormalization", [x, gamma, beta], stem, axis=-1, epsilon=1e-12)

    centred = b.op("Sub", [x, b.op("ReduceMean", [x], f"{stem}.mean", axes=[-1])], f"{stem}.sub")
    var = b.op("ReduceMean", [b.op("Pow", [centred, _scalar(b, f"{stem}.two", 2.0)], f"{stem}.pow")], f"{stem}.var",
               axes=[-1])
    std = b.op("Sqrt", [b.op("Add", [var, _scalar(b, f"{stem}.eps", 1e-12)], f"{stem}.add_eps")], f"{stem}.sqrt")
    normed = b.op("Div", [centred, std], f"{stem}.div")
    return b.op("Add", [b.op("Mul", [normed, gamma], f"{stem}.mul"), beta], f"{stem}.add")


def _linear(b: _Builder, x: str, fan_in: int, fan_out: int, stem: str) -> str:
    """``x @ W + bias`` as torch.onnx writes a Linear on a 3-D input: MatMul by ``W`` [in, out], then Add(bias, .)."""
    w = b.const(f"{stem}.weight", b.normal((fan_in, fan_out), 0.02))
    return b.op("Add", [b.const(f"{stem}.bias", b.normal(fan_out, 0.02)), b.op("MatMul", [x, w], f"{stem}.matmul")],
                f"{stem}.add")


def _dim_of(b: _Builder, x: str, axis: int, stem: str) -> str:
    """``x.shape[axis]`` as a 1-element int64 tensor: Shape -> Gather (a scalar) -> Unsqueeze."""
    size = b.op("Gather", [b.op("Shape", [x], f"{stem}.shape"), _ints(b, f"{stem}.axis", axis)], f"{stem}.gather",
                axis=0)
    return b.op("Unsqueeze", [size, _ints(b, f"{stem}.unsqueeze_axes", [0])], f"{stem}.unsqueeze")


def _split_heads(b: _Builder, x: str, heads: int, head_size: int, stem: str, perm: list[int]) -> str:
    """``[b, s, heads * dh]`` -> Reshape ``[b, s, heads, dh]`` (shape computed from ``x``) -> Transpose ``perm``."""
    shape = b.op("Concat", [_dim_of(b, x, 0, f"{stem}.batch"), _dim_of(b, x, 1, f"{stem}.seq"),
                            _ints(b, f"{stem}.heads", [heads]), _ints(b, f"{stem}.head_size", [head_size])],
                 f"{stem}.shape", axis=0)
    return b.op("Transpose", [b.op("Reshape", [x, shape], f"{stem}.reshape")], f"{stem}.transpose", perm=perm)


def _attention(b: _Builder, x: str, mask: str, hidden: int, heads: int, stem: str) -> str:
    """Multi-head self-attention: ``softmax(Q K' / sqrt(dh) + mask) V``, heads merged, output projection."""
    dh = hidden // heads
    q = _split_heads(b, _linear(b, x, hidden, hidden, f"{stem}.query"), heads, dh, f"{stem}.q", [0, 2, 1, 3])
    # the key's permute(0, 2, 1, 3) and transpose(-1, -2) as one Transpose, as torch.onnx merges them
    k_t = _split_heads(b, _linear(b, x, hidden, hidden, f"{stem}.key"), heads, dh, f"{stem}.k", [0, 2, 3, 1])
    v = _split_heads(b, _linear(b, x, hidden, hidden, f"{stem}.value"), heads, dh, f"{stem}.v", [0, 2, 1, 3])
    scores = b.op("MatMul", [q, k_t], f"{stem}.scores")
    scores = b.op("Div", [scores, _scalar(b, f"{stem}.sqrt_dh", math.sqrt(dh))], f"{stem}.scale")
    probs = b.op("Softmax", [b.op("Add", [scores, mask], f"{stem}.mask")], f"{stem}.softmax", axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v], f"{stem}.context")], f"{stem}.merge", perm=[0, 2, 1, 3])
    shape = b.op("Concat", [_dim_of(b, context, 0, f"{stem}.out_batch"), _dim_of(b, context, 1, f"{stem}.out_seq"),
                            _ints(b, f"{stem}.hidden", [hidden])], f"{stem}.out_shape", axis=0)
    context = b.op("Reshape", [context, shape], f"{stem}.merge_reshape")
    return _linear(b, context, hidden, hidden, f"{stem}.output")


def _gelu(b: _Builder, x: str, stem: str) -> str:
    """The exact GELU ``x * 0.5 * (1 + erf(x / sqrt 2))``, in torch.onnx's order: Div, Erf, Add, Mul, Mul."""
    erf = b.op("Erf", [b.op("Div", [x, _scalar(b, f"{stem}.sqrt2", math.sqrt(2.0))], f"{stem}.div")], f"{stem}.erf")
    y = b.op("Mul", [x, b.op("Add", [erf, _scalar(b, f"{stem}.one", 1.0)], f"{stem}.add")], f"{stem}.mul")
    return b.op("Mul", [y, _scalar(b, f"{stem}.half", 0.5)], f"{stem}.mul_half")


def _embeddings(b: _Builder, vocab: int, hidden: int, positions: int, opset: int) -> str:
    """Word embedding of ``input_ids`` + token-type embedding of a zero buffer ``[1, positions]`` sliced to ``seq`` +
    position embedding of ``arange(seq)``, then LayerNorm; ``seq`` from Shape -> Gather (-> Cast, as exported)."""
    from onnx import TensorProto

    seq = b.op("Gather", [b.op("Shape", ["input_ids"], "embeddings.shape"), _ints(b, "embeddings.seq_axis", 1)],
               "embeddings.seq", axis=0)
    end = b.op("Cast", [seq], "embeddings.seq_cast", to=TensorProto.INT64)
    ids = b.op("Range", [_ints(b, "embeddings.start", 0), end, _ints(b, "embeddings.step", 1)], "embeddings.range")
    ids = b.op("Unsqueeze", [ids, _ints(b, "embeddings.position_axes", [0])], "embeddings.position_ids")
    words = b.op("Gather", [b.const("embeddings.word", b.normal((vocab, hidden), 0.02)), "input_ids"],
                 "embeddings.word_gather", axis=0)
    end = b.op("Unsqueeze", [seq, _ints(b, "embeddings.end_axes", [0])], "embeddings.end")
    types = b.op("Slice", [b.const("embeddings.token_type_ids", np.zeros((1, positions), np.int64)),
                           _ints(b, "embeddings.slice_start", [0]), end, _ints(b, "embeddings.slice_axes", [1]),
                           _ints(b, "embeddings.slice_step", [1])], "embeddings.token_type_slice")
    types = b.op("Gather", [b.const("embeddings.token_type", b.normal((2, hidden), 0.02)), types],
                 "embeddings.token_type_gather", axis=0)
    x = b.op("Add", [words, types], "embeddings.add")
    where = b.op("Gather", [b.const("embeddings.position", b.normal((positions, hidden), 0.02)), ids],
                 "embeddings.position_gather", axis=0)
    return _layer_norm(b, b.op("Add", [x, where], "embeddings.add_position"), hidden, opset, "embeddings.norm")


def _extended_mask(b: _Builder, opset: int) -> str:
    """``attention_mask`` [b, s] -> ``(1 - mask[:, None, None, :]) * m``: 0 where attended, ``m`` where masked;
    ``m`` = -10000 at opset 13 (older transformers), float32's lowest from opset 17 (newer ones)."""
    m = b.op("Unsqueeze", ["attention_mask", _ints(b, "mask.axes1", [1])], "mask.unsqueeze1")
    m = b.op("Unsqueeze", [m, _ints(b, "mask.axes2", [2])], "mask.unsqueeze2")
    from onnx import TensorProto

    m = b.op("Cast", [m], "mask.cast", to=TensorProto.FLOAT)
    m = b.op("Sub", [_scalar(b, "mask.one", 1.0), m], "mask.invert")
    low = -10000.0 if opset < 17 else float(np.finfo(np.float32).min)
    return b.op("Mul", [m, _scalar(b, "mask.low", low)], "mask.scale")


def _encoder_layer(b: _Builder, x: str, mask: str, hidden: int, heads: int, ffn: int, opset: int, stem: str) -> str:
    """BERT's (post-LN) layer: ``x = LN(x + attention(x))``, then ``LN(x + W2 gelu(W1 x + b1) + b2)``."""
    x = _layer_norm(b, b.op("Add", [_attention(b, x, mask, hidden, heads, f"{stem}.attention"), x],
                            f"{stem}.attention.residual"), hidden, opset, f"{stem}.attention.norm")
    h = _gelu(b, _linear(b, x, hidden, ffn, f"{stem}.intermediate"), f"{stem}.gelu")
    return _layer_norm(b, b.op("Add", [_linear(b, h, ffn, hidden, f"{stem}.output"), x], f"{stem}.residual"),
                       hidden, opset, f"{stem}.output.norm")


def bert_encoder(batch: int | str = "batch", seq: int | str = "seq", vocab: int = 1000, hidden: int = 64,
                 heads: int = 4, ffn: int = 128, layers: int = 2, opset: int = 13, seed: int = 0, *,
                 positions: int = 512, pooled: bool = True):
    """A BERT encoder as torch.onnx exports transformers' BertModel (opset 13 to 21).

    Inputs ``input_ids`` and ``attention_mask`` int64 ``[batch, seq]`` (mask 1 = attend, 0 = padding); outputs
    ``last_hidden_state`` float32 ``[batch, seq, hidden]`` and, with ``pooled``, ``pooler_output``
    ``tanh(h[:, 0] W' + c)`` ``[batch, hidden]``. Embeddings: Gather of the word table, plus the token-type table
    gathered at a zero buffer sliced to ``seq``, plus the position table gathered at ``Range(0, seq)`` (``seq``
    from Shape -> Gather), then LayerNorm. Each layer: ``x = LN(x + attention(x))``,
    ``x = LN(x + W2 gelu(W1 x + b1) + b2)`` with exact (erf) GELU. ``seq`` may not exceed ``positions``.

    Compared with torch.onnx (torch 2.13, TorchScript exporter) on a module written like BertModel, at opsets 13
    and 17, the op counts are the same but for the Identity nodes torch adds where parameters are shared.
    """
    _positive(vocab=vocab, hidden=hidden, heads=heads, ffn=ffn, layers=layers, positions=positions)
    if opset not in BERT_OPSETS:
        raise ValueError(f"opset: expected one of {BERT_OPSETS.start}..{BERT_OPSETS.stop - 1}, got {opset!r}")
    if hidden % heads:
        raise ValueError(f"heads: expected a divisor of hidden = {hidden}, got {heads}")
    batch, seq = _dim(batch, "batch"), _dim(seq, "seq")
    if isinstance(seq, int) and seq > positions:
        raise ValueError(f"seq: expected at most positions = {positions}, got {seq}")
    from onnx import TensorProto, helper

    b = _Builder(seed)
    x, mask = _embeddings(b, vocab, hidden, positions, opset), _extended_mask(b, opset)
    for i in range(layers):
        x = _encoder_layer(b, x, mask, hidden, heads, ffn, opset, f"encoder.layer.{i}")
    b.rename(x, "last_hidden_state")
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, seq, hidden])]
    if pooled:
        first = b.op("Gather", ["last_hidden_state", _ints(b, "pooler.index", 0)], "pooler.first", axis=1)
        dense = b.op("Gemm", [first, b.const("pooler.weight", b.normal((hidden, hidden), 0.02)),
                              b.const("pooler.bias", b.normal(hidden, 0.02))], "pooler.dense", transB=1)
        b.rename(b.op("Tanh", [dense], "pooler.tanh"), "pooler_output")
        outputs.append(helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, [batch, hidden]))
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [batch, seq])
              for name in ("input_ids", "attention_mask")]
    return b.model(inputs, outputs, opset, "bert_encoder")


def patch_encoder(batch: int | str = "batch", seq: int = 8, features: int = 8, hidden: int = 64, heads: int = 4,
                  ffn: int = 128, layers: int = 2, classes: int = 10, opset: int = 17, seed: int = 0, *,
                  params: dict[str, np.ndarray] | None = None):
    """A transformer encoder classifier on float tokens (image patches, as a ViT without class token), with
    :func:`bert_encoder`'s layers, opset 13 to 21.

    Input ``pixels`` float32 ``[batch, seq, features]`` (``seq`` fixed); outputs ``last_hidden_state``
    ``[batch, seq, hidden]``, ``embedding`` (its mean over the tokens) ``[batch, hidden]`` and ``logits``
    ``[batch, classes]``. Embeddings: ``pixels W + b`` (MatMul, Add as a Linear), plus a learned position table
    ``[seq, hidden]``, then LayerNorm. Then ``layers`` of :func:`bert_encoder`'s post-LN layers; the attention adds
    ``attention.mask``, a zero ``[1, 1, 1, seq]`` constant (no padding), where BERT adds its padding mask. Head:
    ReduceMean over the tokens (axes an input from opset 18), Gemm ``transB=1`` to ``classes``.

    ``params`` maps initializer names to trained values, replacing the drawn ones: ``embeddings.patch.weight``
    ``[features, hidden]`` and ``.bias``, ``embeddings.position``, ``embeddings.norm.weight`` / ``.bias``; per layer
    ``encoder.layer.{i}.`` + ``attention.{query,key,value,output}.weight`` ``[in, out]`` / ``.bias``,
    ``attention.norm.*``, ``intermediate.*`` ``[hidden, ffn]``, ``output.*`` ``[ffn, hidden]``, ``output.norm.*``;
    ``classifier.weight`` ``[classes, hidden]`` and ``.bias``.
    """
    _positive(seq=seq, features=features, hidden=hidden, heads=heads, ffn=ffn, layers=layers, classes=classes)
    if opset not in BERT_OPSETS:
        raise ValueError(f"opset: expected one of {BERT_OPSETS.start}..{BERT_OPSETS.stop - 1}, got {opset!r}")
    if hidden % heads:
        raise ValueError(f"heads: expected a divisor of hidden = {hidden}, got {heads}")
    batch = _dim(batch, "batch")
    from onnx import TensorProto, helper

    b = _Builder(seed, params)
    x = _linear(b, "pixels", features, hidden, "embeddings.patch")
    x = b.op("Add", [x, b.const("embeddings.position", b.normal((seq, hidden), 0.02))], "embeddings.add_position")
    x = _layer_norm(b, x, hidden, opset, "embeddings.norm")
    mask = b.const("attention.mask", np.zeros((1, 1, 1, seq), np.float32))
    for i in range(layers):
        x = _encoder_layer(b, x, mask, hidden, heads, ffn, opset, f"encoder.layer.{i}")
    b.rename(x, "last_hidden_state")
    if opset >= 18:
        pooled = b.op("ReduceMean", ["last_hidden_state", _ints(b, "pooler.axes", [1])], "pooler.mean", keepdims=0)
    else:
        pooled = b.op("ReduceMean", ["last_hidden_state"], "pooler.mean", axes=[1], keepdims=0)
    b.rename(pooled, "embedding")
    w = b.const("classifier.weight", b.normal((classes, hidden), 0.02))
    b.rename(b.op("Gemm", ["embedding", w, b.const("classifier.bias", b.normal(classes, 0.02))], "classifier",
                  transB=1), "logits")
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, seq, features])]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, seq, hidden]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, hidden]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    return b.model(inputs, outputs, opset, "patch_encoder")


# ---- feeds ---------------------------------------------------------------------------------------------------------

def image_feed(batch: int, image: int, seed: int = 0, channels: int = 3) -> dict[str, np.ndarray]:
    """``{"input": N(0, 1) float32 [batch, channels, image, image]}``, a feed for :func:`resnet`,
    :func:`mobilenet_v2` and (``image=8, channels=1``) :func:`digits_cnn`."""
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch, channels, image, image), dtype=np.float32)}


def token_feed(batch: int, seq: int, vocab: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ``input_ids`` in ``[0, vocab)`` and an ``attention_mask`` whose rows after the first end in padding
    (row ``i`` masks its last ``i * seq // (2 batch)`` tokens, so every row keeps at least half), for
    :func:`bert_encoder`."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    for i in range(batch):
        mask[i, seq - i * seq // (2 * batch):] = 0
    return {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64), "attention_mask": mask}
