"""Running a graph: :class:`Session` prepares every node once per set of input shapes, plans buffers, executes.

Preparing for new input shapes (cached per shape tuple):

1. shapes and dtypes flow node by node through the preparers (each
   :class:`~lowbit.runtime.registry.Kernel` says what it outputs);
2. one dry run on zero-filled inputs records which outputs are views of an
   input (Reshape, Flatten), and, for a kernel carrying a float ``fallback``,
   times both (best of 3 after a warm-up) and keeps the faster;
3. per set of fetched tensors, buffers are planned by liveness: an
   intermediate's buffer returns to a pool (keyed by element count and dtype)
   once the last reader of it, or of any view of it, has run, and a later tensor
   of the same size and dtype takes it. Fetched tensors (by default the graph's
   outputs) are never reused;
4. a graph with static int8 chains (QuantizeLinear ... DequantizeLinear) also gets
   a float twin (:func:`~lowbit.runtime.passes.float_twin`: the chains in float32,
   Q/DQ dropped, so their boundary cost counts too); both are timed on the feeds
   (best of 7, interleaved) and the faster one runs, so a quantized graph is never
   slower than float. The profile's notes say which ran and why.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

import kernels
from lowbit.blas import blas_limit
from lowbit.graph.ir import Graph
from lowbit.runtime import float_ops, quant_ops
from lowbit.runtime.passes import float_twin, fold_batch_norm, fuse_activations
from lowbit.runtime.profile import Profile
from lowbit.runtime.registry import Kernel, Shape, prepare

OP_MODULES = (float_ops, quant_ops)  # importing them registers their preparers

Spec = tuple[Shape, np.dtype]


def _best_seconds(kernel: Kernel, inputs: list, outs: list[np.ndarray], repeat: int = 3) -> float:
    """Best of ``repeat`` timed calls after one warm-up call."""
    kernel(inputs, outs)
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        kernel(inputs, outs)
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class _Prepared:
    """Kernels for one set of input shapes, with the dry run's findings."""

    kernels: list[Kernel]
    specs: dict[str, Spec]
    root: dict[str, str]  # tensor -> the tensor whose memory it views (itself if none)


@dataclass
class _Plan:
    """Output buffers per node for one (input shapes, fetch) pair."""

    outs: list[list[np.ndarray]] = field(repr=False)
    buffers: int = 0
    nbytes: int = 0
    fetch: list[str] = field(default_factory=list)


