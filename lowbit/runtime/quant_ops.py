"""Preparers of the quantized ops: weights packed once, each call one fused kernel.

Ops and their inputs (all parameters are plain arrays of ``graph.params``; codes of
sub-byte weights are stored one per int8 and packed here):

``QuantizeLinear(x, s, z)``        ``q = saturate(rint(x / s) + z)``, per tensor, per axis or blocked; codes
                                   int8 / uint8 / int4 / uint4 / int2 / uint2 (ONNX)
``DequantizeLinear(q, s, z)``      ``x = (q - z) * s``, likewise, and int32 ``q`` (ONNX)
``QLinearConv``                    ONNX, NCHW, any number of spatial axes (``kernels.qlinear_conv2d_plan``
                                   for 1-D and 2-D)
``lowbit.QGemm``                   ``y = act((x - zx) sx @ ((w - zw) sw).T + B)``, requantized by
                                   ``(y_scale, y_zero_point)`` or float32 when those are absent
``lowbit.DynamicQGemm``            ``x`` float32 quantized per call to uint8 by its min / max
                                   (ONNX DynamicQuantizeLinear), then as ``lowbit.QGemm``, float32 out

The weight-only formats of ``lowbit.quantization.formats`` (int4, nf4, ternary, binary: ``lowbit.Int4Gemm``,
``NF4Gemm``, ``TernaryGemm``, ``BinaryGemm``, ``Int4Conv``, ``BinaryConv``), each ``y = act(x @ W.T + B)`` (Conv:
``act(conv(x, W) + B)``) with ``W`` dequantized from ``(codes, scales)`` as the table says; Gemm ops take ``x``
``[..., K]``. The binary ops compute on ``sign(x)`` (``+1`` for ``x >= 0``, else -1); BinaryConv pads ``sign(x)``
with ``pad_value`` (default 0, as a float Conv on ``sign(x)`` would).

``act`` is the optional attribute ``activation`` ("relu" or "relu6"), fused after the bias.
Every quantized kernel of a ``lowbit.`` op carries a ``fallback``: the same layer in float32 on the
dequantized weights, which the session runs instead where it is faster. The other quantized ONNX ops
(QLinearMatMul, MatMulInteger, ConvInteger, DynamicQuantizeLinear and ONNX Runtime's ``com.microsoft``
ones) are in :mod:`lowbit.runtime.qlinear_ops`, imported at the end of this module.

Where the kernels cannot take a node (ranks, layouts, weights or quantization parameters computed at
run time), an exact NumPy path computes the same ONNX result: integer products in float64, which is
exact for them (:func:`integer_conv`), requantized by :func:`requantize`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

import kernels
from kernels.conv.int4 import PackedConvInt4
from kernels.entry import Entry
from kernels.quantize import dequantize_linear, quantize_linear, quantize_linear_to_nhwc
from lowbit.graph.ir import Graph, Node
from lowbit.quantization import grid, qdq
from lowbit.quantization.formats import FORMATS, WeightFormat
from lowbit.quantization.qdq import dynamic_quantize_linear
from lowbit.quantization.scheme import QScheme
from lowbit.runtime.float_ops import channels_last, nchw_shape, nhwc_shape, prepare_conv, transposed_nhwc
from lowbit.runtime.registry import Kernel, Shape, preparer
from lowbit.runtime.transpose_fusion import FUSED_QUANTIZE, channels_last_perm
from lowbit.runtime.windows import Window, conv_window, window_view

Inputs = list[tuple[Shape, np.dtype]]
ACTIVATIONS = {None: (None, None), "relu": (0.0, None), "relu6": (0.0, 6.0)}


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


def _present(node: Node, index: int) -> bool:
    return index < len(node.inputs) and bool(node.inputs[index])


def _constant(node: Node, graph: Graph, index: int) -> np.ndarray | None:
    """Input ``index`` when it is a parameter; None when it is absent or computed at run time."""
    name = node.inputs[index] if index < len(node.inputs) else ""
    return np.asarray(graph.params[name]) if name in graph.params else None


def _spec(node: Node, graph: Graph, inputs: Inputs, index: int) -> tuple[Shape, np.dtype] | None:
    """Shape and dtype of input ``index`` (None when absent): a parameter's own, else the session's."""
    if not _present(node, index):
        return None
    value = _constant(node, graph, index)
    if value is not None:
        return value.shape, value.dtype
    if index >= len(inputs) or inputs[index] is None:
        raise ValueError(f"node {node.name!r} ({node.op}): no shape is known for input {index} "
                         f"({node.inputs[index]!r})")
    return tuple(inputs[index][0]), np.dtype(inputs[index][1])


def _per_tensor(node: Node, graph: Graph, index: int, convert: Callable, default: Any = None
                ) -> Callable[[list[np.ndarray]], Any]:
    """A reader of the one-value input ``index`` as a Python scalar (``convert`` = float or int): its value,
    fixed at prepare when it is a parameter (``default`` when it is absent), else taken from each call's inputs."""
    value = _constant(node, graph, index)
    if value is not None or not _present(node, index):
        fixed = default if value is None else convert(value.reshape(-1)[0])
        return lambda ins: fixed
    return lambda ins: convert(ins[index].reshape(-1)[0])


