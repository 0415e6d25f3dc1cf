"""Timing and table helpers shared by the comparison scripts.

The machine may be shared, so contenders are interleaved: every round times each
of them once (best of several calls), and each reports its best round. Ratios
therefore compare measurements taken at nearly the same moments.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import numpy as np

from bench.peers import Contender
from bench.shapes import Shape

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ROUND_SECONDS = 0.1  # time one contender gets in one round
MIN_CALLS, MAX_CALLS = 3, 50  # calls per contender per round
# OpenBLAS and ORT workers busy-wait after a parallel call (OpenBLAS for ~2**28
# cycles); on a small machine they would steal cores from the next contender.
SETTLE_SECONDS = 0.2


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x and y else None


def best_call(call: Callable[[], object], calls: int) -> float:
    """The shortest of ``calls`` timed calls, in seconds."""
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def warm_up(contender: Contender) -> tuple[np.ndarray, int]:
    """Compile (or load) the contender; return its output and how many calls fill a round."""
    with contender.pinned():
        out = contender.call().copy()
        seconds = best_call(contender.call, 1)
    return out, max(MIN_CALLS, min(MAX_CALLS, int(ROUND_SECONDS / seconds)))


def interleave(contenders: list[Contender], rounds: int, threads: int = 1) -> tuple[dict[str, float], dict]:
    """Best-of-``rounds`` seconds per contender, timed round-robin, and each one's first output."""
    calls, outputs = {}, {}
    for contender in contenders:
        outputs[contender.name], calls[contender.name] = warm_up(contender)
    best = dict.fromkeys(calls, math.inf)
    for _ in range(rounds):
        for contender in contenders:
            with contender.pinned():
                best[contender.name] = min(best[contender.name], best_call(contender.call, calls[contender.name]))
            if threads > 1:
                time.sleep(SETTLE_SECONDS)
    return best, outputs


def loop_rate(run: Callable[[int], object], ops_per_iteration: int, seconds: float = 0.3) -> float:
    """Giga-ops/s of ``run(iterations)``: sized to ``seconds / 3``, best of three after a warm-up."""
    def timed(iterations: int) -> float:
        start = time.perf_counter()
        run(iterations)
        return time.perf_counter() - start

    timed(1)  # compile, or load from Numba's cache
    iterations = 1 << 12
    while (elapsed := timed(iterations)) < 0.01:
        iterations *= 4
    iterations = max(1, int(iterations * seconds / 3 / elapsed))
    return iterations * ops_per_iteration / min(timed(iterations) for _ in range(3)) / 1e9


def benchmark_contender(benchmark, group: str, contender: Contender, ops: int) -> None:
    """Time ``contender`` with pytest-benchmark, warmed up first (compiled, caches hot), and record GOPS."""
    benchmark.group = group
    with contender.pinned():
        contender.call()
        benchmark(contender.call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gops"] = ops / benchmark.stats.stats.min / 1e9


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(text.rjust(width) for text, width in zip(row, widths)))


def save_json(path: str | None, record: dict) -> None:
    """Write ``record`` (every number of a run, with the CPU) to ``path`` as JSON, when a path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {path}")


def parse_shape(text: str) -> Shape:
    """``"M,N,K"`` as a shape, for ``--shapes`` options."""
    m, n, k = (int(v) for v in text.split(","))
    return m, n, k


def sizes(form: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type reading sizes written like ``form`` (``"MxKxN"``: that many positive ints joined by x)."""
    count = len(form.split("x"))

    def parse(text: str) -> tuple[int, ...]:
        try:
            parts = tuple(int(p) for p in text.lower().split("x"))
        except ValueError:
            parts = ()
        if len(parts) != count or min(parts) < 1:
            raise argparse.ArgumentTypeError(f"expected {form} with positive sizes, got {text!r}")
        return parts

    return parse


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every comparison of one kernel takes: ``--threads``, ``--repeat``, ``--json``."""
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds per measurement (default: 7)")
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
