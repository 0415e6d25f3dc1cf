"""Linear layers with float32 activations quantized at call time (ONNX Runtime's DynamicQuantizeMatMul, and per
token): one compiled pass quantizes the activations, the int8 GEMM multiplies the codes, one compiled pass
scales the products to float32.

For activations ``x [M, K]`` and int8 weights ``w [N, K]`` (per-channel scale ``sw``, zero point ``zw``)::

    xq[m] = DynamicQuantizeLinear(x[m])            codes, scale sa[m], zero point za[m]: of all of x, or per row
    y[m, n] = sum_k (xq[m, k] - za[m]) (w[n, k] - zw[n]) * (sa[m] sw[n]) + bias[n]

With one scale for all of ``x``, the codes run a :func:`kernels.linear_int8_plan` made once, its column terms and
multipliers rederived for each call's scale and zero point (``LinearPlan.requantized``), so the epilogue stays
fused in the GEMM. Per row, the integer sum is exact: the
GEMM forms ``sum xq w`` (uint8 x int8, int32), the epilogue subtracts ``za sum_k w[n]`` and
``zw sum_k (xq[m] - za)`` in int32 (K at most :data:`MAX_K`), then scales in float32 (as ONNX Runtime: the int32
sum converted to float32, times the float32 product of the scales). Per-row scales follow each token's own
range: more accurate than one scale for the whole batch, which ONNX's operator prescribes.
"""

from __future__ import annotations

import functools

import numpy as np

from kernels import _validate
from kernels._jit import kernel
from kernels.entry import Entry, In, Out
from kernels.gemm.driver import LINEAR, LINEAR_TEAM
from kernels.gemm.int8 import _cached, _stored_key, _weights, gemm_int8_plan, linear_int8_plan, requantized_terms
from kernels.pack.panels import KGROUP, PackedInt8
from kernels.quantize import dynamic_quantize_rows, dynamic_rows, dynamic_rows_team, row_ranges
from kernels.sync import barrier

F32 = np.dtype(np.float32)
MAX_K = (2**31 - 1) // (3 * 255 * 128)  # 21929: every int32 term of the correction stays in range
_NO_BIAS = np.zeros(0, np.float32)


@kernel
def _scale_products(acc, zeros, scales, sums, col_sums, w_zp, w_scale, bias, k, out):
    """``out [M, N] = (acc - za col_sums - zw (sums - K za)) * (sa sw) (+ bias)``: the module's formula from the
    GEMM's ``acc [M, N]`` int32 (``zeros`` int32, ``scales`` float32 per row; ``sums`` int64 per row, or empty when
    every ``zw`` is 0; ``col_sums``, ``w_zp`` int32, ``w_scale`` float32, ``bias`` float32 or empty per column).
    The correction is int32: each of its three terms is at most ``255 * 128 * K`` in magnitude, so the caller keeps
    ``3 * 255 * 128 * K < 2^31``."""
    m, n = acc.shape
    with_bias, with_zp = bias.size > 0, sums.size > 0
    scale = np.empty(n, np.float32)
    term = np.empty(n, np.int32)
    for r in range(m):
        za = np.int32(zeros[r])
        centred = np.int32(sums[r] - k * np.int64(zeros[r])) if with_zp else np.int32(0)
        for c in range(n):
            scale[c] = scales[r] * w_scale[c]
        if with_zp:
            for c in range(n):
                term[c] = np.int32(za * col_sums[c]) + np.int32(w_zp[c] * centred)
        else:
            for c in range(n):
                term[c] = np.int32(za * col_sums[c])
        a, y = acc[r], out[r]
        if with_bias:
            for c in range(n):
                y[c] = np.float32(np.int32(a[c] - term[c])) * scale[c] + bias[c]
        else:
            for c in range(n):
                y[c] = np.float32(np.int32(a[c] - term[c])) * scale[c]


