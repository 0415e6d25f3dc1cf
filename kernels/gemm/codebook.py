"""Public 4-bit codebook product: ``gemm_codebook`` (float32 activations x table-indexed group-wise weights)."""

from __future__ import annotations

import numpy as np

from kernels.gemm import grouped
from kernels.gemm.grouped import GroupedPlan
from kernels.pack.codebook import PackedCodebook


def gemm_codebook(x: np.ndarray, packed: PackedCodebook, *, out: np.ndarray | None = None) -> np.ndarray:
    """``out ~= x @ W.T`` with ``W = packed.dequantize() = scale[n, g] * T[c[n, k]]`` (4-bit codebook).

    The product is ``kernels.gemm_int4``'s with the stored index looked up in the
    int8 table ``T8 = rint(127 * T / tmax)``, ``tmax = max|T|`` (``kernels.pack.codebook``).
    Activations are quantized per row and group as there (``sx``, ``xq``); then,
    exactly in integers, ``e[m, n, g] = sum_{k in g} xq[m, k] * T8[c[n, k]]`` and, in
    float32 for g = 0, 1, ...::

        out[m, n] = out[m, n] + float32(e[m, n, g]) * (sx[m, g] * sw[n, g]),
        sw = float32(float32(scale[n, g] * tmax) / 127)

    each operation rounded, in this order: ``kernels.reference.codebook.gemm_codebook_ref``
    computes the same bits. The VNNI kernels look ``T8`` up with ``vpshufb`` and feed
    ``vpdpbusd`` the activations as unsigned bytes ``xq + 128``, taking
    ``128 * sum_k T8[c]`` (computed at pack time) off exactly.

    Error bound. The int8 table is an extra approximation: ``|T - T8 tmax / 127| <= tmax / 254``,
    so with ``W8 = packed.kernel_weights() = sw * T8[c]``, ``|W - W8| <= scale (tmax / 254 + 3 u tmax)``
    elementwise (``u = 2**-24``, the two roundings of ``sw``). Against ``W8`` the bound of
    ``kernels.gemm_int4`` holds; together::

        |out[m, n] - (x @ W.T)[m, n]| <= sum_g sx[m, g] (1/2 + 2**-17) sum_{k in g} |W8[n, k]|
                                         + (n_g + 2) u sum_k (|x[m, k]| + sx[m, g(k)]) |W8[n, k]|
                                         + sum_k |x[m, k]| scale[n, g(k)] tmax (1/254 + 3 u)

    Parameters
    ----------
    x : float32 ndarray [M, K], C-contiguous, finite
    packed : PackedCodebook from ``kernels.pack_codebook`` / ``pack_codebook_weights`` ([N, K])
    out : float32 ndarray [M, N], C-contiguous, optional; written and returned

    Returns
    -------
    float32 ndarray [M, N]
    """
    return grouped.run("gemm_codebook", x, packed, PackedCodebook, out)


def gemm_codebook_plan(packed: PackedCodebook, m: int) -> GroupedPlan:
    """:func:`gemm_codebook` prepared once for ``x`` of ``m`` rows: ``plan(x, out=None)`` (the same values and errors),
    and ``plan.entry()``, the same call as a :class:`kernels.entry.Entry` (inputs ``x [m, K]`` float32, outputs
    ``out [m, N]`` float32). The one-shot :func:`gemm_codebook` keeps such plans on ``packed``."""
    return grouped.plan("gemm_codebook", packed, PackedCodebook, m)
