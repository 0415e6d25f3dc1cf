"""Fusion of the elementwise patterns torch.onnx writes for transformers into single ops on lowbit's kernels.

LayerNorm as torch.onnx writes it below opset 17, over the last axis, in nine nodes::

    c = Sub(x, ReduceMean(x));  s = Sqrt(Add(ReduceMean(Pow(c, 2)), eps));  y = Add(Mul(Div(c, s), gamma), beta)

becomes one ``LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)`` (``kernels.layer_norm``). GELU (exact), as
``x * 0.5 * (1 + erf(x / sqrt 2))`` in five nodes, in any order of its two products::

    d = Div(x, sqrt 2) or Mul(x, 1 / sqrt 2);  e = Erf(d);  a = Add(e, 1)
    y = Mul(Mul(x, a), 0.5)  or  Mul(x, Mul(a, 0.5))  or  Mul(Mul(x, 0.5), a)

becomes ``com.microsoft.Gelu(x)``, and ``com.microsoft.BiasGelu(t, b)`` when ``x = Add(t, b)`` with ``b`` a
constant vector (a Linear's bias after its MatMul). Attention's scores::

    s = Div(q_k, c) or Mul(q_k, c);  v = Add(s, mask);  p = Softmax(v, axis=-1)

become ``lowbit.MaskedSoftmax(q_k, mask, scale=1/c or c)``: one pass over the scores
(``kernels.softmax``), where ONNX Runtime's graph runs three. When that softmax sits in a whole attention block,
heads split from the projections and merged again::

    qh = Transpose(Reshape(q, q_shape), [0, 2, 1, 3]);  kt = Transpose(Reshape(k, k_shape), [0, 2, 3, 1])
    vh = Transpose(Reshape(v, v_shape), [0, 2, 1, 3])
    y = Transpose(MatMul(MaskedSoftmax(MatMul(qh, kt), mask), vh), [0, 2, 1, 3])

the eleven nodes become ``lowbit.Attention(q, q_shape, k, k_shape, v, v_shape, mask, scale=...) -> y``
(``kernels.attention``: no transposed copies, no score tensor, a team of threads over batch and heads). Last, a
float32 MatMul by a constant ``W [K, N]`` whose only reader adds a constant vector ``b [N]`` becomes
``lowbit.Linear(x, W, b)`` (``kernels.linear_float32_plan``: the bias starts the sums). The
scalars must match to float32 precision, every tensor inside a pattern must have no other reader and not be a
graph output. The pass is pure (a new graph) and linear in the number of nodes.
"""

from __future__ import annotations

import math

import numpy as np

from lowbit.graph.ir import Graph, GraphIndex, Node
from lowbit.runtime.passes import _private


