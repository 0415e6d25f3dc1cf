"""Compare lowbit's int8 GEMM with NumPy float32, ONNX Runtime and the VNNI peak.

Run from the repository root, leaving OpenBLAS free to choose its best kernel
(the variables are read when NumPy loads, so they cannot be cleared from here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.gemm [--json PATH]
        [--threads 1 2] [--shapes 1024,1024,1024 ...] [--repeat N]

The machine may be shared, so contenders are interleaved: every round times each
of them once (best of several calls), and each reports its best round. Ratios
therefore compare measurements taken at nearly the same moments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

import kernels
from bench.contenders import NAMES, build
from bench.peak import vnni_peak_gops
from bench.peers import blas_libraries
from bench.shapes import SHAPES, Shape, label, operands, ops
from bench.timing import OPENBLAS_VARS, cell, interleave, parse_shape, print_table, ratio
from kernels.reference.int8 import gemm_int8_ref

STARTUP_SHAPE: Shape = (64, 768, 768)
STARTUP_CHILD = """
import json, time
start = time.perf_counter()
import kernels
imported = time.perf_counter()
import numpy as np
a = np.ones(({m}, {k}), np.uint8)
b = np.ones(({n}, {k}), np.int8)
called = time.perf_counter()
kernels.gemm_int8(a, b)
done = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "first_call_s": done - called}}))
"""
RATIOS = (("lowbit/ORT", "onnxruntime"), ("lowbit/numpy", "numpy"))


@dataclass(frozen=True)
class Measurement:
    """Best single-call times of every contender on one shape and thread count."""

    shape: Shape
    threads: int
    seconds: dict[str, float]
    peak_gops: float | None  # single-thread VNNI peak, measured for this thread count

    def gops(self, name: str) -> float | None:
        """Giga-ops/s of a contender (GFLOP/s for numpy), None if it did not run."""
        return ops(self.shape) / self.seconds[name] / 1e9 if name in self.seconds else None

    def ratios(self) -> dict[str, float | None]:
        """lowbit's speed over ORT's, NumPy's and the ``threads x`` VNNI peak."""
        lowbit = self.gops("lowbit")
        found = {key: ratio(lowbit, self.gops(name)) for key, name in RATIOS}
        found["lowbit/peak"] = ratio(lowbit, self.peak_gops and self.threads * self.peak_gops)
        return found

    def as_json(self) -> dict:
        """Everything measured, plus the derived speeds and ratios."""
        return {"shape": list(self.shape), "threads": self.threads, "seconds": self.seconds,
                "gops": {name: self.gops(name) for name in self.seconds},
                "peak_gops_per_thread": self.peak_gops, "ratios": self.ratios()}


def measure(shape: Shape, threads: int, rounds: int, peak_gops: float | None) -> Measurement:
    """Interleaved best-of-``rounds`` times of every installed contender."""
    a, b = operands(shape)
    contenders = [c for name in NAMES if (c := build(name, a, b, threads)) is not None]
    best, outputs = interleave(contenders, rounds, threads)
    exact = gemm_int8_ref(a, b)
    if not np.array_equal(outputs["lowbit"], exact):
        raise RuntimeError(f"lowbit's product is wrong on {label(shape)}")
    if "onnxruntime" in outputs and not np.array_equal(outputs["onnxruntime"], exact):
        print(f"note: ONNX Runtime's MatMulInteger is not exact on {label(shape)} on this CPU (without VNNI it adds "
              "pairs of uint8 x int8 products in int16 with saturation); timed all the same", file=sys.stderr)
    return Measurement(shape, threads, best, peak_gops)


def startup_seconds() -> dict[str, float]:
    """``import kernels`` and first ``gemm_int8`` (unpacked weights) times in a fresh process.

    The child runs twice and the second run is reported, so Numba's on-disk cache
    is warm, as it is for every run after a package's first.
    """
    m, n, k = STARTUP_SHAPE
    child = [sys.executable, "-c", STARTUP_CHILD.format(m=m, n=n, k=k)]
    runs = [subprocess.run(child, capture_output=True, text=True, check=True) for _ in range(2)]
    return json.loads(runs[-1].stdout)


