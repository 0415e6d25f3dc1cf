"""Preparers of ONNX's integer ops and of ONNX Runtime's quantized ``com.microsoft`` ops, on lowbit's kernels.

Default domain, ONNX's semantics bit for bit (its reference evaluator computes the same codes):

``QLinearMatMul``          ``saturate(rint((a - za) @ (b - zb) * (sa * sb / sy)) + zy)``, b per tensor or column
``MatMulInteger``          ``(a - za) @ (b - zb)`` in int32, ``zb`` per tensor or per column
``ConvInteger``            ``conv(x - zx, w - zw)`` in int32, ``zw`` per tensor or per output channel
``DynamicQuantizeLinear``  uint8 codes of ``x``, with the scale and zero point of its own range

``com.microsoft`` (ONNX Runtime's contrib ops). ONNX Runtime rounds several of them in float32 with its own
fused formulas; lowbit follows the exact rule each docstring states, and lands within one code of ONNX Runtime
(within float rounding for float outputs):

``QLinearAdd``, ``QLinearMul``            ONNX Runtime's float32 formula (``kernels.qlinear_add`` / ``mul``)
``QLinearSigmoid``, ``QLinearLeakyRelu``  Dequantize -> f -> Quantize, tabulated over the 256 codes
``QLinearSoftmax``                        ONNX Runtime's exp table and float32 formula (same codes)
``QLinearConcat``                         each input requantized (Dequantize -> Quantize), then concatenated
``QLinearAveragePool``                    exact window sums, the rescale in float64 (``kernels.avg_pool2d``)
``QLinearGlobalAveragePool``              likewise over all spatial axes (``kernels.global_avg_pool2d``)
``QGemm``                                 ``(A - za) @ (B - zb) + C`` exact, times ``alpha sa sb[n] (/ sy)``
``DynamicQuantizeMatMul``                 A quantized per call (DynamicQuantizeLinear), then to float
                                          (``lowbit.DynamicQuantizeMatMul``: the same, A quantized per row)
``MatMulIntegerToFloat``                  ``(A - za) @ (B - zb) * sa sb[n] + bias``, float
``MatMulNBits``                           A @ block-quantized 2..8-bit weights (``kernels.gemm_int4``)

The integer products run on ``kernels`` (``linear_int8_plan``, ``gemm_int8``, ``conv2d_int8_plan``) when the
weights and quantization parameters are parameters and the shapes fit them; otherwise an exact NumPy path
(integer products in float64, :func:`~lowbit.runtime.quant_ops.requantize`) computes the same result.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

import kernels
from kernels.elementwise import qlinear_add_plan, qlinear_mul_plan
from kernels.pack.grouped import GROUP_SIZES
from lowbit.graph.ir import Graph, Node
from lowbit.quantization.qdq import dynamic_quantize_linear
from lowbit.runtime.float_ops import _matmul_shape
from lowbit.runtime.quant_ops import (Inputs, _along, _check_scales, _constant, _dequantize, _dtype_of, _per_tensor,
                                      _planar, _planar_weights, _present, _quantize, _spec, centered, integer_conv,
                                      multiplier, requantize)
from lowbit.runtime.registry import Kernel, Shape, preparer
from lowbit.runtime.windows import Window, conv_window, kernel_shape, window_geometry, window_view

CODES = (np.dtype(np.uint8), np.dtype(np.int8))
F32 = np.dtype(np.float32)
Spec = tuple[Shape, np.dtype]


def _fail(node: Node, message: str) -> ValueError:
    return ValueError(f"node {node.name!r} ({node.op}): {message}")


def _codes(node: Node, graph: Graph, inputs: Inputs, index: int, what: str) -> Spec:
    """The spec of required input ``index``, which must hold uint8 / int8 codes."""
    spec = _spec(node, graph, inputs, index)
    if spec is None or spec[1] not in CODES:
        raise _fail(node, f"input {index} ({what}) must be uint8 or int8, got {'none' if spec is None else spec[1]}")
    return spec


def _quantization(node: Node, graph: Graph, inputs: Inputs, scale: int, zero: int, dtype: np.dtype, what: str,
                  columns: int | None = None) -> None:
    """Check the scale at input ``scale`` (required, float) and the zero point at ``zero`` (optional, ``dtype``) of
    ``what``: one value each, or with ``columns``, one value or ``columns`` values."""
    s, z = _spec(node, graph, inputs, scale), _spec(node, graph, inputs, zero)
    if s is None or s[1].kind != "f":
        raise _fail(node, f"{what}'s scale (input {scale}) must be a float tensor, got {'none' if s is None else s[1]}")
    _dtype_of(node, z, (dtype,), f"{what}'s zero point")
    allowed = (1,) if columns is None else (1, columns)
    for spec, name in ((s, "scale"), (z, "zero point")):
        if spec is not None and math.prod(spec[0]) not in allowed:
            per = "per tensor (one value)" if columns is None else f"one value or {columns} (one per column)"
            raise _fail(node, f"{what}'s {name} must be {per}, got shape {list(spec[0])}")
    _check_scales(node, _constant(node, graph, scale))


def _value(node: Node, graph: Graph, index: int) -> np.ndarray | int:
    """A parameter as a scalar of its own type (one value) or a flat array (per column / channel); 0 if absent."""
    value = _constant(node, graph, index)
    if value is None:
        return 0
    return value.reshape(-1)[0] if value.size == 1 else np.ascontiguousarray(value.reshape(-1))


def _bias(node: Node, graph: Graph, inputs: Inputs, index: int, n: int, dtype: np.dtype) -> bool:
    """Check the optional bias at input ``index``: ``n`` values of ``dtype``. Whether it is present."""
    bias = _spec(node, graph, inputs, index)
    _dtype_of(node, bias, (dtype,), "bias")
    if bias is not None and math.prod(bias[0]) != n:
        raise _fail(node, f"bias must have N = {n} values, got shape {list(bias[0])}")
    return bias is not None


def _all_parameters(node: Node, graph: Graph, indices) -> bool:
    return all(_constant(node, graph, i) is not None or not _present(node, i) for i in indices)


def _int8_columns(b: np.ndarray, zero: np.ndarray | int) -> tuple[np.ndarray, np.ndarray | int]:
    """``b [K, N]`` as the kernels' int8 ``[N, K]`` rows, and its zero point as an int or an int64 ``[N]`` (per
    column): uint8 weights and their zero point both move down by 128, which changes no ``b - zero``."""
    w, zero = np.ascontiguousarray(b.T), np.asarray(zero).astype(np.int64)
    if w.dtype == np.uint8:
        w, zero = (w ^ 0x80).view(np.int8), zero - 128
    return w, int(zero) if zero.ndim == 0 else zero


def _by_rows(fn: Callable, k: int, n: int) -> Callable:
    """A run calling ``fn(a [M, K], out [M, N])`` on the 2-D views of N-D ``a`` and its output."""
    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        fn(ins[0].reshape(-1, k), outs[0].reshape(-1, n))
    return run


def _integer_matmul(a: np.ndarray, a_zero, b: np.ndarray, b_zero) -> np.ndarray:
    """``(a - a_zero) @ (b - b_zero)`` exactly, in float64 (numpy.matmul shapes; ``b_zero`` per tensor or per
    column): products of 8-bit differences are below 2**16, so sums of fewer than 2**37 are exact integers."""
    return np.matmul(centered(a, a_zero), centered(b, b_zero, -1))


# ----------------------------------------------------------------------------- matrix products

def _matmul_specs(node: Node, graph: Graph, inputs: Inputs, a: int, b: int) -> tuple[Spec, Spec, Shape]:
    """Specs of the code operands at inputs ``a`` and ``b`` and the numpy.matmul shape of their product."""
    a_spec, b_spec = _codes(node, graph, inputs, a, "A"), _codes(node, graph, inputs, b, "B")
    return a_spec, b_spec, _matmul_shape(node, tuple(a_spec[0]), tuple(b_spec[0]))


@preparer("QLinearMatMul")
def prepare_qlinear_matmul(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX QLinearMatMul (numpy.matmul shapes, batch dimensions broadcast)::

        y = saturate(rint((a - a_zero_point) @ (b - b_zero_point) * (a_scale * b_scale / y_scale) + y_zero_point))

    exact integer products, the multiplier formed in the scales' type (float32, or float16 at opset 21) and
    applied in float64, half to even: ONNX's reference bit for bit. ``a`` per tensor, ``b`` per tensor or per
    column. A 2-D ``b`` parameter with parameter scales and zero points runs ``kernels.linear_int8_plan`` on ``a``
    as rows ``[-1, K]``; anything else the exact NumPy path.
    """
    a, b, shape = _matmul_specs(node, graph, inputs, 0, 3)
    columns = b[0][-1] if len(b[0]) > 1 else None
    _quantization(node, graph, inputs, 1, 2, a[1], "a")
    _quantization(node, graph, inputs, 4, 5, b[1], "b", columns)
    _quantization(node, graph, inputs, 6, 7, _codes(node, graph, inputs, 7, "y_zero_point")[1], "y")
    out = (shape, _spec(node, graph, inputs, 7)[1])
    k, ops = a[0][-1], 2 * math.prod(shape) * a[0][-1]
    if len(b[0]) == 2 and _all_parameters(node, graph, range(1, 8)):
        w, w_zero = _int8_columns(_constant(node, graph, 3), _value(node, graph, 5))
        plan = kernels.linear_int8_plan(kernels.pack_int8(w), a_dtype=a[1], a_scale=_value(node, graph, 1),
                                        a_zero_point=int(_value(node, graph, 2)), w_scale=_value(node, graph, 4),
                                        w_zero_point=w_zero, out_dtype=out[1],
                                        out_scale=_value(node, graph, 6), out_zero_point=int(_value(node, graph, 7)))
        return Kernel(_by_rows(lambda x, y: plan(x, out=y), k, w.shape[0]), [out], ops, "int8", "linear_int8",
                      entry=plan.entry(a[0][0]) if len(a[0]) == 2 else None)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = ins[:8]
        acc = _integer_matmul(a, a_zero, b, b_zero)
        requantize(acc, _along(multiplier(a_scale, b_scale, divisor=y_scale), acc.ndim, -1), y_zero, outs[0])

    return Kernel(run, [out], ops, "int8", "exact NumPy (float64 BLAS)")


