"""AVX-512 VNNI int8 micro-kernels, written as LLVM IR inside Numba intrinsics.

LLVM's vectoriser never emits ``vpdpbusd`` for a plain int8 dot loop, so the tile
is spelled out: ``rows x vectors`` accumulators of 16 int32 lanes stay in registers
for the whole K loop. Each k group loads ``vectors`` 512-bit weight vectors (16
channels x 4 k values each, of the 64-channel panel of ``kernels.pack.panels``),
broadcasts 4 activation bytes of each row to all lanes and issues one ``vpdpbusd``
per (row, vector):

    acc[r, 16 j + l] += sum_{u < 4} a[r, 4 q + u] * w[16 j + l, 4 q + u]

(unsigned activation bytes times signed weight bytes, exact, wrapping in int32).
A wide tile (``vectors`` 4) covers a whole panel; a narrow one (``vectors`` 2,
twice the rows) reads the first 32 channels of each k group only, at the same
``vpdpbusd`` count per k group: layers with 32 or fewer output channels then waste
no half-empty products, and the panel layout stays the same.
Nothing here is compiled until a kernel that calls it is, and ``kernels.dispatch``
only selects such kernels on CPUs with avx512vnni: compiling this for a CPU
without it aborts the process.
"""

from __future__ import annotations

import functools
from typing import Callable

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels.gemm import amx
from kernels.gemm.llvm_ir import (F32, F64, I8, I16, I32, I64, array_ptr, clamped_rows, declare, emit_loop,
                                  is_array, load_vector, masked, prefetch, splat, with_arity)

V16I32 = ir.VectorType(I32, 16)
V8F64 = ir.VectorType(F64, 8)
V16F32 = ir.VectorType(F32, 16)
V64I8 = ir.VectorType(I8, 64)
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
VECTORS = 4  # 512-bit vectors per row of a wide tile: one 64-channel panel
GROUP_BYTES = 64 * VECTORS  # one k group of a panel, whatever part of it a tile reads


@functools.cache
def _byte_operand_type() -> ir.VectorType:
    """The type LLVM declares for vpdpbusd's byte operands: <64 x i8> since LLVM 21, <16 x i32> before."""
    probe = f"declare <16 x i32> @{VPDPBUSD}(<16 x i32>, <64 x i8>, <64 x i8>)"
    try:
        llvm.parse_assembly(probe).verify()
    except RuntimeError:
        return V16I32
    return V64I8


def declare_vpdpbusd(builder: ir.IRBuilder) -> ir.Function:
    """``acc + sum of 4 (u8 x s8) products`` per int32 lane, for 16 lanes."""
    byte = _byte_operand_type()
    return declare(builder, VPDPBUSD, ir.FunctionType(V16I32, [V16I32, byte, byte]))


def _k_loop(builder, row_ptrs: list[ir.Value], b_base: ir.Value, kq: ir.Value, distance: int, vectors: int,
            init: list[ir.Value] | None = None, swap: bool = False) -> list[ir.Value]:
    """Emit ``kq`` k groups of a tile over the given rows; returns the accumulators, row-major.

    The rows are broadcast and the first ``vectors`` vectors of each k group of the
    panels loaded; ``vpdpbusd`` takes the unsigned bytes first: the rows'
    (activations), or with ``swap`` the panels'.
    """
    dot = declare_vpdpbusd(builder)
    byte = dot.function_type.args[1]

    def k_group(q, accs):
        group = builder.gep(b_base, [builder.mul(q, ir.Constant(I64, GROUP_BYTES))])
        w_vecs = [builder.bitcast(load_vector(builder, group, 64 * j, V64I8), byte) for j in range(vectors)]
        if distance:
            for line in range(vectors):
                prefetch(builder, builder.gep(group, [ir.Constant(I64, distance + 64 * line)]))
        a_step = builder.mul(q, ir.Constant(I64, 4))
        updated = []
        for r, row in enumerate(row_ptrs):
            word = builder.load(builder.bitcast(builder.gep(row, [a_step]), I32.as_pointer()), align=1)
            a_vec = builder.bitcast(splat(builder, word, V16I32), byte)
            for j in range(vectors):
                pair = (w_vecs[j], a_vec) if swap else (a_vec, w_vecs[j])
                updated.append(builder.call(dot, [accs[r * vectors + j], *pair]))
        return updated

    return emit_loop(builder, kq, V16I32, len(row_ptrs) * vectors, k_group, init)


