"""AMX int8 tiles: the u8 x s8 sums of a 16-row, 64-channel micro-tile on the tile registers of Intel AMX.

``tdpbusd`` multiplies a tile of activations (up to 16 rows of 64 bytes, unsigned) by a tile of weights (16 rows
of 64 bytes: 16 k groups of 16 channels x 4 k values, signed) into 16 x 16 int32 sums, 1024 products per
instruction, eight times what a 512-bit ``vpdpbusd`` does. The panel layout of ``kernels.pack.panels`` is already
the weight tile's layout: k group q of a panel holds channel c's 4 bytes at ``256 q + 4 c``, so the weights of
channels ``16 j .. 16 j + 15`` for k groups ``16 s .. 16 s + 15`` are a tile of stride 256 at ``4096 s + 64 j``.

Per step of 64 bytes of K, one activation tile meets four weight tiles (four accumulators: the 64 channels of a
panel). Every tile has the same shape (16 rows, 64 bytes), so LLVM, which shapes the tile registers from the
``.internal`` intrinsics' row and byte counts, configures them (``ldtilecfg``) once per call. What does not fill a
tile goes through zero-padded copies on the stack, read with masked loads so that nothing outside the caller's
arrays is touched: the rows of a tile of ``m < 16`` rows, step by step, and the last ``kq % 16`` k groups of
activations and weights. The sums are then stored to the stack and handed on as the ``16 x 4`` vectors of 16
int32 lanes that ``kernels.gemm.vnni``'s tiles produce, so its finishing code (store, rescale, requantize from
registers) serves the AMX tile too. Sums wrap in int32 as the VNNI tiles' do (``kernels.gemm.driver`` keeps K
short enough that they do not).

Linux grants a process the tile data state only on request (:func:`kernels.cpu.amx_permitted`);
``kernels.dispatch`` selects these tiles only after that.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types

from kernels.gemm.llvm_ir import (I1, I8, I16, I32, I64, array_ptr, declare, emit_loop, is_array, load_vector, masked,
                                  splat)

STEP = 64  # bytes of K per tdpbusd: 16 k groups
CHANNELS = 16  # output channels per accumulator tile
ROWS = 16  # the most rows a tile register holds


class _Tile(ir.Type):
    """LLVM's ``x86_amx``: a value held in a tile register (llvmlite has no such type)."""

    def _to_string(self) -> str:
        return "x86_amx"

    def __eq__(self, other) -> bool:
        return isinstance(other, _Tile)

    def __hash__(self) -> int:
        return hash("x86_amx")


TILE = _Tile()


def _intrinsics(builder: ir.IRBuilder) -> tuple[ir.Function, ir.Function, ir.Function, ir.Function]:
    """``tileloadd64``, ``tdpbusd``, ``tilestored64``, ``tilezero``: LLVM's shape-carrying forms."""
    ptr = I8.as_pointer()
    return (declare(builder, "llvm.x86.tileloadd64.internal", ir.FunctionType(TILE, [I16, I16, ptr, I64])),
            declare(builder, "llvm.x86.tdpbusd.internal", ir.FunctionType(TILE, [I16, I16, I16, TILE, TILE, TILE])),
            declare(builder, "llvm.x86.tilestored64.internal",
                    ir.FunctionType(ir.VoidType(), [I16, I16, ptr, I64, TILE])),
            declare(builder, "llvm.x86.tilezero.internal", ir.FunctionType(TILE, [I16, I16])))


def _stack(builder: ir.IRBuilder, size: int, elem: ir.Type = I8) -> ir.Value:
    """An uninitialised ``elem[size]`` on the stack, allocated once in the entry block (``cgutils.alloca_once``
    would zero it on every call: 9 KB per tile here)."""
    with builder.goto_entry_block():
        return builder.alloca(ir.ArrayType(elem, size))


def _copy_rows(builder: ir.IRBuilder, dst: ir.Value, src: ir.Value, stride: ir.Value, rows: ir.Value,
               width: ir.Value, count: int, dst_stride: int) -> None:
    """``dst[r * dst_stride + c] = src[r * stride + c]`` for ``r < rows``, ``c < width`` (at most 64), zero for the
    other ``c < 64`` and for rows ``rows .. count - 1``: masked loads, so nothing outside those bytes is read."""
    vec = ir.VectorType(I8, 64)
    load = masked(builder, "load", vec)
    lanes = ir.Constant(ir.VectorType(I64, 64), list(range(64)))
    inside = builder.icmp_signed("<", lanes, splat(builder, width, ir.VectorType(I64, 64)))
    off = ir.Constant(ir.VectorType(I1, 64), [False] * 64)
    zero = ir.Constant(vec, None)
    for r in range(count):
        mask = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), rows), inside, off)
        row = builder.gep(src, [builder.mul(ir.Constant(I64, r), stride)])
        value = builder.call(load, [builder.bitcast(row, vec.as_pointer()), ir.Constant(I32, 1), mask, zero])
        builder.store(value, builder.bitcast(builder.gep(dst, [ir.Constant(I64, r * dst_stride)]), vec.as_pointer()),
                      align=1)


