"""NumPy oracles of the int8 products (``kernels.gemm_int8``, ``kernels.linear_int8``).

Nothing here is fast. Integer results are exact (int64 arithmetic); the float
steps follow the same formulas, in the same order, as ``kernels.epilogue``, so
integer outputs of the kernels must equal these bit for bit.
"""

from __future__ import annotations

import numpy as np


def gemm_int8_ref(a: np.ndarray, b: np.ndarray, a_zero_point: int = 0, b_zero_point=0) -> np.ndarray:
    """``(a - za) @ (b - zb).T`` in int64; ``b`` is ``[N, K]``, ``zb`` a scalar or ``[N]``."""
    zb = np.asarray(b_zero_point, dtype=np.int64).reshape(-1, 1) if np.ndim(b_zero_point) else b_zero_point
    return (a.astype(np.int64) - a_zero_point) @ (b.astype(np.int64) - zb).T


def linear_int8_ref(a, w, *, a_scale, a_zero_point, w_scale, w_zero_point=0, bias=None, activation=None,
                    out_dtype=np.float32, out_scale=None, out_zero_point=None) -> np.ndarray:
    """The fused quantized linear layer of ``kernels.linear_int8``: :func:`finish_ref` of the exact product."""
    return finish_ref(gemm_int8_ref(a, w, a_zero_point, w_zero_point), a_scale=a_scale, w_scale=w_scale, bias=bias,
                      activation=activation, out_dtype=out_dtype, out_scale=out_scale, out_zero_point=out_zero_point)


def finish_ref(acc, *, a_scale, w_scale, bias=None, activation=None, out_dtype=np.float32, out_scale=None,
               out_zero_point=None) -> np.ndarray:
    """Rescale, bias, activation and requantization of exact accumulators ``acc [M, N]``, step by step.

    ``t = acc * m + shift`` in float64 where ``m = a_scale * w_scale [/ out_scale]``
    is formed in the scales' dtype and ``shift = bias [/ out_scale]`` (a float bias;
    an int32 bias is added to ``acc``); the activation clips ``t`` (relu: at 0;
    relu6: also at 6; ("clip", lo, hi): to [lo, hi]; all [/ out_scale]); a float output is ``float32(t)``, an integer
    one ``clip(rint(t + out_zero_point))``.
    """
    n = acc.shape[1]
    out_dtype = np.dtype(out_dtype)
    quantized = out_dtype.kind in "iu"
    unit = float(np.asarray(out_scale)) if quantized else 1.0
    mult = np.asarray(a_scale) * np.asarray(w_scale)
    if quantized:
        mult = mult / np.asarray(out_scale)
    mult = np.broadcast_to(np.asarray(mult, np.float64).reshape(-1), (n,))
    shift = np.zeros(n)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype == np.int32:
            acc = acc + bias.astype(np.int64)
        else:
            shift = bias.astype(np.float64) / unit
    t = acc.astype(np.float64) * mult + shift
    named = {None: (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}
    lo, hi = activation[1:] if isinstance(activation, tuple) else named[activation]
    t = np.minimum(np.maximum(t, lo / unit), hi / unit)
    if not quantized:
        return t.astype(np.float32)
    info = np.iinfo(out_dtype)
    zp = 0 if out_zero_point is None else int(out_zero_point)
    return np.clip(np.rint(t + zp), info.min, info.max).astype(out_dtype)