class _Rows:
    """Activations as rows of a matrix: ``(a, a_off, lda, m, b, b_off, kq)``, row r at ``a[a_off + r lda]``."""

    arity = 7
    row_type, panel_type, swap = types.uint8, types.int8, False

    @classmethod
    def accepts(cls, tys) -> bool:
        return is_array(tys[0], cls.row_type, 1) and is_array(tys[4], cls.panel_type, 1)

    @classmethod
    def emit(cls, context, builder, tys, args, rows: int, distance: int,
             vectors: int) -> tuple[list[ir.Value], ir.Value]:
        a, a_off, lda, m, b, b_off, kq = args
        row_ptrs = clamped_rows(builder, array_ptr(context, builder, tys[0], a, I8), a_off, lda, m, rows)
        b_base = builder.gep(array_ptr(context, builder, tys[4], b, I8), [b_off])
        return _k_loop(builder, row_ptrs, b_base, kq, distance, vectors, swap=cls.swap), m


class _Indirect:
    """Activations gathered through an indirection table: ``(a, pad, ind, ind_off, taps, m, b, b_off, cq)``.

    The K dimension is ``taps`` runs of ``4 cq`` bytes: run ``t`` of row ``r``
    starts at ``a[ind[ind_off + r taps + t]]``, or at ``pad`` when that entry is
    negative (a convolution's border), and meets k groups ``t cq .. (t + 1) cq``
    of the weights. No im2col matrix is ever written.
    """

    arity = 9

    @staticmethod
    def accepts(tys) -> bool:
        return (is_array(tys[0], types.uint8, 1) and is_array(tys[1], types.uint8, 1)
                and is_array(tys[2], types.int64, 1) and is_array(tys[6], types.int8, 1))

    @staticmethod
    def emit(context, builder, tys, args, rows: int, distance: int, vectors: int) -> tuple[list[ir.Value], ir.Value]:
        a, pad, ind, ind_off, taps, m, b, b_off, cq = args
        a_ptr = array_ptr(context, builder, tys[0], a, I8)
        pad_ptr = array_ptr(context, builder, tys[1], pad, I8)
        entries = clamped_rows(builder, array_ptr(context, builder, tys[2], ind, I64), ind_off, taps, m, rows)
        b_base = builder.gep(array_ptr(context, builder, tys[6], b, I8), [b_off])
        run_bytes = builder.mul(cq, ir.Constant(I64, GROUP_BYTES))

        def tap(t, accs):
            row_ptrs = []
            for entry in entries:
                offset = builder.load(builder.gep(entry, [t]))
                inside = builder.icmp_signed(">=", offset, ir.Constant(I64, 0))
                row_ptrs.append(builder.select(inside, builder.gep(a_ptr, [offset]), pad_ptr))
            return _k_loop(builder, row_ptrs, builder.gep(b_base, [builder.mul(t, run_bytes)]), cq, distance, vectors,
                           accs)

        return emit_loop(builder, taps, V16I32, rows * vectors, tap), m


class _Weights(_Rows):
    """Weight rows against activation panels: ``(w, w_off, ldw, m, a, a_off, kq)``, the product transposed.

    Row r is the int8 ``w[w_off + r ldw ..]`` (an output channel), broadcast; the
    uint8 panel at ``a[a_off]`` holds 64 columns (output pixels) in the layout of
    ``kernels.pack.panels``, so a tile is 64 pixels of ``rows`` output channels.
    """

    row_type, panel_type, swap = types.int8, types.uint8, True


SOURCES = {"rows": _Rows, "indirect": _Indirect, "weights": _Weights, "amx": amx.Rows}


