"""AVX-512 VNNI depthwise convolution (3x3 or 5x5, strides 1 or 2, dilation 1), requantized in registers.

With ``u`` the activations as unsigned bytes (int8 ones plus 128, by ``x ^ 0x80``),
``zu`` their zero point and ``w' = w - w_zp`` the centred weights, which must fit
int8, the accumulator of ``kernels.conv.depthwise`` is::

    acc[m, c] = sum_{ky, kx} u[.., iy, ix, c] * w'[c, ky, kx] - zu * sum_{ky, kx} w'[c, ky, kx]

where the padding holds ``zu``: the correction is a per-channel constant, folded
with an int32 bias into ``col_term`` as in the GEMM epilogue.

One ``vpdpbusd`` lane does 4 multiply-adds of one channel. A *column quad* of
input column ``ix`` and 16 channels holds, in lane ``c``, the bytes
``u[y + 4g + b, ix, c]`` (``b < 4``) of kernel rows ``4g .. 4g + 3`` (``g < G =
ceil(KH / 4)``; rows past KH read nothing, their weights are 0). Output pixel
``ox`` of a 16-channel vector is then ``KW * G`` ``vpdpbusd`` of the quads of columns
``ox SW - PL + kx`` against pre-interleaved weights (``pack_quads``). Walking
``ox`` left to right, the quads of ``KW - SW`` columns carry over in registers to
the next pixel, so each column is built once (``SW`` new ones per pixel), from
``4 G`` byte loads widened and shifted into place. Only the pixels at the left
and right borders test whether their columns lie inside the image; the interior
ones go ``UNROLL`` per iteration, their sums first, so that their epilogues
overlap. With only 9 or 25 multiply-adds per output the epilogue is most of the
work: the sums of a float32 output go through ``kernels.gemm.vnni.requantize`` (the
epilogue of ``make_tile_finish``), those of an int8 / uint8 output through
``kernels.gemm.vnni.single_codes`` (float32 where that is exact, float64 where not)
and an integer clamp; a zero ``shift`` is skipped at compile time. Masked stores
write them; nothing goes through memory in between.

Only compiled when ``kernels.dispatch`` picks "conv_depthwise" "avx512-vnni".
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.conv.int8_driver import variant
from kernels.gemm.llvm_ir import (F32, F64, I1, I8, I32, I64, array_ptr, declare, emit_loop, is_array, load_vector,
                                  masked, splat)
from kernels.gemm.vnni import V8F64, V16F32, V16I32, declare_vpdpbusd, requantize, rounded_codes, single_codes

LANES = 16  # channels per vector
KERNELS = ((3, 3), (5, 5))  # (KH, KW) with a VNNI kernel; strides 1 or 2 each way, dilation 1
STRIDES = (1, 2)
UNROLL = 2  # interior pixels per iteration, 3x3 kernels with an epilogue (5x5: short of registers)
V16I8 = ir.VectorType(I8, LANES)
V64I8 = ir.VectorType(I8, 64)
_OUT = {types.int32: I32, types.float32: F32, types.uint8: I8, types.int8: I8}
# vpshufb control taking byte l of each 128-bit lane to byte 4 l + b (l = 4 lane + i), and the bytes it fills
_CONTROLS = [ir.Constant(V64I8, [4 * (k // 16) + (k % 16) // 4 if k % 4 == b else 0x80 - 256 for k in range(64)])
             for b in range(4)]
_BYTES = [ir.Constant(ir.VectorType(I1, 64), [k % 4 == b for k in range(64)]) for b in range(4)]


def groups(kh: int) -> int:
    """Column quads per column: kernel rows go 4 to a ``vpdpbusd`` lane."""
    return -(-kh // 4)


def pack_quads(centred: np.ndarray) -> np.ndarray:
    """Weights ``w' [C, KH, KW]`` (int values in int8 range) as int8 ``[ceil(C / 16), KW G, 64]``.

    ``quads[v, kx G + g, 4 l + b] = w'[16 v + l, 4 g + b, kx]``, 0 past KH and C: the
    weight vector that meets the quad ``g`` of column ``kx`` for channels ``16 v ..``.
    """
    c, kh, kw = centred.shape
    g = groups(kh)
    vectors = -(-c // LANES)
    full = np.zeros((vectors * LANES, 4 * g, kw), np.int8)
    full[:c, :kh] = centred
    # [v, l, g, b, kx] -> [v, kx, g, l, b]
    return np.ascontiguousarray(full.reshape(vectors, LANES, g, 4, kw).transpose(0, 4, 2, 1, 3)
                                .reshape(vectors, kw * g, 4 * LANES))


def _make_row(kh: int, kw: int, sw: int, signed: bool, shifted: bool):
    """The intrinsic computing one output row (module docstring) for a ``kh x kw`` kernel, stride ``sw``.

    ``row(x, pad, offsets, zq, quads, col_term, mult, shift, lo, hi, zp, qlo, qhi, single, c, w_in, ow, pl, v0, v1,
    out, o_off)``:

    x        : uint8 [N H W C] flat, NHWC (int8 data viewed as uint8 when ``signed``)
    pad      : uint8 [>= W C], every byte the zero point (as stored in x): the padding rows
    offsets  : int64 [KH], offset in x of input row ``ky`` of the window, or -1 for a padding row
    zq       : int64, the zero-point byte times 0x01010101 (the quad of a padding column)
    quads    : int8 flat ``pack_quads``
    col_term : int32 [>= 16 v1]; mult, shift float64 [>= 16 v1] (unused for int32 out)
    lo, hi, zp : float64 epilogue bounds and zero point (unused for int32 out); ``shift`` is added only
               when ``shifted`` (else it is all zero)
    qlo, qhi : int64 ``rint(lo + zp)``, ``rint(hi + zp)``: the codes of an int8 / uint8 output are clamped to
               them (``kernels.gemm.vnni.rounded_codes``; the caller checks that ``|y mult + shift + zp| < 2**31``)
    single   : float32 ``kernels.epilogue.single_precision_table`` [>= 48 v1] of the unclamped codes: an int8 /
               uint8 output's codes are rounded in float32 where that is exact (``kernels.gemm.vnni.single_codes``)
    c, w_in, ow, pl : channels, input width, output width, left padding
    v0, v1   : channel vectors ``v0 .. v1`` (of 16 channels) to compute
    out      : flat int32 / float32 / uint8 / int8; pixel ``ox`` channel ``k`` at ``out[o_off + ox c + k]``
    """
    g_count = groups(kh)
    carried = kw - sw  # columns shared with the next output pixel

    def typer(typingctx, x, pad, offsets, zq, quads, col_term, mult, shift, lo, hi, zp, qlo, qhi, single, c, w_in, ow,
              pl, v0, v1, out, o_off):
        if not (is_array(x, types.uint8, 1) and is_array(pad, types.uint8, 1) and is_array(offsets, types.int64, 1)
                and is_array(quads, types.int8, 1) and is_array(col_term, types.int32, 1)
                and is_array(mult, types.float64, 1) and is_array(shift, types.float64, 1)
                and is_array(single, types.float32, 1)
                and isinstance(out, types.Array) and out.ndim == 1 and out.layout == "C" and out.dtype in _OUT):
            return None
        sig = types.void(x, pad, offsets, types.int64, quads, col_term, mult, shift, types.float64, types.float64,
                         types.float64, types.int64, types.int64, single, *(types.int64,) * 6, out, types.int64)
        return sig, codegen

    def codegen(context, builder, signature, args):
        (x, pad, offsets, zq, quads, col_term, mult, shift, lo, hi, zp, qlo, qhi, single, c, w_in, ow, pl, v0, v1,
         out, o_off) = args
        tys = signature.args
        out_ty = tys[20].dtype
        elem = _OUT[out_ty]
        quantize = out_ty in (types.uint8, types.int8)
        x_ptr = array_ptr(context, builder, tys[0], x, I8)
        pad_ptr = array_ptr(context, builder, tys[1], pad, I8)
        off_ptr = array_ptr(context, builder, tys[2], offsets, I64)
        w_ptr = array_ptr(context, builder, tys[4], quads, I8)
        ct_ptr = array_ptr(context, builder, tys[5], col_term, I32)
        mu_ptr = array_ptr(context, builder, tys[6], mult, F64)
        sh_ptr = array_ptr(context, builder, tys[7], shift, F64)
        s_ptr = array_ptr(context, builder, tys[13], single, F32)
        out_ptr = builder.gep(array_ptr(context, builder, tys[20], out, elem), [o_off])
        dot = declare_vpdpbusd(builder)
        byte = dot.function_type.args[1]
        zero64 = ir.Constant(I64, 0)

        def smin(a, b):
            return builder.select(builder.icmp_signed("<", a, b), a, b)

        def smax(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        # row bases: the padding rows read the zero-point row
        rows = []
        for ky in range(kh):
            off = builder.load(builder.gep(off_ptr, [ir.Constant(I64, ky)]))
            inside = builder.icmp_signed(">=", off, zero64)
            rows.append(builder.select(inside, builder.gep(x_ptr, [off]), pad_ptr))
        zq_vec = splat(builder, builder.trunc(zq, I32), V16I32)
        flip = ir.Constant(V16I32, [0x80808080 - 2**32] * LANES)
        lanes = ir.Constant(V16I32, list(range(LANES)))
        if out_ty != types.int32:
            lo, hi, zp = (splat(builder, v, V8F64) for v in (lo, hi, zp))
            codes = tuple(splat(builder, builder.trunc(v, I32), V16I32) for v in (qlo, qhi)) if quantize else None

        shuffle = declare(builder, "llvm.x86.avx512.pshuf.b.512", ir.FunctionType(V64I8, [V64I8, V64I8]))
        everywhere = ir.Constant(ir.VectorType(I32, 64), list(range(LANES)) * 4)

        def vector(v, ragged: bool):
            """Channel vector ``v``: whole (plain loads and stores) or the ragged last one (masked ones)."""
            c0 = builder.mul(v, ir.Constant(I64, LANES))
            left = builder.trunc(builder.sub(c, c0), I32)
            mask = builder.icmp_signed("<", lanes, splat(builder, left, V16I32))
            w_base = builder.gep(w_ptr, [builder.mul(v, ir.Constant(I64, kw * g_count * 64))])
            weights = [builder.bitcast(load_vector(builder, w_base, 64 * i, V64I8), byte) for i in range(kw * g_count)]
            ct = load_vector(builder, builder.gep(ct_ptr, [c0]), 0, V16I32)
            if out_ty != types.int32:
                factors = [(load_vector(builder, builder.gep(mu_ptr, [c0]), 8 * h, V8F64),
                            load_vector(builder, builder.gep(sh_ptr, [c0]), 8 * h, V8F64)) for h in (0, 1)]
            if quantize:
                factors32 = [load_vector(builder, builder.gep(s_ptr, [builder.mul(c0, ir.Constant(I64, 3))]), 16 * i,
                                         V16F32) for i in range(3)]
            bases = [builder.gep(row, [c0]) for row in rows]

            def load16(address):
                address = builder.bitcast(address, V16I8.as_pointer())
                if ragged:
                    return builder.call(masked(builder, "load", V16I8), [address, ir.Constant(I32, 1), mask,
                                                                        ir.Constant(V16I8, None)])
                return builder.load(address, align=1)

            def column(ix, checked: bool) -> list[ir.Value]:
                """The G quads of input column ``ix`` (the zero point's outside the image, if ``checked``).

                Row ``b`` of a quad: its 16 bytes broadcast to the four 128-bit lanes
                (``vbroadcasti32x4``), byte ``l`` moved to byte ``4 l + b`` (``vpshufb``), merged.
                """
                inside = builder.and_(builder.icmp_signed(">=", ix, zero64), builder.icmp_signed("<", ix, w_in))
                at = builder.mul(builder.select(inside, ix, zero64) if checked else ix, c)
                quads_ = []
                for g in range(g_count):
                    quad = None
                    for b in range(min(4, kh - 4 * g)):
                        row = load16(builder.gep(bases[4 * g + b], [at]))
                        wide = builder.shuffle_vector(row, ir.Constant(V16I8, None), everywhere)
                        part = builder.call(shuffle, [wide, _CONTROLS[b]])
                        quad = part if quad is None else builder.select(_BYTES[b], part, quad)
                    quad = builder.bitcast(quad, V16I32)
                    if checked:
                        quad = builder.select(inside, quad, zq_vec)
                    quads_.append(builder.xor(quad, flip) if signed else quad)
                return quads_

            def accumulate(ox, carry, checked: bool):
                """The int32 sums of pixel ``ox`` and the columns carried to the next one."""
                first = builder.sub(builder.mul(ox, ir.Constant(I64, sw)), pl)
                cols = [carry[g_count * i: g_count * (i + 1)] for i in range(carried)]
                cols += [column(builder.add(first, ir.Constant(I64, kx)), checked) for kx in range(carried, kw)]
                # long kernels sum in two independent chains, halving the latency of the vpdpbusd
                chains = [ct] + [ir.Constant(V16I32, None)] * (kw * g_count >= 6)
                for i in range(kw * g_count):
                    kx, g = divmod(i, g_count)
                    chains[i % len(chains)] = builder.call(dot, [chains[i % len(chains)], builder.bitcast(
                        cols[kx][g], byte), weights[i]])
                acc = chains[0] if len(chains) == 1 else builder.add(chains[0], chains[1])
                return acc, [q for col in cols[sw:] for q in col]

            def store(ox, value):
                dst = builder.bitcast(builder.gep(out_ptr, [builder.add(builder.mul(ox, c), c0)]),
                                      ir.VectorType(elem, LANES).as_pointer())
                if ragged:
                    builder.call(masked(builder, "store", ir.VectorType(elem, LANES)),
                                 [value, dst, ir.Constant(I32, 1), mask])
                else:
                    builder.store(value, dst, align=1)

            def pixels(ox0, count, carry, checked: bool):
                """Pixels ``ox0 .. ox0 + count``: their sums first, so that their epilogues overlap."""
                sums = []
                for i in range(count):
                    ox = builder.add(ox0, ir.Constant(I64, i))
                    acc, carry = accumulate(ox, carry, checked)
                    sums.append((ox, acc))
                if quantize:
                    qlo_, qhi_ = codes
                    rounded = single_codes(builder, [acc for _, acc in sums], lambda i: factors32,
                                           lambda i: rounded_codes(builder, sums[i][1], lambda h: factors[h], zp,
                                                                   shifted=shifted))
                    for (ox, _), code in zip(sums, rounded):
                        code = builder.select(builder.icmp_signed("<", code, qlo_), qlo_, code)
                        code = builder.select(builder.icmp_signed(">", code, qhi_), qhi_, code)
                        store(ox, builder.trunc(code, V16I8))
                    return carry
                for ox, acc in sums:
                    store(ox, acc if out_ty == types.int32 else requantize(
                        builder, acc, lambda h: factors[h], lo, hi, zp, False, shifted=shifted))
                return carry

            def run(ox0, ox1, carry, unroll: int, checked: bool):
                """Pixels ``ox0 .. ox1``, ``unroll`` per iteration then one at a time."""
                blocks = builder.sdiv(builder.sub(ox1, ox0), ir.Constant(I64, unroll))
                carry = emit_loop(builder, blocks, V16I32, carried * g_count, lambda q, state: pixels(
                    builder.add(ox0, builder.mul(q, ir.Constant(I64, unroll))), unroll, state, checked), carry)
                if unroll == 1:
                    return carry
                done = builder.add(ox0, builder.mul(blocks, ir.Constant(I64, unroll)))
                return run(done, ox1, carry, 1, checked)

            start = builder.neg(pl)
            init = [q for kx in range(carried) for q in column(builder.add(start, ir.Constant(I64, kx)), True)]
            # pixels left .. right read new columns inside the image only: no bounds checks there
            left = builder.sdiv(builder.add(pl, ir.Constant(I64, sw - 1 - carried)), ir.Constant(I64, sw))
            left = smin(smax(left, zero64), ow)
            last = builder.sub(builder.add(w_in, pl), ir.Constant(I64, kw))  # the last in-image start, times sw
            right = builder.add(builder.sdiv(last, ir.Constant(I64, sw)), ir.Constant(I64, 1))
            right = smax(smin(builder.select(builder.icmp_signed("<", last, zero64), zero64, right), ow), left)
            carry = run(zero64, left, init, 1, True)
            carry = run(left, right, carry, UNROLL if g_count == 1 and out_ty != types.int32 else 1, False)
            run(right, ow, carry, 1, True)

        # whole vectors v0 .. whole, then the ragged one if it is in range
        whole = builder.sdiv(c, ir.Constant(I64, LANES))
        whole = builder.select(builder.icmp_signed("<", v1, whole), v1, whole)
        emit_loop(builder, builder.sub(whole, v0), V16I32, 0,
                  lambda v, state: vector(builder.add(v, v0), False) or state)
        ragged = builder.and_(builder.icmp_signed("<", whole, v1),
                              builder.icmp_signed("<", builder.mul(whole, ir.Constant(I64, LANES)), c))
        with builder.if_then(builder.and_(ragged, builder.icmp_signed(">=", whole, v0))):
            vector(whole, True)
        return context.get_dummy_value()

    return intrinsic(typer)


def _make_driver(kh: int, kw: int, sw: int, signed: bool, shifted: bool):
    row = _make_row(kh, kw, sw, signed, shifted)

    def depthwise_rows(x, window, zx, quads, col_term, pad, mult, shift, lo, hi, zp, qlo, qhi, single, v0, v1, r0, r1,
                       out):
        """Channel vectors ``v0 .. v1`` (16 channels each) of output rows ``r0 .. r1`` (``r = n OH + oy``).

        x      : uint8 (int8 when ``signed``) [N, H, W, C] C-contiguous NHWC; zx its zero point
        window : ``ConvGeometry.window()``; quads: ``pack_quads``
        col_term : int32 [16 ceil(C / 16)], ``col_terms`` of the weights and bias
        pad    : uint8 [W C], the zero point as stored in x (``x_zero_point & 0xFF``): the padding rows
        mult, shift : float64 [>= 16 ceil(C / 16)] (unused for int32 out)
        qlo, qhi, single : the code bounds and float32 factors of an int8 / uint8 output (``_make_row``)
        out    : [N OH OW, C] C-contiguous, int32 / float32 / uint8 / int8
        Writes ``acc + col_bias`` finished as in ``kernels.gemm.vnni.requantize`` (module docstring).
        """
        h, w_in, _, _, sh, _, _, _, pt, pl, oh, ow = window
        c = x.shape[3]
        byte = zx & 0xFF  # the zero point as stored in x
        xf = x.reshape(-1).view(np.uint8)
        of = out.reshape(-1)
        flat = quads.reshape(-1)
        offsets = np.empty(kh, np.int64)
        for r in range(r0, r1):
            n = r // oh
            top = (r % oh) * sh - pt
            for ky in range(kh):
                iy = top + ky
                offsets[ky] = (n * h + iy) * w_in * c if 0 <= iy < h else -1
            row(xf, pad, offsets, byte * 0x01010101, flat, col_term, mult, shift, lo, hi, zp, qlo, qhi, single, c,
                w_in, ow, pl, v0, v1, of, r * ow * c)

    return depthwise_rows


def col_terms(sums: np.ndarray, col_bias: np.ndarray | int, zx: int, signed: bool) -> np.ndarray:
    """int32 ``[16 ceil(C / 16)]``: ``col_bias - zu sum_t w'`` (wrapping: exact where the result fits), 0 past C.

    ``zu`` is the activation zero point as the unsigned value the kernel multiplies.
    """
    c = sums.shape[0]
    zu = zx + 128 if signed else zx
    terms = np.zeros(-(-c // LANES) * LANES, np.int32)
    terms[:c] = (col_bias - zu * sums).astype(np.int32)
    return terms


# keyed by (KH, KW, SW, int8 activations, a nonzero shift)
DRIVERS = {(kh, kw, sw, signed, shifted): variant(
    __name__, f"depthwise_vnni_{kh}x{kw}s{sw}_{'i8' if signed else 'u8'}{'_shifted' * shifted}",
    _make_driver(kh, kw, sw, signed, shifted))
    for kh, kw in KERNELS for sw in STRIDES for signed in (False, True) for shifted in (False, True)}
