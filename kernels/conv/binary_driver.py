"""The binary convolution driver: the lanes tiles read their windows straight from a padded image.

The bit-packed NHWC input is copied once into a zero-bordered image of *slots*
(:func:`padded_slots`: per word, its bytes and byte-pair xors spread for
broadcasting, the layout of ``kernels.gemm.popcount_lanes``); word
``j = (ky KW + kx) CW + q`` of the window of output pixel ``(b, oy, ox)`` is then
the slot at a fixed offset ``offs[j]`` from the window's corner ``corners[pixel]``.
So the tiles gather their activation rows through ``corners`` and ``offs``: an
im2col that copies nothing (per-pixel copies cost as much as the product when
``CW`` is 1). The border slots are 0, i.e. +1.

A call covers output pixels (rows) ``i0..i1`` and all ``n`` output channels,
``block`` pixels at a time (their input rows stay in L2 while every tile of
weight vectors runs over them), writing the ±1 dot products ``k - 2 popcount``
(``k = KH * KW * C``) straight into the int32 output, or into a scratch block
for the other outputs. The block is then finished::

    y = dot + corr[border[pixel], o]         (corr: only pixels whose window leaves the image)
    INTEGER: y
    REAL:    float32(clip(y mult[o] + shift[o], lo, hi))      (kernels.epilogue.finish_tile)
    BITS:    bit o % 64 of out[m, o // 64] = (y < thr[o]), padding bits 0

``corr`` turns the +1 border into another pad value (see :func:`border_corrections`).
"""

from __future__ import annotations

import numpy as np

from kernels._jit import kernel
from kernels.conv.geometry import ConvGeometry
from kernels.conv.int8_driver import slug, variant
from kernels.epilogue import BITS, INTEGER, REAL, finish_tile
from kernels.gemm.popcount_lanes import LANES, LANES_TILES, UNITS_PER_SLOT, lanes_microkernel

MODES = (INTEGER, REAL, BITS)
SLOT_WORDS = UNITS_PER_SLOT // 2  # uint64 words of the padded image per input word
BLOCK_BYTES = 256 * 1024  # padded input rows read by one block of output rows, kept in L2 beside the weights
SCRATCH_BYTES = 256 * 1024  # the int32 dot products of a block, for the REAL and BITS outputs
SPREAD = np.uint32(0x01010101)  # a byte times this fills the 4 bytes of a uint32


