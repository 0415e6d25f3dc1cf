"""NumPy oracles of the binary products (``kernels.gemm_binary`` and friends) and of the bit packing.

Nothing here is fast. Dot products are exact int64, computed from the ±1 values
themselves (not from popcounts), so they check the identity
``dot = k - 2 popcount(a xor b)`` the kernels rely on; the float transform
follows the kernels' formula and order, so results must match bit for bit.
"""

from __future__ import annotations

import numpy as np


def pack_bits_ref(x: np.ndarray) -> np.ndarray:
    """Sign bits of ``x [..., n]`` along the last axis: word j, bit i = ``x[..., 64 j + i] < 0``; padding 0."""
    x = np.asarray(x)
    n = x.shape[-1]
    words = -(-n // 64)
    out = np.zeros(x.shape[:-1] + (words,), np.uint64)
    for i in range(n):
        bit = (x[..., i] < 0).astype(np.uint64) << np.uint64(i % 64)
        out[..., i // 64] |= bit
    return out


def unpack_bits_ref(words: np.ndarray, count: int) -> np.ndarray:
    """±1 int8 values of the first ``count`` bits of ``words [..., W]`` along the last axis."""
    words = np.asarray(words, np.uint64)
    out = np.empty(words.shape[:-1] + (count,), np.int8)
    for i in range(count):
        bit = (words[..., i // 64] >> np.uint64(i % 64)) & np.uint64(1)
        out[..., i] = 1 - 2 * bit.astype(np.int8)
    return out


def gemm_binary_ref(a_bits: np.ndarray, b_bits: np.ndarray, k: int) -> np.ndarray:
    """``x @ y.T`` in int64 for the ±1 matrices ``x [M, k]``, ``y [N, k]`` the bits encode."""
    x = unpack_bits_ref(a_bits, k).astype(np.int64)
    y = unpack_bits_ref(b_bits, k).astype(np.int64)
    return x @ y.T


def gemm_binary_real_ref(a_bits, b_bits, k, multiplier=None, bias=None) -> np.ndarray:
    """``float32(float64(dot) * multiplier[n] + bias[n])`` (defaults 1 and 0)."""
    dot = gemm_binary_ref(a_bits, b_bits, k)
    n = dot.shape[1]
    mult = np.broadcast_to(np.asarray(1.0 if multiplier is None else multiplier, np.float64), (n,))
    shift = np.broadcast_to(np.asarray(0.0 if bias is None else bias, np.float64), (n,))
    return (dot.astype(np.float64) * mult + shift).astype(np.float32)


def gemm_binary_to_bits_ref(a_bits, b_bits, k, thresholds) -> np.ndarray:
    """Sign bits of ``dot - thresholds[n]``: set where ``dot < thresholds[n]``, packed along N."""
    dot = gemm_binary_ref(a_bits, b_bits, k)
    t = np.broadcast_to(np.asarray(thresholds), (dot.shape[1],))
    return pack_bits_ref(np.where(dot < t, -1, 1))


def gemm_binary_int8_ref(a: np.ndarray, b_bits: np.ndarray, k: int) -> np.ndarray:
    """``a @ w.T`` in int64, ``w [N, k]`` the ±1 weights the bits encode."""
    return a.astype(np.int64) @ unpack_bits_ref(b_bits, k).astype(np.int64).T
