"""Max pooling (uint8, int8, float32), average pooling (quantized and float32) and max pooling of sign bits.

Max pools and float32 average pools (:func:`_pool_rows`) work where the input lies,
NCHW or NHWC, with no transposed copy: NCHW as ``N C`` planes of single elements,
NHWC as ``N`` images of C-element pixels. The window is separable: per output row,
the rows it covers are folded into one row (contiguous, vectorised), padded with the
fold's identity (-inf or the dtype minimum for max, so padding never wins; 0 for
sums), then that row's taps are folded into the output row. The folds are vector
loops written in LLVM IR (:func:`_vector_fold`), three rows or taps per pass, whose
tails are vectors too, since pool rows are short (7 to 112 elements).

* Max pools need no scales: ``x -> scale (x - zp)`` is increasing, so it commutes
  with max. Float max propagates NaN (a NaN in a window gives NaN). On ±1 bits (set
  bit = -1) the max is -1 only if every tap is -1: the AND of the words.
* Quantized average pools (NHWC, tap by tap with :func:`_fold_taps`) sum
  ``x - x_zero_point`` exactly in int32, skipping the padding (real zero), and
  rescale once, in float64, with ``kernels.epilogue.finish_tile`` (half to even,
  saturating). Float32 averages sum in float32 and divide by the tap count.

Rows of output pixels are split over ``kernels.threads`` when the work pays for it.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.conv.geometry import ConvGeometry, check_layout, conv_geometry, from_nhwc, pair, to_nhwc
from kernels.conv.layout import nchw_to_nhwc, nhwc_to_nchw, transpose_all, transpose_arguments
from kernels.entry import Entry, In, Out, empty_entry
from kernels.epilogue import QUANT, finish_tile
from kernels.gemm.int8 import INT32_MAX, check_zero_point
from kernels.gemm.llvm_ir import I64, array_ptr, emit_loop, is_array
from kernels.qtypes import qtype_of

QDTYPES = (np.uint8, np.int8)
MAX_DTYPES = (*QDTYPES, np.float32)
MAX_TAPS = INT32_MAX // 255  # |x - x_zero_point| <= 255, so this many taps cannot overflow the int32 sums
# Single-thread cost of the reductions, measured here: per output pixel and tap (loop overhead), and per
# byte read. kernels.threads splits the rows only when the estimated time pays for the threads.
US_PER_PIXEL_TAP = 0.01
BYTES_PER_US = 8000.0
SHORT_PLANE = 16  # global_avg_pool2d transposes NCHW planes of at most this many pixels (measured: 3x3 2x faster)
SHORT_ROW_BYTES = 64  # max and float average pools transpose NCHW rows up to one vector (measured: 1.2x to 15x faster)


@kernel
def _inside(i, a, b, p, size, count):
    """The ``j0 .. j1 - 1`` among ``0 .. count - 1`` whose position ``i a + j b - p`` lies in ``[0, size)``.

    With ``(i, a, b, count) = (o, S, D, K)``: the taps of output ``o`` inside the input;
    with ``(k, D, S, O)``: the outputs whose tap ``k`` is inside.
    """
    base = i * a - p
    j0 = max(0, -(base // b))
    return j0, max(j0, min(count, -((base - size) // b)))


@kernel
def _fewest_taps(outs, s, d, p, size, k):
    """The fewest taps inside ``[0, size)`` of any of ``outs`` outputs along one axis."""
    fewest = k
    for o in range(outs):
        k0, k1 = _inside(o, s, d, p, size, k)
        fewest = min(fewest, k1 - k0)
    return fewest


MAX, AND, ADD, DIV = 0, 1, 2, 3  # how _pool_rows (MAX, ADD) and _fold_taps (AND, ADD) combine a tap into the outputs


@kernel
def _fold_taps(x, n, oy, window, op, row):
    """Fold every tap inside ``x`` of output row ``(n, oy)`` into ``row`` ([OW * C]) with ``op``: AND or ADD.

    A row is reduced one tap at a time over all the outputs that tap reaches: with
    stride 1 their inputs are one contiguous run, otherwise one run of C per output.
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    channels = x.shape[3]
    ky0, ky1 = _inside(oy, sh, dh, pt, h, kh)
    for ky in range(ky0, ky1):
        src_row = x[n, oy * sh + ky * dh - pt].reshape(w * channels)
        for kx in range(kw):
            o0, o1 = _inside(kx, dw, sw, pl, w, ow)
            runs, length = (min(1, o1 - o0), (o1 - o0) * channels) if sw == 1 else (o1 - o0, channels)
            for o in range(o0, o0 + runs):
                dst = row[o * channels : o * channels + length]
                src = src_row[(o * sw + kx * dw - pl) * channels :]
                if op == AND:
                    for c in range(length):
                        dst[c] &= src[c]
                else:
                    for c in range(length):
                        dst[c] += src[c]


@kernel
def _and_rows(x, window, r0, r1, out):
    """Output rows ``r = n * OH + oy`` for ``r0 <= r < r1`` of an AND pool of sign bits.

    x : [N, H, W, words] C-contiguous uint64; out : [N, OH, OW, words] uint64::

        out[n, oy, ox, j] = AND of x[n, iy, ix, j] over the taps inside x,
        iy = oy * SH + ky * DH - PT,  ix = ox * SW + kx * DW - PL

    starting from all bits set. Every window must hold a tap inside ``x`` (the caller checks).
    """
    oh, ow, words = out.shape[1], out.shape[2], out.shape[3]
    for r in range(r0, r1):
        n, oy = r // oh, r % oh
        row = out[n, oy].reshape(ow * words)
        row[:] = np.uint64(2**64 - 1)
        _fold_taps(x, n, oy, window, AND, row)


@kernel
def _tap_ranges(outs, s, d, p, size, k):
    """``[outs, 2]``: per output ``o`` along one axis, the ``j0, j1`` of its taps ``o s + j d - p`` in ``[0, size)``
    (:func:`_inside`, computed once: its two divisions would cost more than a short row's work)."""
    ranges = np.empty((outs, 2), np.int64)
    for o in range(outs):
        ranges[o, 0], ranges[o, 1] = _inside(o, s, d, p, size, k)
    return ranges


