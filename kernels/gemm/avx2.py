"""AVX2 int8 micro-kernel (no VNNI), written as LLVM IR inside a Numba intrinsic.

Without VNNI the exact u8 x s8 product goes through 16-bit lanes: weights are
sign-extended and activations zero-extended to int16, and ``vpmaddwd`` multiplies
16 pairs and adds neighbours into 8 int32 lanes. For one k group of the panel
layout (``kernels.pack.panels``: per channel 4 consecutive k values) and 4
channels ``c..c+3`` at a time::

    lane 2 i     += a[r, 4q] w[c+i, 4q] + a[r, 4q+1] w[c+i, 4q+1]
    lane 2 i + 1 += a[r, 4q+2] w[c+i, 4q+2] + a[r, 4q+3] w[c+i, 4q+3]

and the two lanes of each channel are added once, after the K loop. A pair sum is
at most 2 * 255 * 128 in magnitude, so int32 lanes are as exact as VNNI's. The
register tile is ``rows`` x 16 channels (8 accumulators of 8 lanes, within
AVX2's 16 registers); a call walks the 64-channel panel in four such blocks.
"""

from __future__ import annotations

from llvmlite import ir

from kernels.gemm.llvm_ir import I8, I16, I32, I64, clamped_rows, declare, emit_loop, load_vector, tile_intrinsic

V8I32 = ir.VectorType(I32, 8)
V16I16 = ir.VectorType(I16, 16)
V16I8 = ir.VectorType(I8, 16)
V4I8 = ir.VectorType(I8, 4)
BLOCK = 16  # channels per register block
QUADS = BLOCK // 4  # 8-lane accumulators per row and block


def make_tile(rows: int):
    """A ``rows x 64`` AVX2 tile intrinsic: ``tile`` of ``kernels.gemm.microkernels``.

    ``tile(a, a_off, lda, m, b, b_off, kq, acc)``; rows past ``m`` repeat row
    ``m - 1`` and are stored too, callers use only the first ``m``.
    """

    def emit(builder, a_ptr, a_off, lda, m, b_ptr, b_off, kq, c_ptr):
        madd = declare(builder, "llvm.x86.avx2.pmadd.wd", ir.FunctionType(V8I32, [V16I16, V16I16]))
        row_ptrs = clamped_rows(builder, a_ptr, a_off, lda, m, rows)
        b_base = builder.gep(b_ptr, [b_off])
        repeat4 = ir.Constant(ir.VectorType(I32, 16), [0, 1, 2, 3] * 4)
        evens, odds = (ir.Constant(ir.VectorType(I32, 4), list(range(start, 8, 2))) for start in (0, 1))

        for block in range(64 // BLOCK):

            def k_group(q, accs):
                group = builder.gep(b_base, [builder.add(builder.mul(q, ir.Constant(I64, 256)),
                                                         ir.Constant(I64, 4 * BLOCK * block))])
                w16 = [builder.sext(load_vector(builder, group, 16 * v, V16I8), V16I16) for v in range(QUADS)]
                a_step = builder.mul(q, ir.Constant(I64, 4))
                updated = []
                for r in range(rows):
                    word = builder.load(builder.bitcast(builder.gep(row_ptrs[r], [a_step]), V4I8.as_pointer()),
                                        align=1)
                    pattern = builder.zext(builder.shuffle_vector(word, ir.Constant(V4I8, ir.Undefined), repeat4),
                                           V16I16)
                    updated += [builder.add(accs[r * QUADS + v], builder.call(madd, [pattern, w16[v]]))
                                for v in range(QUADS)]
                return updated

            results = emit_loop(builder, kq, V8I32, rows * QUADS, k_group)
            for r in range(rows):
                for v in range(QUADS):
                    pairs = results[r * QUADS + v]
                    sums = builder.add(builder.shuffle_vector(pairs, pairs, evens),
                                       builder.shuffle_vector(pairs, pairs, odds))
                    dst = builder.gep(c_ptr, [ir.Constant(I64, r * 64 + BLOCK * block + 4 * v)])
                    builder.store(sums, builder.bitcast(dst, sums.type.as_pointer()), align=4)

    return tile_intrinsic(emit)
