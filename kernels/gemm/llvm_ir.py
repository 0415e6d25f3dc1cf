"""Small LLVM IR building blocks shared by the hand-written micro-kernels.

The micro-kernels are Numba intrinsics that emit LLVM IR with llvmlite: loops
whose accumulators live in vector registers, broadcasts, prefetches and typed
views of array data. Only generic LLVM operations are emitted here; each
micro-kernel module adds its own target intrinsics.
"""

from __future__ import annotations

from typing import Callable

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

I1, I8, I16, I32, I64 = (ir.IntType(bits) for bits in (1, 8, 16, 32, 64))
F32, F64 = ir.FloatType(), ir.DoubleType()


def declare(builder: ir.IRBuilder, name: str, fnty: ir.FunctionType) -> ir.Function:
    """The module's declaration of function ``name``, added on first use."""
    try:
        return builder.module.get_global(name)
    except KeyError:
        return ir.Function(builder.module, fnty, name=name)


def is_array(ty, dtype, ndim: int) -> bool:
    """True for a C-contiguous Numba array type of ``dtype`` and ``ndim``."""
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


def array_ptr(context, builder: ir.IRBuilder, ty, value, elem: ir.Type) -> ir.Value:
    """Pointer to the first element of a Numba array, typed as ``elem*``."""
    return builder.bitcast(context.make_array(ty)(context, builder, value).data, elem.as_pointer())


def load_vector(builder: ir.IRBuilder, base: ir.Value, offset: int | ir.Value, vtype: ir.VectorType) -> ir.Value:
    """Unaligned load of a ``vtype`` at ``base + offset`` (offset in elements of ``base``)."""
    offset = ir.Constant(I64, offset) if isinstance(offset, int) else offset
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer()), align=1)


def masked(builder: ir.IRBuilder, kind: str, vtype: ir.VectorType) -> ir.Function:
    """LLVM's masked ``"load"`` or ``"store"`` of a ``vtype`` (lanes off the mask are neither read nor written).

    ``load(ptr, align, mask, passthru)`` / ``store(value, ptr, align, mask)`` with a ``<n x i1>`` mask.
    """
    elem = vtype.element
    name = f"i{elem.width}" if isinstance(elem, ir.IntType) else {F32: "f32", F64: "f64"}[elem]
    mask = ir.VectorType(I1, vtype.count)
    if kind == "load":
        return declare(builder, f"llvm.masked.load.v{vtype.count}{name}.p0",
                       ir.FunctionType(vtype, [vtype.as_pointer(), I32, mask, vtype]))
    return declare(builder, f"llvm.masked.store.v{vtype.count}{name}.p0",
                   ir.FunctionType(ir.VoidType(), [vtype, vtype.as_pointer(), I32, mask]))


def low_bits(builder: ir.IRBuilder, n: ir.Value) -> ir.Value:
    """The i64 with bits ``0 .. n - 1`` set, ``0 <= n <= 64`` (a mask of the first n bytes of 64)."""
    full = builder.icmp_signed("<", n, ir.Constant(I64, 64))
    bits = builder.shl(ir.Constant(I64, 1), builder.select(full, n, ir.Constant(I64, 0)))
    return builder.select(full, builder.sub(bits, ir.Constant(I64, 1)), ir.Constant(I64, -1))


def splat(builder: ir.IRBuilder, value: ir.Value, vtype: ir.VectorType) -> ir.Value:
    """``value`` in every lane of a ``vtype``."""
    vec = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(vtype, ir.Undefined), ir.Constant(ir.VectorType(I32, vtype.count), None))


