"""lowbit's own contender and the registry of every contender by name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

import kernels
from bench.peers import Contender, numpy_float32, onnxruntime_matmul_integer


@contextlib.contextmanager
def lowbit_threads(threads: int) -> Iterator[None]:
    previous = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        yield
    finally:
        kernels.set_num_threads(previous)


def lowbit_gemm_int8(a: np.ndarray, b: np.ndarray, threads: int) -> Contender:
    """``kernels.gemm_int8`` on weights packed once, writing into a preallocated output."""
    packed = kernels.pack_int8(b)
    out = np.empty((a.shape[0], b.shape[0]), np.int32)
    return Contender("lowbit", lambda: kernels.gemm_int8(a, packed, out=out), lambda: lowbit_threads(threads))


BUILDERS = {"lowbit": lowbit_gemm_int8, "numpy": numpy_float32, "onnxruntime": onnxruntime_matmul_integer}
NAMES = tuple(BUILDERS)


def build(name: str, a: np.ndarray, b: np.ndarray, threads: int) -> Contender | None:
    """The contender ``name`` (one of :data:`NAMES`) for these operands, or None if not installed."""
    return BUILDERS[name](a, b, threads)
