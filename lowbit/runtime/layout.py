"""Channels-last regions: runs of ops computed NHWC, with one Transpose where a tensor enters or leaves.

ONNX activations are NCHW, but the int8 convolution kernels and the float32 register-tile ones work channels-last:
a convolution on NCHW transposes its input and its output around the kernel. :func:`nhwc_chains` finds the
connected regions of ops that can work NHWC, marks them with the lowbit attribute ``layout="NHWC"``, and puts one
``Transpose`` on each tensor that crosses a region's border, so a chain of convolutions transposes once at each end
instead of twice per layer. Every op of a region reads and writes 4-D tensors (its convolutions' weights are 4-D
and each other op keeps the rank), so each keeps its meaning on NHWC data.

Integer regions hold quantized codes:

* ``QLinearConv`` with 4-D weights that are parameters (plain, depthwise, 1x1), whose input is not a parameter;
* on codes (uint8 / int8) written inside the region: ``MaxPool`` (without Indices), ``Relu``, ``Clip``,
  ``com.microsoft.QLinearSigmoid`` / ``QLinearLeakyRelu`` (elementwise), ``com.microsoft.QLinearGlobalAveragePool``
  / ``QLinearAveragePool`` (they get ``channels_last=1``, ONNX Runtime's attribute), ``DequantizeLinear`` per tensor;
* ``com.microsoft.QLinearAdd`` / ``QLinearMul`` whose two inputs are both written inside the region: both 4-D and
  permuted alike, so their broadcasting is the same NHWC (an operand from outside, a constant of another rank
  for instance, keeps the node out);
* ``QuantizeLinear`` per tensor of a region's DequantizeLinear output.

A DequantizeLinear stays only when all its readers are QuantizeLinears of the region (its floats would cross the
border at four times the bytes of its codes), and such a QuantizeLinear only with its DequantizeLinear.

Float regions hold float activations:

* ``Conv`` with 4-D float32 weights (and bias, if any) that are parameters, whose input is not a parameter, where
  ``kernels.dispatch`` picks the register-tile kernel ("avx512" for "conv_float32"; elsewhere the convolution
  runs im2col + BLAS on NCHW, and the graph stays NCHW);
* on floats written inside the region: ``Relu``, ``LeakyRelu``, ``Sigmoid``, ``HardSigmoid``, ``HardSwish`` and
  ``Clip`` with constant bounds (elementwise), ``MaxPool`` (without Indices), ``AveragePool``,
  ``GlobalAveragePool`` / ``GlobalMaxPool`` (``[N, 1, 1, C]`` out), ``BatchNormalization`` with constant
  statistics (per channel: the last axis);
* ``Add`` / ``Mul`` / ``Sub`` whose two inputs are both written inside the region (as QLinearAdd above).

Codes and floats never share a region: integer ops join only on codes (or a region's DequantizeLinear floats),
float ops only on floats written by float ops. A region grows forward only, from its convolutions: an op joins when
its inputs come from the region, never because its output feeds it (an entry transpose before a QuantizeLinear or
MaxPool would move more bytes than one after). A region is left as it was unless it holds a QLinearConv, or two
float Convs: a lone float convolution runs faster NCHW than between two transposes (measured at batch 32: by 10%
to 2x), where the int8 kernels work channels-last only.

Tensors computed inside a region are NHWC under new names (``<name>_nhwc``); the original name is written by the
exit Transpose back to NCHW wherever something outside reads it or it is a graph output (the exit of a global
pool's ``[N, 1, 1, C]`` is a view: its bytes are already NCHW's). A fetch of an inner tensor that nothing outside
reads therefore fails (the name no longer exists) rather than seeing NHWC values.
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np

from kernels import dispatch
from lowbit.graph.ir import Graph, GraphIndex, Node, fresh_name

NHWC = "NHWC"
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
#: Pools of ONNX Runtime's contrib ops that read NHWC when their attribute ``channels_last`` is 1.
CHANNELS_LAST = ("com.microsoft.QLinearGlobalAveragePool", "com.microsoft.QLinearAveragePool")
#: Ops of one input on codes, elementwise or windowed over the spatial axes.
ON_CODES = ("MaxPool", "Relu", "Clip", "com.microsoft.QLinearSigmoid", "com.microsoft.QLinearLeakyRelu",
            *CHANNELS_LAST)
BINARY = ("com.microsoft.QLinearAdd", "com.microsoft.QLinearMul")
#: Ops of one input on floats, elementwise (Clip: when its bounds are constants) or over the spatial axes.
ON_FLOATS = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "MaxPool", "AveragePool",
             "GlobalAveragePool", "GlobalMaxPool")
FLOAT_BINARY = ("Add", "Mul", "Sub")
#: The convolutions a region needs to pay for its border transposes (see the module docstring).
MIN_CONVOLUTIONS = {"QLinearConv": 1, "Conv": 2}
#: What a region's tensors hold: quantized codes, the floats of a DequantizeLinear of them, floats of a float region.
CODES, DEQUANTIZED, FLOATS = "codes", "dequantized", "floats"


def data_inputs(node: Node) -> tuple[int, ...]:
    """Positions of ``node``'s activation inputs, which are NHWC inside a region (the others are scalars)."""
    return (0, 3) if node.op in BINARY else (0, 1) if node.op in FLOAT_BINARY else (0,)


