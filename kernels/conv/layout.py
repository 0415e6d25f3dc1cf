"""NCHW <-> NHWC conversion: batched matrix transposes made of in-register block transposes.

Both directions are one batched transpose of C-contiguous arrays::

    dst[n, j, i] = src[n, i, j]        src: [N, R, K],  dst: [N, K, R]

with ``[R, K] = [C, H * W]`` for NCHW -> NHWC and ``[H * W, C]`` for NHWC -> NCHW.
NumPy's strided copy moves one element at a time (1-3 GB/s here for bytes).

Blocks are transposed in registers. A 128-bit lane holds ``s`` elements (16 bytes
or 4 four-byte elements), and vector ``v < s`` joins lane-sized segments: of rows
``v, v + s, v + 2 s, ...`` (a *tall* block of ``tall * s`` rows by ``s`` columns) or
of row ``v``, columns ``0 .. s, s .. 2 s, ...`` (a *wide* block, ``s`` rows by
``wide * s`` columns; *short* is ``s x s``). ``log2(s)`` stages of interleaves::

    V'[2 i] = lo(V[i], V[i + s / 2]),   V'[2 i + 1] = hi(V[i], V[i + s / 2])   (i < s / 2)

(``lo``/``hi`` interleave the elements of the low / high halves of every lane of
the two vectors: ``punpckl/h``) transpose every lane, so that each segment of
``V'[c]`` is a column of the block, rows in order: one store each. The stages are
plain ``shufflevector`` instructions, no target intrinsics: the code compiles for
every CPU and needs no ``kernels.dispatch`` entry. :func:`_plan` derives the masks
and the stores and checks them on (row, column) labels.

Transposes are store-bound (the shuffles are nearly free), so tall blocks, with
16-byte loads and 64-byte stores (a whole cache line of ``dst``), measured 1.4x
faster than wide ones (wide loads, 16-byte stores); wide and short blocks take the
rows left under the tall ones, and matrices with fewer rows. The driver walks
column panels a few cache lines wide, so the lines a panel reads stay in L1 until
used up. Ragged edges are covered by shifting the last block back over ones
already done (it rewrites equal values), narrow matrices by blocks whose surplus
loads or stores fall inside the matrix (see :func:`_short_dst_rows` and
:func:`_short_src_rows`); only the rest goes element by element.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.entry import Entry, In, Out
from kernels.gemm.llvm_ir import I32, I64, array_ptr, load_vector


class Block(NamedTuple):
    """The blocks of one element size: ``side x side``, ``tall * side x side`` and ``side x wide * side``."""

    side: int  # elements per 128-bit lane: vectors per block
    tall: int  # row segments per vector in the tall block
    wide: int  # column segments per vector in the wide block
    panel: int  # columns per panel (a multiple of wide * side): a few cache lines of each source row


BLOCKS = {1: Block(16, 4, 2, 128), 4: Block(4, 4, 2, 32)}
ELEMENTS = {types.uint8: 1, types.uint32: 4}  # the compiled element type of each size
VIEWS = {1: np.dtype(np.uint8), 4: np.dtype(np.uint32)}
BYTES_PER_US = 8000.0  # measured single-thread speed, for the thread split


def _plan(side: int, tall: int, wide: int) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """The shuffles and stores of a block transpose of ``tall * side`` rows by ``wide * side`` columns.

    Vector ``v`` starts as the segments (row ``v + side * s``, columns ``side * t ..
    side * t + side``), ``s`` major; each of the ``log2(side)`` stages makes vectors
    ``2 i`` and ``2 i + 1`` (``i < side / 2``) of ``shuffle(V[i], V[i + side / 2], lo)``
    and ``... hi)``. Returns ``(lo, hi, stores)``, ``stores`` listing ``(column,
    vector, first lane)`` by increasing column: lanes ``first .. first + rows`` of
    the final vector hold that column. Raises ``AssertionError`` unless so.
    """
    width, rows, half = tall * wide * side, tall * side, side // 2
    lo = [q + p for base in range(0, width, side) for p in range(base, base + half) for q in (0, width)]
    hi = [q + p + half for p in lo[::2] for q in (0, width)]
    labels = [[(v + side * (p // side // wide), side * (p // side % wide) + p % side) for p in range(width)]
              for v in range(side)]
    for _ in range(side.bit_length() - 1):
        labels = [[(labels[i] + labels[i + half])[p] for p in mask] for i in range(half) for mask in (lo, hi)]
    stores = sorted((vector[first][1], v, first) for v, vector in enumerate(labels) for first in range(0, width, rows))
    assert [c for c, _, _ in stores] == list(range(side * wide)) and all(
        labels[v][first : first + rows] == [(r, c) for r in range(rows)] for c, v, first in stores), \
        "the stages do not transpose"
    return lo, hi, stores


def _block_intrinsic(kind: str):
    """The ``kind`` block transpose for the element size of its arrays (see :class:`Block`).

    A block is ``rows x cols`` = ``side x side`` ("short"), ``tall * side x side``
    ("tall") or ``side x wide * side`` ("wide"). ``block(src, s_off, lds, m, dst,
    d_off, ldd, n)`` (1-D C-contiguous ``src`` and ``dst`` of one element type,
    offsets and strides in elements) sets, for ``c < min(n, cols)`` and ``r < rows``::

        dst[d_off + c * ldd + r] = src[s_off + min(r, m - 1) * lds + c]

    It loads ``cols`` elements of every row (rows past ``m`` repeat row ``m - 1``) and
    stores the ``rows`` elements of each column ``c < n``, in increasing ``c``.
    """

    @intrinsic
    def block(typingctx, src, s_off, lds, m, dst, d_off, ldd, n):
        # src may be read-only (it is never written): same element type and layout as dst, not the same type
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
                and dst.mutable and src.ndim == dst.ndim == 1 and src.layout == dst.layout == "C"
                and src.dtype in ELEMENTS):
            return None
        size = ELEMENTS[src.dtype]
        spec = BLOCKS[size]
        side = spec.side
        tall, wide = (spec.tall if kind == "tall" else 1), (spec.wide if kind == "wide" else 1)
        rows, cols = side * tall, side * wide
        lo, hi, stores = _plan(side, tall, wide)
        masks = [ir.Constant(ir.VectorType(I32, rows * wide), mask) for mask in (lo, hi)]
        elem = ir.IntType(8 * size)

        def join(builder, parts):
            """The concatenation of equal vectors."""
            while len(parts) > 1:
                lanes = ir.Constant(ir.VectorType(I32, 2 * parts[0].type.count), list(range(2 * parts[0].type.count)))
                parts = [builder.shuffle_vector(a, b, lanes) for a, b in zip(parts[::2], parts[1::2])]
            return parts[0]

        def codegen(context, builder, signature, args):
            src, s_off, lds, m, dst, d_off, ldd, n = args
            src_ptr = array_ptr(context, builder, signature.args[0], src, elem)
            dst_ptr = array_ptr(context, builder, signature.args[4], dst, elem)
            last = builder.sub(m, ir.Constant(I64, 1))
            vecs = []
            for v in range(side):
                parts = []
                for r in range(v, rows, side):
                    row = builder.select(builder.icmp_signed("<", ir.Constant(I64, r), m), ir.Constant(I64, r), last)
                    parts.append(load_vector(builder, src_ptr, builder.add(s_off, builder.mul(row, lds)),
                                             ir.VectorType(elem, cols)))
                vecs.append(join(builder, parts))
            for _ in range(side.bit_length() - 1):
                vecs = [builder.shuffle_vector(vecs[i], vecs[i + side // 2], mask)
                        for i in range(side // 2) for mask in masks]
            for c, v, first in stores:
                value = vecs[v] if wide == 1 else builder.shuffle_vector(
                    vecs[v], vecs[v], ir.Constant(ir.VectorType(I32, rows), list(range(first, first + rows))))
                with builder.if_then(builder.icmp_signed("<", ir.Constant(I64, c), n), likely=True):
                    address = builder.gep(dst_ptr, [builder.add(d_off, builder.mul(ir.Constant(I64, c), ldd))])
                    builder.store(value, builder.bitcast(address, value.type.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.void(src, s_off, lds, m, dst, d_off, ldd, n), codegen

    return block


_short = _block_intrinsic("short")
_tall = _block_intrinsic("tall")
_wide = _block_intrinsic("wide")


def block_shape(src):
    """``(side, tall rows, wide cols, panel)`` of the blocks for ``src``'s elements, as constants (jitted code only)."""
    raise NotImplementedError("block_shape() is only callable from compiled kernels")


