"""``lowbit bench``: each kernel family against NumPy float32 on the same problem, measured in one run.

A quick, installed-package view of what the repository's ``bench/`` measures in
depth (peers such as ONNX Runtime live there). Every row times lowbit's kernel
and NumPy's float32 ``matmul`` of the same M x N x K (for a convolution, its
im2col matrix product), interleaved round by round, best of each; the ratio is
NumPy's time over lowbit's.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

import kernels
from lowbit.blas import blas_limit

ROUNDS = 5


def _best(call: Callable[[], object], seconds: float = 0.05) -> float:
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    best = float("inf")
    for _ in range(max(3, min(50, int(seconds / once)))):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _cases(rng: np.random.Generator) -> list[tuple[str, tuple[int, int, int], Callable[[], object]]]:
    """``(name, (M, N, K), lowbit call)`` for each kernel family, operands prepared once."""
    a8 = rng.integers(0, 256, (256, 1024), dtype=np.uint8)
    w8 = kernels.pack_int8(rng.integers(-128, 128, (1024, 1024), dtype=np.int8))
    v8 = rng.integers(0, 256, (1, 4096), dtype=np.uint8)
    wv = kernels.pack_int8(rng.integers(-128, 128, (4096, 4096), dtype=np.int8))
    xf = rng.standard_normal((1, 4096), dtype=np.float32)
    w4 = kernels.pack_int4(rng.standard_normal((4096, 4096), dtype=np.float32), 128)
    wt = kernels.pack_ternary(rng.standard_normal((4096, 4096), dtype=np.float32))
    x_bits = kernels.pack_bits(rng.standard_normal((256, 4096), dtype=np.float32))
    w_bits = kernels.pack_bits(rng.standard_normal((1024, 4096), dtype=np.float32))
    x_conv = rng.integers(0, 256, (1, 56, 56, 64), dtype=np.uint8)
    conv = kernels.qlinear_conv2d_plan(rng.integers(-128, 128, (64, 64, 3, 3), dtype=np.int8), x_conv.shape,
                                       0.02, 128, 0.01, 0, 0.5, 128, pads="same", layout="NHWC")
    conv_out = np.empty(conv.out_shape, np.uint8)
    signs = kernels.pack_bits(rng.choice(np.array([-1, 1], np.int8), (1, 14, 14, 256)), axis=-1)
    wb = kernels.pack_conv_binary(rng.choice(np.array([-1, 1], np.int8), (256, 256, 3, 3)))
    out8, outv = np.empty((256, 1024), np.int32), np.empty((1, 4096), np.int32)
    outf, outb = np.empty((1, 4096), np.float32), np.empty((256, 1024), np.int32)
    outc = np.empty((1, 14, 14, 256), np.int32)
    return [
        ("int8 GEMM", (256, 1024, 1024), lambda: kernels.gemm_int8(a8, w8, out=out8)),
        ("int8 GEMV", (1, 4096, 4096), lambda: kernels.gemm_int8(v8, wv, out=outv)),
        ("int4 GEMV (g128)", (1, 4096, 4096), lambda: kernels.gemm_int4(xf, w4, out=outf)),
        ("ternary GEMV", (1, 4096, 4096), lambda: kernels.gemm_ternary(xf, wt, out=outf)),
        ("binary GEMM", (256, 1024, 4096), lambda: kernels.gemm_binary(x_bits, w_bits, 4096, out=outb)),
        ("int8 conv 3x3 64@56 NHWC", (56 * 56, 64, 576), lambda: conv(x_conv, conv_out)),
        ("binary conv 3x3 256@14", (196, 256, 2304), lambda: kernels.conv2d_binary(
            signs, wb, in_channels=256, pads="same", out=outc)),
    ]


def bench(threads: int | None = None, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Measure every case; rows of ``name, shape, lowbit_gops, numpy_gflops, ratio``. ``progress`` is told each case
    as it starts (the first call of a kernel may compile it)."""
    previous = kernels.get_num_threads()
    if threads:
        kernels.set_num_threads(threads)
    try:
        with blas_limit(threads):
            cases = _cases(np.random.default_rng(seed))
            rows = []
            for i, (name, shape, call) in enumerate(cases, start=1):
                if progress is not None:
                    progress(f"[{i}/{len(cases)}] {name} {'x'.join(map(str, shape))}")
                rows.append(_measure(name, shape, call, np.random.default_rng(seed)))
            return rows
    finally:
        kernels.set_num_threads(previous)


def _measure(name: str, shape: tuple[int, int, int], call: Callable[[], object], rng: np.random.Generator) -> dict:
    m, n, k = shape
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    ours = theirs = float("inf")
    for _ in range(ROUNDS):
        ours = min(ours, _best(call))
        theirs = min(theirs, _best(lambda: np.matmul(a, b.T, out=out)))
    ops = 2 * m * n * k
    return {"name": name, "shape": shape, "lowbit_gops": ops / ours / 1e9, "numpy_gflops": ops / theirs / 1e9,
            "ratio": theirs / ours}


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<26} {'M x N x K':>18} {'lowbit GOPS':>12} {'numpy GFLOP/s':>14} {'ratio':>7}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<26} {shape:>18} {r['lowbit_gops']:12.1f} {r['numpy_gflops']:14.1f} "
                     f"{r['ratio']:7.2f}")
    return "\n".join(lines)
