"""Reductions of a float32 row in 16 independent lanes, then over the lanes (sum, sum of squares, max, min, and the
sum of exponentials that softmax takes, written back as it goes).

A plain ``total += v[j]`` or ``top = max(top, v[j])`` loop stays scalar: LLVM may not reorder float operations
unless told to (``fastmath``, which this package does not use, see ``kernels._jit``), and sixteen scalar
accumulators written in Python stay sixteen scalar chains. Here the lanes are ``<16 x float>`` registers in
LLVM IR, four of them so that four additions are in flight: vector ``q`` of the row (``v[16 q .. 16 q + 15]``) goes
to accumulator ``q % 4`` while whole groups of four remain, the last vectors to accumulators 0, 1, 2 in turn; then
``(a0 + a1) + (a2 + a3)``, then the 16 lanes pairwise (lane ``l`` with ``l + 8``, then ``l + 4``, ``l + 2``,
``l + 1``), onto 0 (``-inf`` for max, ``inf`` for min), then the tail past the last multiple of 16 in order. The order
of every operation is fixed by this code, not by the vector width of the CPU, so results are the same on every CPU (a
CPU without 16-lane registers splits the vectors). A short row pays a few combining steps, not sixteen in a chain.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels._jit import kernel
from kernels.gemm.llvm_ir import F32, I32, I64, array_ptr, emit_loop, is_array, load_vector, splat
from kernels.math_ir import emit_exp, exp32

LANES = 16
ACCUMULATORS = 4  # vectors in flight (combined as a pair of pairs below)
_VECTOR = ir.VectorType(F32, LANES)


_PICK = {"max": ">", "min": "<"}  # the extremes: x replaces acc when ``x OP acc`` (never for a NaN x)
_START = {"max": float("-inf"), "min": float("inf")}


def _combine(builder: ir.IRBuilder, kind: str, acc: ir.Value, x: ir.Value, centre: ir.Value) -> ir.Value:
    """One step of reduction ``kind`` (vectors or scalars alike): ``acc + x`` (sum, exp), ``acc + (x - centre)^2``,
    or ``x if x > acc else acc`` (max; ``<`` for min; a NaN ``x`` is skipped)."""
    if kind in ("sum", "exp"):
        return builder.fadd(acc, x)
    if kind == "squares":
        d = builder.fsub(x, centre)
        return builder.fadd(acc, builder.fmul(d, d))
    return _merge(builder, kind, acc, x)


def _merge(builder: ir.IRBuilder, kind: str, a: ir.Value, b: ir.Value) -> ir.Value:
    """Two partial reductions combined: ``a + b``, or for max ``b if b > a else a`` (min alike)."""
    if kind not in _PICK:
        return builder.fadd(a, b)
    return builder.select(builder.fcmp_ordered(_PICK[kind], b, a), b, a)


def _lanes_intrinsic(kind: str):
    """``reduce(v, full, centre)``: reduction ``kind`` of ``v[:full]`` (``full`` a multiple of 16) in the order of
    the module docstring; ``v`` 1-D C-contiguous float32. Kind ``"exp"`` first replaces each ``v[j]`` by
    ``e^(v[j] - centre)`` (:mod:`kernels.math_ir`; for ``v[j] <= centre``), then sums the new values."""

    @intrinsic
    def reduce(typingctx, v, full, centre):
        if not (is_array(v, types.float32, 1) and isinstance(full, types.Integer) and centre == types.float32):
            return None

        def codegen(context, builder, signature, args):
            data = array_ptr(context, builder, signature.args[0], args[0], F32)
            vectors = builder.sdiv(context.cast(builder, args[1], signature.args[1], types.int64),
                                   ir.Constant(I64, LANES))
            spread = splat(builder, args[2], _VECTOR)
            start = ir.Constant(F32, _START.get(kind, 0.0))

            def step(acc, q):
                """``acc`` with vector ``q`` of the row taken in (for ``"exp"``, transformed and stored first)."""
                at = builder.mul(q, ir.Constant(I64, LANES))
                x = load_vector(builder, data, at, _VECTOR)
                if kind == "exp":
                    x = emit_exp(builder, builder.fsub(x, spread), nonpositive=True)
                    builder.store(x, builder.bitcast(builder.gep(data, [at]), _VECTOR.as_pointer()), align=4)
                return _combine(builder, kind, acc, x, spread)

            def group(g, accs):  # vectors 4 g .. 4 g + 3
                first = builder.mul(g, ir.Constant(I64, ACCUMULATORS))
                return [step(acc, builder.add(first, ir.Constant(I64, i))) for i, acc in enumerate(accs)]

            groups = builder.sdiv(vectors, ir.Constant(I64, ACCUMULATORS))
            accs = emit_loop(builder, groups, _VECTOR, ACCUMULATORS, group, [splat(builder, start, _VECTOR)] * ACCUMULATORS)
            done = builder.mul(groups, ir.Constant(I64, ACCUMULATORS))
            for i in range(ACCUMULATORS - 1):  # the last vectors, at most three, each read only if in the row
                q = builder.add(done, ir.Constant(I64, i))
                before = builder.block
                with builder.if_then(builder.icmp_signed("<", q, vectors)):
                    taken, inside = step(accs[i], q), builder.block
                merged = builder.phi(_VECTOR)
                merged.add_incoming(accs[i], before)
                merged.add_incoming(taken, inside)
                accs[i] = merged
            acc = _merge(builder, kind, _merge(builder, kind, accs[0], accs[1]),
                         _merge(builder, kind, accs[2], accs[3]))
            for shift in (8, 4, 2, 1):
                moved = builder.shuffle_vector(acc, ir.Constant(_VECTOR, None),
                                               ir.Constant(ir.VectorType(I32, LANES),
                                                           [(lane + shift) % LANES for lane in range(LANES)]))
                acc = _merge(builder, kind, acc, moved)
            return _merge(builder, kind, start, builder.extract_element(acc, ir.Constant(I32, 0)))

        return types.float32(v, full, centre), codegen

    return reduce


_sum_lanes, _squares_lanes, _max_lanes, _min_lanes, _exp_lanes = (
    _lanes_intrinsic(kind) for kind in ("sum", "squares", "max", "min", "exp"))


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


@kernel(inline="always")
def lane_min(v):
    """``min(v)`` of a 1-D C-contiguous float32 array (``inf`` if empty); a NaN is skipped, as by :func:`lane_max`."""
    full = v.size - v.size % LANES
    low = _min_lanes(v, full, np.float32(0.0))
    for j in range(full, v.size):
        low = v[j] if v[j] < low else low
    return low


@kernel(inline="always")
def lane_exp_sum(v, centre):
    """``v[j] = e^(v[j] - centre)`` in place (:func:`kernels.math_ir.exp32`), and the sum of the new ``v`` in the
    module's order: softmax's numerator and denominator in one pass. For ``v[j] <= centre`` (or NaN): the vectors
    leave out exp's steps for positive arguments (``kernels.math_ir.emit_exp``)."""
    full = v.size - v.size % LANES
    total = _exp_lanes(v, full, np.float32(centre))
    for j in range(full, v.size):
        v[j] = exp32(v[j] - centre)
        total += v[j]
    return total
