"""The binary micro-kernels and the compile-time switch between them.

Two products, each with a portable tile and AVX-512 ones (for XNOR-popcount, one
Harley-Seal tile for AVX-512 BW and one ``vpopcntq`` tile for AVX512-VPOPCNTDQ):

* XNOR-popcount (``POPCOUNT_TILES``), over sign bits packed by ``kernels.pack.bits``::

      acc[r, c] = sum_{w < words} popcount(a[a_off + r * lda + w] ^ b[b_off + c * ldb + w])

* binary weights x 8-bit activations (``SIGN_TILES``), ``a`` unsigned bytes::

      acc[r, c] = sum_{w < words} sum_{i < 64} a[a_off + r * lda + 64 w + i] * bit_i(b[b_off + c * ldb + w])

for ``r < m``, ``c < n`` (``acc`` is an int32 ``[rows, cols]`` scratch tile; the
AVX-512 tiles also fill the rows and columns past ``m`` and ``n``, which callers
ignore). ``popcount_microkernel(kind, ...)`` and ``sign_microkernel(kind, ...)``
are resolved while a driver is compiled, from the string literal ``kind``: only
the chosen tile is compiled, so AVX-512 IR never reaches a CPU that cannot run it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numba import types
from numba.extending import overload

from kernels._jit import kernel
from kernels.gemm import popcount, vpopcnt
from kernels.gemm.popcount import popcount64

UNLIMITED = 1 << 40


@kernel
def popcount_portable(a, a_off, lda, m, b, b_off, ldb, n, words, acc):
    """Portable XNOR-popcount tile: ``llvm.ctpop.i64`` in plain loops (LLVM vectorises the word loop)."""
    for r in range(m):
        row = a[a_off + r * lda : a_off + r * lda + words]
        for c in range(n):
            col = b[b_off + c * ldb : b_off + c * ldb + words]
            total = 0
            for w in range(words):
                total += popcount64(row[w] ^ col[w])
            acc[r, c] = total


@kernel
def sign_portable(a, a_off, lda, m, b, b_off, ldb, n, words, acc):
    """Portable binary x byte tile: each bit selects its byte through a mask ``-(bit)``; vectorises over i."""
    for r in range(m):
        for c in range(n):
            acc[r, c] = 0
    for w in range(words):
        for c in range(n):
            bits = b[b_off + c * ldb + w]
            for r in range(m):
                chunk = a[a_off + r * lda + 64 * w : a_off + r * lda + 64 * w + 64]
                total = np.int32(0)
                for i in range(64):
                    select = -np.int32((bits >> np.uint64(i)) & np.uint64(1))
                    total += np.int32(chunk[i]) & select
                acc[r, c] += total


class Tile(NamedTuple):
    """One binary micro-kernel: its height and width, its tile, and the most words one call may cover."""

    rows: int
    cols: int
    tile: Callable
    max_words: int = UNLIMITED


# kind -> Tile. The AVX-512 popcount tile is one row by four columns: the row's
# vector is loaded once and xored with four weight rows read from L1 (folded into
# vpxorq); a 2 x 2 tile runs as fast in L1 but spills, and wider ones spill more.
# GEMM prefetches the next activation row (from L2); GEMV the next four weight
# rows, which stream from L3 or DRAM (measured 1.5x faster than no prefetch).
# With VPOPCNTDQ (kernels.gemm.vpopcnt) a pair costs three instructions per vector, so loads matter more:
# a 4 x 4 tile loads 8 vectors per 16 pairs (24 of the 32 registers); GEMV keeps one row and four columns.
POPCOUNT_TILES = {
    "generic": Tile(4, 4, popcount_portable),
    "avx512-vpopcntdq": Tile(4, 4, vpopcnt.make_tile(4, 4, "rows")),
    "avx512-vpopcntdq-gemv": Tile(1, 4, vpopcnt.make_tile(1, 4, "cols")),
    "avx512-vnni": Tile(1, 4, popcount.make_tile(1, 4, "rows"), popcount.MAX_WORDS),
    "avx512-vnni-gemv": Tile(1, 4, popcount.make_tile(1, 4, "cols"), popcount.MAX_WORDS),
}
SIGN_TILES = {
    "generic": Tile(4, 1, sign_portable),
    "avx512-vnni": Tile(4, 4, popcount.make_sign_tile(4, 4), 1 << 20),
}


def popcount_microkernel(kind, a, a_off, lda, m, b, b_off, ldb, n, words, acc):
    """One XNOR-popcount tile with the micro-kernel named by the literal ``kind`` (jitted code only)."""
    raise NotImplementedError("popcount_microkernel() is only callable from compiled kernels")


def sign_microkernel(kind, a, a_off, lda, m, b, b_off, ldb, n, words, acc):
    """One binary x byte tile with the micro-kernel named by the literal ``kind`` (jitted code only)."""
    raise NotImplementedError("sign_microkernel() is only callable from compiled kernels")


def _selector(table: dict[str, Tile]):
    def select(kind, a, a_off, lda, m, b, b_off, ldb, n, words, acc):
        if not isinstance(kind, types.StringLiteral):
            return None
        tile = table[kind.literal_value].tile

        def run(kind, a, a_off, lda, m, b, b_off, ldb, n, words, acc):
            tile(a, a_off, lda, m, b, b_off, ldb, n, words, acc)

        return run

    return select


overload(popcount_microkernel, inline="always")(_selector(POPCOUNT_TILES))
overload(sign_microkernel, inline="always")(_selector(SIGN_TILES))
