"""Layout transposes merged into the quantization next to them: one pass over memory instead of two.

:func:`lowbit.runtime.layout.nhwc_chains` puts a ``Transpose(perm=[0, 2, 3, 1])`` where an NCHW tensor enters a
channels-last region. When that tensor is the codes of a per-tensor ``QuantizeLinear`` (a CNN's input
quantization) and the Transpose is their only reader, the pair becomes one node::

    QuantizeLinear(x, s, z) -> q;  Transpose(q, perm=[0, 2, ..., 1]) -> q_nhwc
        =>  lowbit.QuantizeToNHWC(x, s, z) -> q_nhwc        (the QuantizeLinear's name and attributes)

which reads the floats once and writes the codes once, channels last (``kernels.quantize_linear_to_nhwc``;
preparer in :mod:`lowbit.runtime.quant_ops`). The codes ``q`` stop existing as a tensor, so the pass leaves the
pair alone when ``q`` is a graph output or read by anything else.
"""

from __future__ import annotations

from lowbit.graph.ir import Graph, Node
from lowbit.runtime.layout import _per_tensor

FUSED_QUANTIZE = "lowbit.QuantizeToNHWC"


def channels_last_perm(rank: int) -> list[int]:
    """The Transpose ``perm`` that moves axis 1 (channels) last: ``[0, 2, 3, 1]`` for NCHW to NHWC."""
    return [0, *range(2, rank), 1]


def _channels_last(node: Node) -> bool:
    """Whether ``node`` is a Transpose moving axis 1 last and keeping the others in order (rank >= 3)."""
    perm = node.attrs.get("perm")
    return (node.op == "Transpose" and perm is not None and len(perm) >= 3
            and list(perm) == channels_last_perm(len(perm)))


def fuse_layout_transposes(graph: Graph) -> Graph:
    """``graph`` with each per-tensor QuantizeLinear whose only reader is a channels-last Transpose merged with it
    into one ``lowbit.QuantizeToNHWC`` (see the module). Pure (the input graph is not modified), linear in the
    number of nodes, idempotent, and the same values for every graph output."""
    out = graph.copy()
    index = out.index()
    dropped: set[int] = set()
    for node in out.nodes:
        if node.op != "QuantizeLinear" or not _per_tensor(out, node) or node.outputs[0] in out.outputs:
            continue
        readers = index.consumers.get(node.outputs[0], [])
        if len(readers) != 1 or not _channels_last(readers[0]) or readers[0].inputs[0] != node.outputs[0]:
            continue
        node.op, node.outputs = FUSED_QUANTIZE, list(readers[0].outputs)
        dropped.add(id(readers[0]))
    out.nodes = [n for n in out.nodes if id(n) not in dropped]
    return out.validate()
