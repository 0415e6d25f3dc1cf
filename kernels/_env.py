"""Every environment knob that ``kernels`` honours, read in one place.

Values are read at call time, never frozen into compiled code (Numba's cache
treats globals as constants), so a test can change them with ``monkeypatch``.
"""

from __future__ import annotations

import os

ISA_VAR = "LOWBIT_ISA"
THREADS_VAR = "LOWBIT_NUM_THREADS"


def requested_isa() -> str | None:
    """The level named by ``LOWBIT_ISA`` (lower-cased), or None when unset or empty."""
    value = os.environ.get(ISA_VAR, "").strip().lower()
    return value or None


def requested_threads() -> int | None:
    """The thread count named by ``LOWBIT_NUM_THREADS``, or None when unset."""
    value = os.environ.get(THREADS_VAR, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{THREADS_VAR} must be a positive integer, got {value!r}")
    return count
