"""NumPy oracles of the quantized poolings (``kernels.conv.pool``), in NCHW as ONNX.

Nothing here is fast. Window maxima and sums are exact (int64, tap by tap over a
padded copy); the average's rescale is :func:`kernels.reference.int8.finish_ref`
with the multiplier ``x_scale / (y_scale * count)`` formed as the kernels form it,
so integer outputs must equal the kernels' bit for bit.
"""

from __future__ import annotations

import numpy as np

from kernels.reference.int8 import finish_ref


def pool_out_size(size: int, k: int, s: int, d: int, p0: int, p1: int, ceil_mode: bool) -> int:
    """ONNX output length: ``(size + p0 + p1 - d (k - 1) - 1) / s + 1`` rounded down, or up when
    ``ceil_mode`` unless the last window would then start in the end padding."""
    span = size + p0 + p1 - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    return out - 1 if (out - 1) * s >= size + p0 else out


def _windows(x, kernel_shape, strides, pads, dilations, ceil_mode):
    """Per tap: the window values (int64, 0 outside the input), inside-input and inside-padding masks."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_shape, strides, dilations
    top, left, bottom, right = pads
    oh = pool_out_size(h, kh, sh, dh, top, bottom, ceil_mode)
    ow = pool_out_size(w, kw, sw, dw, left, right, ceil_mode)
    ph, pw = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1  # reach incl. ceil overhang
    ph, pw = max(ph, top + h + bottom), max(pw, left + w + right)
    values = np.zeros((n, c, ph, pw), np.int64)
    values[:, :, top : top + h, left : left + w] = x
    real = np.zeros((ph, pw), bool)
    real[top : top + h, left : left + w] = True
    padded = np.zeros((ph, pw), bool)
    padded[: top + h + bottom, : left + w + right] = True
    for ky in range(kh):
        for kx in range(kw):
            rows = slice(ky * dh, ky * dh + sh * (oh - 1) + 1, sh)
            cols = slice(kx * dw, kx * dw + sw * (ow - 1) + 1, sw)
            yield values[:, :, rows, cols], real[rows, cols], padded[rows, cols]


def max_pool2d_ref(x: np.ndarray, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                   ceil_mode: bool = False) -> np.ndarray:
    """``y[n, c, oy, ox] = max x[n, c, oy sh + ky dh - top, ox sw + kx dw - left]`` over the taps inside ``x``.

    ``x`` is an integer ``[N, C, H, W]``, ``pads`` is ``(top, left, bottom, right)``;
    returns ``[N, C, OH, OW]`` of ``x``'s dtype.
    """
    best = None
    for v, real, _ in _windows(x, kernel_shape, strides, pads, dilations, ceil_mode):
        v = np.where(real, v, np.iinfo(np.int64).min)
        best = v if best is None else np.maximum(best, v)
    return best.astype(x.dtype)


def _requantize(sums, counts, x_scale, y_scale, y_zero_point, dtype):
    """``clip(rint(sums * (x_scale / (y_scale * count)) + y_zero_point))`` per output pixel, by finish_ref."""
    n, c, oh, ow = sums.shape
    y = np.empty((n, oh, ow, c), dtype)
    rows = sums.transpose(0, 2, 3, 1)
    for count in np.unique(counts):
        at = counts == count
        y[:, at] = finish_ref(rows[:, at].reshape(-1, c), a_scale=np.float64(x_scale), w_scale=np.float64(1.0),
                              out_dtype=dtype, out_scale=np.float64(y_scale) * count,
                              out_zero_point=y_zero_point).reshape(n, -1, c)
    return y.transpose(0, 3, 1, 2)


def avg_pool2d_ref(x: np.ndarray, kernel_shape, x_scale, x_zero_point, y_scale, y_zero_point, strides=(1, 1),
                   pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode: bool = False,
                   count_include_pad: bool = False) -> np.ndarray:
    """Quantized average pool (``kernels.conv.pool.avg_pool2d``): exact window sums, one rescale.

    ``S = sum (x - x_zero_point)`` over the taps inside ``x`` (int64); ``count`` is
    their number, or with ``count_include_pad`` the number of taps inside the padded
    input (a padded tap adds 0 to ``S``); then
    ``y = clip(rint(S * (x_scale / (y_scale * count)) + y_zero_point))``.
    """
    sums, counts = 0, 0
    for v, real, padded in _windows(x, kernel_shape, strides, pads, dilations, ceil_mode):
        sums = sums + np.where(real, v - x_zero_point, 0)
        counts = counts + (padded if count_include_pad else real).astype(np.int64)
    return _requantize(sums, counts, x_scale, y_scale, y_zero_point, x.dtype)


def global_avg_pool2d_ref(x: np.ndarray, x_scale, x_zero_point, y_scale, y_zero_point) -> np.ndarray:
    """:func:`avg_pool2d_ref` with one window covering all of ``H x W``: returns ``[N, C, 1, 1]``."""
    sums = (x.astype(np.int64) - x_zero_point).sum(axis=(2, 3), keepdims=True)
    counts = np.full((1, 1), x.shape[2] * x.shape[3], np.int64)
    return _requantize(sums, counts, x_scale, y_scale, y_zero_point, x.dtype)
