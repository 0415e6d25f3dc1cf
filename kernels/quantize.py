"""Per-tensor ONNX QuantizeLinear and DequantizeLinear on float32 arrays of any shape.

Both run one compiled loop over the flat array that LLVM vectorises:

* quantize: ``q = saturate(rint(float32(x) / float32(scale)) + zero_point)``, half to
  even. ``numpy.rint`` and float-to-byte stores keep Numba's loop scalar, so the
  loop clamps ``v = x / scale`` to ``[qmin - zp, qmax - zp]`` first (``rint`` is
  monotone and fixes integers, so this equals saturating afterwards) and rounds
  with ``(v + 1.5 * 2**23) - 1.5 * 2**23`` in float32, which is round half to even
  for ``|v| < 2**22`` in the default rounding mode; the integer result then fits the
  output type. NaN is undefined in ONNX: the loop writes ``zero_point`` for it and
  flags it (a cheap OR), and the caller raises ValueError.
* dequantize: ``y = float32(int32(q) - zero_point) * float32(scale)``.

:func:`quantize_linear_to_nhwc` quantizes NCHW floats straight into channels-last codes (the input
QuantizeLinear of a CNN and the Transpose after it in one pass over memory): per image, blocks of pixels are
quantized one channel plane at a time into a small tile (the same vectorised loop), then interleaved into the
output rows; three channels (RGB) are interleaved as they are quantized, in one loop that LLVM vectorises with
interleaved stores.

Large arrays are split over ``kernels.threads``.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.entry import Entry, In, Out
from kernels.gemm.int8 import check_zero_point
from kernels.lanes import lane_max, lane_min
from kernels.qtypes import qtype_of
from kernels.sync import barrier, share

QDTYPES = (np.dtype(np.uint8), np.dtype(np.int8))
DEQUANT_DTYPES = (*QDTYPES, np.dtype(np.int32))
_ROUND = np.float32(1.5 * 2**23)  # adding and subtracting it leaves rint(v) in float32 for |v| < 2**22
F32 = np.dtype(np.float32)
F32_NORMAL, F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
# Elements per thread: both loops stream memory at 1.5 - 2 elements per ns, and measured here a
# second thread paid off at 4M elements (1.5x) but not at 0.8M.
SPLIT_ELEMS = 1_000_000
NHWC_BLOCK = 256  # pixels per tile of quantize_linear_to_nhwc: C x 256 codes stay in L1 for any C up to ~100


@kernel(inline="always")
def _code(v, lo, hi, zp):
    """``rint(clip(v, lo, hi)) + zp`` as an int32, NaN as ``zp`` (the caller flags NaN); all float32."""
    v = v if v == v else np.float32(0.0)
    v = v if v > lo else lo
    v = v if v < hi else hi
    return np.int32(((v + _ROUND) - _ROUND) + zp)  # exact: small integers; int32 + int32 would be int64


@kernel
def _quantize_range(x, scale, lo, hi, zero_point, out, i0, i1):
    """``out[i] = rint(clip(x[i] / scale, lo, hi)) + zero_point`` for ``i0 <= i < i1``; NaN counts as 0.

    ``x`` float32 [n], ``out`` uint8 / int8 [n]; ``scale`` a float64 holding a float32,
    ``lo = qmin - zero_point`` and ``hi = qmax - zero_point``. Plain Python scalars in
    (cheap to dispatch), float32 math inside. Returns whether some ``x[i]`` was NaN.
    """
    x, out = x[i0:i1], out[i0:i1]  # indices from 0 up need no wraparound checks, so the loop vectorises
    s, lo, hi, zp = np.float32(scale), np.float32(lo), np.float32(hi), np.float32(zero_point)
    nan = False  # a bool OR keeps the loop at 8 lanes; an int64 count would halve it
    for i in range(x.size):
        v = x[i] / s
        nan |= v != v
        out[i] = _code(v, lo, hi, zp)
    return nan


@kernel
def _quantize_nhwc_range(x, scale, lo, hi, zero_point, out, tile, n0, n1):
    """``out[n, p, c] = rint(clip(x[n, c, p] / scale, lo, hi)) + zero_point`` for images ``n0 <= n < n1``.

    ``x`` float32 [N, C, P], ``out`` uint8 / int8 [N, P, C], ``tile`` of ``out``'s dtype [C, B] (scratch: B
    pixels of every channel); scalars as :func:`_quantize_range`. Returns whether some ``x`` was NaN.
    """
    channels, pixels = x.shape[1], x.shape[2]
    block = tile.shape[1]
    s, lo, hi, zp = np.float32(scale), np.float32(lo), np.float32(hi), np.float32(zero_point)
    nan = False
    for n in range(n0, n1):
        if channels == 1:  # one channel: both layouts are the same order
            x0, o = x[n, 0], out[n].reshape(pixels)
            for j in range(pixels):
                v = x0[j] / s
                nan |= v != v
                o[j] = _code(v, lo, hi, zp)
            continue
        if channels == 3:  # RGB: strided stores of a known stride vectorise (LLVM interleaved access)
            x0, x1, x2, o = x[n, 0], x[n, 1], x[n, 2], out[n].reshape(3 * pixels)
            for j in range(pixels):
                u = np.uint64(j)
                v0, v1, v2 = x0[u] / s, x1[u] / s, x2[u] / s
                nan |= (v0 != v0) | (v1 != v1) | (v2 != v2)
                o[3 * u] = _code(v0, lo, hi, zp)
                o[3 * u + 1] = _code(v1, lo, hi, zp)
                o[3 * u + 2] = _code(v2, lo, hi, zp)
            continue
        for p0 in range(0, pixels, block):
            width = min(block, pixels - p0)
            for c in range(channels):
                row, codes = x[n, c, p0:p0 + width], tile[c]
                for j in range(width):
                    v = row[j] / s
                    nan |= v != v
                    codes[j] = _code(v, lo, hi, zp)
            for j in range(width):
                for c in range(channels):
                    out[n, p0 + j, c] = tile[c, j]
    return nan


@kernel
def dynamic_rows(x, lows, highs, codes, scales, zeros, sums):
    """ONNX DynamicQuantizeLinear of the rows of ``x [M, K]`` (float32, C-contiguous), row ``r`` over the range
    ``[lo, hi] = [min(0, lows[r]), max(0, highs[r])]`` (``lows``, ``highs`` float32 ``[M]``: the minimum and
    maximum of the row, or of all of x, NumPy's vector reductions: Numba's do not vectorise)::

        scale = (hi - lo) / 255   (1 / 255 when hi == lo),   zero = rint(clip(-lo / scale, 0, 255))
        codes = saturate(rint(x / scale) + zero)

    all in float32 as ONNX. ``codes [M, K]`` uint8, ``scales [M]`` float32, ``zeros [M]`` int32, ``sums [M]``
    int64 the sum of each row's codes (for weight zero points), or empty: no sums (the pass is then twice as fast).
    Returns whether ``x`` held NaN (its codes are then meaningless).
    """
    m, k = x.shape
    nan = False
    for r in range(m):
        row, out = x[r], codes[r]
        lo, hi = min(lows[r], np.float32(0.0)), max(highs[r], np.float32(0.0))
        scale = (hi - lo if hi != lo else np.float32(1.0)) / np.float32(255.0)
        zero = _code(np.float32(0.0) - lo / scale, np.float32(0.0), np.float32(255.0), np.float32(0.0))
        zp = np.float32(zero)
        scales[r], zeros[r] = scale, zero
        if sums.size == 0:
            for j in range(k):
                v = row[j] / scale
                nan |= v != v
                out[j] = _code(v, -zp, np.float32(255.0) - zp, zp)
            continue
        total = np.int64(0)
        for j in range(k):
            v = row[j] / scale
            nan |= v != v
            c = _code(v, -zp, np.float32(255.0) - zp, zp)
            out[j] = c
            total += c
        sums[r] = total
    return nan




@kernel
def row_ranges(x, lows, highs):
    """``lows[r], highs[r] = min(x[r]), max(x[r])`` for ``x [M, K]`` float32 C-contiguous, in 16 lanes
    (:mod:`kernels.lanes`; NaN skipped, ``inf`` / ``-inf`` for an empty row): NumPy's ``min`` and ``max`` along
    rows of a few hundred values took 8.7x as long (128 x 384, measured with this change)."""
    for r in range(x.shape[0]):
        lows[r], highs[r] = lane_min(x[r]), lane_max(x[r])


@kernel
def dynamic_rows_team(x, lows, highs, codes, scales, zeros, ith, nth, sync):
    """:func:`dynamic_rows` of all of ``x [M, K]`` over its one range (ONNX DynamicQuantizeLinear), by thread
    ``ith`` of a team of ``nth`` (:mod:`kernels.sync`): each thread finds the range of its share of the rows
    (``lows``, ``highs`` float32 ``[M]``, scratch), waits for the others, and quantizes its rows over the extremes
    of all. Every thread's ``scales``, ``zeros`` (``[M]``) hold the one scale and zero point. Raises ValueError
    for NaN (the thread that met it; the caller releases the others)."""
    m = x.shape[0]
    r0, r1 = share(m, ith, nth)
    row_ranges(x[r0:r1], lows[r0:r1], highs[r0:r1])
    barrier(sync, nth)
    low, high = lows.min() if m else np.float32(0.0), highs.max() if m else np.float32(0.0)
    if dynamic_rows(x[r0:r1], np.full(r1 - r0, low, np.float32), np.full(r1 - r0, high, np.float32), codes[r0:r1],
                    scales[r0:r1], zeros[r0:r1], np.empty(0, np.int64)):
        raise ValueError("x: NaN value(s); dynamic quantization is undefined for NaN")


@kernel
def _dynamic_quantize_team(x, lows, highs, scales, zeros, codes, scale, zero, ith, nth, sync):
    """:func:`dynamic_quantize_linear` of ``x`` (float32, ``lows.size`` rows of its last axis) into ``codes``
    (uint8, x's shape), ``scale`` (float32) and ``zero`` (uint8, one value each), by a team (``lows``, ``highs``,
    ``scales``, ``zeros`` scratch of one value per row)."""
    m = lows.size
    k = x.size // m
    dynamic_rows_team(x.reshape((m, k)), lows, highs, codes.reshape((m, k)), scales, zeros, ith, nth, sync)
    r0, r1 = share(m, ith, nth)
    if r0 == 0 < r1:  # the thread of row 0 holds the scale and zero point
        scale.reshape(1)[0] = scales[0]
        zero.reshape(1)[0] = zeros[0]


def dynamic_quantize_linear_entry(shape: tuple[int, ...]) -> Entry | None:
    """:func:`dynamic_quantize_linear` of float32 ``x`` of ``shape`` as one unchecked team entry
    (:mod:`kernels.entry`): input ``x``, outputs the codes (uint8, ``shape``), scale (float32) and zero point
    (uint8) of one value each, all C-contiguous (checked by the caller); None for an empty ``x``. The entry binds
    its own scratch (one caller at a time)."""
    shape = tuple(int(s) for s in shape)
    if not shape or math.prod(shape) == 0:
        return None
    m = math.prod(shape[:-1])
    scratch = (np.empty(m, F32), np.empty(m, F32), np.empty(m, F32), np.empty(m, np.int32))
    return Entry(_dynamic_quantize_team, (In(0), *scratch, Out(0), Out(1), Out(2)), team=True)


QUANTIZE_US_PER_VALUE = 3e-4  # dynamic_rows' single-thread time per value (its division), for thread splits


def dynamic_quantize_rows(rows: np.ndarray, codes: np.ndarray, per_row: bool,
                          sums: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`dynamic_rows` of ``rows [M, K]`` (float32, C-contiguous) into ``codes`` (uint8 ``[M, K]``), over each
    row's range, or (``per_row`` false) every row over the range of all of them (ONNX DynamicQuantizeLinear of
    the whole), the rows split over ``kernels.threads`` when that pays. Returns ``(scales, zeros, sums)`` (float32,
    int32 ``[M]``; per tensor their first values hold; ``sums`` int64 ``[M]`` if asked, else empty). Raises
    ValueError for NaN."""
    m, k = rows.shape
    lows, highs, scales, zeros = np.empty(m, F32), np.empty(m, F32), np.empty(m, F32), np.empty(m, np.int32)
    totals = np.empty(m if sums else 0, np.int64)
    parts = min(threads.get_num_threads(), int(m * k * QUANTIZE_US_PER_VALUE // threads.MIN_US_PER_THREAD))
    if parts <= 1:  # one thread: per tensor, all of x as one row
        groups = rows if per_row else rows.reshape(1, m * k)
        g = groups.shape[0]
        row_ranges(groups, lows[:g], highs[:g])
        nan = dynamic_rows(groups, lows[:g], highs[:g], codes.reshape(groups.shape), scales[:g], zeros[:g], totals)
    else:
        ranges = threads.split(m, parts)
        threads.run_ranges(lambda i0, i1: row_ranges(rows[i0:i1], lows[i0:i1], highs[i0:i1]), ranges)
        if not per_row:  # one range: the extremes of every row's
            lows[:], highs[:] = lows.min(), highs.max()
        found = []
        threads.run_ranges(lambda i0, i1: found.append(dynamic_rows(
            rows[i0:i1], lows[i0:i1], highs[i0:i1], codes[i0:i1], scales[i0:i1], zeros[i0:i1],
            totals[i0:i1] if sums else totals)), ranges)
        nan = any(found)
    if nan:
        raise ValueError("x: NaN value(s); dynamic quantization is undefined for NaN")
    return scales, zeros, totals


def dynamic_quantize_linear(x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear of float32 ``x`` (any shape): ``(codes, scale, zero_point)``, uint8 codes of x's
    shape (into ``out`` when given), by :func:`dynamic_quantize_rows` over all of ``x`` (its range by
    :func:`row_ranges`; an empty ``x`` has the range [0, 0]). Raises ValueError for NaN."""
    if not isinstance(x, np.ndarray) or x.dtype != F32:
        raise TypeError(f"x: expected a float32 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
    out = np.empty(x.shape, np.uint8) if out is None else _validate.out(out, x.shape, np.dtype(np.uint8), x=x)
    width = x.shape[-1] if x.ndim and x.size else x.size  # rows of the last axis (one row for 0-d or empty x)
    rows = np.ascontiguousarray(x).reshape(-1, width) if width else np.zeros((1, 0), F32)
    scales, zeros, _ = dynamic_quantize_rows(rows, out.reshape(rows.shape), per_row=False)
    return out, scales[0], np.uint8(zeros[0])


@kernel
def _dequantize_range(q, scale, zero_point, out, i0, i1):
    """``out[i] = float32(int32(q[i]) - zero_point) * scale`` for ``i0 <= i < i1``; ``out`` float32 [n].

    ``scale`` is a float64 holding a float32.
    """
    q, out = q[i0:i1], out[i0:i1]  # indices from 0 up need no wraparound checks, so the loop vectorises
    s, zp = np.float32(scale), np.int32(zero_point)
    for i in range(q.size):
        out[i] = np.float32(np.int32(np.int32(q[i]) - zp)) * s  # int32 - int32 is int64 in Numba


@kernel
def _quantize_all(x, scale, lo, hi, zero_point, out):
    """:func:`_quantize_range` over all of ``x`` (C-contiguous, any shape) into ``out`` (its shape); NaN raises."""
    xf, of = x.reshape(-1), out.reshape(-1)
    if _quantize_range(xf, scale, lo, hi, zero_point, of, 0, xf.size):
        raise ValueError("x: NaN value(s); QuantizeLinear is undefined for NaN")


@kernel
def _quantize_nhwc_all(x, scale, lo, hi, zero_point, tile, out):
    """:func:`_quantize_nhwc_range` over all of ``x [N, C, *spatial]`` into ``out [N, *spatial, C]``; NaN raises."""
    n, c = x.shape[0], x.shape[1]
    pixels = x.size // max(n * c, 1)
    if _quantize_nhwc_range(x.reshape((n, c, pixels)), scale, lo, hi, zero_point, out.reshape((n, pixels, c)), tile,
                            0, n):
        raise ValueError("x: NaN value(s); QuantizeLinear is undefined for NaN")


@kernel
def _dequantize_all(q, scale, zero_point, out):
    """:func:`_dequantize_range` over all of ``q`` (C-contiguous, any shape) into ``out`` (its shape)."""
    qf = q.reshape(-1)
    _dequantize_range(qf, scale, zero_point, out.reshape(-1), 0, qf.size)


class LinearQuantizationPlan:
    """One per-tensor (de)quantization prepared for inputs of a fixed shape and dtype: ``plan(x, out=None)`` and
    :meth:`entry`. Made by :func:`quantize_linear_plan`, :func:`quantize_linear_to_nhwc_plan` and
    :func:`dequantize_linear_plan`; values and errors are those of the one-shot functions."""

    def __init__(self, name: str, shape: tuple[int, ...], in_dtype: np.dtype, out_shape: tuple[int, ...],
                 out_dtype: np.dtype, fn, scalars: tuple, scratch: tuple = ()):
        self.name, self.shape, self.in_dtype = name, shape, in_dtype
        self.out_shape, self.out_dtype = out_shape, out_dtype
        self._fn, self._scalars, self._scratch = fn, scalars, scratch

    def entry(self):
        """The call as one unchecked :class:`kernels.entry.Entry` on one thread: inputs the C-contiguous input of
        the prepared shape and dtype, outputs the result array (checked by the caller); NaN raises ValueError."""
        scratch = tuple(np.zeros_like(a) for a in self._scratch)  # the entry's own
        return Entry(self._fn, (In(0), *self._scalars, *scratch, Out(0)))

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The result for ``x`` of the prepared shape and dtype (copied to C order if it is not)."""
        if not (type(x) is np.ndarray and x.dtype is self.in_dtype and x.flags.c_contiguous):
            x = _array(self.name, x, (self.in_dtype,))
        if x.shape != self.shape:
            raise ValueError(f"{self.name}: expected shape {self.shape} (as prepared), got {x.shape}")
        y = _output(out, x, self.out_dtype, self.out_shape)
        if x.size >= 2 * SPLIT_ELEMS or self._scratch:  # threads may pay; a tile is scratch of each call
            return self._split(x, y)
        self._fn(x, *self._scalars, y)
        return y

    def _split(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self._fn is _dequantize_all:
            qf, yf = x.reshape(-1), y.reshape(-1)
            _run(lambda i0, i1: _dequantize_range(qf, *self._scalars, yf, i0, i1), x.size)
            return y
        if self._fn is _quantize_all:
            xf, yf = x.reshape(-1), y.reshape(-1)
            nan = _run(lambda i0, i1: _quantize_range(xf, *self._scalars, yf, i0, i1), x.size)
        else:
            n, c = x.shape[0], x.shape[1]
            pixels = x.size // max(n * c, 1)
            x3, y3, tile = x.reshape(n, c, pixels), y.reshape(n, pixels, c), self._scratch[0]
            nan = [] if not x.size else _run(
                lambda n0, n1: _quantize_nhwc_range(x3, *self._scalars, y3, np.empty_like(tile), n0, n1), n, c * pixels)
        if any(nan):
            raise _nan_error(x)
        return y


def _shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                                       and d >= 0 for d in shape):
        raise ValueError(f"{name}: expected a tuple of sizes >= 0, got {shape!r}")
    return tuple(int(d) for d in shape)


def quantize_linear_plan(shape: tuple[int, ...], scale: float, zero_point: int, *,
                         dtype=np.uint8) -> LinearQuantizationPlan:
    """:func:`quantize_linear` prepared once for float32 ``x`` of ``shape``: ``plan(x, out=None)``, and
    ``plan.entry()``, the same call as a :class:`kernels.entry.Entry` (input ``x``, output the codes)."""
    s, zp, lo, hi = _quantization(scale, zero_point, dtype)
    shape = _shape("shape", shape)
    return LinearQuantizationPlan("x", shape, np.dtype(np.float32), shape, np.dtype(dtype), _quantize_all,
                                  (s, lo, hi, zp))


def quantize_linear_to_nhwc_plan(shape: tuple[int, ...], scale: float, zero_point: int, *,
                                 dtype=np.uint8) -> LinearQuantizationPlan:
    """:func:`quantize_linear_to_nhwc` prepared once for float32 ``x`` of ``shape`` ``[N, C, *spatial]``:
    ``plan(x, out=None)`` and ``plan.entry()`` (input ``x``, output the codes ``[N, *spatial, C]``)."""
    s, zp, lo, hi = _quantization(scale, zero_point, dtype)
    shape = _shape("shape", shape)
    if len(shape) < 2:
        raise ValueError(f"shape: expected [N, C, *spatial] of rank >= 2, got {shape}")
    out_shape = (shape[0], *shape[2:], shape[1])
    tile = np.zeros((shape[1], NHWC_BLOCK), dtype)
    return LinearQuantizationPlan("x", shape, np.dtype(np.float32), out_shape, np.dtype(dtype), _quantize_nhwc_all,
                                  (s, lo, hi, zp), (tile,))


def dequantize_linear_plan(shape: tuple[int, ...], dtype, scale: float, zero_point: int) -> LinearQuantizationPlan:
    """:func:`dequantize_linear` prepared once for codes ``q`` of ``shape`` and ``dtype`` (uint8, int8 or int32):
    ``plan(q, out=None)`` and ``plan.entry()`` (input ``q``, output float32 of ``shape``)."""
    if dtype not in DEQUANT_DTYPES:
        raise TypeError(f"dtype: expected {' or '.join(map(str, DEQUANT_DTYPES))}, got {dtype!r}")
    dtype = np.dtype(dtype)
    s = _scale(scale)
    zp = _dequant_zero_point(zero_point, dtype)
    shape = _shape("shape", shape)
    return LinearQuantizationPlan("q", shape, dtype, shape, np.dtype(np.float32), _dequantize_all, (s, zp))


def _scale(value: object) -> float:
    """``scale`` rounded to float32 (ONNX computes in float32), checked positive and finite after that."""
    if isinstance(value, (float, np.floating)) and F32_NORMAL <= float(value) <= F32_MAX:  # float(): a float16
        # compared with F32_MAX would round it to inf and let 0 through
        return float(np.float32(value))  # the common case: converts without overflow or underflow
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        v = np.asarray(value)
        if v.dtype.kind not in "iuf":
            raise TypeError(f"scale: expected a real scalar, got {type(value).__name__} of dtype {v.dtype}")
        if v.size != 1:
            raise ValueError(f"scale: expected a scalar, got shape {v.shape}")
        value = v.reshape(())[()]
    with np.errstate(over="ignore", under="ignore"):
        s = np.float32(value)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale: expected a positive finite float32, got {value!r} (float32 {s})")
    return float(s)


def _quantization(scale: object, zero_point: object, dtype: object) -> tuple[float, int, int, int]:
    """``(scale, zero_point, lo, hi)`` of a per-tensor quantization to ``dtype``, checked: ``lo`` and
    ``hi`` bound ``x / scale`` so that adding the zero point stays in the codes' range."""
    if dtype not in QDTYPES:  # numpy.dtype compares equal to the scalar types and names
        raise TypeError(f"dtype: expected uint8 or int8, got {dtype!r}")
    qt = qtype_of(np.dtype(dtype))
    zp = check_zero_point("zero_point", zero_point, np.dtype(dtype))
    return _scale(scale), zp, qt.qmin - zp, qt.qmax - zp


def _nan_error(x: np.ndarray) -> ValueError:
    return ValueError(f"x: {np.count_nonzero(np.isnan(x))} NaN value(s); QuantizeLinear is undefined for NaN")


def _array(name: str, x: object, dtypes: tuple[np.dtype, ...]) -> np.ndarray:
    """``x`` as a C-contiguous array (copied only if it is not), of one of ``dtypes``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {x.dtype}")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)  # (which would make 0-d arrays 1-d)


def _output(out: np.ndarray | None, src: np.ndarray, dtype: np.dtype, shape: tuple[int, ...] | None = None
            ) -> np.ndarray:
    """``out`` checked to be a C-contiguous ``dtype`` array of ``shape`` (default ``src``'s) apart from ``src``, or a
    new one."""
    shape = src.shape if shape is None else shape
    if out is None:
        return np.empty(shape, dtype)
    out = _validate.out(out, shape, dtype)
    if np.may_share_memory(out, src):
        raise ValueError("out: must not overlap the input array")
    return out


def _run(body, n: int, item_elems: int = 1) -> list:
    """``body(i0, i1)`` over ``range(n)`` (items of ``item_elems`` elements each), split over threads when the work
    pays for them; the results."""
    if n * item_elems < 2 * SPLIT_ELEMS:
        return [body(0, n)]  # without asking for the thread count: small calls are overhead-bound
    results = []
    parts = min(threads.get_num_threads(), n * item_elems // SPLIT_ELEMS, n)
    threads.run_ranges(lambda i0, i1: results.append(body(i0, i1)), threads.split(n, parts))
    return results


def quantize_linear(x: np.ndarray, scale: float, zero_point: int, *, dtype=np.uint8,
                    out: np.ndarray | None = None) -> np.ndarray:
    """ONNX QuantizeLinear, per tensor: ``saturate(rint(x / scale) + zero_point)``.

    Parameters
    ----------
    x : float32 array of any shape (copied to C order if it is not contiguous)
    scale : positive real scalar; the division is ``float32(x) / float32(scale)``, as in ONNX
    zero_point : int in the range of ``dtype``
    dtype : numpy.uint8 (saturates to [0, 255]) or numpy.int8 ([-128, 127])
    out : optional C-contiguous ``dtype`` array of ``x``'s shape, not overlapping ``x``

    Returns
    -------
    ``dtype`` array of ``x``'s shape. Rounding is half to even (``numpy.rint``);
    +-inf saturate. NaN (undefined in ONNX) raises ValueError, after ``out`` has
    been filled with ``zero_point`` at the NaN positions.
    """
    s, zp, lo, hi = _quantization(scale, zero_point, dtype)
    x = _array("x", x, (np.dtype(np.float32),))
    y = _output(out, x, np.dtype(dtype))
    xf, yf = x.reshape(-1), y.reshape(-1)
    if any(_run(lambda i0, i1: _quantize_range(xf, s, lo, hi, zp, yf, i0, i1), x.size)):
        raise _nan_error(x)
    return y


def quantize_linear_to_nhwc(x: np.ndarray, scale: float, zero_point: int, *, dtype=np.uint8,
                            out: np.ndarray | None = None) -> np.ndarray:
    """ONNX QuantizeLinear per tensor, written channels-last: ``out[n, *s, c] = quantize_linear(x)[n, c, *s]``.

    The same codes as :func:`quantize_linear` followed by a Transpose ``[0, 2, ..., rank - 1, 1]`` (NCHW to NHWC
    for 4-D ``x``), in one pass.

    Parameters
    ----------
    x : float32 array ``[N, C, *spatial]`` (rank >= 2; copied to C order if it is not contiguous)
    scale, zero_point, dtype : as :func:`quantize_linear`
    out : optional C-contiguous ``dtype`` array ``[N, *spatial, C]``, not overlapping ``x``

    Returns
    -------
    ``dtype`` array ``[N, *spatial, C]``; NaN raises ValueError as in :func:`quantize_linear`.
    """
    s, zp, lo, hi = _quantization(scale, zero_point, dtype)
    x = _array("x", x, (np.dtype(np.float32),))
    if x.ndim < 2:
        raise ValueError(f"x: expected an array [N, C, *spatial] of rank >= 2, got shape {x.shape}")
    n, c, pixels = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    y = _output(out, x, np.dtype(dtype), (n, *x.shape[2:], c))
    x3, y3 = x.reshape(n, c, pixels), y.reshape(n, pixels, c)
    if x.size and any(_run(lambda n0, n1: _quantize_nhwc_range(x3, s, lo, hi, zp, y3, np.empty((c, NHWC_BLOCK), dtype),
                                                               n0, n1), n, c * pixels)):
        raise _nan_error(x)
    return y


def dequantize_linear(q: np.ndarray, scale: float, zero_point: int, *,
                      out: np.ndarray | None = None) -> np.ndarray:
    """ONNX DequantizeLinear, per tensor: ``float32(int32(q) - zero_point) * float32(scale)``.

    Parameters
    ----------
    q : uint8, int8 or int32 array of any shape (copied to C order if it is not contiguous)
    scale : positive real scalar, used as float32
    zero_point : int in the range of ``q``'s dtype; 0 for int32 (ONNX has no int32 zero point)
    out : optional C-contiguous float32 array of ``q``'s shape, not overlapping ``q``

    Returns
    -------
    float32 array of ``q``'s shape.
    """
    q = _array("q", q, DEQUANT_DTYPES)
    s = _scale(scale)
    zp = _dequant_zero_point(zero_point, q.dtype)
    y = _output(out, q, np.dtype(np.float32))
    qf, yf = q.reshape(-1), y.reshape(-1)
    _run(lambda i0, i1: _dequantize_range(qf, s, zp, yf, i0, i1), q.size)
    return y


def _dequant_zero_point(zero_point: object, dtype: np.dtype) -> int:
    """A zero point of ``dtype`` codes; 0 for int32 (ONNX has no int32 zero point)."""
    if dtype == np.int32:
        if isinstance(zero_point, (bool, np.bool_)) or not isinstance(zero_point, (int, np.integer)) \
                or operator.index(zero_point) != 0:
            raise ValueError(f"zero_point: expected 0 for int32 q, got {zero_point!r}")
        return 0
    return check_zero_point("zero_point", zero_point, dtype)
