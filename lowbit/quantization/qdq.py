"""ONNX QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear on NumPy arrays.

The three operators, with ONNX's semantics bit for bit, built on the scheme and
grid machinery (so a QTensor and an ONNX Q/DQ pair agree)::

    QuantizeLinear:        q = saturate(rint(x / scale) + zero_point)
    DequantizeLinear:      x = (q - zero_point) * scale
    DynamicQuantizeLinear: uint8, scale = (max(x, 0) - min(x, 0)) / 255,
                           zero_point = rint(clip(-min(x, 0) / scale, 0, 255))

``scale`` is a scalar (per tensor), a vector along ``axis`` (per axis), or, with
``block_size``, the input's shape with ``axis`` shortened to ``ceil(n / block_size)``
(blocked). Code types are int8, uint8, int4, uint4, int2 and uint2; sub-byte codes
are returned unpacked, in int8 or uint8 arrays.
"""

from __future__ import annotations

import numpy as np

import kernels

from lowbit.quantization import grid
from lowbit.quantization.scheme import QScheme

CODE_TYPES = {"int8": (8, True), "uint8": (8, False), "int4": (4, True), "uint4": (4, False),
              "int2": (2, True), "uint2": (2, False)}


def _code_type(dtype: object) -> tuple[int, bool]:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in CODE_TYPES:
        raise TypeError(f"dtype: expected one of {list(CODE_TYPES)}, got {name}")
    return CODE_TYPES[name]


def _scheme(bits: int, signed: bool, scale: np.ndarray, ndim: int, axis: int, block_size: int) -> QScheme:
    if block_size:
        return QScheme(bits, signed, symmetric=False, granularity="group", axis=axis, group_size=block_size)
    if scale.size == 1:
        return QScheme(bits, signed, symmetric=False)
    if scale.ndim != 1:
        raise ValueError(f"scale: expected a scalar or a vector without block_size, got shape {scale.shape}")
    return QScheme(bits, signed, symmetric=False, granularity="channel", axis=axis)


def _params(scale: np.ndarray, zero_point: object, scheme: QScheme, shape: tuple[int, ...]) -> grid.QParams:
    want = grid.param_shape(shape, scheme)
    scale = np.asarray(scale).reshape(want)
    zero = np.zeros(want, np.int32) if zero_point is None else np.asarray(zero_point).astype(np.int32).reshape(want)
    return grid.QParams(scale, zero)


def quantize_linear(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int | None = None, *,
                    axis: int = 1, block_size: int = 0, dtype: object = None) -> np.ndarray:
    """ONNX QuantizeLinear: codes of ``x`` (int8 / uint8 array holding the chosen code type).

    ``dtype`` (a name such as ``"int4"``, or a NumPy dtype) defaults to the zero
    point's type, else uint8, as in ONNX.
    """
    x = np.asarray(x)
    scale = np.asarray(scale)
    if dtype is None:
        dtype = np.asarray(zero_point).dtype if zero_point is not None else np.uint8
    bits, signed = _code_type(dtype)
    scheme = _scheme(bits, signed, scale, x.ndim, axis, block_size)
    return grid.quantize(x, scheme, _params(scale, zero_point, scheme, x.shape))


def dequantize_linear(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int | None = None, *,
                      axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in the scale's float dtype.

    ``q`` holds codes of one of :data:`CODE_TYPES` (sub-byte ones in int8 / uint8 arrays), or int32 (ONNX
    Runtime's quantized biases, per tensor or per axis: ``float32(q - zero_point) * scale``)."""
    q = np.asarray(q)
    scale = np.asarray(scale)
    out_dtype = scale.dtype if scale.dtype.kind == "f" else np.float32
    if q.dtype == np.int32:
        if block_size:
            raise ValueError("block_size: int32 codes are dequantized per tensor or per axis only")
        lead = [1] * q.ndim
        if scale.size > 1:
            lead[axis] = -1
        zero = np.zeros((), np.int64) if zero_point is None else np.asarray(zero_point, np.int64)
        shifted = q.astype(np.int64) - (zero.reshape(lead) if zero.size > 1 else zero.reshape(()))
        return (shifted.astype(np.float32) * scale.astype(np.float32).reshape(lead if scale.size > 1 else ())
                ).astype(out_dtype)
    if q.dtype.name not in CODE_TYPES:
        raise TypeError(f"q: expected codes of {list(CODE_TYPES)} or int32, got {q.dtype}")
    bits, signed = _code_type(q.dtype)
    codes = q.astype(np.int8 if signed else np.uint8)
    scheme = _scheme(bits, signed, scale, q.ndim, axis, block_size)
    return grid.dequantize(codes, scheme, _params(scale, zero_point, scheme, q.shape), np.float32).astype(out_dtype)


def dynamic_quantize_linear(x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear: ``(uint8 codes, scale, zero point)`` from the data's own range
    (``kernels.dynamic_quantize_linear``, one compiled pass), into ``out`` when given."""
    return kernels.dynamic_quantize_linear(np.asarray(x, np.float32, order="C"), out)