def _vector_fold(op: int, accumulate: bool):
    """An intrinsic ``fold(src, a, b, c, taps, count, dst, d)`` that folds ``taps`` (1 to 3) runs of ``src``::

        dst.flat[d + i] = [dst.flat[d + i] op] src.flat[a + i] op src.flat[b + i] op src.flat[c + i]

    for ``i < count`` (the first one, two or three terms after ``op``, as ``taps`` says;
    ``dst`` taken in only if ``accumulate``, so a first fold need not initialise it).
    ``src`` and ``dst``: C-contiguous arrays of any rank, of one dtype (float32, uint8
    or int8), addressed by flat offsets: no array view is made per row, as each
    costs reference-count updates. It runs in vectors of 64 bytes, then the rest in
    one vector each of 32, 16, ... bytes as the bits of ``count`` say, so a pool's short
    rows (7 to 112 elements) stay vectorised: LLVM's loop vectoriser would leave the
    last 32 or fewer (8 lanes, unrolled 4 times) to scalar code, and masked vectors
    are slow here when their masked-off lanes cross into another page. MAX keeps a
    NaN (``x > y or x != x ? x : y``: the plain ``x > y ? x : y``, one x86 ``maxps``,
    would drop a NaN ``x``); ADD adds (integers wrap); DIV divides (one tap, into
    ``dst``: the means of an average pool). Generic LLVM IR only: it compiles for
    every CPU, with no dispatch entry.
    """

    def combine(builder, x, y, dtype):
        if op == ADD:
            return builder.fadd(x, y) if isinstance(dtype, types.Float) else builder.add(x, y)
        if op == DIV:
            if isinstance(dtype, types.Float):
                return builder.fdiv(x, y)
            return builder.sdiv(x, y) if dtype.signed else builder.udiv(x, y)
        if isinstance(dtype, types.Float):
            keep = builder.or_(builder.fcmp_ordered(">", x, y), builder.fcmp_unordered("uno", x, x))
        else:
            keep = (builder.icmp_signed if dtype.signed else builder.icmp_unsigned)(">", x, y)
        return builder.select(keep, x, y)

    def emit(builder, dtype, elem, s_ptr, offsets, n, d_ptr, d_off):
        """The loops for ``len(offsets)`` taps."""
        lanes = 64 * 8 // dtype.bitwidth

        def step(i, width):
            vt = ir.VectorType(elem, width).as_pointer()

            def load(ptr, off):
                return builder.load(builder.bitcast(builder.gep(ptr, [builder.add(off, i)]), vt), align=1)

            folded = load(s_ptr, offsets[0])
            for off in offsets[1:]:
                folded = combine(builder, folded, load(s_ptr, off), dtype)
            if accumulate:
                folded = combine(builder, load(d_ptr, d_off), folded, dtype)
            builder.store(folded, builder.bitcast(builder.gep(d_ptr, [builder.add(d_off, i)]), vt), align=1)

        def full(q, _accs):
            step(builder.mul(q, ir.Constant(I64, lanes)), lanes)
            return []

        vectors = builder.sdiv(n, ir.Constant(I64, lanes))
        emit_loop(builder, vectors, ir.VectorType(elem, lanes), 0, full)
        i = builder.mul(vectors, ir.Constant(I64, lanes))  # the rest: vectors of half, a quarter ... one element
        width = lanes // 2
        while width:
            take = builder.icmp_unsigned("!=", builder.and_(n, ir.Constant(I64, width)), ir.Constant(I64, 0))
            with builder.if_then(take):
                step(i, width)
            i = builder.add(i, builder.select(take, ir.Constant(I64, width), ir.Constant(I64, 0)))
            width //= 2

    @intrinsic
    def fold(typingctx, src, a, b, c, taps, count, dst, d):
        dtype = getattr(dst, "dtype", None)
        if (dtype not in FOLD_DTYPES or not is_array(src, dtype, src.ndim) or not is_array(dst, dtype, dst.ndim)
                or not all(isinstance(t, types.Integer) for t in (a, b, c, taps, count, d))):
            return None

        def codegen(context, builder, signature, args):
            src_v, a, b, c, taps, n, dst_v, d = args
            elem = context.get_value_type(dtype)
            s_ptr = array_ptr(context, builder, signature.args[0], src_v, elem)
            d_ptr = array_ptr(context, builder, signature.args[6], dst_v, elem)
            with builder.if_else(builder.icmp_signed("==", taps, ir.Constant(I64, 1))) as (one, more):
                with one:
                    emit(builder, dtype, elem, s_ptr, [a], n, d_ptr, d)
                with more, builder.if_else(builder.icmp_signed("==", taps, ir.Constant(I64, 2))) as (two, three):
                    with two:
                        emit(builder, dtype, elem, s_ptr, [a, b], n, d_ptr, d)
                    with three:
                        emit(builder, dtype, elem, s_ptr, [a, b, c], n, d_ptr, d)
            return context.get_dummy_value()

        return types.void(src, types.int64, types.int64, types.int64, types.int64, types.int64, dst,
                          types.int64), codegen

    return fold


FOLD_DTYPES = (types.float32, types.uint8, types.int8)
_MAX3, _ADD3, _MAX3_INTO, _ADD3_INTO = (_vector_fold(op, into) for into in (False, True) for op in (MAX, ADD))
_DIVIDE = _vector_fold(DIV, True)


@kernel
def _fold3(src, a, b, c, taps, count, op, first, dst, d):
    """``dst.flat[d + i] = [dst.flat[d + i] op] src.flat[a + i] op src.flat[b + i] op src.flat[c + i]`` for
    ``i < count`` (``taps`` of the three runs; ``dst`` read unless ``first``): op MAX (NaN-propagating) or ADD.
    """
    if op == MAX:
        if first:
            _MAX3(src, a, b, c, taps, count, dst, d)
        else:
            _MAX3_INTO(src, a, b, c, taps, count, dst, d)
    elif first:
        _ADD3(src, a, b, c, taps, count, dst, d)
    else:
        _ADD3_INTO(src, a, b, c, taps, count, dst, d)


