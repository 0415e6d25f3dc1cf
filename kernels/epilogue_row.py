"""The float steps of the epilogue over one row of a tile, as explicit 8-lane vector IR.

LLVM's loop vectoriser gives up on ``kernels.epilogue.finish_tile``'s float loop
(int64 terms, two clamps, rounding, a narrowing store): scalar code there cost
about 1.3 ns per output, more than a depthwise convolution's own arithmetic. This
intrinsic spells the same formula out on ``<8 x double>`` with masked loads and
stores for the ragged end, using generic LLVM operations only (no target
intrinsics: it compiles on every CPU, and LLVM splits the vectors to the widths
the CPU has)::

    y = float64(v[i]) + float64(col_term[j]) - float64(w_zp[j]) * rs      (exact: integers below 2**53)
    t = clip(y * mult[j] + shift[j], lo, hi)
    out[i] = float32(t)                                                    (float32 out)
    out[i] = clip(t + zp, qmin, qmax) rounded half to even                 (int8 / uint8 / int32 out)

for ``i < cols``, ``j = c0 + i``. Rounding is ``llvm.lrint`` (``vcvtpd2dq`` on x86:
the current rounding mode, half to even by default, as ``numpy.rint``); the clamp
keeps it in int32 range.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.gemm.llvm_ir import F32, F64, I1, I8, I32, I64, array_ptr, declare, emit_loop, masked, splat

LANES = 8
V8F64 = ir.VectorType(F64, LANES)
V8I64 = ir.VectorType(I64, LANES)
V8I1 = ir.VectorType(I1, LANES)
_OUT_TYPES = {types.float32: F32, types.uint8: I8, types.int8: I8, types.int32: I32}


def _is_vector(ty, dtypes) -> bool:
    return isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C" and ty.dtype in dtypes


def _make(row_term: bool):
    """``finish_row`` (with the ``w_zp * rs`` term) or ``finish_row_plain`` (without: ``w_zp``, ``rs`` unused)."""

    def typer(typingctx, v, col_term, w_zp, rs, c0, cols, mult, shift, lo, hi, zp, qmin, qmax, out, row, col):
        terms = (types.int64, types.float64)
        if not (_is_vector(v, (types.int32, types.int64)) and _is_vector(col_term, terms)
                and _is_vector(w_zp, terms) and _is_vector(mult, (types.float64,))
                and _is_vector(shift, (types.float64,)) and isinstance(out, types.Array) and out.ndim == 2
                and out.dtype in _OUT_TYPES):
            return None
        sig = types.void(v, col_term, w_zp, types.float64, types.int64, types.int64, mult, shift, types.float64,
                         types.float64, types.float64, types.float64, types.float64, out, types.int64, types.int64)
        return sig, lambda context, builder, signature, args: _emit(context, builder, signature, args, row_term)

    return intrinsic(typer)


def _emit(context, builder, signature, args, row_term: bool):
    v, col_term, w_zp, rs, c0, cols, mult, shift, lo, hi, zp, qmin, qmax, out, row, col = args
    tys = signature.args
    quantize = tys[13].dtype != types.float32
    out_elem = _OUT_TYPES[tys[13].dtype]

    def source(index, value, first=None):
        ty = tys[index]
        elem = {types.int32: I32, types.int64: I64, types.float64: F64}[ty.dtype]
        ptr = array_ptr(context, builder, ty, value, elem)
        return ptr if first is None else builder.gep(ptr, [first]), elem

    v_src = source(0, v)
    ct_src, wz_src = source(1, col_term, c0), source(2, w_zp, c0)
    mu_src, sh_src = source(6, mult, c0), source(7, shift, c0)
    target = context.make_array(tys[13])(context, builder, out)
    row_stride = cgutils.unpack_tuple(builder, target.strides, 2)[0]
    offset = builder.add(builder.mul(row, row_stride), builder.mul(col, ir.Constant(I64, 1 if out_elem == I8 else 4)))
    out_ptr = builder.bitcast(builder.gep(builder.bitcast(target.data, I8.as_pointer()), [offset]),
                              out_elem.as_pointer())
    rs, lo, hi, zp, qmin, qmax = (splat(builder, s, V8F64) for s in (rs, lo, hi, zp, qmin, qmax))

    def load(src, first, mask):
        ptr, elem = src
        vec = ir.VectorType(elem, LANES)
        address = builder.bitcast(builder.gep(ptr, [first]), vec.as_pointer())
        if mask is None:
            value = builder.load(address, align=1)
        else:
            value = builder.call(masked(builder, "load", vec), [address, ir.Constant(I32, 1), mask,
                                                                ir.Constant(vec, None)])
        return value if elem == F64 else builder.sitofp(value, V8F64)

    def clip(value, low, high):
        value = builder.select(builder.fcmp_ordered(">", value, low), value, low)
        return builder.select(builder.fcmp_ordered("<", value, high), value, high)

    def chunk(first, mask):
        y = builder.fadd(load(v_src, first, mask), load(ct_src, first, mask))
        if row_term:
            y = builder.fsub(y, builder.fmul(load(wz_src, first, mask), rs))
        t = clip(builder.fadd(builder.fmul(y, load(mu_src, first, mask)), load(sh_src, first, mask)), lo, hi)
        if quantize:
            q = clip(builder.fadd(t, zp), qmin, qmax)
            lrint = declare(builder, "llvm.lrint.v8i32.v8f64", ir.FunctionType(ir.VectorType(I32, LANES), [V8F64]))
            value = builder.call(lrint, [q])
            if out_elem == I8:
                value = builder.trunc(value, ir.VectorType(I8, LANES))
        else:
            value = builder.fptrunc(t, ir.VectorType(F32, LANES))
        address = builder.bitcast(builder.gep(out_ptr, [first]), ir.VectorType(out_elem, LANES).as_pointer())
        if mask is None:
            builder.store(value, address, align=1)
        else:
            builder.call(masked(builder, "store", ir.VectorType(out_elem, LANES)),
                         [value, address, ir.Constant(I32, 1), mask])

    full = builder.udiv(cols, ir.Constant(I64, LANES))

    def whole(index, state):
        chunk(builder.mul(index, ir.Constant(I64, LANES)), None)
        return state

    emit_loop(builder, full, V8I64, 0, whole)
    first = builder.mul(full, ir.Constant(I64, LANES))
    left = builder.sub(cols, first)
    with builder.if_then(builder.icmp_signed(">", left, ir.Constant(I64, 0))):
        lanes = ir.Constant(V8I64, list(range(LANES)))
        chunk(first, builder.icmp_signed("<", lanes, splat(builder, left, V8I64)))
    return context.get_dummy_value()


finish_row = _make(row_term=True)
finish_row.__doc__ = """``out[row, col + i]`` from ``v[i]`` for ``i < cols`` (module docstring); ``rs`` a float64 row sum.

``v`` is one row of a tile (int32 or int64, contiguous); ``col_term`` and ``w_zp``
are int64 or float64 (holding integers); ``out`` is 2-D with contiguous rows (a C
array, or a slice of its columns): float32, or int8 / uint8 / int32 for rounded output.
"""
finish_row_plain = _make(row_term=False)
finish_row_plain.__doc__ = "``finish_row`` without the row term: ``w_zp`` and ``rs`` are not read."
