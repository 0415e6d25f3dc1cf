"""The convolution kernels load from Numba's disk cache in a second process: nothing compiles again.

A driver made per variant (a closure over intrinsics) used to miss the cache in every process
(``kernels.conv.int8_driver.variant`` makes module-level kernels of them instead). The first process
compiles into a fresh cache folder (the slow part: everything compiles from scratch); the second counts
Numba's compile events and the cache folder's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os
import numpy as np
from numba.core import event
recorder = event.RecordingListener()
event.register("numba:compile", recorder)
import kernels
kernels.set_num_threads(1)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (1, 6, 6, 16), dtype=np.uint8)  # NHWC
quant = (0.1, 3)
layers = [((24, 16, 3, 3), {"pads": "same"}), ((24, 16, 1, 1), {}), ((16, 1, 3, 3), {"pads": "same", "group": 16})]
for w, attrs in layers:  # indirect, 1x1 and depthwise
    kernels.qlinear_conv2d(x, *quant, rng.integers(-128, 128, w, dtype=np.int8), 0.01, 0, 0.5, np.uint8(3),
                           layout="NHWC", **attrs)
xf = rng.standard_normal((1, 32, 5, 5)).astype(np.float32)
wf = rng.standard_normal((8, 32, 3, 3)).astype(np.float32)
kernels.conv2d_int4(xf, kernels.pack_conv_int4(wf, group_size=32), pads=(1, 1, 1, 1))
bits = kernels.pack_bits(np.ascontiguousarray(xf.transpose(0, 2, 3, 1)), axis=-1)
kernels.conv2d_binary(bits, np.sign(wf) + (wf == 0), in_channels=32, pads=(1, 1, 1, 1))
compiled = [ev.data["dispatcher"].py_func.__qualname__ for _, ev in recorder.buffer if ev.is_start]
files = sum(len(names) for _, _, names in os.walk(os.environ["NUMBA_CACHE_DIR"]))
print(json.dumps({"compiled": compiled, "files": files, "sources": kernels._jit.sources_digest()}))
"""


def _probe(cache_dir) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tmp_path):
    first = _probe(tmp_path)
    assert first["compiled"]  # a fresh folder: everything compiled
    second = _probe(tmp_path)
    if second["sources"] != first["sources"]:  # the cache is stamped with the sources: all of it is stale now
        pytest.skip("the kernels' sources changed between the two processes (an edit in this tree)")
    assert second["compiled"] == []
    assert second["files"] == first["files"]  # and nothing new was written


def test_concurrent_saves_never_give_a_key_another_overloads_code(tmp_path, monkeypatch):
    """Two processes save different overloads of one function from the same (empty) view of its index, as
    compilers racing on a cold cache do. Numba's numbered files would then hand one key the other's machine
    code; keyed files can only lose an index entry (a cache miss, compiled again)."""
    from kernels._jit import KeyedCacheFile

    first, second = (KeyedCacheFile(str(tmp_path), "kernel-1.py311", "stamp") for _ in range(2))
    first.save(("sig A",), b"code of A")
    with monkeypatch.context() as stale:
        stale.setattr(second, "_load_index", lambda: {})  # it read the index before the first saved
        second.save(("sig B",), b"code of B")
    assert second.load(("sig B",)) == b"code of B"
    assert first.load(("sig A",)) in (None, b"code of A")  # never b"code of B"
    first.save(("sig A",), b"code of A")  # compiled again after the miss
    assert first.load(("sig A",)) == b"code of A" and second.load(("sig B",)) == b"code of B"


CLOSURES = '''
import kernels  # makes Numba's function ids unique across processes
import numba
import numpy as np


def make(k):
    def closure(x):  # too long for LLVM to inline: it stays a weak symbol of the kernels that call it
        s = 0.0
        for i in range(x.size):
            v = x[i]
{steps}
            s += v
        return s
    return numba.njit(closure)


one, two = make(1.0), make(2.0)


@numba.njit(cache=True)
def call_one(x):
    return one(x)


@numba.njit(cache=True)
def call_two(x):
    return two(x)
'''

CALL = """
import sys
import numpy as np
import closures
x = np.linspace(0.0, 1.0, 50)
print(*[getattr(closures, name)(x) for name in sys.argv[1:]])
"""


def test_closures_of_one_name_keep_their_code_through_the_cache(tmp_path):
    """Process A caches a kernel calling closure ``one``, process B one calling ``two`` (one qualname, one
    signature, compiled in the same order); process C loads both kernels. With Numba's per-process id counter
    both closures had one symbol name and C ran ``one`` for both (numba issue 10486)."""
    steps = "\n".join(f"            v = np.sin(v * {j + 1.5} + k) if v > {j / 100} else np.cos(v - {j + 0.25} * k)"
                      for j in range(80))
    (tmp_path / "closures.py").write_text(CLOSURES.format(steps=steps))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def call(*names: str) -> list[float]:
        run = subprocess.run([sys.executable, "-c", CALL, *names], capture_output=True, text=True, timeout=300,
                             env=env)
        assert run.returncode == 0, run.stderr
        return [float(v) for v in run.stdout.split()]

    alone = call("call_one") + call("call_two")  # each compiled and cached by its own process
    assert alone[0] != alone[1]
    assert call("call_one", "call_two") == alone  # both loaded from the cache
