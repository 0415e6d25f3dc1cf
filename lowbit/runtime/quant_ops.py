"""Preparers of the quantized ops: weights packed once, each call one fused kernel.

Ops and their inputs (all parameters are plain arrays of ``graph.params``; codes of
sub-byte weights are stored one per int8 and packed here):

``QuantizeLinear(x, s, z)``        ``q = saturate(rint(x / s) + z)``, per tensor (uint8 / int8 as ``z``)
``DequantizeLinear(q, s, z)``      ``x = (q - z) * s``
``QLinearConv``                    ONNX, NCHW (``kernels.qlinear_conv2d_plan``)
``lowbit.QGemm``                   ``y = act((x - zx) sx @ ((w - zw) sw).T + B)``, requantized by
                                   ``(y_scale, y_zero_point)`` or float32 when those are absent
``lowbit.DynamicQGemm``            ``x`` float32 quantized per call to uint8 by its min / max
                                   (ONNX DynamicQuantizeLinear), then as ``lowbit.QGemm``, float32 out
``lowbit.Int4Gemm / Int4Conv``     ``y = act(x @ (scale[n, g] * codes).T + B)`` (``kernels.gemm_int4``,
                                   ``kernels.conv2d_int4``; groups of ``group_size`` along K)
``lowbit.TernaryGemm``             ``y = act(x @ (scale[n] * codes).T + B)`` (``kernels.gemm_ternary``)
``lowbit.BinaryConv / BinaryGemm`` ``y = act(alpha[o] * (sign(x) (*) w) + B[o])``, ``sign(x) = +1`` for
                                   ``x >= 0`` else -1; BinaryConv pads ``sign(x)`` with ``pad_value``
                                   (default 0, as a float Conv on ``sign(x)`` would)

``act`` is the optional attribute ``activation`` ("relu" or "relu6"), fused after the bias.
Every quantized kernel carries a ``fallback``: the same layer in float32 on the
dequantized weights, which the session runs instead where it is faster.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

import kernels
from kernels.conv.int4 import PackedConvInt4
from kernels.quantize import dequantize_linear, quantize_linear
from lowbit.graph.ir import Graph, Node
from lowbit.quantization.qdq import dynamic_quantize_linear
from lowbit.runtime.float_ops import prepare_conv
from lowbit.runtime.registry import Kernel, Shape, preparer

Inputs = list[tuple[Shape, np.dtype]]
ACTIVATIONS = {None: (None, None), "relu": (0.0, None), "relu6": (0.0, 6.0)}
INT4_GROUP_SIZES = (32, 64, 128, 256)


# ----------------------------------------------------------------------------- shared checks

def _param(node: Node, graph: Graph, index: int, what: str, *, optional: bool = False) -> np.ndarray | None:
    """Input ``index`` of ``node``, which must be a constant of ``graph.params`` (packed at prepare)."""
    name = node.inputs[index] if index < len(node.inputs) else ""
    if not name:
        if optional:
            return None
        raise ValueError(f"node {node.name!r} ({node.op}): input {index} ({what}) is required")
    if name not in graph.params:
        raise ValueError(f"node {node.name!r} ({node.op}): input {index} ({what}) must be a parameter "
                         f"(a constant of graph.params), got the tensor {name!r}")
    return np.asarray(graph.params[name])


def _scalar(node: Node, value: np.ndarray, what: str) -> np.ndarray:
    if value.size != 1:
        raise ValueError(f"node {node.name!r} ({node.op}): {what} must be per tensor (one value), "
                         f"got shape {value.shape}")
    return value.reshape(())


def _activation(node: Node) -> str | None:
    act = node.attrs.get("activation")
    if act not in ACTIVATIONS:
        raise ValueError(f"node {node.name!r} ({node.op}): attribute activation must be one of "
                         f"{[a for a in ACTIVATIONS if a]}, got {act!r}")
    return act


def _clamp(y: np.ndarray, act: str | None) -> None:
    """Apply ``act`` to ``y`` in place."""
    if act == "relu":
        np.maximum(y, 0, out=y)  # several times cheaper than np.clip on small arrays
    elif act is not None:
        np.clip(y, *ACTIVATIONS[act], out=y)


def _input(node: Node, inputs: Inputs, rank: int, dtypes: tuple) -> Shape:
    shape, dtype = inputs[0]
    if len(shape) != rank or np.dtype(dtype) not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"node {node.name!r} ({node.op}): input x must be {rank}-D of dtype "
                         f"{' or '.join(np.dtype(d).name for d in dtypes)}, got shape {shape}, dtype {dtype}")
    return tuple(shape)


def _conv_attrs(node: Node, w_shape: Shape) -> dict:
    """strides, pads, dilations and group of a Conv-like node, checked against OIHW ``w_shape``."""
    a = node.attrs
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise ValueError(f"node {node.name!r} ({node.op}): auto_pad {a['auto_pad']!r} is not supported; "
                         "give explicit pads")
    if "kernel_shape" in a and tuple(a["kernel_shape"]) != tuple(w_shape[2:]):
        raise ValueError(f"node {node.name!r} ({node.op}): kernel_shape {list(a['kernel_shape'])} does not "
                         f"match the weights' {list(w_shape[2:])}")
    return {"strides": tuple(a.get("strides", (1, 1))), "pads": tuple(a.get("pads", (0, 0, 0, 0))),
            "dilations": tuple(a.get("dilations", (1, 1))), "group": int(a.get("group", 1))}


def _conv_out_shape(node: Node, x_shape: Shape, w_shape: Shape, attrs: dict) -> Shape:
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    if c != cg * attrs["group"] or o % attrs["group"]:
        raise ValueError(f"node {node.name!r} ({node.op}): weights {list(w_shape)} with group {attrs['group']} "
                         f"do not fit an input of {c} channels")
    (sh, sw), (top, left, bottom, right), (dh, dw) = attrs["strides"], attrs["pads"], attrs["dilations"]
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"node {node.name!r} ({node.op}): input {list(x_shape)} is smaller than the kernel")
    return n, o, oh, ow


def _gemm_shape(node: Node, x_shape: Shape, w: np.ndarray) -> Shape:
    if x_shape[1] != w.shape[1]:
        raise ValueError(f"node {node.name!r} ({node.op}): input x has {x_shape[1]} features, the weights "
                         f"[out, in] = {list(w.shape)} expect {w.shape[1]}")
    return x_shape[0], w.shape[0]


def _vector(node: Node, value: np.ndarray | None, length: int, what: str, dtype=np.float32) -> np.ndarray | None:
    """A per-output-channel array (a scalar is broadcast), or None."""
    if value is None:
        return None
    if value.size not in (1, length):
        raise ValueError(f"node {node.name!r} ({node.op}): {what} must have 1 or {length} values, "
                         f"got shape {value.shape}")
    return np.ascontiguousarray(np.broadcast_to(value.reshape(-1), (length,)), dtype=dtype)


def _float_kernel(compute: Callable[[np.ndarray, np.ndarray | None], np.ndarray], out: tuple[Shape, np.dtype],
                  ops: int, requant: tuple[np.ndarray, np.ndarray] | None = None) -> Kernel:
    """A fallback computing ``compute(x, y)`` in float32 (into ``y`` when given), requantized to ``out``'s dtype
    by ``requant = (s, z)``."""
    if requant is None:
        def run(inputs: list[np.ndarray], outs: list[np.ndarray]) -> None:
            compute(inputs[0], outs[0])
    else:
        scale, zero = float(requant[0]), int(requant[1])
        y = np.empty(out[0], np.float32)

        def run(inputs: list[np.ndarray], outs: list[np.ndarray]) -> None:
            quantize_linear(compute(inputs[0], y), scale, zero, dtype=out[1], out=outs[0])

    return Kernel(run, [out], ops, "float32", "float fallback on dequantized weights")


def _conv_fallback(node: Node, x_shape: Shape, w_float: np.ndarray, bias: np.ndarray | None, attrs: dict,
                   act: str | None, out: tuple[Shape, np.dtype], ops: int,
                   prequant: Callable[[np.ndarray], np.ndarray] | None = None, requant=None) -> Kernel:
    """``act(conv(prequant(x), w_float) + bias)`` by the float Conv preparer, requantized if ``requant``."""
    params = {"w": w_float} if bias is None else {"w": w_float, "b": bias}
    conv = Node("Conv", ["x", *params], ["y"], {**attrs, "kernel_shape": list(w_float.shape[2:]), "activation": act},
                f"{node.name} (float fallback)")
    kernel = prepare_conv(conv, Graph([], {}, [], params), [(x_shape, np.dtype(np.float32))])
    return _float_kernel(lambda x, y: kernel([x if prequant is None else prequant(x)], [y])[0], out, ops, requant)


# ----------------------------------------------------------------------------- QuantizeLinear / DequantizeLinear

def _dequantizer(shape: Shape, scale: np.ndarray, zero: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``q -> (q - zero) * scale`` in float32 (ONNX DequantizeLinear), into one buffer reused by every call."""
    buffer, s, z = np.empty(shape, np.float32), float(scale), int(zero)
    return lambda q: dequantize_linear(q, s, z, out=buffer)


