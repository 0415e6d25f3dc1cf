"""Channels-last regions: runs of integer ops computed NHWC, with one Transpose where a tensor enters or leaves.

ONNX activations are NCHW, but the int8 convolution kernels work channels-last: a QLinearConv on NCHW transposes
its input and its output around the kernel. :func:`nhwc_chains` finds the connected regions of ops that can work
NHWC, marks them with the lowbit attribute ``layout="NHWC"``, and puts one ``Transpose`` on each tensor that crosses
a region's border, so a chain of convolutions transposes once at each end instead of twice per layer.

Ops of a region (every one reads and writes 4-D tensors, so each keeps its meaning on NHWC data):

* ``QLinearConv`` with 4-D weights that are parameters (plain, depthwise, 1x1), whose input is not a parameter;
* on codes (uint8 / int8) written inside the region: ``MaxPool`` (without Indices), ``Relu``, ``Clip``,
  ``com.microsoft.QLinearSigmoid`` / ``QLinearLeakyRelu`` (elementwise), ``com.microsoft.QLinearGlobalAveragePool``
  / ``QLinearAveragePool`` (they get ``channels_last=1``, ONNX Runtime's attribute), ``DequantizeLinear`` per tensor;
* ``com.microsoft.QLinearAdd`` / ``QLinearMul`` whose two inputs are both written inside the region: both 4-D and
  permuted alike, so their broadcasting is the same NHWC (an operand from outside, a constant of another rank
  for instance, keeps the node out);
* ``QuantizeLinear`` per tensor of a region's DequantizeLinear output.

A region grows forward only, from its convolutions: an op joins when its inputs come from the region, never
because its output feeds it (an entry transpose before a QuantizeLinear or MaxPool would move more bytes than
one after). A DequantizeLinear stays only when all its readers are QuantizeLinears of the region (its floats
would cross the border at four times the bytes of its codes), and such a QuantizeLinear only with its
DequantizeLinear. A region without a QLinearConv is left as it was.

Tensors computed inside a region are NHWC under new names (``<name>_nhwc``); the original name is written by the
exit Transpose back to NCHW wherever something outside reads it or it is a graph output. A fetch of an inner
tensor that nothing outside reads therefore fails (the name no longer exists) rather than seeing NHWC values.
"""

from __future__ import annotations

from typing import Callable

from lowbit.graph.ir import Graph, GraphIndex, Node

NHWC = "NHWC"
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
#: Pools of ONNX Runtime's contrib ops that read NHWC when their attribute ``channels_last`` is 1.
CHANNELS_LAST = ("com.microsoft.QLinearGlobalAveragePool", "com.microsoft.QLinearAveragePool")
#: Ops of one input on codes, elementwise or windowed over the spatial axes.
ON_CODES = ("MaxPool", "Relu", "Clip", "com.microsoft.QLinearSigmoid", "com.microsoft.QLinearLeakyRelu",
            *CHANNELS_LAST)
BINARY = ("com.microsoft.QLinearAdd", "com.microsoft.QLinearMul")


def data_inputs(node: Node) -> tuple[int, ...]:
    """Positions of ``node``'s activation inputs, which are NHWC inside a region (the others are scalars)."""
    return (0, 3) if node.op in BINARY else (0,)


def _per_tensor(graph: Graph, node: Node) -> bool:
    """Whether a Quantize/DequantizeLinear has one scale and zero point (parameters): elementwise in any layout."""
    scale, zero = (node.inputs[1:3] + [""])[:2]
    return (not node.attrs.get("block_size", 0) and bool(scale)
            and all(t in graph.params and graph.params[t].size == 1 for t in (scale, zero) if t))


def _admits(graph: Graph, node: Node, codes: set[str], floats: set[str]) -> bool:
    """Whether ``node`` may compute NHWC, given the region's tensors written so far (``codes`` / ``floats``)."""
    if node.attrs.get("layout") is not None or len(node.outputs) != 1:
        return False  # already laid out (the pass is idempotent), or MaxPool's Indices
    x = node.inputs[0] if node.inputs else ""
    if node.op == "QLinearConv":
        w = graph.params.get(node.inputs[3]) if len(node.inputs) > 3 else None
        return (x not in graph.params and w is not None and w.ndim == 4
                and all(not t or t in graph.params for t in node.inputs[1:]))
    if node.op in BINARY:
        return len(node.inputs) > 3 and x in codes and node.inputs[3] in codes
    if node.op in CHANNELS_LAST and node.attrs.get("channels_last", 0):
        return False  # its input is NHWC already as ONNX sees it
    if node.op in ON_CODES:
        return x in codes
    if node.op == "DequantizeLinear":
        return x in codes and _per_tensor(graph, node)
    if node.op == "QuantizeLinear":
        return x in floats and _per_tensor(graph, node)
    return False


