"""Softmax over the last axis in float32, with the scale and additive mask of attention fused in: one pass of
compiled code per row.

For a row ``x`` of ``S`` scores and its mask row ``m`` (zeros without a mask)::

    v = scale * x + m,    y = e^(v - max v) / sum(e^(v - max v))

``e^t`` is :func:`kernels.math_ir.exp32` (within 1.5 ulp), the max and the float32 sum in 16 lanes
(:mod:`kernels.lanes`, the exponentials and their sum in one pass), so each ``y`` is within ``(S + 5) 2^-24``
relative of the exact value; a row whose ``v`` are all ``-inf`` (wholly masked) gives NaN, as the formula does. The
mask broadcasts to the scores: each row of ``x`` reads the mask row that NumPy broadcasting would give it
(``mask_rows``, an index per row, prepared once).
"""

from __future__ import annotations

import numpy as np

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.entry import Entry, In, Out
from kernels.lanes import lane_exp_sum, lane_max

F32 = np.dtype(np.float32)
_NO_MASK = np.zeros((0, 0), np.float32)
_NO_ROWS = np.zeros(0, np.int64)
BLOCK = 8  # rows in flight
US_PER_VALUE = 7e-4  # single-thread time per score, for thread splits (rows go to threads whole)


@kernel
def _softmax_rows(x, scale, mask, mask_rows, out):
    """``out[r] = softmax(scale * x[r] + mask[mask_rows[r]])`` for every row of ``x [R, S]`` (C-contiguous float32,
    as ``out``; ``mask [M, S]`` float32 and ``mask_rows [R]`` int64, both empty without a mask). Rows go in blocks
    of :data:`BLOCK`, each step over the whole block before the next, so that one row's chain of reductions and
    division overlaps the others' work."""
    rows, s = x.shape
    masked = mask.size > 0
    factors = np.empty(BLOCK, np.float32)
    for r0 in range(0, rows, BLOCK):
        r1 = min(r0 + BLOCK, rows)
        for r in range(r0, r1):
            xr, y = x[r], out[r]
            if masked:
                m = mask[mask_rows[r]]
                for j in range(s):
                    y[j] = scale * xr[j] + m[j]
            else:
                for j in range(s):
                    y[j] = scale * xr[j]
            factors[r - r0] = lane_max(y)
        for r in range(r0, r1):
            factors[r - r0] = np.float32(1.0) / lane_exp_sum(out[r], factors[r - r0])
        for r in range(r0, r1):
            y, inv = out[r], factors[r - r0]
            for j in range(s):
                y[j] *= inv


