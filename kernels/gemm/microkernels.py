"""The int8 micro-kernels and the compile-time switch between them.

Every micro-kernel computes one tile of raw u8 x s8 dot products over the panel
layout of ``kernels.pack.panels``::

    acc[r, c] = sum_{q < kq} sum_{u < 4} a[a_off + r * lda + 4 q + u]
                                         * b[b_off + (q * 64 + c) * 4 + u]

for ``r < m`` and ``c < width`` (64, a whole panel, or the first 32 channels of it
for a narrow tile: drivers then call it on ``b_off`` and ``b_off + 32 * 4``, the
panel's second half). ``microkernel_store(kind, ...)`` computes the same
sums and finishes an int32 output at once: ``out[o_off + r * ldo + c] = acc[r, c]
+ col_term[c0 + c]`` (wrapping) for ``r < m``, ``c < cols``. ``a`` is the flattened uint8 activation matrix with
row stride ``lda`` (a multiple of 4, zero-padded), ``b`` the flattened panel data
with ``b_off`` at k group 0 of one panel, ``acc`` an int32 ``[rows, 64]`` scratch
tile. Sums wrap modulo 2**32; the caller keeps ``kq`` small enough that they do
not (see ``kernels.gemm.driver``).

``microkernel(kind, ...)`` is resolved while a driver is compiled, from the
string literal ``kind``: only the chosen kernel is compiled, so the VNNI IR never
reaches a CPU that cannot run it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numba import types
from numba.extending import overload

from kernels._jit import kernel
from kernels.gemm import amx, avx2, vnni
from kernels.pack.panels import PANEL


@kernel
def tile_portable(a, a_off, lda, m, b, b_off, kq, acc):
    """Portable micro-kernel: the same contract, plain loops that LLVM vectorises over c.

    Each k group's weights are taken as a 256-byte slice first: indexing the slice
    with ``4 c + u`` lets LLVM see in-bounds, non-negative offsets (6x faster than
    indexing ``b`` with the full offset).
    """
    for r in range(m):
        row = acc[r]
        row[:] = 0
        base_a = a_off + r * lda
        for q in range(kq):
            w = b[b_off + q * 256 : b_off + q * 256 + 256]
            x0 = np.int32(a[base_a + 4 * q])
            x1 = np.int32(a[base_a + 4 * q + 1])
            x2 = np.int32(a[base_a + 4 * q + 2])
            x3 = np.int32(a[base_a + 4 * q + 3])
            for c in range(64):
                row[c] += (x0 * np.int32(w[4 * c]) + x1 * np.int32(w[4 * c + 1])
                           + x2 * np.int32(w[4 * c + 2]) + x3 * np.int32(w[4 * c + 3]))


class Tile(NamedTuple):
    """One micro-kernel: its height, its ``tile`` and, if it has them, its own ``tile_store`` and ``tile_finish``."""

    rows: int
    tile: Callable
    tile_store: Callable | None = None  # None: run ``tile``, then add and store in plain code
    tile_finish: Callable | None = None  # None: run ``tile``, then rescale and store in plain code
    width: int = PANEL  # output channels per tile: the first ``width`` of the panel at ``b_off``
    ops_per_us: float = 400e3  # single-thread throughput measured on mid-size products: when threads pay


NARROW_ROWS, NARROW_VECTORS = 12, 2  # 24 accumulators, as the wide tile's 6 x 4


# kind -> Tile; drivers step rows by the height and channels by the width. Prefetch distances are the measured
# best: 4 k groups ahead when the weights come from L2, 16 when they stream from L3
# or DRAM. (Blocking K so that the weights fit L1 instead measured slower: short
# activation streams defeat the hardware prefetcher.)
TILES = {
    "generic": Tile(4, tile_portable),
    "avx2": Tile(2, avx2.make_tile(2)),
    "avx512-vnni": Tile(6, vnni.make_tile(6, 1024), vnni.make_tile_store(6, 1024), vnni.make_tile_finish(6, 1024)),
    "avx512-vnni-gemv": Tile(4, vnni.make_tile(4, 4096), vnni.make_tile_store(4, 4096),
                             vnni.make_tile_finish(4, 4096)),
    # 32 channels or fewer: the wide tile would multiply half its vectors by zero-padded weights
    "avx512-vnni-narrow": Tile(NARROW_ROWS, *(make(NARROW_ROWS, 1024, vectors=NARROW_VECTORS) for make in
                                              (vnni.make_tile, vnni.make_tile_store, vnni.make_tile_finish)),
                               width=16 * NARROW_VECTORS),
    "amx": Tile(amx.ROWS, *(make(amx.ROWS, source="amx") for make in
                            (vnni.make_tile, vnni.make_tile_store, vnni.make_tile_finish)), ops_per_us=1500e3),
}
# One-row twins that a driver runs for a tile of a single row (a batch of 1): the GEMV tile computes all of its
# rows whatever ``m`` is, four times the work of one row. Not variants of their own (kernels.dispatch).
ONE_ROW = {"avx512-vnni-gemv": "avx512-vnni-gemv-1"}
_KINDS = {**TILES, "avx512-vnni-gemv-1": Tile(1, vnni.make_tile(1, 4096), vnni.make_tile_store(1, 4096),
                                              vnni.make_tile_finish(1, 4096))}


def microkernel(kind, a, a_off, lda, m, b, b_off, kq, acc):
    """Compute one tile with the micro-kernel named by the literal ``kind`` (jitted code only)."""
    raise NotImplementedError("microkernel() is only callable from compiled kernels")


@overload(microkernel)
def _select(kind, a, a_off, lda, m, b, b_off, kq, acc):
    if not isinstance(kind, types.StringLiteral):
        return None
    tile = _KINDS[kind.literal_value].tile

    def run(kind, a, a_off, lda, m, b, b_off, kq, acc):
        tile(a, a_off, lda, m, b, b_off, kq, acc)

    return run


def microkernel_store(kind, a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo):
    """Compute one tile and write it, plus ``col_term``, to int32 ``out`` (jitted code only)."""
    raise NotImplementedError("microkernel_store() is only callable from compiled kernels")


@overload(microkernel_store)
def _select_store(kind, a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo):
    if not isinstance(kind, types.StringLiteral):
        return None
    spec = _KINDS[kind.literal_value]
    if spec.tile_store is not None:
        tile_store = spec.tile_store

        def run(kind, a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo):
            tile_store(a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo)

        return run
    rows, tile = spec.rows, spec.tile

    def run_then_store(kind, a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo):
        acc = np.empty((rows, 64), np.int32)
        tile(a, a_off, lda, m, b, b_off, kq, acc)
        for r in range(m):
            base = o_off + r * ldo
            for c in range(cols):
                out[base + c] = acc[r, c] + col_term[c0 + c]

    return run_then_store


def microkernel_finish(kind, a, a_off, lda, m, b, b_off, kq, col_term, mult, shift, single, lo, hi, zp, qmin, qmax,
                       c0, cols, out, o_off, ldo):
    """Compute one tile and write it rescaled (float32 ``out``) or requantized (int8 / uint8 ``out``).

    The ``REAL`` / ``QUANT`` epilogue of ``kernels.epilogue`` for outputs without a
    row term whose exact value fits int32 (``col_term`` is int32); see
    ``kernels.gemm.vnni.make_tile_finish`` for the formulas and ``single`` (which only
    that tile reads; jitted code only).
    """
    raise NotImplementedError("microkernel_finish() is only callable from compiled kernels")


@overload(microkernel_finish)
def _select_finish(kind, a, a_off, lda, m, b, b_off, kq, col_term, mult, shift, single, lo, hi, zp, qmin, qmax, c0,
                   cols, out, o_off, ldo):
    if not isinstance(kind, types.StringLiteral):
        return None
    spec = _KINDS[kind.literal_value]
    if spec.tile_finish is not None:
        tile_finish = spec.tile_finish

        def run(kind, a, a_off, lda, m, b, b_off, kq, col_term, mult, shift, single, lo, hi, zp, qmin, qmax, c0, cols,
                out, o_off, ldo):
            tile_finish(a, a_off, lda, m, b, b_off, kq, col_term, mult, shift, single, lo, hi, zp, qmin, qmax, c0,
                        cols, out, o_off, ldo)

        return run
    rows, tile = spec.rows, spec.tile
    quantize = out.dtype != types.float32

    def run_then_finish(kind, a, a_off, lda, m, b, b_off, kq, col_term, mult, shift, single, lo, hi, zp, qmin, qmax,
                        c0, cols, out, o_off, ldo):
        acc = np.empty((rows, 64), np.int32)
        tile(a, a_off, lda, m, b, b_off, kq, acc)
        for r in range(m):
            base = o_off + r * ldo
            for c in range(cols):
                t = np.float64(acc[r, c] + col_term[c0 + c]) * mult[c0 + c] + shift[c0 + c]
                t = t if t > lo else lo
                t = t if t < hi else hi
                if quantize:
                    q = np.rint(t + zp)
                    q = q if q > qmin else qmin
                    out[base + c] = q if q < qmax else qmax
                else:
                    out[base + c] = t

    return run_then_finish
