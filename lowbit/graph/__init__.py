"""Layer graphs: named tensors and nodes in topological order (``ir``), built in code (``build``)."""

from lowbit.graph.build import GraphBuilder, Sequential
from lowbit.graph.ir import Graph, Node, TensorSpec

__all__ = ["Graph", "GraphBuilder", "Node", "Sequential", "TensorSpec"]
