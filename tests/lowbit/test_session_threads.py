"""One Session called from many threads at once gives what sequential calls give."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lowbit.graph import Sequential
from lowbit.ptq import quantize_model
from lowbit.runtime.session import Session

THREADS = 8
CALLS = 96


def _float_cnn(rng):
    layers = [("conv", rng.standard_normal((8, 3, 3, 3)) * 0.3, rng.standard_normal(8), {"pads": (1, 1, 1, 1)}),
              ("relu",),
              ("conv", rng.standard_normal((8, 8, 3, 3)) * 0.2, None, {"pads": (1, 1, 1, 1), "strides": (2, 2)}),
              ("relu",),
              ("conv", rng.standard_normal((4, 8, 1, 1)) * 0.3, None, {})]
    return Sequential((None, 3, 12, 12), layers).graph


def _stress(session: Session, feeds: list[dict[str, np.ndarray]]) -> None:
    """Every feed run sequentially, then all of them many times from ``THREADS`` threads: the same outputs."""
    expected = [session.run(f) for f in feeds]
    jobs = [i % len(feeds) for i in range(CALLS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda i: session.run(feeds[i]), jobs))
    for i, got in zip(jobs, results):
        for name, value in expected[i].items():
            np.testing.assert_array_equal(got[name], value)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_one_session_serves_many_threads_and_shapes(rng, quantized):
    graph = _float_cnn(rng)
    if quantized:
        graph = quantize_model(graph, [rng.standard_normal((4, 3, 12, 12)).astype(np.float32) for _ in range(2)])
    feeds = [{"x": rng.standard_normal((n, 3, 12, 12)).astype(np.float32)} for n in (1, 3, 1, 5)]
    session = Session(graph, fallback=False)
    _stress(session, feeds)
    assert 1 <= max(len(lanes) for lanes in session._lanes.values()) <= THREADS


def test_threads_that_fetch_intermediates_get_their_own_buffers(rng):
    graph = _float_cnn(rng)
    inner = graph.nodes[1].outputs[0]
    session = Session(graph, optimize=False)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    both = session.run({"x": x}, fetch=[inner, graph.outputs[0]])
    with ThreadPoolExecutor(THREADS) as pool:
        outs = list(pool.map(lambda k: session.run({"x": x}, fetch=[inner] if k % 2 else None), range(CALLS)))
    for k, got in enumerate(outs):
        name = inner if k % 2 else graph.outputs[0]
        np.testing.assert_array_equal(got[name], both[name])
