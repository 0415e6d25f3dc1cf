"""Group-wise int4 weights: quantizing float weights, or taking codes, into ``PackedInt4``.

Per output channel ``n`` and group ``g`` of ``G`` consecutive k values (the last
group may be shorter), with the formulas of ``lowbit.quantization.grid`` (float32,
round half to even):

* symmetric (s4): ``scale = max|w| / 7`` (1 / 7 for an all-zero group),
  ``q = clip(rint(w / scale), -8, 7)``. Dividing by 7 rather than 8 keeps
  ``+max|w|`` representable; quantized floats use -7..7, while codes given by the
  caller may use -8.
* asymmetric (u4): ``lo = min(min w, 0)``, ``hi = max(max w, 0)``,
  ``scale = (hi - lo) / 15`` (1 / 15 when ``hi == lo``),
  ``zero = rint(clip(-lo / scale, 0, 15))``, ``q = clip(rint(w / scale) + zero, 0, 15)``.

Dequantized weights are ``scale * (q - zero)`` (zero = 0 for s4). Codes are stored
as unsigned nibbles ``q + 8`` (s4) or ``q`` (u4) by ``kernels.pack.grouped``.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels.pack.grouped import GROUP_SIZES, PackedGrouped, check_group_size, check_scales, check_weights, pack_fields

BITS = 4


class PackedInt4(PackedGrouped):
    """int4 weights ``[N, K]`` packed once by :func:`pack_int4` or :func:`pack_int4_codes`."""

    __slots__ = ()


def _groups(w: np.ndarray, g: int) -> np.ndarray:
    """``[N, ceil(K / g), g]`` view of ``w`` zero padded along K."""
    n, k = w.shape
    groups = -(-k // g)
    padded = np.zeros((n, groups * g), w.dtype)
    padded[:, :k] = w
    return padded.reshape(n, groups, g)


def quantize_int4(w: np.ndarray, group_size: int = 128, symmetric: bool = True):
    """``(codes [N, K], scales float32 [N, groups], zero_points uint8 [N, groups] or None)``.

    Codes are int8 in -8..7 (symmetric) or uint8 in 0..15 (asymmetric); see the
    module docstring for the formulas. Zero padding of the last group changes
    neither ``max|w|`` nor ``min(min w, 0)`` / ``max(max w, 0)``.
    """
    w = check_weights("w", w)
    g = check_group_size(group_size, GROUP_SIZES)
    n, k = w.shape
    blocks = _groups(w, g)
    if symmetric:
        amax = np.abs(blocks).max(axis=2)
        scales = (np.where(amax > 0, amax, np.float32(1)) / np.float32(7)).astype(np.float32)
        q = np.clip(np.rint(blocks / scales[:, :, None]), -8, 7).astype(np.int8)
        return q.reshape(n, -1)[:, :k].copy(), scales, None
    lo = np.minimum(blocks.min(axis=2), np.float32(0))
    hi = np.maximum(blocks.max(axis=2), np.float32(0))
    span = np.where(hi > lo, hi - lo, np.float32(1))
    scales = (span / np.float32(15)).astype(np.float32)
    zeros = np.rint(np.clip(-lo / scales, 0, 15)).astype(np.int32)
    q = np.clip(np.rint(blocks / scales[:, :, None]).astype(np.int32) + zeros[:, :, None], 0, 15).astype(np.uint8)
    return q.reshape(n, -1)[:, :k].copy(), scales, zeros.astype(np.uint8)


def pack_int4(w: np.ndarray, group_size: int = 128, symmetric: bool = True) -> PackedInt4:
    """Quantize float32 weights ``w [N, K]`` (row n = output channel n) to int4 per group and pack them.

    ``group_size`` is one of 32, 64, 128, 256; K need not be a multiple of it. See
    the module docstring for the quantization formulas; the result is ready for
    :func:`kernels.gemm_int4` any number of times.
    """
    codes, scales, zeros = quantize_int4(w, group_size, symmetric)
    return pack_int4_codes(codes, scales, zeros, group_size=group_size)


def pack_int4_codes(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None, *,
                    group_size: int = 128) -> PackedInt4:
    """Pack pre-quantized int4 codes: ``w[n, k] ~ scales[n, g] * (codes[n, k] - zero_points[n, g])``.

    Parameters
    ----------
    codes : int8 [N, K] in -8..7 (s4) or uint8 [N, K] in 0..15 (u4), C-contiguous
    scales : float32 or float16 [N, ceil(K / group_size)], finite, >= 0
    zero_points : None (0), or an array of the codes' dtype and range, shaped like ``scales``
    group_size : 32, 64, 128 or 256
    """
    codes = _validate.array("codes", codes, (np.int8, np.uint8), 2)
    g = check_group_size(group_size, GROUP_SIZES)
    n, k = codes.shape
    if n == 0 or k == 0:
        raise ValueError(f"codes: expected a non-empty matrix, got shape {codes.shape}")
    signed = codes.dtype == np.int8
    lo, hi = (-8, 7) if signed else (0, 15)
    _validate.integer_in("codes", codes, lo, hi)
    groups = -(-k // g)
    s = check_scales(scales, n, groups)
    shift = 8 if signed else 0  # stored nibble = code + shift
    zp = None
    if zero_points is not None:
        zero_points = _validate.array("zero_points", zero_points, (codes.dtype,), 2)
        if zero_points.shape != (n, groups):
            raise ValueError(f"zero_points: expected shape ({n}, {groups}), got {zero_points.shape}")
        _validate.integer_in("zero_points", zero_points, lo, hi)
        zp = zero_points.astype(np.int32) + shift
    data = pack_fields((codes.astype(np.int16) + shift).astype(np.uint8), BITS)
    return PackedInt4(data, n, k, BITS, g, s, zp, shift)
