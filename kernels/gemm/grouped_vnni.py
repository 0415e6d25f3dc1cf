"""AVX-512 VNNI micro-kernel for group-wise sub-byte weights (int4, ternary), as LLVM IR.

One call computes a ``rows x 64`` float32 tile over all of K, from the panel
layout of ``kernels.pack.grouped`` and int8 activations quantized per group
(``kernels.gemm.grouped_driver``). Per group ``g`` (``gsteps`` steps of 256 bytes;
the last group may have fewer):

1. Each step loads four 64-byte vectors and, for each of its ``F = 8 / bits``
   fields, masks out one k group of 4 (``(v >> bits f) & mask``): unsigned codes,
   16 channels x 4 k per vector. ``vpdpbusd`` multiplies them (its unsigned
   operand) by 4 broadcast int8 activations of each row (its signed operand)::

       dot[r, c] += sum_u code[c, 4 kg + u] * xq[r, 4 kg + u]

   exactly in int32 (|dot| <= 256 * 15 * 127 per group). With ``rows <= 2`` the
   even and odd fields feed separate accumulators, which halves the dependency
   chains of a GEMV; they are added at the end of the group.
2. The zero point is taken out exactly, using the group's activation code sum:
   ``e = dot - z * sumx[r, g]`` (one shared ``z`` for symmetric weights, else a
   ``z[c, g]`` vector and ``vpmulld``), so ``e = sum_k xq * (code - z)``.
3. ``acc[r, c] = acc[r, c] + float32(e) * (sx[r, g] * sw[c, g])``: three float32
   operations, each rounded, in this order and without FMA contraction, so the
   NumPy oracle reproduces the result bit for bit.

Codebook weights (``lookup``, 4-bit only): the masked nibbles index a 16-entry int8
table ``T8`` (``vpshufb``, the table broadcast to every 128-bit lane) giving signed
weights, so the roles swap: the activations become the unsigned operand as
``xq + 128`` (``xq ^ 0x80`` per byte; |xq| <= 127) and the looked-up weights the
signed one. Then ``dot = sum_k (xq + 128) T8[c] = e + 128 * sum_k T8[c]``, exactly in
int32 (|dot| <= 256 * 255 * 127 per group), and step 2 subtracts the per-channel
and group constant ``wz[c, g] = 128 * sum_{k in g} T8[c[n, k]]`` computed at pack
time over the group's padded k range (padding: code 0, activation 0 -> byte 128).

Nothing here is compiled until a driver calling it is, and the grouped kernels
select it only on CPUs with avx512vnni.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.gemm.llvm_ir import (I8, I32, I64, array_ptr, clamped_rows, declare, emit_loop, is_array,
                                  load_vector, prefetch, splat)
from kernels.gemm.vnni import V16I32, V64I8, declare_vpdpbusd

F32 = ir.FloatType()
V16F32 = ir.VectorType(F32, 16)
VECTORS = 4  # 16-lane vectors per 64-channel panel
STEP = 256  # bytes per step and panel
SCALARS = ("x_off", "ldx", "m", "a_off", "w_off", "p_off", "ng", "gsteps", "nsteps", "zc")
V16I8 = ir.VectorType(I8, 16)
PSHUFB = "llvm.x86.avx512.pshuf.b.512"


def _const(value: int, vtype: ir.VectorType) -> ir.Constant:
    return ir.Constant(vtype, [value] * vtype.count)


def make_tile(rows: int, bits: int, uniform: bool, prefetch_distance: int = 0, lookup: bool = False):
    """A grouped tile intrinsic (``tile`` of ``kernels.gemm.grouped_microkernels``).

    ``tile(x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps,
    nsteps, zc, tab, out)``: int8 ``x`` (row r at ``x_off + r * ldx``), float32 ``sx`` and
    int32 ``sumx`` (row r, group g at ``a_off + r * ng + g``), uint8 panel data ``w``
    from ``w_off``, int32 zero points ``wz`` and float32 scales ``ws`` of the panel
    from ``p_off`` (group g, channel c at ``p_off + 64 g + c``), the shared zero
    point ``zc`` when ``uniform``, the int8 table ``tab[16]`` (read only with
    ``lookup``: then ``wz`` holds the codebook correction, see the module
    docstring); writes float32 ``out[64 r + c]`` for every ``r < rows`` (rows past
    ``m`` repeat row ``m - 1``).
    """
    fields = 8 // bits
    mask = (1 << bits) - 1
    sets = 2 if rows <= 2 and fields > 1 else 1
    per_set = rows * VECTORS

    if lookup and bits != 4:
        raise ValueError("lookup: codebook tiles need 4-bit codes")
    load_zeros = lookup or not uniform

    def emit(builder, x_ptr, sx_ptr, sum_ptr, w_ptr, wz_ptr, ws_ptr, tab_ptr, out_ptr, s):
        dot = declare_vpdpbusd(builder)
        byte = dot.function_type.args[1]
        if lookup:
            shuffle = declare(builder, PSHUFB, ir.FunctionType(V64I8, [V64I8, V64I8]))
            tab16 = builder.load(builder.bitcast(tab_ptr, V16I8.as_pointer()), align=1)
            table = builder.shuffle_vector(tab16, ir.Constant(V16I8, ir.Undefined),
                                           ir.Constant(ir.VectorType(I32, 64), [i % 16 for i in range(64)]))
            flip = ir.Constant(I32, 0x80808080)  # xq + 128 as unsigned bytes
        x_rows = clamped_rows(builder, x_ptr, s["x_off"], s["ldx"], s["m"], rows)
        sx_rows = clamped_rows(builder, sx_ptr, s["a_off"], s["ng"], s["m"], rows)
        sum_rows = clamped_rows(builder, sum_ptr, s["a_off"], s["ng"], s["m"], rows)
        w_base = builder.gep(w_ptr, [s["w_off"]])
        wz_base = builder.gep(wz_ptr, [s["p_off"]])
        ws_base = builder.gep(ws_ptr, [s["p_off"]])
        zc32 = builder.trunc(s["zc"], I32)
        gsteps, nsteps = s["gsteps"], s["nsteps"]

        def group(g, accs):
            s0 = builder.mul(g, gsteps)
            left = builder.sub(nsteps, s0)
            count = builder.select(builder.icmp_signed("<", left, gsteps), left, gsteps)
            g_base = builder.gep(w_base, [builder.mul(s0, ir.Constant(I64, STEP))])
            k_base = builder.mul(s0, ir.Constant(I64, 4 * fields))

            def step(q, dots):
                block = builder.gep(g_base, [builder.mul(q, ir.Constant(I64, STEP))])
                raw = [load_vector(builder, block, 64 * j, V64I8) for j in range(VECTORS)]
                if prefetch_distance:
                    for line in range(VECTORS):
                        prefetch(builder, builder.gep(block, [ir.Constant(I64, prefetch_distance + 64 * line)]))
                k0 = builder.add(k_base, builder.mul(q, ir.Constant(I64, 4 * fields)))
                new = list(dots)
                for f in range(fields):
                    vecs = raw
                    if f:
                        vecs = [builder.lshr(v, _const(bits * f, V64I8)) for v in vecs]
                    if f < fields - 1:
                        vecs = [builder.and_(v, _const(mask, V64I8)) for v in vecs]
                    if lookup:  # nibble -> signed int8 table value
                        vecs = [builder.call(shuffle, [table, v]) for v in vecs]
                    vecs = [builder.bitcast(v, byte) for v in vecs]
                    k = builder.add(k0, ir.Constant(I64, 4 * f))
                    base = (f % sets) * per_set
                    for r in range(rows):
                        word = builder.load(builder.bitcast(builder.gep(x_rows[r], [k]), I32.as_pointer()), align=1)
                        if lookup:
                            word = builder.xor(word, flip)
                        a_vec = builder.bitcast(splat(builder, word, V16I32), byte)
                        for j in range(VECTORS):
                            i = base + r * VECTORS + j
                            operands = [a_vec, vecs[j]] if lookup else [vecs[j], a_vec]  # (unsigned, signed)
                            new[i] = builder.call(dot, [new[i], *operands])
                return new

            dots = emit_loop(builder, count, V16I32, sets * per_set, step)
            g64 = builder.mul(g, ir.Constant(I64, 64))
            scales = [load_vector(builder, ws_base, builder.add(g64, ir.Constant(I64, 16 * j)), V16F32)
                      for j in range(VECTORS)]
            if load_zeros:
                zeros = [load_vector(builder, wz_base, builder.add(g64, ir.Constant(I64, 16 * j)), V16I32)
                         for j in range(VECTORS)]
            updated = []
            for r in range(rows):
                sx = splat(builder, builder.load(builder.gep(sx_rows[r], [g])), V16F32)
                total = builder.load(builder.gep(sum_rows[r], [g]))
                if uniform and not lookup:
                    correction = splat(builder, builder.mul(zc32, total), V16I32)
                elif not lookup:
                    sums = splat(builder, total, V16I32)
                for j in range(VECTORS):
                    i = r * VECTORS + j
                    value = dots[i] if sets == 1 else builder.add(dots[i], dots[per_set + i])
                    if lookup:
                        value = builder.sub(value, zeros[j])
                    else:
                        value = builder.sub(value, correction if uniform else builder.mul(zeros[j], sums))
                    term = builder.fmul(builder.sitofp(value, V16F32), builder.fmul(sx, scales[j]))
                    updated.append(builder.fadd(accs[i], term))
            return updated

        results = emit_loop(builder, s["ng"], V16F32, per_set, group)
        for i, result in enumerate(results):  # row r, vector j at out[64 r + 16 j]
            dst = builder.gep(out_ptr, [ir.Constant(I64, 16 * i)])
            builder.store(result, builder.bitcast(dst, V16F32.as_pointer()), align=4)

    @intrinsic
    def tile(typingctx, x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc, tab,
             out):
        arrays = [(x, types.int8), (sx, types.float32), (sumx, types.int32), (w, types.uint8), (wz, types.int32),
                  (ws, types.float32), (tab, types.int8), (out, types.float32)]
        scalars = (x_off, ldx, m, a_off, w_off, p_off, ng, gsteps, nsteps, zc)
        if not all(is_array(ty, dtype, 1) for ty, dtype in arrays):
            return None
        if not all(isinstance(ty, types.Integer) for ty in scalars):
            return None
        sig = types.void(x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc, tab,
                         out)

        def codegen(context, builder, signature, args):
            tys = signature.args
            named = dict(zip(("x", "x_off", "ldx", "m", "sx", "sumx", "a_off", "w", "w_off", "wz", "ws", "p_off",
                              "ng", "gsteps", "nsteps", "zc", "tab", "out"), zip(args, tys)))
            s = {name: context.cast(builder, *named[name], types.int64) for name in SCALARS}

            def ptr(name, elem):
                value, ty = named[name]
                return array_ptr(context, builder, ty, value, elem)

            emit(builder, ptr("x", I8), ptr("sx", F32), ptr("sumx", I32), ptr("w", I8), ptr("wz", I32),
                 ptr("ws", F32), ptr("tab", I8), ptr("out", F32), s)
            return context.get_dummy_value()

        return sig, codegen

    return tile
