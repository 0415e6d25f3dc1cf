"""Convolution and pooling geometry: attribute checks, output size, layouts, im2col.

Every kernel in ``kernels.conv`` works on NHWC activations (channels innermost, so
one pixel's channels are contiguous and a row of the im2col matrix is a run of
whole pixels). The public functions accept NCHW (the default, as ONNX) or NHWC and
convert once at the boundary with :func:`to_nhwc` / :func:`from_nhwc`.

Output size along one axis, with input ``i``, kernel ``k``, stride ``s``,
dilation ``d`` and pads ``p0, p1`` (ONNX)::

    o = (i + p0 + p1 - d (k - 1) - 1) // s + 1

``pads`` is given in ONNX order ``(top, left, bottom, right)``, as two ints
``(pad_h, pad_w)`` applied on both sides, as one int, or as a string:
``"valid"`` (no padding), ``"same"`` (ONNX SAME_UPPER: ``o = ceil(i / s)``, the odd
pixel of padding at the end) or ``"same_lower"`` (the odd pixel at the start).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels._jit import kernel
from kernels.conv.layout import nchw_to_nhwc, nhwc_to_nchw

LAYOUTS = ("NCHW", "NHWC")
PAD_MODES = ("valid", "same", "same_upper", "same_lower")


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes and attributes of one 2-D convolution (or pooling window), checked once.

    ``in_channels`` and ``out_channels`` are totals; group ``g`` reads input
    channels ``g * group_in .. (g + 1) * group_in`` and writes output channels
    ``g * group_out .. (g + 1) * group_out``.
    """

    batch: int
    in_h: int
    in_w: int
    in_channels: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    dilation_h: int
    dilation_w: int
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    group: int
    out_h: int
    out_w: int

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def group_in(self) -> int:
        return self.in_channels // self.group

    @property
    def group_out(self) -> int:
        return self.out_channels // self.group

    @property
    def rows(self) -> int:
        """Output pixels over the batch: the M of the equivalent matrix product."""
        return self.batch * self.out_h * self.out_w

    @property
    def depth(self) -> int:
        """Length of one output's dot product: the K of the equivalent matrix product."""
        return self.taps * self.group_in

    @property
    def pads(self) -> tuple[int, int, int, int]:
        return (self.pad_top, self.pad_left, self.pad_bottom, self.pad_right)

    @property
    def out_shape_nhwc(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.out_channels)

    @property
    def is_pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: the NHWC input already is the im2col matrix."""
        return (self.taps == 1 and self.stride_h == self.stride_w == 1 and not any(self.pads))

    def ops(self) -> int:
        """Operations in one convolution, a multiply-add counting as two."""
        return 2 * self.rows * self.out_channels * self.depth

    def window(self) -> tuple[int, ...]:
        """The integers the compiled im2col and pooling loops take, in their order."""
        return (self.in_h, self.in_w, self.kernel_h, self.kernel_w, self.stride_h, self.stride_w,
                self.dilation_h, self.dilation_w, self.pad_top, self.pad_left, self.out_h, self.out_w)


def pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name}: expected an int or a pair of ints (h, w), got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _same(size: int, stride: int, extent: int, lower: bool) -> tuple[int, int]:
    total = max(0, (-(-size // stride) - 1) * stride + extent - size)
    small, large = total // 2, total - total // 2
    return (large, small) if lower else (small, large)


def resolve_pads(pads: object, in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int],
                 dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    """``pads`` (see the module docstring) as ``(top, left, bottom, right)``."""
    if isinstance(pads, str):
        mode = pads.lower()
        if mode not in PAD_MODES:
            raise ValueError(f"pads: expected 4 ints (top, left, bottom, right), 2 ints, one int or one of "
                             f"{PAD_MODES}, got {pads!r}")
        if mode == "valid":
            return (0, 0, 0, 0)
        extents = [d * (k - 1) + 1 for d, k in zip(dilations, kernel_hw)]
        (top, bottom), (left, right) = (_same(i, s, e, mode == "same_lower")
                                        for i, s, e in zip(in_hw, strides, extents))
        return (top, left, bottom, right)
    if isinstance(pads, (tuple, list)) and len(pads) == 4:
        if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pads):
            raise TypeError(f"pads: expected ints, got {pads!r}")
        if min(pads) < 0:
            raise ValueError(f"pads: expected values >= 0, got {tuple(pads)}")
        return tuple(int(p) for p in pads)
    ph, pw = pair("pads", pads, 0)
    return (ph, pw, ph, pw)


def _out_size(size: int, p0: int, p1: int, k: int, s: int, d: int, ceil_mode: bool) -> int:
    span = size + p0 + p1 - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    return out - 1 if (out - 1) * s >= size + p0 else out  # the last window must start inside


def conv_geometry(x_shape_nhwc: tuple[int, ...], kernel_hw: tuple[int, int], in_per_group: int, out_channels: int,
                  *, strides: object = (1, 1), pads: object = (0, 0, 0, 0), dilations: object = (1, 1),
                  group: int = 1, ceil_mode: bool = False, x_name: str = "x", w_name: str = "w") -> ConvGeometry:
    """Check a convolution's shapes and attributes and derive its output size.

    ``x_shape_nhwc`` is the activation shape ``(N, H, W, C)``; the weight has
    ``out_channels`` filters of ``in_per_group`` channels and ``kernel_hw`` taps.
    ``ceil_mode`` (pooling) rounds the output size up, as ONNX does, but drops a
    last window that would start in the end padding. Raises ``ValueError`` naming
    the offending argument when channels do not match the groups, an attribute is
    out of range or an image would be empty (a batch of 0 images is allowed: every
    convolution and pool then returns an empty output).
    """
    batch, in_h, in_w, channels = x_shape_nhwc
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise TypeError(f"group: expected an int, got {group!r}")
    if group < 1 or channels % group or out_channels % group:
        raise ValueError(f"group: expected a positive divisor of both the input channels ({channels}) and "
                         f"the output channels ({out_channels}), got {group}")
    if in_per_group * group != channels:
        raise ValueError(f"{w_name}: expected {channels // group} input channels per filter for {x_name} with "
                         f"{channels} channels and group={group}, got {in_per_group}")
    kh, kw = kernel_hw
    if batch < 0 or min(in_h, in_w, channels, out_channels, kh, kw) < 1:  # batch 0: an empty output
        raise ValueError(f"{x_name}, {w_name}: expected non-empty arrays, got activation shape (N, H, W, C) = "
                         f"{tuple(x_shape_nhwc)} and kernel {kh}x{kw} with {out_channels} filters")
    sh, sw = pair("strides", strides, 1)
    dh, dw = pair("dilations", dilations, 1)
    top, left, bottom, right = resolve_pads(pads, (in_h, in_w), (kh, kw), (sh, sw), (dh, dw))
    out_h = _out_size(in_h, top, bottom, kh, sh, dh, ceil_mode)
    out_w = _out_size(in_w, left, right, kw, sw, dw, ceil_mode)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{x_name}: a {in_h}x{in_w} input padded by {(top, left, bottom, right)} is smaller than "
                         f"the {kh}x{kw} kernel dilated by {(dh, dw)}")
    return ConvGeometry(batch, in_h, in_w, channels, out_channels, kh, kw, sh, sw, dh, dw, top, left, bottom, right,
                        int(group), out_h, out_w)


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
    return layout


def to_nhwc(name: str, x: object, dtypes: tuple, layout: str) -> np.ndarray:
    """A 4-D activation as a C-contiguous NHWC array (one copy for NCHW, none for contiguous NHWC)."""
    check_layout(layout)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in tuple(np.dtype(d) for d in dtypes):
        raise TypeError(f"{name}: expected dtype {' or '.join(str(np.dtype(d)) for d in dtypes)}, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D {layout} array, got shape {x.shape}")
    return nchw_to_nhwc(x) if layout == "NCHW" else np.ascontiguousarray(x)


def from_nhwc(y: np.ndarray, layout: str, out: np.ndarray | None = None) -> np.ndarray:
    """An NHWC result in the caller's layout (NCHW: one transposing copy, into ``out`` if given)."""
    return nhwc_to_nchw(y, out) if layout == "NCHW" else y