def _tile_intrinsic(source, rows: int, distance: int, vectors: int, tail: Callable, finish: Callable):
    """An intrinsic taking ``source``'s activation arguments, then ``tail.arity`` more.

    ``tail(types)`` says whether the trailing argument types are acceptable;
    ``finish(context, builder, tail_types, tail_args, results, m)`` consumes the
    ``rows * vectors`` accumulators.
    """

    def typer(typingctx, *args):
        head, rest = args[: source.arity], args[source.arity :]
        if not source.accepts(head) or not tail(rest):
            return None

        def codegen(context, builder, signature, values):
            tys = signature.args
            results, m = source.emit(context, builder, tys[: source.arity], values[: source.arity], rows, distance,
                                     vectors)
            finish(context, builder, tys[source.arity :], values[source.arity :], results, m)
            return context.get_dummy_value()

        return types.void(*args), codegen

    return intrinsic(with_arity(typer, source.arity + tail.arity))


def make_tile(rows: int, prefetch_distance: int = 0, source: str = "rows", vectors: int = VECTORS):
    """A ``rows x 16 vectors`` VNNI tile intrinsic: ``tile`` of ``kernels.gemm.microkernels``.

    ``tile(<source arguments>, acc)`` (``source`` "rows": ``a, a_off, lda, m, b,
    b_off, kq``; "indirect": see :class:`_Indirect`) computes the first ``16 vectors``
    channels of the panel at ``b_off``. Rows ``m..rows-1`` repeat row ``m - 1`` and
    are stored to ``acc`` (int32 ``[rows, 64]``, columns ``c < 16 vectors``) too;
    callers use only the first ``m``. With ``prefetch_distance`` > 0 each k group
    also prefetches the weights that many bytes ahead into L1: they stream from L2
    (GEMM: a 64 x K panel is larger than L1) or from L3 / DRAM (GEMV).
    """

    def finish(context, builder, tys, args, results, m):
        c_ptr = array_ptr(context, builder, tys[0], args[0], I32)
        for index, result in enumerate(results):  # row r, vector j at acc[r, 16 j]
            r, j = divmod(index, vectors)
            dst = builder.gep(c_ptr, [ir.Constant(I64, 64 * r + 16 * j)])
            builder.store(result, builder.bitcast(dst, V16I32.as_pointer()), align=4)

    def accepts(tys) -> bool:
        return is_array(tys[0], types.int32, 2)

    accepts.arity = 1
    return _tile_intrinsic(SOURCES[source], rows, prefetch_distance, vectors, accepts, finish)


def _store_rows(builder, results: list[ir.Value], vectors: int, m, cols, out_ptr, o_off, ldo, elem: ir.Type,
                transform: Callable[[ir.Value, int, int], ir.Value]) -> None:
    """Masked stores of ``transform(sums, r, j)`` (16 ``elem`` values) for rows ``r < m``, columns ``c < cols``.

    Row r, vector j goes to ``out_ptr[o_off + r * ldo + 16 j ...]``; rows past m
    store nothing (their lane limit is 0), so a partial tile never writes past
    the caller's array.
    """
    vec = ir.VectorType(elem, 16)
    size = 1 if elem == I8 else 4
    store = masked(builder, "store", vec)
    lanes = ir.Constant(V16I32, list(range(16)))
    for r in range(len(results) // vectors):
        limit = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), builder.trunc(cols, I32),
                               ir.Constant(I32, 0))
        limit = splat(builder, limit, V16I32)
        row = builder.gep(out_ptr, [builder.add(o_off, builder.mul(ir.Constant(I64, r), ldo))])
        for j in range(vectors):
            mask = builder.icmp_signed("<", builder.add(lanes, ir.Constant(V16I32, [16 * j] * 16)), limit)
            dst = builder.bitcast(builder.gep(row, [ir.Constant(I64, 16 * j)]), vec.as_pointer())
            builder.call(store, [transform(results[r * vectors + j], r, j), dst, ir.Constant(I32, size), mask])


def _row_index(builder, r: int, m: ir.Value) -> ir.Value:
    """Row ``r`` of a tile, or its last valid row ``m - 1``: the rows past ``m`` read in bounds and store nothing."""
    return builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), ir.Constant(I64, r),
                          builder.sub(m, ir.Constant(I64, 1)))


