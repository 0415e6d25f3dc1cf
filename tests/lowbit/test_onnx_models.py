"""Whole models through ``lowbit.onnx.InferenceSession``: the example ResNet, MobileNetV2 and BERT encoders
(``lowbit.onnx.examples``), float and quantized by ONNX Runtime's own quantizer, against ONNX Runtime.

One lowbit session per model runs every size (batch 1 and 3; the encoder also seq 7 and 16), through the
symbolic dimensions.

Float models: lowbit's outputs match ``onnxruntime`` and ``onnx.reference.ReferenceEvaluator`` to rtol 1e-4,
atol 1e-5. (onnx 1.23's reference BatchNormalization-9, which opset 13 selects, takes momentum's default as a sign
of training and normalizes with the batch's own statistics -- onnx/onnx pull request 8442 fixes it;
:class:`BatchNormalization` replaces it here.)

Quantized models: ``quant_pre_process`` (batch norms folded, shapes inferred), then ``quantize_static`` (QDQ
and QOperator formats, per-tensor and per-channel weights, calibrated on random inputs) or ``quantize_dynamic``.
Every quantized tensor (the uint8 / int8 outputs of QuantizeLinear, DynamicQuantizeLinear and the QLinear ops) is
fetched from both: from ORT by adding it to the graph's outputs, from lowbit by naming it in ``run``. lowbit and
ONNX Runtime must agree "to within one code" at every node, that is wherever the node's inputs agree (its nearest
quantized tensors upstream, through float ops, are equal in both):

* such a quantized tensor is at most 1 code from ORT's, and at most 1% of its codes (or one, in a tensor of fewer
  than 100) differ: a rounding tie may go the other way (ORT requantizes in float32), a shift of the whole tensor
  by one code is a bug;
* such a float output is at most one code from ORT's when it comes from a DequantizeLinear (directly or through
  elementwise ops of slope at most 1, such as the pooler's Tanh): ``|diff| <= scale``; computed in float from
  quantized tensors (the dynamic models' MatMulInteger -> Cast -> Mul, the encoder's LayerNorm), within rtol 1e-4
  of its largest value; the CNNs' logits then pick the same class in every row whose two best ORT logits are
  more than twice that bound apart.

A one-code difference propagates: downstream, a tensor may differ by several codes (a 1x1 convolution from a wide
range into a narrow one multiplies it), so those tensors are not held to one code; the float outputs beyond such a
difference must stay as close to ORT's as ORT's quantized output is to the float model's (``|diff| <=
max |ORT quantized - ORT float|``). At least one tensor per model must be compared at the one-code level. (The
small models here come out bit-exact; the benchmark's larger ones, ``bench.onnx_models``, show such ties.)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

from onnx import helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.op_run import OpRun  # noqa: E402
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402

import lowbit.onnx  # noqa: E402
from lowbit.runtime import session as runtime_session  # noqa: E402
from lowbit.onnx import examples  # noqa: E402
from tests.levels import ORT_SATURATES_U8S8  # noqa: E402

IMAGE = 20  # 20 -> 10 -> 5 (-> 3 -> 2 in MobileNetV2): odd sizes after the strided layers
VOCAB = 100
#: Elementwise ops of slope at most 1: one code before them is at most one code after.
CONTRACTIONS = ("Tanh", "Relu", "Sigmoid", "Identity", "Flatten", "Reshape")
RTOL, ATOL = 1e-4, 1e-5
TIES = 0.01  # the share of a node's codes that may differ by one: rounding ties, rare, never a whole tensor


@dataclass(frozen=True)
class Example:
    """A model builder and the feeds it runs on."""

    build: Callable  # () -> onnx.ModelProto
    feeds: Callable  # (batch, seq or None, seed) -> feed dict
    sizes: tuple  # (batch, seq or None) pairs, all run by one session
    classifier: bool


def _image(batch: int, seq: None, seed: int) -> dict[str, np.ndarray]:
    return examples.image_feed(batch, IMAGE, seed)


def _digits(batch: int, seq: None, seed: int) -> dict[str, np.ndarray]:
    return examples.image_feed(batch, 8, seed, channels=1)


def _tokens(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    return examples.token_feed(batch, seq, VOCAB, seed)


def _bert(opset: int):
    return functools.partial(examples.bert_encoder, vocab=VOCAB, hidden=32, heads=4, ffn=64, layers=2, opset=opset)


IMAGE_SIZES = ((1, None), (3, None))
TOKEN_SIZES = ((1, 7), (3, 16), (3, 7), (1, 16))
EXAMPLES = {
    "digits": Example(examples.digits_cnn, _digits, IMAGE_SIZES, True),
    "resnet": Example(functools.partial(examples.resnet, image=IMAGE, width=8, blocks=1), _image, IMAGE_SIZES, True),
    "mobilenet_v2": Example(functools.partial(examples.mobilenet_v2, image=IMAGE, width=0.5, last=64), _image,
                            IMAGE_SIZES, True),
    "bert_opset13": Example(_bert(13), _tokens, TOKEN_SIZES, False),
    "bert_opset17": Example(_bert(17), _tokens, TOKEN_SIZES, False),
}


@functools.cache
def _model(name: str):
    return EXAMPLES[name].build()


def _feeds(name: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    example = EXAMPLES[name]
    return [example.feeds(batch, seq, seed) for batch, seq in example.sizes]


def _ort_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# ---- float ---------------------------------------------------------------------------------------------------------

class BatchNormalization(OpRun):
    """``scale (x - mean) / sqrt(var + epsilon) + bias`` with the given statistics, as BatchNormalization means
    in inference at every opset (the reference evaluator takes the op type from the class name)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None):
        def channel(a):
            return a.reshape(-1, *(1,) * (x.ndim - 2))
        return ((channel(scale) * (x - channel(mean)) / np.sqrt(channel(var) + epsilon) + channel(bias))
                .astype(x.dtype),)