@kernel
def _softmax_all(x, scale, mask, mask_rows, out):
    """:func:`_softmax_rows` over C-contiguous arrays of any rank, along their last axis (``mask`` flat rows of the
    last axis' length, or empty)."""
    s = x.shape[-1]
    rows = x.size // max(s, 1)
    _softmax_rows(x.reshape((rows, s)), scale, mask.reshape((mask.size // max(s, 1), s)), mask_rows,
                  out.reshape((rows, s)))


def mask_rows(shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> np.ndarray:
    """For scores of ``shape`` and a mask of ``mask_shape`` (broadcasting to ``shape``, its last axis the scores'),
    the mask row each row of the scores reads, in C order."""
    shape, mask_shape = tuple(shape), tuple(mask_shape)
    if not mask_shape or mask_shape[-1] != shape[-1]:
        raise ValueError(f"mask: its last axis must be the scores' ({shape[-1]}), got shape {mask_shape}")
    lead = mask_shape[:-1]
    if len(lead) >= len(shape) or any(m not in (1, s) for m, s in zip(lead[::-1], shape[-2::-1])):
        raise ValueError(f"mask: shape {mask_shape} does not broadcast to the scores' {shape}")
    lead = (1,) * (len(shape) - len(mask_shape)) + lead
    index = np.arange(int(np.prod(lead, dtype=np.int64)), dtype=np.int64).reshape(lead)
    return np.broadcast_to(index, shape[:-1]).reshape(-1).copy()  # writable: one compiled type


class SoftmaxPlan:
    """:func:`softmax` prepared for scores of one shape (and a mask of one shape): ``plan(x, mask=None)`` and
    :meth:`entry`. Made by :func:`softmax_plan`."""

    def __init__(self, shape: tuple[int, ...], scale: float, mask_shape: tuple[int, ...] | None):
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or self.shape[-1] < 1:
            raise ValueError(f"shape: expected at least one axis, the last non-empty, got {shape}")
        self.scale = float(scale)
        if not np.isfinite(self.scale):
            raise ValueError(f"scale: expected a finite number, got {scale!r}")
        self.mask_shape = None if mask_shape is None else tuple(int(s) for s in mask_shape)
        self.rows = _NO_ROWS if mask_shape is None else mask_rows(self.shape, self.mask_shape)

    def entry(self) -> Entry:
        """The softmax as one unchecked call: inputs the scores (and the mask, when prepared with one), output
        ``y``; C-contiguous float32 of the prepared shapes (checked by the caller)."""
        mask = _NO_MASK if self.mask_shape is None else In(1)
        entry = Entry(_softmax_all, (In(0), np.float32(self.scale), mask, self.rows, Out(0)))
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return entry.split(rows, 0, 3, 4) if self.rows.size else entry.split(rows, 0, 4)

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        x = _validate.float32_input("x", x, self.shape)
        if (mask is None) != (self.mask_shape is None):
            raise ValueError("mask: " + ("not expected (prepared without one)" if mask is not None else
                                         f"expected a float32 mask of shape {self.mask_shape} (prepared with one)"))
        mask = _NO_MASK if mask is None else _validate.float32_input("mask", mask, self.mask_shape)
        out = np.empty(self.shape, F32) if out is None else _validate.out(out, self.shape, F32)
        s = self.shape[-1]
        x2, out2, mask2 = x.reshape(-1, s), out.reshape(-1, s), mask.reshape(mask.size // s, s)
        threads.run_split(lambda r0, r1: _softmax_rows(x2[r0:r1], np.float32(self.scale), mask2,
                                                       self.rows[r0:r1] if self.rows.size else self.rows,
                                                       out2[r0:r1]), x2.shape[0], x.size * US_PER_VALUE)
        return out


def softmax_plan(shape: tuple[int, ...], *, scale: float = 1.0,
                 mask_shape: tuple[int, ...] | None = None) -> SoftmaxPlan:
    """:func:`softmax` prepared for float32 scores of ``shape`` (and an additive mask of ``mask_shape``):
    ``plan(x, mask=None, out=None)`` and ``plan.entry()``."""
    return SoftmaxPlan(shape, scale, mask_shape)


def softmax(x: np.ndarray, mask: np.ndarray | None = None, *, scale: float = 1.0,
            out: np.ndarray | None = None) -> np.ndarray:
    """Softmax of ``scale * x + mask`` over the last axis (formula and error bound in the module docstring).

    Parameters
    ----------
    x : float32 ndarray [..., S], the scores
    mask : float32 ndarray broadcasting to x, its last axis S, optional: added to the scaled scores
        (0 where attended, a large negative value or -inf where masked)
    scale : finite float, multiplies x before the mask is added (attention's ``1 / sqrt(head size)``)
    out : float32 C-contiguous ndarray of x's shape, optional (may be x itself)

    Returns float32 ndarray of x's shape (``out`` if given).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a float32 numpy.ndarray, got {type(x).__name__}")
    mask_shape = None if mask is None else getattr(mask, "shape", None)
    if mask is not None and not isinstance(mask, np.ndarray):
        raise TypeError(f"mask: expected a float32 numpy.ndarray, got {type(mask).__name__}")
    return softmax_plan(x.shape, scale=scale, mask_shape=mask_shape)(x, mask, out)
