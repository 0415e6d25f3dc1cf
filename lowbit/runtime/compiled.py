"""Chains of kernel entries compiled into one function, so that Python dispatches once per run, not once per node.

A run of a prepared graph calls one compiled kernel per node; from Python each call costs its dispatch (typing
every argument) and the kernel's own Python around it, microseconds that add up to more than the arithmetic at
batch 1. :func:`compile_steps` takes the steps' :class:`kernels.entry.Entry` and emits the source of one Numba
function that makes every call in turn::

    def run(table, f0, f1):             # the address table, then the feeds
        t3 = carray(_at(table[0], uint8), (1, 8, 8, 16))   # buffers, weights, scratch: bound at their addresses
        ...
        fn0(f0, t3, (1, 3, 3), np.float32(0.5), t4)       # one call per entry, literals inline
        t5 = f1.reshape((1, 1024))                          # views
        return (t5,)                                        # fetched views of feeds, if any

Every array other than the feeds is bound by address (its shape and dtype are literals of the source), so one
int64 array carries them all and the call types three or four arguments whatever the graph's size. The source
A fetched array the caller already holds (a bound buffer, or a view of one) is not returned: boxing a
returned array costs more than a small kernel. The source
goes into a file named by its hash (and the hash of the kernels' sources) in :func:`cache_folder`, where Numba
caches the compiled function on disk like any kernel: a second process with the same graph and shapes loads it.

The caller keeps every bound array alive (the :class:`CompiledSteps` holds them) and uses one compiled chain
from one thread at a time (its buffers and the entries' scratch are its own).

A chain made for a team (``team=True``) is entered by ``nth`` threads at once (:mod:`kernels.sync`): the
function takes ``ith, nth, sync`` after the table; a split entry's rows are shared out (each thread calls it on
its :func:`~kernels.sync.share`), any other entry runs on thread 0, and a barrier separates an entry from the
next wherever one may read what another thread wrote::

    lo, hi = share(128, ith, nth)
    if hi > lo:
        fn0(_cut(f0, 128, lo, hi), c1, _cut(c2, 128, lo, hi))   # rows [lo, hi) of the split entry
    barrier(sync, nth)
    if ith == 0:
        fn1(c2, c3)                                              # an entry that is not split
"""

from __future__ import annotations

import hashlib
import math
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

import lowbit
from kernels import sync, threads
from kernels._jit import sources_digest
from kernels.entry import Entry, In, Out

