"""A saved int8 CNN runs in a second process without compiling anything: every kernel and the session's compiled
chain load from the disk caches (Numba's and ``LOWBIT_CACHE_DIR``'s generated sources).

The first process compiles into fresh cache folders (the slow part); the second counts Numba's compile events.
How long the second takes is a benchmark's business (``bench.latency``), not a test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lowbit

PROBE = """
import json, sys
import numpy as np
from numba.core import event
recorder = event.RecordingListener()
event.register("numba:compile", recorder)
import kernels, lowbit
session = lowbit.Session(lowbit.load(sys.argv[1]), threads=1, fallback=False)
x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
(y,) = session.run({"x": x}).values()
((lane,),) = session._lanes.values()
(plan,) = lane.plans.values()
compiled = [ev.data["dispatcher"].py_func.__qualname__ for _, ev in recorder.buffer if ev.is_start]
print(json.dumps({"compiled": compiled, "chained": len(plan.chained), "y": y.tolist(),
                  "sources": kernels._jit.sources_digest()}))
"""


def _cnn(rng: np.random.Generator) -> lowbit.Graph:
    g = lowbit.GraphBuilder({"x": lowbit.TensorSpec((None, 3, 12, 12))})
    h = g.relu(g.conv("x", rng.normal(0, 0.2, (16, 3, 3, 3)), rng.normal(0, 0.1, 16), pads=(1, 1, 1, 1)))
    h = g.max_pool(h, (2, 2), strides=(2, 2))
    h = g.relu(g.conv(h, rng.normal(0, 0.1, (16, 16, 3, 3)), rng.normal(0, 0.1, 16), pads=(1, 1, 1, 1)))
    logits = g.gemm(g.flatten(g.global_average_pool(h)), rng.normal(0, 0.2, (10, 16)), np.zeros(10))
    model = g.build([logits])
    batches = [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(2)]
    return lowbit.quantize_model(model, batches, {"precision": "int8"})


def _probe(path, cache) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache / "numba"), "LOWBIT_CACHE_DIR": str(cache / "lowbit")}
    run = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=900,
                         env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_saved_cnn_runs_in_a_second_process_without_compiling(rng, tmp_path):
    path = tmp_path / "cnn.lowbit"
    lowbit.save(_cnn(rng), path)
    first = _probe(path, tmp_path)
    assert first["compiled"] and first["chained"] >= 4  # fresh folders: everything compiled, most nodes chained
    second = _probe(path, tmp_path)
    if second["sources"] != first["sources"]:  # the caches are stamped with the sources: all of them are stale
        pytest.skip("the kernels' sources changed between the two processes (an edit in this tree)")
    assert second["compiled"] == []
    assert second["y"] == first["y"]