@kernel
def _deinterleave(row, phases):
    """``phases[r, j] = row[j S + r]`` for ``S = len(phases)`` phases (tails beyond the row are left alone).

    With ``S = 2`` both phases are filled in one loop, which LLVM compiles to wide loads
    and shuffles (an interleaved group); a stride-2 read of its own would be a gather,
    which is slow on AVX-512.
    """
    stride, w = phases.shape[0], row.shape[0]
    if stride == 2:
        half = w // 2
        for j in range(half):
            phases[0, j] = row[2 * j]
            phases[1, j] = row[2 * j + 1]
        if w % 2:
            phases[0, half] = row[w - 1]
    else:
        for ix in range(w):
            phases[ix % stride, ix // stride] = row[ix]


@kernel
def _pool_rows(x, window, op, identity, counts, r0, r1, out):
    """Output rows ``r = p OH + oy``, ``r0 <= r < r1``, of a max (op MAX) or average (op ADD) pool.

    x : [P, H, W CS] C-contiguous: P images of W pixels of CS elements per row, i.e.
        NCHW as ``P = N C`` planes (CS = 1) or NHWC as ``P = N`` images (CS = C)
    out : [P OH OW CS] (flat) of x's dtype::

        MAX: out[p, oy, ox, c] = max x[p, iy, ix, c]                                    (NaN if any is NaN)
        ADD: out[p, oy, ox, c] = (sum x[p, iy, ix, c]) / counts[oy, ox]               (float32 sums)

    over the taps ``iy = oy SH + ky DH - PT, ix = ox SW + kx DW - PL`` inside ``x`` (``identity``,
    -inf, the dtype minimum or 0, if none). The window is separable: the inside input rows
    of output row ``oy`` are folded into one row, which lies in ``col`` between ``PL`` pixels
    and enough more on the right that hold ``identity``; then its taps are folded into
    the outputs, all of whose taps now lie in ``col``: no edge cases. Both passes read
    contiguous runs, three rows or taps at a time (:func:`_fold3`). Along the row: with
    CS > 1 and SW = 1, tap ``kx`` of all outputs is one run; with CS > 1 and SW > 1, one
    run of CS per output; with CS = 1 and SW > 1, ``col`` is first split into its SW
    phases (``col[j SW + q]`` at ``phases[q, j]``), in which tap ``kx`` of all outputs is
    one run.
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    cs = x.shape[2] // w
    wc = w * cs
    wp = max(pl + w, (ow - 1) * sw + (kw - 1) * dw + 1)  # the padded row's pixels
    col = np.full(wp * cs, identity, x.dtype)
    split = cs == 1 and sw > 1
    phases = np.empty((sw, -(-wp // sw)), x.dtype) if split else col.reshape(1, wp * cs)
    rows_in = _tap_ranges(oh, sh, dh, pt, h, kh)
    at = np.zeros(kw + 2, np.int64)  # tap k of output 0 (col pixel k DW) in phases.flat or col; + 2: _fold3 takes 3
    for k in range(kw):
        at[k] = k * dw % sw * phases.shape[1] + k * dw // sw if split else k * dw * cs
    p, oy = r0 // oh, r0 % oh  # of row r, stepped below: divisions cost more than a short row
    for r in range(r0, r1):
        ky0, ky1 = rows_in[oy, 0], rows_in[oy, 1]
        if ky1 == ky0:  # only with count_include_pad: a row of windows wholly in the padding
            col[pl * cs : (pl + w) * cs] = identity
        for ky in range(ky0, ky1, 3):
            row = (p * h + oy * sh + ky * dh - pt) * wc
            _fold3(x, row, row + dh * wc, row + 2 * dh * wc, min(3, ky1 - ky), wc, op, ky == ky0, col, pl * cs)
        if split:
            _deinterleave(col, phases)
        d = r * ow * cs  # where output (p, oy, 0) starts in out
        for kx in range(0, kw, 3):
            taps = min(3, kw - kx)
            if split:  # col[t + i SW] = phases.flat[at + i]
                _fold3(phases, at[kx], at[kx + 1], at[kx + 2], taps, ow, op, kx == 0, out, d)
            elif sw == 1:  # all the outputs' taps kx in one run
                _fold3(col, at[kx], at[kx + 1], at[kx + 2], taps, ow * cs, op, kx == 0, out, d)
            else:  # a run of CS per output
                for ox in range(ow):
                    step = ox * sw * cs
                    _fold3(col, at[kx] + step, at[kx + 1] + step, at[kx + 2] + step, taps, cs, op, kx == 0, out,
                           d + ox * cs)
        if op == ADD and cs == 1:
            _DIVIDE(counts, oy * ow, 0, 0, 1, ow, out, d)
        elif op == ADD:
            for ox in range(ow):
                count = counts[oy, ox]
                for c in range(cs):
                    out[d + ox * cs + c] /= count
        oy += 1
        if oy == oh:
            p, oy = p + 1, 0


@kernel
def _avg_rows(x, window, x_zp, padded_hw, x_scale, y_scale, zp, qmin, qmax, r0, r1, out):
    """Output rows ``r = n * OH + oy`` for ``r0 <= r < r1`` of a quantized average pool.

    x : [N, H, W, C] C-contiguous uint8 or int8; out : [N, OH, OW, C] of the same dtype.
    ``padded_hw`` is ``(H + PT + PB, W + PL + PR)`` to count the taps inside the padded
    input (count_include_pad), or ``(0, 0)`` to count those inside x::

        S = sum (x[n, iy, ix, c] - x_zp) over the taps inside x        (int32, exact)
        out[n, oy, ox, c] = clip(rint(S * (x_scale / (y_scale * count)) + zp), qmin, qmax)

    the second line being :func:`kernels.epilogue.finish_tile` in ``QUANT`` mode, once
    per run of outputs with the same count.
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    ph, pw = padded_hw
    channels = x.shape[3]
    inside_w = np.empty(ow, np.int64)
    count_w = np.empty(ow, np.int64)
    for ox in range(ow):
        k0, k1 = _inside(ox, sw, dw, pl, w, kw)
        inside_w[ox] = k1 - k0
        if pw:
            k0, k1 = _inside(ox, sw, dw, 0, pw, kw)
        count_w[ox] = k1 - k0
    sums = np.empty((ow, channels), np.int32)
    flat = sums.reshape(ow * channels)
    mult = np.empty(channels, np.float64)
    zero_i = np.zeros(channels, np.int64)
    zero_f = np.zeros(channels, np.float64)
    for r in range(r0, r1):
        n, oy = r // oh, r % oh
        ky0, ky1 = _inside(oy, sh, dh, pt, h, kh)
        count_h = ky1 - ky0
        if ph:
            k0, k1 = _inside(oy, sh, dh, 0, ph, kh)
            count_h = k1 - k0
        for ox in range(ow):
            sums[ox, :] = -x_zp * (ky1 - ky0) * inside_w[ox]
        _fold_taps(x, n, oy, window, ADD, flat)
        o0 = 0
        while o0 < ow:
            o1 = o0 + 1
            while o1 < ow and count_w[o1] == count_w[o0]:
                o1 += 1
            mult[:] = x_scale / (y_scale * (count_h * count_w[o0]))
            finish_tile(sums[o0:o1], o0, o1 - o0, 0, channels, zero_i, zero_i, zero_i, False, mult, zero_f,
                        -np.inf, np.inf, zp, qmin, qmax, QUANT, out[n, oy])
            o0 = o1


@kernel
def _global_avg(x, pixels, channels_last, x_zp, m, zp, qmin, qmax, n0, n1, out):
    """Images ``n0 .. n1 - 1`` of a quantized global average pool.

    x : [N, P * C] C-contiguous uint8 or int8, each image's ``P = H * W`` pixels of C
    channels (NHWC, ``channels_last``) or C planes of P pixels (NCHW); out : [N, C]::

        S = sum_p (x[n, p, c] - x_zp)                                   (int32, exact)
        out[n, c] = clip(rint(S * m + zp), qmin, qmax)                  (finish_tile, QUANT)
    """
    channels = out.shape[1]
    mult = np.full(channels, m)
    sums = np.empty((1, channels), np.int32)
    acc = sums[0]
    zero_i = np.zeros(channels, np.int64)
    zero_f = np.zeros(channels, np.float64)
    bias = -x_zp * pixels
    for n in range(n0, n1):
        image = x[n]
        if channels_last:  # accumulate whole pixels: vectorises over the channels
            acc[:] = bias
            p = 0
            while p + 4 <= pixels:  # four pixels per pass over acc: a quarter of its loads and stores
                s0, s1 = image[p * channels :], image[(p + 1) * channels :]
                s2, s3 = image[(p + 2) * channels :], image[(p + 3) * channels :]
                for c in range(channels):
                    acc[c] += (np.int32(s0[c]) + np.int32(s1[c])) + (np.int32(s2[c]) + np.int32(s3[c]))
                p += 4
            for q in range(p, pixels):
                src = image[q * channels :]
                for c in range(channels):
                    acc[c] += src[c]
        else:  # one contiguous plane per channel
            for c in range(channels):
                plane = image[c * pixels : (c + 1) * pixels]
                s = np.int32(bias)
                for p in range(pixels):
                    s += plane[p]
                acc[c] = s
        finish_tile(sums, n, 1, 0, channels, zero_i, zero_i, zero_i, False, mult, zero_f, -np.inf, np.inf, zp, qmin,
                    qmax, QUANT, out)


def _flag(name: str, value: object) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool (or 0 / 1), got {value!r}")


def _scale(name: str, value: object) -> float:
    """A positive, finite real scalar (a number, or an array of one element) as a float."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value > 0:
        return float(value)  # the common case, without building an array
    v = np.asarray(value)
    if v.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a real scalar, got dtype {v.dtype}")
    if v.size != 1 or v.ndim > 1:
        raise ValueError(f"{name}: expected a scalar, got shape {v.shape}")
    scale = float(v.reshape(()))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: expected a finite positive scale, got {scale}")
    return scale


def _window(shape_nhwc: tuple[int, ...], kernel_shape: object, strides: object, pads: object, dilations: object,
            ceil_mode: object, *, empty_ok: bool = False) -> ConvGeometry:
    """The pooling geometry of an NHWC shape, refusing windows that hold no input pixel (unless ``empty_ok``)."""
    kh, kw = pair("kernel_shape", kernel_shape, 1)
    channels = shape_nhwc[3]
    g = conv_geometry(shape_nhwc, (kh, kw), channels, channels, strides=strides, pads=pads, dilations=dilations,
                      ceil_mode=_flag("ceil_mode", ceil_mode), x_name="x", w_name="kernel_shape")
    if not empty_ok and (_fewest_taps(g.out_h, g.stride_h, g.dilation_h, g.pad_top, g.in_h, kh) == 0
                         or _fewest_taps(g.out_w, g.stride_w, g.dilation_w, g.pad_left, g.in_w, kw) == 0):
        raise ValueError(f"pads, dilations: a pooling window of the {g.in_h}x{g.in_w} input lies entirely in "
                         f"the padding {g.pads} (kernel {kh}x{kw}, dilations {(g.dilation_h, g.dilation_w)}); "
                         f"its result would be undefined")
    return g


def _run_rows(fn, g: ConvGeometry, itemsize: int, units: int) -> None:
    """``fn(u0, u1)`` over ``range(units)`` (output rows), split over threads when the work pays for them."""
    estimate_us = g.rows * g.taps * (US_PER_PIXEL_TAP + g.in_channels * itemsize / BYTES_PER_US)
    threads.run_tiled(lambda _p0, _p1, u0, u1: fn(u0, u1), 1, units, 1, estimate_us)


def _contiguous(x: object, dtypes: tuple) -> np.ndarray:
    """``x`` as a C-contiguous 4-D array of one of ``dtypes`` (a copy only when it is strided)."""
    if isinstance(x, np.ndarray) and not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return _validate.array("x", x, dtypes, 4)


def _nhwc_shape(x: np.ndarray, layout: str) -> tuple[int, int, int, int]:
    n, a, b, c = x.shape
    return (n, a, b, c) if layout == "NHWC" else (n, b, c, a)


def _pool(x: np.ndarray, layout: str, g: ConvGeometry, op: int, identity, counts: np.ndarray,
          out: object) -> np.ndarray:
    """:func:`_pool_rows` over ``x`` where it lies: NCHW as ``N C`` planes, NHWC as ``N`` images of C-element
    pixels; the result in ``x``'s layout, in ``out`` if given.

    NCHW rows of at most :data:`SHORT_ROW_BYTES` are transposed to NHWC and back instead:
    per-row costs dominate such rows, while pixels of C channels make long runs.
    """
    nchw = layout == "NCHW"
    shape = (g.batch, g.in_channels, g.out_h, g.out_w) if nchw else g.out_shape_nhwc
    y = np.empty(shape, x.dtype) if out is None else _checked_out(out, shape, x)
    if g.batch == 0:
        return y
    if nchw and g.in_w * x.itemsize <= SHORT_ROW_BYTES:
        return nhwc_to_nchw(_pool(nchw_to_nhwc(x), "NHWC", g, op, identity, counts, None), y)
    images = g.batch * g.in_channels if nchw else g.batch
    x3, y1 = x.reshape(images, g.in_h, -1), y.reshape(-1)
    window = g.window()
    _run_rows(lambda r0, r1: _pool_rows(x3, window, op, identity, counts, r0, r1, y1), g, x.itemsize,
              images * g.out_h)
    return y


@kernel
def _pool_all(x, images, window, op, identity, counts, out):
    """All output rows of :func:`_pool_rows` on one thread: ``x`` C-contiguous NCHW (``images = N C``) or NHWC
    (``images = N``), ``out`` C-contiguous, of any shapes holding those elements; ``identity`` a one-element array
    (an array, since generated source cannot spell -inf)."""
    h = window[0]
    x3 = x.reshape((images, h, x.size // max(images * h, 1)))
    _pool_rows(x3, window, op, identity[0], counts, 0, images * window[10], out.reshape(-1))


@kernel
def _pool_transposed(x, to_nhwc, x_nhwc, window, op, identity, counts, y_nhwc, to_nchw, out):
    """:func:`_pool_all` of NCHW ``x`` by way of NHWC: ``x`` into the scratch ``x_nhwc``, pooled into the scratch
    ``y_nhwc``, that into ``out`` (``to_nhwc``, ``to_nchw``: ``kernels.conv.layout.transpose_arguments``)."""
    transpose_all(x, to_nhwc[0], to_nhwc[1], to_nhwc[2], to_nhwc[3], x_nhwc)
    _pool_all(x_nhwc, to_nhwc[0], window, op, identity, counts, y_nhwc)
    transpose_all(y_nhwc, to_nchw[0], to_nchw[1], to_nchw[2], to_nchw[3], out)


class PoolPlan:
    """A max or float32 average pool prepared for inputs of one shape, dtype and layout: ``plan(x, out=None)`` and
    :meth:`entry`. Made by :func:`max_pool2d_plan` and :func:`avg_pool2d_float32_plan`."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, layout: str, g: ConvGeometry, op: int, identity,
                 counts: np.ndarray):
        self.shape, self.dtype, self.layout, self.g = shape, dtype, layout, g
        self._pool = (op, identity, counts)
        nchw = layout == "NCHW"
        self.out_shape = (g.batch, g.in_channels, g.out_h, g.out_w) if nchw else g.out_shape_nhwc
        self.transposed = nchw and g.in_w * dtype.itemsize <= SHORT_ROW_BYTES  # as _pool chooses

    def entry(self):
        """The pool as one unchecked call on one thread: input ``x`` (C-contiguous, the prepared shape and dtype),
        output the pooled C-contiguous array (checked by the caller); binds its own scratch."""
        g, (op, identity, counts) = self.g, self._pool
        if g.batch == 0:
            return empty_entry()
        identity = np.full(1, identity, self.dtype)
        if not self.transposed:
            images = g.batch * g.in_channels if self.layout == "NCHW" else g.batch
            return Entry(_pool_all, (In(0), images, g.window(), op, identity, counts, Out(0)))
        c = g.in_channels
        scratch = (np.zeros((g.batch, g.in_h, g.in_w, c), self.dtype), np.zeros(g.out_shape_nhwc, self.dtype))
        to_nhwc = transpose_arguments(self.dtype, g.batch, c, g.in_h * g.in_w)
        to_nchw = transpose_arguments(self.dtype, g.batch, g.out_h * g.out_w, c)
        return Entry(_pool_transposed, (In(0), to_nhwc, scratch[0], g.window(), op, identity, counts, scratch[1],
                                        to_nchw, Out(0)))

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The pool of ``x`` (the prepared shape and dtype; a strided ``x`` is copied once to C order)."""
        x = _contiguous(x, (self.dtype,))
        if x.shape != self.shape:
            raise ValueError(f"x: expected shape {self.shape} (as prepared), got {x.shape}")
        return _pool(x, self.layout, self.g, *self._pool, out)


def max_pool2d_plan(shape: tuple[int, int, int, int], dtype, kernel_shape: int | tuple[int, int], *,
                    strides: object = (1, 1), pads: object = (0, 0, 0, 0), dilations: object = (1, 1),
                    ceil_mode: bool = False, layout: str = "NCHW") -> PoolPlan:
    """:func:`max_pool2d` prepared for ``x`` of ``shape`` and ``dtype`` (float32, uint8 or int8) in ``layout``:
    ``plan(x, out=None)`` (the same values and errors), and ``plan.entry()``, the same call as a
    :class:`kernels.entry.Entry` (input ``x``, output ``y``)."""
    check_layout(layout)
    dtype = _pool_dtype(dtype, MAX_DTYPES)
    shape = _shape4(shape)
    g = _window(_layout_nhwc(shape, layout), kernel_shape, strides, pads, dilations, ceil_mode)
    return PoolPlan(shape, dtype, layout, g, MAX, _identity(dtype), np.ones((1, 1), dtype))


def avg_pool2d_float32_plan(shape: tuple[int, int, int, int], kernel_shape: int | tuple[int, int], *,
                            strides: object = (1, 1), pads: object = (0, 0, 0, 0), dilations: object = (1, 1),
                            ceil_mode: bool = False, count_include_pad: bool = False,
                            layout: str = "NCHW") -> PoolPlan:
    """:func:`avg_pool2d_float32` prepared for float32 ``x`` of ``shape`` in ``layout``, as :func:`max_pool2d_plan`."""
    check_layout(layout)
    shape = _shape4(shape)
    include = _flag("count_include_pad", count_include_pad)
    g = _window(_layout_nhwc(shape, layout), kernel_shape, strides, pads, dilations, ceil_mode, empty_ok=include)
    return PoolPlan(shape, np.dtype(np.float32), layout, g, ADD, np.float32(0), _counts(g, include))


def _pool_dtype(dtype: object, dtypes: tuple) -> np.dtype:
    if dtype not in dtypes:  # numpy.dtype compares equal to the scalar types and names
        raise TypeError(f"dtype: expected {' or '.join(np.dtype(d).name for d in dtypes)}, got {dtype!r}")
    return np.dtype(dtype)


def _shape4(shape: object) -> tuple[int, int, int, int]:
    if not (isinstance(shape, tuple) and len(shape) == 4
            and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape)):
        raise ValueError(f"shape: expected a 4-D shape, got {shape!r}")
    return tuple(int(d) for d in shape)


def _layout_nhwc(shape: tuple[int, int, int, int], layout: str) -> tuple[int, int, int, int]:
    n, a, b, c = shape
    return (n, a, b, c) if layout == "NHWC" else (n, b, c, a)


@kernel
def _global_all(x, to_nhwc, x_nhwc, pixels, nhwc, x_zp, m, zp, qmin, qmax, out):
    """A whole :func:`_global_avg` on one thread; NCHW ``x`` with ``to_nhwc`` (``transpose_arguments``, its first
    entry > 0) is first transposed into the scratch ``x_nhwc``."""
    n = out.shape[0]
    y = out.reshape((n, out.size // max(n, 1)))
    if to_nhwc[0]:
        transpose_all(x, to_nhwc[0], to_nhwc[1], to_nhwc[2], to_nhwc[3], x_nhwc)
        _global_avg(x_nhwc.reshape((n, x.size // max(n, 1))), pixels, True, x_zp, m, zp, qmin, qmax, 0, n, y)
    else:
        _global_avg(x.reshape((n, x.size // max(n, 1))), pixels, nhwc, x_zp, m, zp, qmin, qmax, 0, n, y)


class GlobalAvgPlan:
    """:func:`global_avg_pool2d` prepared for one input shape, dtype, layout and quantization:
    ``plan(x, out=None)`` and :meth:`entry`. Made by :func:`global_avg_pool2d_plan`."""

    def __init__(self, shape, dtype, x_scale, x_zero_point, y_scale, y_zero_point, layout):
        check_layout(layout)
        self.dtype, self.shape, self.layout = _pool_dtype(dtype, QDTYPES), _shape4(shape), layout
        self._quantization = (x_scale, x_zero_point, y_scale, y_zero_point)
        xs, x_zp, ys, y_zp, qmin, qmax = _quantization(self.dtype, *self._quantization)
        if min(self.shape[1:]) < 1:  # a batch of 0 images is allowed: an empty output
            raise ValueError(f"shape: expected non-empty images, got {self.shape}")
        nhwc = layout == "NHWC"
        n, c = self.shape[0], self.shape[3 if nhwc else 1]
        pixels = self.shape[1] * self.shape[2] if nhwc else self.shape[2] * self.shape[3]
        if pixels > MAX_TAPS:
            raise ValueError(f"x: at most {MAX_TAPS} pixels per image (int32 sums), got {pixels}")
        self.out_shape = (n, 1, 1, c) if nhwc else (n, c, 1, 1)
        self._short = not nhwc and pixels <= SHORT_PLANE  # transposed first, as global_avg_pool2d does
        self._to_nhwc = transpose_arguments(self.dtype, n, c, pixels) if self._short else (0, 0, 0, 0)
        self._scalars = (pixels, nhwc, x_zp, xs / (ys * float(pixels)), y_zp, qmin, qmax)

    def entry(self):
        """The pool as one unchecked call on one thread: input ``x`` (C-contiguous, the prepared shape and dtype),
        output ``y`` (C-contiguous, ``[N, C, 1, 1]`` or ``[N, 1, 1, C]``), checked by the caller."""
        if self.shape[0] == 0:
            return empty_entry()
        scratch = np.zeros(self.shape if self._short else 0, self.dtype)
        return Entry(_global_all, (In(0), self._to_nhwc, scratch, *self._scalars, Out(0)))

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The pool of ``x`` (the prepared shape and dtype)."""
        if isinstance(x, np.ndarray) and x.shape != self.shape:
            raise ValueError(f"x: expected shape {self.shape} (as prepared), got {x.shape}")
        return global_avg_pool2d(x, *self._quantization, layout=self.layout, out=out)


