"""AVX-512 VNNI int8 micro-kernel, written as LLVM IR inside a Numba intrinsic.

LLVM's vectoriser never emits ``vpdpbusd`` for a plain int8 dot loop, so the tile
is spelled out: ``rows x 4`` accumulators of 16 int32 lanes stay in registers for
the whole K loop. Each k group loads four 512-bit weight vectors (64 channels x 4
k values, see ``kernels.pack.panels``), broadcasts 4 activation bytes of each row
to all lanes and issues one ``vpdpbusd`` per (row, vector):

    acc[r, 16 j + l] += sum_{u < 4} a[r, 4 q + u] * w[16 j + l, 4 q + u]

(unsigned activation bytes times signed weight bytes, exact, wrapping in int32).
Nothing here is compiled until a kernel that calls it is, and ``kernels.dispatch``
only selects such kernels on CPUs with avx512vnni: compiling this for a CPU
without it aborts the process.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
V16I32 = ir.VectorType(I32, 16)
V64I8 = ir.VectorType(I8, 64)
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
VECTORS = 4  # 512-bit vectors per row: one 64-channel panel


@functools.cache
def _byte_operand_type() -> ir.VectorType:
    """The type LLVM declares for vpdpbusd's byte operands: <64 x i8> since LLVM 21, <16 x i32> before."""
    probe = f"declare <16 x i32> @{VPDPBUSD}(<16 x i32>, <64 x i8>, <64 x i8>)"
    try:
        llvm.parse_assembly(probe).verify()
    except RuntimeError:
        return V16I32
    return V64I8


def splat_i32(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    vec = builder.insert_element(ir.Constant(V16I32, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(V16I32, ir.Undefined), ir.Constant(V16I32, None))


def _declare(builder: ir.IRBuilder, name: str, fnty: ir.FunctionType) -> ir.Function:
    try:
        return builder.module.get_global(name)
    except KeyError:
        return ir.Function(builder.module, fnty, name=name)


def declare_vpdpbusd(builder: ir.IRBuilder) -> ir.Function:
    byte = _byte_operand_type()
    return _declare(builder, VPDPBUSD, ir.FunctionType(V16I32, [V16I32, byte, byte]))


def _prefetch(builder: ir.IRBuilder) -> ir.Function:
    return _declare(builder, "llvm.prefetch.p0", ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]))


def _masked_store(builder: ir.IRBuilder) -> ir.Function:
    mask = ir.VectorType(ir.IntType(1), 16)
    fnty = ir.FunctionType(ir.VoidType(), [V16I32, V16I32.as_pointer(), I32, mask])
    return _declare(builder, "llvm.masked.store.v16i32.p0", fnty)


def _array_ptr(context, builder, ty, value, elem: ir.IntType) -> ir.Value:
    return builder.bitcast(context.make_array(ty)(context, builder, value).data, elem.as_pointer())


def _is_array(ty, dtype, ndim: int) -> bool:
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


