"""NumPy oracle of the group-wise 4-bit codebook product (``kernels.gemm_codebook``).

The integer part is exact (int64); the float32 steps are the kernels' own, in the
same order, so the kernels must match it bit for bit.
"""

from __future__ import annotations

import numpy as np

from kernels.reference.int4 import gemm_grouped_ref


def codebook_int8_ref(table) -> tuple[np.ndarray, np.float32]:
    """``(T8 int64 [T], tmax)``: ``tmax = max|T|`` and ``T8 = rint(127 * T / tmax)`` of the float32 table."""
    t = np.asarray(table, np.float32)
    tmax = np.float32(np.abs(t).max())
    return np.rint(127 * t.astype(np.float64) / np.float64(tmax)).astype(np.int64), tmax


def gemm_codebook_ref(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, table, *, group_size: int) -> np.ndarray:
    """``kernels.gemm_codebook`` from the arguments of ``pack_codebook``.

    Per group ``e = xq @ T8[codes].T`` exactly, then
    ``out = out + float32(e) * (sx * float32(float32(scale * tmax) / 127))``.
    """
    t8, tmax = codebook_int8_ref(table)
    sw = ((np.asarray(scales, np.float32) * tmax).astype(np.float32) / np.float32(127)).astype(np.float32)
    return gemm_grouped_ref(x, t8[np.asarray(codes, np.int64)], sw, 0, group_size)


def dequantize_codebook_ref(codes: np.ndarray, scales: np.ndarray, table, *, group_size: int) -> np.ndarray:
    """``scales * table[codes]`` in float32, groups of ``group_size`` along K."""
    g = np.arange(codes.shape[1]) // group_size
    return (np.asarray(table, np.float32)[codes] * np.asarray(scales, np.float32)[:, g]).astype(np.float32)
