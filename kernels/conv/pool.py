"""Max and average pooling of quantized NHWC activations, and max pooling of packed sign bits.

Every windowed pool fills one row of output pixels at a time, with the window of
:mod:`kernels.conv.geometry`: tap by tap, it folds the input pixels that tap reads
into all the outputs it reaches. The innermost loop runs over the channels, which
are contiguous in NHWC, so it vectorises (with stride 1 over the whole row's run of
pixels). Taps in the padding are skipped rather than read from a padded copy: a max
ignores them (ONNX MaxPool) and an average adds nothing for them (they are
``x_zero_point``, i.e. real zero).

* Max pools need no scales: ``x -> scale (x - zp)`` is increasing, so it commutes
  with max. On ±1 bits (set bit = -1) the max is -1 only if every tap is -1: the
  AND of the words.
* Average pools sum ``x - x_zero_point`` exactly in int32 and rescale once, in
  float64, with ``kernels.epilogue.finish_tile`` (half to even, saturating).

Rows of output pixels are split over ``kernels.threads`` when the work pays for it.
"""

from __future__ import annotations

import math

import numpy as np

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.conv.geometry import ConvGeometry, check_layout, conv_geometry, from_nhwc, pair, to_nhwc
from kernels.epilogue import QUANT, finish_tile
from kernels.gemm.int8 import INT32_MAX, check_zero_point
from kernels.qtypes import qtype_of

QDTYPES = (np.uint8, np.int8)
MAX_TAPS = INT32_MAX // 255  # |x - x_zero_point| <= 255, so this many taps cannot overflow the int32 sums
# Single-thread cost of the reductions, measured here: per output pixel and tap (loop overhead), and per
# byte read. kernels.threads splits the rows only when the estimated time pays for the threads.
US_PER_PIXEL_TAP = 0.01
BYTES_PER_US = 8000.0


