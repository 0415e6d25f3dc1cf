"""Fitting scales to data and mapping values to codes and back, for any scheme.

Every function works on whole arrays of any rank. Scale-sharing groups follow the
scheme's granularity: ``param_shape`` is the shape of its scale and zero-point
arrays, ``expand`` broadcasts such an array back over the data, and ``reduce``
applies a reduction within every group.

Uniform grids follow ONNX QuantizeLinear / DequantizeLinear exactly::

    q = clip(rint(x / scale) + zero_point, qmin, qmax)        (half to even)
    x' = (q - zero_point) * scale

in float32 when ``x`` is float32. ``params_from_range`` turns a value range into a
scale and zero point: symmetric grids use ``scale = max|x| / qmax`` (a zero point
in the middle of an unsigned range); asymmetric ones stretch ``[min(lo, 0),
max(hi, 0)]`` over ``[qmin, qmax]`` with ``zero_point = rint(qmin - lo / scale)``,
as DynamicQuantizeLinear does.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np

from lowbit.quantization.scheme import QScheme

TWN_THRESHOLD = 0.7  # Ternary Weight Networks: threshold = 0.7 * mean |x|


class QParams(NamedTuple):
    """Fitted parameters, each of ``param_shape``: scales, zero points (uniform grids)
    and, for ternary grids, the magnitude below which a value becomes 0."""

    scale: np.ndarray
    zero_point: np.ndarray | None = None
    threshold: np.ndarray | None = None


def _axis(scheme: QScheme, ndim: int) -> int:
    if scheme.granularity == "tensor":
        return 0
    if not -ndim <= scheme.axis < ndim:
        raise ValueError(f"axis: {scheme.axis} is out of range for a {ndim}-D tensor")
    return scheme.axis % ndim


def param_shape(shape: tuple[int, ...], scheme: QScheme) -> tuple[int, ...]:
    """Shape of the scale array for data of ``shape``: (), (C,) or the blocked shape."""
    if scheme.granularity == "tensor":
        return ()
    axis = _axis(scheme, len(shape))
    if scheme.granularity == "channel":
        return (shape[axis],)
    blocked = list(shape)
    blocked[axis] = -(-shape[axis] // scheme.group_size)
    return tuple(blocked)


def expand(param: np.ndarray, shape: tuple[int, ...], scheme: QScheme) -> np.ndarray:
    """Broadcast a ``param_shape`` array over data of ``shape`` (as ONNX does for scales)."""
    param = np.asarray(param)
    if scheme.granularity == "tensor":
        return param.reshape(())
    axis = _axis(scheme, len(shape))
    if scheme.granularity == "channel":
        dims = [1] * len(shape)
        dims[axis] = shape[axis]
        return param.reshape(dims)
    return np.repeat(param, scheme.group_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


def reduce(x: np.ndarray, scheme: QScheme, fn: Callable[..., np.ndarray]) -> np.ndarray:
    """``fn(values, axis=-1)`` over every scale group, shaped ``param_shape(x.shape)``.

    Within a group the values form the last axis; the padding that completes the
    last group is NaN, so ``fn`` must be NaN-aware (``np.nanmax``, ...).
    """
    x = np.asarray(x)
    if scheme.granularity == "tensor":
        return np.asarray(fn(x.reshape(1, -1), axis=-1)).reshape(())
    axis = _axis(scheme, x.ndim)
    moved = np.moveaxis(x, axis, -1)
    if scheme.granularity == "channel":
        return np.asarray(fn(moved.reshape(-1, x.shape[axis]).T, axis=-1))
    g = scheme.group_size
    blocks = -(-x.shape[axis] // g)
    padded = np.full(moved.shape[:-1] + (blocks * g,), np.nan, dtype=np.result_type(x.dtype, np.float32))
    padded[..., : x.shape[axis]] = moved
    reduced = fn(padded.reshape(moved.shape[:-1] + (blocks, g)), axis=-1)
    return np.moveaxis(reduced, -1, axis)


def params_from_range(lo: np.ndarray, hi: np.ndarray, scheme: QScheme) -> QParams:
    """Scale and zero point of a uniform grid covering ``[lo, hi]`` (arrays of ``param_shape``)."""
    if scheme.grid != "uniform":
        raise ValueError(f"scheme: params_from_range needs a uniform grid, got {scheme.grid!r}")
    lo = np.minimum(np.asarray(lo, np.float32), np.float32(0))
    hi = np.maximum(np.asarray(hi, np.float32), np.float32(0))
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        amax = np.maximum(-lo, hi)
        half = np.float32((qmax - qmin) / 2 if not scheme.signed else qmax)
        scale = np.where(amax > 0, amax, np.float32(1)) / half
        zero = np.full(scale.shape, 0 if scheme.signed else (qmin + qmax + 1) // 2, np.int32)
        return QParams(scale.astype(np.float32), zero)
    with np.errstate(over="ignore"):
        span = np.where(hi > lo, hi - lo, np.float32(1))
    scale = (span / np.float32(qmax - qmin)).astype(np.float32)
    wide = ~np.isfinite(span)
    if wide.any():  # hi - lo beyond float32 (say +-3e38): the span in float64, its scale still a float32
        scale = np.where(wide, ((hi.astype(np.float64) - lo) / (qmax - qmin)).astype(np.float32), scale)
    zero = np.rint(np.clip(np.float32(qmin) - lo / scale, qmin, qmax)).astype(np.int32)
    return QParams(scale, zero)


def fit(x: np.ndarray, scheme: QScheme) -> QParams:
    """Parameters for quantizing ``x`` itself, without calibration.

    Uniform: the data's min / max (``params_from_range``). Ternary: ``threshold =
    0.7 * mean |x|`` and ``scale = mean |x|`` over the values above it (TWN).
    Binary: ``scale = mean |x|``. pow2 / codebook: ``scale = max |x|``. Non-finite values are an error.
    """
    x = np.asarray(x, np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"x: {int((~finite).sum())} non-finite values (NaN or inf; the first at index {first}) "
                         f"have no code: quantize finite values (np.nan_to_num replaces the others)")
    if scheme.grid == "uniform":
        return params_from_range(reduce(x, scheme, np.nanmin), reduce(x, scheme, np.nanmax), scheme)
    magnitude = np.abs(x)
    if scheme.grid == "binary":
        return QParams(_nonzero(reduce(magnitude, scheme, np.nanmean)))
    if scheme.grid == "ternary":
        threshold = (TWN_THRESHOLD * reduce(magnitude, scheme, np.nanmean)).astype(np.float32)
        above = np.where(magnitude > expand(threshold, x.shape, scheme), magnitude, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group with nothing above its threshold
            scale = reduce(above, scheme, np.nanmean)
        return QParams(_nonzero(np.nan_to_num(scale, nan=0.0)), threshold=threshold)
    return QParams(_nonzero(reduce(magnitude, scheme, np.nanmax)))


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """Scales of all-zero groups become 1: any scale represents zeros, and 1 divides safely."""
    scale = np.asarray(scale, np.float32)
    return np.where(scale > 0, scale, np.float32(1))


def quantize(x: np.ndarray, scheme: QScheme, params: QParams, rng: np.random.Generator | None = None) -> np.ndarray:
    """Integer codes of ``x`` (dtype ``scheme.qtype.dtype``, shape of ``x``)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    scale = expand(params.scale, x.shape, scheme).astype(x.dtype)
    dtype = scheme.qtype.dtype
    if scheme.grid == "binary":
        return np.where(x < 0, -1, 1).astype(dtype)
    if scheme.grid == "ternary":
        threshold = expand(params.threshold, x.shape, scheme)
        return (np.sign(x) * (np.abs(x) > threshold)).astype(dtype)
    if scheme.table is not None:
        table = np.asarray(scheme.table, np.float32)
        midpoints = (table[1:] + table[:-1]) / 2  # nearest entry; a tie goes to the larger one
        return np.searchsorted(midpoints, x / scale, side="right").astype(dtype)
    ratio = x / scale
    if scheme.rounding == "stochastic":
        rng = rng if rng is not None else np.random.default_rng()
        rounded = np.floor(ratio + rng.random(ratio.shape, dtype=np.float32).astype(ratio.dtype))
    else:
        rounded = np.rint(ratio)
    zero = expand(params.zero_point, x.shape, scheme)
    return np.clip(rounded.astype(np.int64) + zero, scheme.qmin, scheme.qmax).astype(dtype)


def dequantize(codes: np.ndarray, scheme: QScheme, params: QParams, dtype=np.float32) -> np.ndarray:
    """Values of ``codes``: ``(q - zero_point) * scale``, ``scale * q`` or ``scale * table[q]``."""
    codes = np.asarray(codes)
    scale = expand(params.scale, codes.shape, scheme)
    if scheme.table is not None:
        return (np.asarray(scheme.table, dtype)[codes] * scale).astype(dtype)
    if scheme.grid in ("binary", "ternary"):
        return (codes.astype(dtype) * scale).astype(dtype)
    zero = expand(params.zero_point, codes.shape, scheme)
    return ((codes.astype(np.int32) - zero).astype(dtype) * scale).astype(dtype)