@kernel
def im2col(x, window, c0, cg, pad, row0, rows, out):
    """Rows ``row0 .. row0 + rows`` of the im2col matrix of NHWC ``x`` for channels ``c0 .. c0 + cg``.

    x      : [N, H, W, C] C-contiguous, any element type (bytes, or 64-bit words of packed bits)
    window : the tuple of :meth:`ConvGeometry.window`
    out    : [rows, ld] C-contiguous, ld >= KH * KW * cg; columns past KH * KW * cg are left untouched

    Output pixel ``m = (n * OH + oy) * OW + ox`` becomes row ``m - row0``::

        out[m - row0, (ky * KW + kx) * cg + c] = x[n, iy, ix, c0 + c]   if 0 <= iy < H and 0 <= ix < W
                                               = pad                      otherwise
        iy = oy * SH + ky * DH - PT,  ix = ox * SW + kx * DW - PL
    """
    h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
    for r in range(rows):
        m = row0 + r
        n = m // (oh * ow)
        oy = (m // ow) % oh
        ox = m % ow
        dst = out[r]
        for ky in range(kh):
            iy = oy * sh + ky * dh - pt
            for kx in range(kw):
                ix = ox * sw + kx * dw - pl
                col = (ky * kw + kx) * cg
                if 0 <= iy < h and 0 <= ix < w:
                    src = x[n, iy, ix, c0 : c0 + cg]
                    for c in range(cg):
                        dst[col + c] = src[c]
                else:
                    for c in range(cg):
                        dst[col + c] = pad
