"""Reductions of a float32 row in 16 independent lanes, then over the lanes.

A plain ``total += v[j]`` or ``top = max(top, v[j])`` loop stays scalar: LLVM may not reorder float operations
unless told to (``fastmath``, which this package does not use, see ``kernels._jit``), and sixteen scalar
accumulators written in Python stay sixteen scalar chains. Here the lanes are one ``<16 x float>`` register in
LLVM IR: lane ``l`` takes ``v[l], v[l + 16], ...`` in turn, then the lanes are combined in order from lane 0, then
the tail past the last multiple of 16 in order. The order of every operation is fixed by this code, not by the
vector width of the CPU, so results are the same on every CPU (a CPU without 16-lane registers splits the vector).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels._jit import kernel
from kernels.gemm.llvm_ir import F32, I32, I64, array_ptr, emit_loop, is_array, load_vector, splat

LANES = 16
_VECTOR = ir.VectorType(F32, LANES)


def _combine(builder: ir.IRBuilder, kind: str, acc: ir.Value, x: ir.Value, centre: ir.Value) -> ir.Value:
    """One step of reduction ``kind`` (vectors or scalars alike): ``acc + x``, ``acc + (x - centre)^2`` or
    ``x if x > acc else acc`` (a NaN ``x`` is skipped)."""
    if kind == "sum":
        return builder.fadd(acc, x)
    if kind == "squares":
        d = builder.fsub(x, centre)
        return builder.fadd(acc, builder.fmul(d, d))
    return builder.select(builder.fcmp_ordered(">", x, acc), x, acc)


def _lanes_intrinsic(kind: str):
    """``reduce(v, full, centre)``: reduction ``kind`` of ``v[:full]`` (``full`` a multiple of 16) in 16 lanes, the
    lanes combined in order onto 0 (``-inf`` for ``max``); ``v`` 1-D C-contiguous float32."""

    @intrinsic
    def reduce(typingctx, v, full, centre):
        if not (is_array(v, types.float32, 1) and isinstance(full, types.Integer) and centre == types.float32):
            return None

        def codegen(context, builder, signature, args):
            data = array_ptr(context, builder, signature.args[0], args[0], F32)
            count = builder.sdiv(context.cast(builder, args[1], signature.args[1], types.int64), ir.Constant(I64, LANES))
            centre = args[2]
            start = ir.Constant(F32, float("-inf") if kind == "max" else 0.0)
            spread = splat(builder, centre, _VECTOR)

            def block(q, accs):
                x = load_vector(builder, data, builder.mul(q, ir.Constant(I64, LANES)), _VECTOR)
                return [_combine(builder, kind, accs[0], x, spread)]

            acc, = emit_loop(builder, count, _VECTOR, 1, block, [splat(builder, start, _VECTOR)])
            total = start
            for lane in range(LANES):
                element = builder.extract_element(acc, ir.Constant(I32, lane))
                total = builder.fadd(total, element) if kind != "max" else _combine(builder, kind, total, element,
                                                                                    centre)
            return total

        return types.float32(v, full, centre), codegen

    return reduce


_sum_lanes, _squares_lanes, _max_lanes = (_lanes_intrinsic(kind) for kind in ("sum", "squares", "max"))


@kernel(inline="always")
def lane_sum(v):
    """``sum(v)`` of a 1-D C-contiguous float32 array, in float32, in the module's order."""
    full = v.size - v.size % LANES
    total = _sum_lanes(v, full, np.float32(0.0))
    for j in range(full, v.size):
        total += v[j]
    return total


@kernel(inline="always")
def lane_squares(v, centre):
    """``sum((v - centre)^2)`` of a 1-D C-contiguous float32 array, in float32, in the module's order."""
    full = v.size - v.size % LANES
    total = _squares_lanes(v, full, np.float32(centre))
    for j in range(full, v.size):
        c = v[j] - centre
        total += c * c
    return total


@kernel(inline="always")
def lane_max(v):
    """``max(v)`` of a 1-D C-contiguous float32 array (``-inf`` if empty); a NaN is skipped (the callers' results
    turn NaN by other means)."""
    full = v.size - v.size % LANES
    top = _max_lanes(v, full, np.float32(0.0))
    for j in range(full, v.size):
        top = v[j] if v[j] > top else top
    return top
