"""XNOR-popcount "lanes" tiles: one 512-bit vector holds one byte of each of 64 output columns.

Operands are sign bits packed by ``kernels.pack.bits``, read as bytes (byte ``i``
of a word = bits ``8i .. 8i + 7``) taken in pairs ``(b[2p], b[2p + 1])``, ``p < 4``:

* ``a`` (uint32): per activation word a *slot* of 8 uint32 units, ``b[2p]`` and
  ``b[2p] ^ b[2p + 1]`` (the pair's xor) for each pair, each byte repeated in the
  4 bytes of its unit (so that ``vpbroadcastd`` from memory, a load without ALU
  work, spreads it over the 64 byte lanes). Word ``j`` of row ``r`` is the slot at
  unit ``corners[c_off + r] + offs[j]``: rows are gathered through the int64 tables
  ``corners`` and ``offs``, so a convolution reads its windows straight from a
  padded image (``kernels.conv.binary_driver``), with no im2col copy;
* ``b`` (uint32): weights in the lanes layout (``kernels.pack.conv_binary.lanes_layout``):
  column vector ``v`` (columns ``64 v .. 64 v + 63``) at ``b_off + v ldb`` holds, per
  word ``j`` and pair ``p``, two vectors of 64 bytes (byte ``l`` = column ``64 v + l``):
  ``b[2p]`` at unit ``b_off + v ldb + 16 (8 j + 2 p)`` and the pair's xor 16 units on.

A tile ``tile(a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo)``
writes, for rows ``r < m`` and columns ``c < n`` (int32 ``out``, 1-D)::

    out[o_off + r ldo + c] = k - 2 sum_{j < words} popcount(word j of row r ^ word j of column c)

the ±1 dot product of ``k``-bit rows (``kernels.gemm.binary``). ``lanes_microkernel(kind, ...)``
resolves the tile named by the literal ``kind`` while a driver compiles, so
AVX-512 IR never reaches a CPU that cannot run it.

Why lanes: an activation byte is broadcast to the 64 lanes and xored with one
byte of 64 columns at once, so a vector accumulates the counts of 64 outputs side
by side, byte by byte: no horizontal reduction per output (the row-by-column
tiles of ``kernels.gemm.popcount`` pay one per output, which dominates at short
K), and the final bit-slice popcounts and widenings are shared by 64 outputs
(measured 1.1x to 1.25x faster than lanes of 32 bits, most at short K).

Counting (AVX-512, no ``vpopcntq`` on Cascade Lake): the 8 xored bytes of a word
(4 pairs) are one Harley-Seal carry-save block (``kernels.gemm.popcount``) into
``ones, twos, fours``, with ``count8 += popcount_bytes(eights)`` per word, widened
into four int32 vectors every ``CHUNK_WORDS`` words, before a byte can wrap. The
first adder of each pair uses the pair's xor: with ``d0 = x0 ^ w0``, ``d1 = x1 ^ w1``,
``ones ^ d0 ^ d1 = ternlog(ones, w0 ^ w1, x0 ^ x1)`` and the carry follows from
``ones, d0`` and that sum: 3 instructions per pair instead of 4. Per output (byte
lane), with ``pc`` the bytes popcount (``vpshufb`` nibble table)::

    sum = 4 pc(fours) + 2 pc(twos) + pc(ones) + 8 sum of count8
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from kernels._jit import kernel
from kernels.gemm.binary_tiles import Tile
from kernels.gemm.llvm_ir import I32, I64, array_ptr, emit_loop, is_array, masked, splat
from kernels.gemm.popcount import CARRY_FROM_SUM, V8I64, V64I8, XOR3, bytes_popcount, csa, popcount64, ternlog

LANES = 64  # columns per vector: 64 byte lanes
PAIRS = 4  # byte pairs per word
UNITS_PER_SLOT = 2 * PAIRS  # uint32 units per activation word: per pair, its first byte and its xor
VECTOR_UNITS = 16  # uint32 units per 512-bit vector
CHUNK_WORDS = 31  # count8 bytes gain at most 8 per word: 31 * 8 = 248 < 256
V16I32 = ir.VectorType(I32, 16)


@kernel
def lanes_portable(a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo):
    """Portable lanes tile (``llvm.ctpop.i64`` of 16-bit pairs). Contract: module docstring."""
    a8 = a.view(np.uint8)  # byte 4 u of a unit u holds its byte
    b8 = b.view(np.uint8)
    for r in range(m):
        corner = corners[c_off + r]
        for c in range(n):
            column = 4 * (b_off + c // LANES * ldb) + c % LANES  # its byte in the word 0, pair 0 vector
            total = 0
            for j in range(words):
                slot = 4 * (corner + offs[j])
                vectors = column + LANES * UNITS_PER_SLOT * j
                for p in range(PAIRS):
                    x0, x01 = np.uint64(a8[slot + 8 * p]), np.uint64(a8[slot + 8 * p + 4])
                    w0, w01 = np.uint64(b8[vectors + 2 * LANES * p]), np.uint64(b8[vectors + 2 * LANES * p + LANES])
                    total += popcount64((x0 ^ w0) | ((x0 ^ x01 ^ w0 ^ w01) << np.uint64(8)))  # the pair's 16 bits
            out[o_off + r * ldo + c] = k - 2 * total


def _add_bytes(builder, x, y):
    """Bytewise ``x + y`` of two <8 x i64>."""
    return builder.bitcast(builder.add(builder.bitcast(x, V64I8), builder.bitcast(y, V64I8)), V8I64)


def _lanes_intrinsic(emit):
    """A tile intrinsic with the lanes signature; ``emit`` gets typed data pointers and the i64 integers."""

    @intrinsic
    def tile(typingctx, a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo):
        if not (is_array(a, types.uint32, 1) and is_array(corners, types.int64, 1)
                and is_array(offs, types.int64, 1) and is_array(b, types.uint32, 1)
                and is_array(out, types.int32, 1)):
            return None
        sig = types.void(a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo)

        def codegen(context, builder, signature, args):
            a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo = args
            t = signature.args
            emit(builder, array_ptr(context, builder, t[0], a, I32), array_ptr(context, builder, t[1], corners, I64),
                 c_off, m, array_ptr(context, builder, t[4], offs, I64), array_ptr(context, builder, t[5], b, I32),
                 b_off, ldb, n, words, k, array_ptr(context, builder, t[11], out, I32), o_off, ldo)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def make_lanes_tile(rows: int, vectors: int):
    """A ``rows x (64 vectors)`` lanes tile (AVX-512 BW); contract in the module docstring.

    Rows past ``m`` repeat row ``m - 1`` and vectors past ``ceil(n / 64)`` the last
    one; masked stores write only rows ``< m`` and columns ``< n``.
    """
    pairs = [(r, v) for r in range(rows) for v in range(vectors)]

    def emit(builder, a_ptr, corners_ptr, c_off, m, offs_ptr, b_ptr, b_off, ldb, n, words, k, out_ptr, o_off, ldo):
        const = lambda value: ir.Constant(I64, value)  # noqa: E731
        last_row = builder.sub(m, const(1))
        a_rows = []
        for r in range(rows):
            row = builder.add(c_off, builder.select(builder.icmp_signed("<", const(r), m), const(r), last_row))
            a_rows.append(builder.gep(a_ptr, [builder.load(builder.gep(corners_ptr, [row]), align=8)]))
        last_vector = builder.sub(builder.udiv(builder.add(n, const(LANES - 1)), const(LANES)), const(1))
        b_cols = [builder.gep(b_ptr, [builder.add(b_off, builder.mul(
            builder.select(builder.icmp_signed("<", const(v), last_vector), const(v), last_vector), ldb))])
            for v in range(vectors)]

        def broadcast(ptr):
            return builder.bitcast(splat(builder, builder.load(ptr, align=4), V16I32), V8I64)

        def weights(ptr):
            return builder.load(builder.bitcast(ptr, V8I64.as_pointer()), align=4)

        def pair_adders(slots, columns, p, ones):
            """CSA(ones, d0, d1) of byte pair ``p`` for every (row, vector): (carries, new ones)."""
            x0 = [broadcast(builder.gep(slot, [const(2 * p)])) for slot in slots]
            x01 = [broadcast(builder.gep(slot, [const(2 * p + 1)])) for slot in slots]
            w0 = [weights(builder.gep(column, [const(VECTOR_UNITS * 2 * p)])) for column in columns]
            w01 = [weights(builder.gep(column, [const(VECTOR_UNITS * (2 * p + 1))])) for column in columns]
            carries, sums = [], []
            for index, (r, v) in enumerate(pairs):
                d0 = builder.xor(x0[r], w0[v])
                total = ternlog(builder, ones[index], w01[v], x01[r], XOR3)  # ones ^ d0 ^ d1
                carries.append(ternlog(builder, ones[index], d0, total, CARRY_FROM_SUM))
                sums.append(total)
            return carries, sums

        def word(j, state):
            """Harley-Seal block of word ``j``; ``state`` is ``ones, twos, fours, count8`` per (row, vector)."""
            ones, twos, fours, count8 = (list(state[i::4]) for i in range(4))
            offset = builder.load(builder.gep(offs_ptr, [j]), align=8)
            slots = [builder.gep(row, [offset]) for row in a_rows]
            columns = [builder.gep(column, [builder.mul(j, const(VECTOR_UNITS * UNITS_PER_SLOT))])
                       for column in b_cols]
            fours_a = [None] * len(pairs)
            for half in range(2):
                twos_a, ones = pair_adders(slots, columns, 2 * half, ones)
                twos_b, ones = pair_adders(slots, columns, 2 * half + 1, ones)
                for index in range(len(pairs)):
                    carry, twos[index] = csa(builder, twos[index], twos_a[index], twos_b[index])
                    if half == 0:
                        fours_a[index] = carry
                        continue
                    eights, fours[index] = csa(builder, fours[index], fours_a[index], carry)
                    count8[index] = _add_bytes(builder, count8[index], bytes_popcount(builder, eights))
            return [value for index in range(len(pairs)) for value in
                    (ones[index], twos[index], fours[index], count8[index])]

        zero = ir.Constant(V8I64, None)

        def widen(v, quarter):
            """Bytes ``16 quarter .. 16 quarter + 15`` of ``v`` (<8 x i64>) as <16 x i32>."""
            picks = ir.Constant(ir.VectorType(I32, 16), list(range(16 * quarter, 16 * quarter + 16)))
            part = builder.shuffle_vector(builder.bitcast(v, V64I8), ir.Constant(V64I8, ir.Undefined), picks)
            return builder.zext(part, V16I32)

        def chunk(c, outer):
            """Up to ``CHUNK_WORDS`` words, then their eights counts added to the int32 sums."""
            first = builder.mul(c, const(CHUNK_WORDS))
            count = builder.sub(words, first)
            count = builder.select(builder.icmp_signed("<", count, const(CHUNK_WORDS)), count, const(CHUNK_WORDS))
            initial = [value for index in range(len(pairs)) for value in (*outer[3 * index : 3 * index + 3], zero)]
            state = emit_loop(builder, count, V8I64, 4 * len(pairs), lambda q, st: word(builder.add(first, q), st),
                              initial)
            slices = [value for index in range(len(pairs)) for value in state[4 * index : 4 * index + 3]]
            sums = outer[3 * len(pairs):]  # 4 per (row, vector), as <8 x i64>: one type for all the loop carries
            for index in range(len(pairs)):
                for quarter in range(4):
                    at = 4 * index + quarter
                    total = builder.add(builder.bitcast(sums[at], V16I32), widen(state[4 * index + 3], quarter))
                    sums[at] = builder.bitcast(total, V8I64)
            return slices + sums

        chunks = builder.udiv(builder.add(words, const(CHUNK_WORDS - 1)), const(CHUNK_WORDS))
        state = emit_loop(builder, chunks, V8I64, 7 * len(pairs), chunk)
        ones, twos, fours = (state[i : 3 * len(pairs) : 3] for i in range(3))
        sum8 = state[3 * len(pairs):]

        store = masked(builder, "store", V16I32)
        k_lanes = splat(builder, builder.trunc(k, I32), V16I32)
        for index, (r, v) in enumerate(pairs):
            low = bytes_popcount(builder, fours[index])
            low = builder.add(builder.add(low, low), bytes_popcount(builder, twos[index]))
            low = builder.add(builder.add(low, low), bytes_popcount(builder, ones[index]))  # at most 56
            low = builder.bitcast(low, V8I64)
            limit = builder.select(builder.icmp_signed("<", const(r), m), builder.sub(n, const(LANES * v)), const(0))
            limit = splat(builder, builder.trunc(limit, I32), V16I32)
            row = builder.add(o_off, builder.add(builder.mul(const(r), ldo), const(LANES * v)))
            for quarter in range(4):
                eights = builder.shl(builder.bitcast(sum8[4 * index + quarter], V16I32), ir.Constant(V16I32, [3] * 16))
                total = builder.add(eights, widen(low, quarter))
                result = builder.sub(k_lanes, builder.add(total, total))
                mask = builder.icmp_signed("<", ir.Constant(V16I32, list(range(16 * quarter, 16 * quarter + 16))),
                                           limit)
                dst = builder.gep(out_ptr, [builder.add(row, const(16 * quarter))])
                builder.call(store, [result, builder.bitcast(dst, V16I32.as_pointer()), ir.Constant(I32, 4), mask])

    return _lanes_intrinsic(emit)


# kind -> Tile (``cols`` counts columns, 64 per vector). The AVX-512 tile is 4 rows by one
# vector: 64 columns suit the usual channel counts, a row's broadcasts serve one vector
# only, so their registers can take the sums and no copies are needed; its 16
# accumulators and their operands fill the 32 registers.
LANES_TILES = {
    "generic": Tile(4, LANES, lanes_portable),
    "avx512-vnni": Tile(4, LANES, make_lanes_tile(4, 1)),
}


def lanes_microkernel(kind, a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo):
    """One lanes tile with the micro-kernel named by the literal ``kind`` (jitted code only)."""
    raise NotImplementedError("lanes_microkernel() is only callable from compiled kernels")


@overload(lanes_microkernel, inline="always")
def _select(kind, a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo):
    if not isinstance(kind, types.StringLiteral):
        return None
    tile = LANES_TILES[kind.literal_value].tile

    def run(kind, a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo):
        tile(a, corners, c_off, m, offs, b, b_off, ldb, n, words, k, out, o_off, ldo)

    return run
