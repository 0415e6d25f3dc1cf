"""ONNX tensor element types: their NumPy dtype in lowbit and ONNX Runtime's type string.

Indexed by ``onnx.TensorProto`` enum values (stable across onnx releases), so this module
needs no onnx import. 4-bit and 2-bit codes are held one per byte (int8 / uint8 arrays),
as everywhere in lowbit; the type string keeps the ONNX name.
"""

from __future__ import annotations

import numpy as np

#: elem_type -> (ONNX name, NumPy dtype name lowbit holds it in)
ELEM_TYPES: dict[int, tuple[str, str]] = {
    1: ("float", "float32"), 2: ("uint8", "uint8"), 3: ("int8", "int8"), 4: ("uint16", "uint16"),
    5: ("int16", "int16"), 6: ("int32", "int32"), 7: ("int64", "int64"), 9: ("bool", "bool"),
    10: ("float16", "float16"), 11: ("double", "float64"), 12: ("uint32", "uint32"), 13: ("uint64", "uint64"),
    21: ("uint4", "uint8"), 22: ("int4", "int8"), 25: ("uint2", "uint8"), 26: ("int2", "int8"),
}
#: Element types of ONNX that lowbit cannot hold (string, complex, bfloat16, 8-bit and 4-bit floats).
UNSUPPORTED = {8: "string", 14: "complex64", 15: "complex128", 16: "bfloat16", 17: "float8e4m3fn",
               18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 23: "float4e2m1", 24: "float8e8m0"}


def elem_name(elem_type: int) -> str:
    """ONNX's name of an element type (``1`` -> ``"float"``)."""
    if elem_type in ELEM_TYPES:
        return ELEM_TYPES[elem_type][0]
    return UNSUPPORTED.get(elem_type, f"element type {elem_type}")


def numpy_dtype(elem_type: int, where: str) -> np.dtype:
    """The dtype lowbit holds ``elem_type`` in; a ValueError naming ``where`` for a type it cannot hold."""
    if elem_type not in ELEM_TYPES:
        raise ValueError(f"{where}: ONNX type {elem_name(elem_type)} is not supported; lowbit holds "
                         f"{sorted({name for name, _ in ELEM_TYPES.values()})}")
    return np.dtype(ELEM_TYPES[elem_type][1])


def type_string(elem_type: int) -> str:
    """ONNX Runtime's ``NodeArg.type`` string: ``"tensor(float)"``."""
    return f"tensor({elem_name(elem_type)})"