@kernel
def _inside(i, a, b, p, size, count):
    """The ``j0 .. j1 - 1`` among ``0 .. count - 1`` whose position ``i a + j b - p`` lies in ``[0, size)``.

    With ``(i, a, b, count) = (o, S, D, K)``: the taps of output ``o`` inside the input;
    with ``(k, D, S, O)``: the outputs whose tap ``k`` is inside.
    """
    base = i * a - p
    j0 = max(0, -(base // b))
    return j0, max(j0, min(count, -((base - size) // b)))


@kernel
def _fewest_taps(outs, s, d, p, size, k):
    """The fewest taps inside ``[0, size)`` of any of ``outs`` outputs along one axis."""
    fewest = k
    for o in range(outs):
        k0, k1 = _inside(o, s, d, p, size, k)
        fewest = min(fewest, k1 - k0)
    return fewest


MAX, AND, ADD = 0, 1, 2  # how _fold_taps combines a tap into the outputs


@kernel
def _fold_taps(x, n, oy, window, op, row):
    """Fold every tap inside ``x`` of output row ``(n, oy)`` into ``row`` ([OW * C]) with ``op``: max, and, sum.

    A row is reduced one tap at a time over all the outputs that tap reaches: with
    stride 1 their inputs are one contiguous run, otherwise one run of C per output.
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    channels = x.shape[3]
    ky0, ky1 = _inside(oy, sh, dh, pt, h, kh)
    for ky in range(ky0, ky1):
        src_row = x[n, oy * sh + ky * dh - pt].reshape(w * channels)
        for kx in range(kw):
            o0, o1 = _inside(kx, dw, sw, pl, w, ow)
            runs, length = (min(1, o1 - o0), (o1 - o0) * channels) if sw == 1 else (o1 - o0, channels)
            for o in range(o0, o0 + runs):
                dst = row[o * channels : o * channels + length]
                src = src_row[(o * sw + kx * dw - pl) * channels :]
                if op == AND:
                    for c in range(length):
                        dst[c] &= src[c]
                elif op == MAX:
                    for c in range(length):
                        dst[c] = max(dst[c], src[c])
                else:
                    for c in range(length):
                        dst[c] += src[c]


@kernel
def _max_rows(x, window, lowest, bitwise, r0, r1, out):
    """Output rows ``r = n * OH + oy`` for ``r0 <= r < r1`` of a max pool (``bitwise``: AND pool).

    x : [N, H, W, C] C-contiguous (uint8, int8, or uint64 words of sign bits)
    out : [N, OH, OW, C] of x's dtype::

        out[n, oy, ox, c] = max (AND if bitwise) of x[n, iy, ix, c] over the taps inside x,
        iy = oy * SH + ky * DH - PT,  ix = ox * SW + kx * DW - PL

    starting from ``lowest`` (the identity: dtype minimum, or all bits set). Every
    window must hold a tap inside ``x`` (the caller checks).
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    channels = x.shape[3]
    for r in range(r0, r1):
        n, oy = r // oh, r % oh
        row = out[n, oy].reshape(ow * channels)
        row[:] = lowest
        _fold_taps(x, n, oy, window, AND if bitwise else MAX, row)


@kernel
def _avg_rows(x, window, x_zp, padded_hw, x_scale, y_scale, zp, qmin, qmax, r0, r1, out):
    """Output rows ``r = n * OH + oy`` for ``r0 <= r < r1`` of a quantized average pool.

    x : [N, H, W, C] C-contiguous uint8 or int8; out : [N, OH, OW, C] of the same dtype.
    ``padded_hw`` is ``(H + PT + PB, W + PL + PR)`` to count the taps inside the padded
    input (count_include_pad), or ``(0, 0)`` to count those inside x::

        S = sum (x[n, iy, ix, c] - x_zp) over the taps inside x        (int32, exact)
        out[n, oy, ox, c] = clip(rint(S * (x_scale / (y_scale * count)) + zp), qmin, qmax)

    the second line being :func:`kernels.epilogue.finish_tile` in ``QUANT`` mode, once
    per run of outputs with the same count.
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    ph, pw = padded_hw
    channels = x.shape[3]
    inside_w = np.empty(ow, np.int64)
    count_w = np.empty(ow, np.int64)
    for ox in range(ow):
        k0, k1 = _inside(ox, sw, dw, pl, w, kw)
        inside_w[ox] = k1 - k0
        if pw:
            k0, k1 = _inside(ox, sw, dw, 0, pw, kw)
        count_w[ox] = k1 - k0
    sums = np.empty((ow, channels), np.int32)
    flat = sums.reshape(ow * channels)
    mult = np.empty(channels, np.float64)
    zero_i = np.zeros(channels, np.int64)
    zero_f = np.zeros(channels, np.float64)
    for r in range(r0, r1):
        n, oy = r // oh, r % oh
        ky0, ky1 = _inside(oy, sh, dh, pt, h, kh)
        count_h = ky1 - ky0
        if ph:
            k0, k1 = _inside(oy, sh, dh, 0, ph, kh)
            count_h = k1 - k0
        for ox in range(ow):
            sums[ox, :] = -x_zp * (ky1 - ky0) * inside_w[ox]
        _fold_taps(x, n, oy, window, ADD, flat)
        o0 = 0
        while o0 < ow:
            o1 = o0 + 1
            while o1 < ow and count_w[o1] == count_w[o0]:
                o1 += 1
            mult[:] = x_scale / (y_scale * (count_h * count_w[o0]))
            finish_tile(sums[o0:o1], o0, o1 - o0, 0, channels, zero_i, zero_i, zero_i, False, mult, zero_f,
                        -np.inf, np.inf, zp, qmin, qmax, QUANT, out[n, oy])
            o0 = o1


@kernel
def _global_avg(x, pixels, channels_last, x_zp, m, zp, qmin, qmax, n0, n1, out):
    """Images ``n0 .. n1 - 1`` of a quantized global average pool.

    x : [N, P * C] C-contiguous uint8 or int8, each image's ``P = H * W`` pixels of C
    channels (NHWC, ``channels_last``) or C planes of P pixels (NCHW); out : [N, C]::

        S = sum_p (x[n, p, c] - x_zp)                                   (int32, exact)
        out[n, c] = clip(rint(S * m + zp), qmin, qmax)                  (finish_tile, QUANT)
    """
    channels = out.shape[1]
    mult = np.full(channels, m)
    sums = np.empty((1, channels), np.int32)
    acc = sums[0]
    zero_i = np.zeros(channels, np.int64)
    zero_f = np.zeros(channels, np.float64)
    bias = -x_zp * pixels
    for n in range(n0, n1):
        image = x[n]
        if channels_last:  # accumulate whole pixels: vectorises over the channels
            acc[:] = bias
            for p in range(pixels):
                src = image[p * channels : (p + 1) * channels]
                for c in range(channels):
                    acc[c] += src[c]
        else:  # one contiguous plane per channel
            for c in range(channels):
                plane = image[c * pixels : (c + 1) * pixels]
                s = np.int32(bias)
                for p in range(pixels):
                    s += plane[p]
                acc[c] = s
        finish_tile(sums, n, 1, 0, channels, zero_i, zero_i, zero_i, False, mult, zero_f, -np.inf, np.inf, zp, qmin,
                    qmax, QUANT, out)


def _flag(name: str, value: object) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool (or 0 / 1), got {value!r}")


def _scale(name: str, value: object) -> float:
    """A positive, finite real scalar (a number, or an array of one element) as a float."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value > 0:
        return float(value)  # the common case, without building an array
    v = np.asarray(value)
    if v.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a real scalar, got dtype {v.dtype}")
    if v.size != 1 or v.ndim > 1:
        raise ValueError(f"{name}: expected a scalar, got shape {v.shape}")
    scale = float(v.reshape(()))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: expected a finite positive scale, got {scale}")
    return scale


def _window(x: np.ndarray, kernel_shape: object, strides: object, pads: object, dilations: object,
            ceil_mode: object, *, empty_ok: bool = False) -> ConvGeometry:
    """The pooling geometry of NHWC ``x``, refusing windows that hold no input pixel (unless ``empty_ok``)."""
    kh, kw = pair("kernel_shape", kernel_shape, 1)
    g = conv_geometry(x.shape, (kh, kw), x.shape[3], x.shape[3], strides=strides, pads=pads, dilations=dilations,
                      ceil_mode=_flag("ceil_mode", ceil_mode), x_name="x", w_name="kernel_shape")
    if not empty_ok and (_fewest_taps(g.out_h, g.stride_h, g.dilation_h, g.pad_top, g.in_h, kh) == 0
                         or _fewest_taps(g.out_w, g.stride_w, g.dilation_w, g.pad_left, g.in_w, kw) == 0):
        raise ValueError(f"pads, dilations: a pooling window of the {g.in_h}x{g.in_w} input lies entirely in "
                         f"the padding {g.pads} (kernel {kh}x{kw}, dilations {(g.dilation_h, g.dilation_w)}); "
                         f"its result would be undefined")
    return g


def _run_rows(fn, g: ConvGeometry, itemsize: int) -> None:
    """``fn(r0, r1)`` over the output rows ``range(N * OH)``, split over threads when the work pays for them."""
    estimate_us = g.rows * g.taps * (US_PER_PIXEL_TAP + g.in_channels * itemsize / BYTES_PER_US)
    threads.run_tiled(lambda _p0, _p1, r0, r1: fn(r0, r1), 1, g.batch * g.out_h, 1, estimate_us)


def _checked_out(out: object, shape: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """The caller's ``out``: shape, ``x``'s dtype, C-contiguous, writeable, and apart from ``x``."""
    out = _validate.out(out, shape, x.dtype)
    if np.may_share_memory(out, x):
        raise ValueError("out: must not overlap the input")
    return out


def _output(out: object, x: np.ndarray, shape_nhwc: tuple[int, ...], layout: str) -> np.ndarray:
    """Where the kernel writes its NHWC result: ``out`` itself for NHWC, else a scratch array."""
    if out is None:
        return np.empty(shape_nhwc, x.dtype)
    n, h, w, c = shape_nhwc
    out = _checked_out(out, (n, c, h, w) if layout == "NCHW" else shape_nhwc, x)
    return out if layout == "NHWC" else np.empty(shape_nhwc, x.dtype)


def _deliver(y: np.ndarray, out: np.ndarray | None, layout: str) -> np.ndarray:
    """The NHWC result ``y`` in the caller's layout, in ``out`` when given."""
    if out is y:
        return out
    return from_nhwc(y, layout, out)


def max_pool2d(x: np.ndarray, kernel_shape: int | tuple[int, int], *, strides: object = (1, 1),
               pads: object = (0, 0, 0, 0), dilations: object = (1, 1), ceil_mode: bool = False,
               layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """ONNX MaxPool of a quantized activation (exact: max commutes with dequantization).

    ::

        y[n, c, oy, ox] = max x[n, c, oy * SH + ky * DH - PT, ox * SW + kx * DW - PL]

    over the ``ky < KH, kx < KW`` whose position is inside ``x``; padding is ignored.

    Parameters
    ----------
    x : uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``)
    kernel_shape : int or (KH, KW)
    strides, pads, dilations, ceil_mode : as ONNX MaxPool (strides default 1); ``pads`` in every
        form of :mod:`kernels.conv.geometry`: ``(top, left, bottom, right)``, ``(ph, pw)``, one int,
        ``"valid"``, ``"same"`` (SAME_UPPER) or ``"same_lower"``
    layout : "NCHW" or "NHWC", of ``x`` and of the result
    out : ndarray of the result's shape and ``x``'s dtype, optional

    Returns
    -------
    ndarray of ``x``'s dtype, [N, C, OH, OW] or [N, OH, OW, C]. A window lying wholly in
    the padding (large pads or dilations) raises ``ValueError``.
    """
    check_layout(layout)
    xh = to_nhwc("x", x, QDTYPES, layout)
    g = _window(xh, kernel_shape, strides, pads, dilations, ceil_mode)
    y = _output(out, xh, g.out_shape_nhwc, layout)
    lowest = xh.dtype.type(np.iinfo(xh.dtype).min)
    _run_rows(lambda r0, r1: _max_rows(xh, g.window(), lowest, False, r0, r1, y), g, 1)
    return _deliver(y, out, layout)


def max_pool2d_bits(x_bits: np.ndarray, kernel_shape: int | tuple[int, int], *, strides: object = (1, 1),
                    pads: object = (0, 0, 0, 0), dilations: object = (1, 1), ceil_mode: bool = False,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Max pool of ±1 channels packed as sign bits: the AND of the window's words.

    ``x_bits`` is uint64 ``[N, H, W, words]`` NHWC, as ``kernels.pack_bits(x_nhwc, axis=-1)``
    makes (set bit = -1). The max of ±1 values is -1 only if all are -1, so::

        y[n, oy, ox, j] = AND of x_bits[n, oy * SH + ky * DH - PT, ox * SW + kx * DW - PL, j]

    over the taps inside the input (padding is ignored). Zero padding bits stay zero.
    The attributes are those of :func:`max_pool2d`; NHWC only (the bits run along the
    channels). Returns uint64 ``[N, OH, OW, words]`` (in ``out`` if given).
    """
    xb = _validate.array("x_bits", x_bits, (np.uint64,), 4)
    g = _window(xb, kernel_shape, strides, pads, dilations, ceil_mode)
    y = _output(out, xb, g.out_shape_nhwc, "NHWC")
    ones = np.uint64(2**64 - 1)
    _run_rows(lambda r0, r1: _max_rows(xb, g.window(), ones, True, r0, r1, y), g, 8)
    return y


def _quantization(dtype: np.dtype, x_scale: object, x_zero_point: object, y_scale: object,
                  y_zero_point: object) -> tuple[float, int, float, float, float, float]:
    """Checked ``(x_scale, x_zero_point, y_scale, y_zero_point, qmin, qmax)`` of ``dtype`` values."""
    q = qtype_of(dtype)
    return (_scale("x_scale", x_scale), check_zero_point("x_zero_point", x_zero_point, dtype),
            _scale("y_scale", y_scale), float(check_zero_point("y_zero_point", y_zero_point, dtype)),
            float(q.qmin), float(q.qmax))


def avg_pool2d(x: np.ndarray, kernel_shape: int | tuple[int, int], x_scale: float, x_zero_point: int,
               y_scale: float, y_zero_point: int, *, strides: object = (1, 1), pads: object = (0, 0, 0, 0),
               dilations: object = (1, 1), ceil_mode: bool = False, count_include_pad: bool = False,
               layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """Quantized average pool, as com.microsoft QLinearAveragePool (ONNX AveragePool on dequantized values).

    For each output pixel, over the taps ``(ky, kx)`` of its window (positions as in
    :func:`max_pool2d`)::

        S     = sum (x - x_zero_point) over the taps inside x               exact integer
        count = number of taps inside x, or, with count_include_pad, inside the padded
                input (a padded tap is x_zero_point, adding 0 to S)
        y     = saturate(rint(S * m + y_zero_point)),   m = x_scale / (y_scale * count)

    ``m`` is formed in float64 (``float(x_scale) / (float(y_scale) * count)``), the
    product ``S * m`` too, ``rint`` rounds half to even, and ``saturate`` clips to
    ``x``'s dtype: ``kernels.epilogue.finish_tile`` on the exact sums, bit for bit
    ``kernels.reference.pool.avg_pool2d_ref``.

    Differences from ONNX Runtime's QLinearAveragePool: ORT dequantizes to float32 and
    divides in float32 (``nearbyintf(sum_f32(x_scale (x - zp)) / count / y_scale + zp)``),
    so a value within float32 rounding of a half may round the other way (off by 1);
    ORT has no ``dilations``; and with ``ceil_mode`` and ``count_include_pad`` ORT
    divides by ``KH * KW`` even where the window overhangs the padded input, whereas
    this (like ONNX AveragePool's reference) counts only taps inside the padded input.

    Parameters
    ----------
    x : uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``)
    kernel_shape, strides, pads, dilations, ceil_mode, layout : as :func:`max_pool2d`
    x_scale, y_scale : positive finite scalars
    x_zero_point, y_zero_point : ints in the range of ``x``'s dtype
    count_include_pad : bool, default False (ONNX)
    out : ndarray of the result's shape and ``x``'s dtype, optional

    Returns
    -------
    ndarray of ``x``'s dtype, [N, C, OH, OW] or [N, OH, OW, C]. Without
    ``count_include_pad``, a window lying wholly in the padding raises ``ValueError``.
    """
    check_layout(layout)
    xh = to_nhwc("x", x, QDTYPES, layout)
    xs, x_zp, ys, y_zp, qmin, qmax = _quantization(xh.dtype, x_scale, x_zero_point, y_scale, y_zero_point)
    include = _flag("count_include_pad", count_include_pad)
    g = _window(xh, kernel_shape, strides, pads, dilations, ceil_mode, empty_ok=include)
    if g.taps > MAX_TAPS:
        raise ValueError(f"kernel_shape: at most {MAX_TAPS} taps (int32 sums), got {g.kernel_h}x{g.kernel_w}")
    padded_hw = (g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right) if include else (0, 0)
    y = _output(out, xh, g.out_shape_nhwc, layout)
    _run_rows(lambda r0, r1: _avg_rows(xh, g.window(), x_zp, padded_hw, xs, ys, y_zp, qmin, qmax, r0, r1, y), g, 1)
    return _deliver(y, out, layout)


def global_avg_pool2d(x: np.ndarray, x_scale: float, x_zero_point: int, y_scale: float, y_zero_point: int, *,
                      layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """Quantized global average pool, as com.microsoft QLinearGlobalAveragePool.

    :func:`avg_pool2d` with one window covering the whole image (``count = H * W``)::

        y[n, c] = saturate(rint(sum_{h, w} (x[n, c, h, w] - x_zero_point) * m + y_zero_point)),
        m = float(x_scale) / (float(y_scale) * H * W)

    ONNX Runtime sums exactly too, but forms ``m`` and the product in float32, so a
    result within float32 rounding of a half may differ by 1.

    The output of both layouts is the same ``[N, C]`` memory, so NCHW input is summed
    plane by plane where it lies rather than transposed (there is no window to walk).

    Parameters
    ----------
    x : uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``), H * W <= 8421504
    x_scale, y_scale : positive finite scalars
    x_zero_point, y_zero_point : ints in the range of ``x``'s dtype
    out : ndarray of shape [N, C, 1, 1] (NCHW) or [N, 1, 1, C] (NHWC) and ``x``'s dtype, optional

    Returns
    -------
    ndarray of ``x``'s dtype, [N, C, 1, 1] or [N, 1, 1, C].
    """
    check_layout(layout)
    if isinstance(x, np.ndarray) and not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    x = _validate.array("x", x, QDTYPES, 4)
    xs, x_zp, ys, y_zp, qmin, qmax = _quantization(x.dtype, x_scale, x_zero_point, y_scale, y_zero_point)
    nhwc = layout == "NHWC"
    n, c = x.shape[0], x.shape[3 if nhwc else 1]
    pixels = x.shape[1] * x.shape[2] if nhwc else x.shape[2] * x.shape[3]
    if min(x.shape) < 1:
        raise ValueError(f"x: expected a non-empty array, got shape {x.shape}")
    if pixels > MAX_TAPS:
        raise ValueError(f"x: at most {MAX_TAPS} pixels per image (int32 sums), got {pixels}")
    shape = (n, 1, 1, c) if nhwc else (n, c, 1, 1)
    out = np.empty(shape, x.dtype) if out is None else _checked_out(out, shape, x)
    m = xs / (ys * float(pixels))
    images, y = x.reshape(n, pixels * c), out.reshape(n, c)
    threads.run_tiled(lambda _p0, _p1, n0, n1: _global_avg(images, pixels, nhwc, x_zp, m, y_zp, qmin, qmax, n0, n1, y),
                      1, n, 1, x.size / BYTES_PER_US)
    return out