def global_avg_pool2d_plan(shape: tuple[int, int, int, int], dtype, x_scale: float, x_zero_point: int,
                           y_scale: float, y_zero_point: int, *, layout: str = "NCHW") -> GlobalAvgPlan:
    """:func:`global_avg_pool2d` prepared for ``x`` of ``shape`` and ``dtype`` (uint8 or int8) in ``layout``:
    ``plan(x, out=None)``, and ``plan.entry()``, the same call as a :class:`kernels.entry.Entry`."""
    return GlobalAvgPlan(shape, dtype, x_scale, x_zero_point, y_scale, y_zero_point, layout)


def _counts(g: ConvGeometry, include_pad: bool) -> np.ndarray:
    """float32 ``[OH, OW]``: the taps of each output inside x, or inside the padded input with ``include_pad``,
    as a product of the counts along each axis (exact: small integers)."""
    if include_pad:
        ranges = (_tap_ranges(g.out_h, g.stride_h, g.dilation_h, 0, g.in_h + g.pad_top + g.pad_bottom, g.kernel_h),
                  _tap_ranges(g.out_w, g.stride_w, g.dilation_w, 0, g.in_w + g.pad_left + g.pad_right, g.kernel_w))
    else:
        ranges = (_tap_ranges(g.out_h, g.stride_h, g.dilation_h, g.pad_top, g.in_h, g.kernel_h),
                  _tap_ranges(g.out_w, g.stride_w, g.dilation_w, g.pad_left, g.in_w, g.kernel_w))
    count_h, count_w = (r[:, 1] - r[:, 0] for r in ranges)
    return np.outer(count_h, count_w).astype(np.float32)