class Rows:
    """The ``"rows"`` source of ``kernels.gemm.vnni`` (``a, a_off, lda, m, b, b_off, kq``) on AMX: at most 16 rows."""

    arity = 7

    @classmethod
    def accepts(cls, tys) -> bool:
        return is_array(tys[0], types.uint8, 1) and is_array(tys[4], types.int8, 1)

    @classmethod
    def emit(cls, context, builder, tys, args, rows: int, distance: int,
             vectors: int) -> tuple[list[ir.Value], ir.Value]:
        """The ``rows x vectors`` accumulators (rows past ``m`` repeat row ``m - 1``) and ``m``."""
        assert rows == ROWS and vectors <= STEP // CHANNELS
        a, a_off, lda, m, b, b_off, kq = args
        load, dot, store, zero = _intrinsics(builder)
        a_base = builder.gep(array_ptr(context, builder, tys[0], a, I8), [a_off])
        b_base = builder.gep(array_ptr(context, builder, tys[4], b, I8), [b_off])
        # constant shapes only: LLVM then configures the tile registers once, where the micro-kernel starts
        height, step_bytes, step_groups = ir.Constant(I16, ROWS), ir.Constant(I16, STEP), ir.Constant(I16, STEP // 4)
        a_step, b_step = ir.Constant(I64, STEP), ir.Constant(I64, 4 * 64 * STEP // 4)  # bytes per step of a, b
        panel_stride = ir.Constant(I64, 4 * 64)  # one k group of a panel
        a_pad = builder.bitcast(_stack(builder, ROWS * STEP), I8.as_pointer())
        full = builder.icmp_signed("==", m, ir.Constant(I64, ROWS))
        all_bytes = ir.Constant(I64, STEP)

        def step(accs, a_at, lda_, b_at):
            """``accs`` plus one step's products: activations at ``a_at`` (row stride ``lda_``), weights at ``b_at``
            (k group stride 256)."""
            a_tile = builder.call(load, [height, step_bytes, a_at, lda_])
            return [builder.call(dot, [height, step_bytes, step_bytes, acc, a_tile,
                                       builder.call(load, [step_groups, step_bytes,
                                                           builder.gep(b_at, [ir.Constant(I64, 4 * CHANNELS * j)]),
                                                           panel_stride])])
                    for j, acc in enumerate(accs)]

        def full_step(s, accs):
            a_at = builder.gep(a_base, [builder.mul(s, a_step)])
            with builder.if_then(builder.not_(full)):  # a partial tile: its rows through the zero-padded copy
                _copy_rows(builder, a_pad, a_at, lda, m, all_bytes, ROWS, STEP)
            return step(accs, builder.select(full, a_at, a_pad), builder.select(full, lda, a_step),
                        builder.gep(b_base, [builder.mul(s, b_step)]))

        steps = builder.sdiv(kq, ir.Constant(I64, STEP // 4))
        groups = builder.srem(kq, ir.Constant(I64, STEP // 4))
        starts = [builder.call(zero, [height, step_bytes]) for _ in range(vectors)]
        summed = emit_loop(builder, steps, TILE, vectors, full_step, starts)
        before_tail = builder.block
        with builder.if_then(builder.icmp_signed(">", groups, ir.Constant(I64, 0))):
            # the last kq % 16 k groups, zero-padded to a whole step
            b_pad = builder.bitcast(_stack(builder, STEP * 64), I8.as_pointer())
            _copy_rows(builder, a_pad, builder.gep(a_base, [builder.mul(steps, a_step)]), lda, m,
                       builder.mul(groups, ir.Constant(I64, 4)), ROWS, STEP)
            b_from = builder.gep(b_base, [builder.mul(steps, b_step)])
            for quarter in range(4):  # the weights' k groups are contiguous: 256-byte rows, copied in 64-byte columns
                _copy_rows(builder, builder.gep(b_pad, [ir.Constant(I64, 64 * quarter)]),
                           builder.gep(b_from, [ir.Constant(I64, 64 * quarter)]), panel_stride, groups, all_bytes,
                           STEP // 4, 4 * 64)
            tailed, tail_end = step(summed, a_pad, a_step, b_pad), builder.block
        finals = [builder.phi(TILE) for _ in range(vectors)]  # phis must open the block
        for final, plain, with_tail in zip(finals, summed, tailed):
            final.add_incoming(plain, before_tail)
            final.add_incoming(with_tail, tail_end)
        sums = _stack(builder, ROWS * 4 * CHANNELS, I32)
        sums_ptr = builder.bitcast(sums, I8.as_pointer())
        row_bytes = ir.Constant(I64, 4 * 4 * CHANNELS)
        for j, final in enumerate(finals):
            builder.call(store, [height, step_bytes, builder.gep(sums_ptr, [ir.Constant(I64, 4 * CHANNELS * j)]),
                                 row_bytes, final])
        words = builder.bitcast(sums, I32.as_pointer())
        last = builder.sub(m, ir.Constant(I64, 1))
        results = []
        for r in range(rows):
            row = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), ir.Constant(I64, r), last)
            for j in range(vectors):
                offset = builder.add(builder.mul(row, ir.Constant(I64, 4 * CHANNELS)), ir.Constant(I64, CHANNELS * j))
                results.append(load_vector(builder, words, offset, ir.VectorType(I32, CHANNELS)))
        return results, m
