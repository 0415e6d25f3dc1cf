"""int4-weight convolution: float activations, group-wise int4 filters, through ``kernels.gemm_int4``.

The filters ``w [O, C / group, KH, KW]`` are quantized once per group of ``G``
values along their ``(ky, kx, c)`` order (the order of an NHWC im2col row) by
``kernels.pack_int4``. A call builds the float32 im2col rows of a block of output
pixels (zero border) and multiplies them by the packed filters with
``gemm_int4``, which quantizes each row's activations to int8 per block of ``G``
on the fly, so the result is, exactly, ``gemm_int4(im2col(x), packed)`` plus the
bias: ``kernels.gemm_int4`` documents the error bound of that product.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels.conv.geometry import check_layout, conv_geometry, from_nhwc, im2col, to_nhwc
from kernels.gemm.int4 import gemm_int4
from kernels.pack.int4 import PackedInt4, pack_int4
from kernels.pack.plans import PlanCache, value_key
from kernels.pack.panels import Sealed

BLOCK_BYTES = 256 * 1024  # float32 im2col rows per gemm_int4 call: kept in L2


class PackedConvInt4(Sealed):
    """int4 convolution filters packed once by :func:`pack_conv_int4`: one ``PackedInt4`` per group.

    Each is ``[O / group, KH * KW * C / group]`` with columns in ``(ky, kx, c)`` order.
    """

    __slots__ = ("groups", "shape", "group", "plans")

    def __init__(self, groups: tuple[PackedInt4, ...], shape: tuple[int, int, int, int], group: int):
        self.groups, self.shape, self.group = groups, shape, group
        self.plans = PlanCache()  # what a call derives from its arguments, per shape and attributes

    def dequantize(self) -> np.ndarray:
        """The float32 filters ``[O, C / group, KH, KW]`` that the int4 codes stand for."""
        o, cg, kh, kw = self.shape
        rows = np.concatenate([packed.dequantize() for packed in self.groups])
        return np.ascontiguousarray(rows.reshape(o, kh, kw, cg).transpose(0, 3, 1, 2))

    def __repr__(self) -> str:
        return f"PackedConvInt4(shape={self.shape}, group={self.group}, group_size={self.groups[0].group_size})"


def pack_conv_int4(w: np.ndarray, *, group: int = 1, group_size: int = 128, symmetric: bool = True) -> PackedConvInt4:
    """Quantize float32 OIHW filters to int4 per ``group_size`` values and pack them for :func:`conv2d_int4`."""
    w = _validate.array("w", w, (np.float32,), 4)
    o, cg, kh, kw = w.shape
    if min(w.shape) < 1:
        raise ValueError(f"w: expected a non-empty [O, C / group, KH, KW] array, got shape {w.shape}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1 or o % group:
        raise ValueError(f"group: expected a positive divisor of the {o} output channels, got {group!r}")
    og = o // group
    rows = w.transpose(0, 2, 3, 1).reshape(o, kh * kw * cg)
    groups = tuple(pack_int4(np.ascontiguousarray(rows[g * og : (g + 1) * og]), group_size, symmetric)
                   for g in range(group))
    return PackedConvInt4(groups, w.shape, int(group))


def conv2d_int4(x: np.ndarray, w: PackedConvInt4, bias: np.ndarray | None = None, *, strides=(1, 1),
                pads=(0, 0, 0, 0), dilations=(1, 1), layout: str = "NCHW",
                out: np.ndarray | None = None) -> np.ndarray:
    """Convolution of float32 activations with int4 filters: ``y = gemm_int4(im2col(x), w) + bias``.

    Parameters
    ----------
    x : float32 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``), finite
    w : PackedConvInt4 from :func:`pack_conv_int4` (its ``group`` is the convolution's)
    bias : float32 array [O], optional
    strides, pads, dilations : as ``kernels.conv2d_int8`` (the border is zero)
    out : float32 ndarray shaped like the result, optional

    Returns
    -------
    float32 ndarray [N, O, OH, OW] (NCHW) or [N, OH, OW, O] (NHWC)
    """
    if not isinstance(w, PackedConvInt4):
        raise TypeError(f"w: expected a PackedConvInt4 from kernels.pack_conv_int4, got {type(w).__name__}")
    x_shape = getattr(x, "shape", None)
    key = (x_shape, layout, strides, pads, dilations)
    try:
        geo = w.plans.get(key)
    except TypeError:  # unhashable attributes (lists): normalised
        key = tuple(value_key(v) for v in key)
        geo = w.plans.get(key)
    x = to_nhwc("x", x, (np.float32,), layout)
    o, cg, kh, kw = w.shape
    if geo is None:
        check_layout(layout)
        geo = w.plans.put(key, conv_geometry(x.shape, (kh, kw), cg, o, strides=strides, pads=pads,
                                             dilations=dilations, group=w.group))
    if bias is not None:
        bias = _validate.per_channel("bias", bias, o, np.float32)
    shape = geo.out_shape_nhwc if layout == "NHWC" else (geo.batch, o, geo.out_h, geo.out_w)
    if out is not None:
        out = _validate.out(out, shape, np.dtype(np.float32), x=x)
    rows = np.empty((geo.rows, o), np.float32) if layout == "NCHW" or out is None else out.reshape(geo.rows, o)
    og, k = geo.group_out, geo.depth
    block = max(1, BLOCK_BYTES // (4 * k))
    cols = np.empty((min(block, geo.rows), k), np.float32)
    part = np.empty((cols.shape[0], og), np.float32) if w.group > 1 else None
    window = geo.window()
    for start in range(0, geo.rows, block):
        count = min(block, geo.rows - start)
        for g, packed in enumerate(w.groups):
            im2col(x, window, g * cg, cg, np.float32(0), start, count, cols)
            if part is None:
                gemm_int4(cols[:count], packed, out=rows[start : start + count])
            else:
                rows[start : start + count, g * og : (g + 1) * og] = gemm_int4(cols[:count], packed,
                                                                                out=part[:count])
    if bias is not None:
        rows += bias
    if layout == "NHWC":
        return rows.reshape(geo.out_shape_nhwc)  # ``out`` itself when given
    return from_nhwc(rows.reshape(geo.out_shape_nhwc), layout, out)
