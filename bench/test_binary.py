"""Single-thread microbenchmarks of the binary GEMM next to NumPy float32 at the same shapes.

Not part of the default test run. Run from the repository root::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest bench/test_binary.py --benchmark-only

``bench/conftest.py`` adds ``ratio_vs_numpy`` (same group, same run) to the JSON output.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.binary import NAMES, SHAPES, contenders
from bench.peers import Contender
from bench.shapes import Shape, label, ops


@pytest.fixture(scope="module", params=SHAPES, ids=label)
def shape(request: pytest.FixtureRequest) -> Shape:
    return request.param


@pytest.fixture(scope="module")
def built(shape: Shape) -> dict[str, Contender]:
    return {c.name: c for c in contenders(shape, threads=1)}


@pytest.fixture(params=NAMES)
def contender(request: pytest.FixtureRequest, built: dict[str, Contender]) -> Iterator[Contender]:
    """A single-thread contender, called once (compiled, caches warm) before it is timed."""
    chosen = built[request.param]
    with chosen.pinned():
        chosen.call()
        yield chosen


def test_binary_gemm(benchmark, shape: Shape, contender: Contender) -> None:
    m, n, k = shape
    benchmark.group = f"binary M={m} N={n} K={k}"
    benchmark(contender.call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gops"] = ops(shape) / benchmark.stats.stats.min / 1e9
