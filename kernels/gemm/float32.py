"""Float32 linear layers on constant weights: ``out = x @ W + bias``, a team entry for compiled chains.

With ``x [..., K]`` (M rows), ``W [K, N]`` (ONNX MatMul's layout) and ``bias [N]`` (zeros without one)::

    out[m, n] = bias[n] + sum_k x[m, k] W[k, n]

``W`` is packed once into column panels of ``NR = 32`` (``[panels, K, 32]``, the last panel zero padded), so that
:func:`kernels.conv.float32.register_tile` streams one contiguous panel per ``MR`` rows of x (8 with AVX-512, 2 with
AVX2), which it broadcasts from where they lie (no copy of x); each of the tile's 32 lanes starts at its bias. Rows
go in blocks of :data:`BLOCK_ROWS` (their part of x stays in cache while every panel passes). On one AVX-512 core
this reached 107-117 GFLOPS on a transformer's shapes (M 128 and 1024, K and N 384 and 1536) where OpenBLAS 0.3.31's
``sgemm`` reached 96-105; on one Zen 3 core (AVX2) 60-71 where ``sgemm`` reached 83-84. Sums run in a fixed order
whatever the thread count (the bias first); against the exact value, each output is within ``(K + 1) 2^-24
(|bias[n]| + sum_k |x[m, k] W[k, n]|)``.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.conv.float32 import MR, NR, register_tile
from kernels.entry import Entry, In, Out
from kernels.sync import new_sync, tile_share

F32 = np.dtype(np.float32)
BLOCK_ROWS = 32  # rows of x per pass over the panels
GFLOPS = 100.0  # single-thread rate, for the choice of a team from Python
_tile = register_tile(lane_bias=True)
_ONE = np.ones(1, np.float32)


@kernel
def linear_team(x, panels, bias, out, ith, nth, sync):
    """Thread ``ith`` of ``nth``'s part of ``out = x @ W + bias`` (module docstring): ``x [..., K]`` (M rows, K >= 1),
    ``panels [P K NR]`` the packed ``W``, ``bias [P NR]`` and ``out [..., N]`` (M rows), all C-contiguous float32.
    Its :func:`~kernels.sync.tile_share` of the row tiles or panels; threads write disjoint parts of ``out`` and
    never wait (``sync`` unused)."""
    k, n = x.shape[-1], out.shape[-1]
    m = x.size // k
    p0, p1, i0, i1 = tile_share(m, MR, panels.size // (k * NR), ith, nth)
    x_flat, out_flat, rows = x.reshape(-1), out.reshape(-1), np.arange(k) * NR
    low, high = np.float32(-np.inf), np.float32(np.inf)
    for r0 in range(i0, i1, BLOCK_ROWS):
        r1 = min(i1, r0 + BLOCK_ROWS)
        for p in range(p0, p1):
            for i in range(r0, r1, MR):
                _tile(x_flat, i * k, 1, k, panels, p * k * NR, rows, k, bias, p * NR, 0, _ONE, out_flat,
                      i * n + p * NR, n, min(MR, r1 - i), min(NR, n - p * NR), low, high)


class LinearFloat32Plan:
    """``x @ w + bias`` for float32 ``x [..., K]`` and constant ``w [K, N]``: ``plan(x, out=None)`` and
    :meth:`entry`. Made by :func:`linear_float32_plan`."""

    def __init__(self, w: np.ndarray, bias: np.ndarray | None):
        if not isinstance(w, np.ndarray) or w.dtype != F32 or w.ndim != 2:
            raise TypeError(f"w: expected a float32 numpy.ndarray [K, N], got "
                            f"{getattr(w, 'dtype', type(w).__name__)} of shape {getattr(w, 'shape', None)}")
        self.k, self.n = w.shape
        if self.k < 1 or self.n < 1:
            raise ValueError(f"w: expected K >= 1 and N >= 1, got shape {w.shape}")
        count = -(-self.n // NR)
        self.panels = np.zeros((count, self.k, NR), np.float32)
        for p in range(count):
            block = w[:, p * NR:(p + 1) * NR]
            self.panels[p, :, :block.shape[1]] = block
        self.panels = self.panels.reshape(-1)
        self.bias = np.zeros(count * NR, np.float32)
        if bias is not None:
            if not isinstance(bias, np.ndarray) or bias.dtype != F32 or bias.shape != (self.n,):
                raise ValueError(f"bias: expected float32 [{self.n}], got "
                                 f"{getattr(bias, 'dtype', type(bias).__name__)} {getattr(bias, 'shape', None)}")
            self.bias[:self.n] = bias

    def entry(self) -> Entry:
        """The product as one unchecked team entry (:mod:`kernels.entry`): input ``x [..., K]``, output
        ``out [..., N]`` (as many rows), float32 C-contiguous (checked by the caller)."""
        return Entry(linear_team, (In(0), self.panels, self.bias, Out(0)), team=True)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != F32:
            raise TypeError(f"x: expected a float32 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 1 or x.shape[-1] != self.k:
            raise ValueError(f"x: expected a last axis of K = {self.k} (the weights'), got shape {x.shape}")
        shape = x.shape[:-1] + (self.n,)
        if out is None:
            out = np.empty(shape, F32)
        elif np.may_share_memory(_validate.out(out, shape, F32), x):
            raise ValueError("out: must not overlap x")
        x = np.ascontiguousarray(x)
        if out.size == 0:
            return out
        sync, us = new_sync(), 2e-3 * x.size * self.n / GFLOPS
        nth = max(1, min(threads.get_num_threads(), int(us // threads.MIN_US_PER_THREAD)))
        threads.run_team(lambda ith, n: linear_team(x, self.panels, self.bias, out, ith, n, sync), nth)
        return out


def linear_float32_plan(w: np.ndarray, bias: np.ndarray | None = None) -> LinearFloat32Plan:
    """``x @ w + bias`` prepared for constant float32 ``w [K, N]`` (and ``bias [N]``): ``plan(x, out=None)`` for any
    float32 ``x [..., K]``, and ``plan.entry()`` (module docstring)."""
    return LinearFloat32Plan(w, bias)
