"""AVX-512 VNNI depthwise convolution of NCHW planes (stride 1, dilation 1), requantized in registers.

No layout copy: each channel plane is convolved as NCHW stores it. It is copied
into a scratch plane ``u`` of width ``WP = PL + W + PR`` that holds the zero point
around it (int8 activations flipped to unsigned bytes, ``x ^ 0x80``, as in
``kernels.conv.depthwise_vnni``). In the flat index ``q = oy WP + ox`` of that
width, tap ``(ky, kx)`` of output ``q`` is ``u[q + ky WP + kx]``: the plane is a
1-D correlation with KH row offsets, whose ``KW - 1`` outputs per row past OW are
computed and dropped. With ``zu`` the zero point as stored in ``u`` and
``w' = w - w_zp`` (which must fit int8)::

    acc[q] = sum_{ky, kx} u[q + ky WP + kx] w'[ky, kx] + col_term,   col_term = col_bias - zu sum w'

Int32 lane ``i`` of the 64 bytes loaded from ``u[q0 + f ..]`` holds ``u[q .. q + 3]``
of output ``q = q0 + f + 4 i``, so one ``vpdpbusd`` against the broadcast taps
``w'[ky, 4 g .. 4 g + 3]`` (0 past KW) adds four of its multiply-adds. Four phases
``f < 4`` make 64 consecutive outputs from plain unaligned loads, no shuffle:
``KH ceil(KW / 4)`` ``vpdpbusd`` per 16 outputs.

With 9 or 25 multiply-adds per output the requantization is most of the work, so
it runs in float32 where that is provably exact (``kernels.epilogue.
single_precision_codes``): ``b = fma(float32(acc), m32, c32)``, code ``rint(b)``,
unless some lane of the 64 lies within ``eps`` of a tie; then (about 1 step in 100
for typical scales) the step is redone in float64 (``kernels.gemm.vnni.
rounded_codes``). Two saturating packs and one ``vpshufb`` put the 64 codes back in
order and a byte min / max clamps them to the code bounds. The codes go to a
second scratch plane, whose rows (the valid ``OW`` of each) are then copied out.
Scratch planes alternate, so that no load waits for a store just made.

Only int8 / uint8 outputs, where ``|acc + col_bias|`` cannot pass int32 (the int32
sums would wrap) and the codes fit int32 (``kernels.epilogue.codes_fit``), as
``kernels.conv.depthwise._planes_taps`` checks.
Only compiled when ``kernels.dispatch`` picks "conv_depthwise_nchw" "avx512-vnni".
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.conv.int8_driver import variant
from kernels.gemm.llvm_ir import (F32, I1, I8, I16, I32, I64, array_ptr, declare, emit_loop, is_array, low_bits, masked,
                                  splat)
from kernels.gemm.vnni import V8F64, V16F32, V16I32, declare_vpdpbusd, rounded_codes, single_codes

KERNELS = ((3, 3), (5, 5))  # (KH, KW) with a kernel here; stride 1 and dilation 1
CHUNK = 64  # outputs per step: 4 phases of 16 lanes
V64I8 = ir.VectorType(I8, 64)
V32I16 = ir.VectorType(I16, 32)
# after the packs, 128-bit lane L holds the codes of phase f, lane 4 L + i at byte 4 f + i: back to q order
_ORDER = ir.Constant(V64I8, [16 * (k // 16) + 4 * (k % 4) + (k % 16) // 4 for k in range(64)])


def groups(kw: int) -> int:
    """Tap quads per kernel row: 4 taps of a row go to one ``vpdpbusd`` lane."""
    return -(-kw // 4)


def pack_taps(centred: np.ndarray) -> np.ndarray:
    """Weights ``w' [C, KH, KW]`` (values in int8 range) as int32 ``[C, KH G]``, ``G = groups(KW)``.

    The bytes of ``taps[c, ky G + g]`` are ``w'[c, ky, 4 g + b]`` for ``b < 4``, 0 past KW.
    """
    c, kh, kw = centred.shape
    full = np.zeros((c, kh, 4 * groups(kw)), np.int8)
    full[:, :, :kw] = centred
    return np.ascontiguousarray(full).view(np.int32).reshape(c, -1)


@intrinsic
def copy_rows(typingctx, src, s_off, s_stride, dst, d_off, d_stride, rows, width, flip):
    """``dst[d_off + r d_stride + i] = src[s_off + r s_stride + i] ^ flip`` for ``r < rows``, ``i < width``.

    src, dst : uint8 / int8 flat, C-contiguous; the other arguments int64. Masked
    loads and stores: nothing outside the rows is read or written. Rows of up to 32
    bytes move as one 32-byte vector (64-byte ones, which always straddle two cache
    lines here, cost twice as much), longer ones in 64-byte segments.
    """
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.ndim == dst.ndim == 1
            and src.layout == dst.layout == "C" and src.dtype in (types.uint8, types.int8)
            and dst.dtype in (types.uint8, types.int8)):
        return None

    def codegen(context, builder, signature, args):
        src, s_off, s_stride, dst, d_off, d_stride, rows, width, flip = args
        tys = signature.args
        s_ptr = builder.gep(array_ptr(context, builder, tys[0], src, I8), [s_off])
        d_ptr = builder.gep(array_ptr(context, builder, tys[3], dst, I8), [d_off])
        one = ir.Constant(I32, 1)

        def copy(size: int) -> None:
            """Every row in segments of ``size`` bytes; the mask is made once per segment."""
            vec = ir.VectorType(I8, size)
            load, store = masked(builder, "load", vec), masked(builder, "store", vec)
            flip_bytes = splat(builder, builder.trunc(flip, I8), vec)
            step = ir.Constant(I64, size)

            def segment(k, state):
                at = builder.mul(k, step)
                left = builder.sub(width, at)
                bits = low_bits(builder, builder.select(builder.icmp_signed("<", left, step), left, step))
                mask = builder.trunc(bits, ir.IntType(size)) if size < 64 else bits
                mask = builder.bitcast(mask, ir.VectorType(I1, size))
                s_seg, d_seg = builder.gep(s_ptr, [at]), builder.gep(d_ptr, [at])

                def row(r, state_):
                    src_at = builder.bitcast(builder.gep(s_seg, [builder.mul(r, s_stride)]), vec.as_pointer())
                    v = builder.call(load, [src_at, one, mask, ir.Constant(vec, None)])
                    dst_at = builder.bitcast(builder.gep(d_seg, [builder.mul(r, d_stride)]), vec.as_pointer())
                    builder.call(store, [builder.xor(v, flip_bytes), dst_at, one, mask])
                    return state_

                emit_loop(builder, rows, I64, 0, row)
                return state

            segments = builder.sdiv(builder.add(width, ir.Constant(I64, size - 1)), step)
            emit_loop(builder, segments, I64, 0, segment)

        with builder.if_else(builder.icmp_signed("<=", width, ir.Constant(I64, 32))) as (narrow, wide):
            with narrow:
                copy(32)
            with wide:
                copy(64)
        return context.get_dummy_value()

    return types.void(src, types.int64, types.int64, dst, types.int64, types.int64, types.int64, types.int64,
                      types.int64), codegen


def _make_convolve(kh: int, kw: int, shifted: bool):
    """The intrinsic computing the flat outputs of one scratch plane (module docstring), ``kh x kw`` kernel.

    ``convolve(u, taps, t_off, col_term, mult, shift, zp, qlo, qhi, single, wp, count, v)``:

    u        : uint8 [>= 64 count + (kh - 1) wp + 4 G], the padded plane (past it: anything)
    taps     : int32 flat ``pack_taps``, the channel's at ``taps[t_off : t_off + kh G]``
    col_term : int64 (wrapping to int32); mult, shift, zp: float64 (``shift`` only when ``shifted``)
    qlo, qhi : int64 code bounds, within the output dtype's range
    single   : float32 [3] ``(m32, c32, limit)``, the channel's row of ``kernels.epilogue.single_precision_codes``:
               the sums are rounded in float32, and a chunk with a lane too near a tie is redone in float64
    wp       : the padded width; count: the chunks of 64 flat outputs to compute
    v        : uint8 / int8 [>= 64 count], the codes of flat output ``q`` at ``v[q]``
    """
    g_count = groups(kw)

    def typer(typingctx, u, taps, t_off, col_term, mult, shift, zp, qlo, qhi, single, wp, count, v):
        if not (is_array(u, types.uint8, 1) and is_array(taps, types.int32, 1) and is_array(single, types.float32, 1)
                and isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C"
                and v.dtype in (types.uint8, types.int8)):
            return None
        i64, f64 = types.int64, types.float64
        return types.void(u, taps, i64, i64, f64, f64, f64, i64, i64, single, i64, i64, v), codegen

    def codegen(context, builder, signature, args):
        u, taps, t_off, col_term, mult, shift, zp, qlo, qhi, single, wp, count, v = args
        tys = signature.args
        signed_out = tys[12].dtype == types.int8
        u_ptr = array_ptr(context, builder, tys[0], u, I8)
        t_ptr = builder.gep(array_ptr(context, builder, tys[1], taps, I32), [t_off])
        s_ptr = array_ptr(context, builder, tys[9], single, F32)
        v_ptr = array_ptr(context, builder, tys[12], v, I8)
        dot = declare_vpdpbusd(builder)
        byte = dot.function_type.args[1]
        weights = [builder.bitcast(splat(builder, builder.load(builder.gep(t_ptr, [ir.Constant(I64, i)])), V16I32),
                                   byte) for i in range(kh * g_count)]
        start = splat(builder, builder.trunc(col_term, I32), V16I32)
        factors32 = tuple(splat(builder, builder.load(builder.gep(s_ptr, [ir.Constant(I64, i)])), V16F32)
                          for i in range(3))
        factor = (splat(builder, mult, V8F64), splat(builder, shift, V8F64))
        zp_vec = splat(builder, zp, V8F64)
        q_lo, q_hi = (splat(builder, builder.trunc(b, I8), V64I8) for b in (qlo, qhi))
        pack_words = declare(builder, "llvm.x86.avx512.packssdw.512", ir.FunctionType(V32I16, [V16I32, V16I32]))
        pack_bytes = declare(builder, f"llvm.x86.avx512.pack{'ss' if signed_out else 'us'}wb.512",
                             ir.FunctionType(V64I8, [V32I16, V32I16]))
        order = declare(builder, "llvm.x86.avx512.pshuf.b.512", ir.FunctionType(V64I8, [V64I8, V64I8]))
        compare = builder.icmp_signed if signed_out else builder.icmp_unsigned
        row_offsets = [builder.mul(wp, ir.Constant(I64, ky)) for ky in range(kh)]

        def chunk(k, state):
            q0 = builder.mul(k, ir.Constant(I64, CHUNK))
            sums = []
            for f in range(4):
                acc = start
                for ky in range(kh):
                    base = builder.add(builder.add(q0, row_offsets[ky]), ir.Constant(I64, f))
                    for g in range(g_count):
                        at = builder.gep(u_ptr, [builder.add(base, ir.Constant(I64, 4 * g))])
                        data = builder.load(builder.bitcast(at, byte.as_pointer()), align=1)
                        acc = builder.call(dot, [acc, data, weights[ky * g_count + g]])
                sums.append(acc)
            codes = single_codes(builder, sums, lambda i: factors32,
                                 lambda i: rounded_codes(builder, sums[i], lambda h: factor, zp_vec, shifted=shifted))
            words = [builder.call(pack_words, codes[i: i + 2]) for i in (0, 2)]
            ordered = builder.call(order, [builder.call(pack_bytes, words), _ORDER])
            ordered = builder.select(compare("<", ordered, q_lo), q_lo, ordered)
            ordered = builder.select(compare(">", ordered, q_hi), q_hi, ordered)
            builder.store(ordered, builder.bitcast(builder.gep(v_ptr, [q0]), V64I8.as_pointer()), align=1)
            return state

        emit_loop(builder, count, I64, 0, chunk)
        return context.get_dummy_value()

    return intrinsic(typer)


def _make_driver(kh: int, kw: int, shifted: bool):
    convolve = _make_convolve(kh, kw, shifted)
    g_count = groups(kw)

    def depthwise_planes(x, pads, pad_byte, flip, taps, col_term, mult, shift, zp, qlo, qhi, single, p0, p1, out):
        """Planes ``p0 .. p1`` (``p = n C + c``) of a depthwise ``kh x kw`` convolution, stride 1, dilation 1.

        x       : uint8 or int8 [N, C, H, W] C-contiguous
        pads    : int64 (top, left, bottom, right); pad_byte the zero point as the scratch stores it
                  (``(zx & 0xFF) ^ flip``), flip 0x80 for int8 x, else 0
        taps    : ``pack_taps`` [C, KH G]; col_term int64 [C]; mult, shift float64 [>= C]
        zp, qlo, qhi : the output zero point and code bounds
        single  : float32 [C, 3], ``kernels.epilogue.single_precision_codes``
        out     : uint8 or int8 [N, C, OH, OW] C-contiguous
        Writes ``clip(rint(float64(acc) mult + shift + zp), qlo, qhi)`` (module docstring).

        Scratch planes go in pairs, so that no load waits for a store just made: plane
        ``p + 1`` is copied in before plane ``p`` is convolved, and the codes of plane
        ``p - 1`` are copied out after.
        """
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        pt, pl, pb, pr = pads[0], pads[1], pads[2], pads[3]
        wp = pl + w + pr
        oh = pt + h + pb - kh + 1
        ow = wp - kw + 1
        count = -(-(oh * wp) // CHUNK)
        u = np.full((2, (pt + h + pb) * wp + CHUNK + 4 * g_count), pad_byte, np.uint8)
        v = np.empty((2, count * CHUNK), out.dtype)
        xf = x.reshape(-1).view(np.uint8)
        of = out.reshape(-1)
        tf = taps.reshape(-1)
        inner = pt * wp + pl  # the image's first byte in a scratch plane
        if p0 < p1:
            copy_rows(xf, p0 * h * w, w, u[p0 % 2], inner, wp, h, w, flip)
        for p in range(p0, p1 + 1):
            if p + 1 < p1:
                copy_rows(xf, (p + 1) * h * w, w, u[(p + 1) % 2], inner, wp, h, w, flip)
            if p < p1:
                ch = p % c
                convolve(u[p % 2], tf, ch * kh * g_count, col_term[ch], mult[ch], shift[ch], zp, qlo, qhi,
                         single[ch], wp, count, v[p % 2])
            if p > p0:
                copy_rows(v[(p - 1) % 2], 0, wp, of, (p - 1) * oh * ow, ow, oh, ow, 0)

    return depthwise_planes


# keyed by (KH, KW, a nonzero shift)
DRIVERS = {(kh, kw, shifted): variant(__name__, f"depthwise_planes_{kh}x{kw}{'_shifted' * shifted}",
                                      _make_driver(kh, kw, shifted))
           for kh, kw in KERNELS for shifted in (False, True)}
