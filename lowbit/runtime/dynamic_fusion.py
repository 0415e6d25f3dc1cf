"""Fusion of ``onnxruntime.quantization.quantize_dynamic``'s matrix products into DynamicQuantizeMatMul.

quantize_dynamic writes each float ``x @ W (+ b)`` as::

    xq, xs, xz = DynamicQuantizeLinear(x)
    acc = MatMulInteger(xq, Wq, xz, Wz?)          Wq a 2-D constant
    s   = Mul(xs, Ws)                              Ws a constant, per tensor or per column
    y   = Mul(Cast(acc, to=float), s)  [-> Add(y, b)]     b a constant of N values

which :func:`fuse_dynamic_matmul` rewrites into ``com.microsoft.DynamicQuantizeMatMul(x, Wq, Ws, Wz, b)``, as
ONNX Runtime's optimizer does: one node quantizing ``x`` and running ``kernels.linear_int8`` with the scaling
and bias in its epilogue, instead of five with three float temporaries. The pass is pure (a new graph; the
input graph and its parameter arrays untouched) and linear in the number of nodes. A tensor inside the pattern
must have no other consumer and not be a graph output. A DynamicQuantizeLinear that feeds several products (Q, K
and V of an attention layer) stays, and they become ``com.microsoft.MatMulIntegerToFloat`` nodes on its codes:
``x`` is quantized once (unless each product quantizes per token: ``per_token``).
"""

from __future__ import annotations

from collections import Counter

from lowbit.graph.ir import Graph, GraphIndex, Node
from lowbit.runtime.passes import _private

FLOAT = 1  # onnx.TensorProto.FLOAT
CODES = ("int8", "uint8")


def _other(node: Node, tensor: str) -> str | None:
    """The other input of binary ``node`` when one of its two inputs is ``tensor``."""
    if len(node.inputs) != 2 or tensor not in node.inputs:
        return None
    a, b = node.inputs
    return b if a == tensor else a


def _match(graph: Graph, index: GraphIndex, matmul: Node) -> tuple[list[Node], Node, list[str]] | None:
    """For a MatMulInteger: ``(nodes replaced, the DynamicQuantizeLinear, fused inputs)``, or None."""
    params = graph.params
    a, b, a_zero, b_zero = (matmul.inputs + ["", "", ""])[:4]
    quantize = index.producer.get(a)
    if quantize is None or quantize.op != "DynamicQuantizeLinear" or len(quantize.outputs) < 3:
        return None
    codes, a_scale, zero = quantize.outputs[:3]
    weights = params.get(b)
    if a_zero != zero or weights is None or weights.ndim != 2 or weights.dtype.name not in CODES:
        return None
    if b_zero and (b_zero not in params or params[b_zero].size not in (1, weights.shape[1])):
        return None
    cast = _private(graph, index, matmul.outputs[0])
    if cast is None or cast.op != "Cast" or cast.attrs.get("to") != FLOAT:
        return None
    scaling = _private(graph, index, cast.outputs[0])
    scale = _other(scaling, cast.outputs[0]) if scaling is not None and scaling.op == "Mul" else None
    product = index.producer.get(scale) if scale else None
    if product is None or product.op != "Mul" or _private(graph, index, scale) is not scaling:
        return None
    w_scale = _other(product, a_scale)
    if w_scale not in params or params[w_scale].dtype.name != "float32" or params[w_scale].size not in (
            1, weights.shape[1]):
        return None
    nodes, output, bias = [matmul, cast, product, scaling], scaling.outputs[0], ""
    add = _private(graph, index, output)
    if add is not None and add.op == "Add":
        b_value = params.get(_other(add, output))
        if b_value is not None and b_value.dtype.name == "float32" and b_value.shape == (weights.shape[1],):
            nodes, bias = nodes + [add], _other(add, output)
    return nodes, quantize, [quantize.inputs[0], b, w_scale, b_zero, bias]


def fuse_dynamic_matmul(graph: Graph, *, per_token: bool = False) -> Graph:
    """Rewrite each DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(Mul(x_scale, W_scale)) [-> Add(bias)]
    chain into one ``com.microsoft.DynamicQuantizeMatMul`` (see the module docstring for the conditions); where one
    DynamicQuantizeLinear feeds several such products, they share it as ``com.microsoft.MatMulIntegerToFloat``
    nodes instead (one quantization, as ONNX Runtime's optimizer does). With ``per_token`` every product quantizes
    each row of its own input (attribute ``per_row=1``), so none is shared."""
    out = graph.copy()
    index = out.index()
    matches = [found for node in out.nodes if node.op == "MatMulInteger"
               for found in [_match(out, index, node)] if found is not None]
    products = Counter(id(quantize) for _, quantize, _ in matches)
    replaced: dict[int, Node | None] = {}  # id(node) -> the fused node taking its place, or None (removed)
    quantizers = {}
    for nodes, quantize, inputs in matches:
        if products[id(quantize)] > 1 and not per_token:
            x, b, w_scale, b_zero, bias = inputs
            codes, a_scale, zero = quantize.outputs[:3]
            op, inputs = "com.microsoft.MatMulIntegerToFloat", [codes, b, a_scale, w_scale, zero, b_zero, bias]
        else:
            op = "com.microsoft.DynamicQuantizeMatMul"
        while inputs and not inputs[-1]:
            inputs.pop()
        fused = Node(op, inputs, [nodes[-1].outputs[0]], {"per_row": 1} if per_token else {},
                     f"{nodes[0].name}_dynamic_matmul")
        replaced.update({id(n): None for n in nodes})
        replaced[id(nodes[-1])] = fused  # the last node's place keeps the topological order
        quantizers[id(quantize)] = quantize
    if per_token:  # the model's own DynamicQuantizeMatMul nodes too
        for node in out.nodes:
            if node.op == "com.microsoft.DynamicQuantizeMatMul" and id(node) not in replaced:
                replaced[id(node)] = Node(node.op, list(node.inputs), list(node.outputs),
                                          {**node.attrs, "per_row": 1}, node.name)
    if not replaced:
        return out
    out.nodes = [replaced.get(id(n), n) for n in out.nodes]
    out.nodes = [n for n in out.nodes if n is not None]
    read = {t for n in out.nodes for t in n.inputs} | set(out.outputs)
    out.nodes = [n for n in out.nodes if id(n) not in quantizers or any(t in read for t in n.outputs)]
    out.opset.setdefault("com.microsoft", 1)
    return out