def _identity(dtype: np.dtype):
    """The identity of max in ``dtype``: -inf for floats (so padding never wins), else the dtype minimum."""
    return dtype.type(-np.inf) if dtype.kind == "f" else dtype.type(np.iinfo(dtype).min)


def _checked_out(out: object, shape: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """The caller's ``out``: shape, ``x``'s dtype, C-contiguous, writeable, and apart from ``x``."""
    out = _validate.out(out, shape, x.dtype)
    if np.may_share_memory(out, x):
        raise ValueError("out: must not overlap the input")
    return out


def _output(out: object, x: np.ndarray, shape_nhwc: tuple[int, ...], layout: str) -> np.ndarray:
    """Where the kernel writes its NHWC result: ``out`` itself for NHWC, else a scratch array."""
    if out is None:
        return np.empty(shape_nhwc, x.dtype)
    n, h, w, c = shape_nhwc
    out = _checked_out(out, (n, c, h, w) if layout == "NCHW" else shape_nhwc, x)
    return out if layout == "NHWC" else np.empty(shape_nhwc, x.dtype)


def _deliver(y: np.ndarray, out: np.ndarray | None, layout: str) -> np.ndarray:
    """The NHWC result ``y`` in the caller's layout, in ``out`` when given."""
    if out is y:
        return out
    return from_nhwc(y, layout, out)


def max_pool2d(x: np.ndarray, kernel_shape: int | tuple[int, int], *, strides: object = (1, 1),
               pads: object = (0, 0, 0, 0), dilations: object = (1, 1), ceil_mode: bool = False,
               layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """ONNX MaxPool of a float32 activation, or of a quantized one (exact: max commutes with dequantization).

    ::

        y[n, c, oy, ox] = max x[n, c, oy * SH + ky * DH - PT, ox * SW + kx * DW - PL]

    over the ``ky < KH, kx < KW`` whose position is inside ``x``; padding is never a
    candidate (the max starts from -inf, or the dtype minimum), so a window of -inf
    gives -inf. Computed where ``x`` lies, in either layout, without a transposed copy
    (but for NCHW rows of at most 64 bytes, where a transpose to NHWC and back is faster).

    NaN: a NaN anywhere in a window makes that output NaN (as ``numpy.maximum`` or
    PyTorch). ONNX Runtime 1.32 depends on the tap order here: its undilated MaxPool
    (MLAS) keeps a NaN only when it is the last tap it reads (row-major), its dilated
    one only when it is the first; and where a window has padding, ORT starts from
    -FLT_MAX, so an all -inf window gives -3.4e38 there. Without NaN and all -inf
    windows, results equal ORT's exactly (tested).

    Parameters
    ----------
    x : float32, uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``);
        a strided ``x`` is copied once to C order
    kernel_shape : int or (KH, KW)
    strides, pads, dilations, ceil_mode : as ONNX MaxPool (strides default 1); ``pads`` in every
        form of :mod:`kernels.conv.geometry`: ``(top, left, bottom, right)``, ``(ph, pw)``, one int,
        ``"valid"``, ``"same"`` (SAME_UPPER) or ``"same_lower"``
    layout : "NCHW" or "NHWC", of ``x`` and of the result
    out : C-contiguous ndarray of the result's shape and ``x``'s dtype, not overlapping ``x``, optional

    Returns
    -------
    ndarray of ``x``'s dtype, [N, C, OH, OW] or [N, OH, OW, C] (``out`` if given). A window
    lying wholly in the padding (large pads or dilations) raises ``ValueError``.
    """
    check_layout(layout)
    x = _contiguous(x, MAX_DTYPES)
    g = _window(_nhwc_shape(x, layout), kernel_shape, strides, pads, dilations, ceil_mode)
    return _pool(x, layout, g, MAX, _identity(x.dtype), np.ones((1, 1), x.dtype), out)  # no counts: no means


def max_pool2d_bits(x_bits: np.ndarray, kernel_shape: int | tuple[int, int], *, strides: object = (1, 1),
                    pads: object = (0, 0, 0, 0), dilations: object = (1, 1), ceil_mode: bool = False,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Max pool of ±1 channels packed as sign bits: the AND of the window's words.

    ``x_bits`` is uint64 ``[N, H, W, words]`` NHWC, as ``kernels.pack_bits(x_nhwc, axis=-1)``
    makes (set bit = -1). The max of ±1 values is -1 only if all are -1, so::

        y[n, oy, ox, j] = AND of x_bits[n, oy * SH + ky * DH - PT, ox * SW + kx * DW - PL, j]

    over the taps inside the input (padding is ignored). Zero padding bits stay zero.
    The attributes are those of :func:`max_pool2d`; NHWC only (the bits run along the
    channels). Returns uint64 ``[N, OH, OW, words]`` (in ``out`` if given).
    """
    xb = _validate.array("x_bits", x_bits, (np.uint64,), 4)
    g = _window(xb.shape, kernel_shape, strides, pads, dilations, ceil_mode)
    y = np.empty(g.out_shape_nhwc, xb.dtype) if out is None else _checked_out(out, g.out_shape_nhwc, xb)
    _run_rows(lambda r0, r1: _and_rows(xb, g.window(), r0, r1, y), g, 8, g.batch * g.out_h)
    return y


def _quantization(dtype: np.dtype, x_scale: object, x_zero_point: object, y_scale: object,
                  y_zero_point: object) -> tuple[float, int, float, float, float, float]:
    """Checked ``(x_scale, x_zero_point, y_scale, y_zero_point, qmin, qmax)`` of ``dtype`` values."""
    q = qtype_of(dtype)
    return (_scale("x_scale", x_scale), check_zero_point("x_zero_point", x_zero_point, dtype),
            _scale("y_scale", y_scale), float(check_zero_point("y_zero_point", y_zero_point, dtype)),
            float(q.qmin), float(q.qmax))


def avg_pool2d(x: np.ndarray, kernel_shape: int | tuple[int, int], x_scale: float, x_zero_point: int,
               y_scale: float, y_zero_point: int, *, strides: object = (1, 1), pads: object = (0, 0, 0, 0),
               dilations: object = (1, 1), ceil_mode: bool = False, count_include_pad: bool = False,
               layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """Quantized average pool, as com.microsoft QLinearAveragePool (ONNX AveragePool on dequantized values).

    For each output pixel, over the taps ``(ky, kx)`` of its window (positions as in
    :func:`max_pool2d`)::

        S     = sum (x - x_zero_point) over the taps inside x               exact integer
        count = number of taps inside x, or, with count_include_pad, inside the padded
                input (a padded tap is x_zero_point, adding 0 to S)
        y     = saturate(rint(S * m + y_zero_point)),   m = x_scale / (y_scale * count)

    ``m`` is formed in float64 (``float(x_scale) / (float(y_scale) * count)``), the
    product ``S * m`` too, ``rint`` rounds half to even, and ``saturate`` clips to
    ``x``'s dtype: ``kernels.epilogue.finish_tile`` on the exact sums, bit for bit
    ``kernels.reference.pool.avg_pool2d_ref``.

    Differences from ONNX Runtime's QLinearAveragePool: ORT dequantizes to float32 and
    divides in float32 (``nearbyintf(sum_f32(x_scale (x - zp)) / count / y_scale + zp)``),
    so a value within float32 rounding of a half may round the other way (off by 1);
    ORT has no ``dilations``; and with ``ceil_mode`` and ``count_include_pad`` ORT
    divides by ``KH * KW`` even where the window overhangs the padded input, whereas
    this (like ONNX AveragePool's reference) counts only taps inside the padded input.

    Parameters
    ----------
    x : uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``)
    kernel_shape, strides, pads, dilations, ceil_mode, layout : as :func:`max_pool2d`
    x_scale, y_scale : positive finite scalars
    x_zero_point, y_zero_point : ints in the range of ``x``'s dtype
    count_include_pad : bool, default False (ONNX)
    out : ndarray of the result's shape and ``x``'s dtype, optional

    Returns
    -------
    ndarray of ``x``'s dtype, [N, C, OH, OW] or [N, OH, OW, C]. Without
    ``count_include_pad``, a window lying wholly in the padding raises ``ValueError``.
    """
    check_layout(layout)
    xh = to_nhwc("x", x, QDTYPES, layout)
    xs, x_zp, ys, y_zp, qmin, qmax = _quantization(xh.dtype, x_scale, x_zero_point, y_scale, y_zero_point)
    include = _flag("count_include_pad", count_include_pad)
    g = _window(xh.shape, kernel_shape, strides, pads, dilations, ceil_mode, empty_ok=include)
    if g.taps > MAX_TAPS:
        raise ValueError(f"kernel_shape: at most {MAX_TAPS} taps (int32 sums), got {g.kernel_h}x{g.kernel_w}")
    padded_hw = (g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right) if include else (0, 0)
    y = _output(out, xh, g.out_shape_nhwc, layout)
    _run_rows(lambda r0, r1: _avg_rows(xh, g.window(), x_zp, padded_hw, xs, ys, y_zp, qmin, qmax, r0, r1, y), g, 1,
              g.batch * g.out_h)
    return _deliver(y, out, layout)


def avg_pool2d_float32(x: np.ndarray, kernel_shape: int | tuple[int, int], *, strides: object = (1, 1),
                       pads: object = (0, 0, 0, 0), dilations: object = (1, 1), ceil_mode: bool = False,
                       count_include_pad: bool = False, layout: str = "NCHW",
                       out: np.ndarray | None = None) -> np.ndarray:
    """ONNX AveragePool of a float32 activation.

    For each output pixel, over the taps ``(ky, kx)`` of its window (positions as in
    :func:`max_pool2d`)::

        y     = (sum of x over the taps inside x) / count                   float32
        count = number of taps inside x, or, with count_include_pad, inside the padded
                input (a padded tap is 0); taps past the padded input (ceil_mode) never count

    The window is separable, and so is ``count`` (``count_h[oy] * count_w[ox]``). Sums
    are float32, over the window's rows first, then along the row, so they round
    differently from ONNX Runtime's row-major sums: results agree to float32 rounding.
    NaN and infinities propagate as in any sum. Layouts as in :func:`max_pool2d`.

    Parameters
    ----------
    x : float32 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``)
    kernel_shape, strides, pads, dilations, ceil_mode, layout : as :func:`max_pool2d`
    count_include_pad : bool, default False (ONNX)
    out : float32 ndarray of the result's shape, optional

    Returns
    -------
    float32 ndarray, [N, C, OH, OW] or [N, OH, OW, C] (``out`` if given). Without
    ``count_include_pad``, a window lying wholly in the padding raises ``ValueError``.
    """
    check_layout(layout)
    x = _contiguous(x, (np.float32,))
    include = _flag("count_include_pad", count_include_pad)
    g = _window(_nhwc_shape(x, layout), kernel_shape, strides, pads, dilations, ceil_mode, empty_ok=include)
    return _pool(x, layout, g, ADD, np.float32(0), _counts(g, include), out)


def global_avg_pool2d(x: np.ndarray, x_scale: float, x_zero_point: int, y_scale: float, y_zero_point: int, *,
                      layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """Quantized global average pool, as com.microsoft QLinearGlobalAveragePool.

    :func:`avg_pool2d` with one window covering the whole image (``count = H * W``)::

        y[n, c] = saturate(rint(sum_{h, w} (x[n, c, h, w] - x_zero_point) * m + y_zero_point)),
        m = float(x_scale) / (float(y_scale) * H * W)

    ONNX Runtime sums exactly too, but forms ``m`` and the product in float32, so a
    result within float32 rounding of a half may differ by 1.

    The output of both layouts is the same ``[N, C]`` memory, so NCHW input is summed
    plane by plane where it lies rather than transposed (there is no window to walk),
    unless its planes are too short for vectors (``H * W <= 16``, e.g. 3x3): then one
    fast transpose to NHWC and sums over whole pixels take half the time.

    Parameters
    ----------
    x : uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``), H * W <= 8421504
    x_scale, y_scale : positive finite scalars
    x_zero_point, y_zero_point : ints in the range of ``x``'s dtype
    out : ndarray of shape [N, C, 1, 1] (NCHW) or [N, 1, 1, C] (NHWC) and ``x``'s dtype, optional

    Returns
    -------
    ndarray of ``x``'s dtype, [N, C, 1, 1] or [N, 1, 1, C].
    """
    check_layout(layout)
    if isinstance(x, np.ndarray) and not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    x = _validate.array("x", x, QDTYPES, 4)
    xs, x_zp, ys, y_zp, qmin, qmax = _quantization(x.dtype, x_scale, x_zero_point, y_scale, y_zero_point)
    nhwc = layout == "NHWC"
    if not nhwc and min(x.shape) > 0 and x.shape[2] * x.shape[3] <= SHORT_PLANE:
        x, nhwc = nchw_to_nhwc(x), True  # too short to sum as planes; the [N, C] output is the same memory
    n, c = x.shape[0], x.shape[3 if nhwc else 1]
    pixels = x.shape[1] * x.shape[2] if nhwc else x.shape[2] * x.shape[3]
    if min(x.shape[1:]) < 1:  # a batch of 0 images is allowed: an empty output
        raise ValueError(f"x: expected non-empty images, got shape {x.shape}")
    if pixels > MAX_TAPS:
        raise ValueError(f"x: at most {MAX_TAPS} pixels per image (int32 sums), got {pixels}")
    shape = (n, 1, 1, c) if layout == "NHWC" else (n, c, 1, 1)
    out = np.empty(shape, x.dtype) if out is None else _checked_out(out, shape, x)
    if n == 0:
        return out
    m = xs / (ys * float(pixels))
    images, y = x.reshape(n, pixels * c), out.reshape(n, c)
    threads.run_tiled(lambda _p0, _p1, n0, n1: _global_avg(images, pixels, nhwc, x_zp, m, y_zp, qmin, qmax, n0, n1, y),
                      1, n, 1, x.size / BYTES_PER_US)
    return out