def _planar(x_shape: Shape, out_shape: Shape, window: Window, group: int) -> tuple[Shape, Shape, dict]:
    """The 4-D shapes of the input and output of a 1-D or 2-D convolution (1-D as 2-D of height 1) and the 2-D
    conv kernels' keyword arguments (strides, pads, dilations, group)."""
    attrs = {"strides": window.strides, "pads": window.pads, "dilations": window.dilations, "group": group}
    if len(x_shape) == 4:
        return x_shape, out_shape, attrs
    attrs.update(strides=(1, *window.strides), pads=(0, window.pads[0], 0, window.pads[1]),
                 dilations=(1, *window.dilations))
    return (*x_shape[:2], 1, x_shape[2]), (*out_shape[:2], 1, out_shape[2]), attrs


def _planar_weights(w: np.ndarray) -> np.ndarray:
    """1-D filters ``[O, C / group, K]`` as 2-D ones of height 1; 2-D ones as they are."""
    return w[:, :, None] if w.ndim == 3 else w


def _conv2d(node: Node, x_shape: Shape, w_shape: Shape) -> tuple[dict, Shape]:
    """The keyword arguments of the 2-D conv kernels (strides, pads, dilations, group) and the output shape
    ``[N, O, OH, OW]`` of a Conv-like node on NCHW ``x_shape`` with OIHW weights ``w_shape``."""
    group, window = conv_window(node, x_shape, w_shape)
    out_shape = (x_shape[0], w_shape[0], *window.out)
    return _planar(x_shape, out_shape, window, group)[2], out_shape


def _gemm_shape(node: Node, x_shape: Shape, w: np.ndarray) -> Shape:
    if x_shape[1] != w.shape[1]:
        raise ValueError(f"node {node.name!r} ({node.op}): input x has {x_shape[1]} features, the weights "
                         f"[out, in] = {list(w.shape)} expect {w.shape[1]}")
    return x_shape[0], w.shape[0]


def _vector(node: Node, value: np.ndarray | None, length: int, what: str, dtype=np.float32) -> np.ndarray | None:
    """A per-output-channel array (a scalar is broadcast) of ``dtype``, or None. Only float values change type
    (to float32 scales or biases): an integer one must already be ``dtype``, as a cast would wrap it silently."""
    if value is None:
        return None
    if value.dtype != dtype and not (value.dtype.kind == "f" and np.dtype(dtype).kind == "f"):
        raise ValueError(f"node {node.name!r} ({node.op}): {what} must be {np.dtype(dtype)}, got {value.dtype}")
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


# ----------------------------------------------------------------------------- exact integer paths

def _along(value: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-tensor (one value) or per-channel (a vector) parameter shaped to broadcast along ``axis`` of a
    ``rank``-D array."""
    value = np.asarray(value)
    if value.size == 1:
        return value.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return value.reshape(shape)


def centered(q: np.ndarray, zero: np.ndarray | None, axis: int = 0) -> np.ndarray:
    """``q - zero`` in float64 (exact for codes); ``zero`` one value or one per index of ``axis``."""
    q = q.astype(np.float64)
    return q if zero is None else q - _along(zero, q.ndim, axis)


def multiplier(*scales: np.ndarray, divisor: np.ndarray | None = None) -> np.ndarray:
    """The product of ``scales`` (divided by ``divisor``), formed left to right in the scales' own type (float32,
    or float16 for float16 scales, as ONNX's reference forms it), returned as float64: the requantization
    multiplier of the integer ops."""
    m = np.asarray(scales[0])
    with np.errstate(all="ignore"):  # a zero scale computed at run time (the session's dry run): undefined in ONNX
        for s in scales[1:]:
            m = m * np.asarray(s)
        if divisor is not None:
            m = m / np.asarray(divisor)
    return np.asarray(m, np.float64)


def requantize(acc: np.ndarray, mult: np.ndarray, zero: np.ndarray | None, out: np.ndarray, act: str | None = None,
               unit: float = 1.0) -> None:
    """``out = saturate(rint(act(acc * mult) + zero))`` into integer ``out``, in float64, half to even.

    With exact accumulators and ``mult`` from :func:`multiplier`, this is ONNX's requantization (QLinearMatMul,
    QLinearConv) bit for bit. ``act`` clamps the real values ``acc * mult * unit`` (``unit``: the output scale).
    """
    info = np.iinfo(out.dtype)
    with np.errstate(all="ignore"):  # NaN from a zero scale computed at run time (see multiplier)
        t = acc * mult
        if act is not None:
            lo, hi = ACTIVATIONS[act]
            np.clip(t, lo / unit, None if hi is None else hi / unit, out=t)
        if zero is not None:
            t += int(np.asarray(zero).reshape(-1)[0])
        np.clip(np.rint(t, out=t), info.min, info.max, out=t)
        np.copyto(out, t, casting="unsafe")


def integer_conv(x: np.ndarray, w: np.ndarray, group: int, window: Window) -> np.ndarray:
    """Exact ``conv(x, w)`` of float64 ``x [N, C, *spatial]`` and ``w [O, C / group, *kernel]`` holding integers
    (codes minus zero points), any number of spatial axes, zero padding: an im2col copy of a window view and one
    batched BLAS product. Exact in float64: products of such integers are below 2**16 and any filter under 2**37
    values keeps every sum an integer below 2**53."""
    nd = x.ndim - 2
    n, o, cg = x.shape[0], w.shape[0], w.shape[1]
    kernel, out = w.shape[2:], window.out
    padded = np.pad(x, [(0, 0), (0, 0)] + [(window.pads[a], window.pads[a + nd]) for a in range(nd)])
    taps = cg * math.prod(kernel)
    cols = window_view(padded, kernel, window).reshape(n, group, cg, *out, *kernel)
    cols = cols.transpose(0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    cols = cols.reshape(n, group, math.prod(out), taps)
    y = np.matmul(cols, w.reshape(group, o // group, taps).transpose(0, 2, 1))  # [N, G, P, O / G]
    return y.transpose(0, 1, 3, 2).reshape(n, o, *out)


# ----------------------------------------------------------------------------- QuantizeLinear / DequantizeLinear

#: ONNX element types (``onnx.TensorProto``) of the codes QuantizeLinear's ``output_dtype`` may name (the importer
#: also names them in attr ``output_dtype_name``), and of the floats of DequantizeLinear's ``output_dtype``.
ONNX_CODE_TYPES = {2: "uint8", 3: "int8", 21: "uint4", 22: "int4", 25: "uint2", 26: "int2"}
ONNX_FLOAT_TYPES = {1: np.dtype(np.float32), 10: np.dtype(np.float16)}
FLOATS = tuple(ONNX_FLOAT_TYPES.values())
DEQUANTIZED = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int32))


def _fixed_quantization(node: Node, graph: Graph) -> tuple[float, int] | None:
    """``(scale, zero point)`` of a per-tensor Q/DQ node when both are parameters (or the zero point is absent) and
    the kernels take the scale; None otherwise (then no compiled entry: the values are read per call)."""
    scale = _constant(node, graph, 1)
    zero = _constant(node, graph, 2)
    if scale is None or (zero is None and _present(node, 2)):
        return None
    value = float(scale.reshape(-1)[0])
    return (value, 0 if zero is None else int(zero.reshape(-1)[0])) if 0 < value < math.inf else None


def _quantize(x: np.ndarray, scale: float, zero: int, dtype: np.dtype, out: np.ndarray) -> np.ndarray:
    """Per-tensor ONNX QuantizeLinear of float32 ``x`` into ``out``: ``kernels.quantize_linear``, or NumPy for a
    scale the kernel refuses (zero, negative or not finite: one computed at run time, such as the session's dry
    run on zeros feeds; ONNX leaves those results undefined)."""
    if 0 < scale < math.inf:
        return quantize_linear(x, scale, zero, dtype=dtype, out=out)
    info = np.iinfo(dtype)
    with np.errstate(all="ignore"):
        np.copyto(out, np.clip(np.rint(x / np.float32(scale)) + zero, info.min, info.max), casting="unsafe")
    return out


def _dequantize(q: np.ndarray, scale: float, zero: int, out: np.ndarray) -> np.ndarray:
    """Per-tensor ONNX DequantizeLinear into float32 ``out``: ``kernels.dequantize_linear``, or NumPy (the same
    values) for a scale the kernel refuses, as :func:`_quantize`."""
    if 0 < scale < math.inf:
        return dequantize_linear(q, scale, zero, out=out)
    with np.errstate(all="ignore"):
        np.multiply(np.subtract(q, zero, dtype=np.float32), np.float32(scale), out=out)
    return out


def _dequantizer(shape: Shape, scale: np.ndarray, zero: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``q -> (q - zero) * scale`` in float32 (ONNX DequantizeLinear), into one buffer reused by every call."""
    buffer, s, z = np.empty(shape, np.float32), float(scale), int(zero)
    return lambda q: dequantize_linear(q, s, z, out=buffer)


