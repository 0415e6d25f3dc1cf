"""The int8 convolution drivers: the GEMM micro-kernels over output pixels, without or with im2col.

A call covers output pixels (rows) ``i0..i1`` and all ``n`` output channels of one
group.

*Indirect* (AVX-512 VNNI, channels per group a multiple of 4): the micro-kernel
reads each output pixel's taps straight from the NHWC input through an
indirection table (``kernels.gemm.vnni``'s ``indirect`` source; built once per
geometry by :func:`indirection`), so nothing is copied; taps in the border read a
row of zero-point bytes. Its tiles are 6 pixels x 64 channels, or 12 x 32 for
groups of 32 or fewer output channels (``INDIRECT_TILES``); a last panel of at most
half a tile's channels runs a tile half as wide. When the packed weights fit in L1
(``L1_WEIGHTS``) each tile of pixels runs every panel before the next, so output rows
are written whole and once (1x1 layers of few input channels are bound by that); larger
weights run one panel over all the rows at a time.

*im2col* (every other case): rows are taken ``block`` at a time: their im2col rows (``kernels.conv.geometry.im2col``,
the border filled with the activation zero point) are written to a buffer that
stays in L2, and every weight panel runs over that buffer in micro-kernel tiles
(``kernels.gemm.microkernels``), each finished by ``kernels.epilogue.finish_tile``
(or stored straight from the registers for int32 output) while it is in L1. Only
``block`` rows of the im2col matrix ever exist, and threads take disjoint row
ranges, so none repeats another's im2col.

The raw sums are those of the int8 GEMM: unsigned activation bytes times signed
weight bytes, corrected by the zero-point terms of ``kernels.epilogue``. ``K`` is
at most ``kernels.gemm.driver.K_CHUNK`` (the caller checks), so int32 sums cannot wrap.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from kernels._jit import kernel
from kernels.conv.geometry import im2col
from kernels.epilogue import INTEGER, MODES, finish_tile
from kernels.gemm import vnni
from kernels.gemm.llvm_ir import I8, array_ptr, prefetch
from kernels.gemm.microkernels import (NARROW_ROWS, NARROW_VECTORS, TILES, microkernel, microkernel_finish,
                                       microkernel_store)
from kernels.pack.panels import KGROUP, PANEL

BLOCK_BYTES = 96 * 1024  # im2col rows per block: a third of L2 at most, the rest for weights
L1_WEIGHTS = 24 * 1024  # packed weights up to this size run tile by tile of rows (indirect driver)
PREFETCH_TILES = 8  # ... and prefetch for writing the output rows of the tile this many tiles ahead


def block_rows(lda: int, rows: int) -> int:
    """Rows per im2col block: about ``BLOCK_BYTES`` of them, a whole number of micro-tiles."""
    return max(rows, BLOCK_BYTES // lda // rows * rows)


def _make_driver(kind: str, mode: int):
    rows, width = TILES[kind].rows, TILES[kind].width

    @kernel
    def conv_tiles(x, window, c0, cg, pad, lda, block, b, kq, n, i0, i1, col_term, col_term32, w_zp, row_sums,
                   row_term, fused, mult, shift, single, lo, hi, zp, qmin, qmax, out, n0):
        """Output rows ``i0..i1``, channels ``n0..n0 + n`` of ``out`` with micro-kernel ``kind``, epilogue ``mode``.

        x     : uint8 NHWC [N, H, W, C]; the group reads channels ``c0..c0 + cg``
        window: ``ConvGeometry.window()``; ``pad`` the byte of the padded border
        lda   : im2col row stride, ``KH * KW * cg`` rounded up to a multiple of 4
        b, kq : the group's weights in the panel layout of ``kernels.pack.panels``
        out   : [M, O] C-contiguous; columns ``n0..n0 + n`` belong to this group
        row_sums : int64 [M], filled here for rows i0..i1 when ``row_term``
        Other arguments are those of ``kernels.gemm.driver``'s ``gemm_tiles``, for this group's channels.
        """
        cols = np.zeros((block, lda), np.uint8)  # the padding past K stays zero
        flat_cols = cols.reshape(-1)
        tile = np.empty((rows, PANEL), np.int32)
        view = out[:, n0 : n0 + n]
        flat_out = out.reshape(-1)
        ldo = out.shape[1]
        for start in range(i0, i1, block):
            count = min(block, i1 - start)
            im2col(x, window, c0, cg, pad, start, count, cols)
            if row_term:
                for r in range(count):
                    row_sums[start + r] = np.sum(cols[r].astype(np.int64))
            for col0 in range(0, n, width):  # the micro-kernel's channels, within one panel
                b_panel = col0 // PANEL * kq * PANEL * KGROUP + col0 % PANEL * KGROUP
                chans = min(width, n - col0)
                for r0 in range(0, count, rows):
                    m = min(rows, count - r0)
                    if fused:
                        o_off = (start + r0) * ldo + n0 + col0
                        if mode == INTEGER:  # a compile-time constant: each driver types one of the two
                            microkernel_store(kind, flat_cols, r0 * lda, lda, m, b, b_panel, kq, col_term32, col0,
                                              chans, flat_out, o_off, ldo)
                        else:
                            microkernel_finish(kind, flat_cols, r0 * lda, lda, m, b, b_panel, kq, col_term32, mult,
                                               shift, single, lo, hi, zp, qmin, qmax, col0, chans, flat_out, o_off,
                                               ldo)
                    else:
                        microkernel(kind, flat_cols, r0 * lda, lda, m, b, b_panel, kq, tile)
                        finish_tile(tile, start + r0, m, col0, chans, col_term, w_zp, row_sums, row_term, mult, shift,
                                    lo, hi, zp, qmin, qmax, mode, view)

    return conv_tiles


# One driver per micro-kernel and epilogue mode (compile-time constants), as for the GEMM.
DRIVERS = {(kind, mode): _make_driver(kind, mode) for kind in TILES for mode in MODES}


@kernel
def indirection(window, batch, channels):
    """The indirection table of a convolution over NHWC input with ``channels`` per pixel.

    ``table[m * KH * KW + ky * KW + kx]`` is the offset of ``x[n, iy, ix, 0]`` in the
    flat input for output pixel ``m = (n * OH + oy) * OW + ox`` (``iy``, ``ix`` as in
    ``kernels.conv.geometry.im2col``), or -1 where that tap lies in the border.
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    taps = kh * kw
    table = np.empty(batch * oh * ow * taps, np.int64)
    for m in range(batch * oh * ow):
        n = m // (oh * ow)
        oy = (m // ow) % oh
        ox = m % ow
        for ky in range(kh):
            iy = oy * sh + ky * dh - pt
            for kx in range(kw):
                ix = ox * sw + kx * dw - pl
                inside = 0 <= iy < h and 0 <= ix < w
                table[m * taps + ky * kw + kx] = ((n * h + iy) * w + ix) * channels if inside else -1
    return table


@kernel
def indirect_row_sums(x, pad, table, taps, cg, i0, i1, row_sums):
    """``row_sums[m] = sum`` of the ``taps * cg`` activation bytes output pixel ``m`` reads, for ``m`` in i0..i1."""
    pad_sum = np.int64(0)
    for c in range(cg):
        pad_sum += pad[c]
    for m in range(i0, i1):
        total = np.int64(0)
        for t in range(taps):
            offset = table[m * taps + t]
            if offset < 0:
                total += pad_sum
            else:
                for c in range(cg):
                    total += x[offset + c]
        row_sums[m] = total


@intrinsic
def prefetch_write(typingctx, data, offset):
    """Prefetch for writing the cache line of byte ``offset`` of the 1-D array ``data``; never faults."""
    if not (isinstance(data, types.Array) and data.ndim == 1 and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        base = array_ptr(context, builder, signature.args[0], args[0], I8)
        prefetch(builder, builder.gep(base, [args[1]]), write=True)
        return context.get_dummy_value()

    return types.void(data, offset), codegen


@kernel
def widen_channels(x, fill, out):
    """``out[p, :C] = x[p]`` and ``out[p, C:] = fill`` per pixel ``p`` (``x`` [P, C], ``out`` [P, C'], C' > C).

    An image's channels padded to a whole k group: a strided NumPy copy of 3 bytes a pixel costs more than the
    convolution. Three channels (RGB) are spelled out, which vectorises; a loop over C does not.
    """
    c, wide = x.shape[1], out.shape[1]
    if c == 3 and wide == 4:
        for p in range(x.shape[0]):
            out[p, 0], out[p, 1], out[p, 2], out[p, 3] = x[p, 0], x[p, 1], x[p, 2], fill
        return
    for p in range(x.shape[0]):
        for k in range(c):
            out[p, k] = x[p, k]
        for k in range(c, wide):
            out[p, k] = fill


def _make_indirect_driver(rows: int, vectors: int, mode: int):
    tile = vnni.make_tile(rows, 1024, "indirect", vectors)
    tile_store = vnni.make_tile_store(rows, 1024, "indirect", vectors)
    tile_finish = vnni.make_tile_finish(rows, 1024, "indirect", vectors)
    # a last panel of at most half a tile's channels (96 = 64 + 32, 144 = 2 x 64 + 16) runs a tile half as wide:
    # the same rows and results, half the products
    half_tile = vnni.make_tile(rows, 1024, "indirect", vectors // 2)
    half_store = vnni.make_tile_store(rows, 1024, "indirect", vectors // 2)
    half_finish = vnni.make_tile_finish(rows, 1024, "indirect", vectors // 2)
    width = 16 * vectors

    @kernel
    def indirect_tiles(x, pad, table, taps, cq, b, n, i0, i1, col_term, col_term32, w_zp, row_sums, row_term, fused,
                       mult, shift, single, lo, hi, zp, qmin, qmax, out, n0):
        """Output rows ``i0..i1``, channels ``n0..n0 + n`` of ``out`` through the indirection ``table``.

        x     : uint8, the flat NHWC input starting at this group's first channel
        pad   : uint8 [4 cq], the activation zero point (the border's value)
        table : int64, :func:`indirection` of the convolution; ``taps`` entries per row
        b     : the group's weights in the panel layout, ``taps * cq`` k groups
        Other arguments as for the im2col driver.
        """
        tile_acc = np.empty((rows, PANEL), np.int32)
        view = out[:, n0 : n0 + n]
        flat_out = out.reshape(-1)
        ldo = out.shape[1]
        kq = taps * cq
        if row_term:
            indirect_row_sums(x, pad, table, taps, 4 * cq, i0, i1, row_sums)
        # weights that fit in L1 stay there while each tile of rows runs every panel: its output rows are then
        # written whole, once, and its input read once; larger ones run a panel over all rows at a time
        span = rows if -(-n // PANEL) * kq * PANEL * KGROUP <= L1_WEIGHTS else i1 - i0
        out_bytes = flat_out.view(np.uint8)
        item = flat_out.itemsize
        for start in range(i0, i1, span):
            stop = min(start + span, i1)
            if span == rows:  # the output lines are likely cold: ask for them ahead rather than stall on each
                ahead = (start + PREFETCH_TILES * rows) * ldo * item
                for line in range(ahead - ahead % 64, min(ahead + rows * ldo * item, out_bytes.size), 64):
                    prefetch_write(out_bytes, line)
            for col0 in range(0, n, width):  # the tile's channels, within one panel
                b_panel = col0 // PANEL * kq * PANEL * KGROUP + col0 % PANEL * KGROUP
                cols = min(width, n - col0)
                half = 2 * cols <= width
                for i in range(start, stop, rows):
                    m = min(rows, stop - i)
                    if fused:
                        o_off = i * ldo + n0 + col0
                        if mode == INTEGER:  # a compile-time constant: each driver types one of the two
                            if half:
                                half_store(x, pad, table, i * taps, taps, m, b, b_panel, cq, col_term32, col0, cols,
                                           flat_out, o_off, ldo)
                            else:
                                tile_store(x, pad, table, i * taps, taps, m, b, b_panel, cq, col_term32, col0, cols,
                                           flat_out, o_off, ldo)
                        elif half:
                            half_finish(x, pad, table, i * taps, taps, m, b, b_panel, cq, col_term32, mult, shift,
                                        single, lo, hi, zp, qmin, qmax, col0, cols, flat_out, o_off, ldo)
                        else:
                            tile_finish(x, pad, table, i * taps, taps, m, b, b_panel, cq, col_term32, mult, shift,
                                        single, lo, hi, zp, qmin, qmax, col0, cols, flat_out, o_off, ldo)
                    else:
                        if half:
                            half_tile(x, pad, table, i * taps, taps, m, b, b_panel, cq, tile_acc)
                        else:
                            tile(x, pad, table, i * taps, taps, m, b, b_panel, cq, tile_acc)
                        finish_tile(tile_acc, i, m, col0, cols, col_term, w_zp, row_sums, row_term, mult, shift, lo,
                                    hi, zp, qmin, qmax, mode, view)

    return indirect_tiles


# kind -> (rows, 16-channel vectors) of the tile: the wide one covers 64 channels, the narrow one (for 32 or
# fewer channels per group, see kernels.dispatch) 32 in twice the rows: the same vpdpbusd count per k group.
INDIRECT_TILES = {"avx512-vnni-indirect": (6, vnni.VECTORS),
                  "avx512-vnni-indirect-narrow": (NARROW_ROWS, NARROW_VECTORS)}
# Only compiled when first called, which kernels.dispatch allows on AVX-512 VNNI CPUs only.
INDIRECT_DRIVERS = {(kind, mode): _make_indirect_driver(rows, vectors, mode)
                    for kind, (rows, vectors) in INDIRECT_TILES.items() for mode in MODES}
