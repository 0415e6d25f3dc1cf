"""Binary micro-kernels written as LLVM IR inside Numba intrinsics.

``popcount64`` is generic LLVM (``llvm.ctpop.i64``): it compiles on every CPU and
serves the portable kernels. Everything else here is AVX-512 code (512-bit vectors,
``vpshufb``/``vpsadbw``/``vpdpbusd``) that ``kernels.gemm.binary`` compiles only
when the active level allows it: compiling it for a CPU without AVX-512 BW
aborts the process.

XNOR-popcount tile, without ``vpopcntq`` (Cascade Lake has no AVX512-VPOPCNTDQ).
A byte-table popcount (``vpshufb`` on both nibbles, ``llvm.ctpop.v64i8``) costs
6 instructions per 512-bit vector; instead the xor words of one (row, column)
pair feed a Harley-Seal carry-save adder tree, as in Mula, Kurz and Lemire,
"Faster population counts using AVX2 instructions" (2018). With 512-bit bit-slice
vectors ``ones, twos, fours`` (weights 1, 2, 4) and ``CSA(h, l, a, b, c)``:
``l = a ^ b ^ c``, ``h = majority(a, b, c)`` (each one ``vpternlogq``), a block
of 8 vectors ``d0..d7 = a ^ b`` is reduced by

    twosA, ones = CSA(ones, d0, d1)    twosB, ones = CSA(ones, d2, d3)
    foursA, twos = CSA(twos, twosA, twosB)
    twosA, ones = CSA(ones, d4, d5)    twosB, ones = CSA(ones, d6, d7)
    foursB, twos = CSA(twos, twosA, twosB)
    eights, fours = CSA(fours, foursA, foursB)
    count8 += popcount_bytes(eights)                 (weight 8, per byte)

about 3.6 instructions per vector instead of 7. At the end (and for the 0..7
vectors past the last block, the last one masked to the words that remain)::

    total = sum over bytes of  pc(ones) + 2 pc(twos) + 4 pc(fours) + pc(rest)   (vpsadbw)
          + 8 * sum over bytes of count8                                          (vpsadbw)

``count8`` gains at most 8 per byte and block, so a call may cover at most
``MAX_BLOCKS = 31`` blocks (1984 words); the driver cuts longer K into chunks.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.gemm.llvm_ir import (I1, I8, I32, I64, array_ptr, clamped_rows, declare, emit_loop, is_array, masked,
                                  prefetch)

V8I64 = ir.VectorType(I64, 8)
V64I8 = ir.VectorType(I8, 64)
V16I32 = ir.VectorType(I32, 16)
WORDS_PER_VECTOR = 8
BLOCK = 8  # vectors per Harley-Seal block
MAX_BLOCKS = 31  # count8 bytes: 31 * 8 = 248 < 256
MAX_WORDS = MAX_BLOCKS * BLOCK * WORDS_PER_VECTOR  # words one call of the AVX-512 tile may cover


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a uint64 (``llvm.ctpop.i64``; portable), as an int64."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        ctpop = declare(builder, "llvm.ctpop.i64", ir.FunctionType(I64, [I64]))
        return builder.call(ctpop, [args[0]])

    return types.int64(x), codegen


def _tile_intrinsic(a_dtype, a_elem: ir.IntType):
    """Factory of tile intrinsics ``tile(a, a_off, lda, m, b, b_off, ldb, n, words, acc)``.

    ``a`` is a 1-D array of ``a_dtype`` (offsets and strides in its elements, ``emit``
    gets an ``a_elem*``), ``b`` 1-D uint64, ``acc`` 2-D int32, all C-contiguous;
    ``emit(builder, a_ptr, a_off, lda, m, b_ptr, b_off, ldb, n, words, acc_ptr)``
    writes the body from the data pointers and the i64 integers.
    """

    def wrap(emit):
        @intrinsic
        def tile(typingctx, a, a_off, lda, m, b, b_off, ldb, n, words, acc):
            if not (is_array(a, a_dtype, 1) and is_array(b, types.uint64, 1) and is_array(acc, types.int32, 2)):
                return None
            sig = types.void(a, a_off, lda, m, b, b_off, ldb, n, words, acc)

            def codegen(context, builder, signature, args):
                a, a_off, lda, m, b, b_off, ldb, n, words, acc = args
                tys = signature.args
                emit(builder, array_ptr(context, builder, tys[0], a, a_elem), a_off, lda, m,
                     array_ptr(context, builder, tys[4], b, I64), b_off, ldb, n, words,
                     array_ptr(context, builder, tys[9], acc, I32))
                return context.get_dummy_value()

            return sig, codegen

        return tile

    return wrap


binary_tile_intrinsic = _tile_intrinsic(types.uint64, I64)  # sign bits times sign bits
sign_tile_intrinsic = _tile_intrinsic(types.uint8, I8)  # bytes (offsets in bytes) times sign bits


def load_words(builder, base, offset, mask=None):
    """A <8 x i64> at ``base + offset`` words; with ``mask``, zero in the lanes it leaves out."""
    ptr = builder.bitcast(builder.gep(base, [offset]), V8I64.as_pointer())
    if mask is None:
        return builder.load(ptr, align=8)
    return builder.call(masked(builder, "load", V8I64), [ptr, ir.Constant(I32, 8), mask, ir.Constant(V8I64, None)])


def ternlog(builder, a, b, c, table: int):
    """``vpternlogq``: bit ``i`` of the result is bit ``4 a_i + 2 b_i + c_i`` of ``table``.

    Spelled as the intrinsic: from plain and/or/xor LLVM forms 4 instructions per
    carry-save adder instead of 2 (it shares ``a ^ b`` between the outputs).
    """
    fn = declare(builder, "llvm.x86.avx512.pternlog.q.512", ir.FunctionType(V8I64, [V8I64, V8I64, V8I64, I32]))
    return builder.call(fn, [a, b, c, ir.Constant(I32, table)])


XOR3 = 0x96  # a ^ b ^ c
CARRY_FROM_SUM = 0xD4  # majority(a, b, c) from (a, b, s = a ^ b ^ c): (a & b) | (~s & (a ^ b))


def csa(builder, a, b, c):
    """Carry-save add of three bit-slice vectors: ``(majority(a, b, c), a ^ b ^ c)``, two ``vpternlogq``.

    The carry is formed from ``a``, ``b`` and the sum rather than from ``a, b, c``:
    then ``c`` dies at the first instruction and ``a``, ``b`` at the second, so each
    (destructive) ``vpternlogq`` overwrites a dead input and no register copies
    are needed (they cost vector ALU slots: 20% of the loop).
    """
    total = ternlog(builder, a, b, c, XOR3)
    return ternlog(builder, a, b, total, CARRY_FROM_SUM), total


def bytes_popcount(builder, v):
    """Set bits of each byte of a <8 x i64> as <64 x i8> (``llvm.ctpop.v64i8``: the vpshufb nibble table)."""
    ctpop = declare(builder, "llvm.ctpop.v64i8", ir.FunctionType(V64I8, [V64I8]))
    return builder.call(ctpop, [builder.bitcast(v, V64I8)])


def byte_sums(builder, v):
    """``vpsadbw`` against zero: the 8 byte sums of each 64-bit lane of a <64 x i8>, as <8 x i64>."""
    sad = declare(builder, "llvm.x86.avx512.psad.bw.512", ir.FunctionType(V8I64, [V64I8, V64I8]))
    return builder.call(sad, [v, ir.Constant(V64I8, None)])


def next_tile(builder, a_rows: list, lda, b_cols: list, ldb, prefetch_next: str | None) -> list:
    """The rows to prefetch while a tile runs: the next tile's activation rows (``"rows"``, GEMM: they stream
    from L2), its weight rows (``"cols"``, GEMV: they stream from L3 or DRAM), or none."""
    if prefetch_next == "rows":
        return [builder.gep(p, [builder.mul(lda, ir.Constant(I64, len(a_rows)))]) for p in a_rows]
    if prefetch_next == "cols":
        return [builder.gep(p, [builder.mul(ldb, ir.Constant(I64, len(b_cols)))]) for p in b_cols]
    return []


def tail_mask(builder, left):
    """``<8 x i1>``: the lanes ``< left`` of a vector of 8 words (all of them from 8 on, none at 0 or below)."""
    limit = builder.insert_element(ir.Constant(V8I64, ir.Undefined), left, ir.Constant(I32, 0))
    limit = builder.shuffle_vector(limit, ir.Constant(V8I64, ir.Undefined), ir.Constant(ir.VectorType(I32, 8), None))
    return builder.icmp_signed("<", ir.Constant(V8I64, list(range(WORDS_PER_VECTOR))), limit)


def emit_block(builder, a_rows: list, b_cols: list, base: ir.Value, state: list, ahead: list | None = None) -> list:
    """One Harley-Seal block: 8 vectors of every (row, column) pair at word ``base`` of each row pointer.

    ``state`` holds, per pair (row-major), ``ones, twos, fours, count8`` as <8 x i64>;
    returns their new values (see the module docstring). With ``ahead`` (i64
    pointers), the same words of those rows are prefetched, one line per vector.
    """
    pairs = [(r, c) for r in range(len(a_rows)) for c in range(len(b_cols))]
    ones, twos, fours, count8 = ([state[4 * p + i] for p in range(len(pairs))] for i in range(4))
    twos_a, fours_a = [None] * len(pairs), [None] * len(pairs)
    for step in range(BLOCK // 2):
        offs = [builder.add(base, ir.Constant(I64, (2 * step + u) * WORDS_PER_VECTOR)) for u in (0, 1)]
        av = [[load_words(builder, p, o) for o in offs] for p in a_rows]
        for p in ahead or ():
            for o in offs:
                prefetch(builder, builder.bitcast(builder.gep(p, [o]), I8.as_pointer()))
        bv = [[load_words(builder, p, o) for o in offs] for p in b_cols]
        for index, (r, c) in enumerate(pairs):
            d0, d1 = (builder.xor(av[r][u], bv[c][u]) for u in (0, 1))
            carry, ones[index] = csa(builder, ones[index], d0, d1)
            if step % 2 == 0:
                twos_a[index] = carry
                continue
            fours_new, twos[index] = csa(builder, twos[index], twos_a[index], carry)
            if step == 1:
                fours_a[index] = fours_new
                continue
            eights, fours[index] = csa(builder, fours[index], fours_a[index], fours_new)
            added = builder.add(builder.bitcast(count8[index], V64I8), bytes_popcount(builder, eights))
            count8[index] = builder.bitcast(added, V8I64)
    return [value for index in range(len(pairs)) for value in (ones[index], twos[index], fours[index], count8[index])]


def make_tile(rows: int, cols: int, prefetch_next: str = "rows"):
    """A ``rows x cols`` Harley-Seal XNOR-popcount tile (AVX-512 BW).

    ``tile(a, a_off, lda, m, b, b_off, ldb, n, words, acc)`` sets, for ``r < rows``
    and ``c < cols``, ``acc[r, c] = sum_{w < words} popcount(a[a_off + r lda + w]
    ^ b[b_off + c ldb + w])``; rows past ``m`` repeat row ``m - 1`` and columns past
    ``n`` column ``n - 1`` (callers ignore them). ``words <= MAX_WORDS``. While a
    block is computed, its words of the next tile's rows (``prefetch_next="rows"``,
    GEMM) or weight rows (``"cols"``, GEMV) are prefetched; ``None``: no prefetch.
    """
    pairs = [(r, c) for r in range(rows) for c in range(cols)]

    def emit(builder, a_ptr, a_off, lda, m, b_ptr, b_off, ldb, n, words, acc_ptr):
        a_rows = clamped_rows(builder, a_ptr, a_off, lda, m, rows)
        b_cols = clamped_rows(builder, b_ptr, b_off, ldb, n, cols)
        ahead = next_tile(builder, a_rows, lda, b_cols, ldb, prefetch_next)
        vectors = builder.lshr(words, ir.Constant(I64, 3))
        blocks = builder.lshr(vectors, ir.Constant(I64, 3))

        def block(q, state):
            base = builder.mul(q, ir.Constant(I64, BLOCK * WORDS_PER_VECTOR))
            return emit_block(builder, a_rows, b_cols, base, state, ahead)

        state = emit_loop(builder, blocks, V8I64, 4 * len(pairs), block)

        # the 0..7 vectors past the blocks; the last one masked to the words left over
        rest_start = builder.mul(blocks, ir.Constant(I64, BLOCK * WORDS_PER_VECTOR))
        rest_words = builder.sub(words, rest_start)
        rest_count = builder.lshr(builder.add(rest_words, ir.Constant(I64, WORDS_PER_VECTOR - 1)), ir.Constant(I64, 3))

        def rest(v, counts):
            first = builder.mul(v, ir.Constant(I64, WORDS_PER_VECTOR))
            mask = tail_mask(builder, builder.sub(rest_words, first))
            offset = builder.add(rest_start, first)
            av = [load_words(builder, p, offset, mask) for p in a_rows]
            bv = [load_words(builder, p, offset, mask) for p in b_cols]
            out = []
            for index, (r, c) in enumerate(pairs):
                pc = bytes_popcount(builder, builder.xor(av[r], bv[c]))
                out.append(builder.bitcast(builder.add(builder.bitcast(counts[index], V64I8), pc), V8I64))
            return out

        rests = emit_loop(builder, rest_count, V8I64, len(pairs), rest)

        reduce_add = declare(builder, "llvm.vector.reduce.add.v8i64", ir.FunctionType(I64, [V8I64]))
        for index, (r, c) in enumerate(pairs):
            ones, twos, fours, count8 = state[4 * index : 4 * index + 4]
            low = builder.add(bytes_popcount(builder, twos), builder.shl(bytes_popcount(builder, fours),
                                                                          ir.Constant(V64I8, [1] * 64)))
            low = builder.add(builder.shl(low, ir.Constant(V64I8, [1] * 64)), bytes_popcount(builder, ones))
            low = builder.add(low, builder.bitcast(rests[index], V64I8))  # at most 8 + 16 + 32 + 64 per byte
            sums = builder.add(byte_sums(builder, low),
                               builder.shl(byte_sums(builder, builder.bitcast(count8, V64I8)),
                                           ir.Constant(V8I64, [3] * 8)))
            total = builder.trunc(builder.call(reduce_add, [sums]), I32)
            builder.store(total, builder.gep(acc_ptr, [ir.Constant(I64, r * cols + c)]))

    return binary_tile_intrinsic(emit)


def make_sign_tile(rows: int, cols: int):
    """A ``rows x cols`` tile of unsigned bytes summed where a weight bit is set (AVX-512 VNNI).

    ``tile(a, a_off, lda, m, b, b_off, ldb, n, words, acc)`` sets ``acc[r, c] =
    sum_{w < words} sum_{i < 64} a[a_off + r lda + 64 w + i] * bit_i(b[b_off + c ldb + w])``
    (rows past ``m`` and columns past ``n`` repeat the last one). Per word, the 64
    bits become 64 bytes of 0 / -1 (``vpmovm2b``), and one ``vpdpbusd`` per (row,
    column) adds ``a * (-bit)`` into 16 int32 lanes; the sum is negated at the end.
    Each lane gains at most 4 * 255 per word: exact for ``words < 2**21``.
    """
    from kernels.gemm.vnni import declare_vpdpbusd  # AVX-512 VNNI; imported only by the factory

    pairs = [(r, c) for r in range(rows) for c in range(cols)]

    def emit(builder, a_ptr, a_off, lda, m, b_ptr, b_off, ldb, n, words, acc_ptr):
        dot = declare_vpdpbusd(builder)
        byte = dot.function_type.args[1]
        a_rows = clamped_rows(builder, a_ptr, a_off, lda, m, rows)
        b_cols = clamped_rows(builder, b_ptr, b_off, ldb, n, cols)

        def word(q, accs):
            offset = builder.mul(q, ir.Constant(I64, 64))
            av = [builder.bitcast(builder.load(builder.bitcast(builder.gep(p, [offset]), V64I8.as_pointer()), align=1),
                                  byte) for p in a_rows]
            signs = []
            for p in b_cols:
                bits = builder.bitcast(builder.load(builder.gep(p, [q]), align=8), ir.VectorType(I1, 64))
                signs.append(builder.bitcast(builder.sext(bits, V64I8), byte))  # vpmovm2b: 0 or -1
            return [builder.call(dot, [accs[index], av[r], signs[c]]) for index, (r, c) in enumerate(pairs)]

        sums = emit_loop(builder, words, V16I32, len(pairs), word)
        reduce_add = declare(builder, "llvm.vector.reduce.add.v16i32", ir.FunctionType(I32, [V16I32]))
        for index, (r, c) in enumerate(pairs):
            total = builder.neg(builder.call(reduce_add, [sums[index]]))
            builder.store(total, builder.gep(acc_ptr, [ir.Constant(I64, r * cols + c)]))

    return sign_tile_intrinsic(emit)
