"""Building small lowbit graphs node by node in tests."""

from __future__ import annotations

import numpy as np

from lowbit.graph import Node, TensorSpec


class GraphDraft:
    """A graph under construction from one input ``x`` of ``shape``: ``param`` adds a constant, ``op`` a node;
    both return the name to pass on."""

    def __init__(self, shape: tuple):
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self.inputs = {"x": TensorSpec(shape)}
        self.shape = shape

    def param(self, stem: str, value) -> str:
        name = f"{stem}{len(self.params)}"
        self.params[name] = np.asarray(value)
        return name

    def op(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        name = name or f"{op.rpartition('.')[2].lower()}{len(self.nodes)}"
        self.nodes.append(Node(op, inputs, [f"{name}_out"], attrs, name))
        return f"{name}_out"
