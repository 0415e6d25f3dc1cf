"""The one place where Numba compilation options are chosen.

Every kernel is cached on disk (``cache=True``) and releases the GIL
(``nogil=True``) so that ``kernels.threads`` can run tiles on a Python thread
pool. ``fastmath`` stays off: the epilogues round to integers and must match
``kernels.reference`` bit for bit, which FMA contraction would break.

Numba stamps a cached function with the hash of its own source file only, but a
kernel compiles in the helpers, micro-kernels and tables of other modules: after
an edit to one of those it would keep loading stale machine code. The locators
below stamp every function of this package with a hash of all of its sources.
Two more repairs make a cache that many processes fill at once safe to load:
data files named by their key (:class:`KeyedCacheFile`) and function ids unique
across processes (:class:`ProcessUniqueIds`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import secrets
from pathlib import Path

import numba
from numba.core import caching
from numba.core.bytecode import FunctionIdentity

PACKAGE = Path(__file__).resolve().parent


@functools.cache
def sources_digest() -> str:
    """SHA-256 over the path and content of every Python file of the package."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _PackageStamp:
    """Locator mixin: applies to this package's files, stamped with the whole package."""

    def get_source_stamp(self):
        return sources_digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not Path(py_file).resolve().is_relative_to(PACKAGE):
            return None
        return super().from_function(py_func, py_file)


def _numba_class(name: str) -> type:
    """A class of numba.core.caching: public since Numba 0.61, with a leading underscore before."""
    return getattr(caching, name, None) or getattr(caching, f"_{name}")


_LOCATORS = [type(f"Package{name}", (_PackageStamp, _numba_class(name)), {})
             for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
_numba_class("CacheImpl")._locator_classes[:0] = _LOCATORS  # before any kernel below is decorated


class KeyedCacheFile(_numba_class("IndexDataCacheFile")):
    """Numba's cache index and data files, each overload's data file named by a hash of its key.

    Numba names them by the first free number in the index it just read. Two processes compiling different
    overloads of one function at once (pytest-xdist workers, Dask workers on a cold cache) then take the same
    number: the index keeps one key, the file the other's machine code, and a later process loads the wrong
    code for that key, silently. Named by key, a file only ever holds its own key's code; a concurrent index
    write can still drop the other process's entry, which costs a compilation later, never a wrong result.
    The data is written before the index entry that points to it.
    """

    def save(self, key, data):
        name = f"{self._index_name[:-len('.nbi')]}.{hashlib.sha256(repr(key).encode()).hexdigest()[:20]}.nbc"
        self._save_data(name, data)
        overloads = self._load_index()
        if overloads.get(key) != name:
            overloads[key] = name
            self._save_index(overloads)


# caching.Cache builds its files through this module global: every cache made from now on (this package's
# kernels, lowbit's compiled chains) is keyed
setattr(caching, _numba_class("IndexDataCacheFile").__name__, KeyedCacheFile)


class ProcessUniqueIds:
    """Numba's function ids, unique across processes: a counter from a random 62-bit start, drawn again in a
    forked child.

    Numba puts the id of each compiled function in its symbol name and counts ids from 1 in every process. Two
    processes that compile different closures of one qualname (the drivers ``kernels.conv.int8_driver.variant``
    wraps, the micro-kernel factories) with the same argument types in the same order give them one symbol
    name. A callee linked into a cached kernel is a weak symbol, so a third process that loads both kernels from
    the cache binds the second kernel's call to the first one's callee: silently wrong results (numba issue
    10486). From a random start, two processes that draw n ids each overlap with a probability of about
    n / 2^61.
    """

    def __init__(self):
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._ids = itertools.count(secrets.randbits(62))

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._ids)


FunctionIdentity._unique_ids = ProcessUniqueIds()  # before any function of this package compiles

kernel = functools.partial(numba.njit, cache=True, nogil=True)


def machine_entry(fn: numba.core.registry.CPUDispatcher, args: tuple):
    """The compiled code of kernel ``fn`` for arguments of exactly the Numba types of ``args`` (compiled, or loaded
    from the disk cache, now), to call as ``entry(*args)`` without the dispatcher.

    The dispatcher types every argument of every call (about 0.1 us per array): a third of a small GEMM's call.
    A plan whose arguments keep their types calls this entry instead, and MUST keep to them: arrays of the same
    dtype, rank and layout, writeable and aligned as ``args``' are, scalars of the same kinds. Anything else goes
    through ``fn``.
    """
    return fn.compile(tuple(numba.typeof(a) for a in args))
