"""Quantization error of the presets and the calibration observers, and observer memory.

Run from the repository root::

    python -m bench.quantization [--rows 4096] [--cols 4096] [--values 1000000] [--stream 100000000]

Prints (1) SQNR (dB) and bits per weight (scales included) of each preset on a
Gaussian and on a Student-t (3 degrees of freedom) weight matrix; (2) the error of
per-tensor int8 activations calibrated by each observer on a Student-t sample fed
in batches; (3) each observer's peak traced memory on a long stream generated batch
by batch, against the stream's size.
"""

from __future__ import annotations

import argparse
import tracemalloc

import numpy as np

import lowbit
from lowbit.quantization import grid
from lowbit.quantization.calibration import OBSERVERS, get_observer

SCHEMES = {
    "int8 (per channel)": lowbit.int8(granularity="channel"),
    "int4-g128": lowbit.int4(group_size=128),
    "nf4-g64": lowbit.nf4(group_size=64),
    "pow2-4bit (per channel)": lowbit.pow2(bits=4),
    "ternary (per channel)": lowbit.ternary(),
    "binary (per channel)": lowbit.binary(),
}


def weights(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gaussian": rng.normal(0, 0.02, (rows, cols)).astype(np.float32),
            "student-t(3)": (0.02 * rng.standard_t(3, (rows, cols))).astype(np.float32)}


def sqnr_table(rows: int, cols: int) -> str:
    data = weights(rows, cols)
    header = f"{'scheme':<24} {'bits/w':>6} " + " ".join(f"{name:>14}" for name in data)
    lines = [header, "-" * len(header)]
    for label, scheme in SCHEMES.items():
        cells = []
        bits = None
        for w in data.values():
            qt = lowbit.quantize(w, scheme)
            bits = qt.bits_per_weight
            cells.append(f"{lowbit.compare(w, qt.dequantize())['sqnr_db']:>11.2f} dB")
        lines.append(f"{label:<24} {bits:>6.3f} " + " ".join(cells))
    return "\n".join(lines)


def _batches(total: int, batch: int, seed: int):
    """Student-t (3 dof) float32 batches, generated one at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, total, batch):
        yield rng.standard_t(3, min(batch, total - start)).astype(np.float32)


def calibration_table(values: int, batch: int = 10_000, seed: int = 2026) -> str:
    scheme = lowbit.int8()
    data = np.concatenate(list(_batches(values, batch, seed)))
    lines = [f"{'observer':<16} {'clip range':>20} {'MSE':>10} {'SQNR':>9}", "-" * 58]
    for name in OBSERVERS:
        observer = get_observer(name, scheme)
        for chunk in _batches(values, batch, seed):
            observer.observe(chunk)
        params = observer.qparams()
        lo, hi = observer.range()
        approx = grid.dequantize(grid.quantize(data, scheme, params), scheme, params)
        err = lowbit.compare(data, approx)
        lines.append(f"{name:<16} {f'[{float(lo):.2f}, {float(hi):.2f}]':>20} {err['mse']:>10.4f} "
                     f"{err['sqnr_db']:>6.2f} dB")
    return "\n".join(lines)


def memory_table(values: int, batch: int = 1_000_000) -> str:
    stream_mib = values * 4 / 2**20
    lines = [f"{'observer':<16} {'peak MiB':>9} {'of stream':>10}", "-" * 37]
    for name in ["(batches only)", *OBSERVERS]:
        tracemalloc.start()
        observer = None if name.startswith("(") else get_observer(name, lowbit.int8())
        for chunk in _batches(values, batch, seed=1):
            if observer is not None:
                observer.observe(chunk)
        if observer is not None:
            observer.qparams()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        lines.append(f"{name:<16} {peak:>9.1f} {peak / stream_mib:>9.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--values", type=int, default=1_000_000, help="calibration sample size")
    parser.add_argument("--stream", type=int, default=100_000_000, help="values streamed for the memory table")
    args = parser.parse_args()
    print(f"SQNR of a {args.rows} x {args.cols} weight matrix (higher is better)")
    print(sqnr_table(args.rows, args.cols))
    print(f"\nint8 per-tensor activations, Student-t(3), {args.values} values in batches of 10000")
    print(calibration_table(args.values))
    print(f"\nPeak traced memory over a stream of {args.stream} float32 values ({args.stream * 4 / 2**20:.0f} MiB)")
    print(memory_table(args.stream))


if __name__ == "__main__":
    main()