def _zero_point(node: Node, graph: Graph, index: int, default=np.uint8) -> np.ndarray:
    """A one-value uint8 / int8 zero point (zero of type ``default`` when absent)."""
    zero = _param(node, graph, index, "zero point", optional=True)
    zero = np.zeros((), default) if zero is None else _scalar(node, zero, "the zero point")
    if zero.dtype not in (np.uint8, np.int8):
        raise ValueError(f"node {node.name!r} ({node.op}): the zero point must be uint8 or int8, got {zero.dtype}")
    return zero


def _check_scales(node: Node, scale: np.ndarray | None) -> None:
    if scale is not None and not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError(f"node {node.name!r} ({node.op}): scales must be positive and finite, got "
                         f"{scale if scale.size < 8 else 'some that are not'}")


def _scale(node: Node, graph: Graph, index: int) -> np.ndarray:
    scale = _scalar(node, _param(node, graph, index, "scale"), "the scale").astype(np.float32)
    _check_scales(node, scale)
    return scale


def _container(code: str) -> np.dtype:
    """The dtype holding codes of type ``code`` (one per element)."""
    return np.dtype(np.int8 if qdq.CODE_TYPES[code][1] else np.uint8)


def _code_type(node: Node, zero: tuple[Shape, np.dtype] | None) -> str:
    """QuantizeLinear's code type: attr ``output_dtype_name`` (the importer's) or ``output_dtype``, else the
    zero point's type, else uint8 (ONNX)."""
    code = node.attrs.get("output_dtype_name")
    if code is None and node.attrs.get("output_dtype", 0):
        code = ONNX_CODE_TYPES.get(int(node.attrs["output_dtype"]), f"ONNX type {node.attrs['output_dtype']}")
    code = code or (zero[1].name if zero is not None else "uint8")
    if code not in qdq.CODE_TYPES:
        raise ValueError(f"node {node.name!r} ({node.op}): output type {code} is not supported; lowbit's code "
                         f"types are {list(qdq.CODE_TYPES)}")
    if zero is not None and zero[1] != _container(code):
        raise ValueError(f"node {node.name!r} ({node.op}): the zero point is {zero[1]} but the output type is {code} "
                         f"(held in {_container(code)})")
    return code


