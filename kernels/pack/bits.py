"""Sign bits packed 64 per ``uint64`` word: the operand layout of the binary kernels.

A binary value is -1 or +1. Along one axis of length ``n``, :func:`pack_bits`
stores element ``i`` in word ``i // 64``, bit ``i % 64`` (bit 0 the least
significant), as larq's compute engine does::

    word[j] = sum_{i < 64} (x[64 j + i] < 0) << i        (j < W = ceil(n / 64))

* a set bit means **-1** (the value is negative); a clear bit means **+1**
  (``x >= 0``, zero included, and NaN, which is not negative);
* the padding bits of the last word (elements ``n .. 64 W - 1``) are **0**, so
  they read as +1 in both operands, contribute nothing to ``xor`` and to the
  popcount, and the binary GEMM needs only ``k`` to correct for them;
* the output is C-contiguous and keeps the packed axis where it was, so a
  weight matrix ``[N, K]`` packs to ``[N, W]``: one row of words per output
  channel, the rows ``kernels.gemm_binary`` reads.

Relation to the storage format: ``kernels.pack.subbyte`` (the ``b1`` row of
``kernels.qtypes``) packs the *flattened* array 8 values per byte, least
significant bit first, also set for -1, for files and quantized tensors. For a
``[N, K]`` matrix with ``K % 64 == 0`` on a little-endian machine, those bytes
read as ``<u8`` words are exactly ``pack_bits(x)``; otherwise its rows do not
start on word boundaries, and :func:`from_b1_storage` repacks them.
"""

from __future__ import annotations

import numpy as np

from kernels.pack import subbyte

WORD_BITS = 64


def word_count(count: int) -> int:
    """Words holding ``count`` sign bits: ``ceil(count / 64)``."""
    return -(-count // WORD_BITS)


def check_padding_bits(name: str, words: np.ndarray, count: int) -> None:
    """Raise ``ValueError`` unless the bits past ``count`` in the last word (last axis) are 0.

    The popcount kernels count them as agreeing signs, so a set padding bit would
    silently shift every dot product; ``pack_bits`` always leaves them 0.
    """
    used = count % WORD_BITS
    if used and np.any(words[..., -1] >> np.uint64(used)):
        raise ValueError(f"{name}: bits past the {count} signs of each row must be 0; pack the signs with "
                         "kernels.pack_bits")


def _axis(name: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for a {ndim}-D array")
    return axis % ndim


def pack_bits(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """The signs of ``x`` along ``axis`` as bits, 64 per uint64 word (see the module docstring).

    Parameters
    ----------
    x : real or boolean array_like, at least 1-D
        ``x < 0`` is -1 (bit set), ``x >= 0`` is +1 (bit clear); NaN raises ``ValueError``.
    axis : int
        The axis to pack (default: the last, K of a ``[rows, K]`` matrix).

    Returns
    -------
    uint64 ndarray, C-contiguous: ``x.shape`` with ``axis`` replaced by ``ceil(n / 64)``.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"x: expected a real or boolean array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x: expected an array of at least 1 dimension, got a scalar")
    axis = _axis("x", axis, x.ndim)
    if x.dtype.kind == "f" and np.isnan(x).any():  # NaN < 0 is False: it would pack silently as +1
        raise ValueError(f"x: {np.count_nonzero(np.isnan(x))} NaN value(s); a NaN has no sign to pack")
    negative = np.moveaxis(x, axis, -1) < 0
    n = negative.shape[-1]
    words = word_count(n)
    octets = np.packbits(negative, axis=-1, bitorder="little")  # [..., ceil(n / 8)] bytes, padding zero
    padded = np.zeros(negative.shape[:-1] + (words * 8,), np.uint8)
    padded[..., : octets.shape[-1]] = octets
    packed = padded.view("<u8").astype(np.uint64, copy=False)  # little-endian words: byte j holds bits 8j..8j+7
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_bits(words: np.ndarray, count: int, axis: int = -1) -> np.ndarray:
    """The first ``count`` values along ``axis`` of packed ``words``, as int8 -1 / +1.

    ``count`` must need exactly the words there are: ``ceil(count / 64) == words.shape[axis]``.
    """
    words = np.asarray(words)
    if words.dtype != np.uint64:
        raise TypeError(f"words: expected dtype uint64, got {words.dtype}")
    if words.ndim == 0:
        raise ValueError("words: expected an array of at least 1 dimension, got a scalar")
    axis = _axis("words", axis, words.ndim)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count: expected a non-negative integer, got {count!r}")
    if word_count(int(count)) != words.shape[axis]:
        raise ValueError(f"count: {count} values need {word_count(int(count))} words, "
                         f"but words has {words.shape[axis]} along axis {axis}")
    moved = np.ascontiguousarray(np.moveaxis(words, axis, -1)).astype("<u8", copy=False)
    bits = np.unpackbits(moved.view(np.uint8), axis=-1, count=int(count), bitorder="little")
    signs = (1 - 2 * bits.astype(np.int8)).astype(np.int8)
    return np.ascontiguousarray(np.moveaxis(signs, -1, axis))


def from_b1_storage(data: np.ndarray, rows: int, count: int) -> np.ndarray:
    """Repack ``b1`` storage bytes (``kernels.pack.subbyte``) of a ``[rows, count]`` matrix as ``[rows, W]`` words."""
    flat = subbyte.unpack(data, 1, rows * count, signed=False)  # 1 = -1, 0 = +1
    return pack_bits(-flat.reshape(rows, count).astype(np.int8), axis=-1)