@preparer("MatMulInteger")
def prepare_matmul_integer(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX MatMulInteger: ``y = (a - a_zero_point) @ (b - b_zero_point)`` in int32 (numpy.matmul shapes),
    ``a_zero_point`` per tensor, ``b_zero_point`` per tensor or per column.

    A 2-D ``b`` parameter (its zero point too) runs ``kernels.gemm_int8`` on ``a``'s rows ``[-1, K]`` and weights
    packed once, while K is within ``kernels.max_k_int32`` (no int32 overflow is possible; for an ``a_zero_point``
    computed at run time, such as DynamicQuantizeLinear's, for every zero point of ``a``'s type); anything else
    exact NumPy, cast to int32 (wrapping as ONNX's int32 accumulation would).
    """
    a, b, shape = _matmul_specs(node, graph, inputs, 0, 1)
    columns = b[0][-1] if len(b[0]) > 1 else None
    for index, (spec, what) in enumerate(((a, "a"), (b, "b")), start=2):
        zero = _spec(node, graph, inputs, index)
        _dtype_of(node, zero, (spec[1],), f"{what}'s zero point")
        if zero is not None and math.prod(zero[0]) not in ((1,) if what == "a" else (1, columns)):
            raise _fail(node, f"{what}'s zero point must be per tensor{'' if what == 'a' else ' or per column'}, "
                              f"got shape {list(zero[0])}")
    out = (shape, np.dtype(np.int32))
    k, ops = a[0][-1], 2 * math.prod(shape) * a[0][-1]
    if len(b[0]) == 2 and _all_parameters(node, graph, (1, 3)):
        a_zero = _per_tensor(node, graph, 2, int, 0)
        info = np.iinfo(a[1])
        zeros = (a_zero([]),) if _all_parameters(node, graph, (2,)) else (info.min, info.max)
        w, w_zero = _int8_columns(_constant(node, graph, 1), _value(node, graph, 3))
        if k <= min(kernels.max_k_int32(a[1], zero, w_zero) for zero in zeros):
            packed, n = kernels.pack_int8(w), w.shape[0]

            def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
                kernels.gemm_int8(ins[0].reshape(-1, k), packed, a_zero_point=a_zero(ins), b_zero_point=w_zero,
                                  out=outs[0].reshape(-1, n))

            return Kernel(run, [out], ops, "int8", "gemm_int8")

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        a, b, a_zero, b_zero = (ins + [None] * 4)[:4]
        np.copyto(outs[0], _integer_matmul(a, a_zero, b, b_zero).astype(np.int64), casting="unsafe")

    return Kernel(run, [out], ops, "int8", "exact NumPy (float64 BLAS)")


@preparer("com.microsoft.MatMulIntegerToFloat")
def prepare_matmul_integer_to_float(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?)::

        Y = (A - a_zero_point) @ (B - b_zero_point) * (a_scale * b_scale[n]) + bias[n]

    exact integer products, the scale product formed in the scales' type and applied in float64, rounded to the
    scales' type (float32; float16 on the NumPy path). ONNX Runtime scales in float32: within float rounding.
    A 2-D ``B`` parameter with float32 parameter scales runs ``kernels.linear_int8_plan``; with ``A``'s scale and
    zero point computed (uint8 codes of a DynamicQuantizeLinear that several products share, as
    ``lowbit.runtime.dynamic_fusion`` leaves them), ``kernels.linear_dynamic_int8_plan(...).quantized``; the rest
    exact NumPy.
    """
    a, b, shape = _matmul_specs(node, graph, inputs, 0, 1)
    columns = b[0][-1] if len(b[0]) > 1 else None
    _quantization(node, graph, inputs, 2, 4, a[1], "A")
    _quantization(node, graph, inputs, 3, 5, b[1], "B", columns)
    out = (shape, _spec(node, graph, inputs, 2)[1])
    _bias(node, graph, inputs, 6, b[0][-1], out[1])
    k, ops = a[0][-1], 2 * math.prod(shape) * a[0][-1]
    if len(b[0]) == 2 and out[1] == F32 and _all_parameters(node, graph, range(1, 7)):
        w, w_zero = _int8_columns(_constant(node, graph, 1), _value(node, graph, 5))
        bias = _constant(node, graph, 6)
        plan = kernels.linear_int8_plan(kernels.pack_int8(w), a_dtype=a[1], a_scale=_value(node, graph, 2),
                                        a_zero_point=int(_value(node, graph, 4)), w_scale=_value(node, graph, 3),
                                        w_zero_point=w_zero,
                                        bias=None if bias is None else bias.reshape(-1))
        return Kernel(_by_rows(lambda x, y: plan(x, out=y), k, w.shape[0]), [out], ops, "int8", "linear_int8",
                      entry=plan.entry(a[0][0]) if len(a[0]) == 2 else None)
    w_scale = _constant(node, graph, 3)
    if (len(b[0]) == 2 and out[1] == F32 and a[1] == np.uint8 and _present(node, 4) and w_scale is not None
            and k <= kernels.DynamicLinearPlan.max_k
            and w_scale.dtype == F32 and (w_scale > 0).all() and _all_parameters(node, graph, (1, 5, 6))):
        # A's scale and zero point computed (DynamicQuantizeLinear's codes, shared by several products)
        w, w_zero = _int8_columns(_constant(node, graph, 1), _value(node, graph, 5))
        bias = _constant(node, graph, 6)
        shared = kernels.linear_dynamic_int8_plan(kernels.pack_int8(w), w_scale.reshape(-1), w_zero,
                                                  None if bias is None else bias.reshape(-1))

        def run_shared(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            shared.quantized(ins[0], ins[2], ins[4], out=outs[0])

        entry = shared.entry(math.prod(a[0][:-1]), quantized=True)
        return Kernel(run_shared, [out], ops, "int8", "linear_dynamic_int8, codes shared",
                      entry=entry and entry.reading(0, 2, 4))

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        a, b, a_scale, b_scale, a_zero, b_zero, bias = (ins + [None] * 7)[:7]
        real = _integer_matmul(a, a_zero, b, b_zero) * _along(multiplier(a_scale, b_scale), len(shape), -1)
        np.copyto(outs[0], real if bias is None else real + bias, casting="unsafe")

    return Kernel(run, [out], ops, "int8", "exact NumPy (float64 BLAS)")


@preparer("com.microsoft.DynamicQuantizeMatMul")
def prepare_dynamic_quantize_matmul(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?): float32 ``A`` quantized per call
    to uint8 as ONNX DynamicQuantizeLinear does (scale ``sa`` and zero point ``za`` of its own range), then::

        Y = (A_q - za) @ (B - b_zero_point) * (sa * b_scale[n]) + bias[n]

    as MatMulIntegerToFloat (exact products). A 2-D ``B`` parameter with a float32 scale runs
    ``kernels.linear_dynamic_int8`` (float32 scaling, as ONNX Runtime) on weights packed once; the rest exact
    NumPy (float64 scaling). lowbit's attribute ``per_row=1`` quantizes each row of ``A`` (each token) with its
    own range instead (:func:`lowbit.onnx.session` sets it for ``session.lowbit.dynamic_per_token``).
    """
    a = _spec(node, graph, inputs, 0)
    if a is None or a[1] != F32:
        raise _fail(node, f"input 0 (A) must be float32, got {'none' if a is None else a[1]}")
    b = _codes(node, graph, inputs, 1, "B")
    shape = _matmul_shape(node, tuple(a[0]), tuple(b[0]))
    _quantization(node, graph, inputs, 2, 3, b[1], "B", b[0][-1] if len(b[0]) > 1 else None)
    _bias(node, graph, inputs, 4, b[0][-1], F32)
    out, k = (shape, F32), a[0][-1]
    ops = 2 * math.prod(shape) * k
    per_row = bool(node.attrs.get("per_row", 0))
    constants = len(b[0]) == 2 and k <= kernels.DynamicLinearPlan.max_k and _all_parameters(node, graph, range(1, 5))
    if constants and np.dtype(_spec(node, graph, inputs, 2)[1]) == F32:
        w, w_zero = _int8_columns(_constant(node, graph, 1), _value(node, graph, 3))
        bias = _constant(node, graph, 4)
        w_scale = np.asarray(_value(node, graph, 2)).reshape(-1)
        plan = kernels.linear_dynamic_int8_plan(kernels.pack_int8(w), w_scale, w_zero,
                                                None if bias is None else bias.reshape(-1), per_row=per_row)
        note = f"linear_dynamic_int8{', per token' * per_row}"
        return Kernel(lambda ins, outs: [plan(ins[0], out=outs[0])], [out], ops, "int8", note,
                      entry=plan.entry(math.prod(a[0][:-1])))
    if per_row:
        raise _fail(node, f"per_row needs B, its scale, zero point and bias as constants, B 2-D, the scale float32 "
                          f"and K at most {kernels.DynamicLinearPlan.max_k}")

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, b, b_scale, b_zero, bias = (ins + [None] * 5)[:5]
        codes, scale, zero = dynamic_quantize_linear(x)
        real = _integer_matmul(codes, zero, b, b_zero) * _along(multiplier(scale, b_scale), len(shape), -1)
        np.copyto(outs[0], real if bias is None else real + bias, casting="unsafe")

    return Kernel(run, [out], ops, "int8", "dynamic uint8 + exact NumPy (float64 BLAS)")


@preparer("lowbit.DynamicQuantizeMatMul")
def prepare_lowbit_dynamic_quantize_matmul(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """lowbit's DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?), domain ``lowbit``: ONNX Runtime's
    DynamicQuantizeMatMul with ``A`` quantized per row (each token with its own range, as ``per_row=1``), written by
    :func:`lowbit.onnx.quantization.quantize_dynamic` (its docstring states the formula). ``B``, its scale, zero point
    and the bias must be constants, ``B`` 2-D, the scale float32, K at most ``kernels.DynamicLinearPlan.max_k``."""
    per_row = Node(node.op, node.inputs, node.outputs, {**node.attrs, "per_row": 1}, node.name)
    return prepare_dynamic_quantize_matmul(per_row, graph, inputs)


@preparer("com.microsoft.QGemm")
def prepare_qgemm(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QGemm(A, a_scale, a_zero_point, B, b_scale, b_zero_point, C?, y_scale?, y_zero_point?)::

        acc = (A' - a_zero_point) @ (B' - b_zero_point[n]) + C        exact; A' = A.T if transA, B' = B.T if transB
        Y   = saturate(rint(acc * (alpha * a_scale * b_scale[n] / y_scale) + y_zero_point))    with y_zero_point
        Y   = float32(acc * (alpha * a_scale * b_scale[n] [/ y_scale]))                         without

    ``C`` int32, broadcast to ``[M, N]``; the scale product formed in float32 in that order (as ONNX Runtime),
    applied in float64, half to even (ONNX Runtime: float32, so codes within one). A ``B`` parameter with ``C``
    absent or one value per column runs ``kernels.linear_int8_plan``; the rest exact NumPy.
    """
    a, b = _codes(node, graph, inputs, 0, "A"), _codes(node, graph, inputs, 3, "B")
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
    alpha = np.float32(node.attrs.get("alpha", 1.0))
    if len(a[0]) != 2 or len(b[0]) != 2:
        raise _fail(node, f"A and B must be 2-D, got shapes {list(a[0])} and {list(b[0])}")
    (m, k), (kb, n) = a[0][::-1] if trans_a else a[0], b[0][::-1] if trans_b else b[0]
    if k != kb:
        raise _fail(node, f"A {list(a[0])} (transA={int(trans_a)}) and B {list(b[0])} (transB={int(trans_b)}) do not "
                          "multiply")
    _quantization(node, graph, inputs, 1, 2, a[1], "A")
    _quantization(node, graph, inputs, 4, 5, b[1], "B", n)
    c, y_scale, y_zero = (_spec(node, graph, inputs, i) for i in (6, 7, 8))
    _dtype_of(node, c, (np.int32,), "C")
    if c is not None and np.broadcast_shapes(tuple(c[0]), (m, n)) != (m, n):
        raise _fail(node, f"C {list(c[0])} does not broadcast to [M, N] = {[m, n]}")
    _dtype_of(node, y_scale, (F32,), "y_scale", one=True)
    _dtype_of(node, y_zero, CODES, "y_zero_point", one=True)
    out = ((m, n), F32 if y_zero is None else y_zero[1])
    ops = 2 * m * n * k
    row_bias = c is None or math.prod(c[0]) in (1, n) and (len(c[0]) < 2 or c[0][0] == 1)
    if row_bias and (y_zero is None) == (y_scale is None) and _all_parameters(node, graph, range(1, 9)):
        b_value = _constant(node, graph, 3)
        w, w_zero = _int8_columns(b_value.T if trans_b else b_value, _value(node, graph, 5))
        bias = None if c is None else np.broadcast_to(_constant(node, graph, 6).reshape(-1), (n,)).astype(np.int32)
        requant = {} if y_zero is None else {"out_dtype": out[1], "out_scale": _value(node, graph, 7),
                                             "out_zero_point": int(_value(node, graph, 8))}
        plan = kernels.linear_int8_plan(kernels.pack_int8(w), a_dtype=a[1], a_scale=alpha * _value(node, graph, 1),
                                        a_zero_point=int(_value(node, graph, 2)), w_scale=_value(node, graph, 4),
                                        w_zero_point=w_zero, bias=bias, **requant)

        def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            plan(np.ascontiguousarray(ins[0].T) if trans_a else ins[0], out=outs[0])

        return Kernel(run, [out], ops, "int8", "linear_int8", entry=None if trans_a else plan.entry(out[0][0]))

    def run_numpy(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        a, a_scale, a_zero, b, b_scale, b_zero, c, y_scale, y_zero = (ins + [None] * 9)[:9]
        acc = _integer_matmul(a.T if trans_a else a, a_zero, b.T if trans_b else b, b_zero)
        if c is not None:
            acc += c
        mult = multiplier(alpha, a_scale, b_scale, divisor=y_scale).reshape(-1)
        if y_zero is None:
            np.multiply(acc, mult, out=outs[0], casting="unsafe")
        else:
            requantize(acc, mult, y_zero, outs[0])

    return Kernel(run_numpy, [out], ops, "int8", "exact NumPy (float64 BLAS)")


# ----------------------------------------------------------------------------- MatMulNBits

def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` unsigned ``bits``-bit codes along the last axis of uint8 ``packed``, low bits first."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def _nbits_codes(node: Node, b: np.ndarray, zero: np.ndarray | None, k: int, n: int, bits: int, block: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8 [N, K], zero points [N, k_blocks])`` of MatMulNBits' packed ``B`` and ``zero_points`` (uint8
    packed like B, or float; absent: ``2**(bits - 1)``)."""
    blocks = -(-k // block)
    want = (n, blocks, block * bits // 8)
    if b.dtype != np.uint8 or b.shape != want:
        raise _fail(node, f"B must be uint8 {list(want)} = [N, k_blocks, block_size * bits / 8], got {b.dtype} "
                          f"{list(b.shape)}")
    codes = _unpack_bits(b, bits, block).reshape(n, blocks * block)[:, :k]
    if zero is None:
        return codes, np.full((n, blocks), 1 << bits - 1, np.uint8)
    if zero.dtype == np.uint8:
        packed = zero.reshape(n, -1)
        if packed.shape[1] != -(-blocks * bits // 8):
            raise _fail(node, f"packed zero_points must be [N, ceil(k_blocks * bits / 8)] = "
                              f"{[n, -(-blocks * bits // 8)]}, got {list(zero.shape)}")
        return codes, _unpack_bits(packed, bits, blocks)
    if zero.size != n * blocks:
        raise _fail(node, f"float zero_points must be [N, k_blocks] = {[n, blocks]}, got {list(zero.shape)}")
    return codes, zero.reshape(n, blocks)


def _nbits_matrix(node: Node, b: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, g_idx: np.ndarray | None,
                  k: int, n: int, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' weights, checked and unpacked: ``(codes uint8 [N, K], zero points, scales [N, k_blocks])``."""
    codes, zero = _nbits_codes(node, b, zero, k, n, bits, block)
    if scales.dtype != F32 or scales.size != zero.size:
        raise _fail(node, f"scales must be float32 [N, k_blocks] = {list(zero.shape)}, got {scales.dtype} "
                          f"{list(scales.shape)}")
    if g_idx is not None and not np.array_equal(g_idx.reshape(-1), np.arange(k) // block):
        raise _fail(node, "g_idx other than the identity order of blocks (act-order) is not supported")
    return codes, zero, scales.reshape(zero.shape)


def _nbits_weights(codes: np.ndarray, zero: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Dequantized float32 ``W [N, K] = (codes - zero[n, g]) * scales[n, g]``, ``g = k // block``."""
    k = codes.shape[1]
    zero = np.repeat(zero.astype(np.float32), block, axis=1)[:, :k]
    return (codes.astype(np.float32) - zero) * np.repeat(scales, block, axis=1)[:, :k]


@preparer("com.microsoft.MatMulNBits")
def prepare_matmul_nbits(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?): ``Y = A @ W.T + bias`` with::

        W[n, k] = (q[n, k] - zero_point[n, g]) * scales[n, g]           g = k // block_size

    ``q`` unsigned ``bits``-bit codes (2, 4 or 8) packed low bits first along K in ``B [N, k_blocks, blob]``;
    ``zero_points`` packed likewise (uint8 ``[N, ceil(k_blocks * bits / 8)]``) or float ``[N, k_blocks]``,
    absent: ``2**(bits - 1)``. ``accuracy_level`` 4 with 4-bit codes, uint8 zero points and a block size of
    32..256 runs ``kernels.gemm_int4`` (activations quantized to int8 per row and block on the fly, as ONNX
    Runtime's int8 compute does; its error bound is in its docstring), with the float path as fallback;
    otherwise float32: BLAS on the weights dequantized once (ONNX Runtime's float compute, within float
    rounding), or per call when they are computed at run time. ``g_idx`` (deprecated) is taken only in the
    identity order of blocks.
    """
    a = _spec(node, graph, inputs, 0)
    k, n, block = int(node.attrs["K"]), int(node.attrs["N"]), int(node.attrs["block_size"])
    bits, level = int(node.attrs.get("bits", 4)), int(node.attrs.get("accuracy_level", 0))
    if a is None or a[1] != F32 or not a[0] or a[0][-1] != k:
        raise _fail(node, f"A must be float32 [..., K = {k}], got {'none' if a is None else (a[1], list(a[0]))}")
    if bits not in (2, 4, 8) or block < 16 or block & (block - 1):
        raise _fail(node, f"bits must be 2, 4 or 8 and block_size a power of two >= 16, got {bits} and {block}")
    if not (_present(node, 1) and _present(node, 2)):
        raise _fail(node, "inputs B and scales are required")
    has_bias = _bias(node, graph, inputs, 5, n, F32)
    out = ((*a[0][:-1], n), F32)
    ops = 2 * math.prod(out[0]) * k
    if not _all_parameters(node, graph, (1, 2, 3, 4)):
        def run_numpy(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            b, scales, zero, g_idx = (ins + [None] * 5)[1:5]
            codes, zero, scales = _nbits_matrix(node, b, scales, zero, g_idx, k, n, bits, block)
            np.matmul(ins[0], _nbits_weights(codes, zero, scales, block).T, out=outs[0])
            if has_bias:
                outs[0] += ins[5].reshape(-1)

        return Kernel(run_numpy, [out], ops, "float32", "weights dequantized per call")
    codes, zero, scales = _nbits_matrix(node, *(_constant(node, graph, i) for i in (1, 2, 3, 4)), k, n, bits, block)
    w_t = np.ascontiguousarray(_nbits_weights(codes, zero, scales, block).T)  # [K, N]: BLAS's fast layout

    def run_float(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        np.matmul(ins[0], w_t, out=outs[0])
        if has_bias:
            outs[0] += ins[5].reshape(-1)

    float_kernel = Kernel(run_float, [out], ops, "float32", "BLAS on dequantized weights")
    if not (level == 4 and bits == 4 and zero.dtype == np.uint8 and block in GROUP_SIZES):
        return float_kernel
    packed = kernels.pack_int4_codes(*(np.ascontiguousarray(v) for v in (codes, scales, zero)), group_size=block)
    plan = kernels.gemm_int4_plan(packed, math.prod(a[0][:-1]))

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        plan(ins[0].reshape(-1, k), out=outs[0].reshape(-1, n))
        if has_bias:
            outs[0] += ins[5].reshape(-1)

    # without a bias, one team entry: compiled chains run the product, shared out by their threads
    return Kernel(run, [out], ops, "int4", f"gemm_int4 g{block}", fallback=float_kernel,
                  entry=None if has_bias else plan.entry())


# ----------------------------------------------------------------------------- convolution

@preparer("ConvInteger")
def prepare_conv_integer(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX ConvInteger: ``y = conv(x - x_zero_point, w - w_zero_point)`` in int32, NCHW with any number of spatial
    axes, padding worth ``x_zero_point`` (adding 0), ``w_zero_point`` per tensor or per output channel.

    1-D and 2-D ones whose weights (and zero points) are parameters run ``kernels.conv2d_int8_plan`` (1-D as 2-D of
    height 1) while a filter is within ``kernels.max_k_int32``; the rest the exact NumPy path (``integer_conv``).
    """
    x, w = _codes(node, graph, inputs, 0, "x"), _codes(node, graph, inputs, 1, "w")
    group, window = conv_window(node, tuple(x[0]), tuple(w[0]))
    x_zero, w_zero = _spec(node, graph, inputs, 2), _spec(node, graph, inputs, 3)
    _dtype_of(node, x_zero, (x[1],), "x's zero point", one=True)
    _dtype_of(node, w_zero, (w[1],), "w's zero point")
    if w_zero is not None and math.prod(w_zero[0]) not in (1, w[0][0]):
        raise _fail(node, f"w's zero point must be per tensor or per output channel ({w[0][0]}), got shape "
                          f"{list(w_zero[0])}")
    out = ((x[0][0], w[0][0], *window.out), np.dtype(np.int32))
    filter_size = math.prod(w[0][1:])
    ops = 2 * math.prod(out[0]) * filter_size
    if len(x[0]) <= 4 and _all_parameters(node, graph, (1, 2, 3)):
        x_zp, w_zp = int(_value(node, graph, 2)), _value(node, graph, 3)
        shifted = np.asarray(w_zp).astype(np.int64) - (128 if w[1] == np.uint8 else 0)  # as the kernel sees it
        if filter_size <= kernels.max_k_int32(x[1], x_zp, shifted):
            x4, out4, attrs = _planar(tuple(x[0]), out[0], window, group)
            weights = kernels.pack_conv_int8(_planar_weights(_constant(node, graph, 1)), group=group)
            plan = kernels.conv2d_int8_plan(weights, x4, x[1], x_zero_point=x_zp, w_zero_point=w_zp, **attrs)

            def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
                plan(ins[0].reshape(x4), out=outs[0].reshape(out4))

            return Kernel(run, [out], ops, "int8", f"conv2d_int8 {plan.kind}",
                          entry=plan.entry() if (tuple(x[0]), out[0]) == (x4, out4) else None)

    def run_numpy(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, w, x_zero, w_zero = (ins + [None] * 4)[:4]
        acc = integer_conv(centered(x, x_zero), centered(w, w_zero), group, window)
        np.copyto(outs[0], acc.astype(np.int64), casting="unsafe")

    return Kernel(run_numpy, [out], ops, "int8", "exact NumPy (im2col + float64 BLAS)")


# ----------------------------------------------------------------------------- elementwise

def _binary_shape(node: Node, a: Spec, b: Spec) -> Shape:
    if a[1] != b[1]:
        raise _fail(node, f"A and B must have the same type, got {a[1]} and {b[1]}")
    try:
        return np.broadcast_shapes(tuple(a[0]), tuple(b[0]))
    except ValueError:
        raise _fail(node, f"shapes {list(a[0])} and {list(b[0])} do not broadcast") from None


BINARY = {"com.microsoft.QLinearAdd": kernels.qlinear_add, "com.microsoft.QLinearMul": kernels.qlinear_mul}
PLANS = {"com.microsoft.QLinearAdd": qlinear_add_plan, "com.microsoft.QLinearMul": qlinear_mul_plan}


@preparer(*BINARY)
def prepare_qlinear_binary(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QLinearAdd / QLinearMul(A, A_scale, A_zero_point?, B, B_scale, B_zero_point?, C_scale,
    C_zero_point?), NumPy broadcasting, ``C = saturate(rint(DQ(A) op DQ(B) / C_scale) + C_zero_point)`` with
    ``DQ(q) = (q - zp) * scale``, by ``kernels.qlinear_add`` / ``qlinear_mul``: ONNX Runtime's own float32
    formula, so its codes (within one of the exact value; the kernels' docstrings bound it).
    """
    a, b = _codes(node, graph, inputs, 0, "A"), _codes(node, graph, inputs, 3, "B")
    shape = _binary_shape(node, a, b)
    for scale, what in ((1, "A"), (4, "B"), (6, "C")):
        _quantization(node, graph, inputs, scale, scale + 1, a[1], what)
    (sa, za), (sb, zb), (sc, zc) = ((_per_tensor(node, graph, i, float), _per_tensor(node, graph, i + 1, int, 0))
                                    for i in (1, 4, 6))
    kernel, dtype = BINARY[node.op], a[1]
    if _all_parameters(node, graph, (1, 2, 4, 5, 6, 7)):  # the usual case: everything but the codes checked once
        plan = PLANS[node.op](tuple(a[0]), dtype, tuple(b[0]), b[1], sa([]), za([]), sb([]), zb([]), sc([]),
                              dtype.type(zc([])))

        def run_plan(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
            plan(ins[0], ins[3], outs[0])

        return Kernel(run_plan, [(shape, dtype)], math.prod(shape), "int8", kernel.__name__,
                      entry=plan.entry().reading(0, 3))

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernel(ins[0], sa(ins), za(ins), ins[3], sb(ins), zb(ins), sc(ins), dtype.type(zc(ins)), out=outs[0])

    return Kernel(run, [(shape, dtype)], math.prod(shape), "int8", kernel.__name__)


def _sigmoid(node: Node) -> Callable[[np.ndarray], np.ndarray]:
    return lambda v: (1.0 / (1.0 + np.exp(-v.astype(np.float64)))).astype(np.float32)


def _leaky_relu(node: Node) -> Callable[[np.ndarray], np.ndarray]:
    alpha = np.float32(node.attrs.get("alpha", 0.01))
    return lambda v: np.where(v >= 0, v, alpha * v)


LOOKUP = {"com.microsoft.QLinearSigmoid": _sigmoid, "com.microsoft.QLinearLeakyRelu": _leaky_relu}


def _table(fn: Callable[[np.ndarray], np.ndarray], x_dtype: np.dtype, x_scale: float, x_zero: int, y_scale: float,
           y_zero: int, y_dtype: np.dtype) -> np.ndarray:
    """``Q(fn(DQ(code)))`` for the 256 codes of ``x_dtype``, indexed by the code's byte (``x.view(uint8)``)."""
    real = _dequantize(np.arange(256, dtype=np.uint8).view(x_dtype), x_scale, x_zero, np.empty(256, F32))
    return _quantize(np.ascontiguousarray(fn(real), F32), y_scale, y_zero, y_dtype, np.empty(256, y_dtype))


def _table_of(node: Node, graph: Graph, fn: Callable, x_dtype: np.dtype, x_index: int, y_index: int,
              y_dtype: np.dtype) -> Callable[[list[np.ndarray]], np.ndarray]:
    """A reader of the table of ``fn`` from the codes at ``x_index`` (scale, zero point after them) to the
    quantization at ``y_index``: made once when the scales and zero points are parameters, else per call."""
    readers = [_per_tensor(node, graph, i, convert, 0) for i, convert in
               ((x_index + 1, float), (x_index + 2, int), (y_index, float), (y_index + 1, int))]

    def table(ins: list[np.ndarray]) -> np.ndarray:
        s, z, ys, yz = (read(ins) for read in readers)
        return _table(fn, x_dtype, s, z, ys, yz, y_dtype)

    if _all_parameters(node, graph, (x_index + 1, x_index + 2, y_index, y_index + 1)):
        fixed = table([])
        return lambda ins: fixed
    return table


@preparer(*LOOKUP)
def prepare_qlinear_lookup(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QLinearSigmoid and QLinearLeakyRelu(X, X_scale, X_zero_point?, Y_scale, Y_zero_point?):
    ``Y = Q(f(DQ(X)))`` with ONNX's DequantizeLinear and QuantizeLinear (float32, half to even) and

        sigmoid     f(v) = 1 / (1 + e^-v), computed in float64 and rounded to float32
        leaky relu  f(v) = v for v >= 0, else float32(alpha v)             (attr alpha, default 0.01)

    An 8-bit input has 256 values: Y is tabulated for each (once when the scales and zero points are parameters,
    else per call) and a call is one gather. ONNX Runtime tabulates its own float32 sigmoid approximation: codes
    within one.
    """
    x = _codes(node, graph, inputs, 0, "X")
    _quantization(node, graph, inputs, 1, 2, x[1], "X")
    _quantization(node, graph, inputs, 3, 4, x[1], "Y")
    table = _table_of(node, graph, LOOKUP[node.op](node), x[1], 0, 3, x[1])

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernels.qlinear_lookup(ins[0], table(ins), out=outs[0])

    return Kernel(run, [(tuple(x[0]), x[1])], math.prod(x[0]), "int8", "qlinear_lookup, a table of 256 codes")


def _softmax_table(x_scale: float, reduce_len: int) -> np.ndarray:
    """ONNX Runtime's float32 ``e[d + 255] = exp((d + shift) * x_scale)`` for code differences ``d = x - max(x)``
    in ``[-255, 0]``, ``shift = max(0, log(FLT_MAX / reduce_len) - 5) / x_scale``: the largest exponent whose
    row sum stays below ``FLT_MAX / e^5`` (the exponent in float64, rounded once to float32, as ONNX Runtime)."""
    headroom = max(0.0, math.log(float(np.float32(np.finfo(F32).max) / np.float32(reduce_len))) - 5.0)
    scale = np.float64(np.float32(x_scale))
    with np.errstate(all="ignore"):  # a zero scale computed at run time: undefined in ONNX Runtime too
        return np.exp((np.arange(-255, 1, dtype=np.float64) + headroom / scale) * scale).astype(F32)


def _softmax_rows(x: np.ndarray, table: np.ndarray, y_scale: float, y_zero: int, out: np.ndarray) -> None:
    """Softmax codes of the rows of 2-D ``x`` into ``out``: a row's exps ``e = table[x - max + 255]``, their sum
    accumulated left to right in float32 (``np.add.accumulate``: ONNX Runtime's order, so the same float sum)."""
    signed = x.astype(np.int16)
    exps = table[signed - signed.max(axis=1, keepdims=True) + 255]
    sums = np.add.accumulate(exps, axis=1)[:, -1:]
    with np.errstate(all="ignore"):  # as in _softmax_table
        y_range = np.floor(np.float32(1.0) / np.float32(y_scale))
        scaled = exps * y_range
        codes = np.rint(scaled / sums) + y_zero
        # e * floor(1 / Y_scale) passes FLT_MAX only in very short rows (D e^5 < floor(1 / Y_scale)), where
        # ONNX Runtime's codes are those of the exact ratio: take it in float64 there
        overflow = np.isinf(scaled)
        if overflow.any():
            codes[overflow] = np.rint((exps / sums.astype(np.float64) * float(y_range))[overflow]) + y_zero
        info = np.iinfo(out.dtype)
        np.copyto(out, np.clip(codes, info.min, info.max), casting="unsafe")


@preparer("com.microsoft.QLinearSoftmax")
def prepare_qlinear_softmax(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QLinearSoftmax(X, X_scale, X_zero_point?, Y_scale, Y_zero_point?), attrs ``axis`` (default
    -1) and ``opset`` (the ONNX Softmax whose axis rule applies: below 13 the input is seen as 2-D ``[N, D]``
    split at ``axis``; from 13 along ``axis`` alone). Over each softmax row of codes ``x``::

        e = float32(exp((x - max(x) + shift) * X_scale))      tabulated for the 256 differences (shift: headroom)
        y = saturate(rint(float32(e * floor(1 / Y_scale)) / sum(e)) + Y_zero_point)       float32, sum in order

    ONNX Runtime's formula and float32 order of operations, so the same codes; X's zero point cancels in
    ``x - max(x)``.
    """
    x = _codes(node, graph, inputs, 0, "X")
    _quantization(node, graph, inputs, 1, 2, x[1], "X")
    _quantization(node, graph, inputs, 3, 4, x[1], "Y")
    shape, rank = tuple(x[0]), len(x[0])
    opset = int(node.attrs.get("opset", 13))
    axis = int(node.attrs.get("axis", -1))
    if not -rank <= axis < rank:
        raise _fail(node, f"axis {axis} is out of range for a {rank}-D input")
    axis %= rank
    reduce_len = math.prod(shape[axis:]) if opset < 13 else shape[axis]
    x_scale, y_scale, y_zero = (_per_tensor(node, graph, i, convert, 0) for i, convert in ((1, float), (3, float),
                                                                                           (4, int)))
    fixed = _softmax_table(x_scale([]), reduce_len) if _constant(node, graph, 1) is not None else None
    last = opset < 13 or axis == rank - 1

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        if outs[0].size == 0:
            return
        table = _softmax_table(x_scale(ins), reduce_len) if fixed is None else fixed
        if last:
            _softmax_rows(ins[0].reshape(-1, reduce_len), table, y_scale(ins), y_zero(ins),
                          outs[0].reshape(-1, reduce_len))
            return
        rows = np.moveaxis(ins[0], axis, -1)
        y = np.empty(rows.shape, outs[0].dtype)
        _softmax_rows(rows.reshape(-1, reduce_len), table, y_scale(ins), y_zero(ins), y.reshape(-1, reduce_len))
        np.copyto(outs[0], np.moveaxis(y, -1, axis))

    return Kernel(run, [(shape, x[1])], 4 * math.prod(shape), "int8", "exp table of 256 differences, NumPy rows")


@preparer("com.microsoft.QLinearConcat")
def prepare_qlinear_concat(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QLinearConcat(Y_scale, Y_zero_point, (X, X_scale, X_zero_point)...) along ``axis``: each
    input requantized to Y's scale and zero point as ONNX's DequantizeLinear -> QuantizeLinear would
    (``saturate(rint(float32(float32(x - zx) * sx) / sy) + zy)``, tabulated over the 256 codes), then
    concatenated. An input already in Y's quantization is copied (its table is the identity).
    """
    y_zero = _codes(node, graph, inputs, 1, "Y_zero_point")
    _quantization(node, graph, inputs, 0, 1, y_zero[1], "Y")
    if len(node.inputs) < 5 or (len(node.inputs) - 2) % 3:
        raise _fail(node, f"expected Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) triples; got "
                          f"{len(node.inputs)} inputs")
    starts = range(2, len(node.inputs), 3)
    specs = [_codes(node, graph, inputs, i, f"X{j}") for j, i in enumerate(starts)]
    for j, (i, spec) in enumerate(zip(starts, specs)):
        _quantization(node, graph, inputs, i + 1, i + 2, spec[1], f"X{j}")
    rank = len(specs[0][0])
    axis = int(node.attrs.get("axis", 1))
    if not -rank <= axis < rank:
        raise _fail(node, f"axis {axis} is out of range for {rank}-D inputs")
    axis %= rank
    rest = [tuple(s[:axis]) + tuple(s[axis + 1:]) for s, _ in specs]
    if any(len(s) != rank for s, _ in specs) or len(set(rest)) != 1:
        raise _fail(node, f"input shapes {[list(s) for s, _ in specs]} differ outside axis {axis}")
    sizes = [s[axis] for s, _ in specs]
    shape = (*specs[0][0][:axis], sum(sizes), *specs[0][0][axis + 1:])
    dtype = y_zero[1]
    tables = [_table_of(node, graph, lambda v: v, spec[1], i, 0, dtype) for i, spec in zip(starts, specs)]
    copies = [spec[1] == dtype and _all_parameters(node, graph, (0, 1, i + 1, i + 2))
              and (_value(node, graph, i + 1), _value(node, graph, i + 2)) == (_value(node, graph, 0),
                                                                               _value(node, graph, 1))
              for i, spec in zip(starts, specs)]
    bounds = np.cumsum([0, *sizes])
    slices = [(slice(None),) * axis + (slice(lo, hi),) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        for i, table, copy, where in zip(starts, tables, copies, slices):
            outs[0][where] = ins[i] if copy else table(ins)[ins[i].view(np.uint8)]

    return Kernel(run, [(shape, dtype)], math.prod(shape), "int8", "requantizing tables, concatenated")


# ----------------------------------------------------------------------------- pooling

def _pool_input(node: Node, graph: Graph, inputs: Inputs) -> tuple[Spec, bool, list]:
    """The input's spec, ``channels_last``, and readers of x_scale, x_zero_point, y_scale, y_zero_point."""
    x = _codes(node, graph, inputs, 0, "X")
    if len(x[0]) < 3:
        raise _fail(node, f"X must have a batch, a channel and at least one spatial axis, got shape {list(x[0])}")
    _quantization(node, graph, inputs, 1, 2, x[1], "X")
    _quantization(node, graph, inputs, 3, 4, x[1], "Y")
    readers = [_per_tensor(node, graph, i, convert, 0) for i, convert in ((1, float), (2, int), (3, float), (4, int))]
    return x, bool(node.attrs.get("channels_last", 0)), readers


def _window_sums(x: np.ndarray, kernel: Shape, window: Window) -> np.ndarray:
    """Sums over the windows of ``[..., *spatial]`` ``x`` (already padded to every window's reach)."""
    view = window_view(x, kernel, window)
    return view.sum(axis=tuple(range(view.ndim - len(kernel), view.ndim)))


def _pool_numpy(node: Node, readers: list, spatial: Shape, kernel: Shape, window: Window, include_pad: bool,
                channels_last: bool, out: Spec) -> Kernel:
    """``kernels.avg_pool2d``'s rule over any number of spatial axes, in NumPy (exact int64 window sums): for
    pools the kernels do not take, or whose scales are computed at run time. The tap counts are made here."""
    nd = len(kernel)
    begin, end = window.pads[:nd], window.pads[nd:]
    reach = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(window.out, window.strides, window.dilations, kernel)]
    tail = [max(r - b - i, e) for r, b, i, e in zip(reach, begin, spatial, end)]  # end pads and ceil_mode overhang
    if include_pad:  # taps inside the padded input count, not those of the overhang
        counted = np.pad(np.ones([b + i + e for b, i, e in zip(begin, spatial, end)], np.int64),
                         [(0, t - e) for t, e in zip(tail, end)])
    else:
        counted = np.pad(np.ones(spatial, np.int64), list(zip(begin, tail)))
    counts = _window_sums(counted, kernel, window)
    if not counts.all():
        raise _fail(node, "a window lies wholly in the padding, where its average is undefined")
    padding = [(0, 0), (0, 0), *zip(begin, tail)]
    info = np.iinfo(out[1])

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x_scale, x_zero, y_scale, y_zero = (read(ins) for read in readers)
        x, y = (np.moveaxis(ins[0], -1, 1), np.moveaxis(outs[0], -1, 1)) if channels_last else (ins[0], outs[0])
        sums = _window_sums(np.pad(x.astype(np.int64) - x_zero, padding), kernel, window)
        with np.errstate(all="ignore"):  # a zero scale computed at run time: undefined in ONNX
            t = np.rint(sums * (x_scale / (y_scale * counts)) + y_zero)
            np.copyto(y, np.clip(t, info.min, info.max), casting="unsafe")

    return Kernel(run, [out], math.prod(out[0]) * math.prod(kernel), "int8", "exact sums in NumPy")


@preparer("com.microsoft.QLinearGlobalAveragePool")
def prepare_qlinear_global_average_pool(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QLinearGlobalAveragePool(X, x_scale, x_zero_point, y_scale, y_zero_point), over all spatial
    axes of ``[N, C, *spatial]`` (``[N, *spatial, C]`` with ``channels_last``)::

        y[n, c] = saturate(rint(sum (x - x_zero_point) * (x_scale / (y_scale * count)) + y_zero_point))

    the sum exact, the rest float64, half to even: ``kernels.global_avg_pool2d`` on the spatial axes seen as one
    (NumPy, the same rule, for scales computed at run time). ONNX Runtime forms the multiplier and product in
    float32: codes within one.
    """
    (shape, dtype), channels_last, readers = _pool_input(node, graph, inputs)
    spatial = tuple(shape[1:-1] if channels_last else shape[2:])
    n, c, ones = shape[0], shape[-1] if channels_last else shape[1], (1,) * len(spatial)
    out = ((n, *ones, c) if channels_last else (n, c, *ones), dtype)
    if not _all_parameters(node, graph, range(1, 5)):
        window = Window(ones, ones, (0,) * 2 * len(spatial), ones)
        return _pool_numpy(node, readers, spatial, spatial, window, False, channels_last, out)
    layout, area = "NHWC" if channels_last else "NCHW", math.prod(spatial)
    x4, out4 = ((n, 1, area, c), (n, 1, 1, c)) if channels_last else ((n, c, 1, area), (n, c, 1, 1))
    x_scale, x_zero, y_scale, y_zero = (read([]) for read in readers)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernels.global_avg_pool2d(ins[0].reshape(x4), x_scale, x_zero, y_scale, y_zero, layout=layout,
                                  out=outs[0].reshape(out4))

    # a compiled entry takes the node's own 4-D arrays: 2-D pools only
    entry = kernels.global_avg_pool2d_plan(tuple(shape), dtype, x_scale, x_zero, y_scale, y_zero,
                                           layout=layout).entry() if len(spatial) == 2 else None
    return Kernel(run, [out], math.prod(shape), "int8", "global_avg_pool2d", entry=entry)


@preparer("com.microsoft.QLinearAveragePool")
def prepare_qlinear_average_pool(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX Runtime's QLinearAveragePool(X, x_scale, x_zero_point?, y_scale, y_zero_point?): ONNX AveragePool of
    the real values (kernel_shape, strides, pads / auto_pad, ceil_mode, count_include_pad), requantized::

        y = saturate(rint(S * (x_scale / (y_scale * count)) + y_zero_point)),   S = sum (x - x_zero_point)

    over the window's taps inside ``x``; ``count`` counts those, or with ``count_include_pad`` the taps inside the
    padded input. S exact, the rest float64, half to even: ``kernels.avg_pool2d`` for 1-D and 2-D pools (1-D as
    2-D of height 1), the same rule in NumPy for more spatial axes or scales computed at run time;
    ``channels_last``: ``[N, *spatial, C]``. Where ONNX Runtime differs (float32 rounding: codes within one;
    ``ceil_mode`` with ``count_include_pad``) is in ``kernels.avg_pool2d``'s docstring.
    """
    (shape, dtype), channels_last, readers = _pool_input(node, graph, inputs)
    spatial = tuple(shape[1:-1] if channels_last else shape[2:])
    kernel = kernel_shape(node, len(spatial))
    ceil_mode, include_pad = bool(node.attrs.get("ceil_mode", 0)), bool(node.attrs.get("count_include_pad", 0))
    window = window_geometry(node, spatial, kernel, ceil_mode=ceil_mode)
    n, c = shape[0], shape[-1] if channels_last else shape[1]
    out = (((n, *window.out, c) if channels_last else (n, c, *window.out)), dtype)
    if len(spatial) > 2 or not _all_parameters(node, graph, range(1, 5)):
        return _pool_numpy(node, readers, spatial, kernel, window, include_pad, channels_last, out)
    planar = len(spatial) == 1  # [N, C, L] as [N, C, 1, L]; [N, L, C] as [N, 1, L, C]
    at = 1 if channels_last else 2
    x4, out4 = ((*shape[:at], 1, *shape[at:]), (*out[0][:at], 1, *out[0][at:])) if planar else (shape, out[0])
    options = {"strides": (1, *window.strides) if planar else window.strides,
               "pads": (0, window.pads[0], 0, window.pads[1]) if planar else window.pads,
               "dilations": (1, *window.dilations) if planar else window.dilations, "ceil_mode": ceil_mode,
               "count_include_pad": include_pad, "layout": "NHWC" if channels_last else "NCHW"}
    kernel2 = (1, *kernel) if planar else kernel
    x_scale, x_zero, y_scale, y_zero = (read([]) for read in readers)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernels.avg_pool2d(ins[0].reshape(x4), kernel2, x_scale, x_zero, y_scale, y_zero, out=outs[0].reshape(out4),
                           **options)

    return Kernel(run, [out], math.prod(out[0]) * math.prod(kernel), "int8", "avg_pool2d")


# ----------------------------------------------------------------------------- DynamicQuantizeLinear

@preparer("DynamicQuantizeLinear")
def prepare_dynamic_quantize_linear(node: Node, graph: Graph, inputs: Inputs) -> Kernel:
    """ONNX DynamicQuantizeLinear: uint8 ``y = saturate(rint(x / y_scale) + y_zero_point)`` with
    ``y_scale = (max(x, 0) - min(x, 0)) / 255`` (1 / 255 for a constant ``x``) and
    ``y_zero_point = rint(clip(-min(x, 0) / y_scale, 0, 255))``, in float32: ``kernels.dynamic_quantize_linear``
    (through ``lowbit.quantization.qdq``)."""
    x = _spec(node, graph, inputs, 0)
    if x is None or x[1] != F32:
        raise _fail(node, f"input x must be float32, got {'none' if x is None else x[1]}")
    outs_spec = [(tuple(x[0]), np.dtype(np.uint8)), ((), F32), ((), np.dtype(np.uint8))]

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        _, scale, zero = dynamic_quantize_linear(ins[0], outs[0])
        for out, value in zip(outs[1:], (scale, zero)):
            out[...] = value

    entry = kernels.quantize.dynamic_quantize_linear_entry(x[0]) if len(node.outputs) == 3 else None
    return Kernel(run, outs_spec[:len(node.outputs)], 3 * math.prod(x[0]), "int8", "kernels.dynamic_quantize_linear",
                  entry=entry)
