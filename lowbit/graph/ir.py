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

A graph is plain data: ``inputs`` (name -> :class:`TensorSpec`, whose free
dimensions are ``None`` or a symbol such as ``"batch"``), ``outputs`` (names),
``params`` (name -> ndarray: weights, biases, scales, codes), ``nodes`` and
``opset`` (ONNX domain -> version; ``""`` is the default domain). Ops of another
domain than ONNX's default are named ``"<domain>.<op_type>"``
(``"com.microsoft.QLinearAdd"``). :meth:`Graph.validate` checks that every tensor
is defined once before it is used; :meth:`Graph.index` maps each tensor to its
producer and consumers in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


#: The ONNX opset a graph without one is read at (lowbit's own graphs use no op whose meaning changed since).
DEFAULT_OPSET = 21

Dim = int | str | None


def fresh_name(stem: str, taken: set[str]) -> str:
    """``stem``, else ``stem_1``, ``stem_2`` ...: the first not in ``taken``, which it is added to."""
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype name of a graph input. A dimension is an int, ``None`` (free) or a symbol such as
    ``"batch"``: free too, but every dimension named by the same symbol takes the same size in one run."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def matches(self, array: np.ndarray) -> bool:
        return (array.dtype == np.dtype(self.dtype) and array.ndim == len(self.shape)
                and all(not isinstance(s, int) or s == a for s, a in zip(self.shape, array.shape)))

    def bind(self, shape: tuple[int, ...], symbols: dict[str, int]) -> str | None:
        """Record in ``symbols`` the size each symbolic dimension takes in ``shape``; the first conflict, if any,
        as a message (``symbols`` holds the sizes bound so far, by earlier inputs of the same run)."""
        for axis, (dim, size) in enumerate(zip(self.shape, shape)):
            if isinstance(dim, str):
                if symbols.setdefault(dim, size) != size:
                    return f"dimension {axis} is {dim!r} = {symbols[dim]} elsewhere in this run, got {size}"
        return None


@dataclass(frozen=True)
class GraphIndex:
    """Who writes and who reads each tensor, built in one pass over the nodes."""

    producer: dict[str, Node]
    consumers: dict[str, list[Node]]

    @classmethod
    def of(cls, nodes: list[Node]) -> GraphIndex:
        producer, consumers = {}, {}
        for node in nodes:
            for t in node.outputs:
                producer[t] = node
            for t in dict.fromkeys(node.inputs):
                if t:
                    consumers.setdefault(t, []).append(node)
        return cls(producer, consumers)


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
    opset: dict[str, int] = field(default_factory=lambda: {"": DEFAULT_OPSET})

    def opset_of(self, op: str) -> int:
        """The opset version of ``op``'s domain (``"com.microsoft.QGemm"``: com.microsoft; ``"Conv"``: ONNX's)."""
        domain = op.rpartition(".")[0]
        return self.opset.get(domain, DEFAULT_OPSET if not domain else 1)

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

    def index(self) -> GraphIndex:
        """Producers and consumers of every tensor (a snapshot: rebuild it after changing the nodes)."""
        return GraphIndex.of(self.nodes)

    def producer(self, tensor: str) -> Node | None:
        return self.index().producer.get(tensor)

    def consumers(self, tensor: str) -> list[Node]:
        return self.index().consumers.get(tensor, [])

    def node(self, name: str) -> Node:
        found = next((node for node in self.nodes if node.name == name), None)
        if found is None:
            raise KeyError(f"no node named {name!r}; nodes: {[n.name for n in self.nodes][:20]}...")
        return found

    def __repr__(self) -> str:
        """A summary (the parameters' values are not printed: a model has millions)."""
        ops: dict[str, int] = {}
        for node in self.nodes:
            ops[node.op] = ops.get(node.op, 0) + 1
        shown = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(ops.items(), key=lambda item: -item[1]))
        inputs = ", ".join(f"{name}: {spec.dtype} {list(spec.shape)}" for name, spec in self.inputs.items())
        return (f"Graph({len(self.nodes)} nodes: {shown}; inputs {inputs}; outputs {self.outputs}; "
                f"{len(self.params)} params, {self.nbytes()} bytes)")

    def copy(self) -> Graph:
        """A deep copy of the structure; parameter arrays are shared (treat them as read-only)."""
        # Node(...) directly: dataclasses.replace costs 15 us a node, which 100k-node graphs feel in every pass
        nodes = [Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name) for n in self.nodes]
        return Graph(nodes, dict(self.inputs), list(self.outputs), dict(self.params), dict(self.opset))

    def nbytes(self) -> int:
        """Bytes of all parameters: the model's size."""
        return sum(int(p.nbytes) for p in self.params.values())
