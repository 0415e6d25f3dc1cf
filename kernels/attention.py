"""Multi-head attention in float32, fused: the scores, their softmax and the product with the values in one kernel,
reading the heads where the projections wrote them (no Reshape / Transpose copies, no score tensor).

With ``q [B, Sq, H D]``, ``k [B, Sk, H D]``, ``v [B, Sk, H Dv]`` (head ``h`` is the slice ``h D .. h D + D - 1`` of
the last axis, as a linear layer writes it) and ``mask`` broadcasting to ``[B, H, Sq, Sk]``::

    s[j]            = scale * sum_t q[b, i, h D + t] k[b, j, h D + t] + mask[b, h, i, j]
    out[b, i, h Dv + e] = sum_j softmax(s)[j] v[b, j, h Dv + e]

which is ``Transpose(MatMul(Softmax(scale * MatMul(Q, K^T) + mask), V))`` of a transformer's graph with its heads
split and merged. The output has q's layout: ``[B, Sq, H Dv]``, heads merged.

Work goes in units of (batch, head, :data:`CHUNK` query rows), shared out over a team of threads
(:mod:`kernels.sync`) in contiguous ranges. Per batch, a thread first copies ``scale * k`` for the heads its units
need into scratch, transposed to ``[D, Sk]`` and reading whole rows of k (read head by head, the strided rows cost
more than the arithmetic when they come from memory), and the values only when a head's ``Dv`` is not a multiple of
the tile's 32 lanes (otherwise the tile reads them in place). Then, per :data:`ROWS` query rows, two register tiles
of :func:`kernels.conv.float32.register_tile` and the softmax between them:

* scores ``[ROWS, Sk]``: the query rows broadcast from q, the scaled keys along the vector lanes, each lane
  starting at its mask value (the mask rows of a block of queries are one row, or consecutive rows);
* per row, the maximum and the sum of ``e^(s - max)`` (:mod:`kernels.lanes`, exponentials within 1.5 ulp),
  the exponentials written in place;
* ``[ROWS, Dv]``: the exponentials broadcast, values along the lanes, each row times the inverse of its sum,
  stored straight into ``out``.

The ``[B, H, Sq, Sk]`` score tensor never exists: a thread holds ``ROWS`` rows of scores. A query whose scores are
all ``-inf`` (every key masked) gets NaN, as the formula does.

Error: sums run in a fixed order, so results do not depend on the number of threads; against the exact value,
``|out - exact| <= 2^-22 (Sk + D + 8) max|v| (1 + max|s|)`` (the scores' rounding, amplified by the exponential,
and the softmax's and the product's sums; tested against a float64 evaluation).
"""

from __future__ import annotations

import math

import numpy as np

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.conv.float32 import MR, NR, register_tile
from kernels.entry import Entry, In, Out
from kernels.lanes import lane_exp_sum, lane_max
from kernels.softmax import mask_rows
from kernels.sync import new_sync, share

F32 = np.dtype(np.float32)
ROWS = MR  # query rows per register tile
CHUNK = 64  # query rows per unit of work (one copy of a head's keys and values serves several units)
US_PER_MAC = 2.8e-5  # single-thread time per multiply-add (measured at 1x128x12x32), for a team from Python
_NO_MASK = np.zeros((0, 0), np.float32)
_NO_ROWS = np.zeros(0, np.int64)
_scores_tile = register_tile(lane_bias=True)
_values_tile = register_tile(row_scale=True)


