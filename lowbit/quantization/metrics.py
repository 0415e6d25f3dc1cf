"""Error metrics between a reference array and its quantized approximation.

All take ``(reference, approx)`` of one shape and compute in float64:

    mse       = mean((r - a)^2)
    sqnr_db   = 10 log10(mean(r^2) / mse)            (inf when exact)
    cosine    = <r, a> / (|r| |a|)
    max_abs   = max |r - a|
    relative  = |r - a| / |r|                        (Frobenius norms)
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def _pair(reference: np.ndarray, approx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, a = np.asarray(reference, np.float64), np.asarray(approx, np.float64)
    if r.shape != a.shape:
        raise ValueError(f"approx: expected the reference's shape {r.shape}, got {a.shape}")
    return r, a


def mse(reference: np.ndarray, approx: np.ndarray) -> float:
    r, a = _pair(reference, approx)
    return float(np.mean((r - a) ** 2))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in decibels."""
    r, a = _pair(reference, approx)
    noise = np.mean((r - a) ** 2)
    return math.inf if noise == 0 else float(10 * np.log10(np.mean(r**2) / noise))


def cosine(reference: np.ndarray, approx: np.ndarray) -> float:
    r, a = _pair(reference, approx)
    norms = np.linalg.norm(r) * np.linalg.norm(a)
    return 1.0 if norms == 0 else float(np.dot(r.ravel(), a.ravel()) / norms)


def max_abs(reference: np.ndarray, approx: np.ndarray) -> float:
    r, a = _pair(reference, approx)
    return float(np.max(np.abs(r - a), initial=0.0))


def relative(reference: np.ndarray, approx: np.ndarray) -> float:
    r, a = _pair(reference, approx)
    norm = np.linalg.norm(r)
    return 0.0 if norm == 0 and np.linalg.norm(a) == 0 else float(np.linalg.norm(r - a) / norm)


METRICS = {"mse": mse, "sqnr_db": sqnr_db, "cosine": cosine, "max_abs": max_abs, "relative": relative}


def compare(reference: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one pair."""
    return {name: fn(reference, approx) for name, fn in METRICS.items()}


def report(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A readable table of :func:`compare` for many named ``(reference, approx)`` pairs."""
    header = ["tensor", *METRICS]
    rows = [[name, *(f"{v:.4g}" for v in compare(r, a).values())] for name, (r, a) in pairs.items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