def _channel_terms(builder, ct_ptr: ir.Value, m: ir.Value, rows: int, source: str,
                   vectors: int) -> Callable[[int, int], ir.Value]:
    """``terms(r, j)``: the int32 ``col_term`` of row r, vector j, from ``ct_ptr`` (at the tile's first channel).

    Output channels are the columns of a tile, or its rows with the "weights"
    source (one term per row, in every lane).
    """
    if source == "weights":
        rows_ = [splat(builder, builder.load(builder.gep(ct_ptr, [_row_index(builder, r, m)])), V16I32)
                 for r in range(rows)]
        return lambda r, j: rows_[r]
    columns = [load_vector(builder, ct_ptr, 16 * j, V16I32) for j in range(vectors)]
    return lambda r, j: columns[j]


def make_tile_store(rows: int, prefetch_distance: int = 0, source: str = "rows", vectors: int = VECTORS):
    """A tile intrinsic that finishes int32 output itself: ``tile_store`` of ``kernels.gemm.microkernels``.

    ``tile_store(<source arguments>, col_term, c0, cols, out, o_off, ldo)`` adds
    ``col_term[c0 + c]`` (int32, wrapping) to each sum and writes row ``r < m``,
    column ``c < cols`` to ``out[o_off + r * ldo + c]`` with masked stores, straight
    from the registers: no scratch tile, no second pass (``cols <= 16 vectors``). With the
    "weights" source the output channels are the rows: ``col_term[c0 + r]`` (and ``c0`` the first row's channel).
    """

    def accepts(tys) -> bool:
        return is_array(tys[0], types.int32, 1) and is_array(tys[3], types.int32, 1)

    accepts.arity = 6

    def finish(context, builder, tys, args, results, m):
        col_term, c0, cols, out, o_off, ldo = args
        ct_ptr = builder.gep(array_ptr(context, builder, tys[0], col_term, I32), [c0])
        terms = _channel_terms(builder, ct_ptr, m, rows, source, vectors)
        _store_rows(builder, results, vectors, m, cols, array_ptr(context, builder, tys[3], out, I32), o_off, ldo,
                    I32, lambda sums, r, j: builder.add(sums, terms(r, j)))

    return _tile_intrinsic(SOURCES[source], rows, prefetch_distance, vectors, accepts, finish)


def _scaled(builder, y: ir.Value, factors: Callable[[int], tuple[ir.Value, ir.Value]],
            shifted: bool) -> list[ir.Value]:
    """The two ``<8 x double>`` halves of ``y mult + shift`` (``requantize``), computed exactly as there."""
    y = builder.xor(y, ir.Constant(V16I32, [-(2**31)] * 16))
    high = ir.Constant(V16I32, [0x43300000] * 16)
    offset = ir.Constant(V8F64, [2.0**52 + 2.0**31] * 8)
    halves = []
    for h in (0, 1):
        pairs = builder.shuffle_vector(y, high, ir.Constant(V16I32, [i // 2 + 8 * h if i % 2 == 0 else 16
                                                                     for i in range(16)]))
        mult, shift = factors(h)
        t = builder.fmul(builder.fsub(builder.bitcast(pairs, V8F64), offset), mult)
        halves.append(builder.fadd(t, shift) if shifted else t)
    return halves


def _rounded(builder, halves: list[ir.Value], zp: ir.Value) -> ir.Value:
    """``rint(t + zp)`` of both halves as 16 int32 lanes (each ``|t + zp| < 2**31``)."""
    magic = ir.Constant(V8F64, [1.5 * 2.0**52] * 8)
    words = [builder.bitcast(builder.fadd(builder.fadd(t, zp), magic), V16I32) for t in halves]
    return builder.shuffle_vector(words[0], words[1], ir.Constant(V16I32, list(range(0, 32, 2))))


def rounded_codes(builder, y: ir.Value, factors: Callable[[int], tuple[ir.Value, ir.Value]], zp: ir.Value,
                  shifted: bool = True) -> ir.Value:
    """16 int32 ``rint(y mult + shift + zp)`` in float64 (``requantize`` without the clamp to ``[lo, hi]``).

    Clamping these codes to ``rint(lo + zp)``, ``rint(hi + zp)`` gives ``requantize``'s
    (``t -> rint(t + zp)`` is monotonic). Needs ``|y mult + shift + zp| < 2**31`` for
    every sum (``kernels.epilogue.codes_fit``); ``shifted=False`` skips a ``shift`` of 0.
    """
    return _rounded(builder, _scaled(builder, y, factors, shifted), zp)


