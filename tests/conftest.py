"""Shared fixtures: a seeded generator, and every CPU level this machine can run."""

from __future__ import annotations

import numpy as np
import pytest

from tests.levels import level_fixture

level = level_fixture()  # modules testing one family of ops define their own, e.g. level_fixture("gemm_int4")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)
