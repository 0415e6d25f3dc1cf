"""Building graphs in code: :class:`GraphBuilder` for any graph, :class:`Sequential` for a chain of layers.

Both create ONNX-named nodes (see ``lowbit.graph.ir``) with float32 parameters::

    g = GraphBuilder({"x": TensorSpec((None, 1, 8, 8))})
    h = g.conv("x", w, b, pads=(1, 1, 1, 1))
    h = g.relu(h)
    y = g.gemm(g.flatten(h), w2, b2)
    graph = g.build([y])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.graph.ir import Graph, Node, TensorSpec


class GraphBuilder:
    """Appends nodes in order; each method returns the name of its (first) output."""

    def __init__(self, inputs: dict[str, TensorSpec]):
        self.inputs = dict(inputs)
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def param(self, stem: str, value: np.ndarray) -> str:
        """Add a constant; returns its name."""
        name = self._name(stem)
        self.params[name] = np.ascontiguousarray(value)
        return name

    def add_node(self, op: str, inputs: list[str], attrs: dict[str, Any] | None = None, outputs: int = 1,
                 name: str | None = None) -> str | list[str]:
        """Append ``op`` on ``inputs``; returns its output name (or names, when ``outputs > 1``)."""
        stem = name or op.split(".")[-1].lower()
        node_name = name or self._name(stem)
        names = [f"{node_name}:{i}" if outputs > 1 else node_name for i in range(outputs)]
        self.nodes.append(Node(op, list(inputs), names, dict(attrs or {}), node_name))
        return names if outputs > 1 else names[0]

    def conv(self, x: str, w: np.ndarray, b: np.ndarray | None = None, *, strides=(1, 1), pads=(0, 0, 0, 0),
             dilations=(1, 1), group: int = 1, name: str | None = None) -> str:
        inputs = [x, self.param("w", w.astype(np.float32))]
        if b is not None:
            inputs.append(self.param("b", b.astype(np.float32)))
        attrs = {"strides": list(strides), "pads": list(pads), "dilations": list(dilations), "group": group,
                 "kernel_shape": list(w.shape[2:])}
        return self.add_node("Conv", inputs, attrs, name=name)

    def gemm(self, x: str, w: np.ndarray, b: np.ndarray | None = None, *, name: str | None = None) -> str:
        """``x @ w.T + b`` with ``w`` of shape ``[out, in]`` (ONNX Gemm, ``transB=1``)."""
        inputs = [x, self.param("w", w.astype(np.float32))]
        if b is not None:
            inputs.append(self.param("b", b.astype(np.float32)))
        return self.add_node("Gemm", inputs, {"transB": 1}, name=name)

    def matmul(self, a: str, b: str, *, name: str | None = None) -> str:
        return self.add_node("MatMul", [a, b], name=name)

    def batch_norm(self, x: str, scale, bias, mean, var, *, epsilon: float = 1e-5, name: str | None = None) -> str:
        inputs = [x] + [self.param(stem, np.asarray(v, np.float32))
                        for stem, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))]
        return self.add_node("BatchNormalization", inputs, {"epsilon": epsilon}, name=name)

    def relu(self, x: str, *, name: str | None = None) -> str:
        return self.add_node("Relu", [x], name=name)

    def relu6(self, x: str, *, name: str | None = None) -> str:
        return self.add_node("Clip", [x], {"min": 0.0, "max": 6.0}, name=name)

    def activation(self, op: str, x: str, *, name: str | None = None, **attrs) -> str:
        """Any one-input elementwise op: ``Gelu``, ``Sigmoid``, ``Tanh``, ``HardSwish``, ``Softmax`` (``axis``), ..."""
        return self.add_node(op, [x], attrs, name=name)

    def max_pool(self, x: str, kernel_shape, *, strides=None, pads=(0, 0, 0, 0), name: str | None = None) -> str:
        kernel_shape = list(kernel_shape)
        return self.add_node("MaxPool", [x], {"kernel_shape": kernel_shape, "strides": list(strides or kernel_shape),
                                              "pads": list(pads)}, name=name)

    def average_pool(self, x: str, kernel_shape, *, strides=None, pads=(0, 0, 0, 0), name: str | None = None) -> str:
        kernel_shape = list(kernel_shape)
        return self.add_node("AveragePool", [x], {"kernel_shape": kernel_shape,
                                                  "strides": list(strides or kernel_shape), "pads": list(pads)},
                             name=name)

    def global_average_pool(self, x: str, *, name: str | None = None) -> str:
        return self.add_node("GlobalAveragePool", [x], name=name)

    def flatten(self, x: str, *, axis: int = 1, name: str | None = None) -> str:
        return self.add_node("Flatten", [x], {"axis": axis}, name=name)

    def add(self, a: str, b: str, *, name: str | None = None) -> str:
        return self.add_node("Add", [a, b], name=name)

    def mul(self, a: str, b: str, *, name: str | None = None) -> str:
        return self.add_node("Mul", [a, b], name=name)

    def concat(self, xs: list[str], *, axis: int = 1, name: str | None = None) -> str:
        return self.add_node("Concat", list(xs), {"axis": axis}, name=name)

    def reshape(self, x: str, shape, *, name: str | None = None) -> str:
        return self.add_node("Reshape", [x, self.param("shape", np.asarray(shape, np.int64))], name=name)

    def transpose(self, x: str, perm, *, name: str | None = None) -> str:
        return self.add_node("Transpose", [x], {"perm": list(perm)}, name=name)

    def softmax(self, x: str, *, axis: int = -1, name: str | None = None) -> str:
        return self.add_node("Softmax", [x], {"axis": axis}, name=name)

    def layer_norm(self, x: str, scale, bias, *, axis: int = -1, epsilon: float = 1e-5,
                   name: str | None = None) -> str:
        inputs = [x, self.param("scale", np.asarray(scale, np.float32)), self.param("bias", np.asarray(bias, np.float32))]
        return self.add_node("LayerNormalization", inputs, {"axis": axis, "epsilon": epsilon}, name=name)

    def build(self, outputs: list[str]) -> Graph:
        return Graph(list(self.nodes), dict(self.inputs), list(outputs), dict(self.params)).validate()


class Sequential:
    """A chain of layers, each ``(method name, *args, **kwargs)`` of :class:`GraphBuilder` applied to the last output.

    ``Sequential((None, 1, 8, 8), [("conv", w, b, {"pads": (1, 1, 1, 1)}), ("relu",), ("flatten",),
    ("gemm", w2, b2)]).graph``; a trailing dict holds keyword arguments.
    """

    def __init__(self, input_shape: tuple[int | None, ...], layers: list[tuple], *, input_name: str = "x"):
        builder = GraphBuilder({input_name: TensorSpec(tuple(input_shape))})
        h = input_name
        for layer in layers:
            method, *args = layer
            kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
            h = getattr(builder, method)(h, *args, **kwargs)
        self.graph = builder.build([h])