def single_codes(builder, sums: list[ir.Value], single: Callable[[int], tuple[ir.Value, ir.Value, ir.Value]],
                 exact: Callable[[int], ir.Value], bounds: tuple[ir.Value, ir.Value] | None = None) -> list[ir.Value]:
    """Int32 codes of each vector of 16 sums in ``sums``, rounded in float32 where that is exact.

    ``single(i)`` gives the ``<16 x float>`` ``(m32, c32, limit)`` of ``sums[i]``'s lanes
    (``kernels.epilogue.single_precision_codes``): a code is ``rint(b)``,
    ``b = fma(float32(y), m32, c32)``, first clamped to ``bounds`` (splat float
    ``qlo``, ``qhi``) if given. If any lane of any vector has ``|b - rint(b)| >= limit``
    (too near a tie to trust), every code is ``exact(i)`` instead (``rounded_codes``,
    clamped likewise), on a branch taken rarely. Consecutive vectors whose ``limit`` is
    the same IR value share one comparison.
    """
    sig = [V16F32, I32, V16F32, I16, I32]
    fma = declare(builder, "llvm.fma.v16f32", ir.FunctionType(V16F32, [V16F32] * 3))
    # b - rint(b) (vreduceps), and the larger magnitude of two vectors, made positive (vrangeps)
    reduce = declare(builder, "llvm.x86.avx512.mask.reduce.ps.512", ir.FunctionType(V16F32, sig))
    larger = declare(builder, "llvm.x86.avx512.mask.range.ps.512", ir.FunctionType(V16F32, [V16F32] + sig))
    nearest = declare(builder, "llvm.x86.avx512.mask.cvtps2dq.512", ir.FunctionType(V16I32, [V16F32, V16I32, I16,
                                                                                            I32]))
    zero, every, current = ir.Constant(V16F32, None), ir.Constant(I16, -1), ir.Constant(I32, 4)
    codes, runs = [], []  # runs: [limit, largest |b - rint(b)|] of consecutive vectors sharing one limit
    for i, y in enumerate(sums):
        m32, c32, limit = single(i)
        b = builder.call(fma, [builder.sitofp(y, V16F32), m32, c32])
        if bounds is not None:
            b = builder.select(builder.fcmp_ordered("<", b, bounds[0]), bounds[0], b)
            b = builder.select(builder.fcmp_ordered(">", b, bounds[1]), bounds[1], b)
        off = builder.call(reduce, [b, ir.Constant(I32, 8), zero, every, current])  # imm 8: to nearest
        codes.append(builder.call(nearest, [b, ir.Constant(V16I32, None), every, current]))
        if not runs or runs[-1][0] is not limit:
            runs.append([limit, zero])
        runs[-1][1] = builder.call(larger, [runs[-1][1], off, ir.Constant(I32, 0b1011), zero, every, current])
    near = ir.Constant(I16, 0)
    for limit, worst in runs:
        near = builder.or_(near, builder.bitcast(builder.fcmp_ordered(">=", worst, limit), I16))
    fast = builder.block
    with builder.if_then(builder.icmp_unsigned("!=", near, ir.Constant(I16, 0)), likely=False):
        redone = [exact(i) for i in range(len(sums))]
        slow = builder.block
    merged = []
    for code, again in zip(codes, redone):
        phi = builder.phi(V16I32)
        phi.add_incoming(code, fast)
        phi.add_incoming(again, slow)
        merged.append(phi)
    return merged


