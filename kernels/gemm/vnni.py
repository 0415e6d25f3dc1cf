"""AVX-512 VNNI int8 micro-kernels, written as LLVM IR inside Numba intrinsics.

LLVM's vectoriser never emits ``vpdpbusd`` for a plain int8 dot loop, so the tile
is spelled out: ``rows x 4`` accumulators of 16 int32 lanes stay in registers for
the whole K loop. Each k group loads four 512-bit weight vectors (64 channels x 4
k values, see ``kernels.pack.panels``), broadcasts 4 activation bytes of each row
to all lanes and issues one ``vpdpbusd`` per (row, vector):

    acc[r, 16 j + l] += sum_{u < 4} a[r, 4 q + u] * w[16 j + l, 4 q + u]

(unsigned activation bytes times signed weight bytes, exact, wrapping in int32).
Nothing here is compiled until a kernel that calls it is, and ``kernels.dispatch``
only selects such kernels on CPUs with avx512vnni: compiling this for a CPU
without it aborts the process.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.gemm.llvm_ir import (I1, I8, I32, I64, array_ptr, clamped_rows, declare, emit_loop, is_array,
                                  load_vector, prefetch, splat, tile_intrinsic)

V16I32 = ir.VectorType(I32, 16)
V64I8 = ir.VectorType(I8, 64)
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
VECTORS = 4  # 512-bit vectors per row: one 64-channel panel


@functools.cache
def _byte_operand_type() -> ir.VectorType:
    """The type LLVM declares for vpdpbusd's byte operands: <64 x i8> since LLVM 21, <16 x i32> before."""
    probe = f"declare <16 x i32> @{VPDPBUSD}(<16 x i32>, <64 x i8>, <64 x i8>)"
    try:
        llvm.parse_assembly(probe).verify()
    except RuntimeError:
        return V16I32
    return V64I8


def declare_vpdpbusd(builder: ir.IRBuilder) -> ir.Function:
    """``acc + sum of 4 (u8 x s8) products`` per int32 lane, for 16 lanes."""
    byte = _byte_operand_type()
    return declare(builder, VPDPBUSD, ir.FunctionType(V16I32, [V16I32, byte, byte]))


def _emit_dot(builder, a_ptr, a_off, lda, m, b_ptr, b_off, kq, rows: int, distance: int) -> list[ir.Value]:
    """Emit the K loop of a tile; returns the ``rows * VECTORS`` accumulators, row-major."""
    dot = declare_vpdpbusd(builder)
    byte = dot.function_type.args[1]
    row_ptrs = clamped_rows(builder, a_ptr, a_off, lda, m, rows)
    b_base = builder.gep(b_ptr, [b_off])

    def k_group(q, accs):
        group = builder.gep(b_base, [builder.mul(q, ir.Constant(I64, 64 * VECTORS))])
        w_vecs = [builder.bitcast(load_vector(builder, group, 64 * j, V64I8), byte) for j in range(VECTORS)]
        if distance:
            for line in range(VECTORS):
                prefetch(builder, builder.gep(group, [ir.Constant(I64, distance + 64 * line)]))
        a_step = builder.mul(q, ir.Constant(I64, 4))
        updated = []
        for r in range(rows):
            word = builder.load(builder.bitcast(builder.gep(row_ptrs[r], [a_step]), I32.as_pointer()), align=1)
            a_vec = builder.bitcast(splat(builder, word, V16I32), byte)
            updated += [builder.call(dot, [accs[r * VECTORS + j], a_vec, w_vecs[j]]) for j in range(VECTORS)]
        return updated

    return emit_loop(builder, kq, V16I32, rows * VECTORS, k_group)


def make_tile(rows: int, prefetch_distance: int = 0):
    """A ``rows x 64`` VNNI tile intrinsic: ``tile`` of ``kernels.gemm.microkernels``.

    ``tile(a, a_off, lda, m, b, b_off, kq, acc)``. Rows ``m..rows-1`` repeat row
    ``m - 1`` and are stored to ``acc`` too; callers use only the first ``m``. With
    ``prefetch_distance`` > 0 each k group also prefetches the weights that many
    bytes ahead into L1: they stream from L2 (GEMM: a 64 x K panel is larger than
    L1) or from L3 / DRAM (GEMV).
    """

    def emit(builder, a_ptr, a_off, lda, m, b_ptr, b_off, kq, c_ptr):
        results = _emit_dot(builder, a_ptr, a_off, lda, m, b_ptr, b_off, kq, rows, prefetch_distance)
        for index, result in enumerate(results):  # row r, vector j at acc[r, 16 j]
            dst = builder.gep(c_ptr, [ir.Constant(I64, 16 * index)])
            builder.store(result, builder.bitcast(dst, V16I32.as_pointer()), align=4)

    return tile_intrinsic(emit)


def make_tile_store(rows: int, prefetch_distance: int = 0):
    """A tile intrinsic that finishes int32 output itself: ``tile_store`` of ``kernels.gemm.microkernels``.

    ``tile_store(a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo)``
    adds ``col_term[c0 + c]`` (int32, wrapping) to each sum and writes row ``r < m``,
    column ``c < cols`` to ``out[o_off + r * ldo + c]`` with masked stores, straight
    from the registers: no scratch tile, no second pass.
    """

    @intrinsic
    def tile_store(typingctx, a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo):
        if not (is_array(a, types.uint8, 1) and is_array(b, types.int8, 1)
                and is_array(col_term, types.int32, 1) and is_array(out, types.int32, 1)):
            return None
        sig = types.void(a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo)

        def codegen(context, builder, signature, args):
            a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo = args
            tys = signature.args
            results = _emit_dot(builder, array_ptr(context, builder, tys[0], a, I8), a_off, lda, m,
                                array_ptr(context, builder, tys[4], b, I8), b_off, kq, rows, prefetch_distance)
            ct_ptr = builder.gep(array_ptr(context, builder, tys[7], col_term, I32), [c0])
            out_ptr = array_ptr(context, builder, tys[10], out, I32)
            mask_ty = ir.VectorType(I1, 16)
            store = declare(builder, "llvm.masked.store.v16i32.p0",
                            ir.FunctionType(ir.VoidType(), [V16I32, V16I32.as_pointer(), I32, mask_ty]))
            lanes = ir.Constant(V16I32, list(range(16)))
            col_terms = [load_vector(builder, ct_ptr, 16 * j, V16I32) for j in range(VECTORS)]
            for r in range(rows):
                # rows past m store nothing: their lane limit is 0
                limit = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), builder.trunc(cols, I32),
                                       ir.Constant(I32, 0))
                limit = splat(builder, limit, V16I32)
                row = builder.gep(out_ptr, [builder.add(o_off, builder.mul(ir.Constant(I64, r), ldo))])
                for j in range(VECTORS):
                    mask = builder.icmp_signed("<", builder.add(lanes, ir.Constant(V16I32, [16 * j] * 16)), limit)
                    value = builder.add(results[r * VECTORS + j], col_terms[j])
                    dst = builder.bitcast(builder.gep(row, [ir.Constant(I64, 16 * j)]), V16I32.as_pointer())
                    builder.call(store, [value, dst, ir.Constant(I32, 4), mask])
            return context.get_dummy_value()

        return sig, codegen

    return tile_store
