"""NumPy oracle of the ternary product (``kernels.gemm_ternary``): the grouped int4 oracle with codes -1..1."""

from __future__ import annotations

import numpy as np

from kernels.reference.int4 import gemm_grouped_ref


def gemm_ternary_ref(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, *, group_size: int | None = None):
    """``kernels.gemm_ternary`` for weights ``scales[n, g] * codes[n, k]`` (per channel when ``group_size`` is None)."""
    return gemm_grouped_ref(x, codes, np.asarray(scales, np.float32), 0, group_size or codes.shape[1])
