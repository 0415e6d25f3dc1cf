"""Thread count and the pool that runs kernel tiles in parallel.

Kernels are compiled with ``nogil=True`` and split work into disjoint output
ranges; each range runs on a thread of one shared pool. This keeps the split
explicit (Numba's ``prange`` with ``cache=True`` loads slowly and spreads small
tiles badly) and lets one process setting govern every kernel.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from kernels import _env

_lock = threading.Lock()
_setting: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


@functools.cache
def _available_cores() -> int:
    """Cores this process may run on, read once (a later affinity change is not seen)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """Threads a kernel call may use: ``set_num_threads``, else ``LOWBIT_NUM_THREADS``, else all cores."""
    if _setting is not None:
        return _setting
    return _env.requested_threads() or _available_cores()


def set_num_threads(n: int) -> None:
    """Let every following kernel call use at most ``n`` threads (``n >= 1``)."""
    global _setting
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    _setting = n


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(total)`` into at most ``parts`` contiguous, nearly equal, non-empty ranges."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def run_ranges(fn: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
    """Call ``fn(lo, hi)`` for every range, the first on this thread and the rest on the pool."""
    global _pool, _pool_size
    if len(ranges) == 1:
        fn(*ranges[0])
        return
    with _lock:
        if _pool_size < len(ranges) - 1:
            _pool_size = len(ranges) - 1
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="kernels")
        pool = _pool
    futures = [pool.submit(fn, lo, hi) for lo, hi in ranges[1:]]
    try:
        fn(*ranges[0])
    finally:  # every range has ended when this returns or raises (the first failure)
        errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error


_team_lock = threading.Lock()


def run_team(member: Callable[[int, int], None], nth: int) -> None:
    """Call ``member(ith, nth)`` for every ``ith`` of a team of ``nth`` threads at once (:mod:`kernels.sync`), thread
    0 this one and the rest on the pool. Members wait for each other, so a team must have the pool to itself: while
    another team runs, this one is this thread alone, ``member(0, 1)``."""
    if nth > 1 and _team_lock.acquire(blocking=False):
        try:
            run_ranges(lambda ith, _: member(ith, nth), [(ith, ith + 1) for ith in range(nth)])
        finally:
            _team_lock.release()
    else:
        member(0, 1)


# Waking a pool thread costs ~30 us here and two threads share caches, so a thread
# pays off only for about this much work.
MIN_US_PER_THREAD = 200.0
MIN_TILES_PER_THREAD = 4  # row tiles each thread needs before a split by rows pays (see run_tiled)


def run_split(part: Callable[[int, int], None], count: int, estimate_us: float) -> None:
    """Run ``part(lo, hi)`` over ``range(count)`` (rows, values: independent units), cut into contiguous ranges for
    the threads that ``estimate_us`` (the caller's estimate of the single-thread time) pays for."""
    parts = min(get_num_threads(), int(estimate_us // MIN_US_PER_THREAD))
    run_ranges(part, split(count, parts) if parts > 1 else [(0, count)])


def run_tiled(part: Callable[[int, int, int, int], None], panels: int, m: int, rows: int,
              estimate_us: float) -> None:
    """Run ``part(p0, p1, i0, i1)`` over ``panels`` column panels and ``m`` rows.

    The output is split over threads only when ``estimate_us`` (the caller's
    estimate of the single-thread time) pays for them: by rows in whole tiles of ``rows`` when every thread gets
    :data:`MIN_TILES_PER_THREAD` of them (each thread then reads its own activations and writes whole rows: split
    by panels, both threads read all activations and share the cache lines where their columns meet, measured
    1.7x slower per thread), else by panels, or by rows when there are fewer panels than threads.
    """
    parts = min(get_num_threads(), int(estimate_us // MIN_US_PER_THREAD))
    tiles = -(-m // rows)
    if parts <= 1:
        part(0, panels, 0, m)
    elif panels >= parts and tiles < MIN_TILES_PER_THREAD * parts:
        run_ranges(lambda p0, p1: part(p0, p1, 0, m), split(panels, parts))
    else:
        run_ranges(lambda t0, t1: part(0, panels, t0 * rows, min(m, t1 * rows)), split(tiles, parts))
