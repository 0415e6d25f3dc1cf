"""Quantized elementwise ops of the kind ONNX Runtime-quantized CNNs run between convolutions.

* :func:`qlinear_add` / :func:`qlinear_mul`: ONNX Runtime's ``com.microsoft`` QLinearAdd and
  QLinearMul, per-tensor scales and zero points, NumPy broadcasting, optionally a fused ReLU.
  :func:`qlinear_add_plan` / :func:`qlinear_mul_plan` prepare them once for fixed shapes and
  quantization: a graph node's call then pays only for checking its arrays (a few microseconds less
  per call, which is most of a small add's time).
* :func:`qlinear_lookup`: ``y = table[x]`` for 8-bit codes, which is exactly what QLinearSigmoid,
  QLinearLeakyRelu, HardSwish and any other one-input op of per-tensor codes compute;
  :func:`lookup_table` builds the 256-entry table from a NumPy function.

Rounding of add and mul. The spec-like result is the exact real value rounded half to even,
``saturate(rint((a_real op b_real) / c_scale) + c_zero_point)``. The fast path computes ONNX
Runtime's float32 formula instead (MLAS's AVX2 QLinearAdd and SSE2 QLinearMul kernels, operation for
operation), on the codes ``x`` (``a``, unless ``a`` is broadcast along the output's last axis longer
than 1, where ONNX Runtime swaps the operands) and ``y`` (the other), with float32 scales::

    add:  rx = sx / sc,  ry = sy / sc,  f = zc - fma(rx, zx, ry * zy)
          c = saturate(rint(fma(x, rx, fma(y, ry, f))))
    mul:  m = (sx * sy) / sc
          c = saturate(rint(((x - zx) * (y - zy)) * m + zc))

every operation rounded to float32 (``fma`` once), ``rint`` half to even. So it gives ONNX Runtime's
x86 codes bit for bit, and lies within one code of the exact result: the float32 error is at most
``2**-24 * (6 * 255 * (sx + sy) / sc + 767)`` codes for add, under 0.38 for the ratios the path
serves (``(sx + sy) / sc <= 4096``), and at most ``2**-24 * (3 |p m| + |c|)`` for mul. A code differs
from the exact one only where the exact value lies that close to a half: measured here over every
pair of codes on 120 random sets of scales, 3.6 outputs in a million for add and 0.13 for mul (at
most 3 of the 65536 pairs for any one set). Scales the
float32 path cannot serve (add ratios above 4096, factors near float32's underflow or overflow) take
an exact path, the spec formula in float64 (:mod:`kernels.reference.elementwise`, bit for bit).

The kernels are compiled loops over the output's rows (plain Numba; ``fma`` and the float32 bit view
are generic LLVM operations, so one path serves every CPU level). A row is the output's last run of
axes along which each operand is either whole or constant, so the common broadcasts (equal shapes,
a scalar, ``[C, 1, 1]`` / ``[1, C, 1, 1]`` per channel of NCHW, ``[N, C, 1, 1]``) read both operands
where they lie; rarer ones (more than three runs) are first copied out with ``numpy.broadcast_to``.
Rounding adds ``1.5 * 2**23`` in float32, which leaves ``1.5 * 2**23 + rint(v)`` for ``|v| < 2**22``:
clamped to the code range, its low byte is the code. Large arrays are split over ``kernels.threads``
as :mod:`kernels.quantize` splits them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels import _validate
from kernels._jit import kernel
from kernels.entry import Entry, In, Out
from kernels.gemm.int8 import check_zero_point
from kernels.gemm.llvm_ir import F32, I32, declare
from kernels.quantize import F32_MAX, F32_NORMAL, QDTYPES, SPLIT_ELEMS, _array, _run
from kernels.qtypes import qtype_of

_ROUND = np.float32(1.5 * 2**23)  # v + _ROUND is _ROUND + rint(v) for |v| < 2**22, low byte the code
ADD, MUL = 0, 1
# The float32 path's domain: add ratios whose error bound (module docstring) stays under 0.38 of a
# code, and factors far from float32's underflow and overflow (subnormals would also be slow).
MAX_ADD_RATIO = 2.0**12
MIN_FACTOR, MAX_FACTOR = 2.0**-100, 2.0**100
ACTIVATIONS = (None, "relu")


@intrinsic
def _fma32(typingctx, x, y, z):
    """``x * y + z`` rounded once, in float32 (``llvm.fma.f32``; it vectorises to vfmadd on x86)."""
    if not (x == y == z == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.call(declare(builder, "llvm.fma.f32", ir.FunctionType(F32, [F32, F32, F32])), args)

    return types.float32(x, y, z), codegen


@intrinsic
def _bits32(typingctx, x):
    """The bits of a float32 as an int32 (a bitcast: free in vector code)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], I32)

    return types.int32(x), codegen


