"""Single-thread microbenchmarks of the binary GEMM next to NumPy float32 at the same shapes.

Not part of the default test run. Run from the repository root::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench/test_binary.py --benchmark-only

``bench/conftest.py`` adds ``ratio_vs_numpy`` (same group, same run) to the JSON output.
"""

from __future__ import annotations

import pytest

from bench.binary import NAMES, SHAPES, contenders
from bench.peers import Contender
from bench.shapes import Shape, label, ops
from bench.timing import benchmark_contender


@pytest.fixture(scope="module", params=SHAPES, ids=label)
def shape(request: pytest.FixtureRequest) -> Shape:
    return request.param


@pytest.fixture(scope="module")
def built(shape: Shape) -> dict[str, Contender]:
    return {c.name: c for c in contenders(shape, threads=1)}


@pytest.mark.parametrize("name", NAMES)
def test_binary_gemm(benchmark, shape: Shape, built: dict[str, Contender], name: str) -> None:
    m, n, k = shape
    benchmark_contender(benchmark, f"binary M={m} N={n} K={k}", built[name], ops(shape))