@pytest.mark.parametrize("name", EXAMPLES)
def test_float_model_matches_onnxruntime_and_reference(name):
    model = _model(name)
    session = lowbit.onnx.InferenceSession(model.SerializeToString())
    reference = ReferenceEvaluator(model, new_ops=[BatchNormalization])
    theirs = _ort_session(model)
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == [o.name for o in theirs.get_outputs()]
    for feed in _feeds(name):
        got = session.run(None, feed)
        for oracle, expected in (("onnxruntime", theirs.run(None, feed)), ("reference", reference.run(None, feed))):
            for output, mine, other in zip(outputs, got, expected):
                assert mine.shape == other.shape and mine.dtype == other.dtype, (oracle, output)
                np.testing.assert_allclose(mine, other, rtol=RTOL, atol=ATOL,
                                           err_msg=f"{name} {output} vs {oracle}, input shapes "
                                                   f"{[x.shape for x in feed.values()]}")


def test_example_io_names_and_symbolic_dims():
    session = lowbit.onnx.InferenceSession(_model("bert_opset17").SerializeToString())
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("input_ids", ["batch", "seq"], "tensor(int64)"), ("attention_mask", ["batch", "seq"], "tensor(int64)")]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("last_hidden_state", ["batch", "seq", 32]), ("pooler_output", ["batch", 32])]
    feed = _tokens(2, 5, 0)
    feed["attention_mask"] = feed["attention_mask"][:, :4]  # "seq" bound to 5 by input_ids
    with pytest.raises(ValueError, match="seq"):
        session.run(None, feed)


@pytest.mark.parametrize("call, message", [
    (lambda: examples.resnet(width=0), "width: expected a positive int, got 0"),
    (lambda: examples.resnet(batch=-2), "batch: expected a positive int or a dimension name, got -2"),
    (lambda: examples.mobilenet_v2(width=0), "width: expected a positive multiplier, got 0"),
    (lambda: examples.bert_encoder(hidden=30, heads=4), "heads: expected a divisor of hidden = 30, got 4"),
    (lambda: examples.bert_encoder(opset=12), "opset: expected one of 13..21, got 12"),
    (lambda: examples.bert_encoder(seq=600), "seq: expected at most positions = 512, got 600"),
])
def test_example_builders_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        call()


# ---- quantized -----------------------------------------------------------------------------------------------------