def requantize(builder, y: ir.Value, factors: Callable[[int], tuple[ir.Value, ir.Value]], lo: ir.Value,
               hi: ir.Value, zp: ir.Value, quantize: bool, shifted: bool = True) -> ir.Value:
    """The ``REAL`` / ``QUANT`` epilogue of 16 int32 sums ``y`` (already including ``col_term``), in registers.

    ``factors(h)`` gives the ``<8 x double>`` ``mult`` and ``shift`` of lanes ``8 h .. 8 h + 7``;
    ``lo``, ``hi`` and ``zp`` are splat ``<8 x double>``. Returns 16 float32
    ``float32(clip(y mult + shift, lo, hi))`` or, with ``quantize``, 16 i8
    ``rint(clip(y mult + shift, lo, hi) + zp)`` (half to even, ``[lo, hi]`` narrowed by
    the caller so that no final clamp is needed), computed as ``finish_tile`` does.

    Fewer shuffles than the obvious code: ``y + 2**31`` read as the low word of a
    double whose high word is that of ``2**52`` is ``2**52 + 2**31 + y``, so one exact
    subtraction gives ``float64(y)``; rounding adds ``1.5 * 2**52`` (a double below
    ``2**51`` in magnitude then rounds half to even to an integer, held in its low
    word). ``shifted=False``, for callers that know every ``shift`` is 0, skips adding it.
    """
    halves = _scaled(builder, y, factors, shifted)
    minimum = declare(builder, "llvm.x86.avx512.min.pd.512", ir.FunctionType(V8F64, [V8F64, V8F64, I32]))
    maximum = declare(builder, "llvm.x86.avx512.max.pd.512", ir.FunctionType(V8F64, [V8F64, V8F64, I32]))
    current = ir.Constant(I32, 4)  # the current rounding direction: no embedded rounding
    halves = [builder.call(minimum, [builder.call(maximum, [t, lo, current]), hi, current]) for t in halves]
    if quantize:
        return builder.trunc(_rounded(builder, halves, zp), ir.VectorType(I8, 16))
    return builder.shuffle_vector(*(builder.fptrunc(t, ir.VectorType(F32, 8)) for t in halves),
                                  ir.Constant(V16I32, list(range(16))))


