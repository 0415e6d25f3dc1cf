"""Ternary weights {-1, 0, +1} with per-channel or per-group scales, 2 bits per code.

Ternary Weight Networks thresholding, per output channel (``group_size=None``) or
per group of ``G`` k values, in float32::

    threshold = 0.7 * mean |w|                       (over the group's real values)
    t = sign(w) if |w| > threshold else 0
    scale = mean |w| over the values with t != 0    (1 when there are none)

Codes are stored as 2-bit fields ``t + 1`` (0, 1, 2) with the shared zero point 1,
four per byte, by ``kernels.pack.grouped``: a GEMV streams ``N * K / 4`` bytes.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels.pack.grouped import GROUP_SIZES, PackedGrouped, check_group_size, check_scales, check_weights, pack_fields

BITS = 2
TWN_THRESHOLD = np.float32(0.7)


class PackedTernary(PackedGrouped):
    """Ternary weights ``[N, K]`` packed once by :func:`pack_ternary` or :func:`pack_ternary_codes`."""

    __slots__ = ()


def _group_size(group_size: int | None, k: int) -> int:
    return k if group_size is None else check_group_size(group_size, GROUP_SIZES)


def quantize_ternary(w: np.ndarray, group_size: int | None = None):
    """``(codes int8 [N, K] in -1..1, scales float32 [N, groups])`` by TWN thresholding (module docstring)."""
    w = check_weights("w", w)
    n, k = w.shape
    g = _group_size(group_size, k)
    groups = -(-k // g)
    mag = np.zeros((n, groups * g), np.float32)
    mag[:, :k] = np.abs(w)
    blocks = mag.reshape(n, groups, g)
    counts = np.minimum(g, k - g * np.arange(groups)).astype(np.float32)
    threshold = TWN_THRESHOLD * (blocks.sum(axis=2, dtype=np.float32) / counts)
    above = blocks > threshold[:, :, None]
    kept = above.sum(axis=2)
    total = np.where(above, blocks, np.float32(0)).sum(axis=2, dtype=np.float32)
    scales = np.where(kept > 0, total / np.maximum(kept, 1).astype(np.float32), np.float32(1)).astype(np.float32)
    codes = (np.sign(w) * above.reshape(n, -1)[:, :k]).astype(np.int8)
    return codes, scales


def pack_ternary(w: np.ndarray, group_size: int | None = None) -> PackedTernary:
    """Ternarize float32 weights ``w [N, K]`` (TWN, module docstring) and pack them.

    ``group_size`` None gives one scale per output channel; otherwise one of 32,
    64, 128, 256 (K need not be a multiple of it).
    """
    codes, scales = quantize_ternary(w, group_size)
    return pack_ternary_codes(codes, scales, group_size=group_size)


def pack_ternary_codes(codes: np.ndarray, scales: np.ndarray, *, group_size: int | None = None) -> PackedTernary:
    """Pack pre-quantized ternary codes: ``w[n, k] ~ scales[n, g] * codes[n, k]``.

    codes : int8 [N, K] in -1..1, C-contiguous
    scales : float32 or float16 [N, 1] (``group_size=None``) or [N, ceil(K / group_size)]
    """
    codes = _validate.array("codes", codes, (np.int8,), 2)
    n, k = codes.shape
    if n == 0 or k == 0:
        raise ValueError(f"codes: expected a non-empty matrix, got shape {codes.shape}")
    _validate.integer_in("codes", codes, -1, 1)
    g = _group_size(group_size, k)
    s = check_scales(scales, n, -(-k // g))
    data = pack_fields((codes + 1).astype(np.uint8), BITS)
    return PackedTernary(data, n, k, BITS, g, s, None, 1)
