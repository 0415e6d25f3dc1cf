"""A :class:`lowbit.Graph` as an ONNX model: :func:`to_onnx`.

Each node becomes a NodeProto of the same op (``"<domain>.<op>"`` names give the domain: ``lowbit.TernaryGemm`` is
op ``TernaryGemm`` of domain ``lowbit``), inputs, outputs and attributes; parameters become initializers, inputs
keep their declared shapes (a free dimension ``None`` becomes the symbol ``batch`` on axis 0, else ``dim<i>``) and
the graph's opsets are imported. The result is checked by ``onnx.checker``: lowbit's own attributes on ONNX ops
(the ``activation`` a session fuses, for one) are refused there, so export a graph as built, before a session's
passes. The ``onnx`` package is needed (``pip install 'lowbit[onnx]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.graph.ir import Graph


def to_onnx(graph: Graph, *, name: str = "lowbit") -> Any:
    """``graph`` as an ``onnx.ModelProto`` (see the module docstring); ValueError when ONNX's checker refuses it."""
    from lowbit.onnx.importer import onnx_module

    onnx = onnx_module()
    helper = onnx.helper
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a lowbit.graph.Graph, got {type(graph).__name__}")
    graph = graph.copy().validate()
    nodes = []
    for node in graph.nodes:
        domain, _, op = node.op.rpartition(".")
        nodes.append(helper.make_node(op, node.inputs, node.outputs, name=node.name, domain=domain or None,
                                      **{k: _attribute(v) for k, v in node.attrs.items()}))
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)),
                                            [_dim(d, i) for i, d in enumerate(spec.shape)])
              for n, spec in graph.inputs.items()]
    initializers = [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in graph.params.items()]
    opsets = [helper.make_opsetid("" if d == "ai.onnx" else d, v) for d, v in graph.opset.items()]
    domains = {n.op.rpartition(".")[0] for n in graph.nodes} - {"", *graph.opset}
    opsets += [helper.make_opsetid(d, 1) for d in sorted(domains)]
    model = helper.make_model(helper.make_graph(nodes, name, inputs, [], initializers), opset_imports=opsets,
                              producer_name="lowbit")
    try:  # the outputs' types and shapes as ONNX infers them
        known = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        missing = [n for n in graph.outputs if n not in known and n not in graph.inputs]
        if missing:
            raise ValueError(f"graph: ONNX cannot infer the type of the outputs {missing} (ops of another domain?)")
        model.graph.output.extend(known.get(n) or inputs[list(graph.inputs).index(n)] for n in graph.outputs)
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ValueError(f"graph: not a valid ONNX model ({str(error).splitlines()[0]})") from None
    return model


def _attribute(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _dim(d: int | str | None, axis: int) -> int | str:
    if d is None:
        return "batch" if axis == 0 else f"dim{axis}"
    return d
