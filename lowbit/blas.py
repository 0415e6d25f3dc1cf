"""Holding NumPy's BLAS to a thread count, when threadpoolctl is installed."""

from __future__ import annotations

import contextlib
import functools


def blas_limit(threads: int | None) -> contextlib.AbstractContextManager:
    """NumPy's BLAS held to ``threads`` while the context is open (no-op for None or without threadpoolctl).

    An unlimited OpenBLAS busy-waits on every core after each call, which starves the Numba
    kernels (and other processes) on a small machine.
    """
    controller = _controller() if threads is not None else None
    return contextlib.nullcontext() if controller is None else controller.limit(limits=threads, user_api="blas")


@functools.cache
def _controller():
    """The process's threadpoolctl controller (finding the loaded libraries is slow: done once), or None."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()
