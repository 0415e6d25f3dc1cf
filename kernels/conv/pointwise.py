"""1x1 int8 convolution of NCHW images as a transposed GEMM: no layout copy of the input or the output.

With stride 1, no padding and one group, a 1x1 convolution of image ``n`` is the
product ``out[n] = W x[n]`` of the weights ``W [O, C]`` and the image as a
``[C, H W]`` matrix, which NCHW stores row by row. The AVX-512 VNNI tiles of
``kernels.gemm.vnni`` with the "weights" source compute it as it stands: weight
rows broadcast, pixels as the 64 vector columns, so each tile stores runs of 64
pixels of ``rows`` output channels straight into the NCHW output. The pixels are
packed per call into the panel layout (4 channels per ``vpdpbusd`` lane) by
:func:`pack_pixels`, a byte interleave of four channel rows, far cheaper than a
transpose. With ``u`` the activations as unsigned bytes (int8 ones plus 128) and
``zu`` their zero point, weights with a zero point of 0 (the caller checks)::

    acc[n, o, p] = sum_c u[n, c, p] w[o, c] + col_term[o],   col_term[o] = bias[o] - zu sum_c w[o, c]

then the epilogue of ``kernels.gemm.vnni.make_tile_finish`` (or ``make_tile_store``).
Only compiled when ``kernels.dispatch`` picks "conv_pointwise_nchw" "avx512-vnni".
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels import threads
from kernels._jit import kernel
from kernels.conv.int8_driver import variant
from kernels.entry import Entry, In, Out
from kernels.epilogue import INTEGER, MODES, single_table
from kernels.gemm import vnni
from kernels.gemm.int8 import _finite, register_epilogue
from kernels.gemm.llvm_ir import I1, I8, I16, I32, I64, array_ptr, is_array, low_bits, masked, splat
from kernels.pack.panels import KGROUP, PANEL

ROWS = 6  # output channels per tile
V16I32, V64I8 = vnni.V16I32, vnni.V64I8


def _interleave_rows(builder, rows: list[ir.Value]) -> list[ir.Value]:
    """Four rows of 64 bytes as the 64 dwords ``(rows[0][i], rows[1][i], rows[2][i], rows[3][i])``, 16 a vector.

    Byte, then word interleaves (``punpck*``) make dword quads in every 128-bit lane,
    in the order of lane then unpack; a 4 x 4 transpose of the lanes (``vshufi64x2``)
    puts the pixels in order.
    """
    v32 = ir.VectorType(I16, 32)

    def unpack(a, b, ty, size: int, high: bool):
        """``punpckl*`` / ``punpckh*`` of ``size``-byte elements: per 128-bit lane, halves of a and b alternate."""
        n, half = 64 // size, 8 // size
        index = [e * n + lane * 2 * half + (half if high else 0) + i
                 for lane in range(4) for i in range(half) for e in (0, 1)]
        return builder.shuffle_vector(builder.bitcast(a, ty), builder.bitcast(b, ty),
                                      ir.Constant(ir.VectorType(I32, n), index))

    t01 = [unpack(rows[0], rows[1], V64I8, 1, high) for high in (False, True)]
    t23 = [unpack(rows[2], rows[3], V64I8, 1, high) for high in (False, True)]
    quads = [builder.bitcast(unpack(t01[k // 2], t23[k // 2], v32, 2, bool(k % 2)), ir.VectorType(I64, 8))
             for k in range(4)]  # quads[k], lane L: pixels 16 L + 4 k .. 16 L + 4 k + 3

    def lanes(a, b, picks):  # 128-bit lanes picks[i] of the 8 of (a, b)
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 8), [2 * p + e for p in picks
                                                                                 for e in (0, 1)]))

    low = [lanes(quads[2 * i], quads[2 * i + 1], (0, 1, 4, 5)) for i in range(2)]
    high = [lanes(quads[2 * i], quads[2 * i + 1], (2, 3, 6, 7)) for i in range(2)]
    return [builder.bitcast(lanes(pair[0], pair[1], picks), V64I8)
            for pair in (low, high) for picks in ((0, 2, 4, 6), (1, 3, 5, 7))]


@intrinsic
def _interleave(typingctx, x, r0, r1, r2, r3, first, count, flip, dst, d_off):
    """``dst[d_off + 4 i + b] = x[r_b + first + i] ^ flip`` for ``i < 64``, ``b < 4``; 0 where ``r_b < 0`` or
    ``i >= count`` (x, dst uint8 flat)."""
    if not (is_array(x, types.uint8, 1) and is_array(dst, types.uint8, 1)):
        return None

    def codegen(context, builder, signature, args):
        x, *starts, first, count, flip, dst, d_off = args
        tys = signature.args
        x_ptr = array_ptr(context, builder, tys[0], x, I8)
        d_ptr = builder.gep(array_ptr(context, builder, tys[8], dst, I8), [d_off])
        load = masked(builder, "load", V64I8)
        zero = ir.Constant(I64, 0)
        inside = low_bits(builder, count)  # pixels first .. first + count (count <= 64)
        rows = []
        for start in starts:
            bits = builder.select(builder.icmp_signed(">=", start, zero), inside, zero)
            at = builder.gep(x_ptr, [builder.add(start, first)])
            rows.append(builder.call(load, [builder.bitcast(at, V64I8.as_pointer()), ir.Constant(I32, 1),
                                            builder.bitcast(bits, ir.VectorType(I1, 64)), ir.Constant(V64I8, None)]))
        flips = splat(builder, builder.trunc(flip, I8), V64I8)
        for g, vector in enumerate(_interleave_rows(builder, rows)):
            builder.store(builder.xor(vector, flips), builder.bitcast(
                builder.gep(d_ptr, [ir.Constant(I64, 64 * g)]), V64I8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(x, *(types.int64,) * 7, dst, types.int64), codegen


@kernel
def pack_pixels(x, n, channels, pixels, flip, p0, p1, dst):
    """Pixel panels ``p0 .. p1`` (of ``PANEL``) of image ``n`` of ``x`` in the layout of ``kernels.pack.panels``.

    x   : uint8 flat NCHW, ``channels`` rows of ``pixels`` per image (int8 data viewed as uint8)
    dst : uint8 flat, ``(p1 - p0) ceil(C / 4) PANEL KGROUP`` bytes:
          ``dst[((p - p0) kq + q) 256 + 4 i + b] = x[n, 4 q + b, p PANEL + i] ^ flip``,
          0 past the channels or pixels
    """
    kq = (channels + KGROUP - 1) // KGROUP
    for p in range(p0, p1):
        count = min(PANEL, pixels - p * PANEL)
        for q in range(kq):
            c = q * KGROUP
            r = (n * channels + c) * pixels
            _interleave(x, r, r + pixels if c + 1 < channels else -1, r + 2 * pixels if c + 2 < channels else -1,
                        r + 3 * pixels if c + 3 < channels else -1, p * PANEL, count, flip, dst,
                        ((p - p0) * kq + q) * PANEL * KGROUP)


def _make_driver(mode: int):
    tile_store = vnni.make_tile_store(ROWS, 0, "weights")
    tile_finish = vnni.make_tile_finish(ROWS, 0, "weights")

    def pointwise_tiles(x, images, channels, pixels, flip, w_rows, ldw, o, col_term, mult, shift, single, lo, hi, zp,
                        qmin, qmax, p0, p1, out):
        """Pixel panels ``p0 .. p1`` of every image: ``out[n, o, p]`` of the module docstring.

        x      : uint8 / int8 NCHW, C-contiguous, any shape of that size (int8 data: ``flip`` 0x80)
        w_rows : int8 flat ``[O, ldw]``, the weights with their channels padded to ``ldw`` (a multiple of 4) by zeros
        col_term : int32 [>= O]; mult, shift: float64 [>= O]; single, lo .. qmax: the epilogue (unused for int32
                 out; ``single`` is ``kernels.epilogue.single_table``)
        out    : NCHW, C-contiguous, any shape of that size, int32 / float32 / uint8 / int8
        """
        x = x.reshape(-1).view(np.uint8)
        out = out.reshape(-1)
        kq = ldw // KGROUP
        panels = np.empty((p1 - p0) * kq * PANEL * KGROUP, np.uint8)
        for n in range(images):
            pack_pixels(x, n, channels, pixels, flip, p0, p1, panels)
            for p in range(p0, p1):
                cols = min(PANEL, pixels - p * PANEL)
                a_off = (p - p0) * kq * PANEL * KGROUP
                for r in range(0, o, ROWS):
                    m = min(ROWS, o - r)
                    o_off = (n * o + r) * pixels + p * PANEL
                    if mode == INTEGER:  # a compile-time constant: each driver types one of the two
                        tile_store(w_rows, r * ldw, ldw, m, panels, a_off, kq, col_term, r, cols, out, o_off, pixels)
                    else:
                        tile_finish(w_rows, r * ldw, ldw, m, panels, a_off, kq, col_term, mult, shift, single, lo, hi,
                                    zp, qmin, qmax, r, cols, out, o_off, pixels)

    return pointwise_tiles


DRIVERS = {mode: variant(__name__, f"pointwise_nchw_{mode}", _make_driver(mode)) for mode in MODES}


#: Output pixels per plane below which the NHWC path (layout copies + the GEMM tiles) is faster: a plane shorter
#: than one 64-pixel panel wastes most of it (measured, batch 32, one thread: the NHWC path takes 0.4-0.6x this
#: kernel's time on 4x4 and 5x5 planes, 0.8-1.1x on 6x6, 1.1-1.9x on 7x7 and 8x8).
MIN_PIXELS = 36


def is_1x1(geo) -> bool:
    """Whether a convolution is a plain product of the weights and each pixel: 1x1, stride 1, no padding, one
    group (the dilations then change nothing)."""
    return (geo.group == 1 and (geo.kernel_h, geo.kernel_w) == (1, 1) and (geo.stride_h, geo.stride_w) == (1, 1)
            and not any(geo.pads))


def applicable_epilogue(geo, zw: np.ndarray, epi, za: int):
    """The epilogue of a convolution this module computes (``za`` as unsigned), or None when it does not
    apply: it needs 1x1, stride 1, no padding, one group, and an epilogue the VNNI tiles finish themselves
    (``kernels.gemm.int8.register_epilogue``: weight zero points 0, int32 sums that cannot overflow)."""
    if not is_1x1(geo):
        return None
    return register_epilogue(epi, geo.in_channels, za, epi.col_bias, bool(zw.any()))


class PointwisePlan:
    """A 1x1 convolution of NCHW uint8 / int8 images prepared by ``kernels.conv.int8.ConvPlan`` (which checks
    everything, and gets ``epi`` from :func:`applicable_epilogue`): ``plan.run(x, out)`` with NCHW ``x`` and ``out``."""

    kind = "avx512-vnni-pointwise"

    def __init__(self, weights: np.ndarray, geo, x_dtype: np.dtype, za: int, epi):
        """``epi`` as :func:`applicable_epilogue` gives it."""
        o, c = weights.shape[:2]
        ldw = -(-c // KGROUP) * KGROUP
        self.w_rows = np.zeros((o, ldw), np.int8)
        self.w_rows[:, :c] = weights[:, :, 0, 0]
        # int32 sums wrap, as the terms do: exact wherever the result fits (``applies``)
        col_term = (epi.col_bias - za * self.w_rows.sum(1, dtype=np.int64)).astype(np.int32)
        self.args = (x_dtype == np.int8) * 0x80, self.w_rows.reshape(-1), ldw, o, col_term, epi.mult, epi.shift, \
            single_table(epi, epi.mult), _finite(epi.lo), _finite(epi.hi), float(epi.zp), epi.qmin, epi.qmax
        self.driver = DRIVERS[epi.mode]
        self.images, self.channels, self.pixels = geo.batch, c, geo.in_h * geo.in_w
        self.estimate_us = 2 * geo.rows * o * c / 400e3  # ~400 GOPS per thread

    def entry(self) -> Entry:
        """``plan.run(x, out)`` as one unchecked call on one thread: ``entry([x], [out])``, NCHW and C-contiguous."""
        return Entry(self.driver, (In(0), self.images, self.channels, self.pixels, *self.args, 0,
                                   -(-self.pixels // PANEL), Out(0)))

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        def part(p0: int, p1: int, _i0: int, _i1: int) -> None:
            self.driver(x, self.images, self.channels, self.pixels, *self.args, p0, p1, out)

        threads.run_tiled(part, -(-self.pixels // PANEL), 1, 1, self.estimate_us)