@overload(block_shape)
def _block_shape(src):
    spec = BLOCKS[src.dtype.bitwidth // 8]
    shape = (spec.side, spec.side * spec.tall, spec.side * spec.wide, spec.panel)
    return lambda src: shape


@kernel
def _elementwise(src, dst, base, rows, cols, i0, i1, j0, j1):
    """``dst[base + j * rows + i] = src[base + i * cols + j]`` for ``i0 <= i < i1``, ``j0 <= j < j1``."""
    for j in range(j0, j1):
        for i in range(i0, i1):
            dst[base + j * rows + i] = src[base + i * cols + j]


@kernel
def _panels_of(src, dst, rows, cols, panels, u0, u1):
    """Units ``u0 .. u1`` (column panel ``u % panels`` of matrix ``u // panels``) of matrices of whole blocks.

    ``rows`` and ``cols`` are at least ``side``. Strips of tall blocks run down each
    panel, then strips of wide and short blocks, the last strip shifted up to end at
    ``rows``; across a strip, the last block is shifted left to end at ``cols`` (only
    the last panel has such a remainder).
    """
    side, tall, wide, panel = block_shape(src)
    n, p = divmod(u0, panels)
    for _ in range(u0, u1):
        base = n * rows * cols
        p0 = p * panel
        p1 = min(p0 + panel, cols)
        p += 1  # step without a division per unit (40 cycles each)
        if p == panels:
            n, p = n + 1, 0
        i = 0
        while i + tall <= rows:
            for j0 in range(p0, p1, side):
                j = min(j0, cols - side)
                _tall(src, base + i * cols + j, cols, tall, dst, base + j * rows + i, rows, side)
            i += tall
        while i < rows:
            ii = min(i, rows - side)
            j = p0
            while j + wide <= p1:
                _wide(src, base + ii * cols + j, cols, side, dst, base + j * rows + ii, rows, wide)
                j += wide
            while j < p1:
                jj = min(j, cols - side)
                _short(src, base + ii * cols + jj, cols, side, dst, base + jj * rows + ii, rows, side)
                j += side
            i += side


@kernel
def _short_dst_rows(src, dst, rows, cols, n0, n1):
    """Matrices ``n0 .. n1`` with fewer rows than ``side`` and at least ``side`` columns.

    Each block loads the ``rows`` rows (the rest repeat the last) and stores whole
    columns of ``side`` elements at ``dst[j * rows]``: the surplus of column ``j``
    lands on column ``j + 1``, which is stored next and overwrites it. Blocks stop
    where the surplus would leave the matrix; the last columns go element by element.
    """
    side, _, wide, _ = block_shape(src)
    size = rows * cols
    for n in range(n0, n1):
        base = n * size
        j = 0
        while j + wide <= cols and (j + wide - 1) * rows + side <= size:
            _wide(src, base + j, cols, rows, dst, base + j * rows, rows, wide)
            j += wide
        while j + side <= cols and (j + side - 1) * rows + side <= size:
            _short(src, base + j, cols, rows, dst, base + j * rows, rows, side)
            j += side
        _elementwise(src, dst, base, rows, cols, 0, rows, j, cols)


@kernel
def _short_src_rows(src, dst, rows, cols, n0, n1):
    """Matrices ``n0 .. n1`` with fewer columns than ``side`` and at least ``side`` rows.

    Each short block loads ``side`` elements from the start of each of its rows
    (reading on into the next rows) and stores only the ``cols`` columns (measured 2x
    faster than tall blocks here). Blocks stop where a load would leave the matrix;
    the last rows go element by element.
    """
    side, _, _, _ = block_shape(src)
    size = rows * cols
    for n in range(n0, n1):
        base = n * size
        i = 0
        while i + side <= rows and (i + side - 1) * cols + side <= size:
            _short(src, base + i * cols, cols, side, dst, base + i, rows, cols)
            i += side
        _elementwise(src, dst, base, rows, cols, i, rows, 0, cols)


@kernel
def _transpose(src, dst, rows, cols, panels, u0, u1):
    """Work units ``u0 .. u1`` of ``dst[n, j, i] = src[n, i, j]``; ``src`` [N, rows, cols], ``dst`` [N, cols, rows].

    ``src``, ``dst``: 1-D C-contiguous uint8 or uint32 arrays of ``N * rows * cols``
    elements. A unit is a column panel of a matrix (``panels`` per matrix) when
    both sides take whole blocks, else a matrix.
    """
    side, _, _, _ = block_shape(src)
    if rows >= side and cols >= side:
        _panels_of(src, dst, rows, cols, panels, u0, u1)
    elif rows >= side:
        _short_src_rows(src, dst, rows, cols, u0, u1)
    elif cols >= side:
        _short_dst_rows(src, dst, rows, cols, u0, u1)
    else:
        for n in range(u0, u1):
            _elementwise(src, dst, n * rows * cols, rows, cols, 0, rows, 0, cols)


def _elements(a):
    """``a`` flattened and viewed as the unsigned integers of its element size (jitted code only)."""
    raise NotImplementedError("_elements() is only callable from compiled kernels")


@overload(_elements)
def _elements_of(a):
    view = VIEWS[a.dtype.bitwidth // 8].type
    return lambda a: a.reshape(-1).view(view)


@kernel
def transpose_all(src, n, rows, cols, panels, dst):
    """``dst[n, j, i] = src[n, i, j]`` on one thread: ``src`` and ``dst`` C-contiguous, of one 1- or 4-byte dtype,
    ``N * rows * cols`` elements each (any shapes), ``panels`` as :func:`_batched_transpose` computes it."""
    if rows == 1 or cols == 1:
        dst.reshape(-1)[:] = src.reshape(-1)
    else:
        _transpose(_elements(src), _elements(dst), rows, cols, panels, 0, n * panels)


def transpose_arguments(dtype: np.dtype, n: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """``(n, rows, cols, panels)``: the bound arguments of :func:`transpose_all` between ``src`` and ``dst``;
    TypeError for a dtype without compiled transposes (not of 1 or 4 bytes)."""
    spec = BLOCKS.get(np.dtype(dtype).itemsize)
    if spec is None or np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"dtype: compiled transposes take 1- or 4-byte numbers (uint8, int8, int32, float32), "
                        f"got {dtype}")
    panels = -(-cols // spec.panel) if rows >= spec.side and cols >= spec.side else 1
    return n, rows, cols, panels


class LayoutPlan:
    """:func:`nchw_to_nhwc` or :func:`nhwc_to_nchw` prepared for a fixed shape and dtype: ``plan(x, out=None)``
    and :meth:`entry`."""

    def __init__(self, name: str, shape: object, dtype: object, to_nhwc: bool):
        if not (isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(d, (int, np.integer)) and d >= 0
                                                                       for d in shape)):
            raise ValueError(f"shape: expected a 4-D shape, got {shape!r}")
        self.name, self.shape, self.dtype, self.to_nhwc = name, tuple(int(d) for d in shape), np.dtype(dtype), to_nhwc
        n, a, b, c = self.shape
        self.out_shape = (n, b, c, a) if to_nhwc else (n, c, a, b)
        rows, cols = (a, b * c) if to_nhwc else (a * b, c)
        self._args = transpose_arguments(self.dtype, n, rows, cols)

    def entry(self):
        """The transpose as one unchecked call on one thread: input ``x`` (C-contiguous, the prepared shape and
        dtype), output the transposed C-contiguous array, checked by the caller."""
        return Entry(transpose_all, (In(0), *self._args, Out(0)))

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The transposed ``x`` (of the prepared shape and dtype; read-only or strided is fine)."""
        x = _check(self.name, x, "NCHW" if self.to_nhwc else "NHWC")
        if x.shape != self.shape or x.dtype != self.dtype:
            raise ValueError(f"{self.name}: expected {self.dtype} of shape {self.shape} (as prepared), got "
                             f"{x.dtype} of shape {x.shape}")
        return nchw_to_nhwc(x, out) if self.to_nhwc else nhwc_to_nchw(x, out)


def nchw_to_nhwc_plan(shape: tuple[int, int, int, int], dtype) -> LayoutPlan:
    """:func:`nchw_to_nhwc` prepared for ``x`` of ``shape`` [N, C, H, W] and ``dtype`` (1- or 4-byte numbers):
    ``plan(x, out=None)``, and ``plan.entry()``, the same call as a :class:`kernels.entry.Entry`."""
    return LayoutPlan("x", shape, dtype, True)


def nhwc_to_nchw_plan(shape: tuple[int, int, int, int], dtype) -> LayoutPlan:
    """:func:`nhwc_to_nchw` prepared for ``y`` of ``shape`` [N, H, W, C], as :func:`nchw_to_nhwc_plan`."""
    return LayoutPlan("y", shape, dtype, False)


def _check(name: str, x: object, layout: str) -> np.ndarray:
    """``x`` if it is a 4-D numeric ndarray, else a TypeError / ValueError naming ``name``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind not in "biufc":
        raise TypeError(f"{name}: expected a numeric dtype (fast: uint8, int8, int32, float32), got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D {layout} array, got shape {x.shape}")
    return x


THREAD_BYTES = 2 * threads.MIN_US_PER_THREAD * BYTES_PER_US  # below, one thread (and no pool bookkeeping)


def _batched_transpose(name: str, x: np.ndarray, order: tuple[int, ...], shape: tuple[int, ...], rows: int,
                       cols: int, out: np.ndarray | None) -> np.ndarray:
    """``x.transpose(order)`` (of ``shape``) into a C-contiguous array, ``x`` seen as [N, rows, cols] matrices.

    Called for every layer: the Python work here is kept to a few microseconds.
    """
    if out is None:
        out = np.empty(shape, x.dtype)
    else:
        _validate.out(out, shape, x.dtype)
        if np.may_share_memory(out, x):
            raise ValueError(f"out: must not overlap the input {name}")
    spec = BLOCKS.get(x.dtype.itemsize)
    if (spec is None or rows == 1 or cols == 1 or out.size == 0
            or not x.flags.c_contiguous and x.transpose(order).flags.c_contiguous):
        np.copyto(out, x.transpose(order))  # a plain copy, or a dtype without a compiled kernel
        return out
    src, dst = x.ravel(), out.ravel()  # a C-ordered copy of a non-contiguous x
    view = VIEWS[x.dtype.itemsize]
    if src.dtype != view:
        src, dst = src.view(view), dst.view(view)
    # units: column panels of each matrix when it takes whole blocks, else matrices
    panels = -(-cols // spec.panel) if rows >= spec.side and cols >= spec.side else 1
    if x.nbytes < THREAD_BYTES:
        _transpose(src, dst, rows, cols, panels, 0, shape[0] * panels)
    else:
        threads.run_tiled(lambda u0, u1, _i0, _i1: _transpose(src, dst, rows, cols, panels, u0, u1),
                          shape[0] * panels, 1, 1, x.nbytes / BYTES_PER_US)
    return out


def nchw_to_nhwc(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` [N, C, H, W] as a C-contiguous [N, H, W, C] array: ``out[n, h, w, c] = x[n, c, h, w]``.

    Any numeric dtype and memory layout; uint8, int8, int32 and float32 (any 1- or
    4-byte type) take the compiled block transposes, others NumPy's copy. ``out``: a
    C-contiguous writeable [N, H, W, C] array of ``x.dtype`` not overlapping ``x``.
    """
    n, c, h, w = _check("x", x, "NCHW").shape
    return _batched_transpose("x", x, (0, 2, 3, 1), (n, h, w, c), c, h * w, out)


def nhwc_to_nchw(y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``y`` [N, H, W, C] as a C-contiguous [N, C, H, W] array: ``out[n, c, h, w] = y[n, h, w, c]``.

    Same dtypes, memory layouts and ``out`` rules as :func:`nchw_to_nhwc`.
    """
    n, h, w, c = _check("y", y, "NHWC").shape
    return _batched_transpose("y", y, (0, 3, 1, 2), (n, c, h, w), h * w, c, out)
