"""The graph IR: named tensors, nodes in topological order, parameters as NumPy arrays.

Ops are named as ONNX names them (``Conv``, ``Gemm``, ``MatMul``,
``BatchNormalization``, ``Relu``, ``Clip``, ``Gelu``, ``Sigmoid``, ``Tanh``,
``HardSwish``, ``MaxPool``, ``AveragePool``, ``GlobalAveragePool``, ``Add``,
``Mul``, ``Concat``, ``Reshape``, ``Flatten``, ``Transpose``, ``Softmax``,
``LayerNormalization``, ``QuantizeLinear``, ``DequantizeLinear``,
``QLinearConv``, ``QLinearMatMul``), with ONNX's input order and attribute names,
so that an ONNX importer maps onto this IR one node at a time. lowbit's own
quantized ops carry the prefix ``lowbit.`` (see ``lowbit.runtime``). Activations
are NCHW, as in ONNX; ``Gemm`` follows ONNX (``Y = alpha A B' + beta C`` with
``transB``), and ``lowbit`` always stores weights ``[out, in]`` with ``transB=1``.

A graph is plain data: ``inputs`` (name -> :class:`TensorSpec`, the batch
dimension ``None``), ``outputs`` (names), ``params`` (name -> ndarray: weights,
biases, scales, codes) and ``nodes``. :meth:`Graph.validate` checks that every
tensor is defined once before it is used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Shape (``None`` for a free dimension, usually the batch) and dtype name of a graph input."""

    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def matches(self, array: np.ndarray) -> bool:
        return (array.dtype == np.dtype(self.dtype) and array.ndim == len(self.shape)
                and all(s is None or s == a for s, a in zip(self.shape, array.shape)))


@dataclass
class Node:
    """One operation: ``outputs = op(inputs, **attrs)``; an absent optional input is ``""``."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""


@dataclass
class Graph:
    """Nodes in topological order over named tensors; ``params`` hold the constant ones."""

    nodes: list[Node]
    inputs: dict[str, TensorSpec]
    outputs: list[str]
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def validate(self) -> Graph:
        """Raise ``ValueError`` unless every tensor is defined exactly once before it is read."""
        defined = set(self.inputs) | set(self.params)
        if len(defined) != len(self.inputs) + len(self.params):
            raise ValueError(f"graph: names used both as input and parameter: {sorted(set(self.inputs) & set(self.params))}")
        names = set()
        for index, node in enumerate(self.nodes):
            if not node.name:
                node.name = f"{node.op.split('.')[-1].lower()}_{index}"
            if node.name in names:
                raise ValueError(f"graph: two nodes are named {node.name!r}")
            names.add(node.name)
            missing = [t for t in node.inputs if t and t not in defined]
            if missing:
                raise ValueError(f"node {node.name!r} ({node.op}): inputs {missing} are not defined before it")
            twice = [t for t in node.outputs if t in defined]
            if twice:
                raise ValueError(f"node {node.name!r} ({node.op}): outputs {twice} are already defined")
            defined.update(node.outputs)
        absent = [t for t in self.outputs if t not in defined]
        if absent:
            raise ValueError(f"graph: outputs {absent} are never computed")
        return self

    def producer(self, tensor: str) -> Node | None:
        return next((node for node in self.nodes if tensor in node.outputs), None)

    def consumers(self, tensor: str) -> list[Node]:
        return [node for node in self.nodes if tensor in node.inputs]

    def node(self, name: str) -> Node:
        found = next((node for node in self.nodes if node.name == name), None)
        if found is None:
            raise KeyError(f"no node named {name!r}; nodes: {[n.name for n in self.nodes]}")
        return found

    def copy(self) -> Graph:
        """A deep copy of the structure; parameter arrays are shared (treat them as read-only)."""
        nodes = [dataclasses.replace(n, inputs=list(n.inputs), outputs=list(n.outputs), attrs=dict(n.attrs))
                 for n in self.nodes]
        return Graph(nodes, dict(self.inputs), list(self.outputs), dict(self.params))

    def nbytes(self) -> int:
        """Bytes of all parameters: the model's size."""
        return sum(int(p.nbytes) for p in self.params.values())