@kernel(inline="always")
def _code(v, lo, hi):
    """The byte of ``v + _ROUND`` (``v`` rounded half to even) clamped to ``[lo, hi]`` (both + ``_ROUND``)."""
    v = v + _ROUND
    v = v if v > lo else lo
    v = v if v < hi else hi
    return _bits32(v)


@kernel(inline="always")
def _add_row(x, xq, y, yq, full, rx, ry, f, lo, hi, out, r, j0, j1):
    """``out[r, j] = code(fma(x[xq, j], rx, fma(y[yq, j], ry, f)))`` for ``j0 <= j < j1`` (``y[yq, 0]`` unless
    ``full``). Unsigned column indices need no wraparound check, so the loops vectorise."""
    if full:
        for j in range(j0, j1):
            u = np.uint64(j)
            out[r, u] = _code(_fma32(np.float32(x[xq, u]), rx, _fma32(np.float32(y[yq, u]), ry, f)), lo, hi)
    else:
        k = _fma32(np.float32(y[yq, 0]), ry, f)
        for j in range(j0, j1):
            u = np.uint64(j)
            out[r, u] = _code(_fma32(np.float32(x[xq, u]), rx, k), lo, hi)


@kernel(inline="always")
def _mul_row(x, xq, y, yq, full, zx, zy, m, zc, lo, hi, out, r, j0, j1):
    """``out[r, j] = code(((x[xq, j] - zx) * (y[yq, j] - zy)) * m + zc)``, as :func:`_add_row`; the product of
    two codes minus their zero points is exact in float32."""
    if full:
        for j in range(j0, j1):
            u = np.uint64(j)
            out[r, u] = _code(((np.float32(x[xq, u]) - zx) * (np.float32(y[yq, u]) - zy)) * m + zc, lo, hi)
    else:
        k = np.float32(y[yq, 0]) - zy
        for j in range(j0, j1):
            u = np.uint64(j)
            out[r, u] = _code(((np.float32(x[xq, u]) - zx) * k) * m + zc, lo, hi)


@kernel(inline="always")
def _exact_row(op, x, xq, y, yq, full, sx, zx, sy, zy, sc, zc, lo, hi, out, r, j0, j1):
    """The float64 spec formula ``clip(rint((x_real op y_real) / sc) + zc, lo, hi)``, ``v_real = (v - zv) sv``."""
    for j in range(j0, j1):
        xr = (np.float64(x[xq, j]) - zx) * sx
        yr = (np.float64(y[yq, j if full else 0]) - zy) * sy
        t = np.rint(((xr + yr) if op == ADD else (xr * yr)) / sc) + zc
        out[r, j] = np.int32(min(max(t, lo), hi))


@kernel(inline="always")
def _columns(r, cols, i0, i1):
    """The columns ``j0 .. j1 - 1`` of output row ``r`` whose flat index ``r cols + j`` is in ``[i0, i1)``."""
    return max(i0 - r * cols, 0), min(i1 - r * cols, cols)


@kernel(inline="always")
def _next_row(q, k, div, mod):
    """Row ``(r + 1) // div % mod`` and ``(r + 1) % div`` from those of ``r``: no division per row."""
    k += 1
    if k == div:
        k, q = 0, q + 1
        if q == mod:
            q = 0
    return q, k


