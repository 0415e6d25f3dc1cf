"""Float32 2-D convolutions (ONNX Conv) on NCHW or NHWC arrays, with bias and a clamp (relu, relu6) fused.

With ``C' = C / group`` channels per group, ``g = o // (O / group)`` and the border
padded with zeros (ONNX), in NCHW (NHWC: ``x[n, iy, ix, c]`` and ``y[n, oy, ox, o]``; the
weights are OIHW either way)::

    y[n, o, oy, ox] = clamp(bias[o] + sum_{c < C', ky, kx} w[o, c, ky, kx]
                                      * x[n, g C' + c, oy SH + ky DH - PT, ox SW + kx DW - PL], lo, hi)

``clamp`` keeps NaN, as ONNX Relu and Clip do. Float sums are not associative:
results match a float64 evaluation to float32 rounding, not bit for bit.

Three kernels, chosen by shape. The first two compute, per image and group, the
product ``W @ cols`` with ``W [O / group, K]``, ``K = C' KH KW`` in ``(c, ky, kx)`` order, and
``cols [K, pixels]`` the im2col matrix, which is never built whole; the weights are packed
once per plan, a block of filters interleaved per k. NumPy's BLAS (OpenBLAS 0.3.31,
SkylakeX kernels) is not used: at one thread it reached 70-115 GFLOPS on these products
here (150 on 512-cubes), the register tiles below 140-175.

* **Pixel tiles** (``O / group`` a multiple of 32, ``K >= 64``: most 3x3 layers): the
  transposed product, 64 (or 32) output channels along 4 (2) vectors by 6 (8) pixels (1 (3) with AVX2)
  (:func:`_pixel_tile`); per tap, each pixel's input value is broadcast from where it
  lies in the (zero-padded copy of the) image, through a table of pixel offsets: no
  im2col copy, no wasted column. The pixel-major result of an image is transposed into
  the NCHW output with ``kernels.conv.layout``'s block transposes. Image by image, every
  weight is streamed again per image: small planes with large filters (``OH OW <=
  NHWC_MAX_PIXELS``, more than ``NHWC_MIN_WEIGHTS`` bytes of them) run the NHWC pixel
  tiles below instead, between two transposes ("nhwc-pixels").
* **Channel-major panels** (the other non-depthwise ones): pixels go in panels of
  ``NR = 32``; a register tile of ``MR`` output channels (8 with AVX-512, 2 with AVX2) by the ``NR`` pixels
  (:func:`_tile`: ``2 MR`` vectors of 16 lanes held over all of K, one multiply-add per
  broadcast weight and panel vector) adds the bias, clamps and stores into the NCHW
  output. A panel's K rows are found through a row table, so three modes share the tile:

  - ``pointwise`` (1x1, stride 1, unpadded): the rows lie in ``x``, one plane apart;
  - ``wide`` (stride 1, when the padding columns waste at most 1/8): the panels run
    over the pixels ``oy WB + ox`` of a zero-padded copy of the image (row length ``WB``),
    where tap ``(c, ky, kx)`` of every pixel is at a fixed distance: the rows lie in the
    copy, nothing else is copied, and the ``ox < OW`` columns of the tile go out;
  - ``im2col`` (the rest): each panel's ``[K, NR]`` rows are copied from the padded image,
    one output row's run of pixels per masked vector copy, and stay in cache for the tile.

* **Depthwise** (``group == C == O``): plane by plane, each plane copied into a
  zero-bordered buffer (:func:`_depthwise_geo`) whose rows are ``WB`` long, a multiple of
  ``s = SW``: output ``(oy, ox)`` then reads ``s (oy WB / s + ox) + kx DW`` from the rows of
  tap row ``ky``, with no bounds tests. 3x3 and 5x5 kernels with stride 1 or 2 along W
  and dilation 1 run explicit vectors (:func:`_depthwise_rows`: 16 outputs of a row per
  step, stored masked into ``y``; stride-2 tap pairs split into even and odd lanes where
  LLVM would gather); the others one loop over the *wide* rows (``WB / s`` columns each,
  vectorised by LLVM) whose ``OW`` valid columns are then copied into ``y``. Copies are
  masked vector runs: rows of 8 or 16 values are common, and a slice assignment or an
  auto-vectorised loop costs far more on them.
  Small planes (``H W + OH OW <= CHANNELS_MAX_VALUES``, where each plane's fixed costs
  dominate) go channels-last instead (:func:`_depthwise_channels`): a block of 64
  channels' planes is transposed into a ``[H W, 64]`` scratch tile, each output pixel
  sums its taps inside the plane (a table per plan, padding left out) along 4 vectors of
  channels, and the ``[OH OW, 64]`` result is transposed back into NCHW.

NHWC (``layout="NHWC"``) runs two kinds channels-last, with no transpose:

* **Pixel tiles** for every non-depthwise convolution with ``O / group >= 16`` or one group
  (:func:`_make_pixels_nhwc`): the tile above, K in ``(ky, kx, c)`` order, so tap
  ``(ky, kx, c)`` of a pixel lies at a fixed offset ``(ky DH WB + kx DW) C + c`` in the
  (zero-padded, ``WB`` wide) NHWC image and the tile's rows go straight into the output
  rows. An item is several whole images (about ``ITEM_PIXELS`` output pixels), whose
  pixels run through each weight panel in turn: a block of 64 filters by a chunk of K
  small enough to stay in L2, the chunks adding to partial sums in the output (small
  planes no longer re-stream every weight per image; a 1x1 stride-1 layer is one
  product ``[N H W, C] x [C, O]``). A group's last ``O' % 64`` filters take a tile of 1-3
  vectors, masked past ``O'``.
* **Depthwise** 3x3 and 5x5, any stride, dilation and padding
  (:func:`_make_depthwise_nhwc`): 32 channels along two vectors, the taps' weights in
  registers for a band of output rows, each tap one multiply-add on a vector read in place
  from ``x``; border outputs take an outside tap from a vector of zeros instead (no
  padded copy).

The rest (depthwise of other sizes, groups of fewer than 16 filters) runs the NCHW kernel
between two transposes (``kind`` "nchw-<kind>").

Everything is plain LLVM IR or Numba code, no target intrinsics: it compiles for any
CPU. The tiles' heights follow the size of the vector registers (:data:`MR`, :data:`PIXEL_ROWS`): tiles sized for
AVX-512's 32 registers spill with AVX2's 16 and ran at half the speed there.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels import _validate, dispatch, threads
from kernels._jit import kernel
from kernels.entry import Entry, In, Out, empty_entry
from kernels.conv.geometry import ConvGeometry, check_layout, conv_geometry
from kernels.conv.layout import BLOCKS, _transpose, nchw_to_nhwc, nhwc_to_nchw
from kernels.gemm.int8 import _activation_bounds
from kernels.gemm.llvm_ir import (
    F32,
    I32,
    I64,
    array_ptr,
    declare,
    emit_loop,
    is_array,
    masked,
    splat,
)

VECTORS = 2  # 16-lane vectors per tile row
LANES = 16
NR = LANES * VECTORS  # output pixels per panel
# output channels per register tile: its MR x NR sums fill half the vector registers, 8 rows with AVX-512's 32 and
# 2 with AVX2's 16 (8 rows spill there: 2 ran a float32 linear layer 1.8x faster on a Zen 3)
MR = max(1, dispatch.VECTOR_REGISTER_BYTES // 2 // (NR * 4))
V16F32 = ir.VectorType(F32, LANES)
UNROLLED = ((3, 3, 1), (3, 3, 2), (5, 5, 1), (5, 5, 2))  # depthwise (KH, KW, stride) with taps unrolled
F32_DTYPE = np.dtype(np.float32)
GEMM_GFLOPS = 140.0  # single-thread rate measured here, for the thread split
DEPTHWISE_GFLOPS = 15.0
CHANNELS_GFLOPS = 20.0  # channels-last depthwise (measured 17-20 on 3x3 and 6x6 planes), for the thread split
# Depthwise planes go channels-last when H W + OH OW is at most this (measured, 3x3 on 192 channels: 0.3-0.9x the
# plane by plane time up to 8x8 at stride 1 and 12x12 at stride 2, 1.1-1.2x at 10x10 and 14x14)
CHANNELS_MAX_VALUES = 192


def _f32(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    return builder.fptrunc(value, F32) if value.type != F32 else value


def _lane_mask(builder: ir.IRBuilder, count: ir.Value, first: int) -> ir.Value:
    """``<16 x i1>``: lane ``l`` set when ``first + l < count``."""
    lanes = ir.Constant(ir.VectorType(I64, LANES), list(range(first, first + LANES)))
    return builder.icmp_signed("<", lanes, splat(builder, count, ir.VectorType(I64, LANES)))


def _vector_at(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value | int) -> ir.Value:
    offset = ir.Constant(I64, offset) if isinstance(offset, int) else offset
    return builder.bitcast(builder.gep(base, [offset]), V16F32.as_pointer())


@functools.cache
def register_tile(lane_bias: bool = False, row_scale: bool = False, height: int = MR):
    """Intrinsic ``tile(a, a_off, a_step, a_row, b, b_off, rows, k, bias, bias_off, bias_step, scales, out, out_off,
    ldo, m, n, lo, hi)``: a ``height x NR`` block of a float32 product (``height`` is :data:`MR`, sized for this
    CPU's registers, unless a test asks for another), in registers over all of K::

        out[out_off + r ldo + j] = clamp(s_r (c_rj + sum_q A[r, q] b[b_off + rows[q] + j]), lo, hi)
        A[r, q] = a[a_off + q a_step + r a_row]

    for ``r < min(m, height)``, ``j < min(n, NR)`` (the other rows and lanes are computed, not stored; rows ``r >= m``
    read the ``a``, ``bias`` and ``scales`` of row ``m - 1``, never past it; ``m >= 1``), where the start ``c_rj``
    is ``bias[bias_off + r bias_step]`` (one per row), or with ``lane_bias`` the vector ``bias[bias_off +
    r bias_step + j]`` (lanes past ``n`` not read), and ``s_r`` is ``scales[r]`` with ``row_scale``, else 1.
    ``a``, ``b``, ``bias``, ``scales`` and ``out`` are 1-D float32, ``rows`` int64 ``[>= k]``: where each row of the
    panel starts (``b`` rows are read whole, ``NR`` values each). Each k loads ``VECTORS`` vectors of ``b`` and
    broadcasts ``height`` values of ``a`` (memory operands of the multiply-adds once compiled).
    """

    @intrinsic
    def tile(typingctx, a, a_off, a_step, a_row, b, b_off, rows, k, bias, bias_off, bias_step, scales, out, out_off,
             ldo, m, n, lo, hi):
        if not (all(is_array(t, types.float32, 1) for t in (a, b, bias, scales, out))
                and is_array(rows, types.int64, 1)):
            return None

        def codegen(context, builder, signature, args):
            (a, a_off, a_step, a_row, b, b_off, rows, k, bias, bias_off, bias_step, scales, out, out_off, ldo, m, n,
             lo, hi) = args
            tys = signature.args

            def base(index: int, array: ir.Value, offset: ir.Value | int = 0) -> ir.Value:
                offset = ir.Constant(I64, offset) if isinstance(offset, int) else offset
                return builder.gep(array_ptr(context, builder, tys[index], array, F32), [offset])

            a_ptr, b_ptr, bias_ptr, out_ptr = base(0, a, a_off), base(4, b, b_off), base(8, bias, bias_off), base(
                12, out, out_off)
            scales_ptr = base(11, scales)
            rows_ptr = array_ptr(context, builder, tys[6], rows, I64)
            fma = declare(builder, "llvm.fmuladd.v16f32", ir.FunctionType(V16F32, [V16F32] * 3))
            last = builder.sub(m, ir.Constant(I64, 1))
            clamped = [builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), ir.Constant(I64, r), last)
                       for r in range(height)]
            a_rows = [builder.gep(a_ptr, [builder.mul(r, a_row)]) for r in clamped]
            bias_rows = [builder.gep(bias_ptr, [builder.mul(r, bias_step)]) for r in clamped]
            masks = [_lane_mask(builder, n, LANES * j) for j in range(VECTORS)]
            if lane_bias:
                load = masked(builder, "load", V16F32)
                init = [builder.call(load, [_vector_at(builder, row, LANES * j), ir.Constant(I32, 4), masks[j],
                                            ir.Constant(V16F32, None)]) for row in bias_rows for j in range(VECTORS)]
            else:
                init = [splat(builder, builder.load(row), V16F32) for row in bias_rows for _ in range(VECTORS)]

            def step(q, accs):
                row = builder.gep(b_ptr, [builder.load(builder.gep(rows_ptr, [q]))])
                panel = [builder.load(_vector_at(builder, row, LANES * j), align=4) for j in range(VECTORS)]
                at = builder.mul(q, a_step)
                new = []
                for r in range(height):
                    w = splat(builder, builder.load(builder.gep(a_rows[r], [at])), V16F32)
                    new += [builder.call(fma, [w, panel[j], accs[r * VECTORS + j]]) for j in range(VECTORS)]
                return new

            sums = emit_loop(builder, k, V16F32, height * VECTORS, step, init)
            low, high = splat(builder, _f32(builder, lo), V16F32), splat(builder, _f32(builder, hi), V16F32)
            store = masked(builder, "store", V16F32)
            for r in range(height):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(I64, r), m)):
                    row = builder.gep(out_ptr, [builder.mul(ir.Constant(I64, r), ldo)])
                    factor = splat(builder, builder.load(builder.gep(scales_ptr, [clamped[r]])), V16F32) \
                        if row_scale else None
                    for j in range(VECTORS):
                        y = sums[r * VECTORS + j]
                        if factor is not None:
                            y = builder.fmul(y, factor)
                        # selects, not min / max: a NaN sum stays NaN
                        y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
                        y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
                        builder.call(store, [y, _vector_at(builder, row, LANES * j), ir.Constant(I32, 4), masks[j]])
            return context.get_dummy_value()

        return (types.void(a, a_off, a_step, a_row, b, b_off, rows, k, bias, bias_off, bias_step, scales, out, out_off,
                           ldo, m, n, lo, hi), codegen)

    return tile


_row_bias_tile = register_tile()


@kernel(inline="always")
def _tile(a, a_off, b, b_off, rows, k, bias, o0, out, out_off, ldo, m, n, lo, hi):
    """:func:`register_tile` on weights packed ``MR`` per k (``a[a_off + q MR + r]``), a bias per output channel."""
    _row_bias_tile(a, a_off, MR, 1, b, b_off, rows, k, bias, o0, 1, bias, out, out_off, ldo, m, n, lo, hi)


def _emit_copy(builder, d_ptr: ir.Value, s_ptr: ir.Value, n: ir.Value, stride: int, vectors: int) -> None:
    """Store ``d_ptr[t] = s_ptr[stride t]`` for ``t < n <= LANES vectors``: masked, nothing past ``n`` values is
    read or written. Stride 2 loads twice the lanes and keeps the even ones."""
    load, store = masked(builder, "load", V16F32), masked(builder, "store", V16F32)
    span = builder.sub(builder.mul(n, ir.Constant(I64, stride)), ir.Constant(I64, stride - 1))
    align, zero = ir.Constant(I32, 4), ir.Constant(V16F32, None)
    evens = ir.Constant(ir.VectorType(I32, LANES), list(range(0, 2 * LANES, 2)))
    for j in range(vectors):
        loaded = [builder.call(load, [_vector_at(builder, s_ptr, LANES * v), align,
                                      _lane_mask(builder, span, LANES * v), zero])
                  for v in range(stride * j, stride * (j + 1))]
        value = loaded[0] if stride == 1 else builder.shuffle_vector(loaded[0], loaded[1], evens)
        builder.call(store, [value, _vector_at(builder, d_ptr, LANES * j), align, _lane_mask(builder, n, LANES * j)])


def _by_width(builder, n: ir.Value, emit) -> None:
    """``emit(VECTORS)``, or ``emit(1)`` when ``n <= LANES``: short runs (rows of 8 pixels) are common."""
    with builder.if_else(builder.icmp_signed(">", n, ir.Constant(I64, LANES))) as (wide, narrow):
        with wide:
            emit(VECTORS)
        with narrow:
            emit(1)


@functools.cache
def _rows_intrinsic(stride: int):
    """Intrinsic ``copy(dst, d, dp, src, s, sp, n, rows)``: ``dst[d + r dp + t] = src[s + r sp + stride t]``

    for ``r < rows``, ``t < n <= NR``: masked vector copies (nothing past ``n`` values of a
    row is read or written), the masks made once for all rows.
    """
    @intrinsic
    def copy(typingctx, dst, d, dp, src, s, sp, n, rows):
        if not (is_array(dst, types.float32, 1) and is_array(src, types.float32, 1)):
            return None

        def codegen(context, builder, signature, args):
            dst, d, dp, src, s, sp, n, rows = args
            tys = signature.args
            d_ptr = builder.gep(array_ptr(context, builder, tys[0], dst, F32), [d])
            s_ptr = builder.gep(array_ptr(context, builder, tys[3], src, F32), [s])

            def emit(vectors: int) -> None:
                def body(r, _):
                    target, source = builder.gep(d_ptr, [builder.mul(r, dp)]), builder.gep(s_ptr, [builder.mul(r, sp)])
                    _emit_copy(builder, target, source, n, stride, vectors)
                    return []
                emit_loop(builder, rows, V16F32, 0, body)

            _by_width(builder, n, emit)
            return context.get_dummy_value()

        return types.void(dst, d, dp, src, s, sp, n, rows), codegen

    return copy


_rows1 = _rows_intrinsic(1)


@functools.cache
def _copy_taps(stride: int):
    """Intrinsic ``copy(cols, d, src, s, taps, n)``: ``cols[d + q NR + t] = src[s + taps[q] + stride t]``

    for every tap ``q`` and ``t < n <= NR``: one run of an im2col panel, all taps in one
    loop (the masks are made once).
    """
    @intrinsic
    def copy(typingctx, cols, d, src, s, taps, n):
        if not (is_array(cols, types.float32, 1) and is_array(src, types.float32, 1)
                and is_array(taps, types.int64, 1)):
            return None

        def codegen(context, builder, signature, args):
            cols, d, src, s, taps, n = args
            tys = signature.args
            d_ptr = builder.gep(array_ptr(context, builder, tys[0], cols, F32), [d])
            s_ptr = builder.gep(array_ptr(context, builder, tys[2], src, F32), [s])
            taps_ptr = array_ptr(context, builder, tys[4], taps, I64)
            count = context.make_array(tys[4])(context, builder, taps).nitems

            def emit(vectors: int) -> None:
                def body(q, _):
                    source = builder.gep(s_ptr, [builder.load(builder.gep(taps_ptr, [q]))])
                    _emit_copy(builder, builder.gep(d_ptr, [builder.mul(q, ir.Constant(I64, NR))]), source, n,
                               stride, vectors)
                    return []
                emit_loop(builder, count, V16F32, 0, body)

            _by_width(builder, n, emit)
            return context.get_dummy_value()

        return types.void(cols, d, src, s, taps, n), codegen

    return copy


_taps1, _taps2 = _copy_taps(1), _copy_taps(2)


@kernel(inline="always")
def _copy_rows(dst, d, dp, src, s, sp, n, rows):
    """``dst[d + r dp + t] = src[s + r sp + t]`` for ``r < rows``, ``t < n``, in masked runs of ``NR`` (a slice
    assignment costs far more on short rows)."""
    for j in range(0, n, NR):
        _rows1(dst, d + j, dp, src, s + j, sp, min(NR, n - j), rows)


@kernel
def _fill_padded(x, n, c, h, w, pt, pl, wb, hb, img):
    """The interior of ``img`` [C, HB, WB] (borders stay as they are) = ``x[n]`` [C, H, W]."""
    for ch in range(c):
        _copy_rows(img, ch * hb * wb + pt * wb + pl, wb, x, (n * c + ch) * h * w, w, w, h)


# pixel tile: vectors of 16 output channels -> pixels per tile, at most 8, its sums filling three quarters of the
# vector registers (AVX-512: 24, 24, 16 or 8 sums of 16 lanes; AVX2: 4, 6, 6 or 6); NCHW takes 4 or 2 vectors
PIXEL_ROWS = {v: max(1, min(8, 3 * dispatch.VECTOR_REGISTER_BYTES // 4 // (4 * LANES * v))) for v in (4, 3, 2, 1)}
# Shorter filters (1x1 on few channels) run faster as channel-major panels: the pixel tile's fixed costs and the
# final transpose weigh more there (measured: 1x1 stride-2 16->32 and 32->64 lost 10-30 %, 3x3 ones gained 0-40 %)
PIXEL_MIN_DEPTH = 64
# NCHW pixel-tile layers of at most NHWC_MAX_PIXELS output pixels per image and more than NHWC_MIN_WEIGHTS bytes of
# weights per group (out of L2: streamed again for every image) run NHWC between two transposes, where a weight panel
# serves several images. Measured at batch 32, time with / without: 0.54-0.67 for 3x3 on 14x14 and 7x7 outputs,
# 0.63-0.84 for 1x1 on 3x3 planes with 370 KB to 1.2 MB of weights; 1.03-1.97 for 1x1 with 50-220 KB of weights
NHWC_MAX_PIXELS = 256
NHWC_MIN_WEIGHTS = 256 * 1024


FIRST, LAST = 1, 2  # pixel tile modes: start from the bias (else from ``out``), clamp (else store the partial sums)


@functools.cache
def _pixel_tile(vectors: int):
    """Intrinsic ``tile(wt, w_off, img, i_off, pix, p_off, nrows, taps, q0, q1, bias, o0, nch, out, out_off, ldo,
    mode, lo, hi)``: for pixel rows ``r < nrows <= PIXEL_ROWS[vectors]``, channels ``j < nch <= 16 vectors``::

        s = (bias[o0 + j] if mode & FIRST else out[out_off + r ldo + j])
            + sum_{q0 <= q < q1} img[i_off + pix[p_off + r] + taps[q]] * wt[w_off + q 16 vectors + j]
        out[out_off + r ldo + j] = clamp(s, lo, hi) if mode & LAST else s

    The transposed product, channels along the vectors, one broadcast per pixel and tap
    read where it lies in the image (no im2col copy), ``taps`` int64. The rows past
    ``nrows`` compute pixel ``pix[p_off]`` again and are not stored (nothing past them is
    read); the lanes past ``nch`` are computed (``wt`` and ``bias`` are read whole) and
    not stored. Partial sums (``mode`` without ``LAST``) let a long K run in chunks
    whose weights stay in L2.
    """
    rows = PIXEL_ROWS[vectors]
    width = LANES * vectors

    @intrinsic
    def tile(typingctx, wt, w_off, img, i_off, pix, p_off, nrows, taps, q0, q1, bias, o0, nch, out, out_off, ldo,
             mode, lo, hi):
        if not (all(is_array(t, types.float32, 1) for t in (wt, img, bias, out))
                and is_array(pix, types.int64, 1) and is_array(taps, types.int64, 1)):
            return None

        def codegen(context, builder, signature, args):
            (wt, w_off, img, i_off, pix, p_off, nrows, taps, q0, q1, bias, o0, nch, out, out_off, ldo, mode,
             lo, hi) = args
            tys = signature.args
            w_ptr = builder.gep(array_ptr(context, builder, tys[0], wt, F32), [w_off])
            img_ptr = builder.gep(array_ptr(context, builder, tys[2], img, F32), [i_off])
            pix_ptr = builder.gep(array_ptr(context, builder, tys[4], pix, I64), [p_off])
            taps_ptr = builder.gep(array_ptr(context, builder, tys[7], taps, I64), [q0])
            bias_ptr = builder.gep(array_ptr(context, builder, tys[10], bias, F32), [o0])
            out_ptr = builder.gep(array_ptr(context, builder, tys[13], out, F32), [out_off])
            zero = ir.Constant(I64, 0)
            valid = [builder.icmp_signed("<", ir.Constant(I64, r), nrows) for r in range(rows)]
            # a row past nrows repeats row 0: its loads stay inside the image and the output
            bases = [builder.gep(img_ptr, [builder.load(builder.gep(pix_ptr, [builder.select(valid[r],
                                                                                        ir.Constant(I64, r), zero)]))])
                     for r in range(rows)]
            out_rows = [builder.gep(out_ptr, [builder.mul(builder.select(valid[r], ir.Constant(I64, r), zero), ldo)])
                        for r in range(rows)]
            load, store = masked(builder, "load", V16F32), masked(builder, "store", V16F32)
            align, undef = ir.Constant(I32, 4), ir.Constant(V16F32, None)
            masks = [_lane_mask(builder, nch, LANES * v) for v in range(vectors)]
            first = builder.icmp_signed("!=", builder.and_(mode, ir.Constant(mode.type, FIRST)),
                                        ir.Constant(mode.type, 0))
            biases = [builder.load(_vector_at(builder, bias_ptr, LANES * v), align=4) for v in range(vectors)]
            entry = builder.block
            with builder.if_then(builder.not_(first)):
                partial = [builder.call(load, [_vector_at(builder, out_rows[r], LANES * v), align, masks[v], undef])
                           for r in range(rows) for v in range(vectors)]
                loaded = builder.block
            init = []
            for i in range(rows * vectors):
                phi = builder.phi(V16F32)
                phi.add_incoming(biases[i % vectors], entry)
                phi.add_incoming(partial[i], loaded)
                init.append(phi)
            fma = declare(builder, "llvm.fmuladd.v16f32", ir.FunctionType(V16F32, [V16F32] * 3))

            def step(q, accs):
                tap = builder.load(builder.gep(taps_ptr, [q]))
                w_row = builder.gep(w_ptr, [builder.mul(builder.add(q, q0), ir.Constant(I64, width))])
                w_vecs = [builder.load(_vector_at(builder, w_row, LANES * v), align=4) for v in range(vectors)]
                new = []
                for r in range(rows):
                    a = splat(builder, builder.load(builder.gep(bases[r], [tap])), V16F32)
                    new += [builder.call(fma, [a, w_vecs[v], accs[r * vectors + v]]) for v in range(vectors)]
                return new

            sums = emit_loop(builder, builder.sub(q1, q0), V16F32, rows * vectors, step, init)
            last = builder.icmp_signed("!=", builder.and_(mode, ir.Constant(mode.type, LAST)),
                                       ir.Constant(mode.type, 0))
            low, high = splat(builder, _f32(builder, lo), V16F32), splat(builder, _f32(builder, hi), V16F32)
            low = builder.select(last, low, splat(builder, ir.Constant(F32, float("-inf")), V16F32))
            high = builder.select(last, high, splat(builder, ir.Constant(F32, float("inf")), V16F32))
            for r in range(rows):
                with builder.if_then(valid[r]):
                    for v in range(vectors):
                        y = sums[r * vectors + v]
                        y = builder.select(builder.fcmp_ordered("<", y, low), low, y)  # NaN stays NaN
                        y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
                        builder.call(store, [y, _vector_at(builder, out_rows[r], LANES * v), align, masks[v]])
            return context.get_dummy_value()

        sig = types.void(wt, w_off, img, i_off, pix, p_off, nrows, taps, q0, q1, bias, o0, nch, out, out_off, ldo,
                         mode, lo, hi)
        return sig, codegen

    return tile


def _make_pixel_driver(vectors: int):
    """The driver of the pixel tiles with ``vectors`` vectors of output channels."""
    tile = _pixel_tile(vectors)
    rows, width = PIXEL_ROWS[vectors], LANES * vectors
    side, panel = BLOCKS[4].side, BLOCKS[4].panel

    @kernel
    def pixel_items(x, wt, bias, lo, hi, geo, taps, pix, i0, i1, img, nhwc, out):
        """Images ``i0 .. i1`` of a convolution by pixel tiles: ``nhwc`` [>= pixels rounded up to tiles, O] gets
        one image's output pixel-major, then is transposed into ``out`` [N O OH OW].

        geo : (C, H, W, O, group, OH, OW, PT, PL, HB, WB); ``pix`` int64 [pixels rounded up]: pixel
        ``oy OW + ox`` at ``oy SH WB + ox SW`` in the (padded) image, 0 past the last; ``taps`` as
        :func:`_gemm_items`; ``img`` the padded image's scratch (empty: no padding), zero when first used.
        """
        x, out = x.reshape(-1), out.reshape(-1)  # C-contiguous arrays of any shape, read flat
        c, h, w, o, group, oh, ow, pt, pl, hb, wb = geo
        k = taps.shape[0]
        cg, og = c // group, o // group
        pixels = oh * ow
        blocks = og // width
        units = -(-o // panel) if pixels >= side and o >= side else 1  # _transpose's column panels
        for n in range(i0, i1):
            if img.shape[0]:
                _fill_padded(x, n, c, h, w, pt, pl, wb, hb, img)
                src, base = img, 0
            else:
                src, base = x, n * c * h * w
            for g in range(group):
                for p0 in range(0, pixels, rows):
                    for blk in range(blocks):
                        o0 = g * og + blk * width
                        tile(wt, (g * blocks + blk) * k * width, src, base + g * cg * hb * wb, pix, p0, rows, taps, 0,
                             k, bias, o0, width, nhwc, p0 * o + o0, o, FIRST | LAST, lo, hi)
            _transpose(nhwc.view(np.uint32), out[n * o * pixels : (n + 1) * o * pixels].view(np.uint32), pixels, o,
                       units, 0, units)

    return pixel_items


PIXEL_DRIVERS = {vectors: _make_pixel_driver(vectors) for vectors in (4, 2)}


POINTWISE, WIDE, IM2COL = 0, 1, 2  # how a panel's rows are found (see _gemm_items)


def _gemm_scratch(geo: tuple[int, ...], k: int) -> tuple[int, int, int]:
    """Scratch floats of one :func:`_gemm_items` call: (im2col panel, wide output panel, padded image)."""
    c, h, w, o, group, oh, ow, sh, sw, pt, pl, hb, wb, mode = geo
    padded = mode == WIDE or (mode == IM2COL and (hb != h or wb != w))
    # WIDE reads whole vectors up to one panel and (KW - 1) DW values past the last tap row
    image = c * hb * wb + (NR + wb if mode == WIDE else 0) if padded else 0
    return (k * NR if mode == IM2COL or mode == POINTWISE else 0,
            -(-(o // group) // MR) * MR * NR if mode == WIDE else 0, image)


@kernel
def _gemm_items(x, wp, bias, lo, hi, geo, taps, cols_rows, i0, i1, cols, panel, img, out):
    """Items ``i0 .. i1`` of a convolution: item ``i`` is image ``i // panels``, panel ``i % panels`` of it.

    x         : float32 [N C H W], NCHW;  out : float32 [N O OH OW]
    wp        : the packed weights of :class:`Conv2dFloat32Plan`
    geo       : (C, H, W, O, group, OH, OW, SH, SW, PT, PL, HB, WB, mode)
    taps      : int64 [K], tap ``(c, ky, kx)`` at ``c HB WB + ky DH WB + kx DW`` in a (padded) image
    cols_rows : int64 [K], ``q NR``: the rows of an im2col panel
    cols, panel, img : float32 scratch of :func:`_gemm_scratch` floats, zero when first used (the image's
                padding borders are never written)

    Panels of ``NR`` pixels run over the output pixels ``oy OW + ox``, except in ``WIDE``
    mode (stride 1), where they run over the *wide* pixels ``oy WB + ox`` of the padded
    image, ``ox < WB``: tap ``q`` of wide pixel ``m`` is then ``img[taps[q] + m]``, so every
    panel row is a run of the padded image and nothing is copied; the tile's rows go to a
    scratch panel and only the columns ``ox < OW`` are copied out. ``POINTWISE`` (1x1,
    stride 1, no padding) reads full panels from ``x`` likewise; ``IM2COL`` copies each panel.
    """
    x, out = x.reshape(-1), out.reshape(-1)  # C-contiguous arrays of any shape, read flat
    c, h, w, o, group, oh, ow, sh, sw, pt, pl, hb, wb, mode = geo
    k = taps.shape[0]
    cg, og = c // group, o // group
    pixels = oh * ow
    grid = oh * wb if mode == WIDE else pixels
    panels = -(-grid // NR)
    blocks = -(-og // MR)
    padded = img.shape[0] > 0
    held = -1
    for item in range(i0, i1):
        n, p0 = item // panels, item % panels * NR
        nv = min(NR, grid - p0)
        if padded and n != held:
            _fill_padded(x, n, c, h, w, pt, pl, wb, hb, img)
            held = n
        src, base = (img, 0) if padded else (x, n * c * h * w)
        for g in range(group):
            gbase = base + g * cg * hb * wb
            if mode == WIDE or (mode == POINTWISE and nv == NR):
                b, b_off, rows = src, gbase + p0, taps
            else:
                _panel(src, gbase, taps, p0, nv, ow, sh, sw, wb, cols)
                b, b_off, rows = cols, 0, cols_rows
            for blk in range(blocks):
                o0 = g * og + blk * MR
                if mode == WIDE:
                    _tile(wp, (g * blocks + blk) * k * MR, b, b_off, rows, k, bias, o0, panel, blk * MR * NR, NR, MR,
                          nv, lo, hi)
                else:
                    _tile(wp, (g * blocks + blk) * k * MR, b, b_off, rows, k, bias, o0, out,
                          (n * o + o0) * pixels + p0, pixels, og - blk * MR, nv, lo, hi)
            if mode == WIDE:
                _unwiden(panel, p0, nv, wb, ow, og, out, ((n * o + g * og) * oh) * ow, pixels)


@kernel
def _unwiden(panel, p0, nv, wb, ow, og, out, out_off, pixels):
    """``out[out_off + r pixels + oy OW + ox] = panel[r NR + j]`` for wide pixels ``p0 + j = oy WB + ox``,
    ``j < nv``, ``ox < OW``, ``r < og``."""
    j = 0
    while j < nv:
        oy, ox = divmod(p0 + j, wb)
        if ox >= ow:  # padding columns
            j += min(wb - ox, nv - j)
            continue
        run = min(ow - ox, nv - j)
        _copy_rows(out, out_off + oy * ow + ox, pixels, panel, j, NR, run, og)
        j += run


@kernel
def _panel(src, base, taps, p0, nv, ow, sh, sw, wb, cols):
    """``cols[q NR + j] = src[base + taps[q] + oy SH WB + ox SW]`` for pixels ``p0 + j = oy OW + ox``, ``j < nv``.

    The panel's pixels split into runs along output rows; each run is copied for every
    tap, a masked vector copy each.
    """
    j = 0
    while j < nv:
        oy, ox = divmod(p0 + j, ow)
        run, start = min(ow - ox, nv - j), base + oy * sh * wb + ox * sw
        if sw == 1:
            _taps1(cols, j, src, start, taps, run)
        elif sw == 2:
            _taps2(cols, j, src, start, taps, run)
        else:
            for q in range(taps.shape[0]):
                for t in range(run):
                    cols[q * NR + j + t] = src[start + taps[q] + t * sw]
        j += run


@kernel(inline="always")
def _clamp(v, lo, hi):
    """``v`` clamped to ``[lo, hi]`` by comparisons, not min / max: NaN stays NaN."""
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return v


@functools.cache
def _depthwise_rows(kh: int, kw: int, stride: int):
    """Intrinsic ``rows(buf, taps, b, lo, hi, step, wm, oh, ow, out, out_off)``: one depthwise plane::

        out[out_off + oy OW + ox] = clamp(b + sum_{ky, kx} taps[ky KW + kx]
                                              * buf[ky step + stride (oy WM + ox) + kx], lo, hi)

    16 outputs of one row per step, stored masked straight into ``out``; the lanes past
    ``OW`` read up to ``4 LANES`` values past the buffer's last row. No scalar remainder
    loop runs on short rows (LLVM's own vector loop takes 64 outputs a step), each kernel
    row sums into its own register (shorter dependency chains), and stride 2 splits each
    pair of taps ``(2p, 2p + 1)`` into the even and odd lanes of two loads, where LLVM
    would gather.
    """
    @intrinsic
    def rows(typingctx, buf, taps, b, lo, hi, step, wm, oh, ow, out, out_off):
        if not all(is_array(t, types.float32, 1) for t in (buf, taps, out)):
            return None

        def codegen(context, builder, signature, args):
            buf, taps, b, lo, hi, step, wm, oh, ow, out, out_off = args
            tys = signature.args
            buf_ptr = array_ptr(context, builder, tys[0], buf, F32)
            taps_ptr = array_ptr(context, builder, tys[1], taps, F32)
            out_ptr = builder.gep(array_ptr(context, builder, tys[9], out, F32), [out_off])
            fma = declare(builder, "llvm.fmuladd.v16f32", ir.FunctionType(V16F32, [V16F32] * 3))
            weights = [splat(builder, builder.load(builder.gep(taps_ptr, [ir.Constant(I64, t)])), V16F32)
                       for t in range(kh * kw)]
            start = splat(builder, _f32(builder, b), V16F32)
            low, high = splat(builder, _f32(builder, lo), V16F32), splat(builder, _f32(builder, hi), V16F32)
            lanes = [ir.Constant(ir.VectorType(I32, LANES), list(range(e, 2 * LANES, 2))) for e in (0, 1)]
            per_row = builder.sdiv(builder.add(ow, ir.Constant(I64, LANES - 1)), ir.Constant(I64, LANES))
            store = masked(builder, "store", V16F32)

            def chunk(q, _):
                oy, ox = builder.sdiv(q, per_row), builder.mul(builder.srem(q, per_row), ir.Constant(I64, LANES))
                m = builder.add(builder.mul(oy, wm), ox)
                sums = []
                for ky in range(kh):
                    row = builder.gep(buf_ptr, [builder.add(builder.mul(ir.Constant(I64, ky), step),
                                                            builder.mul(m, ir.Constant(I64, stride)))])
                    acc = ir.Constant(V16F32, None)
                    if stride == 1:
                        for kx in range(kw):
                            x = builder.load(_vector_at(builder, row, kx), align=4)
                            acc = builder.call(fma, [weights[ky * kw + kx], x, acc])
                    else:
                        for pair in range(0, kw, 2):
                            v0 = builder.load(_vector_at(builder, row, pair), align=4)
                            v1 = builder.load(_vector_at(builder, row, pair + LANES), align=4)
                            for e in range(min(2, kw - pair)):
                                x = builder.shuffle_vector(v0, v1, lanes[e])
                                acc = builder.call(fma, [weights[ky * kw + pair + e], x, acc])
                    sums.append(acc)
                y = start
                for acc in sums:
                    y = builder.fadd(y, acc)
                y = builder.select(builder.fcmp_ordered("<", y, low), low, y)  # NaN stays NaN
                y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
                target = _vector_at(builder, out_ptr, builder.add(builder.mul(oy, ow), ox))
                builder.call(store, [y, target, ir.Constant(I32, 4), _lane_mask(builder, builder.sub(ow, ox), 0)])
                return []

            emit_loop(builder, builder.mul(oh, per_row), V16F32, 0, chunk)
            return context.get_dummy_value()

        return types.void(buf, taps, b, lo, hi, step, wm, oh, ow, out, out_off), codegen

    return rows


def _make_depthwise(spec: tuple[int, int, int] | None):
    """The depthwise driver for ``spec = (KH, KW, SW)`` with dilation 1 (:func:`_depthwise_rows`), or any (None)."""
    general = spec is None
    KH, KW, S = (1, 1, 1) if general else spec
    unrolled = _depthwise_rows(KH, KW, S)

    @kernel
    def planes(x, w, bias, lo, hi, geo, i0, i1, buf, wide, out):
        """Planes ``i0 .. i1`` (plane ``i``: image ``i // C``, channel ``i % C``); see :func:`_depthwise_geo`.

        x : float32 [N C H W];  w : float32 [C, KH KW];  out : float32 [N C OH OW]
        buf, wide : float32 scratch [size] and (general driver) [OH WM], ``buf`` zero when first used (padding
                    is never written); separate arrays, as LLVM vectorises less when they may overlap
        """
        x, out = x.reshape(-1), out.reshape(-1)  # C-contiguous arrays of any shape, read flat
        c, h, wd, kh, kw, sh, s, dh, dw, pt, pl, oh, ow, wb, wm, step, size, shared = geo
        if not general:
            kh, kw, s, dh, dw = KH, KW, S, 1, 1
        span = oh * wm
        for item in range(i0, i1):
            src = item * h * wd
            if shared:  # one padded copy of the plane serves every ky
                _copy_rows(buf, pt * wb + pl, wb, x, src, wd, wd, h)
            else:
                for ky in range(kh):  # the rows oy SH + ky DH - PT inside the plane; the others stay zero
                    first = max(0, -(-(pt - ky * dh) // sh))
                    last = min(oh, (h - 1 + pt - ky * dh) // sh + 1)
                    if last > first:
                        _copy_rows(buf, ky * step + first * wb + pl, wb, x, src + (first * sh + ky * dh - pt) * wd,
                                   sh * wd, wd, last - first)
            taps = w[item % c]
            b = bias[item % c]
            if not general:
                unrolled(buf, taps, b, lo, hi, step, wm, oh, ow, out, item * oh * ow)
                continue
            wide[:] = b
            for ky in range(kh):
                for kx in range(kw):
                    tap = taps[ky * kw + kx]
                    off = ky * step + kx * dw
                    for m in range(span):
                        wide[m] += tap * buf[np.uint64(s * m + off)]
            for m in range(span):
                wide[m] = _clamp(wide[m], lo, hi)
            _copy_rows(out, item * oh * ow, ow, wide, 0, wm, ow, oh)

    return planes


DEPTHWISE = {spec: _make_depthwise(spec) for spec in UNROLLED + (None,)}


CHANNEL_BLOCK = 4 * LANES  # channels per item of the channels-last depthwise driver
TRANSPOSE_SIDE, TRANSPOSE_PANEL = BLOCKS[4].side, BLOCKS[4].panel  # of _transpose on 4-byte elements


@intrinsic
def _depthwise_lanes(typingctx, wt, w_off, xt, nc, starts, tap_w, tap_x, bias, b_off, lo, hi, yt):
    """Channels-last depthwise pixels: for ``p < starts.size - 1``, channel ``c < nc <= CHANNEL_BLOCK``::

        yt[p nc + c] = clamp(bias[b_off + c] + sum_{starts[p] <= j < starts[p + 1]}
                                                   wt[w_off + tap_w[j] + c] * xt[tap_x[j] nc + c], lo, hi)

    ``xt`` [pixels, nc] and ``yt`` [pixels, nc] hold a block of ``nc`` channels,
    channels-last; ``(tap_w[j], tap_x[j])``: a tap of output pixel ``p`` inside the plane
    (its weights, ``CHANNEL_BLOCK`` values, and its input pixel), padding taps left out.
    The channels run along 4 vectors, loaded and stored masked past ``nc``; ``wt`` and
    ``bias`` are read whole (``CHANNEL_BLOCK`` values).
    """
    if not (all(is_array(t, types.float32, 1) for t in (wt, xt, bias, yt))
            and all(is_array(t, types.int64, 1) for t in (starts, tap_w, tap_x))):
        return None
    vectors = CHANNEL_BLOCK // LANES

    def codegen(context, builder, signature, args):
        wt, w_off, xt, nc, starts, tap_w, tap_x, bias, b_off, lo, hi, yt = args
        tys = signature.args
        w_ptr = builder.gep(array_ptr(context, builder, tys[0], wt, F32), [w_off])
        x_ptr = array_ptr(context, builder, tys[2], xt, F32)
        starts_ptr = array_ptr(context, builder, tys[4], starts, I64)
        tw_ptr, tx_ptr = (array_ptr(context, builder, tys[i], v, I64) for i, v in ((5, tap_w), (6, tap_x)))
        bias_ptr = builder.gep(array_ptr(context, builder, tys[7], bias, F32), [b_off])
        y_ptr = array_ptr(context, builder, tys[11], yt, F32)
        pixels = builder.sub(context.make_array(tys[4])(context, builder, starts).nitems, ir.Constant(I64, 1))
        fma = declare(builder, "llvm.fmuladd.v16f32", ir.FunctionType(V16F32, [V16F32] * 3))
        load, store = masked(builder, "load", V16F32), masked(builder, "store", V16F32)
        align, zero = ir.Constant(I32, 4), ir.Constant(V16F32, None)
        masks = [_lane_mask(builder, nc, LANES * v) for v in range(vectors)]
        init = [builder.load(_vector_at(builder, bias_ptr, LANES * v), align=4) for v in range(vectors)]
        low, high = splat(builder, _f32(builder, lo), V16F32), splat(builder, _f32(builder, hi), V16F32)

        def pixel(p, _):
            j0 = builder.load(builder.gep(starts_ptr, [p]))
            count = builder.sub(builder.load(builder.gep(starts_ptr, [builder.add(p, ir.Constant(I64, 1))])), j0)

            def tap(q, accs):
                j = builder.add(j0, q)
                w_row = builder.gep(w_ptr, [builder.load(builder.gep(tw_ptr, [j]))])
                x_row = builder.gep(x_ptr, [builder.mul(builder.load(builder.gep(tx_ptr, [j])), nc)])
                return [builder.call(fma, [builder.load(_vector_at(builder, w_row, LANES * v), align=4),
                                           builder.call(load, [_vector_at(builder, x_row, LANES * v), align,
                                                               masks[v], zero]), accs[v]])
                        for v in range(vectors)]

            sums = emit_loop(builder, count, V16F32, vectors, tap, init)
            y_row = builder.gep(y_ptr, [builder.mul(p, nc)])
            for v in range(vectors):
                y = builder.select(builder.fcmp_ordered("<", sums[v], low), low, sums[v])  # NaN stays NaN
                y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
                builder.call(store, [y, _vector_at(builder, y_row, LANES * v), align, masks[v]])
            return []

        emit_loop(builder, pixels, V16F32, 0, pixel)
        return context.get_dummy_value()

    return types.void(wt, w_off, xt, nc, starts, tap_w, tap_x, bias, b_off, lo, hi, yt), codegen


@kernel
def _depthwise_channels(x, wt, bias, lo, hi, geo, starts, tap_w, tap_x, i0, i1, xt, yt, out):
    """Items ``i0 .. i1`` of a depthwise convolution on small planes, ``CHANNEL_BLOCK`` channels at a time.

    Item ``i``: image ``i // blocks``, channels ``c0 = (i % blocks) CHANNEL_BLOCK`` on. Their
    planes ``[nc, H W]`` are transposed into ``xt`` ``[H W, nc]``, convolved channels-last
    into ``yt`` ``[OH OW, nc]`` (:func:`_depthwise_lanes`) and transposed back into ``out``.

    geo : (C, H W, OH OW, blocks);  wt : float32 [blocks, KH KW, CHANNEL_BLOCK];  bias : [blocks CHANNEL_BLOCK]
    """
    x, out = x.reshape(-1).view(np.uint32), out.reshape(-1)  # C-contiguous arrays of any shape, read flat
    c, plane, pixels, blocks = geo
    kk = wt.shape[0] // (blocks * CHANNEL_BLOCK)
    xs, ys = xt.view(np.uint32), yt.view(np.uint32)
    side, panel = TRANSPOSE_SIDE, TRANSPOSE_PANEL
    for item in range(i0, i1):
        n, blk = item // blocks, item % blocks
        c0 = blk * CHANNEL_BLOCK
        nc = min(CHANNEL_BLOCK, c - c0)
        src = (n * c + c0) * plane
        units = -(-plane // panel) if nc >= side and plane >= side else 1  # _transpose's column panels
        _transpose(x[src : src + nc * plane], xs[: nc * plane], nc, plane, units, 0, units)
        _depthwise_lanes(wt, blk * kk * CHANNEL_BLOCK, xt, nc, starts, tap_w, tap_x, bias, c0, lo, hi, yt)
        dst = (n * c + c0) * pixels
        units = -(-nc // panel) if nc >= side and pixels >= side else 1
        _transpose(ys[: nc * pixels], out[dst : dst + nc * pixels].view(np.uint32), pixels, nc, units, 0, units)


def _depthwise_geo(geo: ConvGeometry) -> tuple[tuple[int, ...], tuple[int, int, int] | None]:
    """The ``geo`` tuple of a depthwise driver and its ``spec`` (None: the general driver).

    Wide output ``m = oy WM + ox`` (``ox < WM``, of which ``ox < OW`` are kept) reads tap
    ``(ky, kx)`` at ``s m + ky step + kx DW`` of the plane buffer, ``s = SW``, rows ``WB`` long:

    * stride 1, or equal strides with an unrolled ``spec`` (``shared``): one zero-padded
      copy of the plane, ``WM = WB``, ``step = DH WB`` (output row ``oy`` starts at input row
      ``s oy``; :func:`_depthwise_rows` computes only the ``OW`` columns of each row);
    * otherwise each ``ky`` has ``OH`` rows of its own, row ``oy`` holding input row
      ``oy SH + ky DH - PT``, ``step = OH WB``, ``WB`` a multiple of ``s`` and ``WM = WB / s``
      (the general driver computes every wide column, so one copy read at ``s m`` with
      ``WM = WB`` would cost it ``s`` times the columns it keeps).

    ``size`` leaves slack for the whole vectors read past the last row.
    """
    kh, kw, sh, sw = geo.kernel_h, geo.kernel_w, geo.stride_h, geo.stride_w
    spec = (kh, kw, sw) if (kh, kw, sw) in UNROLLED and geo.dilation_h == geo.dilation_w == 1 else None
    width = max(geo.pad_left + geo.in_w, (geo.out_w - 1) * sw + (kw - 1) * geo.dilation_w + 1)
    shared = sh == sw == 1 or (spec is not None and sh == sw)
    wb = -(-width // sw) * sw
    if shared:
        rows = max(geo.pad_top + geo.in_h, sh * (geo.out_h - 1) + (kh - 1) * geo.dilation_h + 1)
        wm, step = wb, geo.dilation_h * wb
    else:
        wm, step, rows = wb // sw, geo.out_h * wb, kh * geo.out_h
    size = rows * wb + (kw - 1) * geo.dilation_w + 1 + 4 * LANES  # the unrolled rows read up to 64 past
    return ((geo.in_channels, geo.in_h, geo.in_w, kh, kw, sh, sw, geo.dilation_h, geo.dilation_w, geo.pad_top,
             geo.pad_left, geo.out_h, geo.out_w, wb, wm, step, size, int(shared)), spec)


# ---- channels-last (NHWC) ----------------------------------------------------------------------------------------

PIXEL_BLOCK = 4 * LANES  # NHWC pixel tiles: output channels per block; a group's last may be 16, 32 or 48 wide
# NHWC pixel tiles: an item takes about this many output pixels (whole images), which share each weight panel
ITEM_PIXELS = 1024
PANEL_BYTES = 192 * 1024  # K is cut in chunks whose weight panel (K chunk x 64 filters) stays in L2 (512 KB)


@intrinsic
def _memcpy(typingctx, dst, d, src, s, n):
    """``dst[d : d + n] = src[s : s + n]`` (float32, not overlapping) by the C library's ``memcpy``: whole NHWC image
    rows are long runs, which it copies faster than :func:`_copy_rows` (measured 1.5x on 6 rows of 3456 values)."""
    if not (is_array(dst, types.float32, 1) and is_array(src, types.float32, 1)):
        return None

    def codegen(context, builder, signature, args):
        dst, d, src, s, n = args
        tys = signature.args
        i8p = ir.IntType(8).as_pointer()
        target = builder.bitcast(builder.gep(array_ptr(context, builder, tys[0], dst, F32), [d]), i8p)
        source = builder.bitcast(builder.gep(array_ptr(context, builder, tys[2], src, F32), [s]), i8p)
        copy = declare(builder, "llvm.memcpy.p0i8.p0i8.i64",
                       ir.FunctionType(ir.VoidType(), [i8p, i8p, I64, ir.IntType(1)]))
        builder.call(copy, [target, source, builder.mul(n, ir.Constant(I64, 4)), ir.Constant(ir.IntType(1), 0)])
        return context.get_dummy_value()

    return types.void(dst, d, src, s, n), codegen


@kernel(inline="always")
def _fill_padded_nhwc(x, n, h, rowlen, pt, pl_c, wbc, hb, j, img):
    """Image ``j`` of ``img`` [imgs, HB, WB C] (borders stay as they are) gets the rows of ``x[n]`` [H, W C]."""
    for r in range(h):
        _memcpy(img, (j * hb + pt + r) * wbc + pl_c, x, (n * h + r) * rowlen, rowlen)


def _make_pixels_nhwc():
    """The driver of the NHWC pixel tiles: blocks of 64 channels (4 vectors), a group's tail of 1-3 vectors."""
    tile4, tile3, tile2, tile1 = (_pixel_tile(v) for v in (4, 3, 2, 1))
    rows4, rows3, rows2, rows1 = (PIXEL_ROWS[v] for v in (4, 3, 2, 1))

    @kernel
    def pixels_nhwc(x, wt, bias, lo, hi, geo, taps, pix, i0, i1, img, out):
        """Items ``i0 .. i1`` of an NHWC convolution by pixel tiles: item ``i`` is images ``i imgs ..``.

        x : float32 [N H W C];  out : float32 [N OH OW O], written in place by the tiles (pixel-major)
        wt : :func:`_pack_weights` of the (ky, kx, c)-ordered filters, blocks of 64 and a narrow tail per group
        geo : (N, C, H, W, O, group, PT, PL, HB, WB, pixels, imgs, chunk, tail vectors (0: the last
              block is a whole one, masked past ``O'``))
        taps : int64 [K], tap ``(ky, kx, c)`` at ``(ky DH WB + kx DW) C + c`` of a pixel of the (padded) image;
        pix : int64 [imgs pixels], output pixel ``m`` of the item's image ``j`` at
              ``(j HB WB + oy SH WB + ox SW) C``;  img : the padded images' scratch (empty: no padding)

        The tiles run over the pixels of all the item's images (tiles cross image borders),
        weight panel by weight panel (a K chunk of a block of filters), so a panel in L2
        serves every pixel of the item; chunks after the first add to the partial sums
        stored in ``out``.
        """
        x, out = x.reshape(-1), out.reshape(-1)  # C-contiguous arrays of any shape, read flat
        n_total, c, h, w, o, group, pt, pl, hb, wb, pixels, imgs, chunk, tail_v = geo
        k = taps.shape[0]
        cg, og = c // group, o // group
        full = og // PIXEL_BLOCK if tail_v else -(-og // PIXEL_BLOCK)  # a last block of 49-63: masked
        gsize = (full * PIXEL_BLOCK + tail_v * LANES) * k
        for item in range(i0, i1):
            n0 = item * imgs
            count = min(imgs, n_total - n0)
            if img.shape[0]:
                for j in range(count):
                    _fill_padded_nhwc(x, n0 + j, h, w * c, pt, pl * c, wb * c, hb, j, img)
                src, base = img, 0
            else:
                src, base = x, n0 * h * w * c
            total = count * pixels
            out_base = n0 * pixels * o
            for g in range(group):
                for q0 in range(0, k, chunk):
                    q1 = min(k, q0 + chunk)
                    mode = (FIRST if q0 == 0 else 0) | (LAST if q1 == k else 0)
                    for blk in range(full + (tail_v > 0)):
                        o0 = g * og + blk * PIXEL_BLOCK
                        nch = min(PIXEL_BLOCK, og - blk * PIXEL_BLOCK)
                        w_off = g * gsize + blk * PIXEL_BLOCK * k
                        i_off = base + g * cg
                        if blk < full:
                            for p0 in range(0, total, rows4):
                                tile4(wt, w_off, src, i_off, pix, p0, min(rows4, total - p0), taps, q0, q1, bias, o0,
                                      nch, out, out_base + p0 * o + o0, o, mode, lo, hi)
                        elif tail_v == 3:
                            for p0 in range(0, total, rows3):
                                tile3(wt, w_off, src, i_off, pix, p0, min(rows3, total - p0), taps, q0, q1, bias, o0,
                                      nch, out, out_base + p0 * o + o0, o, mode, lo, hi)
                        elif tail_v == 2:
                            for p0 in range(0, total, rows2):
                                tile2(wt, w_off, src, i_off, pix, p0, min(rows2, total - p0), taps, q0, q1, bias, o0,
                                      nch, out, out_base + p0 * o + o0, o, mode, lo, hi)
                        else:
                            for p0 in range(0, total, rows1):
                                tile1(wt, w_off, src, i_off, pix, p0, min(rows1, total - p0), taps, q0, q1, bias, o0,
                                      nch, out, out_base + p0 * o + o0, o, mode, lo, hi)

    return pixels_nhwc


_pixels_nhwc = _make_pixels_nhwc()


@functools.cache
def _depthwise_band(kh: int, kw: int, vectors: int, partial: bool):
    """Intrinsic ``band(src, s_off, offs, dys, dxs, zeros, wt, w_off, bias, b_off, nch, lo, hi, out, out_off, geo)``:
    NHWC depthwise, output rows ``oy0 .. oy0 + rows`` of one image, channels ``j = 16 v + l < 16 vectors``::

        out[out_off + (oy - oy0) OW C + ox C + j] = clamp(bias[b_off + j] + sum_{ky < KH, kx < KW, inside}
            wt[w_off + 16 (v KH KW + ky KW + kx) + l] * src[s_off + (iy W + ix) C + offs[ky KW + kx] + j], lo, hi)
        iy = oy SH - PT, ix = ox SW - PL, offs[ky KW + kx] = (dys[ky] W + dxs[kx]) C

    tap ``(ky, kx)`` *inside* when ``0 <= iy + dys[ky] < H`` and ``0 <= ix + dxs[kx] < W`` (zero
    padding; ``dys`` ascending). ``geo`` = (oy0, rows, OW, SH, SW, PT, PL, H, W, C, ox_lo,
    ox_hi): the columns ``ox_lo <= ox < ox_hi`` of a row whose taps all lie inside it read
    every tap in place, no test; the others read an outside tap from ``zeros`` (16 zeros)
    instead, chosen per tap (no padded copy of the image is made). With ``partial``
    only the channels ``j < nch`` are loaded and stored (masked). The ``KH KW vectors``
    weights stay in registers over the whole band; each vector's sum runs in two chains.
    Two vectors (32 channels, two adjacent cache lines of a pixel) measured up to 1.3x
    faster than one. One output per step: unrolled, LLVM keeps a pointer per tap and
    output and spills them.
    """
    taps = kh * kw

    @intrinsic
    def band(typingctx, src, s_off, offs, dys, dxs, zeros, wt, w_off, bias, b_off, nch, lo, hi, out, out_off, geo):
        if not (all(is_array(t, types.float32, 1) for t in (src, zeros, wt, bias, out))
                and all(is_array(t, types.int64, 1) for t in (offs, dys, dxs))):
            return None

        def codegen(context, builder, signature, args):
            src, s_off, offs, dys, dxs, zeros, wt, w_off, bias, b_off, nch, lo, hi, out, out_off, geo = args
            tys = signature.args
            oy0, rows, ow, sh, sw, pt, pl, h, w, c, ox_lo, ox_hi = (builder.extract_value(geo, i) for i in range(12))
            s_ptr = builder.gep(array_ptr(context, builder, tys[0], src, F32), [s_off])
            zero_ptr = _vector_at(builder, array_ptr(context, builder, tys[5], zeros, F32), 0)
            w_ptr = builder.gep(array_ptr(context, builder, tys[6], wt, F32), [w_off])
            b_ptr = builder.gep(array_ptr(context, builder, tys[8], bias, F32), [b_off])
            o_ptr = builder.gep(array_ptr(context, builder, tys[13], out, F32), [out_off])
            table = [[builder.load(builder.gep(array_ptr(context, builder, tys[i], v, I64), [ir.Constant(I64, t)]))
                      for t in range(size)] for i, v, size in ((2, offs, taps), (3, dys, kh), (4, dxs, kw))]
            tap_offs, tap_dy, tap_dx = table
            fma = declare(builder, "llvm.fmuladd.v16f32", ir.FunctionType(V16F32, [V16F32] * 3))
            load, store = masked(builder, "load", V16F32), masked(builder, "store", V16F32)
            align, zero = ir.Constant(I32, 4), ir.Constant(V16F32, None)
            masks = [_lane_mask(builder, nch, LANES * v) for v in range(vectors)]
            # block v of 16 channels: its taps' weights at w_off + 16 (v KH KW + t), as packed
            weights = [[builder.load(_vector_at(builder, w_ptr, LANES * (v * taps + t)), align=4) for t in range(taps)]
                       for v in range(vectors)]
            starts = [builder.load(_vector_at(builder, b_ptr, LANES * v), align=4) for v in range(vectors)]
            low, high = splat(builder, _f32(builder, lo), V16F32), splat(builder, _f32(builder, hi), V16F32)
            step = builder.mul(sw, c)

            def output(rows_in, s_row, o_row, ox, checked):
                """One output; ``rows_in``: whether each kernel row lies inside the image (None: all)."""
                at = builder.gep(s_row, [builder.mul(ox, step)])
                ix = builder.sub(builder.mul(ox, sw), pl)
                cols_in = [builder.icmp_unsigned("<", builder.add(ix, dx), w) for dx in tap_dx] if checked else None
                chains = [[starts[v], zero] for v in range(vectors)]
                for t in range(taps):
                    tap = builder.gep(at, [tap_offs[t]])
                    if checked:
                        inside = cols_in[t % kw] if rows_in is None else builder.and_(rows_in[t // kw], cols_in[t % kw])
                    for v in range(vectors):
                        ptr = _vector_at(builder, tap, LANES * v)
                        if checked:
                            ptr = builder.select(inside, ptr, zero_ptr)
                        x = builder.call(load, [ptr, align, masks[v], zero]) if partial else builder.load(ptr, align=4)
                        chains[v][t % 2] = builder.call(fma, [weights[v][t], x, chains[v][t % 2]])
                for v in range(vectors):
                    y = builder.fadd(*chains[v])
                    y = builder.select(builder.fcmp_ordered("<", y, low), low, y)  # NaN stays NaN
                    y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
                    target = _vector_at(builder, o_row, builder.add(builder.mul(ox, c), ir.Constant(I64, LANES * v)))
                    if partial:
                        builder.call(store, [y, target, align, masks[v]])
                    else:
                        builder.store(y, target, align=4)

            def columns(rows_in, s_row, o_row, first, last, checked):
                emit_loop(builder, builder.sub(last, first), V16F32, 0,
                          lambda q, _: output(rows_in, s_row, o_row, builder.add(first, q), checked) or [])

            def row(r, _):
                iy = builder.sub(builder.mul(builder.add(oy0, r), sh), pt)
                s_row = builder.gep(s_ptr, [builder.mul(builder.sub(builder.mul(iy, w), pl), c)])
                o_row = builder.gep(o_ptr, [builder.mul(builder.mul(r, ow), c)])
                inside = builder.and_(builder.icmp_signed(">=", iy, ir.Constant(I64, 0)),
                                      builder.icmp_signed("<", builder.add(iy, tap_dy[kh - 1]), h))
                with builder.if_else(inside) as (rows_inside, rows_outside):
                    with rows_inside:
                        columns(None, s_row, o_row, ir.Constant(I64, 0), ox_lo, True)
                        columns(None, s_row, o_row, ox_lo, ox_hi, False)
                        columns(None, s_row, o_row, ox_hi, ow, True)
                    with rows_outside:
                        rows_in = [builder.icmp_unsigned("<", builder.add(iy, dy), h) for dy in tap_dy]
                        columns(rows_in, s_row, o_row, ir.Constant(I64, 0), ow, True)
                return []

            emit_loop(builder, rows, V16F32, 0, row)
            return context.get_dummy_value()

        return types.void(src, s_off, offs, dys, dxs, zeros, wt, w_off, bias, b_off, nch, lo, hi, out, out_off,
                          geo), codegen

    return band


BAND_OUTPUTS = 64  # NHWC depthwise: output pixels per band (weights loaded once per band and block of channels)


def _make_depthwise_nhwc(kh: int, kw: int):
    """The NHWC depthwise driver for ``kh x kw`` kernels (any stride, dilation and padding)."""
    whole, partial2, partial1 = (_depthwise_band(kh, kw, 2, False), _depthwise_band(kh, kw, 2, True),
                                 _depthwise_band(kh, kw, 1, True))
    taps = kh * kw

    @kernel
    def depthwise_nhwc(x, wt, bias, lo, hi, geo, offs, dys, dxs, zeros, i0, i1, out):
        """Images ``i0 .. i1`` of an NHWC depthwise convolution, blocks of 32 channels along two vectors.

        x : float32 [N H W C];  out : float32 [N OH OW C]
        wt : float32 [C blocks of 16, taps, 16];  bias : float32 [C rounded up to 16]
        geo : (C, H, W, OH, OW, SH, SW, PT, PL, ox_lo, ox_hi);  offs : int64 [KH KW], tap ``(ky, kx)`` at
        ``(dys[ky] W + dxs[kx]) C``;  dys, dxs : int64 [KH], [KW], ``ky DH`` and ``kx DW``;
        zeros : float32 [16] (see :func:`_depthwise_band`)

        Bands of output rows (about ``BAND_OUTPUTS`` pixels), each block of 32 channels
        along a whole band (a last block of 1-31 masked), reading ``x`` in place.
        """
        x, out = x.reshape(-1), out.reshape(-1)  # C-contiguous arrays of any shape, read flat
        c, h, w, oh, ow, sh, sw, pt, pl, ox_lo, ox_hi = geo
        band = max(1, -(-BAND_OUTPUTS // ow))
        for n in range(i0, i1):
            for oy0 in range(0, oh, band):
                rows = min(band, oh - oy0)
                where = (oy0, rows, ow, sh, sw, pt, pl, h, w, c, ox_lo, ox_hi)
                o_row = (n * oh + oy0) * ow * c
                for c0 in range(0, c, 2 * LANES):
                    nch = min(2 * LANES, c - c0)
                    if nch == 2 * LANES:
                        whole(x, n * h * w * c + c0, offs, dys, dxs, zeros, wt, c0 * taps, bias, c0, nch, lo, hi,
                              out, o_row + c0, where)
                    elif nch > LANES:
                        partial2(x, n * h * w * c + c0, offs, dys, dxs, zeros, wt, c0 * taps, bias, c0, nch, lo, hi,
                                 out, o_row + c0, where)
                    else:
                        partial1(x, n * h * w * c + c0, offs, dys, dxs, zeros, wt, c0 * taps, bias, c0, nch, lo, hi,
                                 out, o_row + c0, where)

    return depthwise_nhwc


DEPTHWISE_NHWC = {(k, k): _make_depthwise_nhwc(k, k) for k in (3, 5)}  # others go through NCHW
DEPTHWISE_NHWC_GFLOPS = 40.0


class Conv2dFloat32Plan:
    """A float32 convolution prepared once for one input shape: ``plan(x, out=None)`` then only runs.

    Prepared: geometry, kernel choice (``kind``: "depthwise", "pixels", "pointwise", "wide" or "im2col";
    in NHWC "depthwise" and "pixels" run channels-last, the others as "nchw-<kind>", between two
    transposes; NCHW pixel tiles on small planes run as "nhwc-pixels"), packed weights, padded bias and clamp.
    A call checks ``x`` (float32, the prepared shape in ``layout``; a non-C-contiguous ``x`` is copied once)
    and ``out`` (float32, C-contiguous, ``out_shape``; made when None) and returns ``out``, which must not
    overlap ``x``.
    ``plan.run(x, out)`` skips the checks. Work is split over ``kernels.set_num_threads``
    threads (by images, pixel panels or planes) when it pays; each thread's scratch
    (padded image, panel) is made on first use and kept, so later calls allocate nothing.
    Calls from several threads at once are safe: a busy plan's other callers get scratch of their own.
    """

    def __init__(self, w: object, x_shape: tuple, bias: object = None, *, strides=(1, 1), pads=(0, 0, 0, 0),
                 dilations=(1, 1), group: int = 1, activation: str | tuple | None = None, layout: str = "NCHW"):
        self.layout = check_layout(layout)
        w = _real("w", w, 4)
        o, cg, kh, kw = w.shape
        if not (isinstance(x_shape, (tuple, list)) and len(x_shape) == 4
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in x_shape)):
            raise ValueError(f"x_shape: expected 4 ints ({', '.join(layout)}), got {x_shape!r}")
        self.x_shape = tuple(int(v) for v in x_shape)
        n, c, h, wd = self.x_shape if layout == "NCHW" else (self.x_shape[i] for i in (0, 3, 1, 2))
        geo = conv_geometry((n, h, wd, c), (kh, kw), cg, o, strides=strides, pads=pads, dilations=dilations,
                            group=group)
        self.geo = geo
        self.out_shape = (n, o, geo.out_h, geo.out_w) if layout == "NCHW" else geo.out_shape_nhwc
        self.lo, self.hi = (np.float32(v) for v in _activation_bounds(activation))
        b = np.zeros(o, np.float32) if bias is None else _real("bias", bias, 1)
        if b.shape != (o,):
            raise ValueError(f"bias: expected shape ({o},), one value per filter, got {b.shape}")
        self.scratch: list[tuple[np.ndarray, ...]] = []  # per thread of a call, kept: calls allocate nothing
        self._busy = threading.Lock()
        self.inner: Conv2dFloat32Plan | None = None  # the plan of the other layout, run between two transposes
        self.empty = n == 0  # nothing to compute: calls return the empty output
        if self.empty:
            self.kind = "empty batch"
            return
        attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": group, "activation": activation}
        if layout == "NHWC":
            if geo.group == c == o and (kh, kw) in DEPTHWISE_NHWC:
                self._depthwise_nhwc(w, b)
            elif geo.group == 1 or geo.group_out >= LANES:
                self._pixels_nhwc(w, b)
            else:  # depthwise of other sizes, groups of few filters: the NCHW kernels are made for them
                self.inner = Conv2dFloat32Plan(w, (n, c, h, wd), b, **attrs)
                self.kind = "nchw-" + self.inner.kind
        elif geo.group == c == o:
            self._depthwise(w.reshape(o, kh * kw), b)
        elif geo.group_out % (2 * LANES) == 0 and geo.depth >= PIXEL_MIN_DEPTH:
            if geo.out_h * geo.out_w <= NHWC_MAX_PIXELS and geo.depth * geo.group_out * 4 > NHWC_MIN_WEIGHTS:
                self.inner = Conv2dFloat32Plan(w, (n, h, wd, c), b, layout="NHWC", **attrs)
                self.kind = "nhwc-" + self.inner.kind
            else:
                self._pixels(w, b)
        else:
            self._panels(w, b)

    def _depthwise(self, w: np.ndarray, b: np.ndarray) -> None:
        geo = self.geo
        self.kind = "depthwise"
        if geo.in_h * geo.in_w + geo.out_h * geo.out_w <= CHANNELS_MAX_VALUES:
            self._depthwise_channels(w, b)
            return
        geo_args, spec = _depthwise_geo(geo)
        self.driver, self.args = DEPTHWISE[spec], (np.ascontiguousarray(w), b, self.lo, self.hi, geo_args)
        self.items = geo.batch * geo.in_channels
        self.estimate_us = geo.ops() / DEPTHWISE_GFLOPS / 1e3
        wm, size = geo_args[14], geo_args[16]
        self.scratch_sizes = (size, 0 if spec else geo.out_h * wm)  # the unrolled rows store straight into y

    def _depthwise_channels(self, w: np.ndarray, b: np.ndarray) -> None:
        """Small planes: ``CHANNEL_BLOCK`` channels along the vectors (:func:`_depthwise_channels`), where the plane
        by plane driver spends most of its time on each plane's fixed costs."""
        geo = self.geo
        c, kh, kw = geo.in_channels, geo.kernel_h, geo.kernel_w
        blocks = -(-c // CHANNEL_BLOCK)
        oy, ox, ky, kx = np.ix_(np.arange(geo.out_h), np.arange(geo.out_w), np.arange(kh), np.arange(kw))
        iy = oy * geo.stride_h + ky * geo.dilation_h - geo.pad_top
        ix = ox * geo.stride_w + kx * geo.dilation_w - geo.pad_left
        inside = (0 <= iy) & (iy < geo.in_h) & (0 <= ix) & (ix < geo.in_w)  # [OH, OW, KH, KW]
        tap = np.broadcast_to(ky * kw + kx, inside.shape)[inside]  # row-major: by pixel, then tap
        starts = np.concatenate([[0], np.cumsum(inside.reshape(geo.out_h * geo.out_w, -1).sum(axis=1))])
        padded = np.zeros((blocks * CHANNEL_BLOCK, kh * kw), np.float32)
        padded[:c] = w
        wt = padded.reshape(blocks, CHANNEL_BLOCK, kh * kw).transpose(0, 2, 1).reshape(-1)
        bias = np.concatenate([b, np.zeros(blocks * CHANNEL_BLOCK - c, np.float32)])
        geo_args = (c, geo.in_h * geo.in_w, geo.out_h * geo.out_w, blocks)
        self.driver = _depthwise_channels
        self.args = (np.ascontiguousarray(wt), bias, self.lo, self.hi, geo_args, starts.astype(np.int64),
                     (tap * CHANNEL_BLOCK).astype(np.int64),
                     np.broadcast_to(iy * geo.in_w + ix, inside.shape)[inside].astype(np.int64))
        self.items = geo.batch * blocks
        self.estimate_us = geo.ops() / CHANNELS_GFLOPS / 1e3
        self.scratch_sizes = (CHANNEL_BLOCK * geo.in_h * geo.in_w, CHANNEL_BLOCK * geo.out_h * geo.out_w)

    def _taps(self) -> tuple[int, int, np.ndarray]:
        """``(HB, WB, taps)``: the padded image's size and tap ``(c, ky, kx)``'s offset in one group of it."""
        geo = self.geo
        hb, wb = geo.in_h + geo.pad_top + geo.pad_bottom, geo.in_w + geo.pad_left + geo.pad_right
        taps = np.arange(geo.kernel_h)[:, None] * geo.dilation_h * wb + np.arange(geo.kernel_w) * geo.dilation_w
        return hb, wb, (np.arange(geo.group_in)[:, None, None] * (hb * wb) + taps).reshape(-1).astype(np.int64)

    def _pixels(self, w: np.ndarray, b: np.ndarray) -> None:
        """Pixel tiles: 64 (or 32) channels by ``PIXEL_ROWS`` pixels, taps read in place (measured here: 155-175 GFLOPS
        for 32-64 channels, where the channel-major tile loses a quarter to im2col copies or wide columns)."""
        geo = self.geo
        self.kind = "pixels"
        vectors = 4 if geo.group_out % (4 * LANES) == 0 else 2
        rows = PIXEL_ROWS[vectors]
        hb, wb, taps = self._taps()
        pixels = geo.out_h * geo.out_w
        p = np.arange(-(-pixels // rows) * rows)
        pix = np.where(p < pixels, p // geo.out_w * geo.stride_h * wb + p % geo.out_w * geo.stride_w, 0)
        geo_args = (geo.in_channels, geo.in_h, geo.in_w, geo.out_channels, geo.group, geo.out_h, geo.out_w,
                    geo.pad_top, geo.pad_left, hb, wb)
        self.driver = PIXEL_DRIVERS[vectors]
        self.args = (_pack_weights(w, geo.group, LANES * vectors), b, self.lo, self.hi, geo_args,
                     taps, pix.astype(np.int64))
        self.items = geo.batch
        self.estimate_us = geo.ops() / GEMM_GFLOPS / 1e3
        padded = any(geo.pads)
        self.scratch_sizes = (geo.in_channels * hb * wb if padded else 0, p.size * geo.out_channels)

    def _panels(self, w: np.ndarray, b: np.ndarray) -> None:
        """Channel-major tiles over panels of pixels: pointwise, wide or im2col (see the module docstring)."""
        geo = self.geo
        # stride 1: wide panels when their padding columns waste at most 1/8 of the work (measured: im2col copies
        # cost more on rows of 16 pixels and up, less on rows of 8 with a 3x3 kernel)
        wide = geo.stride_h == geo.stride_w == 1 and 8 * (geo.kernel_w - 1) * geo.dilation_w <= geo.out_w
        self.kind = "pointwise" if geo.is_pointwise else "wide" if wide else "im2col"
        hb, wb, taps = self._taps()
        mode = {"pointwise": POINTWISE, "wide": WIDE, "im2col": IM2COL}[self.kind]
        geo_args = (geo.in_channels, geo.in_h, geo.in_w, geo.out_channels, geo.group, geo.out_h, geo.out_w,
                    geo.stride_h, geo.stride_w, geo.pad_top, geo.pad_left, hb, wb, mode)
        bias = np.concatenate([b, np.zeros(MR, np.float32)])  # a tile reads MR values
        self.driver = _gemm_items
        self.args = (_pack_weights(w, geo.group, MR), bias, self.lo, self.hi, geo_args, taps,
                     np.arange(geo.depth, dtype=np.int64) * NR)
        grid = geo.out_h * (wb if mode == WIDE else geo.out_w)
        self.items = geo.batch * -(-grid // NR)
        self.estimate_us = geo.ops() / GEMM_GFLOPS / 1e3
        self.scratch_sizes = _gemm_scratch(geo_args, geo.depth)

    def _pixels_nhwc(self, w: np.ndarray, b: np.ndarray) -> None:
        """NHWC pixel tiles (:func:`_make_pixels_nhwc`): the output is written in place, no transpose; an item
        of several small images lets each weight panel serve all their pixels."""
        geo = self.geo
        self.kind = "pixels"
        c, og, k = geo.in_channels, geo.group_out, geo.depth
        tail = -(-(og % PIXEL_BLOCK) // LANES) % 4  # vectors of a group's last, narrower block of filters
        padded = any(geo.pads)
        hb, wb = (geo.in_h + geo.pad_top + geo.pad_bottom, geo.in_w + geo.pad_left + geo.pad_right)
        taps = ((np.arange(geo.kernel_h)[:, None, None] * geo.dilation_h * wb
                 + np.arange(geo.kernel_w)[:, None] * geo.dilation_w) * c + np.arange(geo.group_in)).reshape(-1)
        pixels = geo.out_h * geo.out_w
        items = max(-(-geo.rows // ITEM_PIXELS), min(geo.batch, 2))  # at least 2 to share among threads
        imgs = -(-geo.batch // items)  # images per item, evened out
        j, oy, ox = np.ix_(np.arange(imgs), np.arange(geo.out_h), np.arange(geo.out_w))
        pix = (j * hb * wb + oy * geo.stride_h * wb + ox * geo.stride_w) * c
        chunks = -(-k * PIXEL_BLOCK * F32_DTYPE.itemsize // PANEL_BYTES)
        geo_args = (geo.batch, c, geo.in_h, geo.in_w, geo.out_channels, geo.group, geo.pad_top, geo.pad_left, hb,
                    wb, pixels, imgs, -(-k // chunks), tail)
        wk = w.transpose(0, 2, 3, 1)  # filters in (ky, kx, c) order, as the taps
        self.driver = _pixels_nhwc
        self.args = (_pack_weights(wk, geo.group, PIXEL_BLOCK, tail * LANES),
                     np.concatenate([b, np.zeros(PIXEL_BLOCK, np.float32)]), self.lo, self.hi, geo_args,
                     taps.astype(np.int64), pix.reshape(-1).astype(np.int64))
        self.items = -(-geo.batch // imgs)
        self.estimate_us = geo.ops() / GEMM_GFLOPS / 1e3
        self.scratch_sizes = (imgs * hb * wb * c if padded else 0,)

    def _depthwise_nhwc(self, w: np.ndarray, b: np.ndarray) -> None:
        """NHWC depthwise 3x3 / 5x5 (:func:`_make_depthwise_nhwc`): channels along the vectors, no transpose, no
        copy."""
        geo = self.geo
        self.kind = "depthwise"
        c, taps = geo.in_channels, geo.taps
        blocks = -(-c // LANES)
        wt = np.zeros((blocks * LANES, taps), np.float32)
        wt[:c] = w.reshape(c, taps)
        dys, dxs = np.arange(geo.kernel_h) * geo.dilation_h, np.arange(geo.kernel_w) * geo.dilation_w
        # the columns whose taps all lie inside the row: ox SW - PL >= 0 and ox SW - PL + (KW - 1) DW < W
        ox_lo = min(geo.out_w, -(-geo.pad_left // geo.stride_w))
        ox_hi = max(ox_lo, min(geo.out_w, (geo.in_w - 1 - dxs[-1] + geo.pad_left) // geo.stride_w + 1))
        geo_args = (c, geo.in_h, geo.in_w, geo.out_h, geo.out_w, geo.stride_h, geo.stride_w, geo.pad_top,
                    geo.pad_left, ox_lo, ox_hi)
        self.driver = DEPTHWISE_NHWC[geo.kernel_h, geo.kernel_w]
        self.args = (np.ascontiguousarray(wt.reshape(blocks, LANES, taps).transpose(0, 2, 1)).reshape(-1),
                     np.concatenate([b, np.zeros(blocks * LANES - c, np.float32)]), self.lo, self.hi, geo_args,
                     ((dys[:, None] * geo.in_w + dxs) * c).reshape(-1).astype(np.int64), dys.astype(np.int64),
                     dxs.astype(np.int64), np.zeros(LANES, np.float32))
        self.items = geo.batch
        self.estimate_us = geo.ops() / DEPTHWISE_NHWC_GFLOPS / 1e3
        self.scratch_sizes = ()

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The convolution of float32 ``x`` (``layout``, shape as prepared), into ``out`` if given; returns it."""
        if not (isinstance(x, np.ndarray) and x.dtype == F32_DTYPE and x.shape == self.x_shape):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"x: expected a numpy.ndarray of float32, got {type(x).__name__}")
            if x.dtype != F32_DTYPE:
                raise TypeError(f"x: expected dtype float32, got {x.dtype}")
            raise ValueError(f"x: expected {self.layout} shape {self.x_shape} as prepared, got {x.shape}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        out = np.empty(self.out_shape, F32_DTYPE) if out is None else _validate.out(out, self.out_shape, F32_DTYPE,
                                                                                    x=x)
        self.run(x, out)
        return out

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        """The convolution of C-contiguous ``x`` into C-contiguous ``out``, unchecked. A call made while another
        thread runs the plan uses scratch of its own (the kept scratch serves one call at a time)."""
        if self.empty:
            return
        if not self._busy.acquire(blocking=False):
            self._run(x, out, [])
            return
        try:
            self._run(x, out, self.scratch)
        finally:
            self._busy.release()

    def _run(self, x: np.ndarray, out: np.ndarray, scratch: list) -> None:
        if self.inner is not None:
            if not scratch:  # the inner plan's input and output, kept
                shapes = (self.inner.x_shape, self.inner.out_shape)
                scratch.append(tuple(np.empty(shape, F32_DTYPE) for shape in shapes))
            xt, yt = scratch[0]
            there, back = (nhwc_to_nchw, nchw_to_nhwc) if self.layout == "NHWC" else (nchw_to_nhwc, nhwc_to_nchw)
            self.inner.run(there(x, xt), yt)
            back(yt, out)
            return
        parts = min(threads.get_num_threads(), int(self.estimate_us // threads.MIN_US_PER_THREAD))
        if parts <= 1 and scratch:  # the common case, with the least Python (batch 1 layers take ~10 us)
            self.driver(x, *self.args, 0, self.items, *scratch[0], out)
            return
        ranges = threads.split(self.items, max(1, parts))
        while len(scratch) < len(ranges):  # zeros: the padding borders in them are never written
            scratch.append(tuple(np.zeros(size, np.float32) for size in self.scratch_sizes))

        def part(i0: int, i1: int) -> None:
            self.driver(x, *self.args, i0, i1, *scratch[ranges.index((i0, i1))], out)

        threads.run_ranges(part, ranges)

    def entry(self) -> Entry | None:
        """The convolution as one unchecked compiled call on one thread (:mod:`kernels.entry`): input 0 ``x``,
        output 0 ``out``, with scratch of its own; None for the kinds that run another plan between transposes."""
        if self.empty:
            return empty_entry()
        if self.inner is not None:
            return None
        scratch = tuple(np.zeros(size, np.float32) for size in self.scratch_sizes)
        return Entry(self.driver, (In(0), *self.args, 0, self.items, *scratch, Out(0)))

    def __repr__(self) -> str:
        g = self.geo
        return (f"Conv2dFloat32Plan(kind={self.kind!r}, layout={self.layout!r}, x_shape={self.x_shape}, "
                f"out_shape={self.out_shape}, "
                f"kernel={g.kernel_h}x{g.kernel_w}, strides={(g.stride_h, g.stride_w)}, group={g.group})")


def _real(name: str, v: object, ndim: int) -> np.ndarray:
    """A float array of rank ``ndim`` (weights, bias) as C-contiguous float32."""
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of floats, got {type(v).__name__}")
    if v.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float dtype, got {v.dtype}")
    if v.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {v.shape}")
    return np.ascontiguousarray(v, np.float32)


def _pack_weights(w: np.ndarray, group: int, block: int, tail: int = 0) -> np.ndarray:
    """``w`` [O, ...] in tiles: group ``g``, block ``b`` of ``block`` filters, then ``k`` (``w[o]`` flat: ``(c, ky,
    kx)`` for OIHW), then filter.

    ``packed[((g blocks + b) K + k) block + r] = w[g O' + b block + r, k]`` (0 past ``O' = O / group``):
    ``block`` filters interleaved per k, as both tiles read them (the channel-major one
    broadcasts them one at a time, the pixel tile loads them as vectors). With ``tail``,
    a group's ``O' % block`` last filters make a block ``tail`` wide (``O' // block`` whole
    blocks, then ``K tail`` values per group).
    """
    o = w.shape[0]
    og, k = o // group, w[0].size
    whole = og // block if tail else -(-og // block)
    padded = np.zeros((group, whole * block + tail, k), np.float32)
    padded[:, :og] = w.reshape(group, og, k)
    head = padded[:, : whole * block].reshape(group, whole, block, k).transpose(0, 1, 3, 2).reshape(group, -1)
    rest = padded[:, whole * block :].transpose(0, 2, 1).reshape(group, -1)
    return np.ascontiguousarray(np.concatenate([head, rest], axis=1)).reshape(-1)


def conv2d_float32_plan(w: np.ndarray, x_shape: tuple[int, int, int, int], bias: np.ndarray | None = None, *,
                        strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
                        activation: str | tuple | None = None, layout: str = "NCHW") -> Conv2dFloat32Plan:
    """:func:`conv2d_float32` prepared for float32 activations of ``x_shape`` (in ``layout``): ``plan(x, out=None)``.

    ``plan.out_shape`` is ``[N, O, OH, OW]`` for "NCHW", ``[N, OH, OW, O]`` for "NHWC".
    """
    return Conv2dFloat32Plan(w, x_shape, bias, strides=strides, pads=pads, dilations=dilations, group=group,
                             activation=activation, layout=layout)


def conv2d_float32(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, *, strides=(1, 1),
                   pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, activation: str | tuple | None = None,
                   layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """Float32 convolution, ONNX Conv on NCHW or NHWC, with a fused clamp (formula in the module docstring).

    Parameters
    ----------
    x : float32 ndarray [N, C, H, W], or [N, H, W, C] with ``layout="NHWC"`` (copied once if not C-contiguous)
    w : float ndarray [O, C / group, KH, KW] (used as float32)
    bias : float ndarray [O], optional
    strides, dilations : int or (h, w) pair, >= 1
    pads : (top, left, bottom, right) as ONNX, (h, w), one int, or "same", "same_lower", "valid"
    group : positive divisor of C and O
    activation : None, "relu", "relu6" or ("clip", lo, hi)
    layout : "NCHW" or "NHWC", of ``x`` and the result (the weights stay OIHW)
    out : float32 C-contiguous ndarray [N, O, OH, OW] (NHWC: [N, OH, OW, O]), optional

    Returns float32 [N, O, OH, OW] (NHWC: [N, OH, OW, O]). To run one layer many times,
    prepare it once with :func:`conv2d_float32_plan`.
    """
    check_layout(layout)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray of float32, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D {layout} array, got shape {x.shape}")
    plan = Conv2dFloat32Plan(w, x.shape, bias, strides=strides, pads=pads, dilations=dilations, group=group,
                             activation=activation, layout=layout)
    return plan(x, out)