def prefetch(builder: ir.IRBuilder, address: ir.Value, write: bool = False) -> None:
    """Prefetch the cache line at ``address`` (an i8*) into every level, for writing if ``write``; never faults."""
    fetch = declare(builder, "llvm.prefetch.p0", ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]))
    builder.call(fetch, [address, ir.Constant(I32, int(write)), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def emit_loop(builder: ir.IRBuilder, count: ir.Value, vtype: ir.VectorType, accumulators: int,
              body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]],
              init: list[ir.Value] | None = None) -> list[ir.Value]:
    """Emit ``for q in range(count)`` carrying ``accumulators`` values of ``vtype`` in registers.

    They start at ``init`` (default zero); ``body(q, accs)`` emits one iteration and
    returns their new values. Returns the final values (``init`` when ``count <= 0``).
    """
    starts = init or [ir.Constant(vtype, None)] * accumulators
    entry = builder.block
    loop = builder.append_basic_block("kernel.loop")
    done = builder.append_basic_block("kernel.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(I64, 0)), loop, done)

    builder.position_at_end(loop)
    q = builder.phi(I64)
    accs = [builder.phi(vtype) for _ in range(accumulators)]
    updated = body(q, accs)
    q_next = builder.add(q, ir.Constant(I64, 1))
    body_end = builder.block
    q.add_incoming(ir.Constant(I64, 0), entry)
    q.add_incoming(q_next, body_end)
    for acc, start, new in zip(accs, starts, updated):
        acc.add_incoming(start, entry)
        acc.add_incoming(new, body_end)
    builder.cbranch(builder.icmp_signed("<", q_next, count), loop, done)

    builder.position_at_end(done)
    results = [builder.phi(vtype) for _ in updated]  # phis must open the block
    for result, start, new in zip(results, starts, updated):
        result.add_incoming(start, entry)
        result.add_incoming(new, body_end)
    return results


def clamped_rows(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, stride: ir.Value, m: ir.Value,
                 rows: int) -> list[ir.Value]:
    """Pointers to ``rows`` rows at ``base + offset + r * stride``; rows past ``m`` repeat row ``m - 1``.

    A micro-kernel always computes its full height; clamping keeps the extra rows
    inside the caller's array, and the caller ignores their results.
    """
    last = builder.sub(m, ir.Constant(I64, 1))
    pointers = []
    for r in range(rows):
        row = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), ir.Constant(I64, r), last)
        pointers.append(builder.gep(base, [builder.add(offset, builder.mul(row, stride))]))
    return pointers


def tile_intrinsic(emit: Callable) -> Callable:
    """A Numba intrinsic with the micro-kernel tile signature, whose body ``emit`` writes.

    ``tile(a, a_off, lda, m, b, b_off, kq, acc)`` takes uint8 ``a`` and int8 ``b`` (1-D)
    and int32 ``acc`` (2-D), all C-contiguous; ``emit(builder, a_ptr, a_off, lda, m,
    b_ptr, b_off, kq, acc_ptr)`` receives typed data pointers and the integer arguments.
    """

    @intrinsic
    def tile(typingctx, a, a_off, lda, m, b, b_off, kq, acc):
        if not (is_array(a, types.uint8, 1) and is_array(b, types.int8, 1) and is_array(acc, types.int32, 2)):
            return None

        def codegen(context, builder, signature, args):
            a, a_off, lda, m, b, b_off, kq, acc = args
            tys = signature.args
            emit(builder, array_ptr(context, builder, tys[0], a, I8), a_off, lda, m,
                 array_ptr(context, builder, tys[4], b, I8), b_off, kq, array_ptr(context, builder, tys[7], acc, I32))
            return context.get_dummy_value()

        return types.void(a, a_off, lda, m, b, b_off, kq, acc), codegen

    return tile


def with_arity(typer: Callable, arity: int) -> Callable:
    """``typer(typingctx, *args)`` as a function of exactly ``arity`` named arguments.

    Numba's ``@intrinsic`` needs a fixed signature: this lets one typer serve
    intrinsics whose argument lists are assembled from parts.
    """
    names = ", ".join(f"a{i}" for i in range(arity))
    namespace = {"typer": typer}
    exec(f"def fixed(typingctx, {names}):\n    return typer(typingctx, {names})", namespace)
    return namespace["fixed"]
