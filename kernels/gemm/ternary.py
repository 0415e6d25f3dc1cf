"""Public ternary product: ``gemm_ternary`` (float32 activations x {-1, 0, +1} weights)."""

from __future__ import annotations

import numpy as np

from kernels.gemm import grouped
from kernels.gemm.grouped import GroupedPlan
from kernels.pack.ternary import PackedTernary


def gemm_ternary(x: np.ndarray, packed: PackedTernary, *, out: np.ndarray | None = None) -> np.ndarray:
    """``out ~= x @ W.T`` with ``W = scale * t`` (``t`` in {-1, 0, +1}, ``packed.dequantize()``).

    The same computation as :func:`kernels.gemm_int4`, with 2-bit codes ``t + 1`` and
    the shared zero point 1: activations quantized to int8 per row and per block of
    the weights' group (the whole row for per-channel scales), exact int32 dots per
    group, then ``out = out + float32(e) * (sx * scale)`` group by group in float32;
    ``kernels.reference.ternary.gemm_ternary_ref`` computes the same bits, and the
    error bound of ``gemm_int4`` holds with ``n_g`` the number of ternary groups.

    A GEMV streams ``N * K / 4`` bytes (a quarter of int8's).

    Parameters
    ----------
    x : float32 ndarray [M, K], C-contiguous, finite
    packed : PackedTernary from ``kernels.pack_ternary`` / ``kernels.pack_ternary_codes``
    out : float32 ndarray [M, N], C-contiguous, optional
    """
    return grouped.run("gemm_ternary", x, packed, PackedTernary, out)


def gemm_ternary_plan(packed: PackedTernary, m: int) -> GroupedPlan:
    """:func:`gemm_ternary` prepared once for ``x`` of ``m`` rows: ``plan(x, out=None)`` (the same values and errors),
    and ``plan.entry()``, the same call as a :class:`kernels.entry.Entry` (inputs ``x [m, K]`` float32, outputs
    ``out [m, N]`` float32). The one-shot :func:`gemm_ternary` keeps such plans on ``packed``."""
    return grouped.plan("gemm_ternary", packed, PackedTernary, m)
