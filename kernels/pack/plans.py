"""A few prepared plans kept on a packed weight, so that one-shot calls with it prepare once.

``linear_int8(a, packed, ...)``, ``gemm_int4(x, packed)`` and the like build a plan (checked arguments, derived
terms, the chosen variant) and run it. Called again with the same weight and arguments, they find the plan in
the weight's :class:`PlanCache` under a key of everything the plan depends on, and only run it.
"""

from __future__ import annotations

import threading
from typing import Any, Hashable

import numpy as np

PLANS_PER_WEIGHT = 8  # a layer sees a few batch sizes and one quantization: past this, the oldest plan goes


class PlanCache(dict):
    """Plans by key (a dict: ``get`` is a plain dict lookup, atomic), at most ``size`` of them, first in first out;
    :meth:`put` takes a lock, so threads may share it."""

    __slots__ = ("_lock", "size")

    def __init__(self, size: int = PLANS_PER_WEIGHT):
        super().__init__()
        self._lock = threading.Lock()
        self.size = size

    def put(self, key: Hashable, plan: Any) -> Any:
        """Store ``plan`` under ``key`` (dropping the oldest plan when full); returns ``plan``."""
        with self._lock:
            if key not in self and len(self) >= self.size:
                del self[next(iter(self))]
            self[key] = plan
        return plan


def value_key(value: object) -> Hashable:
    """A hashable stand-in for an argument: equal only for equal values of the same type (arrays by dtype, shape
    and bytes, so a changed array makes a new key)."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(value_key(v) for v in value))
    return (type(value), value)
