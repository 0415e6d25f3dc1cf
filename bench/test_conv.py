"""Single-thread microbenchmarks of every convolution contender of ``bench.conv`` on every layer.

Not part of the default test run (``testpaths`` is ``tests``)::

    python -m pytest bench/test_conv.py --benchmark-only
"""

from __future__ import annotations

import pytest

from bench.conv import LAYERS, NAMES, Layer, contenders
from bench.timing import benchmark_contender


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name.replace(" ", "-"))
@pytest.mark.parametrize("name", NAMES)
def test_conv(benchmark, layer: Layer, name: str) -> None:
    contender = next((c for c in contenders(layer, threads=1) if c.name == name), None)
    if contender is None:
        pytest.skip(f"{name} does not apply to {layer.name}, or is not installed")
    benchmark_contender(benchmark, f"conv {layer.name}", contender, layer.ops)
