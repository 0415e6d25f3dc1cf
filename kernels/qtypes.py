"""The table of quantized element types: each format described once.

Validation, dispatch, tests and benchmarks iterate over :data:`QTYPES` instead of
keeping their own lists. A row says how a value is stored; which kernels exist for
it lives in ``kernels.dispatch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QType:
    """One quantized element format.

    ``qmin``/``qmax`` are the integer range; ``elems_per_byte`` is how many values
    one byte of storage holds (1 for the 8-bit types).
    """

    name: str
    bits: int
    signed: bool
    dtype: np.dtype  # the NumPy dtype of unpacked values
    elems_per_byte: int
    description: str

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1


S8 = QType("s8", 8, True, np.dtype(np.int8), 1, "signed 8-bit: weights, or activations")
U8 = QType("u8", 8, False, np.dtype(np.uint8), 1, "unsigned 8-bit activations (ONNX uint8)")

QTYPES: dict[str, QType] = {q.name: q for q in (S8, U8)}
_BY_DTYPE = {q.dtype: q for q in QTYPES.values()}


def qtype_of(dtype: np.dtype | type) -> QType | None:
    """The row whose unpacked dtype is ``dtype``, or None."""
    return _BY_DTYPE.get(np.dtype(dtype))
