"""Running a graph: :class:`Session` prepares every node once per set of input shapes, plans buffers, executes.

Preparing for new input shapes (cached per shape tuple, for at most :data:`MAX_SHAPES` shape tuples):

1. shapes and dtypes flow node by node through the preparers (each
   :class:`~lowbit.runtime.registry.Kernel` says what it outputs); a node whose inputs are all
   constants for these shapes (parameters, earlier folded values, or the input of a ``Shape`` / ``Size``)
   is evaluated once (:mod:`lowbit.runtime.evaluators`) and its outputs join the parameters that later
   preparers read, so the shape arithmetic exporters emit (Shape, Gather, Concat, Reshape ...) costs nothing
   per run. An input whose values decide a shape (a Reshape target fed at run time) is a constant too: its
   values join the shape tuple as the cache key;
2. one dry run on zero-filled inputs records which outputs are views of an
   input (Reshape, Flatten), and, for a kernel carrying a float ``fallback``,
   races both (:func:`_race`: interleaved, best of up to :data:`RACE_ROUNDS`) and keeps the faster;
3. per set of fetched tensors, buffers are planned by liveness: an
   intermediate's byte buffer returns to a pool once the last reader of it, or
   of any view of it, has run, and a later tensor of any dtype takes the smallest
   free buffer it fits in (the most recently freed one, still in cache, among equals).
   Fetched tensors (by default the graph's outputs) are never reused. The plan is flat (one step per node, inputs
   resolved to slots) so a run is one loop, after a check of the feeds' shapes
   and dtypes against those already seen;
4. a graph with quantized parts (static int8 chains QuantizeLinear ... DequantizeLinear,
   or weight-only int4 / ternary / dynamic int8 layers) also gets a float twin
   (:func:`~lowbit.runtime.passes.float_twin`: the same layers in float32 on the dequantized
   weights, Q/DQ dropped, so their boundary cost counts too); both whole graphs are raced on
   the feeds and the faster one runs, so a quantized graph is never slower than its float
   version. The profile's notes say which ran and why. With ``fallback=False`` nothing is
   raced: the quantized kernels always run.

Given a thread count (``threads=n``), a session chains runs of consecutive nodes whose kernels give an ``entry``
(one call of a compiled function, :mod:`kernels.entry`) into one compiled function per run of nodes
(:mod:`lowbit.runtime.compiled`, cached on disk), so Python dispatches once per chain instead of once per node;
``Session(..., compiled=False)`` runs node by node, as does a session without a thread count (compiling a chain
takes seconds the first time, which a session for quick use should not pay).
With more than one thread, a chain with split or team entries is made for a team: every thread enters it once
and shares out each node (:mod:`kernels.entry`), with barriers between the nodes, instead of waking pool threads (and
passing the GIL) at every node; the first run races it on the team against one thread and keeps the faster.
Profiles always time node by node.

A session may be called from many threads at once. Kernels keep scratch and plans own their buffers, so a run
holds one *lane* (the kernels prepared for its input shapes, with their plans) for itself: a thread that finds
every lane of its shapes busy prepares another, which later runs reuse. Lanes are as many as the most runs seen at
once on those shapes; nothing shared is written on the run path.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numba.core.errors import NumbaError

import kernels
from lowbit.blas import blas_limit
from lowbit.graph.collector import paused
from lowbit.graph.ir import Graph, Node
from kernels.entry import In
from lowbit.runtime import evaluators, float_ops, quant_ops
from lowbit.runtime.compiled import CompiledSteps
from lowbit.runtime.layout import nhwc_chains
from lowbit.runtime.passes import float_twin, fold_batch_norm, fuse_activations
from lowbit.runtime.profile import Profile
from lowbit.runtime.registry import Kernel, Shape, check_size, prepare
from lowbit.runtime.transpose_fusion import fuse_layout_transposes

OP_MODULES = (float_ops, quant_ops, evaluators)  # importing them registers their preparers
#: Ops whose outputs depend only on their input's shape, so they fold once shapes are known.
SHAPE_OPS = ("Shape", "Size")
#: Input-shape tuples a session keeps prepared; a new one beyond this evicts the oldest.
MAX_SHAPES = 16
#: Bytes to which every planned buffer is aligned: one cache line.
ALIGNMENT = 64

Spec = tuple[Shape, np.dtype]
#: Timed rounds when racing candidates (a kernel and its fallback, a graph and its twin): enough for the best
#: of them to be stable on sub-0.1 ms graphs, fewer when one round would exceed :data:`RACE_BUDGET` seconds.
RACE_ROUNDS = 21
RACE_BUDGET = 0.5


def _race(candidates: list[Callable[[], object]]) -> list[float]:
    """Best seconds per candidate over interleaved rounds (after one warm-up call each), so noise hits all."""
    clock, first = time.perf_counter, []
    for fn in candidates:
        fn()
        start = clock()
        fn()
        first.append(clock() - start)
    rounds = int(np.clip(RACE_BUDGET / max(sum(first), 1e-9), 3, RACE_ROUNDS))
    best = first
    for _ in range(rounds - 1):
        for i, fn in enumerate(candidates):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def _on_one(chain: CompiledSteps, feeds: list[np.ndarray]) -> None:
    """Run team ``chain`` on one thread."""
    chain.threads, team = 1, chain.threads
    try:
        chain(feeds)
    finally:
        chain.threads = team


def _aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialised bytes starting on a cache line (:data:`ALIGNMENT`): vector loads of a row then
    never straddle two lines (measured: 10-30% on NHWC depthwise layers at NumPy's 16-byte alignment)."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def _foldable(node: Node, constants: dict[str, np.ndarray]) -> bool:
    """Whether ``node`` can be evaluated ahead of every run: it has an evaluator, and its inputs are constants
    (or it reads only its input's shape)."""
    return (node.op in evaluators.EVALUATORS and "activation" not in node.attrs  # lowbit's fused epilogue
            and (node.op in SHAPE_OPS or all(not t or t in constants for t in node.inputs)))


def _folded(results: list[np.ndarray]) -> Kernel:
    """The kernel of a node folded at preparation: it hands out the values computed then."""
    return Kernel(lambda ins, outs: results, [(r.shape, r.dtype) for r in results], note="folded")


@dataclass
class _Prepared:
    """Kernels for one set of input shapes, with the dry run's findings."""

    kernels: list[Kernel]
    specs: dict[str, Spec]
    root: dict[str, str]  # tensor -> the tensor whose memory it views (itself if none)
    folded: dict[int, list[np.ndarray]]  # node index -> its outputs, computed at preparation


Step = tuple[Callable, list, tuple[tuple[int, int], ...], list[np.ndarray], tuple[int, ...]]
#: What a remembered run needs: the session that runs (this one or its float twin), the input shapes' key, the fetch.
Route = tuple["Session", tuple, tuple[str, ...]]


@dataclass
class _Plan:
    """One (input shapes, fetch) pair made flat: a run copies ``slots`` (parameters and planned output buffers by
    tensor slot), puts the feeds in, and runs ``steps``: ``(kernel.run, ins, patch, outs, out_slots)``, where
    ``ins`` holds the node's constant inputs and ``patch`` says which ``(position, slot)`` to refresh before the
    call (a kernel may return views instead of writing ``outs``: they go to ``out_slots``)."""

    slots: list = field(repr=False)
    steps: list[Step] = field(repr=False)
    feeds: tuple[tuple[int, str], ...]
    fetch: tuple[tuple[str, int], ...]
    buffers: int = 0
    nbytes: int = 0
    program: list[Step] | None = field(default=None, repr=False)  # steps with compiled chains; None: per node
    chained: frozenset[int] = frozenset()  # indices of the nodes run inside compiled chains
    only_chains: bool = False  # one thread, every node inside a chain: no thread limit to set


@dataclass
class _Lane:
    """Kernels prepared for one set of input shapes and their plans (per fetch list), used by one run at a time."""

    prepared: _Prepared
    plans: dict[tuple[str, ...], _Plan] = field(default_factory=dict)
    evicted: bool = False  # its shapes were forgotten: dropped when released


class Session:
    """Run ``graph`` on NumPy feeds.

    Parameters
    ----------
    graph : Graph, copied (the caller's graph is not modified)
    threads : int >= 1, optional; the kernels' thread count (``kernels.set_num_threads``) for each run, and
        NumPy's BLAS threads too when threadpoolctl is installed
    fallback : bool, default True; let a kernel with a float ``fallback``, and a quantized graph with a float
        twin, be replaced by the float version when that is faster (False: always the quantized kernels)
    optimize : bool, default True; fold batch norms and fuse activations first, and move convolution chains
        channels-last (:mod:`lowbit.runtime.layout`; their intermediate tensors then no longer exist and cannot be
        fetched)
    compiled : bool, default True; with ``threads`` given, chain the nodes whose kernels have an entry into compiled
        functions (:mod:`lowbit.runtime.compiled`) so that Python dispatches once per chain, not per node (a team
        of threads runs a chain when ``threads > 1``)
    """

    @paused()
    def __init__(self, graph: Graph, *, threads: int | None = None, fallback: bool = True, optimize: bool = True,
                 compiled: bool = True):
        if type(graph).__name__ == "ModelProto":  # an onnx model: import it (onnx is an optional extra)
            from lowbit.onnx import load

            graph = load(graph)
        if not isinstance(graph, Graph):
            raise TypeError(f"graph: expected a lowbit.graph.Graph, got {type(graph).__name__}")
        if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool)
                                    or threads < 1):
            raise ValueError(f"threads: expected an int >= 1 or None, got {threads!r}")
        source = graph.copy().validate()
        self._source_tensors = {t for n in source.nodes for t in n.outputs}
        self.graph = fuse_activations(fold_batch_norm(source)) if optimize else source
        twin = float_twin(self.graph) if fallback else None
        if optimize:  # convolution chains channels-last: an execution detail, after the twin (which runs NCHW ops)
            self.graph = fuse_layout_transposes(nhwc_chains(self.graph))
        self.graph.validate()
        self.threads = None if threads is None else int(threads)
        self.fallback = bool(fallback)
        self._inputs = tuple(self.graph.inputs)
        names = [*self._inputs, *self.graph.params, *(t for n in self.graph.nodes for t in n.outputs)]
        self._slot = {t: i for i, t in enumerate(dict.fromkeys(names))}
        self._tensors = set(self._slot)
        self.compiled = bool(compiled)
        self._twin = None if twin is None else Session(twin, threads=threads, fallback=fallback, optimize=optimize,
                                                       compiled=compiled)
        self._valued = self._shape_valued()
        self._whole: dict[tuple, tuple[bool, str]] = {}  # input shapes -> (the twin runs, the race's note)
        self._lock = threading.Lock()  # guards changes to the dicts below; never held while a kernel runs
        self._lanes: dict[tuple, list[_Lane]] = {}  # input shapes -> every lane, oldest shapes first
        self._idle: dict[tuple, list[_Lane]] = {}  # input shapes -> the lanes no run holds
        self._routes: dict[tuple, dict] = {}  # feed signature -> fetch (None: default) -> Route
        self.notes: dict[str, str] = {}  # node name -> note of the kernel chosen at the last preparation

    def _shape_valued(self) -> frozenset[str]:
        """Inputs whose values reach an input that decides a shape (:data:`evaluators.SHAPE_INPUTS`), other than
        through ``Shape`` / ``Size`` (which read only shapes)."""
        index, found = self.graph.index(), set()
        for name in self.graph.inputs:
            seen, stack = {name}, [name]
            while stack and name not in found:
                tensor = stack.pop()
                for node in index.consumers.get(tensor, []):
                    if node.op in SHAPE_OPS:
                        continue
                    positions = evaluators.SHAPE_INPUTS.get(node.op, ())
                    if any(p < len(node.inputs) and node.inputs[p] == tensor for p in positions):
                        found.add(name)
                        break
                    fresh = [t for t in node.outputs if t not in seen]
                    seen.update(fresh)
                    stack.extend(fresh)
        return frozenset(found)

    def _key(self, feeds: dict[str, np.ndarray]) -> tuple:
        """The preparation key of checked ``feeds``: each input's shape, and the values of :meth:`_shape_valued`
        inputs."""
        return tuple((n, feeds[n].shape, feeds[n].tobytes() if n in self._valued else None) for n in self._inputs)

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
        checked, symbols = {}, {}
        for name, spec in self.graph.inputs.items():
            x = feeds[name]
            if not isinstance(x, np.ndarray):
                raise TypeError(f"feeds[{name!r}]: expected an ndarray, got {type(x).__name__}")
            if x.dtype != np.dtype(spec.dtype):
                raise TypeError(f"feeds[{name!r}]: expected dtype {spec.dtype}, got {x.dtype}")
            if not spec.matches(x):
                raise ValueError(f"feeds[{name!r}]: expected shape {spec.shape} (None: any), got {x.shape}")
            conflict = spec.bind(x.shape, symbols)
            if conflict:
                raise ValueError(f"feeds[{name!r}]: {conflict} (shape {x.shape}, expected {spec.shape})")
            checked[name] = np.asarray(x, order="C")  # 0-d stays 0-d
        return checked

    def _check_fetch(self, fetch: list[str] | None) -> list[str]:
        if fetch is None:
            return list(self.graph.outputs)
        if isinstance(fetch, str) or not all(isinstance(t, str) for t in fetch):
            raise TypeError(f"fetch: expected a list of tensor names, got {fetch!r}")
        for t in fetch:
            if t not in self._tensors:
                why = (" (removed or renamed by batch-norm folding, activation fusion or the channels-last layout: "
                       "use Session(..., optimize=False))"
                       if t in self._source_tensors else "")
                raise ValueError(f"fetch: no tensor named {t!r} in the graph{why}")
        return list(dict.fromkeys(fetch))

    # ---- preparation -----------------------------------------------------------------------------------------------

    @paused()
    def _prepare(self, feeds: dict[str, np.ndarray]) -> _Prepared:
        """Kernels for the shapes of ``feeds`` (new ones at every call: the caller keeps them in a lane)."""
        # Preparers read constants from graph.params: a view of the graph whose params grow by the folded values.
        constants = dict(self.graph.params)
        graph = Graph(self.graph.nodes, self.graph.inputs, self.graph.outputs, constants, self.graph.opset)
        specs: dict[str, Spec] = {n: (p.shape, p.dtype) for n, p in graph.params.items()}
        specs.update((n, (x.shape, x.dtype)) for n, x in feeds.items())
        values: dict[str, np.ndarray] = {n: np.zeros(x.shape, x.dtype) for n, x in feeds.items()}
        constants.update((n, feeds[n].copy()) for n in self._valued)
        values.update(graph.params)
        root = {n: n for n in feeds}
        chosen, folded, self.notes = [], {}, {}
        for node in graph.nodes:
            if _foldable(node, constants):
                results = evaluators.evaluate(node, [values[t] if t else None for t in node.inputs],
                                              graph.opset_of(node.op))
                results = [r if r.flags.c_contiguous else r.copy() for r in results]  # bindable by address
                constants.update(zip(node.outputs, results))
                folded[len(chosen)] = results
                kernel = _folded(results)
            else:
                kernel = prepare(node, graph, [specs[t] if t else None for t in node.inputs])
            if len(kernel.outputs) != len(node.outputs):
                raise ValueError(f"node {node.name!r} ({node.op}): the kernel declares {len(kernel.outputs)} outputs, "
                                 f"the node has {len(node.outputs)}")
            ins = [values[t] if t else None for t in node.inputs]
            for shape, dtype in kernel.outputs:
                check_size(node, shape, dtype)
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
        return _Prepared(chosen, specs, root, folded)

    def _acquire(self, key: tuple, feeds: dict[str, np.ndarray]) -> _Lane:
        """An idle lane for input shapes ``key``, prepared from ``feeds`` (checked) when every lane is busy. The
        caller must :meth:`_release` it."""
        idle = self._idle.get(key)  # list.pop and list.append are atomic: the hot path takes no lock
        if idle:
            try:
                return idle.pop()
            except IndexError:  # another thread took the last idle lane first
                pass
        with self._limit(), np.errstate(all="ignore"):  # the dry run's zeros may divide by zero, log of 0
            lane = _Lane(self._prepare(feeds))
        with self._lock:
            if key not in self._lanes:
                if len(self._lanes) >= MAX_SHAPES:
                    self._evict(next(iter(self._lanes)))
                self._lanes[key], self._idle[key] = [], []
            self._lanes[key].append(lane)
        return lane

    def _release(self, key: tuple, lane: _Lane) -> None:
        """Give ``lane`` back (dropped if its shapes were evicted meanwhile)."""
        idle = self._idle.get(key)
        if idle is not None and not lane.evicted:
            idle.append(lane)

    def _run_held(self, key: tuple, feeds: dict[str, np.ndarray], fetch: tuple[str, ...],
                  timings: list[float] | None = None) -> tuple[_Lane, dict[str, np.ndarray]]:
        """Run ``fetch`` on a lane held for the call; the lane (for its kernels) and the results."""
        lane = self._acquire(key, feeds)
        try:
            plan = self._plan(lane, fetch)
            if self.threads is None or (plan.only_chains and timings is None):
                return lane, self._execute(plan, feeds, timings)
            with self._limit():
                return lane, self._execute(plan, feeds, timings)
        finally:
            self._release(key, lane)

    def _evict(self, key: tuple) -> None:
        """Forget everything prepared for input shapes ``key`` (called with the lock held)."""
        for lane in self._lanes.pop(key):
            lane.evicted = True
        del self._idle[key]
        self._whole.pop(key, None)
        self._routes.clear()  # rebuilt on the next runs from what stays prepared

    @staticmethod
    def _faster(kernel: Kernel, ins: list, outs: list[np.ndarray]) -> Kernel:
        """``kernel`` or its float fallback, whichever is faster on these inputs; the note says what was chosen."""
        fallback = kernel.fallback
        specs = [[(tuple(s), np.dtype(d)) for s, d in k.outputs] for k in (kernel, fallback)]
        if specs[0] != specs[1]:
            raise ValueError(f"kernel fallback declares outputs {fallback.outputs}, the kernel {kernel.outputs}")
        own, other = _race([lambda: kernel.run(ins, outs), lambda: fallback.run(ins, outs)])
        if other < own:
            note = f"fell back to float: {kernel.precision} {1e3 * own:.2f} ms > float {1e3 * other:.2f} ms"
            return Kernel(fallback.run, fallback.outputs, fallback.ops, fallback.precision, note,
                          entry=fallback.entry)
        note = f"{kernel.note}; " if kernel.note else ""
        return Kernel(kernel.run, kernel.outputs, kernel.ops, kernel.precision,
                      f"{note}{kernel.precision} {1e3 * own:.2f} ms < float {1e3 * other:.2f} ms", entry=kernel.entry)

    @paused()
    def _plan(self, lane: _Lane, fetch: tuple[str, ...]) -> _Plan:
        """The plan of held ``lane`` that computes ``fetch`` (made on first use)."""
        if fetch in lane.plans:
            return lane.plans[fetch]
        prepared = lane.prepared
        nodes, root, slot = self.graph.nodes, prepared.root, self._slot
        last = {}  # root tensor -> index of the last node reading it or a view of it
        for i, node in enumerate(nodes):
            for t in node.inputs:
                if t in root:
                    last[root[t]] = i
        pinned = {root[t] for t in fetch if t in root}
        pool: list[np.ndarray] = []  # free byte buffers, most recently freed last
        flat_of: dict[str, np.ndarray] = {}
        slots = [None] * len(slot)
        for name, value in self.graph.params.items():
            slots[slot[name]] = value
        plan = _Plan(slots, [], tuple((slot[n], n) for n in self._inputs), tuple((t, slot[t]) for t in fetch))

        def release(t: str) -> None:
            pool.append(flat_of.pop(t))

        def take(nbytes: int) -> np.ndarray:
            """The smallest free buffer of at least ``nbytes`` (the most recently freed of those: cache-warm),
            else a new one, which replaces the largest free buffer when that is too small anyway."""
            fits = [i for i, b in enumerate(pool) if b.size >= nbytes]
            if fits:
                return pool.pop(min(reversed(fits), key=lambda i: pool[i].size))
            if pool:
                pool.pop(max(range(len(pool)), key=lambda i: pool[i].size))
            plan.buffers += 1
            plan.nbytes += nbytes
            return _aligned(nbytes)

        for i, (node, kernel) in enumerate(zip(nodes, prepared.kernels)):
            outs = []
            for t in node.outputs:
                shape, dtype = prepared.specs[t]
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                flat_of[t] = take(nbytes)
                outs.append(flat_of[t][:nbytes].view(dtype).reshape(shape))
                slots[slot[t]] = outs[-1]
            ins = [self.graph.params.get(t) if t else None for t in node.inputs]
            patch = tuple((k, slot[t]) for k, t in enumerate(node.inputs) if t and t not in self.graph.params)
            plan.steps.append((kernel.run, ins, patch, outs, tuple(slot[t] for t in node.outputs)))
            for t in node.outputs:  # a view of an input leaves its own buffer unused; an unread output is dead
                if root[t] != t or (t not in last and t not in pinned):
                    release(t)
            for t in {root[s] for s in node.inputs if s in root}:
                if last[t] == i and t not in pinned and t in flat_of:
                    release(t)
        if self.compiled and self.threads is not None:  # a thread count asked for: worth compiling chains for
            self._chain(plan, prepared)
        lane.plans[fetch] = plan
        return plan

    def _chain(self, plan: _Plan, prepared: _Prepared) -> None:
        """Give ``plan`` a ``program``: its steps with each run of consecutive nodes that have an entry (or were
        folded), two entries or more, made one compiled call (:class:`CompiledSteps`). A chain that fails to
        compile (an entry Numba cannot type) runs node by node instead."""
        entries = [k.entry is not None for k in prepared.kernels]
        if sum(entries) < 2:
            return
        chainable = [e or i in prepared.folded for i, e in enumerate(entries)]
        last_read: dict[int, int] = {}
        for i, (_, _, patch, _, _) in enumerate(plan.steps):
            for _, j in patch:
                last_read[j] = i
        fetched = {j for _, j in plan.fetch}
        program, start = [], 0
        for i in range(len(chainable) + 1):
            if i < len(chainable) and chainable[i]:
                continue
            calls = sum(entries[start:i])
            chain = self._compiled_chain(plan, prepared, range(start, i), last_read, fetched) if calls > 1 else None
            if chain is None:
                program.extend(plan.steps[start:i])
            else:
                program.append(chain)
                plan.chained |= set(range(start, i))
            if i < len(chainable):
                program.append(plan.steps[i])
            start = i + 1
        if plan.chained:
            plan.program = program
            plan.only_chains = self.threads == 1 and len(plan.chained) == len(plan.steps)

    def _compiled_chain(self, plan: _Plan, prepared: _Prepared, indices: range, last_read: dict[int, int],
                        fetched: set[int]) -> Step | None:
        """One step running nodes ``indices`` as one compiled function, fed the slots they read from outside and
        returning the slots read after them; None if it does not compile."""
        produced: dict[int, np.ndarray] = {}  # slot -> the array the chain holds it in
        fed: dict[int, int] = {}  # slot -> position among the chain's feeds
        calls = []
        for i in indices:
            _, ins, patch, outs, out_slots = plan.steps[i]
            args = list(ins)
            for k, j in patch:
                args[k] = produced[j] if j in produced else In(fed.setdefault(j, len(fed)))
            if i in prepared.folded:
                produced.update(zip(out_slots, prepared.folded[i]))
                continue
            calls.append((prepared.kernels[i].entry, args, outs))
            produced.update(zip(out_slots, outs))
        exported = tuple(j for j in produced if j in fetched or last_read.get(j, -1) > indices[-1])
        names = {j: t for t, j in self._slot.items()}
        zeros = [np.zeros(*prepared.specs[names[j]]) for j in fed]
        team = self.threads != 1 and any(entry.rows or entry.team for entry, _, _ in calls)
        try:
            chain = CompiledSteps(calls, len(fed), [produced[j] for j in exported], team=team)
            with self._limit():
                chain(zeros)  # compiles (or loads from the disk cache) now, and proves the entries type
                if team and kernels.get_num_threads() > 1:
                    one, shared = _race([lambda: _on_one(chain, zeros), lambda: chain(zeros)])
                    if one <= shared:
                        chain.threads = 1
        except (TypeError, ValueError, NumbaError):
            return None
        def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
            return chain(ins)

        run.chain = chain  # for inspection (tests): the compiled chain the step runs
        return run, [None] * len(fed), tuple(enumerate(fed)), [], exported

    # ---- execution -------------------------------------------------------------------------------------------------

    @staticmethod
    def _execute(plan: _Plan, feeds: dict[str, np.ndarray], timings: list[float] | None = None
                 ) -> dict[str, np.ndarray]:
        """Run ``plan`` on checked ``feeds``; with ``timings``, keep each step's best seconds there."""
        slots = plan.slots.copy()
        for i, name in plan.feeds:
            x = feeds[name]
            slots[i] = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        if timings is None:
            for run, ins, patch, outs, out_slots in plan.steps if plan.program is None else plan.program:
                for k, j in patch:
                    ins[k] = slots[j]
                results = run(ins, outs)
                if results is not None:
                    for j, r in zip(out_slots, results):
                        slots[j] = r
        else:
            clock = time.perf_counter
            for i, (run, ins, patch, outs, out_slots) in enumerate(plan.steps):
                for k, j in patch:
                    ins[k] = slots[j]
                start = clock()
                results = run(ins, outs)
                timings[i] = min(timings[i], clock() - start)
                if results is not None:
                    for j, r in zip(out_slots, results):
                        slots[j] = r
        return {t: slots[j].copy() for t, j in plan.fetch}

    def _ready(self, feeds: dict[str, np.ndarray], fetch: list[str] | None) -> tuple[Route, dict[str, np.ndarray]]:
        """Check ``feeds`` and ``fetch`` fully and decide which session runs them (racing the twin once per input
        shapes); the route, remembered for the next runs, and the checked feeds."""
        checked, names = self._check_feeds(feeds), self._check_fetch(fetch)
        key = self._key(checked)
        twin_runs, _ = self._race_twin(checked, key)
        use_twin = twin_runs and set(names) <= self._twin._tensors
        route = (self._twin if use_twin else self, key, tuple(names))
        signature = self._signature([checked[n] for n in self._inputs])
        with self._lock:
            self._routes.setdefault(signature, {})[None if fetch is None else tuple(fetch)] = route
        return route, checked

    def _race_twin(self, feeds: dict[str, np.ndarray], key: tuple) -> tuple[bool, str]:
        """Whether the float twin runs for these input shapes, and the note saying why (decided once per shapes:
        both graphs timed on ``feeds``, interleaved, best of :data:`RACE_ROUNDS`)."""
        if self._twin is None:
            return False, ""
        if key not in self._whole:
            fetch = tuple(self.graph.outputs)
            own, twin = (lambda: self._run_held(key, feeds, fetch)), (lambda: self._twin._run_held(key, feeds, fetch))
            with self._limit():
                best = _race([own, twin])
            quantized, float_ = f"{1e3 * best[0]:.3f} ms", f"{1e3 * best[1]:.3f} ms"
            self._whole[key] = (True, f"fell back to float: the quantized graph {quantized} > its float twin "
                                      f"{float_} (weights dequantized, Q/DQ dropped)") if best[1] < best[0] else \
                (False, f"quantized graph {quantized} < its float twin {float_}")
        return self._whole[key]

    def _signature(self, xs: list[np.ndarray]) -> tuple:
        """What picks a remembered route for feeds ``xs`` (in input order): shapes, dtypes, shape-deciding values."""
        if not self._valued:
            return tuple([(x.shape, x.dtype) for x in xs])
        return tuple([(x.shape, x.dtype, x.tobytes() if n in self._valued else None) for n, x in zip(self._inputs, xs)])

    def run(self, feeds: dict[str, np.ndarray], fetch: list[str] | None = None) -> dict[str, np.ndarray]:
        """Compute ``fetch`` (tensor names; default the graph's outputs) from ``feeds`` (input name -> ndarray).

        Returns name -> a copy of the tensor, which the caller may keep and modify. Feeds of shapes and dtypes
        seen before, with a fetch seen before, skip the checks and run the remembered plan directly. Safe to call
        from several threads at once (see the module).
        """
        route = None  # the hot path: no context managers, generators or exceptions (each costs a fraction of a us)
        if type(feeds) is dict and len(feeds) == len(self._inputs) and not isinstance(fetch, str):
            xs = [feeds.get(n) for n in self._inputs]
            if all([type(x) is np.ndarray for x in xs]):
                routes = self._routes.get(self._signature(xs))
                try:
                    route = routes and routes.get(None if fetch is None else tuple(fetch))
                except TypeError:  # unhashable fetch entries: checked below
                    pass
        if not route:
            route, feeds = self._ready(feeds, fetch)
        session, key, names = route
        return session._run_held(key, feeds, names)[1]

    def profile(self, feeds: dict[str, np.ndarray], repeat: int = 5) -> Profile:
        """Time every node: the best of ``repeat`` runs (after one warm-up run) per node, each node on its own (notes
        end in "chained" for the nodes that runs make inside compiled chains).

        A graph with a float twin says on its rows which of the two runs and the whole-graph times behind the
        choice (on every row when the twin runs, on the first otherwise).
        """
        if not isinstance(repeat, (int, np.integer)) or isinstance(repeat, bool) or repeat < 1:
            raise ValueError(f"repeat: expected an int >= 1, got {repeat!r}")
        (session, key, names), feeds = self._ready(feeds, None)
        twin_runs, whole = self._race_twin(feeds, key)
        timings = [np.inf] * len(session.graph.nodes)
        session._run_held(key, feeds, names)
        for _ in range(repeat):
            lane, _ = session._run_held(key, feeds, names, timings)
        chained = lane.plans[names].chained
        rows = []
        for i, (node, kernel, sec) in enumerate(zip(session.graph.nodes, lane.prepared.kernels, timings)):
            note = f"{whole}; {kernel.note}" if whole and (twin_runs or i == 0) else kernel.note
            note = f"{note}; chained" if i in chained else note
            rows.append((node.name, node.op, kernel.precision, sec, kernel.ops, note.rstrip("; ")))
        return Profile.from_timings(rows)
