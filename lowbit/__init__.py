"""lowbit: run quantized neural networks on a CPU from Python, fast, with numpy + numba + llvmlite."""

from __future__ import annotations

from lowbit.qtensor import QTensor, quantize
from lowbit.quantization.metrics import compare, report
from lowbit.quantization.qdq import dequantize_linear, dynamic_quantize_linear, quantize_linear
from lowbit.quantization.scheme import QScheme, binary, int4, int8, nf4, pow2, ternary

__version__ = "0.1.0"

__all__ = [
    "QScheme", "QTensor", "binary", "compare", "dequantize_linear", "dynamic_quantize_linear", "int4", "int8", "nf4",
    "pow2", "quantize", "quantize_linear", "report", "ternary",
]