def scaling(measurements: list[Measurement]) -> list[dict]:
    """Speed-up of every contender at each thread count over its single-thread speed."""
    single = {m.shape: m for m in measurements if m.threads == 1}
    return [
        {"shape": list(m.shape), "threads": m.threads,
         "speedup": {name: ratio(m.gops(name), single[m.shape].gops(name)) for name in m.seconds}}
        for m in measurements if m.threads != 1 and m.shape in single
    ]


def report(measurements: list[Measurement]) -> None:
    """Print the throughput table, the GEMV latency table and the thread scaling."""
    print("\nThroughput (GOPS; numpy in GFLOP/s; peak is per thread, lowbit/peak uses threads x peak)")
    rows = []
    for m in measurements:
        r = m.ratios()
        rows.append([label(m.shape), str(m.threads), *(cell(m.gops(n), ".1f") for n in NAMES),
                     cell(m.peak_gops, ".0f"), *(cell(r[key], ".2f") for key in r)])
    print_table(["shape", "thr", "lowbit", "numpy", "ORT", "peak", "lowbit/ORT", "lowbit/numpy", "lowbit/peak"], rows)

    gemv = [m for m in measurements if m.shape[0] == 1]
    if gemv:
        print("\nGEMV latency (ms; lowbit/ORT is a time ratio, below 1 means lowbit is faster)")
        rows = [[label(m.shape), str(m.threads),
                 *(cell(m.seconds[n] * 1e3 if n in m.seconds else None, ".3f") for n in NAMES),
                 cell(ratio(m.seconds["lowbit"], m.seconds.get("onnxruntime")), ".2f")] for m in gemv]
        print_table(["shape", "thr", "lowbit", "numpy", "ORT", "lowbit/ORT"], rows)

    speedups = scaling(measurements)
    if speedups:
        print("\nThread scaling (GOPS at thr threads / GOPS at 1 thread)")
        rows = [[label(tuple(s["shape"])), str(s["threads"]), *(cell(s["speedup"].get(n), ".2f") for n in NAMES)]
                for s in speedups]
        print_table(["shape", "thr", "lowbit", "numpy", "ORT"], rows)


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), metavar="M,N,K",
                        help="problems as M,N,K (default: the shapes in bench/shapes.py)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement (default: 5)")
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    blas = blas_libraries()
    overridden = {var: os.environ[var] for var in OPENBLAS_VARS if var in os.environ}
    print(f"cpu: {info['cpu']} ({info['active_level']}), numpy {info['numpy']}, numba {info['numba']}")
    for lib in blas:
        print(f"numpy BLAS: {lib['internal_api']} {lib['version']}, architecture {lib.get('architecture', '?')}")
    for var, value in overridden.items():
        print(f"WARNING: {var}={value} is set and may force a slow OpenBLAS kernel; "
              "rerun with: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.gemm")

    measurements, peaks = [], {}
    for threads in args.threads:
        peaks[threads] = vnni_peak_gops()
        for shape in args.shapes:
            measurements.append(measure(shape, threads, args.repeat, peaks[threads]))
            print(f"measured {label(shape)} on {threads} thread(s)", file=sys.stderr)
    report(measurements)

    startup = startup_seconds()
    print(f"\nFresh process, warm cache: import kernels {startup['import_s'] * 1e3:.0f} ms, "
          f"first gemm_int8 {label(STARTUP_SHAPE)} (packing included) {startup['first_call_s'] * 1e3:.0f} ms")

    if args.json:
        record = {"cpu_info": info, "blas": blas, "openblas_env": overridden, "repeat": args.repeat,
                  "vnni_peak_gops_per_thread": peaks, "results": [m.as_json() for m in measurements],
                  "scaling": scaling(measurements), "startup": startup}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