@kernel
def attention_team(q, k, v, mask, rows, step, scale, heads, out, ith, nth, sync):
    """Thread ``ith`` of ``nth``'s share of the attention of the module docstring: ``q [B, Sq, H D]``,
    ``k [B, Sk, H D]``, ``v [B, Sk, H Dv]`` and ``out`` (``B Sq H Dv`` values in that order, e.g. ``[B, Sq, H Dv]``
    or ``[B, Sq, H, Dv]``) C-contiguous float32, ``heads`` = H, ``mask`` float32 ``[..., Sk]`` (rows of Sk) with
    ``rows [B H Sq]`` int64 the mask row of each score row, ``step`` (0 or 1) how the mask row moves from one query
    to the next (both arrays empty without a mask), ``scale`` float32. Threads write disjoint parts of ``out`` and
    never wait (``sync`` unused)."""
    batch, sq, width = q.shape
    sk = k.shape[1]
    masked = mask.size > 0
    mask = mask.reshape(-1) if masked else np.zeros(sk, np.float32)
    d, dv = width // heads, v.shape[2] // heads
    chunks = (sq + CHUNK - 1) // CHUNK
    per_batch = heads * chunks
    lo, hi = share(batch * per_batch, ith, nth)
    if hi <= lo:
        return
    skp, dvp = (sk + NR - 1) // NR * NR, (dv + NR - 1) // NR * NR  # the tile reads NR lanes of every row
    held = min(heads, (hi - lo + chunks - 1) // chunks + 1)  # most heads of one batch in this share
    # the values are read in place when their heads take whole tile rows, else copied with rows padded to them
    copied = dv % NR != 0
    keys, values = np.zeros(held * d * skp, np.float32), np.zeros(held * sk * dvp * copied, np.float32)
    key_rows, value_rows = np.arange(d) * skp, np.arange(sk) * (dvp if copied else heads * dv)
    q_flat, v_flat = q.reshape(-1), values if copied else v.reshape(-1)
    scores, inverses, zero = np.empty((ROWS, sk), np.float32), np.empty(ROWS, np.float32), np.zeros(1, np.float32)
    flat, low, high = out.reshape(-1), np.float32(-np.inf), np.float32(np.inf)
    unit = lo
    while unit < hi:
        b = unit // per_batch
        end = min(hi, (b + 1) * per_batch)
        h0, h1 = unit // chunks % heads, (end - 1) // chunks % heads + 1
        # this batch's heads [h0, h1) of scale * k into scratch, rows read whole (far faster from memory than head
        # by head)
        for j in range(sk):
            for h in range(h0, h1):
                for t in range(d):
                    keys[((h - h0) * d + t) * skp + j] = scale * k[b, j, h * d + t]
                if copied:
                    values[((h - h0) * sk + j) * dvp:((h - h0) * sk + j) * dvp + dv] = v[b, j, h * dv:h * dv + dv]
        for u in range(unit, end):
            h = u // chunks % heads
            first = u % chunks * CHUNK
            head_values = (h - h0) * sk * dvp if copied else (b * sk * heads + h) * dv
            for i0 in range(first, min(sq, first + CHUNK), ROWS):
                m = min(ROWS, sq - i0)
                at = (b * heads + h) * sq + i0
                mask_at, mask_step = (rows[at] * sk, step * sk) if masked else (0, 0)
                for j0 in range(0, sk, NR):  # scores plus the mask: query rows broadcast from q, keys along the lanes
                    _scores_tile(q_flat, (b * sq + i0) * width + h * d, 1, width, keys, (h - h0) * d * skp + j0,
                                 key_rows, d, mask, mask_at + j0, mask_step, zero, scores.reshape(-1), j0, sk, m,
                                 min(NR, sk - j0), low, high)
                for r in range(m):  # softmax without its last step: the product divides by the sums
                    inverses[r] = lane_max(scores[r])
                for r in range(m):
                    inverses[r] = np.float32(1.0) / lane_exp_sum(scores[r], inverses[r])
                for e0 in range(0, dv, NR):  # exponentials broadcast, values along the lanes, times the inverses
                    _values_tile(scores.reshape(-1), 0, 1, sk, v_flat, head_values + e0, value_rows, sk, zero, 0, 0,
                                 inverses, flat, (b * sq + i0) * heads * dv + h * dv + e0, heads * dv, m,
                                 min(NR, dv - e0), low, high)
        unit = end


class AttentionPlan:
    """:func:`attention` prepared for one set of shapes: ``plan(q, k, v, mask=None, out=None)`` and :meth:`entry`.
    Made by :func:`attention_plan`."""

    def __init__(self, q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...], heads: int,
                 scale: float | None, mask_shape: tuple[int, ...] | None):
        self.q_shape, self.k_shape, self.v_shape = (_shape(n, s) for n, s in (("q", q_shape), ("k", k_shape),
                                                                              ("v", v_shape)))
        if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
            raise ValueError(f"heads: expected an int >= 1, got {heads!r}")
        self.heads = int(heads)
        (batch, sq, width), (kb, sk, kw), (vb, vs, vw) = self.q_shape, self.k_shape, self.v_shape
        if width % self.heads or vw % self.heads:
            raise ValueError(f"heads: {self.heads} heads must divide q's last axis ({width}) and v's ({vw})")
        if (kb, kw) != (batch, width) or (vb, vs) != (batch, sk):
            raise ValueError(f"k, v: expected k [{batch}, Sk, {width}] and v [{batch}, Sk, H Dv] for q {self.q_shape},"
                             f" got k {self.k_shape} and v {self.v_shape}")
        if min(batch, sq, sk, width, vw) < 1:
            raise ValueError(f"q, k, v: expected non-empty axes, got {self.q_shape}, {self.k_shape}, {self.v_shape}")
        self.scale = 1.0 / math.sqrt(width // self.heads) if scale is None else float(scale)
        if not np.isfinite(self.scale):
            raise ValueError(f"scale: expected a finite number, got {scale!r}")
        self.out_shape = (batch, sq, vw)
        self.mask_shape = None if mask_shape is None else tuple(int(s) for s in mask_shape)
        self.rows = (_NO_ROWS if mask_shape is None
                     else mask_rows((batch, self.heads, sq, sk), self.mask_shape))
        # broadcasting moves the mask row by 0 or 1 from one query to the next (the same for every batch and head)
        self.step = int(self.rows[1] - self.rows[0]) if self.rows.size and sq > 1 else 0
        self.macs = batch * sq * sk * (width + vw)  # multiply-adds

    def entry(self) -> Entry:
        """The attention as one unchecked team entry (:mod:`kernels.entry`): inputs q, k, v (and the mask, when
        prepared with one), output ``out``; C-contiguous float32 of the prepared shapes (checked by the caller)."""
        mask = _NO_MASK if self.mask_shape is None else In(3)
        return Entry(attention_team, (In(0), In(1), In(2), mask, self.rows, self.step, np.float32(self.scale),
                                      self.heads, Out(0)), team=True)

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
        q, k, v = (_validate.float32_input(n, x, s) for n, x, s in (("q", q, self.q_shape), ("k", k, self.k_shape),
                                                                    ("v", v, self.v_shape)))
        if (mask is None) != (self.mask_shape is None):
            raise ValueError("mask: " + ("not expected (prepared without one)" if mask is not None else
                                         f"expected a float32 mask of shape {self.mask_shape} (prepared with one)"))
        mask = _NO_MASK if mask is None else _validate.float32_input("mask", mask, self.mask_shape)
        if out is None:
            out = np.empty(self.out_shape, F32)
        else:
            out = _validate.out(out, self.out_shape, F32)
            if any(np.may_share_memory(out, x) for x in (q, k, v, mask)):
                raise ValueError("out: must not overlap q, k, v or the mask")
        sync = new_sync()
        scale = np.float32(self.scale)
        nth = max(1, min(threads.get_num_threads(), int(self.macs * US_PER_MAC // threads.MIN_US_PER_THREAD)))
        threads.run_team(lambda ith, n: attention_team(q, k, v, mask, self.rows, self.step, scale, self.heads, out,
                                                       ith, n, sync), nth)
        return out


def _shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"{name}: expected shape [batch, sequence, heads * head size], got {shape}")
    return shape


def attention_plan(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...], *, heads: int,
                   scale: float | None = None, mask_shape: tuple[int, ...] | None = None) -> AttentionPlan:
    """:func:`attention` prepared for float32 ``q``, ``k``, ``v`` of these shapes (and a mask of ``mask_shape``):
    ``plan(q, k, v, mask=None, out=None)`` and ``plan.entry()``."""
    return AttentionPlan(q_shape, k_shape, v_shape, heads, scale, mask_shape)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None, *, heads: int,
              scale: float | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Multi-head attention with the heads split and merged along the last axis (formula in the module docstring).

    Parameters
    ----------
    q : float32 ndarray [B, Sq, H D], the queries
    k : float32 ndarray [B, Sk, H D], the keys
    v : float32 ndarray [B, Sk, H Dv], the values
    mask : float32 ndarray broadcasting to [B, H, Sq, Sk], optional: added to the scaled scores (0 where attended,
        a large negative value or -inf where masked; a query row with every key at -inf gives NaN)
    heads : int, H (dividing the last axes of q and v)
    scale : finite float, default ``1 / sqrt(D)``
    out : float32 C-contiguous ndarray [B, Sq, H Dv], optional (not overlapping the inputs)

    Returns float32 ndarray [B, Sq, H Dv] (``out`` if given).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if x is not None and not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: expected a float32 numpy.ndarray, got {type(x).__name__}")
    plan = attention_plan(q.shape, k.shape, v.shape, heads=heads, scale=scale,
                          mask_shape=None if mask is None else mask.shape)
    return plan(q, k, v, mask, out)
