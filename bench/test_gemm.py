"""Single-thread microbenchmarks of every GEMM contender on every shape.

Not part of the default test run (``testpaths`` is ``tests``). Run from the
repository root, with OpenBLAS free to choose its kernel::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench --benchmark-only
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bench.contenders import NAMES, build
from bench.peers import Contender
from bench.shapes import SHAPES, Shape, label, operands, ops


@pytest.fixture(scope="module", params=SHAPES, ids=label)
def shape(request: pytest.FixtureRequest) -> Shape:
    return request.param


@pytest.fixture(scope="module")
def arrays(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    return operands(shape)


@pytest.fixture(params=NAMES)
def contender(request: pytest.FixtureRequest, arrays: tuple[np.ndarray, np.ndarray]) -> Iterator[Contender]:
    """A single-thread contender, called once (compiled, caches warm) before it is timed."""
    if request.param == "onnxruntime":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    built = build(request.param, *arrays, threads=1)
    with built.pinned():
        built.call()
        yield built


def test_gemm(benchmark, shape: Shape, contender: Contender) -> None:
    m, n, k = shape
    benchmark.group = f"gemm M={m} N={n} K={k}"
    benchmark(contender.call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gops"] = ops(shape) / benchmark.stats.stats.min / 1e9
