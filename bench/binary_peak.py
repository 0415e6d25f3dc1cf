"""Register-bound XNOR-popcount throughput: the ceiling a binary GEMM core can reach here.

The loop is the Harley-Seal block of ``kernels.gemm.popcount`` for a 1 x 4 tile
(4 independent pairs, 8 vectors of 512 bits each per block) on operands that stay
in L1: 5 KB, re-read every block from one of two alternating halves so that
nothing can be hoisted out of the loop. Loads have their own ports, so this is
the vector-ALU bound of the method: xor, carry-save adders (``vpternlogq``) and
one byte-table popcount per 8 vectors, without the per-output reduction a GEMM
adds. One bit of one pair counts as 2 operations (xor + popcount), the unit
binary GEMM GOPS use. Without AVX-512 (or under ``LOWBIT_ISA`` below it) there is
no peak to measure.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bench.peak import first_lane_of_sum
from bench.timing import loop_rate
from kernels import cpu
from kernels.gemm.llvm_ir import I64, array_ptr, emit_loop, is_array
from kernels.gemm.popcount import BLOCK, V8I64, WORDS_PER_VECTOR, emit_block

COLS = 4
HALF = BLOCK * WORDS_PER_VECTOR  # words of one block
OPS_PER_BLOCK = 2 * COLS * HALF * 64


@intrinsic
def _popcount_loop(typingctx, a, b, iterations):
    """``iterations`` Harley-Seal blocks of a 1 x 4 tile over ``a [2 * HALF]``, ``b [COLS * 2 * HALF]``."""
    if not (is_array(a, types.uint64, 1) and is_array(b, types.uint64, 1) and iterations == types.int64):
        return None
    sig = types.int64(a, b, iterations)

    def codegen(context, builder, signature, args):
        a, b, count = args
        a_ptr = array_ptr(context, builder, signature.args[0], a, I64)
        b_ptr = array_ptr(context, builder, signature.args[1], b, I64)
        cols = [builder.gep(b_ptr, [ir.Constant(I64, 2 * HALF * c)]) for c in range(COLS)]

        def block(q, state):
            base = builder.mul(builder.and_(q, ir.Constant(I64, 1)), ir.Constant(I64, HALF))
            return emit_block(builder, [a_ptr], cols, base, state)

        return first_lane_of_sum(builder, emit_loop(builder, count, V8I64, 4 * COLS, block))

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _spin(a, b, iterations):
    return _popcount_loop(a, b, iterations)


def popcount_peak_gops(seconds: float = 0.3) -> float | None:
    """Single-thread binary giga-ops/s of the register-bound loop, or None below AVX-512 VNNI.

    Compiled only when :func:`kernels.cpu.active_level` allows the AVX-512 kernels
    (the level ``kernels.gemm.binary`` uses for them). Best of three runs.
    """
    if not cpu.allows(cpu.AVX512_VNNI, cpu.active_level()):
        return None
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**64, size=2 * HALF, dtype=np.uint64)
    b = rng.integers(0, 2**64, size=COLS * 2 * HALF, dtype=np.uint64)

    return loop_rate(lambda iterations: _spin(a, b, iterations), OPS_PER_BLOCK, seconds)


if __name__ == "__main__":
    print(f"XNOR-popcount peak: {popcount_peak_gops():.0f} binary GOPS per thread")
