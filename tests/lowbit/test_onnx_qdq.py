"""ONNX QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear node tests, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.quantization import qdq
from tests import conformance

UNSUPPORTED = ("float8", "float4", "int16", "uint16")  # code types that are not lowbit quant types


def _skip_unsupported(case) -> None:
    names = [np.asarray(a).dtype.name for a in case.inputs + case.outputs if a is not None]
    odd = [n for n in names if n.startswith(UNSUPPORTED)]
    if odd:
        pytest.skip(f"code type {odd[0]} is not a lowbit quant type")


def _codes(a: np.ndarray) -> np.ndarray:
    """ONNX sub-byte arrays (ml_dtypes) as plain int8 / uint8."""
    return a.astype(np.int8 if a.dtype.name.startswith("int") else np.uint8)


@pytest.mark.parametrize("name", conformance.params("QuantizeLinear"))
def test_quantizelinear(name):
    case = conformance.load_case(name)
    _skip_unsupported(case)
    x, scale, *zero = case.inputs
    zero_point = zero[0] if zero else None
    (expected,) = case.outputs
    got = qdq.quantize_linear(x, scale, zero_point, axis=case.attributes.get("axis", 1),
                              block_size=case.attributes.get("block_size", 0),
                              dtype=expected.dtype.name)
    np.testing.assert_array_equal(got, _codes(expected))


@pytest.mark.parametrize("name", conformance.params("DequantizeLinear"))
def test_dequantizelinear(name):
    case = conformance.load_case(name)
    _skip_unsupported(case)
    q, scale, *zero = case.inputs
    zero_point = _codes(zero[0]) if zero else None
    (expected,) = case.outputs
    got = qdq.dequantize_linear(q, scale, zero_point, axis=case.attributes.get("axis", 1),
                                block_size=case.attributes.get("block_size", 0))
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", conformance.params("DynamicQuantizeLinear"))
def test_dynamicquantizelinear(name):
    case = conformance.load_case(name)
    (x,) = case.inputs
    codes, scale, zero = qdq.dynamic_quantize_linear(x)
    expected_codes, expected_scale, expected_zero = case.outputs
    np.testing.assert_array_equal(codes, expected_codes)
    assert scale == expected_scale and zero == expected_zero


def test_code_type_errors():
    with pytest.raises(TypeError, match="dtype: expected one of .*int4.*got int16"):
        qdq.quantize_linear(np.zeros(3, np.float32), 1.0, dtype=np.int16)
    with pytest.raises(ValueError, match="scale: expected a scalar or a vector"):
        qdq.quantize_linear(np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32))


def test_dequantize_int32_biases_and_refused_codes():
    """ONNX Runtime's int32 biases dequantize per tensor and per axis; other code types are refused, not wrapped."""
    q = np.array([[1000, -5], [3, 2**30]], np.int32)
    np.testing.assert_array_equal(qdq.dequantize_linear(q, np.float32(0.5), 0),
                                  (q.astype(np.float32) * np.float32(0.5)))
    per_axis = qdq.dequantize_linear(q, np.array([0.5, 2], np.float32), np.array([1, -1], np.int32), axis=1)
    np.testing.assert_array_equal(per_axis, (q - np.array([1, -1])).astype(np.float32) * np.array([0.5, 2], np.float32))
    with pytest.raises(TypeError, match="q: expected codes of .* or int32, got int16"):
        qdq.dequantize_linear(np.ones(3, np.int16), np.float32(1))
