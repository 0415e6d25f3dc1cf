"""Storage layouts for values narrower than a byte: 4, 2 and 1 bit(s) per value.

Values are packed in C order along the flattened array, the first value in the
least significant bits, as ONNX stores its int4/uint4/int2/uint2 tensors::

    4 bit: byte j = v[2j]      | v[2j + 1] << 4
    2 bit: byte j = v[4j]      | v[4j + 1] << 2 | v[4j + 2] << 4 | v[4j + 3] << 6
    1 bit: byte j = sum_i v[8j + i] << i

Signed values are stored as two's complement in their field (-8..7 for 4 bits,
-2..1 for 2 bits) and sign-extended on unpacking. Padding fields of the last byte
are zero. This is a format for storage and files; kernels that want another
arrangement (for example 64 signs per word along K) repack from it.
"""

from __future__ import annotations

import numpy as np

WIDTHS = (1, 2, 4)


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` values of ``bits`` each."""
    return -(-count * bits // 8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer ``values`` (any shape; each fitting ``bits``) into a flat uint8 array."""
    if bits not in WIDTHS:
        raise ValueError(f"bits: expected one of {WIDTHS}, got {bits}")
    flat = np.ascontiguousarray(values).reshape(-1)
    per_byte = 8 // bits
    fields = np.zeros(packed_size(flat.size, bits) * per_byte, np.uint8)
    fields[: flat.size] = flat.astype(np.int64) & ((1 << bits) - 1)  # two's complement field
    fields = fields.reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(fields << shifts, axis=1).astype(np.uint8)


def unpack(data: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """The first ``count`` values stored in ``data`` (see :func:`pack`), as a flat int8 array."""
    if bits not in WIDTHS:
        raise ValueError(f"bits: expected one of {WIDTHS}, got {bits}")
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size < packed_size(count, bits):
        raise ValueError(f"data: {count} values of {bits} bits need {packed_size(count, bits)} bytes, "
                         f"got {data.size}")
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    fields = ((data[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].astype(np.int8)
    if signed:
        fields = np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields).astype(np.int8)
    return fields
