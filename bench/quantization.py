"""Quantization error of every preset scheme on Gaussian and heavy-tailed weights.

Run from the repository root::

    python -m bench.quantization [--rows 4096] [--cols 4096]

Prints SQNR (dB) and bits per weight (scales included) of each preset on a
Gaussian and on a Student-t (3 degrees of freedom) weight matrix.
"""

from __future__ import annotations

import argparse

import numpy as np

import lowbit

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    print(f"SQNR of a {args.rows} x {args.cols} weight matrix (higher is better)")
    print(sqnr_table(args.rows, args.cols))


if __name__ == "__main__":
    main()
