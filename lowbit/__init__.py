"""lowbit: run quantized neural networks on a CPU from Python, fast, with numpy + numba + llvmlite."""

from __future__ import annotations

from lowbit.graph import Graph, GraphBuilder, Node, Sequential, TensorSpec
from lowbit.io import load, model_size, save
from lowbit.ptq import QuantConfig, quantize_model
from lowbit.qtensor import QTensor, quantize
from lowbit.quantization.metrics import compare, report
from lowbit.quantization.qdq import dequantize_linear, dynamic_quantize_linear, quantize_linear
from lowbit.quantization.scheme import QScheme, binary, int4, int8, nf4, pow2, ternary
from lowbit.runtime import Profile, Session
from lowbit.sensitivity import SensitivityReport, mixed_precision, sensitivity

__version__ = "0.1.0"

__all__ = [
    "Graph", "GraphBuilder", "Node", "Profile", "QScheme", "QTensor", "QuantConfig", "Sequential", "Session",
    "SensitivityReport", "TensorSpec", "binary", "compare", "dequantize_linear", "dynamic_quantize_linear", "int4",
    "int8", "load", "mixed_precision", "model_size", "nf4", "pow2", "quantize", "quantize_linear", "quantize_model",
    "report", "save", "sensitivity", "ternary",
]
