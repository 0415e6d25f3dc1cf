"""XNOR-popcount tile with AVX512-VPOPCNTDQ: one ``vpopcntq`` per vector of 8 xored words.

Where the CPU counts the bits of 64-bit lanes in one instruction (Ice Lake and later, Zen 4 and later),
the carry-save trees of :mod:`kernels.gemm.popcount` are no longer worth their 3.6 instructions per vector:
each (row, column) pair keeps a ``<8 x i64>`` count and adds ``vpopcntq(a ^ b)`` to it, three instructions
per vector (the xor folds a load). The lanes hold 64-bit counts, so any K fits in one call.

``tile(a, a_off, lda, m, b, b_off, ldb, n, words, acc)`` sets, for ``r < rows`` and ``c < cols``::

    acc[r, c] = sum_{w < words} popcount(a[a_off + r lda + w] ^ b[b_off + c ldb + w])

rows past ``m`` repeating row ``m - 1`` and columns past ``n`` column ``n - 1`` (callers ignore them). The
``words % 8`` words past the last whole vector are read by masked loads (lanes off the mask read as zero in
both operands, so they count nothing). ``llvm.ctpop.v8i64`` is generic LLVM: it becomes ``vpopcntq`` only
where the target has the feature, which ``kernels.dispatch`` makes sure of before compiling this tile.
"""

from __future__ import annotations

from llvmlite import ir

from kernels.gemm.llvm_ir import I8, I32, I64, clamped_rows, declare, emit_loop, prefetch
from kernels.gemm.popcount import V8I64, WORDS_PER_VECTOR, binary_tile_intrinsic, load_words, next_tile, tail_mask


def make_tile(rows: int, cols: int, prefetch_next: str | None = "rows"):
    """A ``rows x cols`` VPOPCNTDQ tile (contract in the module docstring); ``prefetch_next`` as in
    :func:`kernels.gemm.popcount.make_tile`, one cache line per vector."""
    pairs = [(r, c) for r in range(rows) for c in range(cols)]

    def emit(builder, a_ptr, a_off, lda, m, b_ptr, b_off, ldb, n, words, acc_ptr):
        ctpop = declare(builder, "llvm.ctpop.v8i64", ir.FunctionType(V8I64, [V8I64]))
        a_rows = clamped_rows(builder, a_ptr, a_off, lda, m, rows)
        b_cols = clamped_rows(builder, b_ptr, b_off, ldb, n, cols)
        ahead = next_tile(builder, a_rows, lda, b_cols, ldb, prefetch_next)

        def count(counts, offset, mask=None):
            av = [load_words(builder, p, offset, mask) for p in a_rows]
            bv = [load_words(builder, p, offset, mask) for p in b_cols]
            return [builder.add(counts[index], builder.call(ctpop, [builder.xor(av[r], bv[c])]))
                    for index, (r, c) in enumerate(pairs)]

        def vector(q, counts):
            offset = builder.mul(q, ir.Constant(I64, WORDS_PER_VECTOR))
            for p in ahead:
                prefetch(builder, builder.bitcast(builder.gep(p, [offset]), I8.as_pointer()))
            return count(counts, offset)

        whole = builder.lshr(words, ir.Constant(I64, 3))
        counts = emit_loop(builder, whole, V8I64, len(pairs), vector)
        tail = builder.mul(whole, ir.Constant(I64, WORDS_PER_VECTOR))
        counts = count(counts, tail, tail_mask(builder, builder.sub(words, tail)))

        reduce_add = declare(builder, "llvm.vector.reduce.add.v8i64", ir.FunctionType(I64, [V8I64]))
        for index, (r, c) in enumerate(pairs):
            total = builder.trunc(builder.call(reduce_add, [counts[index]]), I32)
            builder.store(total, builder.gep(acc_ptr, [ir.Constant(I64, r * cols + c)]))

    return binary_tile_intrinsic(emit)