@functools.cache
def _team_kernels(kind: str, mode: int) -> tuple:
    """The team entries (:mod:`kernels.sync`) of a per-tensor plan whose product runs micro-kernel ``kind`` with
    epilogue ``mode``: ``(quantize and multiply, multiply codes quantized already)``."""
    linear = LINEAR_TEAM[kind, mode]

    @kernel
    def product(codes, scale, zero, col_sums, w_scale, base, terms, col_term32, mults, data, single, fused, lo, hi,
                zp, qmin, qmax, out, ith, nth, sync):
        """Once every thread's codes are written: thread 0 derives the terms for ``scale[0]``, ``zero[0]``, then
        each thread multiplies its share."""
        barrier(sync, nth)
        if ith == 0:
            requantized_terms(np.float32(scale[0]), np.int64(zero[0]), codes.shape[1], col_sums, w_scale, base, terms,
                              col_term32, mults)
        barrier(sync, nth)
        linear(codes, data, terms, col_term32, mults, single, fused, lo, hi, zp, qmin, qmax, out, ith, nth)

    @kernel
    def quantize_multiply(x, lows, highs, codes, scales, zeros, col_sums, w_scale, base, terms, col_term32, mults, data,
                          single, fused, lo, hi, zp, qmin, qmax, out, ith, nth, sync):
        """``plan(x, out)`` by a team: float32 ``x [..., K]`` quantized into ``codes [M, K]`` (scratch, as
        ``lows``, ``highs``, ``scales``, ``zeros`` ``[M]``), then the product into ``out [..., N]``."""
        m, k = codes.shape
        dynamic_rows_team(x.reshape((m, k)), lows, highs, codes, scales, zeros, ith, nth, sync)
        product(codes, scales, zeros, col_sums, w_scale, base, terms, col_term32, mults, data, single, fused, lo, hi,
                zp, qmin, qmax, out.reshape((m, out.size // max(m, 1))), ith, nth, sync)

    @kernel
    def multiply(codes, scale, zero, col_sums, w_scale, base, terms, col_term32, mults, data, single, fused, lo, hi,
                 zp, qmin, qmax, out, ith, nth, sync):
        """``plan.quantized(codes, scale, zero, out)`` by a team (``codes [..., K]`` uint8, ``scale`` float32 and
        ``zero`` uint8 of one value each, any rank)."""
        k = codes.shape[-1]
        m = codes.size // max(k, 1)
        product(codes.reshape((m, k)), scale.reshape(1), zero.reshape(1), col_sums, w_scale, base, terms, col_term32,
                mults, data, single, fused, lo, hi, zp, qmin, qmax, out.reshape((m, out.size // max(m, 1))), ith, nth,
                sync)

    return quantize_multiply, multiply


@functools.cache
def _per_row_kernel(kind: str, mode: int):
    """The split entry's kernel of a per-row plan whose integer product runs micro-kernel ``kind``, epilogue
    ``mode`` (the gemm plan's)."""
    gemm = LINEAR[kind, mode]

    @kernel
    def per_row(x, lows, highs, codes, scales, zeros, sums, acc, data, terms, col_term32, mults, single, fused, lo, hi,
                zp, qmin, qmax, col_sums, w_zp, w_scale, bias, out):
        """``plan(x, out)`` of a per-row plan on the rows of ``x [..., K]`` (float32, C-contiguous) given, any
        subset (rows are independent): each row quantized over its own range into ``codes [M, K]`` (uint8;
        ``lows``, ``highs``, ``scales`` float32 and ``zeros`` int32 ``[M]``; ``sums`` int64 ``[M]``, or empty
        without weight zero points), the exact product into ``acc [M, N]`` int32 (the gemm plan's arguments
        ``data`` .. ``qmax``), then :func:`_scale_products` into ``out [..., N]`` float32. Raises ValueError for
        NaN."""
        m, k = codes.shape
        rows = x.reshape((m, k))
        row_ranges(rows, lows, highs)
        if dynamic_rows(rows, lows, highs, codes, scales, zeros, sums):
            raise ValueError("x: NaN value(s); dynamic quantization is undefined for NaN")
        gemm(codes, 0, np.empty(0, np.uint8), np.empty(0, np.int64), data, terms, col_term32, mults, single, 0, fused,
             lo, hi, zp, qmin, qmax, acc)
        _scale_products(acc, zeros, scales, sums, col_sums, w_zp, w_scale, bias, k, out.reshape((m, acc.shape[1])))

    return per_row


class DynamicLinearPlan:
    """:func:`linear_dynamic_int8` prepared for one weight: ``plan(x, out=None)`` for float32 ``x [..., K]``, and
    ``plan.quantized(codes, scale, zero_point)`` for activations quantized already."""

    max_k = MAX_K

    def __init__(self, w, w_scale, w_zero_point, bias, per_row: bool):
        self.packed = _weights(w, "w")
        n, k = self.packed.n, self.packed.k
        self.w_scale = np.ascontiguousarray(_validate.per_channel("w_scale", w_scale, n, np.float32))
        if not (np.isfinite(self.w_scale).all() and (self.w_scale > 0).all()):
            raise ValueError("w_scale: expected finite values > 0")
        self.w_zp = np.ascontiguousarray(_validate.per_channel("w_zero_point", w_zero_point, n, np.int64))
        _validate.integer_in("w_zero_point", self.w_zp, -128, 127)
        if k > MAX_K:
            raise ValueError(f"w: K = {k} exceeds {MAX_K}, the longest K whose corrected int32 sums cannot overflow")
        self.col_sums = self.packed.col_sums.astype(np.int32)
        self.w_zp = self.w_zp.astype(np.int32)
        self._zero_points = bool(self.w_zp.any())
        self.bias = _NO_BIAS if bias is None else np.ascontiguousarray(
            _validate.per_channel("bias", bias, n, np.float32))
        self.per_row = bool(per_row)
        if self.per_row:
            self._gemm = gemm_int8_plan(self.packed, a_dtype=np.uint8, a_zero_point=0)
        else:  # zero point 0 at first: the largest sums, so the fused epilogue holds for every call's zero point
            self._linear = linear_int8_plan(self.packed, a_scale=np.float32(1.0), a_zero_point=0,
                                            w_scale=self.w_scale, w_zero_point=self.w_zp,
                                            bias=self.bias if self.bias.size else None)

    def entry(self, m: int, quantized: bool = False) -> Entry | None:
        """The plan for activations of ``m`` rows as one unchecked entry (:mod:`kernels.entry`): per row, split
        by rows; per tensor, a team entry, or None where it has none (weight zero points, K not a multiple of 4).
        Inputs: ``x`` (float32 ``[..., K]`` of ``m`` rows, C-contiguous), or with ``quantized`` (per tensor) the
        codes, scale and zero point of :meth:`quantized` (any ranks, C-contiguous); output float32 ``[..., N]``
        (checked by the caller). The entry binds its own scratch (one caller at a time)."""
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"m: expected a row count >= 0, got {m!r}")
        if self.per_row:
            return None if quantized or m == 0 or self.packed.k % KGROUP else self._per_row_entry(int(m))
        linear = self._linear
        if linear.row_term or self.packed.k % KGROUP:
            return None
        data, base, col_term32, mults, single, _, fused, lo, hi, zp, qmin, qmax = linear._bound
        quantize_multiply, multiply = _team_kernels(linear._for_rows(int(m))[1].kind, linear.epi.mode)
        product = (self.col_sums, self.w_scale, base, base.copy(), col_term32.copy(), mults.copy(), data, single,
                   fused, lo, hi, zp, qmin, qmax, Out(0))
        if quantized:
            return Entry(multiply, (In(0), In(1), In(2), *product), team=True)
        scratch = (np.empty(m, F32), np.empty(m, F32), np.empty((m, self.packed.k), np.uint8), np.empty(m, F32),
                   np.empty(m, np.int32))
        return Entry(quantize_multiply, (In(0), *scratch, *product), team=True)

    def _per_row_entry(self, m: int) -> Entry:
        """:meth:`entry` of a per-row plan: every row's work in one call, split by rows."""
        gemm, (n, k) = self._gemm, (self.packed.n, self.packed.k)
        data, terms, col_term32, mults, single, _, fused, lo, hi, zp, qmin, qmax = gemm._bound
        scratch = (np.empty(m, F32), np.empty(m, F32), np.empty((m, k), np.uint8), np.empty(m, F32),
                   np.empty(m, np.int32), np.empty(m if self._zero_points else 0, np.int64), np.empty((m, n), np.int32))
        per_row = _per_row_kernel(gemm._for_rows(m)[1].kind, gemm.epi.mode)
        entry = Entry(per_row, (In(0), *scratch, data, terms, col_term32, mults, single, fused, lo, hi, zp, qmin, qmax,
                                self.col_sums, self.w_zp, self.w_scale, self.bias, Out(0)))
        return entry.split(m, 0, 1, 2, 3, 4, 5, 6, 7, 23)

    def quantized(self, codes: np.ndarray, scale, zero_point, out: np.ndarray | None = None) -> np.ndarray:
        """The product for activations quantized already (per tensor): ``codes [..., K]`` uint8 of one ``scale``
        (float32 > 0) and ``zero_point`` (0..255), as DynamicQuantizeLinear gives them to several products (the
        queries, keys and values of attention), ``y = (codes - zero_point) @ (w - zw).T * (scale sw) + bias``."""
        n, k = self.packed.n, self.packed.k
        if self.per_row:
            raise ValueError("quantized: the plan quantizes each row itself (per_row=True)")
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
            raise TypeError(f"codes: expected a uint8 numpy.ndarray, got "
                            f"{getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim < 1 or codes.shape[-1] != k:
            raise ValueError(f"codes: expected a last axis of K = {k} (the weights'), got shape {codes.shape}")
        if np.size(scale) != 1 or np.size(zero_point) != 1:
            raise ValueError(f"scale, zero_point: expected one value each (per tensor), got shapes "
                             f"{np.shape(scale)} and {np.shape(zero_point)}")
        scale, zero_point = np.float32(np.ravel(scale)[0]), int(np.ravel(zero_point)[0])
        if not (np.isfinite(scale) and scale > 0) or not 0 <= zero_point <= 255:
            raise ValueError(f"scale, zero_point: expected a finite scale > 0 and a zero point in 0..255, got "
                             f"{scale}, {zero_point}")
        shape = codes.shape[:-1] + (n,)
        out = np.empty(shape, F32) if out is None else _validate.out(out, shape, F32, codes=codes)
        rows = np.ascontiguousarray(codes).reshape(-1, k)
        if rows.shape[0]:
            self._linear(rows, out.reshape(-1, n), self._linear.requantized(scale, zero_point, self.w_scale))
        return out

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        n, k = self.packed.n, self.packed.k
        if not isinstance(x, np.ndarray) or x.dtype != F32:
            raise TypeError(f"x: expected a float32 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 1 or x.shape[-1] != k:
            raise ValueError(f"x: expected a last axis of K = {k} (the weights'), got shape {x.shape}")
        shape = x.shape[:-1] + (n,)
        out = np.empty(shape, F32) if out is None else _validate.out(out, shape, F32, x=x)
        rows = np.ascontiguousarray(x).reshape(-1, k)
        m = rows.shape[0]
        if m == 0:
            return out
        codes = np.empty((m, k), np.uint8)  # sums of codes: for the per-row correction with weight zero points only
        scales, zeros, sums = dynamic_quantize_rows(rows, codes, self.per_row, self.per_row and self._zero_points)
        if not self.per_row:
            self._linear(codes, out.reshape(m, n), self._linear.requantized(scales[0], int(zeros[0]), self.w_scale))
            return out
        acc = self._gemm(codes)
        _scale_products(acc, zeros, scales, sums, self.col_sums, self.w_zp, self.w_scale, self.bias, k,
                        out.reshape(m, n))
        return out


def linear_dynamic_int8_plan(w, w_scale, w_zero_point=0, bias=None, *, per_row: bool = False) -> DynamicLinearPlan:
    """:func:`linear_dynamic_int8` prepared once for the weights: ``plan(x, out=None)``."""
    return DynamicLinearPlan(w, w_scale, w_zero_point, bias, per_row)


def linear_dynamic_int8(x: np.ndarray, w, w_scale, w_zero_point=0, bias=None, *, per_row: bool = False,
                        out: np.ndarray | None = None) -> np.ndarray:
    """A linear layer on float32 activations quantized at call time (formula in the module docstring).

    Parameters
    ----------
    x : float32 ndarray [..., K]
    w : int8 ndarray [N, K] or ``kernels.pack_int8(w)``
    w_scale : positive float scalar or [N]; w_zero_point : int scalar or [N] in [-128, 127]
    bias : float scalar or [N], optional
    per_row : quantize each row of ``x`` (each token) with its own range, instead of all of ``x`` with one
    out : float32 C-contiguous ndarray [..., N], optional

    Returns float32 ndarray [..., N] (``out`` if given). NaN in ``x`` raises ``ValueError``. A packed ``w`` keeps
    the plan for these arguments (``kernels.pack.plans``): called again, the function only runs it.
    """
    if type(w) is not PackedInt8:
        return linear_dynamic_int8_plan(w, w_scale, w_zero_point, bias, per_row=per_row)(x, out)
    key = ("linear_dynamic_int8", w_scale, type(w_scale), w_zero_point, bias, bool(per_row))
    plan = _cached(w, key)
    if plan is None:
        plan = w.plans.put(_stored_key(key), linear_dynamic_int8_plan(w, w_scale, w_zero_point, bias, per_row=per_row))
    return plan(x, out)
