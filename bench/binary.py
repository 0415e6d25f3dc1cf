"""Compare lowbit's binary GEMM with NumPy float32 at the same M, N, K, and with the popcount peak.

Run from the repository root, leaving OpenBLAS free to choose its best kernel::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.binary [--json PATH]
        [--threads 1 2] [--shapes 1024,1024,8192 ...] [--repeat N]

Contenders, interleaved round by round as in ``bench.gemm`` (each reports its best
round, so ratios compare measurements taken at nearly the same moments):

* ``binary``: ``kernels.gemm_binary`` on sign bits packed once (int32 output); the table's
  "binary path" is the micro-kernel ``kernels.dispatch`` chose (``avx512-vpopcntdq``: ``vpopcntq``,
  ``avx512-vnni``: Harley-Seal, ``generic``: portable);
* ``bin x int8``: ``kernels.gemm_binary_int8``, binary weights times int8 activations;
* ``numpy``: ``a @ b.T`` in float32 (``bench.peers.numpy_float32``) on the same ±1 values.

Binary GOPS count 2 operations per bit (xor + popcount): ``2 M N K``, the same
count as NumPy's multiply-adds. The peak is the register-bound XNOR-popcount loop
of ``bench.binary_peak``, measured once per thread count in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

import kernels
from kernels import dispatch
from bench.binary_peak import popcount_peak_gops
from bench.contenders import lowbit_threads
from bench.peers import Contender, blas_libraries, numpy_float32
from bench.shapes import Shape, label, ops
from bench.timing import OPENBLAS_VARS, cell, interleave, print_table
from kernels.gemm.binary import gemm_binary, gemm_binary_int8
from kernels.pack.bits import pack_bits

SHAPES: tuple[Shape, ...] = ((1024, 1024, 8192), (1, 1024, 8192))
NAMES = ("binary", "bin x int8", "numpy")


def contenders(shape: Shape, threads: int, seed: int = 0) -> list[Contender]:
    """The three contenders on random ±1 matrices ``x [M, K]``, ``y [N, K]`` (int8 activations for bin x int8)."""
    m, n, k = shape
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array([-1, 1], np.int8), size=(m, k))
    y = rng.choice(np.array([-1, 1], np.int8), size=(n, k))
    a_bits, b_bits = pack_bits(x), pack_bits(y)
    a8 = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    out, out8 = np.empty((m, n), np.int32), np.empty((m, n), np.int32)
    pinned = functools.partial(lowbit_threads, threads)
    return [
        Contender("binary", lambda: gemm_binary(a_bits, b_bits, k, out=out), pinned),
        Contender("bin x int8", lambda: gemm_binary_int8(a8, b_bits, k, out=out8), pinned),
        numpy_float32(x, y, threads),
    ]


def measure(shape: Shape, threads: int, rounds: int) -> dict[str, float]:
    """Interleaved best-of-``rounds`` seconds per contender; checks ``binary`` against NumPy first."""
    best, outputs = interleave(contenders(shape, threads), rounds, threads)
    if not np.array_equal(outputs["binary"], outputs["numpy"].astype(np.int32)):
        raise RuntimeError(f"gemm_binary and NumPy disagree on {label(shape)}")
    return best


def rows_of(results: list[dict]) -> list[list[str]]:
    """Table rows: GOPS of each contender, the binary time, the peak and the ratios."""
    rows = []
    for r in results:
        g = r["gops"]
        peak = r["peak_gops_per_thread"] and r["peak_gops_per_thread"] * r["threads"]
        rows.append([label(tuple(r["shape"])), str(r["threads"]), r["path"], *(cell(g[n], ".1f") for n in NAMES),
                     cell(r["seconds"]["binary"] * 1e3, ".3f"), cell(peak, ".0f"),
                     cell(g["binary"] / g["numpy"], ".1f"), cell(g["bin x int8"] / g["numpy"], ".1f"),
                     cell(peak and g["binary"] / peak, ".2f")])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.binary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--shapes", type=lambda t: tuple(int(p) for p in t.split(",")), nargs="+",
                        default=list(SHAPES), metavar="M,N,K", help="problems (default: 1024,1024,8192 1,1024,8192)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement (default: 5)")
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), features: {', '.join(info['features'])}")
    for lib in blas_libraries():
        print(f"numpy BLAS: {lib['internal_api']} {lib['version']}, architecture {lib.get('architecture', '?')}")
    for var in OPENBLAS_VARS:
        if var in os.environ:
            print(f"WARNING: {var}={os.environ[var]} is set and may force a slow OpenBLAS kernel; rerun with: "
                  "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.binary")

    results = []
    for threads in args.threads:
        peak = popcount_peak_gops()
        for shape in args.shapes:
            seconds = measure(shape, threads, args.repeat)
            results.append({"shape": list(shape), "threads": threads, "seconds": seconds,
                            "path": dispatch.choose("gemm_binary", *shape).kind,
                            "gops": {name: ops(shape) / s / 1e9 for name, s in seconds.items()},
                            "peak_gops_per_thread": peak})
            print(f"measured {label(shape)} on {threads} thread(s)", file=sys.stderr)

    print("\nBinary GEMM (GOPS = 2 M N K / s; numpy in GFLOP/s; peak = threads x register-bound popcount loop)")
    print_table(["shape", "thr", "binary path", *NAMES, "binary ms", "peak", "binary/numpy", "binxint8/numpy",
                 "binary/peak"],
                 rows_of(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_info": info, "blas": blas_libraries(), "repeat": args.repeat, "results": results}, f,
                      indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
