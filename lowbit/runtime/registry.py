"""How the runtime turns a node into something it can run: one preparer per op name.

A *preparer* is registered for an op with :func:`preparer` and called once per
node when a session is prepared, with the node, the graph (for its ``params``)
and the shapes and dtypes of the node's inputs for this batch size. It returns a
:class:`Kernel`: everything that can be done ahead (weights packed, batch norm
folded, layouts chosen, scales fixed) is done then, so a call only computes.

``kernel(inputs, outs)`` reads the input arrays and writes each output into the
preallocated array ``outs[i]`` (shapes and dtypes as ``kernel.outputs`` says:
the session plans and reuses those buffers); it may return other arrays
instead (for instance a view of an input, for Reshape), and the session then
uses those. A kernel that is one call of a compiled function also gives it as
its ``entry`` (:mod:`kernels.entry`): a session then chains such nodes into
one compiled function (:mod:`lowbit.runtime.compiled`).

No tensor may be larger than the machine's memory (:func:`check_size`): a few bytes of model (a shape
constant, a pad) can ask for terabytes, and that request gets a ValueError naming the node before anything
is allocated, not a MemoryError or the kernel's out-of-memory killer halfway through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kernels.entry import Entry
from lowbit.graph.ir import Graph, Node

Shape = tuple[int, ...]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: no bound below NumPy's own
        return 1 << 62


#: The largest tensor a node may compute, in bytes: the machine's physical memory.
MAX_TENSOR_BYTES = _physical_memory()


def check_size(node: Node, shape: Shape, dtype: np.dtype | type) -> None:
    """Raise ValueError, naming ``node``, when a tensor of ``shape`` and ``dtype`` would not fit in memory."""
    nbytes = np.dtype(dtype).itemsize
    for d in shape:
        nbytes *= int(d)
    if nbytes > MAX_TENSOR_BYTES:
        raise ValueError(f"node {node.name!r} ({node.op}): an output of {list(shape)} {np.dtype(dtype)} would take "
                         f"{nbytes / 2**30:.3g} GiB, more than this machine's memory "
                         f"({MAX_TENSOR_BYTES / 2**30:.3g} GiB); check the model's shapes")


@dataclass
class Kernel:
    """A node prepared for fixed input shapes."""

    run: Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray] | None]
    outputs: list[tuple[Shape, np.dtype]]  # shape and dtype of each output
    ops: int = 0  # arithmetic operations per call (a multiply-add counts 2), for the profile's GOPS
    precision: str = "float32"  # what it computes in: float32, int8, int4, ternary, binary
    note: str = ""  # shown in the profile (e.g. which kernel, or why it fell back to float)
    fallback: Kernel | None = None  # the same outputs computed in float; a session keeps the faster of the two
    entry: Entry | None = None  # the same call as one compiled function's call, for a session to chain unchecked

    def __call__(self, inputs: list[np.ndarray], outs: list[np.ndarray]) -> list[np.ndarray]:
        result = self.run(inputs, outs)
        return outs if result is None else result


Preparer = Callable[[Node, Graph, list[tuple[Shape, np.dtype]]], Kernel]
PREPARERS: dict[str, Preparer] = {}


def preparer(*ops: str) -> Callable[[Preparer], Preparer]:
    """Register the decorated function as the preparer of ``ops``."""

    def register(fn: Preparer) -> Preparer:
        for op in ops:
            if op in PREPARERS:
                raise ValueError(f"op {op!r} already has a preparer: {PREPARERS[op].__qualname__}")
            PREPARERS[op] = fn
        return fn

    return register


def prepare(node: Node, graph: Graph, inputs: list[tuple[Shape, np.dtype]]) -> Kernel:
    """The kernel of ``node`` for inputs of these shapes and dtypes."""
    fn = PREPARERS.get(node.op)
    if fn is None:
        raise NotImplementedError(f"node {node.name!r}: op {node.op!r} is not supported; supported: "
                                  f"{sorted(PREPARERS)}")
    return fn(node, graph, inputs)