class _Reader(quantization.CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


U8S8, S8S8 = (quantization.QuantType.QUInt8, quantization.QuantType.QInt8), \
    (quantization.QuantType.QInt8, quantization.QuantType.QInt8)
#: (format, per_channel, (activation type, weight type)); format "dynamic" is quantize_dynamic.
SCHEMES = {
    "qdq-tensor-u8s8": ("QDQ", False, U8S8),
    "qdq-channel-s8s8": ("QDQ", True, S8S8),
    "qop-tensor-u8s8": ("QOperator", False, U8S8),
    "qop-channel-u8s8": ("QOperator", True, U8S8),
    "dynamic-tensor": ("dynamic", False, U8S8),
}
#: Ops whose first output is quantized codes (QGemm's only when it has an output scale).
CODE_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearSoftmax",
            "QLinearLeakyRelu", "QLinearReduceMean", "QGemm")


@functools.cache
def _quantized(name: str, scheme: str, folder: str):
    """The example ``name`` pre-processed and quantized with ``scheme``, as a ModelProto."""
    fmt, per_channel, (activations, weights) = SCHEMES[scheme]
    source, prepared, path = (os.path.join(folder, f"{name}{suffix}.onnx") for suffix in ("", ".pre", f".{scheme}"))
    if not os.path.exists(prepared):
        onnx.save(_model(name), source)
        quant_pre_process(source, prepared, auto_merge=True)  # auto_merge: the encoder's two "seq" dims
    # 7-bit weights where ONNX Runtime's uint8 x int8 product would saturate (its own advice there)
    reduce_range = ORT_SATURATES_U8S8 and (activations, weights) == U8S8
    if fmt == "dynamic":
        quantization.quantize_dynamic(prepared, path, per_channel=per_channel, weight_type=weights,
                                      reduce_range=reduce_range)
    else:
        calibration = [feed for seed in (1, 2, 3) for feed in _feeds(name, seed)]
        quantization.quantize_static(prepared, path, _Reader(calibration),
                                     quant_format=getattr(quantization.QuantFormat, fmt), per_channel=per_channel,
                                     activation_type=activations, weight_type=weights, reduce_range=reduce_range)
    return onnx.load(path)


def _code_tensors(model) -> list[str]:
    """The outputs holding quantized codes (the first output of each code-producing node)."""
    return [node.output[0] for node in model.graph.node if node.op_type in CODE_OPS
            and (node.op_type != "QGemm" or len(node.input) > 7 and node.input[7])]