def _candidates(graph: Graph) -> list[Node]:
    """Every node that can compute NHWC, in graph order (one forward pass: rank 4 and codes are known by then)."""
    codes: set[str] = set()
    floats: set[str] = set()
    found = []
    for node in graph.nodes:
        if _admits(graph, node, codes, floats):
            found.append(node)
            (floats if node.op == "DequantizeLinear" else codes).add(node.outputs[0])
    return found


def _trim_boundary_floats(graph: Graph, index: GraphIndex, nodes: list[Node]) -> list[Node]:
    """``nodes`` without the DequantizeLinears whose floats are read elsewhere than by QuantizeLinears of ``nodes``
    (or are graph outputs), nor the QuantizeLinears of those: floats cross a border at 4 bytes an element."""
    member = {id(n) for n in nodes}
    dropped = set()
    for node in nodes:
        if node.op == "DequantizeLinear":
            y = node.outputs[0]
            readers = index.consumers.get(y, [])
            if y in graph.outputs or not readers or any(r.op != "QuantizeLinear" or id(r) not in member
                                                        for r in readers):
                dropped.add(id(node))
        elif node.op == "QuantizeLinear" and id(index.producer[node.inputs[0]]) in dropped:
            dropped.add(id(node))
    return [n for n in nodes if id(n) not in dropped]


def _regions(index: GraphIndex, nodes: list[Node]) -> list[Node]:
    """The ``nodes`` of the connected regions (linked by the activations they pass) that hold a QLinearConv."""
    parent = {id(n): id(n) for n in nodes}

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for node in nodes:
        for position in data_inputs(node):
            producer = index.producer.get(node.inputs[position])
            if producer is not None and id(producer) in parent:
                parent[root(id(node))] = root(id(producer))
    with_conv = {root(id(n)) for n in nodes if n.op == "QLinearConv"}
    return [n for n in nodes if root(id(n)) in with_conv]


def _reads_nchw(reader: Node, tensor: str, member: set[int]) -> bool:
    """Whether ``reader`` needs ``tensor`` NCHW: it is outside the region, or reads it as other than an activation."""
    if id(reader) not in member:
        return True
    positions = data_inputs(reader)
    return any(t == tensor and i not in positions for i, t in enumerate(reader.inputs))


def _namer(taken: set[str]) -> Callable[[str], str]:
    """A maker of names not in ``taken`` (which it extends): ``stem``, else ``stem_1``, ``stem_2`` ..."""
    def fresh(stem: str) -> str:
        name, k = stem, 0
        while name in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        return name
    return fresh


def nhwc_chains(graph: Graph) -> Graph:
    """``graph`` with its channels-last regions (see the module) computed NHWC: the same values for every graph
    input, output and tensor read outside a region. Pure (the input graph is not modified) and linear in the
    number of nodes."""
    out = graph.copy()
    index = out.index()
    region = _regions(index, _trim_boundary_floats(out, index, _candidates(out)))
    if not region:
        return out
    member = {id(n) for n in region}
    fresh_tensor = _namer(set(out.inputs) | set(out.params) | {t for n in out.nodes for t in n.outputs})
    fresh_node = _namer({n.name for n in out.nodes})
    inner = {n.outputs[0]: fresh_tensor(f"{n.outputs[0]}_nhwc") for n in region}
    entered: dict[str, str] = {}
    nodes = []
    for node in out.nodes:
        if id(node) not in member:
            nodes.append(node)
            continue
        for position in data_inputs(node):
            t = node.inputs[position]
            if t not in inner and t not in entered:
                entered[t] = fresh_tensor(f"{t}_nhwc")
                nodes.append(Node("Transpose", [t], [entered[t]], {"perm": TO_NHWC}, fresh_node(f"{t}_to_nhwc")))
            node.inputs[position] = inner.get(t) or entered[t]
        y = node.outputs[0]
        node.outputs[0] = inner[y]
        node.attrs["layout"] = NHWC
        if node.op in CHANNELS_LAST:
            node.attrs["channels_last"] = 1
        nodes.append(node)
        if y in out.outputs or any(_reads_nchw(r, y, member) for r in index.consumers.get(y, [])):
            nodes.append(Node("Transpose", [inner[y]], [y], {"perm": TO_NCHW}, fresh_node(f"{y}_to_nchw")))
    out.nodes = nodes
    return out.validate()