class Session:
    """Run ``graph`` on NumPy feeds.

    Parameters
    ----------
    graph : Graph, copied (the caller's graph is not modified)
    threads : int >= 1, optional; the kernels' thread count (``kernels.set_num_threads``) for each run, and
        NumPy's BLAS threads too when threadpoolctl is installed
    fallback : bool, default True; let a kernel with a float ``fallback`` be replaced by it when that is faster
    optimize : bool, default True; fold batch norms and fuse activations first (their intermediate tensors
        then no longer exist and cannot be fetched)
    """

    def __init__(self, graph: Graph, *, threads: int | None = None, fallback: bool = True, optimize: bool = True):
        if not isinstance(graph, Graph):
            raise TypeError(f"graph: expected a lowbit.graph.Graph, got {type(graph).__name__}")
        if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool)
                                    or threads < 1):
            raise ValueError(f"threads: expected an int >= 1 or None, got {threads!r}")
        source = graph.copy().validate()
        self._source_tensors = {t for n in source.nodes for t in n.outputs}
        self.graph = fuse_activations(fold_batch_norm(source)) if optimize else source
        self.graph.validate()
        self.threads = None if threads is None else int(threads)
        self.fallback = bool(fallback)
        self._tensors = set(self.graph.inputs) | set(self.graph.params) | {t for n in self.graph.nodes
                                                                            for t in n.outputs}
        twin = float_twin(self.graph) if self.fallback else None
        self._twin = None if twin is None else Session(twin, threads=threads, fallback=fallback, optimize=False)
        self._twin_chosen: dict[tuple, str | None] = {}  # input shapes -> the note when the twin runs, else None
        self._prepared: dict[tuple, _Prepared] = {}
        self._plans: dict[tuple, _Plan] = {}
        self.notes: dict[str, str] = {}  # node name -> note of the kernel chosen at the last preparation

    def _limit(self) -> contextlib.AbstractContextManager:
        """Hold the kernels (and BLAS, see :func:`_blas_limit`) to ``threads`` when it was given."""
        if self.threads is not None:
            kernels.set_num_threads(self.threads)
        return blas_limit(self.threads)

    # ---- feeds -----------------------------------------------------------------------------------------------------

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, dict):
            raise TypeError(f"feeds: expected a dict of input name -> ndarray, got {type(feeds).__name__}")
        missing = [n for n in self.graph.inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self.graph.inputs]
        if missing or unknown:
            raise ValueError(f"feeds: missing inputs {missing}, unknown names {unknown}; the graph's inputs are "
                             f"{list(self.graph.inputs)}")
        checked = {}
        for name, spec in self.graph.inputs.items():
            x = feeds[name]
            if not isinstance(x, np.ndarray):
                raise TypeError(f"feeds[{name!r}]: expected an ndarray, got {type(x).__name__}")
            if x.dtype != np.dtype(spec.dtype):
                raise TypeError(f"feeds[{name!r}]: expected dtype {spec.dtype}, got {x.dtype}")
            if not spec.matches(x):
                raise ValueError(f"feeds[{name!r}]: expected shape {spec.shape} (None: any), got {x.shape}")
            checked[name] = np.ascontiguousarray(x)
        return checked

    def _check_fetch(self, fetch: list[str] | None) -> list[str]:
        if fetch is None:
            return list(self.graph.outputs)
        if isinstance(fetch, str) or not all(isinstance(t, str) for t in fetch):
            raise TypeError(f"fetch: expected a list of tensor names, got {fetch!r}")
        for t in fetch:
            if t not in self._tensors:
                why = (" (removed by batch-norm folding / activation fusion: use Session(..., optimize=False))"
                       if t in self._source_tensors else "")
                raise ValueError(f"fetch: no tensor named {t!r} in the graph{why}")
        return list(dict.fromkeys(fetch))

    # ---- preparation -----------------------------------------------------------------------------------------------

    def _prepare(self, feeds: dict[str, np.ndarray]) -> _Prepared:
        key = tuple((n, x.shape) for n, x in feeds.items())
        if key in self._prepared:
            return self._prepared[key]
        graph = self.graph
        specs: dict[str, Spec] = {n: (p.shape, p.dtype) for n, p in graph.params.items()}
        specs.update((n, (x.shape, x.dtype)) for n, x in feeds.items())
        values: dict[str, np.ndarray] = {n: np.zeros(x.shape, x.dtype) for n, x in feeds.items()}
        values.update(graph.params)
        root = {n: n for n in feeds}
        chosen, self.notes = [], {}
        for node in graph.nodes:
            kernel = prepare(node, graph, [specs[t] if t else None for t in node.inputs])
            if len(kernel.outputs) != len(node.outputs):
                raise ValueError(f"node {node.name!r} ({node.op}): the kernel declares {len(kernel.outputs)} outputs, "
                                 f"the node has {len(node.outputs)}")
            ins = [values[t] if t else None for t in node.inputs]
            outs = [np.zeros(shape, dtype) for shape, dtype in kernel.outputs]
            if kernel.fallback is not None and self.fallback:
                kernel = self._faster(kernel, ins, outs)
            results = kernel(ins, outs)
            for t, r, (shape, dtype) in zip(node.outputs, results, kernel.outputs):
                if r.shape != tuple(shape) or r.dtype != np.dtype(dtype):
                    raise ValueError(f"node {node.name!r} ({node.op}): output {t!r} is {r.shape} {r.dtype}, "
                                     f"the kernel declared {tuple(shape)} {np.dtype(dtype)}")
                specs[t], values[t] = (tuple(shape), np.dtype(dtype)), r
                viewed = [root[s] for s, x in zip(node.inputs, ins)
                          if s in root and x is not None and np.may_share_memory(r, x)]
                root[t] = viewed[0] if viewed else t
            chosen.append(kernel)
            self.notes[node.name] = kernel.note
        prepared = self._prepared[key] = _Prepared(chosen, specs, root)
        return prepared

    @staticmethod
    def _faster(kernel: Kernel, ins: list, outs: list[np.ndarray]) -> Kernel:
        """``kernel`` or its float fallback, whichever is faster on these inputs; the note says what was chosen."""
        fallback = kernel.fallback
        specs = [[(tuple(s), np.dtype(d)) for s, d in k.outputs] for k in (kernel, fallback)]
        if specs[0] != specs[1]:
            raise ValueError(f"kernel fallback declares outputs {fallback.outputs}, the kernel {kernel.outputs}")
        own, other = _best_seconds(kernel, ins, outs), _best_seconds(fallback, ins, outs)
        if other < own:
            note = f"fell back to float: {kernel.precision} {1e3 * own:.2f} ms > float {1e3 * other:.2f} ms"
            return Kernel(fallback.run, fallback.outputs, fallback.ops, fallback.precision, note)
        note = f"{kernel.note}; " if kernel.note else ""
        return Kernel(kernel.run, kernel.outputs, kernel.ops, kernel.precision,
                      f"{note}{kernel.precision} {1e3 * own:.2f} ms < float {1e3 * other:.2f} ms")

    def _plan(self, key: tuple, prepared: _Prepared, fetch: list[str]) -> _Plan:
        plan_key = (key, tuple(sorted(fetch)))
        if plan_key in self._plans:
            return self._plans[plan_key]
        nodes, root = self.graph.nodes, prepared.root
        last = {}  # root tensor -> index of the last node reading it or a view of it
        for i, node in enumerate(nodes):
            for t in node.inputs:
                if t in root:
                    last[root[t]] = i
        pinned = {root[t] for t in fetch if t in root}
        pool: dict[tuple[int, np.dtype], list[np.ndarray]] = {}
        flat_of: dict[str, np.ndarray] = {}
        plan = _Plan([], fetch=fetch)

        def release(t: str) -> None:
            flat = flat_of.pop(t)
            pool.setdefault((flat.size, flat.dtype), []).append(flat)

        for i, node in enumerate(nodes):
            outs = []
            for t in node.outputs:
                shape, dtype = prepared.specs[t]
                size = int(np.prod(shape, dtype=np.int64))
                free = pool.get((size, dtype))
                if not free:
                    free = [np.empty(size, dtype)]
                    plan.buffers += 1
                    plan.nbytes += free[0].nbytes
                flat_of[t] = free.pop()
                outs.append(flat_of[t].reshape(shape))
            plan.outs.append(outs)
            for t in node.outputs:  # a view of an input leaves its own buffer unused; an unread output is dead
                if root[t] != t or (t not in last and t not in pinned):
                    release(t)
            for t in {root[s] for s in node.inputs if s in root}:
                if last[t] == i and t not in pinned and t in flat_of:
                    release(t)
        self._plans[plan_key] = plan
        return plan

    # ---- execution -------------------------------------------------------------------------------------------------

    def _execute(self, feeds: dict[str, np.ndarray], fetch: list[str] | None, timings: list[float] | None = None
                 ) -> tuple[dict[str, np.ndarray], _Prepared]:
        feeds = self._check_feeds(feeds)
        fetch = self._check_fetch(fetch)
        key = tuple((n, x.shape) for n, x in feeds.items())
        prepared = self._prepared.get(key)
        if prepared is None:
            with self._limit():
                prepared = self._prepare(feeds)
        plan = self._plans.get((key, tuple(sorted(fetch)))) or self._plan(key, prepared, fetch)
        values: dict[str, np.ndarray] = dict(self.graph.params)
        values.update(feeds)
        clock = time.perf_counter
        with self._limit():
            for i, (node, kernel, outs) in enumerate(zip(self.graph.nodes, prepared.kernels, plan.outs)):
                ins = [values[t] if t else None for t in node.inputs]
                if timings is None:
                    results = kernel.run(ins, outs)
                else:
                    start = clock()
                    results = kernel.run(ins, outs)
                    timings[i] = min(timings[i], clock() - start)
                values.update(zip(node.outputs, outs if results is None else results))
        return {t: np.array(values[t], copy=True) for t in fetch}, prepared

    def _twin_for(self, feeds: dict[str, np.ndarray], fetch: list[str] | None) -> str | None:
        """The note saying why the float twin runs for these feeds (deciding once per input shapes), else None."""
        if self._twin is None or not isinstance(feeds, dict):
            return None
        key = tuple((n, getattr(x, "shape", None)) for n, x in feeds.items())
        if key not in self._twin_chosen:
            own, twin = self._execute, self._twin._execute
            own(feeds, None), twin(feeds, None)  # prepare both
            best = [np.inf, np.inf]
            for _ in range(7):
                for i, fn in enumerate((own, twin)):
                    start = time.perf_counter()
                    fn(feeds, None)
                    best[i] = min(best[i], time.perf_counter() - start)
            self._twin_chosen[key] = (f"fell back to float: the int8 graph {1e3 * best[0]:.2f} ms > its float twin "
                                      f"{1e3 * best[1]:.2f} ms (Q/DQ dropped)") if best[1] < best[0] else None
        chosen = self._twin_chosen[key]
        if chosen is None or not set(fetch or ()) <= self._twin._tensors:
            return None
        return chosen

    def run(self, feeds: dict[str, np.ndarray], fetch: list[str] | None = None) -> dict[str, np.ndarray]:
        """Compute ``fetch`` (tensor names; default the graph's outputs) from ``feeds`` (input name -> ndarray).

        Returns name -> a copy of the tensor, which the caller may keep and modify.
        """
        if self._twin_for(feeds, fetch) is not None:
            return self._twin._execute(feeds, fetch)[0]
        return self._execute(feeds, fetch)[0]

    def profile(self, feeds: dict[str, np.ndarray], repeat: int = 5) -> Profile:
        """Time every node: the best of ``repeat`` runs (after one warm-up run) per node."""
        if not isinstance(repeat, (int, np.integer)) or isinstance(repeat, bool) or repeat < 1:
            raise ValueError(f"repeat: expected an int >= 1, got {repeat!r}")
        self.run(feeds)
        twin_note = self._twin_for(feeds, None)
        session = self if twin_note is None else self._twin
        timings = [np.inf] * len(session.graph.nodes)
        for _ in range(repeat):
            prepared = session._execute(feeds, None, timings)[1]
        return Profile.from_timings([(node.name, node.op, kernel.precision, sec, kernel.ops,
                                      kernel.note if twin_note is None else f"{twin_note}; {kernel.note}".rstrip("; "))
                                     for node, kernel, sec in zip(session.graph.nodes, prepared.kernels, timings)])
