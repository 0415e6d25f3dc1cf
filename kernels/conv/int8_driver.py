"""The int8 convolution drivers: the GEMM micro-kernels over output pixels, through im2col, indirection or none.

A call covers output pixels (rows) ``i0..i1`` and all ``n`` output channels of one
group.

*Indirect* (AVX-512 VNNI, channels per group a multiple of 4): the micro-kernel
reads each output pixel's taps straight from the NHWC input through an
indirection table (``kernels.gemm.vnni``'s ``indirect`` source; built once per
geometry by :func:`indirection`), so nothing is copied; taps in the border read a
row of zero-point bytes. Images of 1..3 channels come widened to 4 with their rows
padded as well (:func:`widen_padded`): a kernel row's taps are then contiguous, and
each is read as one run of ``KW * 4`` bytes (:func:`runs_indirection`), not ``KW``
runs of one k group (a 7x7 stem: twice as fast). Its tiles are 6 pixels x 64
channels, or 12 x 32 for groups of 32 or fewer output channels (``INDIRECT_TILES``); a last panel of at most
half a tile's channels runs a tile half as wide. When the packed weights fit in L1
(``L1_WEIGHTS``) each tile of pixels runs every panel before the next, so output rows
are written whole and once (layers of few input channels are bound by that); larger
weights run one panel over all the rows at a time.

*im2col* (every other case): rows are taken ``block`` at a time: their im2col rows (``kernels.conv.geometry.im2col``,
the border filled with the activation zero point) are written to a buffer that
stays in L2, and every weight panel runs over that buffer in micro-kernel tiles
(``kernels.gemm.microkernels``), each finished by ``kernels.epilogue.finish_tile``
(or stored straight from the registers for int32 output) while it is in L1. Only
``block`` rows of the im2col matrix ever exist, and threads take disjoint row
ranges, so none repeats another's im2col.

*1x1* (AVX-512 VNNI, stride 1, no padding, one group, channels a multiple of 4, an epilogue finished in the
registers: int32 or integer codes): a plain GEMM whose rows are every image's pixels, read in place
(``kernels.gemm.vnni``'s "rows" source), in the indirect kernel's tile shapes, with tiles of half and a quarter
the width for the last channels (144 = 2 x 64 + 16 wastes no products). Quantized codes leave the registers
packed, a row of 64 in one store (:func:`make_tile_codes`); with few input channels (MobileNet's expand and
project layers, K = 16..96) that epilogue costs as much as the products.

The raw sums are those of the int8 GEMM: unsigned activation bytes times signed
weight bytes, corrected by the zero-point terms of ``kernels.epilogue``. ``K`` is
at most ``kernels.gemm.driver.K_CHUNK`` (the caller checks), so int32 sums cannot wrap.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from kernels._jit import kernel
from kernels.conv.geometry import im2col
from kernels.conv.layout import BLOCKS, _transpose
from kernels.epilogue import INTEGER, MODES, QUANT, finish_tile
from kernels.gemm import vnni
from kernels.gemm.llvm_ir import (F32, F64, I1, I8, I16, I32, I64, array_ptr, declare, is_array, load_vector, low_bits,
                                  masked, prefetch, splat)
from kernels.gemm.microkernels import (NARROW_ROWS, NARROW_VECTORS, TILES, microkernel, microkernel_finish,
                                       microkernel_store)
from kernels.pack.panels import KGROUP, PANEL

BLOCK_BYTES = 96 * 1024  # im2col rows per block: a third of L2 at most, the rest for weights
L1_WEIGHTS = 24 * 1024  # packed weights up to this size run tile by tile of rows (indirect driver)
PREFETCH_TILES = 8  # ... and prefetch for writing the output rows of the tile this many tiles ahead
CHAINS = 4  # independent running maxima of the distances to a tie in one tile (1x1 driver)


def variant(module: str, name: str, body: Callable):
    """``body`` as the kernel ``name`` of ``module``: a module-level function that Numba's disk cache finds in every
    process.

    A driver made per variant (a closure over its constants and the intrinsics made for them) cannot be cached
    itself: Numba keys a closure's code by its pickled closure values, and an intrinsic pickles differently in each
    process, so every process would compile it again and write new cache files. The kernel made here is a
    two-line function of ``module``'s own file, with no closure, that calls ``body`` (compiled with it, so only
    when the kernel misses the cache). ``name`` must be unique in the module: it names the cache files too.
    """
    params = ", ".join(inspect.signature(body).parameters)
    namespace = {"__name__": module, "_body": numba.njit(nogil=True)(body)}
    source = f"def {name}({params}):\n    return _body({params})\n"
    exec(compile(source, sys.modules[module].__file__, "exec"), namespace)
    function = namespace[name]
    function.__doc__ = body.__doc__
    return kernel(function)


def slug(kind: str) -> str:
    """A kernel kind (``"avx512-vnni-indirect"``) as part of a Python name."""
    return kind.replace("-", "_")


def as_units(a):
    """``a`` (C-contiguous, items of 1 or 4 bytes) flat as uint8 or uint32 units: what the block transposes move."""
    raise NotImplementedError("as_units() is only callable from compiled kernels")


@overload(as_units)
def _as_units(a):
    unit = {1: np.uint8, 4: np.uint32}[a.dtype.bitwidth // 8]
    return lambda a: a.reshape(-1).view(unit)


def transpose_panels(rows: int, cols: int, itemsize: int) -> int:
    """The ``panels`` argument of :func:`transpose_images` (as ``kernels.conv.layout`` splits its work)."""
    spec = BLOCKS[itemsize]
    return -(-cols // spec.panel) if rows >= spec.side and cols >= spec.side else 1


@kernel
def transpose_images(src, dst, rows, cols, panels):
    """``dst[n, j, i] = src[n, i, j]``: ``src`` as ``[N, rows, cols]``, ``dst`` as ``[N, cols, rows]`` (C-contiguous,
    of one dtype of 1 or 4 bytes; ``panels`` from :func:`transpose_panels`). NCHW <-> NHWC inside an entry."""
    if rows == 1 or cols == 1:  # both orders are the same
        dst.reshape(-1)[:] = src.reshape(-1)
        return
    _transpose(as_units(src), as_units(dst), rows, cols, panels, 0, src.size // (rows * cols) * panels)


def nhwc_entry(driver: Callable) -> Callable:
    """The body of an entry running NHWC driver ``driver(x, *args, out)`` (out ``[N OH OW, O]``) on all of a
    convolution, in either layout (made a kernel by :func:`nhwc_entry_kernel`)::

        entry(x, nchw, t, rows, panels_in, panels_out, args, out)

    NHWC (``nchw`` false): ``x [N, H, W, C]``, ``out [N, OH, OW, O]`` or ``[N OH OW, O]``; ``t``, ``rows`` unused.
    NCHW: ``x [N, C, H, W]`` goes through ``t`` (``[N, H, W, C]`` of its dtype), the result through ``rows``
    (``[N OH OW, O]`` of the output dtype) into ``out [N, O, OH, OW]``; empty scratch is allocated here.
    ``panels_*`` are the :func:`transpose_panels` of the two copies.
    """
    def entry(x, nchw, t, rows, panels_in, panels_out, args, out):
        if not nchw:
            driver(x, *args, out.reshape((-1, out.shape[-1])))
            return
        n, c, h, w = x.shape
        o = out.shape[1]
        if t.size == 0:
            t = np.empty((n, h, w, c), x.dtype)
        if rows.size == 0:
            rows = np.empty((out.size // o, o), out.dtype)
        transpose_images(x, t, c, h * w, panels_in)
        driver(t, *args, rows)
        transpose_images(rows, out, out.size // (n * o), o, panels_out)

    return entry


@functools.cache
def nhwc_entry_kernel(driver: Callable) -> Callable:
    """The kernel of :func:`nhwc_entry` for ``driver`` (a kernel of :func:`variant`), beside it in its module."""
    return variant(driver.py_func.__module__, f"{driver.py_func.__name__}_entry", nhwc_entry(driver))


def nhwc_entry_args(nchw: bool, x_shape: tuple, out_shape: tuple, x_dtype: np.dtype, out_dtype: np.dtype,
                    scratch: bool) -> tuple:
    """``(nchw, t, rows, panels_in, panels_out)`` of an :func:`nhwc_entry` call for NCHW or NHWC arrays of these
    shapes; the scratch allocated when ``scratch`` (an entry's own), else empty (allocated by each call)."""
    scratch = scratch and nchw
    n, c, h, w = x_shape if nchw else (0, 0, 0, 0)
    o, pixels = (out_shape[1], out_shape[2] * out_shape[3]) if nchw else (0, 0)
    # typed like the arrays allocated in their place when empty
    t = np.empty((n, h, w, c) if scratch else (0, 0, 0, 0), x_dtype)
    rows = np.empty((n * pixels, o) if scratch else (0, 0), out_dtype)
    return (nchw, t, rows, transpose_panels(c, h * w, np.dtype(x_dtype).itemsize),
            transpose_panels(pixels, o, np.dtype(out_dtype).itemsize))


def block_rows(lda: int, rows: int) -> int:
    """Rows per im2col block: about ``BLOCK_BYTES`` of them, a whole number of micro-tiles."""
    return max(rows, BLOCK_BYTES // lda // rows * rows)


def _make_driver(kind: str, mode: int):
    rows, width = TILES[kind].rows, TILES[kind].width

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
DRIVERS = {(kind, mode): variant(__name__, f"conv_tiles_{slug(kind)}_{mode}", _make_driver(kind, mode))
           for kind in TILES for mode in MODES}


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
def runs_indirection(window, batch, row_pixels, channels):
    """The indirection table of a convolution whose taps along a row are contiguous: one run per kernel row.

    The input is NHWC with ``channels`` per pixel and its rows padded to ``row_pixels`` pixels, the left border
    included (see :func:`widen_padded`), and the dilation along x is 1: the ``KW`` taps of kernel row ``ky`` for
    output pixel ``m = (n * OH + oy) * OW + ox`` are then the ``KW * channels`` bytes at
    ``table[m * KH + ky] = ((n * H + iy) * row_pixels + ox * SW) * channels``, or -1 where row ``iy`` lies in
    the border (``iy`` as in ``kernels.conv.geometry.im2col``).
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    table = np.empty(batch * oh * ow * kh, np.int64)
    for m in range(batch * oh * ow):
        n = m // (oh * ow)
        oy = (m // ow) % oh
        ox = m % ow
        for ky in range(kh):
            iy = oy * sh + ky * dh - pt
            table[m * kh + ky] = ((n * h + iy) * row_pixels + ox * sw) * channels if 0 <= iy < h else -1
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
def prefetch_rows(out_bytes, first, count, row_bytes):
    """Prefetch for writing the cache lines of rows ``first .. first + count`` of ``row_bytes`` bytes each (of
    the flat byte view ``out_bytes``), as far as they exist."""
    start = first * row_bytes
    for line in range(start - start % 64, min(start + count * row_bytes, out_bytes.size), 64):
        prefetch_write(out_bytes, line)


@kernel
def widen_channels(x, fill, out):
    """``out[p, :C] = x[p]`` and ``out[p, C:] = fill`` per pixel ``p`` (``x`` [P, C], ``out`` [P, C'], C' >= C).

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


@kernel
def widen_padded(x, fill, left, out):
    """``out[r, left + p, :C] = x[r, p]``, every other byte of ``out`` ``fill`` (``x`` [R, W, C], ``out`` [R, W', C'],
    ``W' >= left + W``, ``C' >= C``): rows of pixels with their channels padded to C' and ``left`` and
    ``W' - left - W`` border pixels of ``fill`` (the activation zero point) around them.

    As :func:`widen_channels` (three channels spelled out), for :func:`runs_indirection`'s rows.
    """
    c, wide = x.shape[2], out.shape[2]
    for r in range(x.shape[0]):
        row = out[r]
        for p in range(left):
            row[p, :] = fill
        for p in range(left + x.shape[1], out.shape[1]):
            row[p, :] = fill
        widen_channels(x[r], fill, row[left : left + x.shape[1]])


@kernel
def activation_codes(x, widen, shape, fill, left, wide, flip, flipped):
    """The activations as the drivers read them: flat uint8 NHWC codes (int8 ones plus 128).

    x       : uint8 or int8 [N, H, W, C] C-contiguous, NHWC
    widen   : 0: none; 1: channels padded to C' with ``fill`` (:func:`widen_channels`); 2: rows padded too, with
              ``left`` border pixels (:func:`widen_padded`), into ``wide`` of ``shape`` ``[N, H, W', C']``
              (x's dtype; allocated here when empty)
    flip    : whether x is int8: then ``flipped`` (uint8) gets its codes plus 128 (allocated here when empty)
    Returns ``x``, ``wide`` or ``flipped``, flat, as uint8.
    """
    if widen:
        if wide.size == 0:
            wide = np.empty(shape, x.dtype)
        n, h, w, c = x.shape
        if widen == 2:
            widen_padded(x.reshape((n * h, w, c)), fill, left, wide.reshape((n * h, shape[2], shape[3])))
        else:
            widen_channels(x.reshape((n * h * w, c)), fill, wide.reshape((n * h * w, shape[3])))
        src = wide.reshape(-1).view(np.uint8)
    else:
        src = x.reshape(-1).view(np.uint8)
    if not flip:
        return src
    if flipped.size == 0:
        flipped = np.empty(src.size, np.uint8)
    for i in range(src.size):
        flipped[i] = src[i] ^ 0x80
    return flipped


IM2COL, INDIRECT, ROWS = 0, 1, 2  # the driver families: DRIVERS, INDIRECT_DRIVERS, POINTWISE_DRIVERS


def groups_entry(driver: Callable, family: int) -> Callable:
    """The body of an entry running ``driver`` of ``family`` over all groups and rows of a convolution, in either
    layout (made a kernel by :func:`groups_entry_kernel`; ``kernels.conv.int8.ConvPlan`` makes the arguments)::

        entry(x, nchw, t, panels_in, codes, geometry, b, kq, col_term, col_term32, w_zp, row_sums, flags, mult,
              shift, single, lo, hi, zp, qmin, qmax, rows, panels_out, out)

    x, nchw, t, panels_in : as :func:`nhwc_entry` (``x`` NCHW when ``nchw``, through ``t``)
    codes   : ``(widen, shape, fill, left, wide, flip, flipped)`` of :func:`activation_codes`
    geometry: IM2COL ``(window, cg, pad, lda, block)``; INDIRECT ``(pad, table, taps, cq, cg)``; ROWS ``(lda,)``
    b       : int8 [G, *], each group's packed weights; kq their k groups
    col_term, w_zp : int64 [G, O / G]; col_term32 int32 [G, *]; mult, shift float64 [G, *]; single float32 [G, *]
    flags   : int64 [G, 2], each group's ``row_term`` and ``fused``; row_sums int64 [N OH OW] (allocated when empty)
    rows, panels_out, out : as :func:`nhwc_entry`'s (``out`` NHWC ``[N, OH, OW, O]`` or NCHW)
    """
    def entry(x, nchw, t, panels_in, codes, geometry, b, kq, col_term, col_term32, w_zp, row_sums, flags, mult,
              shift, single, lo, hi, zp, qmin, qmax, rows, panels_out, out):
        widen, shape, fill, left, wide, flip, flipped = codes
        if nchw:
            n, c, h, w = x.shape
            if t.size == 0:
                t = np.empty((n, h, w, c), x.dtype)
            transpose_images(x, t, c, h * w, panels_in)
            flat = activation_codes(t, widen, shape, fill, left, wide, flip, flipped)
            o = out.shape[1]
        else:
            n, h, w, c = x.shape
            flat = activation_codes(x, widen, shape, fill, left, wide, flip, flipped)
            o = out.shape[-1]
        m = out.size // o
        if not nchw:
            out2d = out.reshape((m, o))
        elif rows.size == 0:
            out2d = np.empty((m, o), out.dtype)
        else:
            out2d = rows
        if row_sums.size == 0:
            row_sums = np.empty(m, np.int64)
        og = o // b.shape[0]
        for g in range(b.shape[0]):
            row_term, fused = flags[g, 0] != 0, flags[g, 1] != 0
            if family == IM2COL:  # a compile-time constant
                window, cg, pad, lda, block = geometry
                driver(flat.reshape((n, h, w, c)), window, g * cg, cg, pad, lda, block, b[g], kq, og, 0, m,
                       col_term[g], col_term32[g], w_zp[g], row_sums, row_term, fused, mult[g], shift[g], single[g],
                       lo, hi, zp, qmin, qmax, out2d, g * og)
            elif family == INDIRECT:
                pad, table, taps, cq, cg = geometry
                driver(flat[g * cg :], pad, table, taps, cq, b[g], og, 0, m, col_term[g], col_term32[g], w_zp[g],
                       row_sums, row_term, fused, mult[g], shift[g], single[g], lo, hi, zp, qmin, qmax, out2d, g * og)
            else:
                driver(flat, geometry[0], b[g], kq, og, 0, m, col_term32[g], mult[g], single[g], zp, qmin, qmax,
                       out2d)
        if nchw:
            transpose_images(out2d, out, out.size // (n * o), o, panels_out)

    return entry


@functools.cache
def groups_entry_kernel(driver: Callable, family: int) -> Callable:
    """The kernel of :func:`groups_entry` for ``driver`` (a kernel of :func:`variant`) of ``family``."""
    return variant(__name__, f"{driver.py_func.__name__}_entry", groups_entry(driver, family))


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
                prefetch_rows(out_bytes, start + PREFETCH_TILES * rows, rows, ldo * item)
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
INDIRECT_DRIVERS = {(kind, mode): variant(__name__, f"indirect_tiles_{slug(kind)}_{mode}",
                                           _make_indirect_driver(rows, vectors, mode))
                    for kind, (rows, vectors) in INDIRECT_TILES.items() for mode in MODES}


def _packed_bytes(builder, codes: list[ir.Value], signed: bool) -> ir.Value:
    """Up to 4 vectors of 16 int32 codes as 64 bytes, saturated to int8 / uint8: vector j at bytes 16 j ...

    Two word packs and one byte pack (``vpackssdw``, ``vpackuswb`` / ``vpacksswb``) leave
    dword ``4 L + j`` holding lanes ``4 L .. 4 L + 3`` of vector j; one ``vpermd`` puts them
    in order. Three shuffles and one store for 64 codes, instead of four ``vpmovdb``.
    """
    words = ir.VectorType(I16, 32)
    to_words = declare(builder, "llvm.x86.avx512.packssdw.512", ir.FunctionType(words, [vnni.V16I32] * 2))
    to_bytes = declare(builder, f"llvm.x86.avx512.pack{'ss' if signed else 'us'}wb.512",
                       ir.FunctionType(vnni.V64I8, [words] * 2))
    undef = ir.Constant(vnni.V16I32, ir.Undefined)
    v = codes + [undef] * (4 - len(codes))
    low = builder.call(to_words, v[:2])
    high = builder.call(to_words, v[2:]) if len(codes) > 2 else low
    dwords = builder.bitcast(builder.call(to_bytes, [low, high]), vnni.V16I32)
    order = ir.Constant(vnni.V16I32, [4 * (p % 4) + p // 4 for p in range(16)])  # dword 4 j + L <- 4 L + j
    return builder.bitcast(builder.shuffle_vector(dwords, undef, order), vnni.V64I8)


def _unclamped_codes(builder, sums: list[ir.Value], single: Callable, exact: Callable[[int], ir.Value], qlo: ir.Value,
                     qhi: ir.Value) -> list[ir.Value]:
    """Int32 codes of each vector of 16 sums, rounded in float32 where that is exact and not clamped.

    As ``kernels.gemm.vnni.single_codes``, but the range is tested on the integer codes instead of
    clamping ``b`` in float (the caller clamps the codes as packed bytes, 64 at a time): a code is
    ``c = rint(b)``, ``b = fma(float32(y), m32, c32)`` (``single(i)`` gives ``(m32, c32, limit)``).
    Only lanes with ``c`` in ``[qlo, qhi]`` (splat int32) must be exact, and they are when
    ``|b - rint(b)| < limit``: there ``|b| <= 256``, the reach ``kernels.epilogue.single_precision_codes``
    assumes for clamped use. A lane with ``c < qlo`` has ``b < qlo - 1/2``, so its exact value is below
    ``qlo + 1/2`` (within ``2**-22`` of ``b``, relative, where ``|b|`` is small, and of its sign where it
    is not): its float64 code clamps to ``qlo`` too; likewise above ``qhi``. So only lanes in range take
    part in the test (a masked ``vrangeps``, in ``CHAINS`` independent running maxima); if one fails,
    every code is ``exact(i)`` (float64, clamped). The caller clamps the codes it gets to ``[qlo, qhi]``.
    """
    sig = [vnni.V16F32, I32, vnni.V16F32, I16, I32]
    fma = declare(builder, "llvm.fma.v16f32", ir.FunctionType(vnni.V16F32, [vnni.V16F32] * 3))
    reduce = declare(builder, "llvm.x86.avx512.mask.reduce.ps.512", ir.FunctionType(vnni.V16F32, sig))
    larger = declare(builder, "llvm.x86.avx512.mask.range.ps.512", ir.FunctionType(vnni.V16F32, [vnni.V16F32] + sig))
    nearest = declare(builder, "llvm.x86.avx512.mask.cvtps2dq.512",
                      ir.FunctionType(vnni.V16I32, [vnni.V16F32, vnni.V16I32, I16, I32]))
    zero, every, current = ir.Constant(vnni.V16F32, None), ir.Constant(I16, -1), ir.Constant(I32, 4)
    span = builder.sub(qhi, qlo)
    codes, runs = [], []  # runs: [limit, chains of the largest |b - rint(b)| in range] of vectors sharing one limit
    for i, y in enumerate(sums):
        m32, c32, limit = single(i)
        b = builder.call(fma, [builder.sitofp(y, vnni.V16F32), m32, c32])
        off = builder.call(reduce, [b, ir.Constant(I32, 8), zero, every, current])  # imm 8: to nearest
        code = builder.call(nearest, [b, ir.Constant(vnni.V16I32, None), every, current])
        codes.append(code)
        inside = builder.bitcast(builder.icmp_unsigned("<=", builder.sub(code, qlo), span), I16)
        if not runs or runs[-1][0] is not limit:
            runs.append([limit, [zero] * CHAINS, 0])
        run = runs[-1]
        k = run[2] % CHAINS  # independent chains: one of vrangeps' latency per vector would bind
        run[1][k] = builder.call(larger, [run[1][k], off, ir.Constant(I32, 0b1011), run[1][k], inside, current])
        run[2] += 1
    near = ir.Constant(I16, 0)
    for limit, chains, _ in runs:
        for worst in chains:
            near = builder.or_(near, builder.bitcast(builder.fcmp_ordered(">=", worst, limit), I16))
    fast = builder.block
    with builder.if_then(builder.icmp_unsigned("!=", near, ir.Constant(I16, 0)), likely=False):
        redone = [exact(i) for i in range(len(sums))]
        slow = builder.block
    merged = []
    for code, again in zip(codes, redone):
        phi = builder.phi(vnni.V16I32)
        phi.add_incoming(code, fast)
        phi.add_incoming(again, slow)
        merged.append(phi)
    return merged


def make_tile_codes(rows: int, vectors: int, full: bool = False):
    """A VNNI tile of activation rows finishing int8 / uint8 output with integer codes, a row in one masked store.

    ``tile_codes(a, a_off, lda, m, b, b_off, kq, col_term, mult, single, zp, qmin, qmax, c0, cols, out, o_off, ldo)``
    takes the arguments of ``kernels.gemm.vnni``'s "rows" source, then those of its
    ``make_tile_finish`` but ``shift``, ``lo`` and ``hi``, and stores what that does for an epilogue with
    integer ``qmin``, ``qmax`` (``kernels.epilogue.with_codes``: no shift, codes that fit int32)::

        out[o_off + r ldo + c] = clip(rint((sums[r, c] + col_term[j]) mult[j] + zp), qmin, qmax),  j = c0 + c

    for rows ``r < m`` and ``c < cols <= 16 vectors``, rounded in float32 where that is
    exact (:func:`_unclamped_codes`, with ``single`` the float32 ``kernels.epilogue.single_table``),
    else in float64. Codes leave the registers packed (:func:`_packed_bytes`, saturating), then are
    clamped to ``[qmin, qmax]`` as bytes. With ``full`` the caller promises that ``[qmin, qmax]`` is
    the output type's whole range: the saturation is then the clamp, and the bounds are constants.
    """
    def accepts(tys) -> bool:
        out = tys[8]
        return (is_array(tys[0], types.int32, 1) and is_array(tys[1], types.float64, 1)
                and is_array(tys[2], types.float32, 1) and tys[3] == types.float64
                and tys[4] == types.int64 and tys[5] == types.int64 and is_array(out, out.dtype, 1)
                and out.dtype in (types.uint8, types.int8))

    accepts.arity = 11

    def finish(context, builder, tys, args, results, m):
        col_term, mult, single, zp, qmin, qmax, c0, cols, out, o_off, ldo = args
        signed = tys[8].dtype == types.int8
        if full:
            qmin, qmax = (ir.Constant(I64, v) for v in ((-128, 127) if signed else (0, 255)))
        v8f64 = ir.VectorType(F64, 8)
        qlo, qhi = (splat(builder, builder.trunc(v, I32), vnni.V16I32) for v in (qmin, qmax))
        terms = builder.gep(array_ptr(context, builder, tys[0], col_term, I32), [c0])
        factors = builder.gep(array_ptr(context, builder, tys[1], mult, F64), [c0])
        table = builder.gep(array_ptr(context, builder, tys[2], single, F32), [builder.mul(c0, ir.Constant(I64, 3))])
        zp = splat(builder, zp, v8f64)
        f32 = [tuple(load_vector(builder, table, 48 * j + 16 * i, vnni.V16F32) for i in range(3))
               for j in range(vectors)]
        order = [(r, j) for j in range(vectors) for r in range(rows)]  # a column's factors down the rows
        sums = [builder.add(results[r * vectors + j], load_vector(builder, terms, 16 * j, vnni.V16I32))
                for r, j in order]

        def exact(i: int) -> ir.Value:
            j = order[i][1]
            code = vnni.rounded_codes(builder, sums[i], lambda h: (load_vector(builder, factors, 16 * j + 8 * h,
                                                                                v8f64), None), zp, shifted=False)
            code = builder.select(builder.icmp_signed("<", code, qlo), qlo, code)
            return builder.select(builder.icmp_signed(">", code, qhi), qhi, code)

        codes = dict(zip(order, _unclamped_codes(builder, sums, lambda i: f32[order[i][1]], exact, qlo, qhi)))
        out_ptr = array_ptr(context, builder, tys[8], out, I8)
        store = masked(builder, "store", vnni.V64I8)
        width = builder.select(builder.icmp_signed("<", cols, ir.Constant(I64, 16 * vectors)), cols,
                               ir.Constant(I64, 16 * vectors))
        lanes = low_bits(builder, width)
        low, high = (splat(builder, builder.trunc(v, I8), vnni.V64I8) for v in (qmin, qmax))
        compare = builder.icmp_signed if signed else builder.icmp_unsigned
        for r in range(rows):
            packed = _packed_bytes(builder, [codes[r, j] for j in range(vectors)], signed)
            if not full:
                packed = builder.select(compare("<", packed, low), low, packed)
                packed = builder.select(compare(">", packed, high), high, packed)
            bits = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), lanes, ir.Constant(I64, 0))
            row = builder.gep(out_ptr, [builder.add(o_off, builder.mul(ir.Constant(I64, r), ldo))])
            builder.call(store, [packed, builder.bitcast(row, vnni.V64I8.as_pointer()), ir.Constant(I32, 1),
                                 builder.bitcast(bits, ir.VectorType(I1, 64))])

    return vnni._tile_intrinsic(vnni.SOURCES["rows"], rows, 0, vectors, accepts, finish)


def _make_pointwise_driver(rows: int, vectors: int, mode: int, full: bool):
    # the tile and its narrower tails: a last panel of 16 (144 = 2 x 64 + 16) or 32 channels runs no wasted products
    widths = [vectors >> h for h in range(vectors.bit_length())]
    tiles = [vnni.make_tile_store(rows, 0, "rows", v) if mode == INTEGER else make_tile_codes(rows, v, full)
             for v in widths]
    tile, half, quarter = (tiles + tiles[-1:] * 2)[:3]
    width = 16 * vectors

    def pointwise_tiles(x, lda, b, kq, n, i0, i1, col_term32, mult, single, zp, qmin, qmax, out):
        """Rows ``i0..i1`` of a 1x1 stride-1 convolution of NHWC pixels: a plain GEMM, the pixels its rows.

        x     : uint8 flat ``[M, lda]``, the NHWC input (``lda`` = channels, a multiple of 4)
        b, kq : the weights in the panel layout of ``kernels.pack.panels``; n output channels
        out   : ``[M, n]`` C-contiguous, int32 (``INTEGER``: ``out = sums + col_term32``) or uint8 / int8
                (``QUANT`` with integer codes, see :func:`make_tile_codes`)
        """
        flat_out = out.reshape(-1)
        out_bytes = flat_out.view(np.uint8)
        # as the indirect driver: each tile of pixels runs every panel while the weights fit L1, its output
        # lines prefetched a few tiles ahead
        span = rows if -(-n // PANEL) * kq * PANEL * KGROUP <= L1_WEIGHTS else i1 - i0
        for start in range(i0, i1, span):
            stop = min(start + span, i1)
            if span == rows:
                prefetch_rows(out_bytes, start + PREFETCH_TILES * rows, rows, n * flat_out.itemsize)
            for col0 in range(0, n, width):
                b_panel = col0 // PANEL * kq * PANEL * KGROUP + col0 % PANEL * KGROUP
                cols = min(width, n - col0)
                for i in range(start, stop, rows):
                    m = min(rows, stop - i)
                    o_off = i * n + col0
                    if mode == INTEGER:  # a compile-time constant: each driver types one of the two
                        if 4 * cols <= width:
                            quarter(x, i * lda, lda, m, b, b_panel, kq, col_term32, col0, cols, flat_out, o_off, n)
                        elif 2 * cols <= width:
                            half(x, i * lda, lda, m, b, b_panel, kq, col_term32, col0, cols, flat_out, o_off, n)
                        else:
                            tile(x, i * lda, lda, m, b, b_panel, kq, col_term32, col0, cols, flat_out, o_off, n)
                    elif 4 * cols <= width:
                        quarter(x, i * lda, lda, m, b, b_panel, kq, col_term32, mult, single, zp, qmin, qmax, col0,
                                cols, flat_out, o_off, n)
                    elif 2 * cols <= width:
                        half(x, i * lda, lda, m, b, b_panel, kq, col_term32, mult, single, zp, qmin, qmax, col0,
                             cols, flat_out, o_off, n)
                    else:
                        tile(x, i * lda, lda, m, b, b_panel, kq, col_term32, mult, single, zp, qmin, qmax, col0,
                             cols, flat_out, o_off, n)

    return pointwise_tiles


# 1x1 stride-1 convolutions of NHWC pixels (kernels.conv.int8.ConvPlan takes them when the indirect kernel applies):
# the indirect tiles' shapes, reading rows straight from the input; INTEGER and QUANT (integer codes) epilogues only,
# the latter also for codes clamped to the whole output range only ("full", the usual case: no activation clip)
POINTWISE_DRIVERS = {(kind, mode, full): variant(__name__, f"pointwise_tiles_{slug(kind)}_{mode}{'_full' * full}",
                                                 _make_pointwise_driver(rows, vectors, mode, full))
                     for kind, (rows, vectors) in INDIRECT_TILES.items()
                     for mode, full in ((INTEGER, False), (QUANT, False), (QUANT, True))}
