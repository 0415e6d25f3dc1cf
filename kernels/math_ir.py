"""Float32 ``e^x`` and ``erf x`` as LLVM IR, for one value or a vector of lanes: the same instructions either way.

Exp: ``x = n ln2 + r`` with ``n = rint(x log2 e)`` and ``ln2`` split in two (Cody and Waite: ``n ln2_hi`` is exact),
``e^r`` by Taylor's polynomial of degree 7 (truncation below 2e-9) in Horner's form, every product-and-sum one
fused multiply-add (one rounding: the same result on every CPU, fewer instructions where the CPU has FMA), times
``2^n`` built from its bits. Within 1.5 ulp for ``x`` in ``[-87.3, 88.72]``; 0 below, inf above, NaN kept.

Erf: ``x P(x^2) / Q(x^2)`` with ``kernels.activations``' rational (:data:`~kernels.activations.ERF_P`, within
1.9e-9 of erf on ``[0, 3.92]``), ``x`` clamped to ``[-3.92, 3.92]`` (+-1 past it), in float32 with fused
multiply-adds and one division: within 4e-7 of erf (measured 2.4e-7; tested).

:func:`exp32` is the scalar form for compiled loops; :func:`emit_exp` the emitter that ``kernels.lanes`` runs on
``<16 x float>`` vectors (softmax), so the two agree bit for bit; :func:`emit_erf` serves
``kernels.activations.gelu``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.gemm.llvm_ir import F32, I32, declare

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln2 = LN2_HI + LN2_LO; n LN2_HI is exact for |n| < 2^9
ROUND = 1.5 * 2.0**23  # t + ROUND holds rint(t) in its low mantissa bits for |t| < 2^22
ROUND_BITS = 0x4B400000  # the bits of ROUND as a float32
LOW, HIGH = -87.3, 88.72  # e^x is 0 below LOW (no subnormals), inf above HIGH
TAYLOR = [1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0]  # e^r, highest power first


def _like(ty: ir.Type, value, elem: ir.Type = F32) -> ir.Constant:
    """``value`` as a constant of ``ty``'s shape: a scalar of ``elem``, or that scalar in every lane."""
    if elem is F32:
        value = float(np.float32(value))
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ir.VectorType(elem, ty.count), [value] * ty.count)
    return ir.Constant(elem, value)


def fused_multiply_add(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """``a b + c`` rounded once (``llvm.fma``), scalar or vector."""
    ty = a.type
    name = f"llvm.fma.v{ty.count}f32" if isinstance(ty, ir.VectorType) else "llvm.fma.f32"
    return builder.call(declare(builder, name, ir.FunctionType(ty, [ty, ty, ty])), [a, b, c])


def emit_exp(builder: ir.IRBuilder, x: ir.Value, nonpositive: bool = False) -> ir.Value:
    """``e^x`` of a float32 or a vector of float32 (the module docstring's construction). With ``nonpositive``
    the caller knows that ``x <= 0`` (or NaN), and the steps for large ``x`` (a no-op there) are left out: the
    same results in fewer instructions (softmax's ``e^(v - max v)``)."""
    ty = x.type
    ints = ir.VectorType(I32, ty.count) if isinstance(ty, ir.VectorType) else I32
    below = builder.fcmp_ordered("<", x, _like(ty, LOW))
    c = builder.select(below, _like(ty, LOW), x)
    if not nonpositive:
        c = builder.select(builder.fcmp_ordered(">", c, _like(ty, HIGH)), _like(ty, HIGH), c)
    shifted = fused_multiply_add(builder, c, _like(ty, LOG2E), _like(ty, ROUND))
    n = builder.fsub(shifted, _like(ty, ROUND))
    r = fused_multiply_add(builder, n, _like(ty, -LN2_HI), c)
    r = fused_multiply_add(builder, n, _like(ty, -LN2_LO), r)
    p = _like(ty, TAYLOR[0])
    for coefficient in TAYLOR[1:]:
        p = fused_multiply_add(builder, r, p, _like(ty, coefficient))
    bits = builder.sub(builder.bitcast(shifted, ints), _like(ty, ROUND_BITS - 127, I32))
    if not nonpositive:
        top = builder.fcmp_ordered(">", n, _like(ty, 127.5))  # 2^128 is no float32: 2^127 and one more doubling
        bits = builder.sub(bits, builder.zext(top, ints))
        p = builder.fmul(p, builder.select(top, _like(ty, 2.0), _like(ty, 1.0)))
    y = builder.fmul(p, builder.bitcast(builder.shl(bits, _like(ty, 23, I32)), ty))
    if not nonpositive:
        y = builder.select(builder.fcmp_ordered(">", x, _like(ty, HIGH)), _like(ty, np.inf), y)
    return builder.select(below, _like(ty, 0.0), y)


def emit_erf(builder: ir.IRBuilder, x: ir.Value, p: tuple[float, ...], q: tuple[float, ...],
             clamp: float) -> ir.Value:
    """``erf x`` of a float32 or a vector of float32: ``c P(c^2) / Q(c^2)``, ``c = clamp(x, -clamp, clamp)``
    (``p``, ``q`` ascending coefficients), exactly ``+-1`` from the clamp on (so ``1 + erf x`` is 0 there, as in
    float32 arithmetic); NaN kept."""
    ty = x.type
    c = builder.select(builder.fcmp_ordered("<", x, _like(ty, -clamp)), _like(ty, -clamp), x)
    c = builder.select(builder.fcmp_ordered(">", c, _like(ty, clamp)), _like(ty, clamp), c)
    u = builder.fmul(c, c)

    def horner(coefficients):
        value = _like(ty, coefficients[-1])
        for coefficient in coefficients[-2::-1]:
            value = fused_multiply_add(builder, u, value, _like(ty, coefficient))
        return value

    ratio = builder.fdiv(builder.fmul(c, horner(p)), horner(q))
    ratio = builder.select(builder.fcmp_ordered(">=", x, _like(ty, clamp)), _like(ty, 1.0), ratio)
    return builder.select(builder.fcmp_ordered("<=", x, _like(ty, -clamp)), _like(ty, -1.0), ratio)


@intrinsic
def exp32(typingctx, x):
    """``e^x`` of a float32 in compiled code (module docstring: within 1.5 ulp)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return emit_exp(builder, args[0])

    return types.float32(x), codegen
