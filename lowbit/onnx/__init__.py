"""ONNX models in lowbit: :func:`load` a file into a :class:`lowbit.Graph`, or run it through
:class:`InferenceSession`, a stand-in for ``onnxruntime.InferenceSession``::

    import lowbit.onnx as ort                      # instead of: import onnxruntime as ort

    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x})[0]

Float, QDQ and QOperator models (ONNX Runtime's quantizer's two formats) load; the onnx package is
needed (``pip install 'lowbit[onnx]'``), the rest of lowbit works without it. :mod:`lowbit.onnx.quantization`
writes quantized models with ``onnxruntime.quantization``'s API (``quantize_dynamic``, ``quantize_static``).
"""

from lowbit.onnx.importer import Imported, UnsupportedModelError, ValueInfo, import_model, load
from lowbit.onnx.session import (ExecutionMode, GraphOptimizationLevel, InferenceSession, ModelMetadata, NodeArg,
                                 RunOptions, SessionOptions, get_available_providers, get_device)

__all__ = ["ExecutionMode", "GraphOptimizationLevel", "Imported", "InferenceSession", "ModelMetadata", "NodeArg",
           "RunOptions", "SessionOptions", "UnsupportedModelError", "ValueInfo", "get_available_providers",
           "get_device", "import_model", "load"]
