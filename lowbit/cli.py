"""The ``lowbit`` command line: ``lowbit info`` and ``lowbit demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np

import kernels
from kernels import dispatch


INFO_SHAPES = ((1, 4096, 4096), (8, 4096, 4096), (1024, 1024, 1024))  # decode, small batch, large GEMM


def _info(args: argparse.Namespace) -> int:
    info = kernels.cpu_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    shapes = ", ".join("x".join(map(str, shape)) for shape in INFO_SHAPES)
    print(f"\nkernels chosen for M x N x K = {shapes}:")
    ops = sorted({variant.op for variant in dispatch.variants()})
    width = max(map(len, ops))
    for op in ops:
        kinds = [dispatch.choose(op, *shape).kind for shape in INFO_SHAPES]
        print(f"  {op:<{width}}  {', '.join(kinds)}")
    return 0


def _best_seconds(fn, repeat: int) -> float:
    fn()  # compile, or load from the cache
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _demo(args: argparse.Namespace) -> int:
    """Quantize a float linear layer to int8, run it, and compare accuracy and speed with float32."""
    rng = np.random.default_rng(0)
    m, n, k = args.m, args.n, args.k
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    # per-tensor asymmetric uint8 activations, per-channel symmetric int8 weights
    x_scale = float(x.max() - x.min()) / 255
    x_zero = int(np.clip(np.rint(-x.min() / x_scale), 0, 255))
    xq = np.clip(np.rint(x / x_scale) + x_zero, 0, 255).astype(np.uint8)
    w_scale = np.abs(w).max(axis=1) / 127
    wq = np.clip(np.rint(w / w_scale[:, None]), -127, 127).astype(np.int8)
    packed = kernels.pack_int8(wq)

    y_int8 = kernels.linear_int8(xq, packed, a_scale=x_scale, a_zero_point=x_zero, w_scale=w_scale)
    y_float = x @ w.T
    err = np.abs(y_int8 - y_float).max() / np.abs(y_float).max()

    t_int8 = _best_seconds(lambda: kernels.gemm_int8(xq, packed), args.repeat)
    t_float = _best_seconds(lambda: x @ w.T, args.repeat)
    ops = 2 * m * n * k
    print(f"int8 linear layer, M={m} N={n} K={k}, {kernels.get_num_threads()} thread(s), "
          f"level {kernels.cpu_info()['active_level']}")
    print(f"  y[0, :4] int8  = {np.array2string(y_int8[0, :4], precision=4)}")
    print(f"  y[0, :4] float = {np.array2string(y_float[0, :4], precision=4)}")
    print(f"  max error relative to max |y|: {err:.2e}")
    print(f"  lowbit gemm_int8     : {ops / t_int8 / 1e9:8.1f} GOPS  ({t_int8 * 1e3:.2f} ms)")
    print(f"  numpy float32 matmul : {ops / t_float / 1e9:8.1f} GFLOP/s  ({t_float * 1e3:.2f} ms)")
    print(f"  speed-up: {t_float / t_int8:.2f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="CPU features, active kernel level, versions, threads")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(run=_info)
    demo = sub.add_parser("demo", help="quantize a linear layer to int8, run it, compare with float32")
    for dim, default in (("m", 512), ("n", 1024), ("k", 1024)):
        demo.add_argument(f"-{dim}", type=int, default=default, help=f"{dim.upper()} (default {default})")
    demo.add_argument("--repeat", type=int, default=10, help="timed repetitions (default 10)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
