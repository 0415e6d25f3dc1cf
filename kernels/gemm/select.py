"""Calling one of a table of compiled functions, chosen by a literal key, from compiled code.

A kernel made by a factory for each variant (``kernels.gemm.driver.DRIVERS`` ...) cannot simply close over
another such kernel: Numba keys its on-disk cache on the pickled closure, and a pickled dispatcher differs
from process to process, so the cache would never hit. A closure over the variant's *name* (a string) caches
fine; :func:`selector` turns that name back into the dispatcher at compile time.
"""

from __future__ import annotations

from typing import Any, Callable

from numba import types
from numba.extending import overload


def selector(table: dict[str, Any], name: str) -> Callable:
    """``call(key, args)`` for compiled code: ``table[key](*args)`` for a string literal ``key`` (a closure
    constant), resolved when the caller compiles; ``args`` is a tuple."""

    def call(key, args):
        raise NotImplementedError(f"{name}() is only callable from compiled kernels")

    call.__name__ = call.__qualname__ = name

    @overload(call, inline="always")
    def _call(key, args):
        if not isinstance(key, types.StringLiteral):
            return None
        fn = table[key.literal_value]

        def run(key, args):
            return fn(*args)

        return run

    return call
