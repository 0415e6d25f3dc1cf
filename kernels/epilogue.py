"""Turning exact int32 dot products into the caller's output, one tile at a time.

The GEMM driver hands every finished tile to :func:`finish_tile` while it is still
in L1. With ``v`` the tile's raw sums of unsigned activation bytes ``a`` times
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

import numpy as np

from kernels._jit import kernel

INTEGER, REAL, QUANT = 0, 1, 2


@kernel
def finish_tile(v, i0, rows, c0, cols, col_term, w_zp, row_sums, mult, shift, lo, hi, zp, qmin, qmax, mode, out):
    """Write ``out[i0:i0+rows, c0:c0+cols]`` from the tile ``v[:rows, :cols]`` (see module docstring).

    One loop per mode, with branch-free clamps, so that LLVM vectorises each.
    """
    for r in range(rows):
        rs = row_sums[i0 + r]
        src = v[r]
        dst = out[i0 + r, c0 : c0 + cols]
        ct = col_term[c0 : c0 + cols]
        wz = w_zp[c0 : c0 + cols]
        if mode == INTEGER:
            for c in range(cols):
                dst[c] = src[c] + ct[c] - wz[c] * rs
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