#: Folder of the generated sources (and Numba's cache of them): ``LOWBIT_CACHE_DIR``, else ``~/.cache/lowbit``.
CACHE_ENV = "LOWBIT_CACHE_DIR"
_DTYPES = {np.dtype(n): n for n in ("float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                                    "int64", "uint64")}
_DTYPES[np.dtype(bool)] = "boolean"
_load_lock = threading.Lock()


@intrinsic
def _at(typingctx, address, dtype):
    """The pointer to ``dtype`` values at integer ``address``."""
    signature = types.CPointer(dtype.dtype)(address, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


def _cut(a, rows, lo, hi):
    """Rows ``[lo, hi)`` of C-contiguous ``a`` viewed as ``[rows, -1]`` (of one axis: as flat ``[rows * w]``)."""


@overload(_cut)
def _cut_typed(a, rows, lo, hi):
    if a.ndim == 1:
        def flat(a, rows, lo, hi):
            width = a.size // rows
            return a[lo * width:hi * width]

        return flat

    def by_rows(a, rows, lo, hi):
        return a.reshape((rows, a.size // rows))[lo:hi]

    return by_rows


def cache_folder() -> Path:
    """Where generated sources live: ``$LOWBIT_CACHE_DIR/graphs``, else ``~/.cache/lowbit/graphs``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    return Path(root) / "graphs"


def _literal(value: Any) -> str:
    """Source text of a bound scalar or tuple that Numba types as the value's own type."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return repr(None if value is None else bool(value))
    if isinstance(value, tuple):
        return "(" + "".join(f"{_literal(v)}, " for v in value) + ")"
    if isinstance(value, np.generic):
        return f"np.{value.dtype.name}({_literal(value.item())})"
    if isinstance(value, float) and not math.isfinite(value):
        return "np.nan" if math.isnan(value) else ("np.inf" if value > 0 else "-np.inf")
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"an entry argument must be an array, In/Out, a number, None or a tuple of those, "
                    f"got {type(value).__name__}")


def _identity(fn: Any) -> str:
    """A stable name of dispatcher ``fn`` across processes: module, qualified name, and closure values."""
    py = fn.py_func
    cells = [c.cell_contents for c in (py.__closure__ or ())]
    return f"{py.__module__}.{py.__qualname__}{[_identity(c) if hasattr(c, 'py_func') else repr(c) for c in cells]}"


class _Source:
    """The generated function's text, built step by step, and the arrays its table binds."""

    def __init__(self, feeds: int, team: bool):
        self.team, self.alone = team, False
        self.lines: list[str] = []
        self.table: list[np.ndarray] = []
        self.bound: dict[int, str] = {}  # id(array) -> its variable
        self.fns: dict[int, str] = {}  # id(dispatcher) -> its global name
        self.names: list[str] = []  # identities of the dispatchers, for the file's hash
        self.globals: dict[str, Any] = {}
        self.feeds = [f"f{i}" for i in range(feeds)]

    def bind(self, array: np.ndarray) -> str:
        """The variable of a bound array (the same array object binds once)."""
        if id(array) in self.bound:
            return self.bound[id(array)]
        if not (isinstance(array, np.ndarray) and array.flags.c_contiguous and array.dtype in _DTYPES):
            raise ValueError(f"a bound array must be C-contiguous of a plain numeric dtype, got "
                             f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}")
        name = f"c{len(self.table)}"
        self.lines.append(f"    {name} = carray(_at(table[{len(self.table)}], {_DTYPES[array.dtype]}), "
                          f"{_literal(tuple(array.shape))})")
        self.table.append(array)
        self.bound[id(array)] = name
        return name

    def fn(self, dispatcher: Any) -> str:
        if id(dispatcher) not in self.fns:
            self.fns[id(dispatcher)] = name = f"fn{len(self.fns)}"
            self.globals[name] = dispatcher
            self.names.append(f"{name} = {_identity(dispatcher)}")
        return self.fns[id(dispatcher)]

    def argument(self, arg: Any, ins: list[str], outs: list[str]) -> str:
        if isinstance(arg, In):
            return ins[arg.index]
        if isinstance(arg, Out):
            return outs[arg.index]
        if isinstance(arg, np.ndarray):
            return self.bind(arg)
        if isinstance(arg, tuple):
            return "(" + "".join(f"{self.argument(a, ins, outs)}, " for a in arg) + ")"
        return _literal(arg)

    def text(self, fetch: list[str]) -> str:
        team = ["ith", "nth", "sync"] if self.team else []
        head = ["# generated by lowbit.runtime.compiled: one call per kernel entry", *(f"# {n}" for n in self.names),
                "import numpy as np", "from numba import carray, njit",
                f"from numba.types import {', '.join(sorted(set(_DTYPES.values())))}",
                "from kernels.sync import barrier, share", "from lowbit.runtime.compiled import _at, _cut", "",
                "@njit(cache=True, nogil=True)", f"def run({', '.join(['table', *team, *self.feeds])}):"]
        end = f"    return ({''.join(f'{t}, ' for t in fetch)})" if fetch else "    return None"
        alone = [f"    alone = np.zeros({sync.SIZE}, np.int64)  # team entries' sync, run by one thread"] * self.alone
        return "\n".join(head + alone + self.lines + [end, ""])


class CompiledSteps:
    """``steps`` (``(entry, inputs, outputs)``, each input a feed index :class:`In`, a bound array or None, each
    output a bound array) made one compiled function; ``self(feeds)`` runs them and returns the ``fetch``
    arrays (feed indices or bound arrays, as they are after the run: views of the buffers, not copies).

    With ``team``, the function is made for a team of threads (module docstring): a call runs it on
    ``min(self.threads, kernels.get_num_threads())`` threads (``self.threads``: all by default)."""

    def __init__(self, steps: list[tuple[Entry, list, list[np.ndarray]]], feeds: int, fetch: list,
                 team: bool = False):
        source = _Source(feeds, team)
        self.team, self.threads, self._sync = team, 1 << 30, sync.new_sync()
        # since the last barrier: whether an entry ran (pending), and whether one ran on several threads (spread)
        pending = spread = False
        value: dict[int, str] = {}  # id(array) -> variable holding it (views made by reshape entries)
        held: dict[int, np.ndarray | None] = {}  # id(array) -> the same view made here, None for views of feeds

        def name_of(x: Any) -> str:
            if isinstance(x, In):
                return source.feeds[x.index]
            if x is None:
                return "None"
            return value.get(id(x)) or source.bind(x)

        def holding(x: Any) -> np.ndarray | None:
            """``x`` as Python can hold it across runs: a bound array, or the same view of one; None if the
            function must return it (a feed or a view of one)."""
            return None if isinstance(x, In) else held.get(id(x), x)

        for k, (entry, ins, outs) in enumerate(steps):
            args_in = [name_of(x) for x in ins]
            if entry.reshape is not None:
                view = f"v{k}"
                source.lines.append(f"    {view} = {args_in[0]}.reshape({_literal(entry.reshape)})")
                value[id(outs[0])] = view
                base = holding(ins[0])
                held[id(outs[0])] = None if base is None else base.reshape(entry.reshape)
                continue
            args_out = [name_of(y) for y in outs]
            args = [source.argument(a, args_in, args_out) for a in entry.args]
            if not team:
                args += ["0", "1", "alone"] * entry.team
                source.alone |= entry.team
                source.lines.append(f"    {source.fn(entry.fn)}({', '.join(args)})")
                continue
            several = entry.team or entry.rows > 0
            if pending and (several or spread):  # this entry may read what another thread wrote
                source.lines.append("    barrier(sync, nth)")
                spread = False
            pending, spread = True, spread or several
            if entry.team:
                source.lines.append(f"    {source.fn(entry.fn)}({', '.join(args + ['ith', 'nth', 'sync'])})")
                continue
            if entry.rows:
                for c in entry.cut:
                    args[c] = f"_cut({args[c]}, {entry.rows}, lo, hi)"
                source.lines += [f"    lo, hi = share({entry.rows}, ith, nth)", "    if hi > lo:"]
            else:
                source.lines.append("    if ith == 0:")
            source.lines.append(f"        {source.fn(entry.fn)}({', '.join(args)})")
        fetched = [holding(x) for x in fetch]
        returned = [name_of(x) for x, h in zip(fetch, fetched) if h is None]
        self._returned = [i for i, h in enumerate(fetched) if h is None]  # positions filled from the call
        self._fetched = tuple(fetched)
        text = source.text(returned)
        self.source, self.table = text, source.table
        self.addresses = np.array([a.ctypes.data for a in source.table], np.int64)
        self._fn = _load(text, source.globals)

    def __call__(self, feeds: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        nth = min(self.threads, threads.get_num_threads()) if self.team else 1
        if not self.team:
            returned = self._fn(self.addresses, *feeds)
        elif nth == 1:
            returned = self._fn(self.addresses, 0, 1, self._sync, *feeds)
        else:
            returned = self._run_team(nth, feeds)
        if not self._returned:
            return self._fetched
        fetched = list(self._fetched)
        for i, r in zip(self._returned, returned):
            fetched[i] = r
        return tuple(fetched)


    def _run_team(self, nth: int, feeds: list[np.ndarray]) -> tuple:
        """The function's result on thread 0, run by a team of ``nth`` (:func:`kernels.threads.run_team`): a thread
        that raises releases the others from the barriers (their results are then meaningless), and the call raises
        its error."""
        state, result = self._sync, []

        def member(ith: int, size: int) -> None:
            try:
                returned = self._fn(self.addresses, ith, size, state, *feeds)
            except BaseException:
                sync.abort(state)
                raise
            if ith == 0:
                result.append(returned)

        sync.reset(state)
        threads.run_team(member, nth)
        return result[0]


def _load(text: str, dispatchers: dict[str, Any]) -> Any:
    """The compiled ``run`` of generated source ``text``, from a file named by its hash (Numba caches it there)."""
    digest = hashlib.sha256(f"{lowbit.__version__}\n{sources_digest()}\n{text}".encode()).hexdigest()[:24]
    name = f"lowbit_graph_{digest}"
    with _load_lock:
        module = sys.modules.get(name)
        if module is None:
            folder = cache_folder()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.py"
            if not path.exists() or path.read_text() != text:
                temporary = path.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(text)
                os.replace(temporary, path)  # atomic: another process may be reading it
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            module.__dict__.update(dispatchers)
            spec.loader.exec_module(module)
            sys.modules[name] = module
    return module.run

