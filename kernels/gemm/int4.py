"""Public int4 product: ``gemm_int4`` (float32 activations x group-wise int4 weights)."""

from __future__ import annotations

import numpy as np

from kernels.gemm import grouped
from kernels.gemm.grouped import GroupedPlan
from kernels.pack.int4 import PackedInt4


def gemm_int4(x: np.ndarray, packed: PackedInt4, *, out: np.ndarray | None = None) -> np.ndarray:
    """``out ~= x @ W.T`` with ``W = packed.dequantize()`` (int4 codes, one scale per group of G).

    The activations are quantized on the fly, per row and per block of the weights'
    group size G (``kernels.gemm.grouped_driver``): ``sx[m, g] = max|x[m, g-block]| / 127``,
    ``xq = clip(rint(x / sx), -127, 127)`` (half to even). Then, exactly in integers,
    ``e[m, n, g] = sum_{k in g} xq[m, k] * (q[n, k] - z[n, g])``: VNNI ``vpdpbusd``
    multiplies the stored unsigned nibbles (s4 codes + 8; u4 codes as they are) as its
    unsigned operand by the int8 activations as its signed one, and the zero point
    (8 for s4) comes off as ``z * sum_k xq`` per row and group. Finally, in float32,
    for g = 0, 1, ...::

        out[m, n] = out[m, n] + float32(e[m, n, g]) * (sx[m, g] * scale[n, g])

    each operation rounded, in this order: ``kernels.reference.int4.gemm_int4_ref``
    computes the same bits.

    Error bound (``u = 2**-24``, ``W`` the dequantized weights, ``n_g`` groups): the
    rounding of ``x`` moves each value by at most ``sx (1/2 + 2**-17)``, and the
    float32 sum adds at most ``(n_g + 2) u`` of the summed magnitudes, so::

        |out[m, n] - (x @ W.T)[m, n]| <= sum_g sx[m, g] (1/2 + 2**-17) sum_{k in g} |W[n, k]|
                                         + (n_g + 2) u sum_k (|x[m, k]| + sx[m, g(k)]) |W[n, k]|

    Parameters
    ----------
    x : float32 ndarray [M, K], C-contiguous, finite
    packed : PackedInt4 from ``kernels.pack_int4`` / ``kernels.pack_int4_codes`` ([N, K])
    out : float32 ndarray [M, N], C-contiguous, optional; written and returned

    Returns
    -------
    float32 ndarray [M, N]

    M <= 8 runs GEMV kernels that stream the packed weights once (N * K / 2 bytes,
    prefetched); larger M walks rows in 5-row tiles per 64-channel panel. Work is
    split over ``kernels.threads`` by output panels (or rows, for few panels).
    """
    return grouped.run("gemm_int4", x, packed, PackedInt4, out)


def gemm_int4_plan(packed: PackedInt4, m: int) -> GroupedPlan:
    """:func:`gemm_int4` prepared once for ``x`` of ``m`` rows: ``plan(x, out=None)`` (the same values and errors),
    and ``plan.entry()``, the same call as a :class:`kernels.entry.Entry` (inputs ``x [m, K]`` float32, outputs
    ``out [m, N]`` float32). The one-shot :func:`gemm_int4` keeps such plans on ``packed``."""
    return grouped.plan("gemm_int4", packed, PackedInt4, m)