def _zero_point(node: Node, graph: Graph, index: int) -> np.ndarray:
    zero = _param(node, graph, index, "zero point", optional=True)
    zero = np.zeros((), np.uint8) if zero is None else _scalar(node, zero, "the zero point")
    if zero.dtype not in (np.uint8, np.int8):
        raise ValueError(f"node {node.name!r} ({node.op}): the zero point must be uint8 or int8, got {zero.dtype}")
    return zero


def _scale(node: Node, graph: Graph, index: int) -> np.ndarray:
    scale = _scalar(node, _param(node, graph, index, "scale"), "the scale").astype(np.float32)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"node {node.name!r} ({node.op}): the scale must be positive and finite, got {scale}")
    return scale


@preparer("QuantizeLinear")
def prepare_quantize_linear(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    shape = tuple(inputs[0][0])
    if np.dtype(inputs[0][1]) != np.float32:
        raise ValueError(f"node {node.name!r} (QuantizeLinear): input x must be float32, got {inputs[0][1]}")
    scale, zero = _scale(node, graph, 1), _zero_point(node, graph, 2)
    s, z, dtype = float(scale), int(zero), zero.dtype

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        quantize_linear(ins[0], s, z, dtype=dtype, out=outs[0])

    return Kernel(run, [(shape, zero.dtype)], int(np.prod(shape)), "int8", f"to {zero.dtype}")


@preparer("DequantizeLinear")
def prepare_dequantize_linear(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    shape, dtype = tuple(inputs[0][0]), np.dtype(inputs[0][1])
    scale, zero = _scale(node, graph, 1), _zero_point(node, graph, 2)
    if dtype != zero.dtype:
        raise ValueError(f"node {node.name!r} (DequantizeLinear): input x is {dtype} but the zero point is "
                         f"{zero.dtype}")
    s, z = float(scale), int(zero)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        dequantize_linear(ins[0], s, z, out=outs[0])

    return Kernel(run, [(shape, np.dtype(np.float32))], int(np.prod(shape)), "int8", f"from {dtype}")


# ----------------------------------------------------------------------------- int8

def _int8_weights(node: Node, graph: Graph, w_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w int8, w_scale float32 [O], w_zero_point int8 [O])`` at inputs ``w_index .. w_index + 2``."""
    w = _param(node, graph, w_index, "weights")
    if w.dtype != np.int8:
        raise ValueError(f"node {node.name!r} ({node.op}): weights must be int8, got {w.dtype}")
    scale = _vector(node, _param(node, graph, w_index + 1, "weight scale"), w.shape[0], "the weight scale")
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError(f"node {node.name!r} ({node.op}): weight scales must be positive and finite")
    zero = _param(node, graph, w_index + 2, "weight zero point", optional=True)
    zero = np.zeros(w.shape[0], np.int8) if zero is None else _vector(node, zero, w.shape[0],
                                                                      "the weight zero point", np.int8)
    return np.ascontiguousarray(w), scale, zero


def _float_bias(bias: np.ndarray | None, x_scale: np.ndarray, w_scale: np.ndarray) -> np.ndarray | None:
    """A bias in real units: int32 biases count ``x_scale * w_scale`` each (ONNX QLinearConv)."""
    if bias is None or bias.dtype != np.int32:
        return bias
    return (bias.astype(np.float64) * (np.float64(x_scale) * w_scale)).astype(np.float32)


@preparer("QLinearConv")
def prepare_qlinear_conv(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 4, (np.uint8, np.int8))
    x_dtype = np.dtype(inputs[0][1])
    x_scale, x_zero = _scale(node, graph, 1), _zero_point(node, graph, 2)
    if x_zero.dtype != x_dtype:
        raise ValueError(f"node {node.name!r} (QLinearConv): x is {x_dtype} but its zero point is {x_zero.dtype}")
    w, w_scale, w_zero = _int8_weights(node, graph, 3)
    y_scale, y_zero = _scale(node, graph, 6), _zero_point(node, graph, 7)
    bias = _vector(node, _param(node, graph, 8, "bias", optional=True), w.shape[0], "the bias", np.int32)
    attrs, act = _conv_attrs(node, w.shape), _activation(node)
    out_shape = _conv_out_shape(node, x_shape, w.shape, attrs)
    plan = kernels.qlinear_conv2d_plan(kernels.pack_conv_int8(w, group=attrs["group"]), x_shape, float(x_scale),
                                       int(x_zero), w_scale, w_zero, float(y_scale), y_zero, bias, x_dtype=x_dtype,
                                       activation=act, **attrs)
    ops = 2 * int(np.prod(out_shape)) * int(np.prod(w.shape[1:]))
    out = (out_shape, y_zero.dtype)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        plan(ins[0], out=outs[0])

    w_float = ((w.astype(np.int32) - w_zero.reshape(-1, 1, 1, 1)) * w_scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    real_bias = _float_bias(bias, x_scale, w_scale)
    fallback = _conv_fallback(node, x_shape, w_float, real_bias, attrs, act, out, ops,
                              _dequantizer(x_shape, x_scale, x_zero), (y_scale, y_zero))
    return Kernel(run, [out], ops, "int8", f"qlinear_conv2d {plan.kind}",
                  fallback=fallback)


def _gemm_kernel(node: Node, x_shape: Shape, w: np.ndarray, precision: str, note: str, compute_q, w_float: np.ndarray,
                 bias: np.ndarray | None, act: str | None, prequant: Callable[[np.ndarray], np.ndarray] | None = None,
                 out_dtype=np.float32, requant=None) -> Kernel:
    """A Gemm-like kernel ``compute_q(x, out)`` and its float fallback ``act(prequant(x) @ w_float.T + bias)``."""
    out = (_gemm_shape(node, x_shape, w), np.dtype(out_dtype))
    ops = 2 * int(np.prod(out[0])) * w.shape[1]
    w_t = np.ascontiguousarray(w_float.T)  # BLAS is fast on a contiguous [in, out]; a transposed view is 1000x slower

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        compute_q(ins[0], outs[0])

    def compute_float(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        np.matmul(x if prequant is None else prequant(x), w_t, out=y)
        _add_bias_act(y, bias, act)
        return y

    return Kernel(run, [out], ops, precision, note,
                  fallback=_float_kernel(compute_float, out, ops, requant))


def _add_bias_act(y: np.ndarray, bias: np.ndarray | None, act: str | None) -> None:
    if bias is not None:
        y += bias
    _clamp(y, act)


@preparer("lowbit.QGemm")
def prepare_qgemm(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 2, (np.uint8, np.int8))
    x_scale, x_zero = _scale(node, graph, 1), _zero_point(node, graph, 2)
    if x_zero.dtype != np.dtype(inputs[0][1]):
        raise ValueError(f"node {node.name!r} (lowbit.QGemm): x is {inputs[0][1]} but its zero point is "
                         f"{x_zero.dtype}")
    w, w_scale, w_zero = _int8_weights(node, graph, 3)
    quantized_out = len(node.inputs) > 6 and bool(node.inputs[6])
    y_scale, y_zero = (_scale(node, graph, 6), _zero_point(node, graph, 7)) if quantized_out else (None, None)
    bias = _param(node, graph, 8, "bias", optional=True)
    bias = None if bias is None else _vector(node, bias, w.shape[0], "the bias",
                                             np.int32 if bias.dtype == np.int32 else np.float32)
    act = _activation(node)
    options = {"out_dtype": y_zero.dtype, "out_scale": float(y_scale), "out_zero_point": int(y_zero)} \
        if quantized_out else {}
    plan = kernels.linear_int8_plan(kernels.pack_int8(w), a_dtype=x_zero.dtype, a_scale=float(x_scale),
                                    a_zero_point=int(x_zero), w_scale=w_scale, w_zero_point=w_zero, bias=bias,
                                    activation=act, **options)

    w_float = ((w.astype(np.int32) - w_zero[:, None]) * w_scale[:, None]).astype(np.float32)
    return _gemm_kernel(node, x_shape, w, "int8", "linear_int8", lambda x, out: plan(x, out=out), w_float,
                        _float_bias(bias, x_scale, w_scale), act, _dequantizer(x_shape, x_scale, x_zero),
                        y_zero.dtype if quantized_out else np.float32, (y_scale, y_zero) if quantized_out else None)


@preparer("lowbit.DynamicQGemm")
def prepare_dynamic_qgemm(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 2, (np.float32,))
    w, w_scale, w_zero = _int8_weights(node, graph, 1)
    bias = _vector(node, _param(node, graph, 4, "bias", optional=True), w.shape[0], "the bias")
    act = _activation(node)
    packed = kernels.pack_int8(w)

    def compute(x: np.ndarray, out: np.ndarray) -> None:
        codes, scale, zero = dynamic_quantize_linear(x)
        kernels.linear_int8(codes, packed, a_scale=float(scale), a_zero_point=int(zero), w_scale=w_scale,
                            w_zero_point=w_zero, bias=bias, activation=act, out=out)

    w_float = ((w.astype(np.int32) - w_zero[:, None]) * w_scale[:, None]).astype(np.float32)
    return _gemm_kernel(node, x_shape, w, "int8", "dynamic uint8 + linear_int8", compute, w_float, bias, act)


# ----------------------------------------------------------------------------- int4

def _group_size(node: Node) -> int:
    g = node.attrs.get("group_size")
    if g not in INT4_GROUP_SIZES:
        raise ValueError(f"node {node.name!r} ({node.op}): attribute group_size must be one of {INT4_GROUP_SIZES}, "
                         f"got {g!r}")
    return int(g)


def _int4_codes(node: Node, graph: Graph, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    codes = _param(node, graph, 1, "codes")
    scales = _param(node, graph, 2, "scales")
    if codes.dtype != np.int8 or codes.ndim != 2 or codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
        raise ValueError(f"node {node.name!r} ({node.op}): codes must be int8 [out, K] in -8..7")
    want = (codes.shape[0], -(-codes.shape[1] // group_size))
    if scales.shape != want:
        raise ValueError(f"node {node.name!r} ({node.op}): scales must have shape {want} for codes "
                         f"{list(codes.shape)} and group_size {group_size}, got {scales.shape}")
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales, np.float32)


@preparer("lowbit.Int4Gemm")
def prepare_int4_gemm(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 2, (np.float32,))
    g = _group_size(node)
    codes, scales = _int4_codes(node, graph, g)
    bias = _vector(node, _param(node, graph, 3, "bias", optional=True), codes.shape[0], "the bias")
    act = _activation(node)
    packed = kernels.pack_int4_codes(codes, scales, group_size=g)

    def compute(x: np.ndarray, out: np.ndarray) -> None:
        kernels.gemm_int4(x, packed, out=out)
        _add_bias_act(out, bias, act)

    return _gemm_kernel(node, x_shape, codes, "int4", f"gemm_int4 g{g}", compute, packed.dequantize(), bias, act)


@preparer("lowbit.Int4Conv")
def prepare_int4_conv(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 4, (np.float32,))
    g = _group_size(node)
    codes, scales = _int4_codes(node, graph, g)
    if "kernel_shape" not in node.attrs:
        raise ValueError(f"node {node.name!r} (lowbit.Int4Conv): attribute kernel_shape is required")
    kh, kw = node.attrs["kernel_shape"]
    o, k = codes.shape
    attrs = _conv_attrs(node, (o, 0, kh, kw))
    if k % (kh * kw):
        raise ValueError(f"node {node.name!r} (lowbit.Int4Conv): codes have {k} columns, not a multiple of "
                         f"KH * KW = {kh * kw}")
    w_shape = (o, k // (kh * kw), kh, kw)
    out_shape = _conv_out_shape(node, x_shape, w_shape, attrs)
    group = attrs.pop("group")
    og = o // group
    packed = PackedConvInt4(tuple(kernels.pack_int4_codes(codes[i * og:(i + 1) * og], scales[i * og:(i + 1) * og],
                                                          group_size=g) for i in range(group)), w_shape, group)
    bias = _vector(node, _param(node, graph, 3, "bias", optional=True), o, "the bias")
    act = _activation(node)
    ops = 2 * int(np.prod(out_shape)) * k
    out = (out_shape, np.dtype(np.float32))

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernels.conv2d_int4(ins[0], packed, bias, out=outs[0], **attrs)
        _clamp(outs[0], act)

    fallback = _conv_fallback(node, x_shape, packed.dequantize(), bias, {**attrs, "group": group}, act, out, ops)
    return Kernel(run, [out], ops, "int4", f"conv2d_int4 g{g}", fallback=fallback)


# ----------------------------------------------------------------------------- ternary

@preparer("lowbit.TernaryGemm")
def prepare_ternary_gemm(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 2, (np.float32,))
    codes = _param(node, graph, 1, "codes")
    if codes.dtype != np.int8 or codes.ndim != 2 or not np.isin(codes, (-1, 0, 1)).all():
        raise ValueError(f"node {node.name!r} (lowbit.TernaryGemm): codes must be int8 [out, in] in {{-1, 0, 1}}")
    scales = _vector(node, _param(node, graph, 2, "scales"), codes.shape[0], "the scales")
    bias = _vector(node, _param(node, graph, 3, "bias", optional=True), codes.shape[0], "the bias")
    act = _activation(node)
    packed = kernels.pack_ternary_codes(np.ascontiguousarray(codes), scales.reshape(-1, 1))

    def compute(x: np.ndarray, out: np.ndarray) -> None:
        kernels.gemm_ternary(x, packed, out=out)
        _add_bias_act(out, bias, act)

    return _gemm_kernel(node, x_shape, codes, "ternary", "gemm_ternary", compute,
                        codes.astype(np.float32) * scales[:, None], bias, act)


# ----------------------------------------------------------------------------- binary

def _binary_weights(node: Node, graph: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    w = _param(node, graph, 1, "weights")
    if w.dtype != np.int8 or not np.isin(w, (-1, 1)).all():
        raise ValueError(f"node {node.name!r} ({node.op}): weights must be int8 with values -1 and +1")
    alpha = _vector(node, _param(node, graph, 2, "alpha"), w.shape[0], "alpha")
    bias = _vector(node, _param(node, graph, 3, "bias", optional=True), w.shape[0], "the bias")
    return np.ascontiguousarray(w), alpha, bias


def _sign(x: np.ndarray) -> np.ndarray:
    """``+1`` for ``x >= 0``, else -1 (as ``kernels.pack_bits`` encodes it)."""
    return np.where(x < 0, np.float32(-1), np.float32(1))


@preparer("lowbit.BinaryConv")
def prepare_binary_conv(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 4, (np.float32,))
    w, alpha, bias = _binary_weights(node, graph)
    attrs, act = _conv_attrs(node, w.shape), _activation(node)
    if attrs.pop("group") != 1:
        raise ValueError(f"node {node.name!r} (lowbit.BinaryConv): only group 1 is supported")
    pad_value = node.attrs.get("pad_value", 0)
    if pad_value not in (-1, 0, 1):
        raise ValueError(f"node {node.name!r} (lowbit.BinaryConv): pad_value must be -1, 0 or 1, got {pad_value!r}")
    out_shape = _conv_out_shape(node, x_shape, w.shape, {**attrs, "group": 1})
    n, o, oh, ow = out_shape
    packed = kernels.pack_conv_binary(w)
    lo, hi = ACTIVATIONS[act]
    clamp = None if lo is None else (lo, np.inf if hi is None else hi)
    nhwc = np.empty((n, oh, ow, o), np.float32)
    ops = 2 * int(np.prod(out_shape)) * int(np.prod(w.shape[1:]))
    out = (out_shape, np.dtype(np.float32))

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        bits = kernels.pack_bits(kernels.nchw_to_nhwc(ins[0]), axis=-1)
        kernels.conv2d_binary(bits, packed, in_channels=x_shape[1], pad_value=pad_value, multiplier=alpha,
                              bias=bias, clamp=clamp, out=nhwc, **attrs)
        kernels.nhwc_to_nchw(nhwc, out=outs[0])

    # sign(x) padded with v equals (sign(x) - v) padded with 0, plus v times each filter's sum
    w_float = w.astype(np.float32) * alpha[:, None, None, None]
    shifted = w_float.sum(axis=(1, 2, 3)) * np.float32(pad_value) + (0 if bias is None else bias)
    fallback = _conv_fallback(node, x_shape, w_float, shifted.astype(np.float32), {**attrs, "group": 1}, act, out,
                              ops, lambda x: _sign(x) - np.float32(pad_value))
    return Kernel(run, [out], ops, "binary", f"conv2d_binary pad {pad_value}", fallback=fallback)


@preparer("lowbit.BinaryGemm")
def prepare_binary_gemm(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 2, (np.float32,))
    w, alpha, bias = _binary_weights(node, graph)
    if w.ndim != 2:
        raise ValueError(f"node {node.name!r} (lowbit.BinaryGemm): weights must be [out, in], got {w.shape}")
    act = _activation(node)
    w_bits, k = kernels.pack_bits(w), w.shape[1]

    def compute(x: np.ndarray, out: np.ndarray) -> None:
        kernels.gemm_binary(kernels.pack_bits(x), w_bits, k, multiplier=alpha, bias=bias, out=out)
        _clamp(out, act)

    return _gemm_kernel(node, x_shape, w, "binary", "gemm_binary", compute, w.astype(np.float32) * alpha[:, None],
                        bias, act, _sign)
