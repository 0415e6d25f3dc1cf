"""The GEMM problems every benchmark here runs, and their operands.

Shapes are ``(M, N, K)``: activations ``[M, K]`` times weights ``[N, K]``
transposed. They cover a square GEMM, a prefill-sized batch, a small BERT-base
layer and two single-token (GEMV) LLM projections.
"""

from __future__ import annotations

import numpy as np

Shape = tuple[int, int, int]

SHAPES: tuple[Shape, ...] = (
    (1024, 1024, 1024),
    (256, 4096, 4096),
    (64, 768, 768),
    (1, 4096, 4096),
    (1, 11008, 4096),
)


def label(shape: Shape) -> str:
    """``"MxNxK"``, for tables and test ids."""
    return "x".join(map(str, shape))


def ops(shape: Shape) -> int:
    """Operations in one product, counting a multiply-add as two."""
    m, n, k = shape
    return 2 * m * n * k


def operands(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random full-range ``(a uint8 [M, K], b int8 [N, K])``."""
    m, n, k = shape
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    return a, b