@kernel
def _binary_range(op, x, x_div, x_mod, y, y_div, y_mod, sx, zx, sy, zy, sc, zc, lo, hi, out, i0, i1):
    """Elements ``i0 <= i < i1`` of the flat output of a quantized add or mul (``op``), float32 formula.

    out : [R, L] uint8, the output's bytes (int8 codes as their two's complement)
    x : [Rx, L] uint8 / int8 codes; row ``r`` of the output reads row ``(r // x_div) % x_mod``
    y : [Ry, L] or [Ry, 1] uint8 / int8 codes, read alike; a single column is constant along the row
    sx, sy, sc : float64 holding float32 scales; zx, zy, zc : zero points; lo, hi : the code bounds
    """
    cols = out.shape[1]
    full = y.shape[1] == cols
    sx32, sy32, sc32 = np.float32(sx), np.float32(sy), np.float32(sc)
    zx32, zy32, zc32 = np.float32(zx), np.float32(zy), np.float32(zc)
    rx, ry, m = sx32 / sc32, sy32 / sc32, (sx32 * sy32) / sc32
    f = zc32 - _fma32(rx, zx32, ry * zy32)
    lo32, hi32 = np.float32(lo) + _ROUND, np.float32(hi) + _ROUND  # exact: small integers
    r0 = i0 // cols
    xq, xk, yq, yk = r0 // x_div % x_mod, r0 % x_div, r0 // y_div % y_mod, r0 % y_div
    for r in range(r0, (i1 + cols - 1) // cols):
        j0, j1 = _columns(r, cols, i0, i1)
        if op == ADD:
            _add_row(x, xq, y, yq, full, rx, ry, f, lo32, hi32, out, r, j0, j1)
        else:
            _mul_row(x, xq, y, yq, full, zx32, zy32, m, zc32, lo32, hi32, out, r, j0, j1)
        xq, xk = _next_row(xq, xk, x_div, x_mod)
        yq, yk = _next_row(yq, yk, y_div, y_mod)


@kernel
def _exact_range(op, x, x_div, x_mod, y, y_div, y_mod, sx, zx, sy, zy, sc, zc, lo, hi, out, i0, i1):
    """:func:`_binary_range` with the exact float64 formula (a loop of its own: inside the float32 kernel it
    slowed the float32 loops down)."""
    cols = out.shape[1]
    full = y.shape[1] == cols
    r0 = i0 // cols
    xq, xk, yq, yk = r0 // x_div % x_mod, r0 % x_div, r0 // y_div % y_mod, r0 % y_div
    for r in range(r0, (i1 + cols - 1) // cols):
        j0, j1 = _columns(r, cols, i0, i1)
        _exact_row(op, x, xq, y, yq, full, sx, zx, sy, zy, sc, zc, lo, hi, out, r, j0, j1)
        xq, xk = _next_row(xq, xk, x_div, x_mod)
        yq, yk = _next_row(yq, yk, y_div, y_mod)


@kernel
def _binary_all(op, exact, x, x_rows, x_div, y, y_rows, y_div, sx, zx, sy, zy, sc, zc, lo, hi, out, rows, cols):
    """A whole quantized add or mul (``op``) on one thread: ``x`` and ``y`` (C-contiguous, any shape) seen as
    ``[x_rows, cols or 1]`` and ``[y_rows, ...]``, ``out`` as ``[rows, cols]`` bytes; the float32 formula of
    :func:`_binary_range`, or with ``exact`` the float64 one of :func:`_exact_range`."""
    xm = x.reshape((x_rows, x.size // x_rows))
    ym = y.reshape((y_rows, y.size // y_rows))
    c = out.reshape((rows, cols)).view(np.uint8)
    if exact:
        _exact_range(op, xm, x_div, x_rows, ym, y_div, y_rows, sx, zx, sy, zy, sc, zc, lo, hi, c, 0, rows * cols)
    else:
        _binary_range(op, xm, x_div, x_rows, ym, y_div, y_rows, sx, zx, sy, zy, sc, zc, lo, hi, c, 0, rows * cols)


@kernel
def _binary_copied(op, exact, x, x_shape, y, y_shape, shape, x_full, y_full, sx, zx, sy, zy, sc, zc, lo, hi, out):
    """:func:`_binary_all` of a broadcast that the row walk does not cover: ``x`` and ``y`` are first copied out
    whole (``x_full``, ``y_full``: scratch of the output's size) from their shapes padded to ``shape``'s rank."""
    x_full.reshape(shape)[...] = np.broadcast_to(x.reshape(x_shape), shape)
    y_full.reshape(shape)[...] = np.broadcast_to(y.reshape(y_shape), shape)
    _binary_all(op, exact, x_full, 1, 1, y_full, 1, 1, sx, zx, sy, zy, sc, zc, lo, hi, out, 1, out.size)


@kernel
def _lookup_range(x, table, out, i0, i1):
    """``out[i] = table[x[i]]`` for ``i0 <= i < i1``; x, out uint8 [n] (bytes of the codes), table uint8 [256]."""
    x, out = x[i0:i1], out[i0:i1]
    for i in range(x.size):
        out[i] = table[x[i]]


def _scale32(name: str, value: object) -> float:
    """``value`` rounded to float32 (ONNX scales are float32), checked to be a positive, finite real scalar."""
    if isinstance(value, (float, np.floating)) and F32_NORMAL <= value <= F32_MAX:
        return float(np.float32(value))  # the common case, without building an array
    v = np.asarray(value)
    if v.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a real scalar, got {type(value).__name__} of dtype {v.dtype}")
    if v.size != 1 or v.ndim > 1:
        raise ValueError(f"{name}: expected a scalar, got shape {v.shape}")
    with np.errstate(over="ignore", under="ignore"):
        s = np.float32(v.reshape(()))
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{name}: expected a positive finite float32, got {value!r} (float32 {s})")
    return float(s)


def _out_dtype(zero_point: object, default: np.dtype) -> np.dtype:
    """The output dtype: that of ``zero_point`` when it is a NumPy value, else ``default``."""
    if not isinstance(zero_point, (np.ndarray, np.generic)):
        return default
    if zero_point.dtype not in QDTYPES:
        raise TypeError(f"c_zero_point: a NumPy zero point sets the output dtype and must be uint8 or int8, "
                        f"got {zero_point.dtype}")
    return zero_point.dtype


def _result(out: object, shape: tuple[int, ...], dtype: np.dtype, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """``out`` checked (shape, dtype, C order, writeable), or a new array; in place on a whole input is fine."""
    if out is None:
        return np.empty(shape, dtype)
    out = _validate.out(out, shape, dtype)
    for x in inputs:  # elementwise loops read each element before writing it: only partial overlap harms
        if np.may_share_memory(out, x) and not (x.size == out.size and x.ctypes.data == out.ctypes.data):
            raise ValueError("out: must not overlap an input, other than being the whole of one (in place)")
    return out


class Walk(NamedTuple):
    """How the kernels walk the broadcast of ``a`` and ``b`` (see :func:`_walk`)."""

    shape: tuple[int, ...]  # the broadcast output shape
    rows: int  # the output as [rows, cols]
    cols: int
    a: tuple[int, int, int]  # a as [rows, cols or 1], and the ``div`` of its row ``(r // div) % rows``
    b: tuple[int, int, int]
    b_is_x: bool  # b is the formula's outer operand x
    copy: bool  # more than three runs: both operands are copied out whole first


@functools.lru_cache(maxsize=256)
def _walk(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> Walk:
    """The :class:`Walk` of ``a`` and ``b``, worked out once per pair of shapes (calls pay little Python).

    The output's axes longer than 1 are merged into runs along which each operand is either whole
    or broadcast. With at most three runs ``(D0, D1, L)`` (padded with 1s in front) the output is
    ``[D0 D1, L]`` and each operand a ``[rows, L or 1]`` array whose row for output row ``r`` is
    ``(r // div) % rows``; with more, both are copied out to the output shape. ``b`` is the formula's
    ``x`` when ``a`` is broadcast along the output's last axis longer than 1 (ONNX Runtime then swaps
    the operands). Raises ValueError when the shapes do not broadcast.
    """
    shape = np.broadcast_shapes(a_shape, b_shape)
    runs: list[list] = []  # [size, a whole along it, b whole along it]
    for size, da, db in zip(shape, (1,) * (len(shape) - len(a_shape)) + a_shape,
                            (1,) * (len(shape) - len(b_shape)) + b_shape):
        if size == 1:
            continue
        whole = [da == size, db == size]
        if runs and runs[-1][1:] == whole:
            runs[-1][0] *= size
        else:
            runs.append([size, *whole])
    b_is_x = bool(runs) and not runs[-1][1]
    if len(runs) > 3:
        size = math.prod(shape)
        return Walk(shape, 1, size, (1, size, 1), (1, size, 1), b_is_x, True)
    runs = [[1, True, True]] * (3 - len(runs)) + runs
    (d0, *whole0), (d1, *whole1), (cols, *whole_cols) = runs

    def operand(k: int) -> tuple[int, int, int]:
        rows, div = {(True, True): (d0 * d1, 1), (True, False): (d0, d1), (False, True): (d1, 1),
                     (False, False): (1, 1)}[whole0[k], whole1[k]]
        return rows, cols if whole_cols[k] else 1, div

    return Walk(shape, d0 * d1, cols, operand(0), operand(1), b_is_x, False)


def _single(op: int, sa: float, sb: float, sc: float) -> bool:
    """Whether the float32 formula keeps within one code for these (float32) scales (module docstring)."""
    if op == ADD:
        ra, rb = sa / sc, sb / sc
        return min(ra, rb) >= MIN_FACTOR and ra + rb <= MAX_ADD_RATIO
    product = sa * sb
    return F32_NORMAL <= product <= F32_MAX and MIN_FACTOR <= product / sc <= MAX_FACTOR


def _activation_low(activation: object, qmin: int, zc: int) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    return max(qmin, zc) if activation == "relu" else qmin


class BinaryPlan:
    """A quantized add or mul prepared once for operands of fixed shapes and dtypes and fixed quantization:
    ``plan(a, b, out=None)`` checks only the arrays, then runs the compiled loop (what a graph node calls per run).

    Made by :func:`qlinear_add_plan` / :func:`qlinear_mul_plan`; values and errors as :func:`qlinear_add`.
    """

    def __init__(self, op: int, a_shape: tuple[int, ...], a_dtype: object, b_shape: tuple[int, ...], b_dtype: object,
                 a_scale, a_zero_point, b_scale, b_zero_point, c_scale, c_zero_point, activation) -> None:
        self.a_dtype, self.b_dtype = _dtype("a_dtype", a_dtype), _dtype("b_dtype", b_dtype)
        sa, sb, sc = _scale32("a_scale", a_scale), _scale32("b_scale", b_scale), _scale32("c_scale", c_scale)
        za = check_zero_point("a_zero_point", a_zero_point, self.a_dtype)
        zb = check_zero_point("b_zero_point", b_zero_point, self.b_dtype)
        self.c_dtype = _out_dtype(c_zero_point, self.a_dtype)
        zc = check_zero_point("c_zero_point", c_zero_point, self.c_dtype)
        q = qtype_of(self.c_dtype)
        lo = _activation_low(activation, q.qmin, zc)
        self.a_shape, self.b_shape = tuple(a_shape), tuple(b_shape)
        try:
            self.walk = _walk(self.a_shape, self.b_shape)
        except ValueError:
            raise ValueError(f"a, b: shapes {self.a_shape} and {self.b_shape} do not broadcast") from None
        self.run = _binary_range if _single(op, sa, sb, sc) else _exact_range
        self.op = op
        (sx, zx), (sy, zy) = ((sb, zb), (sa, za)) if self.walk.b_is_x else ((sa, za), (sb, zb))
        self.scalars = (sx, zx, sy, zy, sc, zc, lo, q.qmax)  # the loop's arguments between y_mod and out

    def __call__(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``c = a op b`` in codes, into ``out`` when given (it may be ``a`` or ``b`` itself)."""
        a, b = self._operand("a", a, self.a_shape, self.a_dtype), self._operand("b", b, self.b_shape, self.b_dtype)
        walk = self.walk
        c = _result(out, walk.shape, self.c_dtype, (a, b))
        if c.size == 0:
            return c
        if walk.copy:  # rare broadcasts only
            a, b = (np.ascontiguousarray(np.broadcast_to(v, walk.shape)) for v in (a, b))
        operands = ((b, walk.b), (a, walk.a)) if walk.b_is_x else ((a, walk.a), (b, walk.b))
        (x, x_div, x_mod), (y, y_div, y_mod) = ((v.reshape(rows, cols), div, rows) for v, (rows, cols, div) in operands)
        op, run, scalars = self.op, self.run, self.scalars
        if c.size < 2 * SPLIT_ELEMS:  # one thread: the entry's call
            _binary_all(op, int(run is _exact_range), x, x_mod, x_div, y, y_mod, y_div, *scalars, c, walk.rows,
                        walk.cols)
            return c
        flat = c.reshape(walk.rows, walk.cols).view(np.uint8)
        _run(lambda i0, i1: run(op, x, x_div, x_mod, y, y_div, y_mod, *scalars, flat, i0, i1), c.size)
        return c

    def entry(self) -> Entry:
        """``plan(a, b, out)`` as one unchecked call on one thread: inputs ``a`` and ``b`` (C-contiguous, of the
        prepared shapes and dtypes), output ``c`` (C-contiguous, the broadcast shape; it may be ``a`` or ``b``
        itself), checked by the caller. Binds its own scratch (rare broadcasts copy their operands)."""
        walk, exact = self.walk, int(self.run is _exact_range)
        (x, x_shape, x_dtype), (y, y_shape, y_dtype) = (((In(1), self.b_shape, self.b_dtype),
                                                         (In(0), self.a_shape, self.a_dtype)) if walk.b_is_x else
                                                        ((In(0), self.a_shape, self.a_dtype),
                                                         (In(1), self.b_shape, self.b_dtype)))
        if walk.copy:
            rank = len(walk.shape)
            pad = tuple((1,) * (rank - len(v)) + tuple(v) for v in (x_shape, y_shape))
            full = tuple(np.zeros(walk.shape, dtype) for dtype in (x_dtype, y_dtype))
            return Entry(_binary_copied, (self.op, exact, x, pad[0], y, pad[1], walk.shape, *full, *self.scalars,
                                          Out(0)))
        (xr, _, xd), (yr, _, yd) = (walk.b, walk.a) if walk.b_is_x else (walk.a, walk.b)
        return Entry(_binary_all, (self.op, exact, x, xr, xd, y, yr, yd, *self.scalars, Out(0), walk.rows,
                                   walk.cols))

    @staticmethod
    def _operand(name: str, v: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """``v`` as a C-contiguous array, checked against the prepared shape and dtype."""
        if not (isinstance(v, np.ndarray) and v.dtype == dtype and v.flags.c_contiguous):
            v = _array(name, v, (dtype,))
        if v.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} (as prepared), got {v.shape}")
        return v


def qlinear_add_plan(a_shape: tuple[int, ...], a_dtype: object, b_shape: tuple[int, ...], b_dtype: object,
                     a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int, c_scale: float,
                     c_zero_point: int, *, activation: str | None = None) -> BinaryPlan:
    """:func:`qlinear_add` prepared once for ``a`` of ``a_shape`` / ``a_dtype`` and ``b`` of ``b_shape`` /
    ``b_dtype`` (uint8 or int8): ``plan(a, b, out=None)``. Everything but the arrays is checked here, once.
    ``plan.entry()`` is the same call as a :class:`kernels.entry.Entry` (inputs ``a``, ``b``; output ``c``)."""
    return BinaryPlan(ADD, a_shape, a_dtype, b_shape, b_dtype, a_scale, a_zero_point, b_scale, b_zero_point, c_scale,
                      c_zero_point, activation)


def qlinear_mul_plan(a_shape: tuple[int, ...], a_dtype: object, b_shape: tuple[int, ...], b_dtype: object,
                     a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int, c_scale: float,
                     c_zero_point: int, *, activation: str | None = None) -> BinaryPlan:
    """:func:`qlinear_mul` prepared once, as :func:`qlinear_add_plan`."""
    return BinaryPlan(MUL, a_shape, a_dtype, b_shape, b_dtype, a_scale, a_zero_point, b_scale, b_zero_point, c_scale,
                      c_zero_point, activation)


def _qlinear_binary(op: int, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point,
                    activation, out) -> np.ndarray:
    a, b = _array("a", a, QDTYPES), _array("b", b, QDTYPES)
    return BinaryPlan(op, a.shape, a.dtype, b.shape, b.dtype, a_scale, a_zero_point, b_scale, b_zero_point, c_scale,
                      c_zero_point, activation)(a, b, out)


def qlinear_add(a: np.ndarray, a_scale: float, a_zero_point: int, b: np.ndarray, b_scale: float,
                b_zero_point: int, c_scale: float, c_zero_point: int, *, activation: str | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """ONNX Runtime's com.microsoft QLinearAdd (per-tensor scales, NumPy broadcasting), optionally with ReLU.

    ::

        c = saturate(rint((a_real + b_real) / c_scale) + c_zero_point),   v_real = (v - v_zero_point) * v_scale

    computed with ONNX Runtime's float32 formula (see the module docstring: within one code of the
    exact value, bit for bit ONNX Runtime's x86 result), or exactly in float64 for scale ratios
    ``(a_scale + b_scale) / c_scale`` above 4096 or factors out of float32's comfortable range.

    Parameters
    ----------
    a, b : uint8 or int8 arrays (each its own type) whose shapes broadcast as in NumPy; copied to C
        order if they are not contiguous
    a_scale, b_scale, c_scale : positive real scalars, used as float32
    a_zero_point, b_zero_point : ints in the range of ``a``'s / ``b``'s dtype
    c_zero_point : int in the range of the output dtype, which is ``c_zero_point``'s when it is a
        NumPy uint8 / int8 value and ``a``'s otherwise
    activation : None, or "relu": codes below ``c_zero_point`` (real values below 0) become it
    out : optional C-contiguous array of the broadcast shape and the output dtype; it may be ``a``
        or ``b`` itself (in place) but must not otherwise overlap them

    Returns
    -------
    uint8 or int8 array of the broadcast shape.
    """
    return _qlinear_binary(ADD, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point,
                           activation, out)


def qlinear_mul(a: np.ndarray, a_scale: float, a_zero_point: int, b: np.ndarray, b_scale: float,
                b_zero_point: int, c_scale: float, c_zero_point: int, *, activation: str | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """ONNX Runtime's com.microsoft QLinearMul (per-tensor scales, NumPy broadcasting), optionally with ReLU.

    ::

        c = saturate(rint(a_real * b_real / c_scale) + c_zero_point),   v_real = (v - v_zero_point) * v_scale

    computed with ONNX Runtime's float32 formula ``rint(((a - za) (b - zb)) m + zc)``,
    ``m = (a_scale b_scale) / c_scale`` (module docstring: within one code of the exact value, which
    it misses only within float32 rounding of a half), or exactly in float64 when ``a_scale b_scale``
    or ``m`` leaves float32's comfortable range. Arguments and result as :func:`qlinear_add`.
    """
    return _qlinear_binary(MUL, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point,
                           activation, out)


def _table(table: object) -> np.ndarray:
    table = _array("table", table, QDTYPES)
    if table.shape != (256,):
        raise ValueError(f"table: expected shape (256,), one code per 8-bit input code, got {table.shape}")
    return table


def qlinear_lookup(x: np.ndarray, table: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``y[i] = table[x[i]]`` for 8-bit codes: any one-input op of per-tensor codes (QLinearSigmoid, ...), exactly.

    Parameters
    ----------
    x : uint8 or int8 array of any shape (copied to C order if it is not contiguous)
    table : uint8 or int8 array [256], the output code of every input code, indexed by the code's
        byte: ``table[c]`` for uint8, ``table[c & 255]`` for int8 (codes 0..127, then -128..-1), as
        :func:`lookup_table` builds it
    out : optional C-contiguous array of ``x``'s shape and ``table``'s dtype; may be ``x`` itself

    Returns
    -------
    array of ``x``'s shape and ``table``'s dtype.
    """
    x = _array("x", x, QDTYPES)
    table = _table(table)
    y = _result(out, x.shape, table.dtype, (x, table))
    codes, result, entries = x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8), table.view(np.uint8)
    _run(lambda i0, i1: _lookup_range(codes, entries, result, i0, i1), x.size)
    return y


def _dtype(name: str, dtype: object) -> np.dtype:
    if dtype not in QDTYPES:  # numpy.dtype compares equal to the scalar types and names
        raise TypeError(f"{name}: expected uint8 or int8, got {dtype!r}")
    return np.dtype(dtype)


def lookup_table(fn: Callable[[np.ndarray], np.ndarray], x_scale: float, x_zero_point: int, y_scale: float,
                 y_zero_point: int, x_dtype, y_dtype) -> np.ndarray:
    """The :func:`qlinear_lookup` table of ``y = fn(x)`` between per-tensor quantized codes, built in float64.

    ::

        table[c & 255] = saturate(rint(fn((c - x_zero_point) * x_scale) / y_scale) + y_zero_point)

    for every code ``c`` of ``x_dtype``, ``rint`` half to even, ``saturate`` to ``y_dtype``. Scales
    are used as float32 values (as ONNX stores them), the arithmetic is float64. ONNX Runtime builds
    its QLinearSigmoid / QLinearLeakyRelu tables in float32 (and its sigmoid is approximate), so its
    codes may differ from these by one.

    Parameters
    ----------
    fn : vectorised function of a float64 array [256] of real inputs returning 256 real outputs
        (e.g. ``lambda v: 1 / (1 + np.exp(-v))``); ±inf saturate, NaN is an error
    x_scale, y_scale : positive real scalars
    x_zero_point, y_zero_point : ints in the range of ``x_dtype`` / ``y_dtype``
    x_dtype, y_dtype : numpy.uint8 or numpy.int8

    Returns
    -------
    ``y_dtype`` array [256].
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    x_dtype, y_dtype = _dtype("x_dtype", x_dtype), _dtype("y_dtype", y_dtype)
    xs, ys = _scale32("x_scale", x_scale), _scale32("y_scale", y_scale)
    zx = check_zero_point("x_zero_point", x_zero_point, x_dtype)
    zy = check_zero_point("y_zero_point", y_zero_point, y_dtype)
    codes = np.arange(256, dtype=np.uint8).view(x_dtype)  # in byte order, as qlinear_lookup indexes
    with np.errstate(all="ignore"):
        real = np.asarray(fn((codes.astype(np.float64) - zx) * xs), dtype=np.float64)
    if real.shape != (256,):
        raise ValueError(f"fn: expected 256 values for the 256 codes, got shape {real.shape}")
    if np.isnan(real).any():
        raise ValueError(f"fn: NaN for {np.count_nonzero(np.isnan(real))} input code(s); a code has no NaN")
    q = qtype_of(y_dtype)
    with np.errstate(over="ignore"):
        return np.clip(np.rint(real / ys) + zy, q.qmin, q.qmax).astype(y_dtype)
