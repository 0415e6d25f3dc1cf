"""NumPy oracles of 2-D convolutions, in NCHW as ONNX: integer (or ±1) operands, and float32 ones.

Integer operands are exact: int64 arithmetic, one tap at a time; float operands
take float64 arithmetic, the same way. The padded border takes the value
``pad_value`` (the activation zero point for quantized convolutions, which makes
``x - x_zero_point`` vanish there, as ONNX ConvInteger and QLinearConv specify).
"""

from __future__ import annotations

import numpy as np


def conv2d_ref(x: np.ndarray, w: np.ndarray, *, x_zero_point=0, w_zero_point=0, strides=(1, 1),
               pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, pad_value=None) -> np.ndarray:
    """``y[n, o, oy, ox] = sum_{c, ky, kx} (xp[n, g C' + c, oy sh + ky dh, ox sw + kx dw] - zx) (w[o, c, ky, kx] - zw[o])``.

    ``x`` is ``[N, C, H, W]``, ``w`` is ``[O, C / group, KH, KW]``, ``pads`` is
    ``(top, left, bottom, right)``, ``g = o // (O / group)``, and ``xp`` is ``x``
    padded with ``pad_value`` (default ``x_zero_point``). ``w_zero_point`` is a
    scalar or ``[O]``. Returns int64 ``[N, O, OH, OW]`` (float64 when ``x`` or ``w`` is float).
    """
    acc = np.float64 if np.result_type(x, w).kind == "f" else np.int64
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    fill = x_zero_point if pad_value is None else pad_value
    xp = np.full((n, c, h + top + bottom, wd + left + right), fill, acc)
    xp[:, :, top : top + h, left : left + wd] = x
    xp -= x_zero_point
    zw = np.asarray(w_zero_point, acc).reshape(-1, 1, 1, 1) if np.ndim(w_zero_point) else w_zero_point
    wk = w.astype(acc) - zw
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    og = o // group
    y = np.zeros((n, o, oh, ow), acc)
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        ws = wk[g * og : (g + 1) * og]
        for ky in range(kh):
            for kx in range(kw):
                patch = xs[:, :, ky * dh : ky * dh + sh * (oh - 1) + 1 : sh, kx * dw : kx * dw + sw * (ow - 1) + 1 : sw]
                y[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, ky, kx])
    return y


def conv2d_float32_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, *, strides=(1, 1),
                       pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, lo: float = -np.inf,
                       hi: float = np.inf) -> np.ndarray:
    """ONNX Conv with zero padding, then ``+ bias[o]`` and ``clip(., lo, hi)`` (NaN stays NaN), in float64.

    Arguments as :func:`conv2d_ref`; returns float64 ``[N, O, OH, OW]``.
    """
    y = conv2d_ref(x.astype(np.float64), w.astype(np.float64), strides=strides, pads=pads, dilations=dilations,
                   group=group)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return np.clip(y, lo, hi)
