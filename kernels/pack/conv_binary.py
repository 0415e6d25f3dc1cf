"""Binary convolution weights packed once for ``kernels.conv.binary``.

A filter bank ``w[o, c, ky, kx]`` of ±1 (OIHW, as ONNX) is read as the matrix
``[O, K]`` whose row ``o`` lists the taps ``t = ky * KW + kx`` in order and, per
tap, the channels packed by ``kernels.pack.bits`` (bit set = -1, padding bits 0)::

    word t * CW + q of row o = pack_bits(w[o, :, ky, kx])[q]      (CW = ceil(C / 64) words per tap)

the column order of the im2col rows of ``kernels.conv.geometry.im2col`` over
bit-packed NHWC activations (and of the windows ``kernels.conv.binary_driver``
gathers). Those rows are stored in the lanes layout of ``kernels.gemm.popcount_lanes``:
output channels in vectors of 64 (the last padded with zero words), and per vector,
word and byte pair ``(b[2p], b[2p + 1])`` two rows of 64 bytes, ``b[2p]`` and
``b[2p] ^ b[2p + 1]``, one byte per channel. ``tap_sums[t, o] = sum_c w[o, c, ky, kx]``
lets the convolution replace the free +1 border by another pad value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels.gemm.popcount_lanes import LANES, PAIRS, UNITS_PER_SLOT, VECTOR_UNITS
from kernels.pack.bits import pack_bits, word_count


class PackedConvBinary(NamedTuple):
    """Packed ±1 convolution weights (see the module docstring)."""

    lanes: np.ndarray  # uint32 [ceil(O / 64) * ldb], C-contiguous
    out_channels: int
    in_channels: int
    kernel_hw: tuple[int, int]
    tap_words: int  # CW = ceil(C / 64)
    words: int  # words per output channel, KH * KW * CW
    ldb: int  # uint32 units per vector of 64 output channels in ``lanes``
    tap_sums: np.ndarray  # int32 [KH * KW, O]


def check_packed_conv_binary(p: PackedConvBinary) -> None:
    """ValueError unless ``p``'s fields agree with each other and with its arrays, as :func:`pack_conv_binary` made
    them (a tuple's ``_replace`` can change one; the kernels index the arrays by them)."""
    try:
        kh, kw = (int(v) for v in p.kernel_hw)
        o, c, tap_words, words, ldb = (int(v) for v in (p.out_channels, p.in_channels, p.tap_words, p.words, p.ldb))
    except (TypeError, ValueError):
        raise ValueError(f"w: packed binary weights with malformed fields {p._replace(lanes=None, tap_sums=None)}") \
            from None
    consistent = (min(kh, kw, o, c) > 0 and tap_words == word_count(c) and words == kh * kw * tap_words
                  and ldb == words * UNITS_PER_SLOT * VECTOR_UNITS and isinstance(p.lanes, np.ndarray)
                  and p.lanes.dtype == np.uint32 and p.lanes.flags.c_contiguous and p.lanes.ndim == 1
                  and p.lanes.size == -(-o // LANES) * ldb and isinstance(p.tap_sums, np.ndarray)
                  and p.tap_sums.dtype == np.int32 and p.tap_sums.shape == (kh * kw, o))
    if not consistent:
        raise ValueError(f"w: packed binary weights whose fields do not match their arrays (kernel {(kh, kw)}, "
                         f"{o} x {c} channels, lanes {getattr(p.lanes, 'shape', None)}); pack them with "
                         f"kernels.pack_conv_binary instead of editing them")


def lanes_layout(rows: np.ndarray) -> np.ndarray:
    """Rows ``[N, W]`` of packed words in the lanes layout of ``kernels.gemm.popcount_lanes``, flattened.

    Returns, as a C-contiguous 1-D uint32 array, the bytes ``[ceil(N / 64), W, 4, 2, 64]``:
    per vector of 64 rows, word and byte pair, the pair's first bytes and its xors.
    """
    n, words = rows.shape
    vectors = -(-n // LANES)
    padded = np.zeros((vectors * LANES, words), np.uint64)
    padded[:n] = rows
    octets = padded.astype("<u8").view(np.uint8).reshape(vectors, LANES, words, PAIRS, 2)
    octets = octets.transpose(0, 2, 3, 4, 1)  # [vector, word, pair, byte of the pair, lane]
    out = np.empty((vectors, words, PAIRS, 2, LANES), np.uint8)
    out[:, :, :, 0] = octets[:, :, :, 0]
    out[:, :, :, 1] = octets[:, :, :, 0] ^ octets[:, :, :, 1]
    return out.reshape(-1).view(np.uint32)


def pack_conv_binary(w: np.ndarray) -> PackedConvBinary:
    """Pack ±1 convolution weights ``w [O, C, KH, KW]`` (OIHW) for ``kernels.conv.binary.conv2d_binary``.

    Parameters
    ----------
    w : ndarray of a signed integer or float dtype, shape (O, C, KH, KW), every value -1 or +1
        (booleans are refused: whether True means -1 or +1 is a convention, not a value).

    Returns
    -------
    PackedConvBinary
    """
    if not isinstance(w, np.ndarray):
        raise TypeError(f"w: expected a numpy.ndarray of -1 / +1 values, got {type(w).__name__}")
    if w.dtype.kind not in "if":
        raise TypeError(f"w: expected a signed integer or float dtype holding -1 / +1, got {w.dtype}")
    if w.ndim != 4:
        raise ValueError(f"w: expected a 4-D OIHW array, got shape {w.shape}")
    if min(w.shape) < 1:
        raise ValueError(f"w: expected a non-empty array, got shape {w.shape}")
    bad = (w != 1) & (w != -1)
    if bad.any():
        raise ValueError(f"w: expected only -1 and +1 values, got {w[bad].flat[0].item()!r}")
    o, c, kh, kw = w.shape
    words = kh * kw * word_count(c)
    rows = pack_bits(np.ascontiguousarray(w.transpose(0, 2, 3, 1)), axis=-1).reshape(o, words)
    tap_sums = w.reshape(o, c, kh * kw).sum(axis=1, dtype=np.int64).T.astype(np.int32)
    return PackedConvBinary(lanes_layout(rows), o, c, (kh, kw), word_count(c), words,
                            words * UNITS_PER_SLOT * VECTOR_UNITS, np.ascontiguousarray(tap_sums))
