"""Compiled kernels are cached on disk and invalidated by any change to the package's sources."""

from __future__ import annotations

import subprocess
import sys

from kernels import _jit
from kernels.gemm.driver import DRIVERS

PROBE = (  # the compiled function a small gemm_int8 call makes: one row kernel of kernels.gemm.int8.LINEAR
    "import numpy as np, kernels; from kernels.gemm.int8 import LINEAR;"
    "kernels.gemm_int8(np.ones((2, 8), np.uint8), np.ones((3, 8), np.int8));"
    "kind = kernels.dispatch.choose('gemm_int8', 2, 3, 8).kind;"
    "s = LINEAR[kind, 0].stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))"
)


def test_kernels_are_stamped_with_the_whole_package():
    locator = DRIVERS["generic", 0]._cache._impl.locator
    assert type(locator).__name__.startswith("Package")
    assert locator.get_source_stamp() == _jit.sources_digest()


def test_second_process_loads_from_cache():
    runs = [subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    hits, misses = map(int, runs[1].stdout.split())
    assert (hits, misses) == (1, 0)