def _with_outputs(model, names: list[str]):
    """``model`` with ``names`` added to its graph outputs, untyped (ONNX Runtime infers their types)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return extended


def _nearest_codes(model, tensors: list[str]) -> dict[str, frozenset[str]]:
    """For each of ``tensors``: the code tensors (and graph inputs) nearest upstream of the node computing it, found
    through the float ops between them. When all of them agree, the node itself is what is compared."""
    producers = {o: n for n in model.graph.node for o in n.output}
    stops = set(_code_tensors(model)) | {i.name for i in model.graph.input}

    @functools.cache
    def nearest(tensor: str) -> frozenset[str]:
        if tensor in stops:
            return frozenset([tensor])
        node = producers.get(tensor)  # None: an initializer
        return frozenset().union(*(nearest(t) for t in node.input if t)) if node else frozenset()

    return {t: frozenset().union(*(nearest(i) for i in producers[t].input if i)) for t in tensors}


def _one_code(model, output: str) -> np.ndarray | None:
    """The scale of the DequantizeLinear that ``output`` comes from (directly or through elementwise ops of slope at
    most 1, such as the pooler's Tanh), None when the output is computed in float from several tensors."""
    producers = {o: n for n in model.graph.node for o in n.output}
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = producers[output]
    while node.op_type in CONTRACTIONS and node.input[0] in producers:
        node = producers[node.input[0]]
    return scales.get(node.input[1]) if node.op_type == "DequantizeLinear" else None


def _within_one_code(name: str, mine: np.ndarray, theirs: np.ndarray, where: str) -> None:
    assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, (where, name, mine.shape, theirs.shape)
    diff = np.abs(mine.astype(np.int32) - theirs.astype(np.int32))
    at = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= 1, f"{where}: {name!r}: codes {int(diff.max())} apart at {at}, its inputs equal"
    differing = int(np.count_nonzero(diff))
    assert differing <= max(1, TIES * diff.size), f"{where}: {name!r}: {differing} of {diff.size} codes differ"


def _output_limit(model, output: str, exact_inputs: bool, expected: np.ndarray, float_output: np.ndarray):
    """How far lowbit's float ``output`` may be from ORT's: see the module docstring."""
    if not exact_inputs:
        return np.abs(expected - float_output).max()
    scale = _one_code(model, output)
    return RTOL * np.abs(expected).max() if scale is None else scale * (1 + 1e-5) + ATOL


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", EXAMPLES)
def test_quantized_model_matches_onnxruntime(name, scheme, tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "onnx_models"
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)  # the quantizer's tools may leave temporary files in the working folder
    model = _quantized(name, scheme, str(folder))
    session = lowbit.onnx.InferenceSession(model.SerializeToString())
    outputs = [o.name for o in session.get_outputs()]
    computed = {t for n in session.graph.nodes for t in n.outputs}
    # lowbit.runtime.layout renames the tensors of its channels-last regions: fetched by that name, moved back
    nhwc = {c: f"{c}_nhwc" for c in _code_tensors(model) if c not in computed and f"{c}_nhwc" in computed}
    fused_away = set(_code_tensors(model)) - computed - set(nhwc)  # lowbit fuses dynamic quantization chains
    codes = [c for c in _code_tensors(model) if c not in fused_away]
    upstream = _nearest_codes(model, codes + outputs)
    theirs, float_session = _ort_session(_with_outputs(model, codes)), _ort_session(_model(name))
    strict = 0
    for feed in _feeds(name, seed=9):
        where = f"{name} {scheme} {[x.shape for x in feed.values()]}"
        expected = dict(zip([o.name for o in theirs.get_outputs()], theirs.run(None, feed)))
        fetched = session.run(outputs + [nhwc.get(c, c) for c in codes], feed)
        mine = {t: (np.moveaxis(x, -1, 1) if t in nhwc else x) for t, x in zip(outputs + codes, fetched)}
        same = {c: np.array_equal(mine[c], expected[c]) for c in codes}  # graph inputs: the same feed

        def exact(tensor: str) -> bool:
            return all(same.get(t, True) for t in upstream[tensor])

        for code in filter(exact, codes):
            _within_one_code(code, mine[code], expected[code], where)
            strict += 1
        for output, float_output in zip(outputs, float_session.run(outputs, feed)):
            limit = _output_limit(model, output, exact(output), expected[output], float_output)
            diff = np.abs(mine[output] - expected[output])
            assert (diff <= limit).all(), (f"{where}: {output!r} beyond its bound by {float((diff - limit).max()):.3g}"
                                           f" (max |diff| {float(diff.max()):.3g}, inputs equal: {exact(output)})")
            if EXAMPLES[name].classifier and exact(output):
                logits = expected[output]
                top2 = np.sort(logits, axis=1)[:, -2:]
                clear = top2[:, 1] - top2[:, 0] > 2 * np.max(limit)
                np.testing.assert_array_equal(mine[output].argmax(1)[clear], logits.argmax(1)[clear], err_msg=where)
    assert strict > 0 or fused_away, f"{name} {scheme}: no quantized tensor with equal inputs to compare"


def test_encoder_on_a_team_of_threads_matches_one_thread(tmp_path_factory, monkeypatch):
    """Two and three threads (compiled chains run by a team, lowbit.runtime.compiled) give one thread's outputs
    bit for bit on the quantize_dynamic encoder: split entries (LayerNorm, softmax, GELU, adds) cut rows, team
    entries (dynamic quantization, its products) share them out."""
    folder = tmp_path_factory.getbasetemp() / "onnx_models"
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    # every race won by its last candidate: a chain's team, never one thread (the model is small)
    monkeypatch.setattr(runtime_session, "_race", lambda candidates: [1.0] * (len(candidates) - 1) + [0.0])
    model = _quantized("bert_opset17", "dynamic-tensor", str(folder))
    sessions = {}
    for threads in (1, 2, 3):
        options = lowbit.onnx.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[threads] = lowbit.onnx.InferenceSession(model.SerializeToString(), options)
    for feed in _feeds("bert_opset17", seed=4)[-1:]:  # the largest shape only: each shape compiles its chains
        want = sessions[1].run(None, feed)
        for threads in (2, 3):
            for got, expected in zip(sessions[threads].run(None, feed), want):
                np.testing.assert_array_equal(got, expected, err_msg=f"{threads} threads")
    plans = [plan for lanes in sessions[2]._session._lanes.values() for lane in lanes for plan in lane.plans.values()]
    chains = [step[0].chain for plan in plans for step in plan.program or () if hasattr(step[0], "chain")]
    assert any(chain.team and chain.threads > 1 for chain in chains)
