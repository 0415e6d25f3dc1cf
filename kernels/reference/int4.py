"""NumPy oracles of the group-wise int4 product (``kernels.gemm_int4``) and its activation quantization.

Integer parts are exact (int64); the float32 steps are the kernels' own, in the
same order, so the kernels must match these bit for bit.
"""

from __future__ import annotations

import numpy as np


def quantize_activations_ref(x: np.ndarray, group_size: int):
    """``(xq int64 [M, K], sx float32 [M, n_groups])``: per row and block of ``group_size``.

    ``sx = max|x| / 127``, ``xq = clip(rint(x / sx), -127, 127)`` (0 where ``sx == 0``).
    """
    x = np.asarray(x, np.float32)
    m, k = x.shape
    groups = -(-k // group_size)
    padded = np.zeros((m, groups * group_size), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(m, groups, group_size)
    sx = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)
    safe = np.where(sx > 0, sx, np.float32(1))[:, :, None]
    q = np.where(sx[:, :, None] > 0, np.clip(np.rint(blocks / safe), -127, 127), 0)
    return q.reshape(m, -1)[:, :k].astype(np.int64), sx


def gemm_grouped_ref(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points, group_size: int):
    """``out`` of the grouped kernels for weights ``scales[n, g] * (codes[n, k] - zero_points[n, g])``.

    ``zero_points`` is an ``[N, n_groups]`` array or one int for all groups. Per group
    ``e = xq @ (codes - z).T`` exactly, then ``out = out + float32(e) * (sx * scale)``.
    """
    xq, sx = quantize_activations_ref(x, group_size)
    m, k = xq.shape
    n, groups = scales.shape
    z = np.broadcast_to(np.asarray(zero_points, np.int64), (n, groups))
    codes = np.asarray(codes, np.int64)
    out = np.zeros((m, n), np.float32)
    for g in range(groups):
        cols = slice(g * group_size, min(k, (g + 1) * group_size))
        e = xq[:, cols] @ (codes[:, cols] - z[:, g : g + 1]).T
        out = out + e.astype(np.float32) * (sx[:, g : g + 1] * scales[None, :, g])
    return out


def gemm_int4_ref(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points=None, *,
                  group_size: int) -> np.ndarray:
    """``kernels.gemm_int4`` from the codes given to ``pack_int4_codes`` (int8 s4 or uint8 u4)."""
    return gemm_grouped_ref(x, codes, np.asarray(scales, np.float32), 0 if zero_points is None else zero_points,
                            group_size)


def dequantize_int4_ref(codes: np.ndarray, scales: np.ndarray, zero_points=None, *, group_size: int) -> np.ndarray:
    """``scales * (codes - zero_points)`` in float32, groups of ``group_size`` along K."""
    k = codes.shape[1]
    g = np.arange(k) // group_size
    z = 0 if zero_points is None else np.asarray(zero_points, np.int32)[:, g]
    return ((codes.astype(np.int32) - z).astype(np.float32) * np.asarray(scales, np.float32)[:, g]).astype(np.float32)
