"""Register-only AVX-512 VNNI throughput: the ceiling an int8 GEMM core can reach.

A loop of ``vpdpbusd`` on 16 independent accumulators, with no loads or stores:
16 chains hide the instruction's latency on every current core, so the loop runs
at the port throughput. One ``vpdpbusd`` on 512 bits is 64 multiply-adds, counted
as 128 operations, the unit GEMM GOPS figures use.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bench.timing import loop_rate
from kernels import cpu
from kernels.gemm.llvm_ir import I32, emit_loop, splat
from kernels.gemm.vnni import V16I32, declare_vpdpbusd

ACCUMULATORS = 16
OPS_PER_VPDPBUSD = 2 * 64
OPS_PER_ITERATION = ACCUMULATORS * OPS_PER_VPDPBUSD


def first_lane_of_sum(builder: ir.IRBuilder, vectors: list[ir.Value]) -> ir.Value:
    """Lane 0 of the sum of ``vectors``: every accumulator chain feeds the result, so none is dead code."""
    total = vectors[0]
    for vector in vectors[1:]:
        total = builder.add(total, vector)
    return builder.extract_element(total, ir.Constant(I32, 0))


@intrinsic
def _vpdpbusd_loop(typingctx, iterations):
    """``iterations`` rounds of 16 independent ``vpdpbusd``; returns a lane of their sum."""
    if iterations != types.int64:
        return None
    sig = types.int32(types.int64)

    def codegen(context, builder, signature, args):
        (count,) = args
        dot = declare_vpdpbusd(builder)
        byte = dot.function_type.args[1]
        # Operands come from the argument, so LLVM cannot fold the products away.
        seed = builder.trunc(count, I32)
        a_bytes = builder.bitcast(splat(builder, seed, V16I32), byte)
        b_bytes = builder.bitcast(splat(builder, builder.add(seed, ir.Constant(I32, 0x01010101)), V16I32), byte)
        results = emit_loop(builder, count, V16I32, ACCUMULATORS,
                            lambda i, accs: [builder.call(dot, [acc, a_bytes, b_bytes]) for acc in accs])
        return first_lane_of_sum(builder, results)

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _spin(iterations: int) -> int:
    return _vpdpbusd_loop(iterations)


def vnni_peak_gops(seconds: float = 0.3) -> float | None:
    """Single-thread ``vpdpbusd`` throughput in giga-ops/s, or None without AVX-512 VNNI.

    Compiling the loop for a CPU without VNNI aborts the process, so it is only
    compiled when :func:`kernels.cpu.active_level` allows it. The best of three
    runs of ``seconds / 3`` each is reported, since a shared machine only ever
    slows a run down.
    """
    if not cpu.allows(cpu.AVX512_VNNI, cpu.active_level()):
        return None
    return loop_rate(_spin, OPS_PER_ITERATION, seconds)
