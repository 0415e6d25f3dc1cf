"""Reductions of a float32 row in 16 independent lanes, then over the lanes.

A plain ``total += v[j]`` or ``top = max(top, v[j])`` loop stays scalar: LLVM may not reorder float operations
unless told to (``fastmath``, which this package does not use, see ``kernels._jit``). Sixteen accumulators, lane
``l`` taking ``v[l], v[l + 16], ...``, are sixteen independent chains that LLVM turns into one vector register;
the order of every addition is fixed by the code, so results are the same on every CPU. The caller passes the
lanes (float32 ``[16]`` scratch), so that a loop over rows allocates them once.
"""

from __future__ import annotations

import numpy as np

from kernels._jit import kernel

LANES = 16


@kernel(inline="always")
def lane_sum(v, lanes):
    """``sum(v)`` of a float32 vector, in float32: per lane, then the 16 lane sums in order."""
    lanes[:] = 0
    n = v.size
    full = n - n % LANES
    for j in range(0, full, LANES):
        for lane in range(LANES):
            lanes[lane] += v[j + lane]
    total = np.float32(0.0)
    for lane in range(LANES):
        total += lanes[lane]
    for j in range(full, n):
        total += v[j]
    return total


@kernel(inline="always")
def lane_squares(v, centre, lanes):
    """``sum((v - centre)^2)`` of a float32 vector, in float32, as :func:`lane_sum`."""
    lanes[:] = 0
    n = v.size
    full = n - n % LANES
    for j in range(0, full, LANES):
        for lane in range(LANES):
            c = v[j + lane] - centre
            lanes[lane] += c * c
    total = np.float32(0.0)
    for lane in range(LANES):
        total += lanes[lane]
    for j in range(full, n):
        c = v[j] - centre
        total += c * c
    return total


@kernel(inline="always")
def lane_max(v, lanes):
    """``max(v)`` of a float32 vector (``-inf`` if empty); a NaN is skipped (the callers' results turn NaN by
    other means)."""
    lanes[:] = -np.inf
    n = v.size
    full = n - n % LANES
    for j in range(0, full, LANES):
        for lane in range(LANES):
            t = v[j + lane]
            lanes[lane] = t if t > lanes[lane] else lanes[lane]
    top = lanes.max()
    for j in range(full, n):
        top = v[j] if v[j] > top else top
    return top