def make_tile_finish(rows: int, prefetch_distance: int = 0, source: str = "rows", vectors: int = VECTORS):
    """A tile intrinsic that rescales and (re)quantizes its sums in registers: ``tile_finish``.

    ``tile_finish(<source arguments>, col_term, mult, shift, single, lo, hi, zp, qmin, qmax, c0, cols, out, o_off,
    ldo)``
    computes, per output ``(r, c)`` with ``j = c0 + c``, the ``REAL`` / ``QUANT``
    epilogue of ``kernels.epilogue`` without a row term::

        y = sums + col_term[j]                         int32, wrapping (exact when y fits int32)
        t = clip(float64(y) * mult[j] + shift[j], lo, hi)
        out = float32(t)                                          (float32 out)
        out = rint(t + zp)                                        (int8 / uint8 out)

    in float64, in that order, with no contraction, as ``finish_tile`` does. An
    integer output relies on ``[lo, hi]`` lying within ``[qmin - zp, qmax - zp]``,
    as ``kernels.epilogue.Epilogue`` guarantees, so no clamp to float ``qmin`` and
    ``qmax`` is needed. Integer ones (``kernels.epilogue.with_codes``) are the codes
    it clamps instead of ``t``, and say that ``shift`` is 0; those codes are rounded
    in float32 where that is exact (``single_codes``, with ``single`` the float32
    ``kernels.epilogue.single_table``, clamped use), else as ``requantize`` does.
    ``col_term`` (int32), ``mult`` and ``shift`` (float64) and ``single`` are padded to
    a whole number of panels. Stores are masked to rows ``< m`` and columns ``< cols``
    (``cols <= 16 vectors``; ``c0`` a multiple of 16).
    With the "weights" source the output channels are the rows: ``j = c0 + r``.
    """
    def accepts(tys) -> bool:
        out = tys[11]
        return (is_array(tys[0], types.int32, 1) and is_array(tys[1], types.float64, 1)
                and is_array(tys[2], types.float64, 1) and is_array(tys[3], types.float32, 1)
                and all(t == types.float64 for t in tys[4:7])
                and (all(t == types.float64 for t in tys[7:9]) or all(t == types.int64 for t in tys[7:9]))
                and isinstance(out, types.Array) and out.ndim == 1 and out.layout == "C"
                and out.dtype in (types.float32, types.uint8, types.int8))

    accepts.arity = 14

    def finish(context, builder, tys, args, results, m):
        col_term, mult, shift, single, lo, hi, zp, qmin, qmax, c0, cols, out, o_off, ldo = args
        quantize = tys[11].dtype != types.float32
        codes = None
        if quantize and tys[7] == types.int64:
            codes = tuple(splat(builder, builder.trunc(v, I32), V16I32) for v in (qmin, qmax))
        ct_ptr = builder.gep(array_ptr(context, builder, tys[0], col_term, I32), [c0])
        mu_ptr = builder.gep(array_ptr(context, builder, tys[1], mult, F64), [c0])
        sh_ptr = builder.gep(array_ptr(context, builder, tys[2], shift, F64), [c0])
        terms = _channel_terms(builder, ct_ptr, m, rows, source, vectors)
        lo, hi, zp = (splat(builder, v, V8F64) for v in (lo, hi, zp))

        def factors(r: int, j: int, h: int) -> tuple[ir.Value, ir.Value]:
            # per-channel factors loaded where they are used: kept in registers they would spill
            if source == "weights":
                at = _row_index(builder, r, m)
                return tuple(splat(builder, builder.load(builder.gep(ptr, [at])), V8F64) for ptr in (mu_ptr, sh_ptr))
            return (load_vector(builder, mu_ptr, 16 * j + 8 * h, V8F64),
                    load_vector(builder, sh_ptr, 16 * j + 8 * h, V8F64))

        def transform(sums, r, j):
            return requantize(builder, builder.add(sums, terms(r, j)), lambda h: factors(r, j, h), lo, hi, zp,
                              quantize)

        elem = I8 if quantize else F32
        out_ptr = array_ptr(context, builder, tys[11], out, elem)
        if codes is None:
            _store_rows(builder, results, vectors, m, cols, out_ptr, o_off, ldo, elem, transform)
            return
        table = array_ptr(context, builder, tys[3], single, F32)
        qlo, qhi = codes
        bounds = tuple(splat(builder, builder.sitofp(v, F32), V16F32) for v in (qmin, qmax))
        # vectors sharing their channels' factors go together: a column's down the rows, a row's across
        order = [(r, j) for j in range(vectors) for r in range(rows)]
        if source == "weights":
            order = [(r, j) for r in range(rows) for j in range(vectors)]
        loaded = {}

        def factors32(r: int, j: int) -> tuple[ir.Value, ir.Value, ir.Value]:
            key = r if source == "weights" else j
            if key not in loaded:
                if source == "weights":  # channel c0 + r in every lane
                    ch = builder.add(c0, _row_index(builder, r, m))
                    at = builder.add(builder.mul(builder.ashr(ch, ir.Constant(I64, 4)), ir.Constant(I64, 48)),
                                     builder.and_(ch, ir.Constant(I64, 15)))
                    loaded[key] = tuple(splat(builder, builder.load(builder.gep(table, [builder.add(
                        at, ir.Constant(I64, 16 * i))])), V16F32) for i in range(3))
                else:  # channels c0 + 16 j .. (c0 is a whole number of vectors)
                    base = builder.gep(table, [builder.mul(c0, ir.Constant(I64, 3))])
                    loaded[key] = tuple(load_vector(builder, base, 48 * j + 16 * i, V16F32) for i in range(3))
            return loaded[key]

        sums = [builder.add(results[r * vectors + j], terms(r, j)) for r, j in order]

        def exact(i: int) -> ir.Value:
            r, j = order[i]
            low = rounded_codes(builder, sums[i], lambda h: factors(r, j, h), zp, shifted=False)
            low = builder.select(builder.icmp_signed("<", low, qlo), qlo, low)
            return builder.select(builder.icmp_signed(">", low, qhi), qhi, low)

        rounded = single_codes(builder, sums, lambda i: factors32(*order[i]), exact, bounds)
        by_place = {place: builder.trunc(code, ir.VectorType(I8, 16)) for place, code in zip(order, rounded)}
        _store_rows(builder, results, vectors, m, cols, out_ptr, o_off, ldo, elem,
                    lambda sums_, r, j: by_place[r, j])

    return _tile_intrinsic(SOURCES[source], rows, prefetch_distance, vectors, accepts, finish)
