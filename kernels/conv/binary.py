"""Binary (XNOR-popcount) 2-D convolution over sign bits packed by ``kernels.pack.bits``.

Activations are NHWC sign bits, ``x_bits = kernels.pack_bits(x_nhwc, axis=-1)``
(``[N, H, W, ceil(C / 64)]`` uint64, set bit = -1; the channels must be the packed,
innermost axis, so there is no NCHW form and no ``layout`` argument); weights are
±1 OIHW, packed once by :func:`kernels.pack.conv_binary.pack_conv_binary`. The
exact result is::

    y[n, oy, ox, o] = sum_{ky, kx, c} xp[n, oy sh + ky dh - pt, ox sw + kx dw - pl, c] * w[o, c, ky, kx]

with ``xp`` the input padded with ``pad_value``. The border costs nothing for +1
(zero words in the padded image, ``dot = k - 2 popcount(x ^ w)`` with ``k = KH KW C``);
for 0 or -1 the outputs whose window leaves the image are corrected by
``(pad_value - 1) * sum of w`` over the taps outside (``tap_sums`` of the packed
weights). Outputs (fused per block of output pixels, see ``kernels.conv.binary_driver``):

* int32 ``y`` (default);
* float32 ``clip(y * multiplier[o] + bias[o], lo, hi)`` (any of ``multiplier``,
  ``bias``, ``clamp``; computed in float64 by ``kernels.epilogue``), a folded batch norm;
* ``thresholds``: sign bits of ``y - thresholds[o]`` packed as ``kernels.pack_bits``
  does (bit set where ``y < thresholds[o]``, as ``kernels.gemm_binary_to_bits``),
  the input of a following binary layer.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from kernels import _validate, dispatch, epilogue, threads
from kernels.conv.binary_driver import BITS, DRIVERS, SLOT_WORDS, block_pixels, border_corrections, padded_slots
from kernels.conv.geometry import conv_geometry
from kernels.gemm.binary import check_thresholds
from kernels.pack.bits import check_padding_bits, word_count
from kernels.pack.conv_binary import PackedConvBinary, check_packed_conv_binary, pack_conv_binary

MAX_K = 2**31 - 1  # |y| <= KH * KW * C must fit int32
RATE_OPS_PER_US = 1200e3  # single-thread binary GOPS, for the thread-split estimate
PAD_VALUES = (-1, 0, 1)
_UNUSED = np.zeros(1)
_UNUSED_INT = np.zeros(1, np.int64)
_NO_BORDER = np.zeros(0, np.int32)
_NO_CORR = np.zeros((0, 1), np.int32)


class _Plan(NamedTuple):
    """What a call needs besides its arrays, derived once per shape, attributes and output mode."""

    rows: int  # output pixels, N * OH * OW
    k: int  # values per filter, KH * KW * C
    pads: tuple[int, int, int, int]
    window: tuple  # ConvGeometry.window()
    slots_shape: tuple[int, ...]  # the padded image of kernels.conv.binary_driver.padded_slots
    block: int
    out_shape: tuple[int, ...]
    out_dtype: np.dtype
    zeros: np.ndarray  # float64 [O], read only
    estimate_us: float


def _make_plan(shape_nhwc: tuple, kernel_hw: tuple, out_channels: int, strides, pads, dilations,
               mode: int) -> _Plan:
    geo = conv_geometry(shape_nhwc, kernel_hw, shape_nhwc[3], out_channels, strides=strides, pads=pads,
                        dilations=dilations, x_name="x_bits")
    if geo.depth > MAX_K:
        raise ValueError(f"w: filters of {geo.depth} values (KH * KW * C) exceed {MAX_K}: the int32 result could "
                         "overflow")
    top, left, bottom, right = geo.pads
    tap_words = word_count(geo.in_channels)
    slots_shape = (geo.batch, geo.in_h + top + bottom, geo.in_w + left + right, tap_words, SLOT_WORDS)
    if mode == BITS:
        out_shape, dtype = geo.out_shape_nhwc[:3] + (word_count(out_channels),), np.uint64
    else:
        out_shape, dtype = geo.out_shape_nhwc, np.float32 if mode == epilogue.REAL else np.int32
    zeros = np.zeros(out_channels)
    zeros.flags.writeable = False
    return _Plan(geo.rows, geo.depth, geo.pads, geo.window(), slots_shape,
                 block_pixels(geo, slots_shape[2], tap_words, out_channels, mode), out_shape, np.dtype(dtype), zeros,
                 geo.ops() / RATE_OPS_PER_US)


_cached_plan = functools.lru_cache(maxsize=256)(_make_plan)


def _plan(shape_nhwc: tuple, kernel_hw: tuple, out_channels: int, strides, pads, dilations, mode: int) -> _Plan:
    """``_make_plan``, memoised: its checks cost more than a small binary convolution."""
    try:
        return _cached_plan(shape_nhwc, kernel_hw, out_channels, strides, pads, dilations, mode)
    except TypeError:  # lists (or something conv_geometry refuses): tuples are memoised, the rest is checked
        attrs = tuple(tuple(v) if isinstance(v, list) else v for v in (strides, pads, dilations))
        try:
            return _cached_plan(shape_nhwc, kernel_hw, out_channels, *attrs, mode)
        except TypeError:
            return _make_plan(shape_nhwc, kernel_hw, out_channels, strides, pads, dilations, mode)


def _packed(w: object, in_channels: int) -> PackedConvBinary:
    packed = w if isinstance(w, PackedConvBinary) else pack_conv_binary(w)
    check_packed_conv_binary(packed)
    if packed.in_channels != in_channels:
        raise ValueError(f"w: expected {in_channels} input channels (in_channels), got {packed.in_channels}")
    return packed


def _in_channels(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"in_channels: expected a positive int, got {value!r}")
    return int(value)


def _pad_value(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or value not in PAD_VALUES:
        raise ValueError(f"pad_value: expected -1, 0 or 1, got {value!r}")
    return int(value)


def _clamp(clamp: object) -> tuple[float, float]:
    if clamp is None:
        return -math.inf, math.inf
    if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
            or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                       for v in clamp)):
        raise TypeError(f"clamp: expected a pair of reals (lo, hi), got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo <= hi:  # also refuses NaN
        raise ValueError(f"clamp: expected lo <= hi, got {clamp!r}")
    return lo, hi


def conv2d_binary(x_bits: np.ndarray, w: np.ndarray | PackedConvBinary, *, in_channels: int, strides=(1, 1),
                  pads=(0, 0, 0, 0), pad_value: int = 1, dilations=(1, 1), multiplier=None, bias=None, clamp=None,
                  thresholds=None, out: np.ndarray | None = None) -> np.ndarray:
    """Binary convolution of NHWC sign bits by ±1 filters (formula in the module docstring).

    Parameters
    ----------
    x_bits : uint64 ndarray [N, H, W, ceil(in_channels / 64)], C-contiguous
        ``kernels.pack_bits(x_nhwc, axis=-1)`` of ±1 activations; padding bits 0.
    w : ±1 ndarray [O, in_channels, KH, KW] (signed integer or float), or ``pack_conv_binary(w)``
    in_channels : int, the C of the activations
    strides, dilations : int or (h, w) pair, >= 1
    pads : (top, left, bottom, right) as ONNX, (h, w), one int, or "same", "same_lower", "valid"
    pad_value : -1, 0 or 1, the value of the padded border (1 is free)
    multiplier, bias : real scalar or [O] array, optional: float32 output ``y * multiplier + bias``
    clamp : (lo, hi), optional: float32 output clipped to [lo, hi] (after multiplier and bias)
    thresholds : real scalar or [O] array, optional: bit-packed output, bit set where ``y < thresholds[o]``
    out : ndarray shaped and typed like the result, C-contiguous, optional

    Returns
    -------
    int32 [N, OH, OW, O], float32 [N, OH, OW, O], or uint64 [N, OH, OW, ceil(O / 64)] (``thresholds``)
    """
    x = _validate.array("x_bits", x_bits, (np.uint64,), 4)
    channels = _in_channels(in_channels)
    if x.shape[3] != word_count(channels):
        raise ValueError(f"x_bits: in_channels={channels} needs {word_count(channels)} words per pixel, "
                         f"got shape {x.shape}")
    check_padding_bits("x_bits", x, channels)
    packed = _packed(w, channels)
    fill = _pad_value(pad_value)
    o = packed.out_channels
    real = multiplier is not None or bias is not None or clamp is not None
    if thresholds is not None and real:
        raise ValueError("thresholds: bit-packed output cannot be combined with multiplier, bias or clamp")
    mode = BITS if thresholds is not None else epilogue.REAL if real else epilogue.INTEGER
    n, h, wd = x.shape[:3]
    plan = _plan((n, h, wd, channels), packed.kernel_hw, o, strides, pads, dilations, mode)
    mult, shift, thr = _UNUSED, _UNUSED, _UNUSED_INT
    lo, hi = -math.inf, math.inf
    if mode == BITS:
        thr = check_thresholds(thresholds, o, plan.k)
    elif mode == epilogue.REAL:
        mult = np.ones(o) if multiplier is None else _validate.per_channel("multiplier", multiplier, o, np.float64)
        shift = np.zeros(o) if bias is None else _validate.per_channel("bias", bias, o, np.float64)
        lo, hi = _clamp(clamp)
    out = np.empty(plan.out_shape, plan.out_dtype) if out is None else _validate.out(out, plan.out_shape,
                                                                                     plan.out_dtype, x=x)

    border, corr = _NO_BORDER, _NO_CORR
    if fill != 1 and any(plan.pads):
        border, corr = border_corrections(plan.window, packed.tap_sums, fill - 1)
    variant = dispatch.choose("conv_binary", plan.rows, o, plan.k)
    driver = DRIVERS[variant.kind, mode]
    slots = padded_slots(x, plan.slots_shape, plan.pads[0], plan.pads[1])
    out2d = out.reshape(plan.rows, plan.out_shape[3])

    def part(p0: int, p1: int, i0: int, i1: int) -> None:
        driver(slots, plan.window, plan.block, packed.lanes, packed.ldb, packed.words, plan.k, o, i0, i1, border,
               corr, plan.zeros, mult, shift, lo, hi, thr, out2d)

    # threads take disjoint ranges of output pixels
    threads.run_tiled(part, 1, plan.rows, variant.rows, plan.estimate_us)
    return out
