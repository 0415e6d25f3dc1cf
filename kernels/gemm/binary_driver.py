"""The binary GEMM tile drivers: loop over output tiles, call a micro-kernel, finish each tile.

One call covers rows ``i0..i1`` and columns ``j0..j1`` of the output; the
threads of ``kernels.threads`` get disjoint ranges. Rows are walked in blocks
whose activation words fit in L2 (``row_block`` rows); inside a block, each tile
of weight rows stays in L1 while the block's activation rows stream past it.

Output transforms of the XNOR-popcount product (``mode``, a compile-time constant
of each driver). With ``pc`` the popcount of the xored bits over ``k`` bits and
``dot = k - 2 pc`` (padding bits are 0 in both operands, so they never count)::

    INTEGER   out[i, j] = dot                                                (int32)
    REAL      out[i, j] = float32(float64(dot) * mult[j] + bias[j])         (float32)
    BITS      bit j % 64 of out[i, j // 64] = 1 if dot < thr[j] else 0     (uint64; -1 below)

``BITS`` ORs into ``out``, which the caller zeroes, and needs column ranges that
start on multiples of 64 so that no two threads share a word. A binary x byte
driver finishes ``S = sum of a where the bit is set`` as
``out[i, j] = row_term[i] + col_term[j] - 2 S`` (see ``kernels.gemm.binary``).
"""

from __future__ import annotations

import numpy as np

from kernels._jit import kernel
from kernels.epilogue import BITS, INTEGER, REAL
from kernels.gemm.binary_tiles import POPCOUNT_TILES, SIGN_TILES, popcount_microkernel, sign_microkernel
from kernels.gemm.popcount import popcount64

MODES = (INTEGER, REAL, BITS)


def _make_popcount_driver(kind: str, mode: int):
    spec = POPCOUNT_TILES[kind]
    rows, cols, max_words = spec.rows, spec.cols, spec.max_words

    @kernel
    def binary_tiles(a, b, k, words, i0, i1, j0, j1, row_block, mult, bias, thr, out):
        """Rows ``i0..i1``, columns ``j0..j1`` of the XNOR-popcount product, finished by ``mode``.

        a, b : uint64 [M, words], [N, words], C-contiguous; k : bits per row, ceil(k / 64) == words
        mult, bias : float64 [N] (REAL); thr : int64 [N] (BITS); out : see the module docstring
        """
        flat_a = a.reshape(-1)
        flat_b = b.reshape(-1)
        part = np.empty((rows, cols), np.int32)
        tile = np.empty((rows, cols), np.int32)
        for ib in range(i0, i1, row_block):
            ie = min(i1, ib + row_block)
            for j in range(j0, j1, cols):
                nc = min(cols, j1 - j)
                for i in range(ib, ie, rows):
                    mr = min(rows, ie - i)
                    if words <= max_words:
                        popcount_microkernel(kind, flat_a, i * words, words, mr, flat_b, j * words, words, nc, words,
                                             tile)
                    else:  # long K: chunks within the micro-kernel's limit
                        tile[:] = 0
                        for w0 in range(0, words, max_words):
                            popcount_microkernel(kind, flat_a, i * words + w0, words, mr, flat_b, j * words + w0,
                                                 words, nc, min(max_words, words - w0), part)
                            tile += part
                    for r in range(mr):
                        for c in range(nc):
                            dot = k - 2 * np.int64(tile[r, c])
                            col = j + c
                            if mode == INTEGER:
                                out[i + r, col] = dot
                            elif mode == REAL:
                                out[i + r, col] = np.float64(dot) * mult[col] + bias[col]
                            elif dot < thr[col]:
                                out[i + r, col >> 6] |= np.uint64(1) << np.uint64(col & 63)

    return binary_tiles


def _make_sign_driver(kind: str):
    spec = SIGN_TILES[kind]
    rows, cols, max_words = spec.rows, spec.cols, spec.max_words

    @kernel
    def sign_tiles(a, lda, b, words, i0, i1, j0, j1, row_block, row_term, col_term, out):
        """Rows ``i0..i1``, columns ``j0..j1`` of binary weights x bytes: ``row_term + col_term - 2 S``.

        a : uint8 [M * lda] flattened, lda = 64 * words, zero-padded; b : uint64 [N, words]
        row_term, col_term : int64 [M], [N]; out : int32 [M, N]
        """
        flat_b = b.reshape(-1)
        part = np.empty((rows, cols), np.int32)
        tile = np.empty((rows, cols), np.int32)
        for ib in range(i0, i1, row_block):
            ie = min(i1, ib + row_block)
            for j in range(j0, j1, cols):
                nc = min(cols, j1 - j)
                for i in range(ib, ie, rows):
                    mr = min(rows, ie - i)
                    tile[:] = 0
                    for w0 in range(0, words, max_words):
                        sign_microkernel(kind, a, i * lda + 64 * w0, lda, mr, flat_b, j * words + w0, words, nc,
                                         min(max_words, words - w0), part)
                        tile += part
                    for r in range(mr):
                        for c in range(nc):
                            out[i + r, j + c] = row_term[i + r] + col_term[j + c] - 2 * np.int64(tile[r, c])

    return sign_tiles


# One driver per micro-kernel (and output mode): a driver compiles only its own
# micro-kernel, when first called.
POPCOUNT_DRIVERS = {(kind, mode): _make_popcount_driver(kind, mode) for kind in POPCOUNT_TILES for mode in MODES}
SIGN_DRIVERS = {kind: _make_sign_driver(kind) for kind in SIGN_TILES}


@kernel
def row_popcounts(b):
    """``s[n] = sum_w popcount(b[n, w])``: set bits (-1 values) per row of packed words."""
    s = np.empty(b.shape[0], np.int64)
    for n in range(b.shape[0]):
        t = 0
        for w in range(b.shape[1]):
            t += popcount64(b[n, w])
        s[n] = t
    return s