def _scalar(graph: Graph, tensor: str) -> float | None:
    """The value of a one-element float constant, else None."""
    value = graph.params.get(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-6 * abs(target)


def _operand(graph: Graph, node: Node, target: float) -> str | None:
    """For a binary ``node`` with one operand a scalar constant near ``target``: the other operand."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _near(_scalar(graph, b), target):
        return a
    if _near(_scalar(graph, a), target):
        return b
    return None


def _other(node: Node, tensor: str) -> str | None:
    if len(node.inputs) != 2 or tensor not in node.inputs:
        return None
    a, b = node.inputs
    return b if a == tensor else a


def _gelu(graph: Graph, index: GraphIndex, erf: Node) -> tuple[list[Node], str, str] | None:
    """For an Erf: ``(nodes replaced, x, y)`` of the GELU pattern around it, or None."""
    scaled = index.producer.get(erf.inputs[0])
    if scaled is None or _private(graph, index, erf.inputs[0]) is not erf:
        return None
    x = (_operand(graph, scaled, math.sqrt(2.0)) if scaled.op == "Div"
         else _operand(graph, scaled, 1 / math.sqrt(2.0)) if scaled.op == "Mul" else None)
    plus = _private(graph, index, erf.outputs[0])
    if x is None or plus is None or plus.op != "Add" or _operand(graph, plus, 1.0) != erf.outputs[0]:
        return None
    first = _private(graph, index, plus.outputs[0])
    if first is None or first.op != "Mul":
        return None
    partner = _other(first, plus.outputs[0])
    half_x = index.producer.get(partner)
    if partner == x:  # Mul(x, a), then times 0.5
        second = _private(graph, index, first.outputs[0])
        if second is None or second.op != "Mul" or _operand(graph, second, 0.5) != first.outputs[0]:
            return None
        return [scaled, erf, plus, first, second], x, second.outputs[0]
    if _operand(graph, first, 0.5) == plus.outputs[0]:  # Mul(a, 0.5), then times x
        second = _private(graph, index, first.outputs[0])
        if second is None or second.op != "Mul" or _other(second, first.outputs[0]) != x:
            return None
        return [scaled, erf, plus, first, second], x, second.outputs[0]
    if (half_x is not None and half_x.op == "Mul" and _operand(graph, half_x, 0.5) == x
            and _private(graph, index, partner) is first):  # Mul(x, 0.5), times a
        return [scaled, half_x, erf, plus, first], x, first.outputs[0]
    return None


def _last_axis_mean(graph: Graph, node: Node | None) -> bool:
    """Whether ``node`` is a ReduceMean over the last axis that keeps it (axes an attribute below opset 18, a
    constant input from 18)."""
    if node is None or node.op != "ReduceMean" or not node.attrs.get("keepdims", 1):
        return False
    if graph.opset_of(node.op) < 18:
        axes = node.attrs.get("axes")
    else:
        axes = graph.params.get(node.inputs[1]) if len(node.inputs) > 1 else None
    return axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] == [-1]


def _constant_vector(graph: Graph, node: Node, tensor: str) -> str | None:
    """The other operand of binary ``node``, when it is a constant float32 vector."""
    other = _other(node, tensor)
    value = graph.params.get(other) if other is not None else None
    return other if value is not None and value.ndim == 1 and value.dtype == np.float32 else None


def _layer_norm(graph: Graph, index: GraphIndex, sqrt: Node) -> tuple[list[Node], list[str], float, str] | None:
    """For a Sqrt: ``(nodes replaced, [x, gamma, beta], epsilon, y)`` of the decomposed LayerNorm around it."""
    add_eps = index.producer.get(sqrt.inputs[0])
    if add_eps is None or add_eps.op != "Add" or _private(graph, index, sqrt.inputs[0]) is not sqrt:
        return None
    variance = next((t for t in add_eps.inputs if _scalar(graph, t) is None), None)
    eps = _scalar(graph, _other(add_eps, variance)) if variance is not None else None
    var_mean = index.producer.get(variance) if variance is not None else None
    if eps is None or not _last_axis_mean(graph, var_mean) or _private(graph, index, variance) is not add_eps:
        return None
    power = index.producer.get(var_mean.inputs[0])
    if (power is None or power.op != "Pow" or _private(graph, index, var_mean.inputs[0]) is not var_mean
            or not _near(_scalar(graph, power.inputs[1]), 2.0)):
        return None
    sub = index.producer.get(power.inputs[0])
    mean = index.producer.get(sub.inputs[1]) if sub is not None and sub.op == "Sub" else None
    if not _last_axis_mean(graph, mean) or mean.inputs[0] != sub.inputs[0] or _private(graph, index,
                                                                                       sub.inputs[1]) is not sub:
        return None
    centred, x = sub.outputs[0], sub.inputs[0]
    div = _private(graph, index, sqrt.outputs[0])
    readers = {id(n) for n in index.consumers.get(centred, [])}
    if (div is None or div.op != "Div" or div.inputs != [centred, sqrt.outputs[0]] or centred in graph.outputs
            or readers != {id(power), id(div)}):
        return None
    mul = _private(graph, index, div.outputs[0])
    gamma = _constant_vector(graph, mul, div.outputs[0]) if mul is not None and mul.op == "Mul" else None
    add = _private(graph, index, mul.outputs[0]) if gamma is not None else None
    beta = _constant_vector(graph, add, mul.outputs[0]) if add is not None and add.op == "Add" else None
    if beta is None:
        return None
    return [mean, sub, power, var_mean, add_eps, sqrt, div, mul, add], [x, gamma, beta], eps, add.outputs[0]


def _masked_softmax(graph: Graph, index: GraphIndex, softmax: Node) -> tuple[list[Node], list[str], float] | None:
    """For a Softmax over the last axis: ``(nodes replaced, [scores, mask], scale)``, or None."""
    if graph.opset_of(softmax.op) < 13 or softmax.attrs.get("axis", -1) != -1:  # ranks are not known here
        return None
    add = index.producer.get(softmax.inputs[0])
    if add is None or add.op != "Add" or len(add.inputs) != 2 or _private(graph, index, add.outputs[0]) is not softmax:
        return None
    for scores, mask in (add.inputs, add.inputs[::-1]):
        scaling = index.producer.get(scores)
        if scaling is None or scaling.op not in ("Div", "Mul") or _private(graph, index, scores) is not add:
            continue
        qk, c = scaling.inputs if len(scaling.inputs) == 2 else (None, None)
        value = _scalar(graph, c)
        if value is None or value == 0.0 or (scaling.op == "Mul" and _scalar(graph, qk) is not None):
            continue
        return [scaling, add, softmax], [qk, mask], 1.0 / value if scaling.op == "Div" else value
    return None


HEADS_PERM = [0, 2, 1, 3]  # [b, s, heads, dh] <-> [b, heads, s, dh]
KEYS_PERM = [0, 2, 3, 1]  # [b, s, heads, dh] -> [b, heads, dh, s]: torch.onnx's permute and transpose(-1, -2)


def _perm_is(node: Node | None, perm: list[int]) -> bool:
    return node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == perm


def _heads(graph: Graph, index: GraphIndex, tensor: str, perm: list[int], reader: Node
           ) -> tuple[list[Node], str, str] | None:
    """For ``tensor = Transpose(Reshape(x, shape), perm)`` read by ``reader`` alone: ``(nodes, x, shape)``."""
    transpose = index.producer.get(tensor)
    if not _perm_is(transpose, perm) or _private(graph, index, tensor) is not reader:
        return None
    reshape = index.producer.get(transpose.inputs[0])
    if (reshape is None or reshape.op != "Reshape" or len(reshape.inputs) != 2 or reshape.attrs.get("allowzero", 0)
            or _private(graph, index, transpose.inputs[0]) is not transpose):
        return None
    return [reshape, transpose], reshape.inputs[0], reshape.inputs[1]


def _attention(graph: Graph, index: GraphIndex, softmax: Node) -> tuple[list[Node], list[str], str] | None:
    """For a ``lowbit.MaskedSoftmax``: ``(nodes replaced, inputs of lowbit.Attention, its output)`` of the attention
    block around it (module docstring), or None."""
    scores = index.producer.get(softmax.inputs[0])
    product = _private(graph, index, softmax.outputs[0])
    if (scores is None or scores.op != "MatMul" or _private(graph, index, softmax.inputs[0]) is not softmax
            or product is None or product.op != "MatMul" or product.inputs[0] != softmax.outputs[0]):
        return None
    merge = _private(graph, index, product.outputs[0])
    if not _perm_is(merge, HEADS_PERM):
        return None
    q = _heads(graph, index, scores.inputs[0], HEADS_PERM, scores)
    k = _heads(graph, index, scores.inputs[1], KEYS_PERM, scores)
    v = _heads(graph, index, product.inputs[1], HEADS_PERM, product)
    if q is None or k is None or v is None:
        return None
    nodes = [*q[0], *k[0], *v[0], scores, softmax, product, merge]
    return nodes, [q[1], q[2], k[1], k[2], v[1], v[2], softmax.inputs[1]], merge.outputs[0]


def fuse_transformer_ops(graph: Graph) -> Graph:
    """Rewrite GELU, scaled and masked Softmax, and attention patterns (see the module docstring) into single
    nodes."""
    out = graph.copy()
    index = out.index()
    replaced: dict[int, Node | None] = {}  # id(node) -> the fused node taking its place, or None (removed)

    def replace(nodes: list[Node], fused: Node) -> None:
        replaced.update({id(n): None for n in nodes})
        replaced[id(nodes[-1])] = fused  # the last node's place keeps the topological order

    for node in out.nodes:
        if id(node) in replaced:
            continue
        if node.op == "Erf" and (found := _gelu(out, index, node)) is not None:
            nodes, x, y = found
            add = index.producer.get(x)
            inside = x not in out.outputs and {id(n) for n in index.consumers[x]} <= {id(n) for n in nodes}
            bias = _bias(out, add) if add is not None and inside and id(add) not in replaced else None
            if bias is not None:  # the GELU reads x only: its bias Add goes in too
                replace([add, *nodes], Node("com.microsoft.BiasGelu", list(bias), [y], {}, f"{node.name}_gelu"))
            else:
                replace(nodes, Node("com.microsoft.Gelu", [x], [y], {}, f"{node.name}_gelu"))
        elif node.op == "Sqrt" and (found := _layer_norm(out, index, node)) is not None:
            nodes, inputs, eps, y = found
            if not any(id(n) in replaced for n in nodes):
                replace(nodes, Node("LayerNormalization", inputs, [y], {"axis": -1, "epsilon": eps},
                                    f"{node.name}_layer_norm"))
        elif node.op == "Softmax" and (found := _masked_softmax(out, index, node)) is not None:
            nodes, inputs, scale = found
            replace(nodes, Node("lowbit.MaskedSoftmax", inputs, list(node.outputs), {"scale": scale},
                                f"{node.name}_masked"))
    if replaced:
        out.nodes = [n for n in (replaced.get(id(n), n) for n in out.nodes) if n is not None]
        out.opset.setdefault("com.microsoft", 1)
    return _fuse_linear_bias(_fuse_attention(out))


def _fuse_linear_bias(graph: Graph) -> Graph:
    """``graph`` (a copy of its own) with each ``Add(MatMul(x, W), b)`` of constant float32 ``W [K, N]`` and
    ``b [N]`` (the MatMul's output read by the Add alone) as one ``lowbit.Linear(x, W, b)``."""
    index = graph.index()
    replaced: dict[int, Node | None] = {}
    for node in graph.nodes:
        w = graph.params.get(node.inputs[1]) if node.op == "MatMul" and len(node.inputs) == 2 else None
        if w is None or w.ndim != 2 or w.dtype != np.float32 or node.inputs[0] in graph.params:
            continue
        add = _private(graph, index, node.outputs[0])
        bias = _constant_vector(graph, add, node.outputs[0]) if add is not None and add.op == "Add" else None
        if bias is None or graph.params[bias].shape != (w.shape[1],):
            continue
        replaced[id(node)] = None
        replaced[id(add)] = Node("lowbit.Linear", [node.inputs[0], node.inputs[1], bias], list(add.outputs), {},
                                 f"{node.name}_linear")
    if replaced:
        graph.nodes = [n for n in (replaced.get(id(n), n) for n in graph.nodes) if n is not None]
    return graph


def _fuse_attention(graph: Graph) -> Graph:
    """``graph`` (a copy of its own) with each attention block around a MaskedSoftmax as one ``lowbit.Attention``."""
    index = graph.index()
    replaced: dict[int, Node | None] = {}
    for node in graph.nodes:
        if node.op == "lowbit.MaskedSoftmax" and (found := _attention(graph, index, node)) is not None:
            nodes, inputs, y = found
            replaced.update({id(n): None for n in nodes})
            replaced[id(nodes[-1])] = Node("lowbit.Attention", inputs, [y], {"scale": node.attrs["scale"]},
                                           f"{node.name}_attention")
    if replaced:
        graph.nodes = [n for n in (replaced.get(id(n), n) for n in graph.nodes) if n is not None]
    return graph


def _bias(graph: Graph, add: Node) -> tuple[str, str] | None:
    """``(t, b)`` for ``Add(t, b)`` or ``Add(b, t)`` with ``b`` a constant float32 vector and ``t`` computed, else
    None."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    for t in add.inputs:
        b = _constant_vector(graph, add, t)
        if b is not None and t not in graph.params:
            return t, b
    return None
