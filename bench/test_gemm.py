"""Single-thread microbenchmarks of every GEMM contender on every shape.

Not part of the default test run (``testpaths`` is ``tests``). Run from the
repository root, with OpenBLAS free to choose its kernel::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.contenders import NAMES, build
from bench.shapes import SHAPES, Shape, label, operands, ops
from bench.timing import benchmark_contender


@pytest.fixture(scope="module", params=SHAPES, ids=label)
def shape(request: pytest.FixtureRequest) -> Shape:
    return request.param


@pytest.fixture(scope="module")
def arrays(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    return operands(shape)


@pytest.mark.parametrize("name", NAMES)
def test_gemm(benchmark, shape: Shape, arrays: tuple[np.ndarray, np.ndarray], name: str) -> None:
    if name == "onnxruntime":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    m, n, k = shape
    benchmark_contender(benchmark, f"gemm M={m} N={n} K={k}", build(name, *arrays, threads=1), ops(shape))