def _qparam_layout(node: Node, shape: Shape, scale: Shape, zero: Shape | None) -> tuple[int | None, int]:
    """``(axis, block_size)`` of Quantize/DequantizeLinear's scale on data of ``shape``: ``(None, 0)`` per tensor
    (one value), ``(axis, 0)`` per axis (a vector along ``axis``), ``(axis, block_size)`` blocked (the data's
    shape with ``axis`` shortened to ``ceil(n / block_size)``). The zero point, if any, is shaped like the scale."""
    where = f"node {node.name!r} ({node.op})"
    size, block = math.prod(scale), int(node.attrs.get("block_size", 0))
    if zero is not None and tuple(zero) != tuple(scale) and not size == 1 == math.prod(zero):
        raise ValueError(f"{where}: the zero point must have the scale's shape {list(scale)} (per axis or blocked), "
                         f"or both one value (per tensor); got {list(zero)}")
    if block < 0:
        raise ValueError(f"{where}: block_size must be >= 0, got {block}")
    if not block and size == 1 and len(scale) <= 1:
        return None, 0
    rank, axis = len(shape), int(node.attrs.get("axis", 1))
    if not -rank <= axis < rank:
        raise ValueError(f"{where}: axis {axis} is out of range for a {rank}-D input")
    axis %= rank
    want = [-(-d // block) if i == axis else d for i, d in enumerate(shape)] if block else [shape[axis]]
    if list(scale) != want:
        what = f"blocks of {block} along axis {axis}" if block else f"per axis {axis}"
        raise ValueError(f"{where}: the scale must be one value (per tensor) or of shape {want} ({what}) for an "
                         f"input of shape {list(shape)}, got {list(scale)}")
    return axis, block


def _laid_out(node: Node, graph: Graph, index: int, shape: Shape, axis: int | None, block: int
              ) -> Callable[[list[np.ndarray]], np.ndarray]:
    """A reader of a scale or zero point broadcast over data of ``shape`` as ONNX lays it out (per tensor, per
    axis, blocked: ``lowbit.quantization.grid.expand``), fixed at prepare when it is a parameter."""
    def expand(value: np.ndarray) -> np.ndarray:
        if axis is None:
            return value.reshape(())
        scheme = QScheme(granularity="group" if block else "channel", axis=axis, group_size=block or None)
        return grid.expand(value, shape, scheme)

    value = _constant(node, graph, index)
    if value is not None:
        fixed = expand(value)
        return lambda ins: fixed
    return lambda ins: expand(ins[index])


def _quantization_specs(node: Node, graph: Graph, inputs: Inputs, data: tuple) -> tuple:
    """Specs of the data, scale and zero point of Quantize/DequantizeLinear, the data's dtype one of ``data``."""
    x, scale, zero = (_spec(node, graph, inputs, i) for i in range(3))
    if x is None or x[1] not in data:
        raise ValueError(f"node {node.name!r} ({node.op}): input x must be {' or '.join(d.name for d in data)}, "
                         f"got {None if x is None else x[1]}")
    if scale is None or scale[1] not in FLOATS:
        raise ValueError(f"node {node.name!r} ({node.op}): the scale must be float32 or float16, got "
                         f"{'none' if scale is None else scale[1]}")
    _check_scales(node, _constant(node, graph, 1))
    return (tuple(x[0]), x[1]), scale, zero


@preparer("QuantizeLinear")
def prepare_quantize_linear(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX QuantizeLinear: ``y = saturate(rint(x / y_scale) + y_zero_point)``, half to even, with one scale per
    tensor, per index of ``axis``, or per block of ``block_size`` along it.

    Codes: int8, uint8, int4, uint4, int2 or uint2 (sub-byte ones one per int8 / uint8 element), as attr
    ``output_dtype_name`` (the importer's) or ``output_dtype`` says, else the zero point's type, else uint8.
    ``x / y_scale`` is computed in the type of attr ``precision`` when given, else in NumPy's promotion of the
    two types (float32 for a float16 scale on float32 data), as ONNX's reference does; ``saturate`` concerns
    only float8 codes, which lowbit does not produce. Per tensor on float32 runs ``kernels.quantize_linear``
    (sub-byte codes clipped after it: saturating to int8, then to int4, saturates to int4), the rest
    ``lowbit.quantization.qdq.quantize_linear``. Scale and zero point may be computed at run time.
    """
    return _prepare_quantize(node, graph, inputs)


@preparer(FUSED_QUANTIZE)
def prepare_quantize_to_nhwc(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """lowbit's QuantizeLinear of ``[N, C, *spatial]`` data written ``[N, *spatial, C]``: ONNX QuantizeLinear (the
    node's inputs and attributes) followed by ``Transpose(perm=[0, 2, ..., 1])``, the pair that
    :func:`lowbit.runtime.transpose_fusion.fuse_layout_transposes` merges. Per tensor float32 to 8-bit codes is one
    pass of ``kernels.quantize_linear_to_nhwc``; anything else runs QuantizeLinear's kernel, then transposes."""
    if len(inputs[0][0]) < 2:
        raise ValueError(f"node {node.name!r} ({node.op}): input x must have rank >= 2, got shape "
                         f"{list(inputs[0][0])}")
    return _prepare_quantize(node, graph, inputs, to_nhwc=True)


def _transposing(kernel: Kernel, perm: list[int]) -> Kernel:
    """``kernel`` (one output) with its output transposed by ``perm``, through a buffer of its own."""
    (shape, dtype), = kernel.outputs
    codes = np.empty(shape, dtype)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernel.run(ins, [codes])
        np.copyto(outs[0], codes.transpose(perm))

    return Kernel(run, [(tuple(shape[a] for a in perm), dtype)], kernel.ops, kernel.precision,
                  f"{kernel.note}, then transposed")


def _prepare_quantize(node: Node, graph: Graph, inputs: Inputs, to_nhwc: bool = False) -> Kernel:
    """QuantizeLinear's kernel; ``to_nhwc``: its output transposed channels last (:func:`channels_last_perm`)."""
    (shape, x_dtype), scale, zero = _quantization_specs(node, graph, inputs, FLOATS)
    code = _code_type(node, zero)
    bits, signed = qdq.CODE_TYPES[code]
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    zero_value = _constant(node, graph, 2)
    if zero_value is not None and (zero_value.min(initial=lo) < lo or zero_value.max(initial=hi) > hi):
        raise ValueError(f"node {node.name!r} (QuantizeLinear): the zero point must lie in {lo}..{hi} for {code} "
                         f"codes")
    axis, block = _qparam_layout(node, shape, scale[0], None if zero is None else zero[0])
    precision = node.attrs.get("precision", 0)
    if precision and precision not in ONNX_FLOAT_TYPES:
        raise ValueError(f"node {node.name!r} (QuantizeLinear): precision must be float or float16 (ONNX types "
                         f"{list(ONNX_FLOAT_TYPES)}), got {precision}")
    compute = ONNX_FLOAT_TYPES[precision] if precision else np.result_type(x_dtype, scale[1])
    out, size = [(shape, _container(code))], math.prod(shape)
    if axis is None and x_dtype == compute == np.float32:
        s, z, dtype = _per_tensor(node, graph, 1, float), _per_tensor(node, graph, 2, int, 0), _container(code)
        if to_nhwc and bits == 8:
            perm = channels_last_perm(len(shape))
            codes = np.empty(shape, dtype)  # for a scale the kernel refuses only (see _quantize)

            def run_nhwc(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
                scale = s(ins)
                if 0 < scale < math.inf:
                    quantize_linear_to_nhwc(ins[0], scale, z(ins), dtype=dtype, out=outs[0])
                else:
                    np.copyto(outs[0], _quantize(ins[0], scale, z(ins), dtype, codes).transpose(perm))

            fixed = _fixed_quantization(node, graph)
            entry = None if fixed is None else kernels.quantize_linear_to_nhwc_plan(shape, *fixed,
                                                                                    dtype=dtype).entry()
            return Kernel(run_nhwc, [(tuple(shape[a] for a in perm), dtype)], size, "int8", f"to {code}, NHWC",
                          entry=entry)

        def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            _quantize(ins[0], s(ins), z(ins), dtype, outs[0])
            if bits < 8:
                np.clip(outs[0], lo, hi, out=outs[0])

        fixed = _fixed_quantization(node, graph) if bits == 8 and not to_nhwc else None
        entry = None if fixed is None else kernels.quantize_linear_plan(shape, *fixed, dtype=dtype).entry()
        kernel = Kernel(run, out, size, "int8", f"to {code}", entry=entry)
        return _transposing(kernel, channels_last_perm(len(shape))) if to_nhwc else kernel
    has_zero = zero is not None

    def run_numpy(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        with np.errstate(all="ignore"):  # a zero scale computed at run time, as in _quantize
            codes = qdq.quantize_linear(ins[0].astype(compute, copy=False), ins[1], ins[2] if has_zero else None,
                                        axis=axis or 0, block_size=block, dtype=code)
        np.copyto(outs[0], codes)

    layout = "per tensor" if axis is None else f"blocks of {block} along axis {axis}" if block else f"axis {axis}"
    kernel = Kernel(run_numpy, out, size, "int8", f"to {code}, {layout} (NumPy)")
    return _transposing(kernel, channels_last_perm(len(shape))) if to_nhwc else kernel


@preparer("DequantizeLinear")
def prepare_dequantize_linear(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX DequantizeLinear: ``y = (x - x_zero_point) * x_scale`` with one scale per tensor, per index of
    ``axis``, or per block of ``block_size`` along it; ``x`` int8 / uint8 codes (sub-byte ones held in them too)
    or int32 (ONNX Runtime's int32 biases, zero point absent or int32).

    Computed as ONNX's reference does: ``float32(x)`` minus the zero point, times the scale, in NumPy's promoted
    type (float32 for codes and a float16 or float32 scale), rounded to the output type: attr ``output_dtype``
    (opset 23), else the scale's. Per tensor into float32 runs ``kernels.dequantize_linear`` (the same values:
    ``float32(x - zero_point) * float32(scale)``), the rest NumPy. Scale and zero point may be computed at run
    time.
    """
    (shape, dtype), scale, zero = _quantization_specs(node, graph, inputs, DEQUANTIZED)
    if zero is not None and zero[1] != dtype:
        raise ValueError(f"node {node.name!r} (DequantizeLinear): input x is {dtype} but the zero point is {zero[1]}")
    out_type = node.attrs.get("output_dtype", 0)
    if out_type and out_type not in ONNX_FLOAT_TYPES:
        raise ValueError(f"node {node.name!r} (DequantizeLinear): output_dtype must be float or float16 (ONNX types "
                         f"{list(ONNX_FLOAT_TYPES)}), got {out_type}")
    out_dtype = ONNX_FLOAT_TYPES[out_type] if out_type else scale[1]
    axis, block = _qparam_layout(node, shape, scale[0], None if zero is None else zero[0])
    out, size = [(shape, out_dtype)], math.prod(shape)
    zero_value = _constant(node, graph, 2)
    no_zero = zero is None or (zero_value is not None and not zero_value.any())
    if axis is None and out_dtype == np.float32 and (dtype != np.int32 or no_zero):
        s, z = _per_tensor(node, graph, 1, float), _per_tensor(node, graph, 2, int, 0)

        def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            _dequantize(ins[0], s(ins), z(ins), outs[0])

        fixed = _fixed_quantization(node, graph)
        entry = None if fixed is None else kernels.dequantize_linear_plan(shape, dtype, *fixed).entry()
        return Kernel(run, out, size, "int8", f"from {dtype}", entry=entry)
    s_of, z_of = _laid_out(node, graph, 1, shape, axis, block), _laid_out(node, graph, 2, shape, axis, block)
    has_zero = zero is not None

    def run_numpy(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        real = ins[0].astype(np.float32)
        if has_zero:
            real = real - z_of(ins)
        np.copyto(outs[0], real * s_of(ins), casting="unsafe")

    return Kernel(run_numpy, out, size, "int8", f"from {dtype} to {out_dtype} (NumPy)")


# ----------------------------------------------------------------------------- int8

def _int8_weights(node: Node, graph: Graph, w_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w int8, w_scale float32 [O], w_zero_point int8 [O])`` at inputs ``w_index .. w_index + 2``. uint8 weights
    and their zero point both move down by 128 into int8, which changes no difference ``w - w_zero_point``."""
    w = _param(node, graph, w_index, "weights")
    if w.dtype not in (np.int8, np.uint8):
        raise ValueError(f"node {node.name!r} ({node.op}): weights must be int8 or uint8, got {w.dtype}")
    scale = _vector(node, _param(node, graph, w_index + 1, "weight scale"), w.shape[0], "the weight scale")
    _check_scales(node, scale)
    zero = _param(node, graph, w_index + 2, "weight zero point", optional=True)
    if zero is not None and zero.dtype != w.dtype:
        raise ValueError(f"node {node.name!r} ({node.op}): weights are {w.dtype} but their zero point is {zero.dtype}")
    zero = np.zeros(w.shape[0], w.dtype) if zero is None else _vector(node, zero, w.shape[0],
                                                                      "the weight zero point", w.dtype)
    if w.dtype == np.uint8:
        w, zero = (w ^ 0x80).view(np.int8), (zero ^ 0x80).view(np.int8)  # v ^ 0x80 read as int8 is v - 128
    return np.ascontiguousarray(w), scale, zero


def _float_bias(bias: np.ndarray | None, x_scale: np.ndarray, w_scale: np.ndarray) -> np.ndarray | None:
    """A bias in real units: int32 biases count ``x_scale * w_scale`` each (ONNX QLinearConv)."""
    if bias is None or bias.dtype != np.int32:
        return bias
    return (bias.astype(np.float64) * (np.float64(x_scale) * w_scale)).astype(np.float32)


def _dtype_of(node: Node, spec: tuple[Shape, np.dtype] | None, dtypes: tuple, what: str, one: bool = False) -> None:
    """Check an optional input's dtype (and, with ``one``, that it holds one value)."""
    if spec is None:
        return
    names = [np.dtype(d).name for d in dtypes]
    if spec[1].name not in names:
        raise ValueError(f"node {node.name!r} ({node.op}): {what} must be {' or '.join(names)}, got {spec[1]}")
    if one and math.prod(spec[0]) != 1:
        raise ValueError(f"node {node.name!r} ({node.op}): {what} must be per tensor (one value), got shape "
                         f"{list(spec[0])}")


@preparer("QLinearConv")
def prepare_qlinear_conv(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX QLinearConv, NCHW with any number of spatial axes::

        acc[n, o] = B[o] + sum (x - x_zero_point) (w[o] - w_zero_point[o])      over o's group and window
        y[n, o]   = saturate(rint(acc * (x_scale * w_scale[o] / y_scale) + y_zero_point))

    in exact integers, the multiplier formed in the scales' type and applied in float64, half to even, as ONNX's
    reference. ``w`` int8 or uint8, ``w_scale`` / ``w_zero_point`` per tensor or per output channel, ``auto_pad``
    as ONNX; attr ``activation`` (activation fusion's) clamps the real values before rounding. 1-D and 2-D
    convolutions whose weights and quantization parameters are parameters run ``kernels.qlinear_conv2d_plan``
    (1-D as 2-D of height 1) with a float fallback; the rest an exact NumPy path (:func:`integer_conv`).
    With lowbit's attribute ``layout="NHWC"`` (``lowbit.runtime.layout``) x and y are 2-D ``[N, H, W, C]``, run
    by the plan in that layout (the other paths transpose around themselves).
    """
    w = _spec(node, graph, inputs, 3)
    if w is None:
        raise ValueError(f"node {node.name!r} (QLinearConv): input 3 (w) is required")
    x_shape = _input(node, inputs, len(w[0]), (np.uint8, np.int8))
    nhwc = channels_last(node, x_shape)
    x_shape = nchw_shape(x_shape) if nhwc else x_shape
    x_dtype = np.dtype(inputs[0][1])
    group, window = conv_window(node, x_shape, w[0])
    x_zero, y_zero = _spec(node, graph, inputs, 2), _spec(node, graph, inputs, 7)
    _dtype_of(node, x_zero, (x_dtype,), "x's zero point", one=True)
    _dtype_of(node, w, (np.int8, np.uint8), "the weights")
    _dtype_of(node, _spec(node, graph, inputs, 5), (w[1],), "the weights' zero point")
    _dtype_of(node, y_zero, (np.uint8, np.int8), "y's zero point", one=True)
    out = ((x_shape[0], w[0][0], *window.out), x_dtype if y_zero is None else y_zero[1])
    act = _activation(node)
    if len(x_shape) <= 4 and all(_constant(node, graph, i) is not None or not _present(node, i) for i in range(1, 9)):
        return _qlinear_conv_kernel(node, graph, x_shape, x_dtype, group, window, out, act, nhwc)
    ops = 2 * math.prod(out[0]) * math.prod(w[0][1:])

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, bias = (ins + [None] * 9)[:9]
        acc = integer_conv(centered(x, x_zero), centered(w, w_zero), group, window)
        if bias is not None:
            acc += _along(bias, acc.ndim, 1)
        mult = _along(multiplier(x_scale, w_scale, divisor=y_scale), acc.ndim, 1)
        requantize(acc, mult, y_zero, outs[0], act, float(np.asarray(y_scale).reshape(-1)[0]))

    kernel = Kernel(run, [out], ops, "int8", "exact NumPy (im2col + float64 BLAS)")
    return transposed_nhwc(kernel) if nhwc else kernel


def _qlinear_conv_kernel(node: Node, graph: Graph, x_shape: Shape, x_dtype: np.dtype, group: int, window: Window,
                         out: tuple[Shape, np.dtype], act: str | None, nhwc: bool = False) -> Kernel:
    """QLinearConv on ``kernels.qlinear_conv2d_plan`` with its float fallback; a 1-D one as 2-D of height 1; with
    ``nhwc``, a 2-D one on ``[N, H, W, C]`` activations (``x_shape`` and ``out`` still give the NCHW shapes)."""
    x_scale, x_zero = _scale(node, graph, 1), _zero_point(node, graph, 2, x_dtype)
    w, w_scale, w_zero = _int8_weights(node, graph, 3)
    y_scale, y_zero = _scale(node, graph, 6), _zero_point(node, graph, 7, x_dtype)
    bias = _vector(node, _param(node, graph, 8, "bias", optional=True), w.shape[0], "the bias", np.int32)
    shapes = x_shape, out[0]
    x_shape, out_shape, attrs = _planar(x_shape, out[0], window, group)
    w, out = _planar_weights(w), (out_shape, out[1])
    plan = kernels.qlinear_conv2d_plan(kernels.pack_conv_int8(w, group=group), nhwc_shape(x_shape) if nhwc else x_shape,
                                       float(x_scale), int(x_zero), w_scale, w_zero, float(y_scale), y_zero, bias,
                                       x_dtype=x_dtype, activation=act, layout="NHWC" if nhwc else "NCHW",
                                       out_dtype=out[1], **attrs)
    ops = 2 * math.prod(out[0]) * math.prod(w.shape[1:])

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        plan(ins[0].reshape(x_shape), out=outs[0].reshape(out[0]))

    channels = (-1,) + (1,) * (w.ndim - 1)
    w_float = ((w.astype(np.int32) - w_zero.reshape(channels)) * w_scale.reshape(channels)).astype(np.float32)
    fallback = _conv_fallback(node, x_shape, w_float, _float_bias(bias, x_scale, w_scale), attrs, act, out, ops,
                              _dequantizer(x_shape, x_scale, x_zero), (y_scale, y_zero))
    if nhwc:
        fallback = transposed_nhwc(fallback)
        return Kernel(lambda ins, outs: [plan(ins[0], out=outs[0])], fallback.outputs, ops, "int8",
                      f"qlinear_conv2d {plan.kind}, NHWC", fallback=fallback, entry=plan.entry())
    if shapes != (x_shape, out[0]):  # the fallback's Conv sees 4-D views of the 1-D arrays too
        fallback = Kernel(lambda ins, outs, run_4d=fallback.run: run_4d([ins[0].reshape(x_shape)],
                                                                        [outs[0].reshape(out[0])]),
                          [(shapes[1], out[1])], ops, fallback.precision, fallback.note)
    return Kernel(run, [(shapes[1], out[1])], ops, "int8", f"qlinear_conv2d {plan.kind}", fallback=fallback,
                  entry=plan.entry() if shapes == (x_shape, out[0]) else None)


def _gemm_kernel(node: Node, x_shape: Shape, w: np.ndarray, precision: str, note: str, compute_q, w_float: np.ndarray,
                 bias: np.ndarray | None, act: str | None, prequant: Callable[[np.ndarray], np.ndarray] | None = None,
                 out_dtype=np.float32, requant=None, entry: Entry | None = None) -> Kernel:
    """A Gemm-like kernel ``compute_q(x, out)`` (``entry``: the same as one compiled call) and its float fallback
    ``act(prequant(x) @ w_float.T + bias)``."""
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
                  fallback=_float_kernel(compute_float, out, ops, requant), entry=entry)


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
                        y_zero.dtype if quantized_out else np.float32, (y_scale, y_zero) if quantized_out else None,
                        plan.entry(x_shape[0]))


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


# ----------------------------------------------------------------------------- weight-only formats

def _weight_only(node: Node, graph: Graph, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(codes [out, K], scales, group_size)`` of a node of ``fmt`` (lowbit.quantization.formats), checked; scales
    ``[out, groups]`` for grouped formats, else ``[out]``."""
    where = f"node {node.name!r} ({node.op})"
    try:
        g = fmt.group_size(node.attrs.get("group_size")) if fmt.grouped else None
    except ValueError as error:
        raise ValueError(f"{where}: attribute {error}") from None
    if fmt.grouped and "group_size" not in node.attrs:
        raise ValueError(f"{where}: attribute group_size is required (one of {list(fmt.group_sizes)})")
    codes = fmt.check_codes(_param(node, graph, 1, "codes"), where)
    scales = _param(node, graph, 2, "scales")
    want = (codes.shape[0], -(-codes.shape[1] // g)) if g else (codes.shape[0],)
    if scales.size != math.prod(want) or (g and scales.shape != want):
        raise ValueError(f"{where}: scales must have shape {want} for codes {list(codes.shape)}"
                         f"{f' and group_size {g}' if g else ''}, got {scales.shape}")
    return codes, np.ascontiguousarray(scales.reshape(want), np.float32), g


def _sign(x: np.ndarray) -> np.ndarray:
    """``+1`` for ``x >= 0``, else -1 (as ``kernels.pack_bits`` encodes it)."""
    return np.where(x < 0, np.float32(-1), np.float32(1))


def _weight_only_gemm(fmt: WeightFormat) -> Callable[[Node, Graph, Inputs], Kernel]:
    """The preparer of ``fmt``'s Gemm op: ``y = act(x @ W.T + bias)`` for ``x`` float32 ``[..., K]`` (binary formats:
    ``sign(x)``), the product on ``fmt``'s kernel plan, its float fallback on the dequantized weights."""

    def prepare(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
        shape, dtype = inputs[0]
        if len(shape) < 2 or np.dtype(dtype) != np.float32:
            raise ValueError(f"node {node.name!r} ({node.op}): input x must be float32 [..., K] (at least 2-D), "
                             f"got shape {shape}, dtype {dtype}")
        codes, scales, g = _weight_only(node, graph, fmt)
        n, k = codes.shape
        if shape[-1] != k:
            raise ValueError(f"node {node.name!r} ({node.op}): input x has {shape[-1]} features, the weights "
                             f"[out, in] = {[n, k]} expect {k}")
        bias = _vector(node, _param(node, graph, 3, "bias", optional=True), n, "the bias")
        act = _activation(node)
        m = math.prod(shape[:-1])
        plan = fmt.plan(codes, scales, g, m)
        out = ((*shape[:-1], n), np.dtype(np.float32))
        ops = 2 * m * n * k
        w_t = np.ascontiguousarray(fmt.dequantize(codes, scales, g).T)

        def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            plan(ins[0].reshape(m, k), out=outs[0].reshape(m, n))
            _add_bias_act(outs[0], bias, act)

        def compute_float(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            np.matmul(_sign(x) if fmt.binarizes_input else x, w_t, out=y)
            _add_bias_act(y, bias, act)
            return y

        # a bare product is one team entry: compiled chains run it, shared out by their threads
        entry = plan.entry() if bias is None and act is None and not fmt.binarizes_input else None
        note = f"{fmt.name} {'g' + str(g) if g else 'per channel'}"
        return Kernel(run, [out], ops, fmt.name, note, fallback=_float_kernel(compute_float, out, ops), entry=entry)

    return prepare


for _fmt in FORMATS.values():
    if _fmt.product is not None:  # int8's lowbit.DynamicQGemm has its preparer above
        preparer(_fmt.ops["Gemm"])(_weight_only_gemm(_fmt))


@preparer(FORMATS["int4"].ops["Conv"])
def prepare_int4_conv(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 4, (np.float32,))
    codes, scales, g = _weight_only(node, graph, FORMATS["int4"])
    if "kernel_shape" not in node.attrs:
        raise ValueError(f"node {node.name!r} ({node.op}): attribute kernel_shape is required")
    kh, kw = node.attrs["kernel_shape"]
    o, k = codes.shape
    if k % (kh * kw):
        raise ValueError(f"node {node.name!r} ({node.op}): codes have {k} columns, not a multiple of "
                         f"KH * KW = {kh * kw}")
    w_shape = (o, k // (kh * kw), kh, kw)
    attrs, out_shape = _conv2d(node, x_shape, w_shape)
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


# ----------------------------------------------------------------------------- binary convolution

def _binary_filters(node: Node, graph: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(w OIHW int8 +-1, alpha [O], bias [O] or None)`` of a lowbit.BinaryConv."""
    w = _param(node, graph, 1, "weights")
    if w.ndim != 4:
        raise ValueError(f"node {node.name!r} ({node.op}): weights must be OIHW, got shape {w.shape}")
    FORMATS["binary"].check_codes(w.reshape(w.shape[0], -1), f"node {node.name!r} ({node.op})")
    alpha = _vector(node, _param(node, graph, 2, "alpha"), w.shape[0], "alpha")
    bias = _vector(node, _param(node, graph, 3, "bias", optional=True), w.shape[0], "the bias")
    return np.ascontiguousarray(w), alpha, bias


@preparer(FORMATS["binary"].ops["Conv"])
def prepare_binary_conv(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    x_shape = _input(node, inputs, 4, (np.float32,))
    w, alpha, bias = _binary_filters(node, graph)
    (attrs, out_shape), act = _conv2d(node, x_shape, w.shape), _activation(node)
    if attrs.pop("group") != 1:
        raise ValueError(f"node {node.name!r} (lowbit.BinaryConv): only group 1 is supported")
    pad_value = node.attrs.get("pad_value", 0)
    if pad_value not in (-1, 0, 1):
        raise ValueError(f"node {node.name!r} (lowbit.BinaryConv): pad_value must be -1, 0 or 1, got {pad_value!r}")
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


# The session imports this module (OP_MODULES) to register its preparers: importing the other quantized ops here
# registers theirs too. Last, because qlinear_ops builds on the helpers above.
from lowbit.runtime import qlinear_ops  # noqa: E402,F401
