"""Turning exact int32 dot products into the caller's output, one tile at a time.

The GEMM driver hands every finished tile to :func:`finish_tile` while it is still
in L1 (int32 outputs without weight zero points skip it: the VNNI micro-kernel
adds ``col_term`` and stores them from its registers). With ``v`` the tile's raw sums of unsigned activation bytes ``a`` times
signed weights ``w``, the zero-point corrected accumulator is (derivation:
expand ``sum_k (a - za)(w - zw)``)::

    y[m, n] = v[m, n] + col_term[n] - w_zp[n] * row_sums[m]
    col_term[n] = -za * sum_k w[n, k] + K * za * w_zp[n] (+ an int32 bias, if any)
    row_sums[m] = sum_k a[m, k]

computed in int64, so it is exact. Then, by ``mode``:

* ``INTEGER``: ``out = y`` (int32; exact when y fits, which the caller checks).
* ``REAL``:    ``out = float32(clip(y * mult[n] + shift[n], lo, hi))``.
* ``QUANT``:   ``out = clip(rint(clip(y * mult[n] + shift[n], lo, hi) + zp), qmin, qmax)``,
  rounding half to even as ONNX QLinearMatMul does.

The float part runs in float64 in the order written, with no contraction, so
``kernels.reference`` reproduces it bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kernels._jit import kernel

INTEGER, REAL, QUANT = 0, 1, 2
MODES = (INTEGER, REAL, QUANT)
_UNUSED = np.zeros(1)


class Epilogue(NamedTuple):
    """How ``kernels.epilogue`` finishes the product (see the module docstring for the formulas)."""

    mode: int
    col_bias: np.ndarray | int = 0  # int64 [N] added to the corrected sums: an int32 bias
    mult: np.ndarray = _UNUSED  # float64 [N]
    shift: np.ndarray = _UNUSED  # float64 [N]
    lo: float = -math.inf
    hi: float = math.inf
    zp: float = 0.0
    qmin: float = 0.0
    qmax: float = 0.0


@kernel
def finish_tile(v, i0, rows, c0, cols, col_term, w_zp, row_sums, row_term, mult, shift, lo, hi, zp, qmin, qmax, mode,
                out):
    """Write ``out[i0:i0+rows, c0:c0+cols]`` from the tile ``v[:rows, :cols]`` (see module docstring).

    ``mode`` is a compile-time constant in every caller, so only its loop is kept;
    each loop is branch-free and vectorises. ``row_term`` is false when ``w_zp`` is
    all zero, which spares the multiply.
    """
    ct = col_term[c0 : c0 + cols]
    wz = w_zp[c0 : c0 + cols]
    for r in range(rows):
        src = v[r]
        dst = out[i0 + r, c0 : c0 + cols]
        rs = row_sums[i0 + r] if row_term else 0
        if mode == INTEGER:
            if row_term:
                for c in range(cols):
                    dst[c] = src[c] + ct[c] - wz[c] * rs
            else:  # the common case: no multiply (vpmullq is slow)
                for c in range(cols):
                    dst[c] = src[c] + ct[c]
            continue
        mu = mult[c0 : c0 + cols]
        sh = shift[c0 : c0 + cols]
        for c in range(cols):
            t = np.float64(src[c] + ct[c] - wz[c] * rs) * mu[c] + sh[c]
            t = t if t > lo else lo
            t = t if t < hi else hi
            if mode == REAL:
                dst[c] = t
            else:
                q = np.rint(t + zp)
                q = q if q > qmin else qmin
                dst[c] = q if q < qmax else qmax
