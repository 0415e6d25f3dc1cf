"""The table of quantized element types: each format described once.

Validation, dispatch, tests, benchmarks and ``lowbit``'s quantized tensors iterate
over :data:`QTYPES` instead of keeping their own lists. A row says which integer
codes a format holds and how they are stored (``kernels.pack.subbyte`` for the
sub-byte ones); which kernels exist for it lives in ``kernels.dispatch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.pack import subbyte


@dataclass(frozen=True)
class QType:
    """One quantized element format: codes ``qmin..qmax`` in ``bits`` bits each.

    ``dtype`` is the NumPy dtype of unpacked codes. Binary codes are -1 and +1 and
    are stored as one bit, set for -1; every other format stores its codes as
    two's complement (signed) or plain (unsigned) fields.
    """

    name: str
    bits: int
    qmin: int
    qmax: int
    dtype: np.dtype
    description: str

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def elems_per_byte(self) -> int:
        return max(1, 8 // self.bits)

    def nbytes(self, count: int) -> int:
        """Bytes that ``count`` packed codes take."""
        return subbyte.packed_size(count, self.bits) if self.bits < 8 else count

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """Codes (any shape, C order) as flat storage bytes."""
        flat = np.ascontiguousarray(codes).reshape(-1)
        if self.bits == 8:
            return flat.astype(self.dtype)
        if self.name == "b1":
            return subbyte.pack((flat < 0).astype(np.uint8), 1)
        return subbyte.pack(flat, self.bits)

    def unpack(self, data: np.ndarray, count: int) -> np.ndarray:
        """The first ``count`` codes of storage ``data``, flat, as ``dtype``."""
        if self.bits == 8:
            return np.asarray(data).reshape(-1)[:count].astype(self.dtype)
        if self.name == "b1":
            return (1 - 2 * subbyte.unpack(data, 1, count, signed=False)).astype(self.dtype)
        return subbyte.unpack(data, self.bits, count, self.signed).astype(self.dtype)


S8 = QType("s8", 8, -128, 127, np.dtype(np.int8), "signed 8-bit: weights, or activations")
U8 = QType("u8", 8, 0, 255, np.dtype(np.uint8), "unsigned 8-bit activations (ONNX uint8)")
S4 = QType("s4", 4, -8, 7, np.dtype(np.int8), "signed 4-bit, two per byte (ONNX int4)")
U4 = QType("u4", 4, 0, 15, np.dtype(np.uint8), "unsigned 4-bit, two per byte (ONNX uint4); codebook indices")
S2 = QType("s2", 2, -2, 1, np.dtype(np.int8), "signed 2-bit, four per byte (ONNX int2)")
U2 = QType("u2", 2, 0, 3, np.dtype(np.uint8), "unsigned 2-bit, four per byte (ONNX uint2)")
T2 = QType("t2", 2, -1, 1, np.dtype(np.int8), "ternary -1, 0, +1 in 2-bit two's complement fields (kernel panels hold t + 1)")
B1 = QType("b1", 1, -1, 1, np.dtype(np.int8), "binary -1 / +1, one bit each, set for -1")

QTYPES: dict[str, QType] = {q.name: q for q in (S8, U8, S4, U4, S2, U2, T2, B1)}
_BY_DTYPE = {q.dtype: q for q in (S8, U8)}  # the formats NumPy arrays carry natively


def qtype_of(dtype: np.dtype | type) -> QType | None:
    """The 8-bit row whose unpacked dtype is ``dtype``, or None."""
    return _BY_DTYPE.get(np.dtype(dtype))
