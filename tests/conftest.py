"""Shared fixtures: a seeded generator, and every CPU level this machine can run."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import cpu, dispatch

# Each level some variant is written for, that this CPU supports: the portable
# level is always among them, so its kernels are tested on every machine.
TESTED_LEVELS = [lv for lv in cpu.supported_levels() if any(v.level == lv for v in dispatch.variants())]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)


@pytest.fixture(params=TESTED_LEVELS, ids=lambda lv: lv.name)
def level(request, monkeypatch) -> cpu.Level:
    """Run the test with ``LOWBIT_ISA`` forcing one level (the portable one included)."""
    monkeypatch.setenv("LOWBIT_ISA", request.param.name)
    return request.param
