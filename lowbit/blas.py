"""Holding NumPy's BLAS to a thread count, when threadpoolctl is installed."""

from __future__ import annotations

import contextlib


def blas_limit(threads: int | None) -> contextlib.AbstractContextManager:
    """NumPy's BLAS held to ``threads`` while the context is open (no-op for None or without threadpoolctl).

    An unlimited OpenBLAS busy-waits on every core after each call, which starves the Numba
    kernels (and other processes) on a small machine.
    """
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    return ThreadpoolController().limit(limits=threads, user_api="blas")