def block_pixels(geo: ConvGeometry, padded_w: int, tap_words: int, out_channels: int, mode: int) -> int:
    """Output pixels per block: whole output rows whose input rows fit ``BLOCK_BYTES`` (and scratch, if any)."""
    rows = BLOCK_BYTES // (geo.stride_h * padded_w * tap_words * 8 * SLOT_WORDS)
    if mode != INTEGER:
        rows = min(rows, SCRATCH_BYTES // (4 * out_channels * geo.out_w))
    return max(1, rows) * geo.out_w


@kernel
def padded_slots(x, shape, top, left):
    """``x`` (uint64 [N, H, W, CW]) in a new zero-bordered image of ``shape`` ``(N, HP, WP, CW, SLOT_WORDS)``.

    Pixel ``(b, y, x)`` goes to ``(b, top + y, left + x)``; its word ``v`` becomes a slot
    of 8 uint32 units, for each byte pair ``p``: ``b[2p] * 0x01010101`` and
    ``(b[2p] ^ b[2p + 1]) * 0x01010101`` (``b[i]`` = byte ``i`` of ``v``). Every other
    slot is 0 (a +1 border).
    """
    n, h, w, cw = x.shape
    out = np.zeros(shape, np.uint64)
    for b in range(n):
        for y in range(h):
            octets = x[b, y].reshape(-1).view(np.uint8)  # little-endian: byte i of a word is bits 8i..8i+7
            dst = out[b, top + y, left : left + w].reshape(-1).view(np.uint32)
            for t in range(4 * w * cw):  # byte pairs
                first = np.uint32(octets[2 * t])
                dst[2 * t] = first * SPREAD
                dst[2 * t + 1] = (first ^ np.uint32(octets[2 * t + 1])) * SPREAD
    return out


@kernel
def _outside(size, out_size, k, stride, dilation, pad):
    """Per output position: how many of its ``k`` taps fall before the input and how many after it.

    The input index ``o * stride + t * dilation - pad`` grows with the tap ``t``, so the
    taps outside are a prefix and a suffix: these two counts say which.
    """
    before = np.zeros(out_size, np.int64)
    after = np.zeros(out_size, np.int64)
    for o in range(out_size):
        for t in range(k):
            i = o * stride + t * dilation - pad
            before[o] += i < 0
            after[o] += i >= size
    return before, after


@kernel
def border_corrections(window, tap_sums, factor):
    """Where the window of an output pixel leaves the image, and what that changes.

    Returns ``index`` int32 [OH * OW] (-1 inside, else a row of ``corr``) and ``corr``
    int32 [rows, O]: ``factor * sum of tap_sums[t, :]`` over the taps ``t`` that fall
    outside. With ``factor = pad_value - 1`` this turns a +1 border into ``pad_value``.
    Pixels whose windows leave the image the same way share a row (9 rows for a
    3x3 'same' convolution, whatever the image size).
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    top, bottom = _outside(h, oh, kh, sh, dh, pt)
    left, right = _outside(w, ow, kw, sw, dw, pl)
    ways = (kh + 1) * (kh + 1) * (kw + 1) * (kw + 1)
    row_of_way = np.full(ways, -1, np.int64)
    example = np.empty(ways, np.int64)  # a pixel of each row
    index = np.full(oh * ow, -1, np.int32)
    rows = 0
    for oy in range(oh):
        for ox in range(ow):
            if top[oy] + bottom[oy] + left[ox] + right[ox] == 0:
                continue
            way = ((top[oy] * (kh + 1) + bottom[oy]) * (kw + 1) + left[ox]) * (kw + 1) + right[ox]
            if row_of_way[way] < 0:
                row_of_way[way] = rows
                example[rows] = oy * ow + ox
                rows += 1
            index[oy * ow + ox] = row_of_way[way]
    corr = np.zeros((rows, tap_sums.shape[1]), np.int32)
    for row in range(rows):
        oy, ox = example[row] // ow, example[row] % ow
        for ky in range(kh):
            for kx in range(kw):
                if ky < top[oy] or ky >= kh - bottom[oy] or kx < left[ox] or kx >= kw - right[ox]:
                    for o in range(corr.shape[1]):
                        corr[row, o] += factor * tap_sums[ky * kw + kx, o]
    return index, corr


def _make_driver(kind: str, mode: int):
    spec = LANES_TILES[kind]
    rows, cols = spec.rows, spec.cols

    def conv_tiles(slots, window, block, b, ldb, words, k, n, i0, i1, border, corr, zeros, mult, shift, lo, hi, thr,
                   out):
        """Output rows ``i0..i1`` (all ``n`` channels) of the binary convolution, finished by ``mode``.

        slots  : uint64 [N, HP, WP, CW, SLOT_WORDS] from :func:`padded_slots`; window: ``ConvGeometry.window()``
        block  : output pixels per block (:func:`block_pixels`)
        b, ldb : weights in the lanes layout (``PackedConvBinary.lanes``, ``.ldb``); words = KH * KW * CW
        border, corr : from :func:`border_corrections`, or ``border`` empty for the +1 border
        zeros  : float64 [n] zeros (the epilogue's column terms); mult, shift : float64 [n]; lo, hi : clamp
        thr    : int64 [n] (BITS); out : int32 / float32 [M, n], or uint64 [M, ceil(n / 64)] (BITS)
        """
        h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
        hp, wp, cw = slots.shape[1], slots.shape[2], slots.shape[3]
        units = slots.reshape(-1).view(np.uint32)
        offs = np.empty(words, np.int64)  # unit offset of window word j from the window's corner
        for ky in range(kh):
            for kx in range(kw):
                for q in range(cw):
                    offs[(ky * kw + kx) * cw + q] = UNITS_PER_SLOT * ((ky * dh * wp + kx * dw) * cw + q)
        corners = np.empty(block, np.int64)
        dots = np.empty((block if mode != INTEGER else 0, n), np.int32)
        image, oy, ox = i0 // (oh * ow), i0 // ow % oh, i0 % ow
        for start in range(i0, i1, block):
            count = min(block, i1 - start)
            for r in range(count):  # the window corners of the block's pixels (no division per pixel)
                corners[r] = UNITS_PER_SLOT * ((image * hp + oy * sh) * wp + ox * sw) * cw
                ox += 1
                if ox == ow:
                    ox, oy = 0, oy + 1
                    if oy == oh:
                        oy, image = 0, image + 1
            if mode == INTEGER:
                y = out[start : start + count]
            else:
                y = dots[:count]
            flat_y = y.reshape(-1)
            for j in range(0, n, cols):
                width = min(cols, n - j)
                b_off = j // LANES * ldb
                for r0 in range(0, count, rows):
                    lanes_microkernel(kind, units, corners, r0, min(rows, count - r0), offs, b, b_off, ldb, width,
                                      words, k, flat_y, r0 * n + j, n)
            if border.size:
                pixel = start % (oh * ow)
                for r in range(count):
                    at = border[pixel]
                    if at >= 0:
                        for c in range(n):
                            y[r, c] += corr[at, c]
                    pixel = pixel + 1 if pixel + 1 < oh * ow else 0
            if mode == REAL:
                finish_tile(dots, start, count, 0, n, zeros, zeros, zeros, False, mult, shift, lo, hi, 0.0, 0.0, 0.0,
                            REAL, out)
            elif mode == BITS:
                for r in range(count):
                    for q in range(out.shape[1]):
                        bits = np.uint64(0)
                        for c in range(64 * q, min(n, 64 * q + 64)):
                            if dots[r, c] < thr[c]:
                                bits |= np.uint64(1) << np.uint64(c & 63)
                        out[start + r, q] = bits

    return conv_tiles


# One driver per micro-kernel and output mode: a driver compiles only its own micro-kernel, when first called.
DRIVERS = {(kind, mode): variant(__name__, f"conv_tiles_{slug(kind)}_{mode}", _make_driver(kind, mode))
           for kind in LANES_TILES for mode in MODES}