def _per_tensor(graph: Graph, node: Node) -> bool:
    """Whether a Quantize/DequantizeLinear has one scale and zero point (parameters): elementwise in any layout."""
    scale, zero = (node.inputs[1:3] + [""])[:2]
    return (not node.attrs.get("block_size", 0) and bool(scale)
            and all(t in graph.params and graph.params[t].size == 1 for t in (scale, zero) if t))


def _constants(graph: Graph, node: Node, positions: range) -> bool:
    """Whether the inputs of ``node`` at ``positions`` are parameters or absent."""
    return all(not t or t in graph.params for t in node.inputs[positions.start:positions.stop])


def _float_conv(graph: Graph, node: Node) -> bool:
    """Whether a Conv runs on ``kernels.conv2d_float32_plan`` (see ``lowbit.runtime.float_ops``): 2-D, float32
    weights and bias that are parameters, and the register tiles picked by ``kernels.dispatch`` (asked with the
    weights' sizes: the pixel count is not known before the shapes are)."""
    w = graph.params.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.inputs[0] in graph.params or w is None or w.ndim != 4 or w.dtype != np.float32:
        return False
    return _constants(graph, node, range(2, 3)) and dispatch.choose("conv_float32", 1, w.shape[0],
                                                                     w[0].size).kind == "avx512"


def _joins(graph: Graph, node: Node, written: dict[str, set[str]]) -> str | None:
    """What ``node``'s output holds (:data:`CODES`, :data:`DEQUANTIZED`, :data:`FLOATS`) when it may compute NHWC,
    given the region's tensors written so far (``written``: kind -> tensors); None when it may not."""
    if node.attrs.get("layout") is not None or len(node.outputs) != 1:
        return None  # already laid out (the pass is idempotent), or MaxPool's Indices
    x = node.inputs[0] if node.inputs else ""
    codes, floats = written[CODES], written[FLOATS]
    if node.op == "QLinearConv":
        w = graph.params.get(node.inputs[3]) if len(node.inputs) > 3 else None
        return CODES if (x not in graph.params and w is not None and w.ndim == 4
                         and _constants(graph, node, range(1, len(node.inputs)))) else None
    if node.op == "Conv":
        return FLOATS if _float_conv(graph, node) else None
    if node.op in BINARY:
        return CODES if len(node.inputs) > 3 and x in codes and node.inputs[3] in codes else None
    if node.op in FLOAT_BINARY:
        return FLOATS if x in floats and node.inputs[1] in floats else None
    if node.op in CHANNELS_LAST and node.attrs.get("channels_last", 0):
        return None  # its input is NHWC already as ONNX sees it
    if node.op in ON_CODES and x in codes:
        return CODES
    if node.op in ON_FLOATS or (node.op == "Clip" and _constants(graph, node, range(1, 3))):
        return FLOATS if x in floats else None
    if node.op == "BatchNormalization":
        inference = not node.attrs.get("training_mode", 0) and len(node.inputs) == 5
        return FLOATS if x in floats and inference and _constants(graph, node, range(1, 5)) else None
    if node.op == "DequantizeLinear":
        return DEQUANTIZED if x in codes and _per_tensor(graph, node) else None
    if node.op == "QuantizeLinear":
        return CODES if x in written[DEQUANTIZED] and _per_tensor(graph, node) else None
    return None


def _candidates(graph: Graph) -> list[Node]:
    """Every node that can compute NHWC, in graph order (one forward pass: rank 4 and codes are known by then)."""
    written: dict[str, set[str]] = {CODES: set(), DEQUANTIZED: set(), FLOATS: set()}
    found = []
    for node in graph.nodes:
        kind = _joins(graph, node, written)
        if kind is not None:
            found.append(node)
            written[kind].add(node.outputs[0])
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
    """The ``nodes`` of the connected regions (linked by the activations they pass) that hold enough convolutions
    (:data:`MIN_CONVOLUTIONS`)."""
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
    convolutions = collections.Counter((root(id(n)), n.op) for n in nodes if n.op in MIN_CONVOLUTIONS)
    kept = {r for (r, op), count in convolutions.items() if count >= MIN_CONVOLUTIONS[op]}
    return [n for n in nodes if root(id(n)) in kept]


def _reads_nchw(reader: Node, tensor: str, member: set[int]) -> bool:
    """Whether ``reader`` needs ``tensor`` NCHW: it is outside the region, or reads it as other than an activation."""
    if id(reader) not in member:
        return True
    positions = data_inputs(reader)
    return any(t == tensor and i not in positions for i, t in enumerate(reader.inputs))


def _namer(taken: set[str]) -> Callable[[str], str]:
    """A maker of names not in ``taken`` (which it extends): ``stem``, else ``stem_1``, ``stem_2`` ..."""
    return lambda stem: fresh_name(stem, taken)


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