def emit_loop(builder: ir.IRBuilder, count: ir.Value, accumulators: int, body) -> list[ir.Value]:
    """Emit ``for q in range(count)`` carrying ``accumulators`` <16 x i32> values in registers.

    They start at zero; ``body(q, accs)`` emits one iteration and returns their new
    values. Returns the final values (still zero when ``count <= 0``).
    """
    zero = ir.Constant(V16I32, None)
    entry = builder.block
    loop = builder.append_basic_block("vnni.loop")
    done = builder.append_basic_block("vnni.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(I64, 0)), loop, done)

    builder.position_at_end(loop)
    q = builder.phi(I64)
    accs = [builder.phi(V16I32) for _ in range(accumulators)]
    updated = body(q, accs)
    q_next = builder.add(q, ir.Constant(I64, 1))
    body_end = builder.block
    q.add_incoming(ir.Constant(I64, 0), entry)
    q.add_incoming(q_next, body_end)
    for acc, new in zip(accs, updated):
        acc.add_incoming(zero, entry)
        acc.add_incoming(new, body_end)
    builder.cbranch(builder.icmp_signed("<", q_next, count), loop, done)

    builder.position_at_end(done)
    results = [builder.phi(V16I32) for _ in updated]  # phis must open the block
    for result, new in zip(results, updated):
        result.add_incoming(zero, entry)
        result.add_incoming(new, body_end)
    return results


def _emit_dot(builder, a_ptr, a_off, lda, m, b_ptr, b_off, kq, rows: int, prefetch: int) -> list[ir.Value]:
    """Emit the K loop of a tile; returns the ``rows * VECTORS`` accumulators, row-major."""
    dot = declare_vpdpbusd(builder)
    byte = dot.function_type.args[1]
    last = builder.sub(m, ir.Constant(I64, 1))
    row_ptrs = []
    for r in range(rows):
        rr = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), ir.Constant(I64, r), last)
        row_ptrs.append(builder.gep(a_ptr, [builder.add(a_off, builder.mul(rr, lda))]))
    b_base = builder.gep(b_ptr, [b_off])

    def k_group(q, accs):
        b_group = builder.gep(b_base, [builder.mul(q, ir.Constant(I64, 64 * VECTORS))])
        w_vecs = []
        for j in range(VECTORS):
            ptr = builder.bitcast(builder.gep(b_group, [ir.Constant(I64, 64 * j)]), V64I8.as_pointer())
            w_vecs.append(builder.bitcast(builder.load(ptr, align=1), byte))
        if prefetch:  # read, keep in all cache levels, data cache; no fault past the end
            fetch = _prefetch(builder)
            for line in range(VECTORS):
                target = builder.gep(b_group, [ir.Constant(I64, prefetch + 64 * line)])
                builder.call(fetch, [target, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
        a_step = builder.mul(q, ir.Constant(I64, 4))
        updated = []
        for r in range(rows):
            word = builder.load(builder.bitcast(builder.gep(row_ptrs[r], [a_step]), I32.as_pointer()), align=1)
            a_vec = builder.bitcast(splat_i32(builder, word), byte)
            updated += [builder.call(dot, [accs[r * VECTORS + j], a_vec, w_vecs[j]]) for j in range(VECTORS)]
        return updated

    return emit_loop(builder, kq, rows * VECTORS, k_group)


def make_tile(rows: int, prefetch: int = 0):
    """A ``rows x 64`` VNNI tile intrinsic with the portable tile's signature.

    ``tile(a, a_off, lda, m, b, b_off, kq, acc)``: see ``kernels.gemm.microkernels``.
    Rows ``m..rows-1`` repeat row ``m - 1`` (no read past the activations) and are
    stored to ``acc`` too; callers use only the first ``m``. With ``prefetch`` > 0
    each k group also prefetches the weights that many bytes ahead into L1: they
    stream from L2 (GEMM: a 64 x K panel is larger than L1) or from L3 / DRAM (GEMV).
    """

    @intrinsic
    def tile(typingctx, a, a_off, lda, m, b, b_off, kq, acc):
        if not (_is_array(a, types.uint8, 1) and _is_array(b, types.int8, 1) and _is_array(acc, types.int32, 2)):
            return None
        sig = types.void(a, a_off, lda, m, b, b_off, kq, acc)

        def codegen(context, builder, signature, args):
            a, a_off, lda, m, b, b_off, kq, acc = args
            tys = signature.args
            results = _emit_dot(builder, _array_ptr(context, builder, tys[0], a, I8), a_off, lda, m,
                                _array_ptr(context, builder, tys[4], b, I8), b_off, kq, rows, prefetch)
            c_ptr = _array_ptr(context, builder, tys[7], acc, I32)
            for index, result in enumerate(results):  # row r, vector j at acc[r, 16 j]
                dst = builder.gep(c_ptr, [ir.Constant(I64, 16 * index)])
                builder.store(result, builder.bitcast(dst, V16I32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def make_tile_store(rows: int, prefetch: int = 0):
    """A tile intrinsic that finishes int32 output itself: ``tile_store`` of ``kernels.gemm.microkernels``.

    ``tile_store(a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo)``
    adds ``col_term[c0 + c]`` (int32, wrapping) to each sum and writes row ``r < m``,
    column ``c < cols`` to ``out[o_off + r * ldo + c]`` with masked stores, straight
    from the registers: no scratch tile, no second pass.
    """

    @intrinsic
    def tile_store(typingctx, a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo):
        if not (_is_array(a, types.uint8, 1) and _is_array(b, types.int8, 1)
                and _is_array(col_term, types.int32, 1) and _is_array(out, types.int32, 1)):
            return None
        sig = types.void(a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo)

        def codegen(context, builder, signature, args):
            a, a_off, lda, m, b, b_off, kq, col_term, c0, cols, out, o_off, ldo = args
            tys = signature.args
            results = _emit_dot(builder, _array_ptr(context, builder, tys[0], a, I8), a_off, lda, m,
                                _array_ptr(context, builder, tys[4], b, I8), b_off, kq, rows, prefetch)
            ct_ptr = builder.gep(_array_ptr(context, builder, tys[7], col_term, I32), [c0])
            out_ptr = _array_ptr(context, builder, tys[10], out, I32)
            store = _masked_store(builder)
            lanes = ir.Constant(V16I32, list(range(16)))
            col_terms = [builder.load(builder.bitcast(builder.gep(ct_ptr, [ir.Constant(I64, 16 * j)]),
                                                      V16I32.as_pointer()), align=4) for j in range(VECTORS)]
            for r in range(rows):
                # rows past m store nothing: their lane limit is 0
                limit = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), builder.trunc(cols, I32),
                                       ir.Constant(I32, 0))
                limit = splat_i32(builder, limit)
                row = builder.gep(out_ptr, [builder.add(o_off, builder.mul(ir.Constant(I64, r), ldo))])
                for j in range(VECTORS):
                    mask = builder.icmp_signed("<", builder.add(lanes, ir.Constant(V16I32, [16 * j] * 16)), limit)
                    value = builder.add(results[r * VECTORS + j], col_terms[j])
                    dst = builder.bitcast(builder.gep(row, [ir.Constant(I64, 16 * j)]), V16I32.as_pointer())
                    builder.call(store, [value, dst, ir.Constant(I32, 4), mask])
            return context.get_dummy_value()

        return sig, codegen

    return tile_store
