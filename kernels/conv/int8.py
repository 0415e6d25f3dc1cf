"""Public int8 convolutions: ``conv2d_int8`` (exact int32, ONNX ConvInteger) and ``qlinear_conv2d`` (fused layer).

Both take NCHW activations by default (``layout="NHWC"`` too) and OIHW weights,
raw or packed once by :func:`pack_conv_int8`; they work in NHWC, so an NCHW call
pays one transposing copy each way, except a 1x1 convolution on AVX-512 VNNI
(stride 1, no padding, one group, weight zero points 0), which
``kernels.conv.pointwise`` computes on the NCHW planes as they are. With ``g``
the group of output channel ``o``, ``C' = C / group`` and the border padded with
``x_zero_point`` (ONNX)::

    acc[n, o, oy, ox] = sum_{c < C', ky, kx} (x[n, g C' + c, oy sh + ky dh - pt, ox sw + kx dw - pl] - zx)
                                              * (w[o, c, ky, kx] - zw[o])

Depthwise convolutions (``group == C == O``) run ``kernels.conv.depthwise``;
every other one runs the int8 GEMM micro-kernels and epilogues of
``kernels.linear_int8`` over the output pixels (``kernels.conv.int8_driver``):
reading the taps through an indirection table on AVX-512 VNNI when each group
has a multiple of 4 channels, else from im2col rows built block by block; a 1x1
stride-1 convolution there is a plain GEMM over every image's pixels, read in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from kernels import _validate, dispatch, epilogue, threads
from kernels._jit import machine_entry
from kernels.conv import pointwise
from kernels.conv.depthwise import DepthwisePlan, pack_depthwise
from kernels.conv.geometry import ConvGeometry, check_layout, conv_geometry, from_nhwc
from kernels.conv.int8_driver import (DRIVERS, IM2COL, INDIRECT, INDIRECT_DRIVERS, POINTWISE_DRIVERS, ROWS,
                                      activation_codes, block_rows, groups_entry_kernel, indirection, nhwc_entry_args,
                                      runs_indirection)
from kernels.conv.layout import nchw_to_nhwc
from kernels.entry import Entry, In, Out, empty_entry
from kernels.epilogue import Epilogue
from kernels.gemm.driver import K_CHUNK
from kernels.gemm.int8 import _finite, check_zero_point, fused_epilogue, max_k_int32, register_epilogue
from kernels.pack.panels import KGROUP, PANEL, PackedInt8, Sealed, aligned_empty, pack_int8
from kernels.pack.plans import PlanCache, value_key

ACTIVATION_DTYPES = (np.uint8, np.int8)
_RANGES = {np.uint8: (0, 255), np.int8: (-128, 127)}  # the codes of an output dtype


class PackedConvInt8(Sealed):
    """int8 convolution weights ``[O, C / group, KH, KW]``, packed once by :func:`pack_conv_int8`.

    Attributes
    ----------
    groups : one ``PackedInt8`` per group, ``[O / group, KH * KW * C / group]`` with
        columns in ``(ky, kx, c)`` order, the order of an NHWC im2col row
    weights : the int8 OIHW weights (uint8 weights shifted by -128), which the
        depthwise kernel packs with the zero point of each call
    shifted : whether the weights came as uint8 (their zero points shift by -128 too)
    plans : :class:`kernels.pack.plans.PlanCache` of the one-shot calls with these weights
    """

    __slots__ = ("groups", "weights", "shifted", "group", "plans")

    def __init__(self, groups: tuple[PackedInt8, ...], weights: np.ndarray, shifted: bool, group: int):
        self.groups, self.weights, self.shifted, self.group = groups, weights, shifted, group
        self.plans = PlanCache()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.weights.shape

    @property
    def out_channels(self) -> int:
        return self.weights.shape[0]

    def __repr__(self) -> str:
        return f"PackedConvInt8(shape={self.shape}, group={self.group}, dtype={'uint8' if self.shifted else 'int8'})"


def pack_conv_int8(w: np.ndarray, *, group: int = 1) -> PackedConvInt8:
    """Pack int8 (or uint8) OIHW convolution weights once for :func:`conv2d_int8` / :func:`qlinear_conv2d`.

    ``w`` is ``[O, C / group, KH, KW]``; uint8 weights are stored as ``w - 128``
    with their zero point moved by -128 at each call, which changes no result.
    """
    w = _validate.array("w", w, (np.int8, np.uint8), 4)
    o, cg, kh, kw = w.shape
    if min(w.shape) < 1:
        raise ValueError(f"w: expected a non-empty [O, C / group, KH, KW] array, got shape {w.shape}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1 or o % group:
        raise ValueError(f"group: expected a positive divisor of the {o} output channels, got {group!r}")
    shifted = w.dtype == np.uint8
    weights = (w ^ 0x80).view(np.int8) if shifted else w
    og = o // group
    rows = weights.transpose(0, 2, 3, 1).reshape(o, kh * kw * cg)  # (ky, kx, c): an NHWC im2col row
    groups = tuple(pack_int8(np.ascontiguousarray(rows[g * og : (g + 1) * og])) for g in range(group))
    return PackedConvInt8(groups, np.ascontiguousarray(weights), shifted, int(group))


def _packed(w: object, group: int) -> PackedConvInt8:
    if isinstance(w, PackedConvInt8):
        if w.group != group:
            raise ValueError(f"group: the weights were packed for group={w.group}, got group={group}")
        return w
    return pack_conv_int8(w, group=group)


class ConvPlan:
    """An int8 convolution prepared for one input shape: call it with activations, as often as needed.

    Everything but the activations is checked and derived once: geometry, kernel
    choice, indirection table, per-channel correction terms and the epilogue.
    ``plan(x, out=None)`` then only checks ``x`` (dtype, shape) and ``out`` and runs.
    ``kind`` names the kernel; ``direct`` is the prepared depthwise or NCHW 1x1 kernel
    that takes the caller's layout itself (None on the general path). :meth:`entry` gives
    the call as one unchecked compiled call (``kernels.entry``), which ``plan(x)`` itself
    makes on one thread.
    Made by :func:`conv2d_int8_plan` / :func:`qlinear_conv2d_plan`; the one-shot
    functions :func:`conv2d_int8` and :func:`qlinear_conv2d` make one and call it.
    """

    def __init__(self, packed: PackedConvInt8, x_shape: tuple, x_dtype: np.dtype, layout: str, geo: ConvGeometry,
                 za: int, zw: np.ndarray, epi: Epilogue, out_dtype: np.dtype):
        self.layout, self.x_dtype, self.geo, self.epi, self.out_dtype = layout, x_dtype, geo, epi, out_dtype
        self.x_shape = tuple(x_shape)
        self.rows_shape = (geo.rows, geo.out_channels)  # of the NHWC result as a matrix
        self.channels = geo.in_channels
        self.out_shape = geo.out_shape_nhwc if layout == "NHWC" else (geo.batch, geo.out_channels, geo.out_h,
                                                                      geo.out_w)
        self.empty = geo.batch == 0  # nothing to compute: calls return the empty output
        if self.empty:
            self.direct, self.kind = None, "empty batch"
            return
        # a direct plan takes the caller's layout itself: depthwise (either layout) or pointwise (NCHW)
        if geo.group == geo.in_channels == geo.out_channels:
            self.direct = DepthwisePlan(geo, pack_depthwise(packed.weights, zw), x_dtype, za, epi, layout)
            self.kind = f"depthwise {self.direct.kind}"
            return
        self.za = za + (128 if x_dtype == np.int8 else 0)  # int8 x runs as x + 128, as in the GEMM
        fused = pointwise.applicable_epilogue(geo, zw, epi, self.za) if layout == "NCHW" else None
        if fused is not None and geo.out_h * geo.out_w >= pointwise.MIN_PIXELS and dispatch.choose(
                "conv_pointwise_nchw", geo.rows, geo.out_channels, geo.in_channels).kind == "avx512-vnni":
            self.direct = pointwise.PointwisePlan(packed.weights, geo, x_dtype, self.za, fused)
            self.kind = self.direct.kind
            return
        self.direct = None
        wide = -(-geo.in_channels // KGROUP) * KGROUP
        # the padded input rows the "runs" path reads: pixels per row, channels per pixel (see _codes_args)
        self.row_pixels, self.pixel_channels = geo.pad_left + geo.in_w + geo.pad_right, wide
        self.runs = False
        if geo.group == 1 and wide != geo.in_channels and dispatch.choose(
                "conv_int8", geo.rows, geo.out_channels, wide).kind != "im2col":
            # so few channels (an image's 1 or 3) make taps of less than one k group of 4 bytes: with the input
            # rows padded, the taps along a kernel row are contiguous, and each kernel row is read as one run
            self.runs = geo.dilation_w == 1 and geo.kernel_w > 1
            run = _compact_run(geo) if self.runs and not np.any(zw) else 0
            if run:
                # a run of the KW C bytes of the row's taps, rounded up to whole k groups: the bytes beyond
                # (the next pixels, or padding) meet zero weights; a virtual 1-wide kernel of `run` channels
                c, kw = geo.in_channels, geo.kernel_w
                weights = np.zeros((geo.out_channels, run, geo.kernel_h, 1), np.int8)
                weights[:, : kw * c, :, 0] = packed.weights.transpose(0, 3, 1, 2).reshape(-1, kw * c, geo.kernel_h)
                self.row_pixels = max(self.row_pixels, (geo.out_w - 1) * geo.stride_w - (-run // c))
                self.pixel_channels = c
                geo = dataclasses.replace(geo, in_channels=run, kernel_w=1)
            else:
                # the channels padded to whole k groups of 4, holding the zero point: they meet zero weights
                weights = np.zeros((geo.out_channels, wide, geo.kernel_h, geo.kernel_w), np.int8)
                weights[:, : geo.in_channels] = packed.weights
                geo = dataclasses.replace(geo, in_channels=wide)
            packed = pack_conv_int8(weights)
            self.geo = geo
        og, cg, k = geo.group_out, geo.group_in, geo.depth
        terms = _terms(packed, zw, self.za, k, epi)
        variant = dispatch.choose("conv_int8", geo.rows, og, cg)
        self.kind = variant.kind
        self.pointwise = (variant.kind != "im2col" and not self.runs and pointwise.is_1x1(geo)
                          and _rows_epilogue(terms, epi))
        if self.pointwise:  # a plain GEMM: every pixel of every image a row, read in place
            full = epi.mode == epilogue.QUANT and terms.codes == _RANGES.get(np.dtype(out_dtype).type)
            self.driver, self.family = POINTWISE_DRIVERS[variant.kind, epi.mode, full], ROWS
            self.kind = variant.kind.replace("indirect", "1x1")
            self.step = variant.rows
            geometry = (cg,)
        elif variant.kind == "im2col":
            gemm = dispatch.choose("gemm_int8", geo.rows, og, k)
            self.driver, self.family = DRIVERS[gemm.kind, epi.mode], IM2COL
            lda = -(-k // KGROUP) * KGROUP
            self.step = block_rows(lda, gemm.rows)
            geometry = (geo.window(), cg, np.uint8(self.za), lda, self.step)
        else:
            self.driver, self.family = INDIRECT_DRIVERS[variant.kind, epi.mode], INDIRECT
            self.step = variant.rows
            table = (_runs_indirection(geo, self.row_pixels, self.pixel_channels) if self.runs
                     else _indirection(geo))
            taps, run = (geo.kernel_h, geo.kernel_w * cg) if self.runs else (geo.taps, cg)
            pad = np.full(run, self.za, np.uint8)
            geometry = (pad, table, taps, run // KGROUP, cg)
        self.terms, self.geometry = terms, geometry
        # ~400 GOPS per thread: split rows over threads only when that pays
        self.estimate_us = 2 * geo.rows * og * k / 400e3
        self._fn = groups_entry_kernel(self.driver, self.family)
        self._call_args = self._entry_args(False)
        self._machine = None  # self._fn's machine entry (kernels._jit.machine_entry), made by the first call

    def _codes_args(self, scratch: bool) -> tuple:
        """The ``codes`` argument of the entry (``kernels.conv.int8_driver.activation_codes``)."""
        geo, x_dtype = self.geo, self.x_dtype
        n, h, w, c = geo.batch, geo.in_h, geo.in_w, self.channels
        fill = x_dtype.type(self.za - (128 if x_dtype == np.int8 else 0))
        widen = 2 if self.runs else 0 if c == geo.in_channels else 1
        shape = (n, h, self.row_pixels, self.pixel_channels) if self.runs else (n, h, w, geo.in_channels)
        wide = np.empty(shape if widen and scratch else (0, 0, 0, 0), x_dtype)
        size = int(np.prod(shape)) if widen else n * h * w * c
        flipped = np.empty(size if scratch and x_dtype == np.int8 else 0, np.uint8)
        return widen, shape, fill, geo.pad_left if widen == 2 else 0, wide, x_dtype == np.int8, flipped

    def _entry_args(self, scratch: bool) -> tuple:
        """The arguments of the entry's kernel, ``In(0)`` and ``Out(0)`` for ``x`` and ``out``; its scratch
        allocated when ``scratch`` (an entry's own), else empty (allocated by each call)."""
        geo, terms = self.geo, self.terms
        nchw, t, rows, panels_in, panels_out = nhwc_entry_args(
            self.layout == "NCHW", self.x_shape, self.out_shape, self.x_dtype, self.out_dtype, scratch)
        row_sums = np.empty(geo.rows if scratch and terms.flags[:, 0].any() else 0, np.int64)
        return (In(0), nchw, t, panels_in, self._codes_args(scratch), self.geometry, terms.b, terms.kq,
                terms.col_term, terms.col_term32, terms.w_zp, row_sums, terms.flags, terms.mult, terms.shift,
                terms.single, *terms.scalars, rows, panels_out, Out(0))

    def entry(self) -> Entry:
        """``plan(x, out)`` as one unchecked call on one thread: ``entry([x], [out])`` with ``x`` and ``out``
        C-contiguous, of the prepared shapes, layout and dtypes (checked by the caller). Its scratch is its own:
        one caller at a time."""
        if self.empty:
            return empty_entry()
        if self.direct is None:
            return Entry(self._fn, self._entry_args(True))
        if isinstance(self.direct, DepthwisePlan):
            return self.direct.entry(self.out_dtype)
        return self.direct.entry()

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The convolution of ``x`` (dtype and shape as prepared, in the prepared layout)."""
        if not (type(x) is np.ndarray and x.dtype == self.x_dtype and x.shape == self.x_shape):
            x = _validate.array("x", x, (self.x_dtype,), 4)
            if x.shape != self.x_shape:
                raise ValueError(f"x: expected shape {self.x_shape} ({self.layout}) as prepared, got {x.shape}")
            x = np.asarray(x)  # an ndarray subclass as a plain array
        if out is None:
            out = np.empty(self.out_shape, self.out_dtype)
        elif not (type(out) is np.ndarray and out.dtype == self.out_dtype and out.shape == self.out_shape
                  and out.flags.c_contiguous and out.flags.writeable):
            out = _validate.out(out, self.out_shape, self.out_dtype, x=x)
        else:  # the checks above, inline: only the overlap is left
            _validate.disjoint(out, "x", x)
        if self.empty:
            return out
        flags = x.flags
        if not flags.c_contiguous:
            x = np.ascontiguousarray(x)
            flags = x.flags
        if self.direct is not None:
            self.direct.run(x, out if self.layout == "NCHW" else out.reshape(self.rows_shape))
        elif self.estimate_us < 2 * threads.MIN_US_PER_THREAD or threads.get_num_threads() == 1:
            args = self._call_args
            if flags.writeable and flags.aligned and type(out) is np.ndarray and out.flags.aligned:  # its types
                if self._machine is None:
                    self._machine = machine_entry(self._fn, (x, *args[1:-1], out))
                self._machine(x, *args[1:-1], out)  # the entry's call, its scratch allocated inside
            else:
                self._fn(x, *args[1:-1], out)
        else:
            self._threaded(x, out)
        return out

    def _threaded(self, x: np.ndarray, out: np.ndarray) -> None:
        """The convolution split over ``kernels.threads``: activations prepared once, then the driver per range."""
        geo, terms, geometry = self.geo, self.terms, self.geometry
        if self.layout == "NCHW":
            x = nchw_to_nhwc(x)
        flat = activation_codes(x, *self._codes_args(False))
        rows = out.reshape(self.rows_shape) if self.layout == "NHWC" else np.empty(self.rows_shape, self.out_dtype)
        row_sums = np.empty(geo.rows, np.int64)
        og, cg = geo.group_out, geo.group_in
        scalars = terms.scalars
        for g in range(geo.group):
            group = (terms.col_term[g], terms.col_term32[g], terms.w_zp[g], row_sums, bool(terms.flags[g, 0]),
                     bool(terms.flags[g, 1]), terms.mult[g], terms.shift[g], terms.single[g], *scalars)
            if self.family == ROWS:
                def part(p0, p1, i0, i1, group=group):
                    self.driver(flat, cg, terms.b[0], terms.kq, og, i0, i1, group[1], group[6], group[8], *scalars[2:],
                                rows)
            elif self.family == IM2COL:
                def part(p0, p1, i0, i1, g=g, group=group):
                    window, _, pad, lda, block = geometry
                    self.driver(flat.reshape(x.shape), window, g * cg, cg, pad, lda, block, terms.b[g], terms.kq,
                                og, i0, i1, *group, rows, g * og)
            else:
                def part(p0, p1, i0, i1, g=g, group=group):
                    pad, table, taps, cq, _ = geometry
                    self.driver(flat[g * cg :], pad, table, taps, cq, terms.b[g], og, i0, i1, *group, rows, g * og)

            # rows in whole steps, so that threads never repeat each other's im2col
            threads.run_tiled(part, 1, geo.rows, self.step, self.estimate_us)
        if self.layout == "NCHW":
            from_nhwc(rows.reshape(geo.out_shape_nhwc), self.layout, out)


def _prepare(w: object, x_shape: tuple, x_dtype: object, x_zero_point: object, w_zero_point: object, strides: object,
             pads: object, dilations: object, group: object, layout: str):
    """Check what every int8 convolution shares: ``(packed, x dtype, geometry, za, zw)``."""
    check_layout(layout)
    x_dtype = np.dtype(x_dtype)
    if x_dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x: expected dtype uint8 or int8, got {x_dtype}")
    if len(x_shape) != 4:
        raise ValueError(f"x: expected a 4-D {layout} array, got shape {tuple(x_shape)}")
    packed = _packed(w, group)
    o, cg, kh, kw = packed.shape
    n, a, b, c = x_shape
    nhwc = (n, a, b, c) if layout == "NHWC" else (n, b, c, a)
    geo = conv_geometry(nhwc, (kh, kw), cg, o, strides=strides, pads=pads, dilations=dilations, group=group)
    za = check_zero_point("x_zero_point", x_zero_point, x_dtype)
    w_dtype = np.dtype(np.uint8 if packed.shifted else np.int8)
    zw = check_zero_point("w_zero_point", w_zero_point, w_dtype, o) - (128 if packed.shifted else 0)
    if geo.depth > K_CHUNK:
        raise ValueError(f"w: a filter of {geo.depth} values (KH * KW * C / group) exceeds the supported "
                         f"{K_CHUNK}; split the input channels into groups or several convolutions")
    return packed, x_dtype, geo, za, zw


@functools.lru_cache(maxsize=16)
def _runs_indirection(geo: ConvGeometry, row_pixels: int, channels: int) -> np.ndarray:
    """:func:`_indirection` of a convolution whose input rows are padded to ``row_pixels`` pixels of ``channels``
    (``self.runs`` of :class:`ConvPlan`)."""
    table = runs_indirection(geo.window(), geo.batch, row_pixels, channels)
    table.flags.writeable = False
    return table


def _compact_run(geo: ConvGeometry) -> int:
    """The bytes of one kernel row's taps read as one run of unpadded channels, ``KW C`` rounded up to whole k
    groups, when that takes fewer k groups than padding each pixel's channels to 4 (``KW`` groups); else 0."""
    run = -(-geo.kernel_w * geo.in_channels // KGROUP) * KGROUP
    return run if run // KGROUP < geo.kernel_w else 0


@functools.lru_cache(maxsize=64)
def _indirection(geo: ConvGeometry) -> np.ndarray:
    """The indirection table of a geometry: it depends on nothing else, so it is made once."""
    table = indirection(geo.window(), geo.batch, geo.in_channels)
    table.flags.writeable = False
    return table


class _Terms(NamedTuple):
    """What every group of the general path passes to its driver, stacked over the groups (``G`` of them)."""

    b: np.ndarray  # int8 [G, *]: each group's packed weights (kernels.pack.panels), 64-byte aligned
    kq: int  # their k groups
    col_term: np.ndarray  # int64 [G, O / G]
    col_term32: np.ndarray  # int32 [G, whole panels]: the same, wrapped, for the fused micro-kernels
    w_zp: np.ndarray  # int64 [G, O / G]
    flags: np.ndarray  # int64 [G, 2]: row_term (weight zero points), fused (finished in the registers)
    mult: np.ndarray  # float64 [G, whole panels or 1]
    shift: np.ndarray  # float64 [G, whole panels or 1]
    single: np.ndarray  # float32 [G, *]: kernels.epilogue.single_table
    scalars: tuple  # (lo, hi, zp, qmin, qmax), finite: the same for every group

    @property
    def codes(self) -> tuple:
        """``(qmin, qmax)``."""
        return self.scalars[3:]


def _terms(packed: PackedConvInt8, zw: np.ndarray, za: int, k: int, epi: Epilogue) -> _Terms:
    """The driver arguments of every group; fused in the registers only if every group can be, in the same way."""
    groups = [_group_terms(g, p, zw, za, k, epi, True) for g, p in enumerate(packed.groups)]
    if len({(t[1][1], *((type(v), v) for v in t[2])) for t in groups}) > 1:  # scalars differ: they cannot be shared
        groups = [_group_terms(g, p, zw, za, k, epi, False) for g, p in enumerate(packed.groups)]
    first = packed.groups[0]
    b = aligned_empty(len(groups) * first.data.size).reshape(len(groups), -1)
    for g, p in enumerate(packed.groups):
        b[g] = p.data
    lo, hi, zp, qmin, qmax = groups[0][2]
    columns = list(zip(*(t[0] for t in groups)))
    return _Terms(b, first.k_groups, *(np.stack(c) for c in columns[:3]), np.array([t[1] for t in groups], np.int64),
                  *(np.stack(c) for c in columns[3:]), (_finite(lo), _finite(hi), float(zp), qmin, qmax))


def _group_terms(g: int, packed: PackedInt8, zw_all: np.ndarray, za: int, k: int, epi: Epilogue,
                 fuse: bool) -> tuple:
    """``(arrays, flags, scalars)`` of group ``g``: ``(col_term, col_term32, w_zp, mult, shift, single)``,
    ``(row_term, fused)`` and ``(lo, hi, zp, qmin, qmax)`` (see ``kernels.gemm.driver``); fused in the registers
    where ``fuse`` and ``kernels.gemm.int8.register_epilogue`` allow."""
    og = packed.n
    channels = slice(g * og, (g + 1) * og)
    zw = zw_all[channels].astype(np.int64)
    row_term = bool(zw.any())
    bias = epi.col_bias[channels] if np.ndim(epi.col_bias) else epi.col_bias
    col_term = (-za * packed.col_sums + k * za * zw + bias).astype(np.int64)
    fused_epi = register_epilogue(epi, k, za, bias, row_term) if fuse else None
    fused, epi = fused_epi is not None, fused_epi or epi
    padded = packed.n_panels * PANEL  # the fused micro-kernels read whole panels
    col_term32 = np.zeros(padded, np.int32)
    col_term32[:og] = col_term  # wraps modulo 2**32, as the int32 sums do
    mult, shift = _panel_slice(epi.mult, channels, padded), _panel_slice(epi.shift, channels, padded)
    return ((col_term, col_term32, zw, mult, shift, epilogue.single_table(epi, mult)), (int(row_term), int(fused)),
            (epi.lo, epi.hi, epi.zp, epi.qmin, epi.qmax))


def _rows_epilogue(terms: _Terms, epi: Epilogue) -> bool:
    """Whether ``kernels.conv.int8_driver``'s 1x1 driver finishes ``terms`` (one group): fused in the registers
    (no row term), with an int32 output or quantized codes that are integers."""
    codes = epi.mode == epilogue.QUANT and isinstance(terms.codes[0], (int, np.integer))
    return bool(terms.flags[0, 1]) and (epi.mode == epilogue.INTEGER or codes)


def _panel_slice(values: np.ndarray, channels: slice, padded: int) -> np.ndarray:
    """One group's per-channel factors, zero-padded to ``padded`` (whole panels); scalars stay as they are."""
    if values.size <= 1:
        return values
    part = np.zeros(padded, values.dtype)
    chunk = values[channels]
    part[: chunk.size] = chunk
    return part


def conv2d_int8_plan(w: np.ndarray | PackedConvInt8, x_shape: tuple[int, int, int, int], x_dtype=np.uint8, *,
                     x_zero_point: int = 0, w_zero_point: int | np.ndarray = 0, strides=(1, 1), pads=(0, 0, 0, 0),
                     dilations=(1, 1), group: int = 1, layout: str = "NCHW") -> ConvPlan:
    """:func:`conv2d_int8` prepared for activations of ``x_shape`` and ``x_dtype``: ``plan(x, out=None)``."""
    packed, x_dtype, geo, za, zw = _prepare(w, x_shape, x_dtype, x_zero_point, w_zero_point, strides, pads,
                                            dilations, group, layout)
    limit = max_k_int32(x_dtype, za, zw)
    if geo.depth > limit:
        raise ValueError(f"w: filters of {geo.depth} values (KH * KW * C / group) exceed {limit}, the longest "
                         "for which an int32 result cannot overflow with these zero points; use qlinear_conv2d")
    return ConvPlan(packed, x_shape, x_dtype, layout, geo, za, zw, Epilogue(epilogue.INTEGER), np.dtype(np.int32))


def conv2d_int8(x: np.ndarray, w: np.ndarray | PackedConvInt8, *, x_zero_point: int = 0,
                w_zero_point: int | np.ndarray = 0, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                group: int = 1, layout: str = "NCHW", out: np.ndarray | None = None) -> np.ndarray:
    """Exact int32 convolution of int8 tensors: ONNX ConvInteger (formula in the module docstring).

    Parameters
    ----------
    x : uint8 or int8 ndarray, [N, C, H, W] (``layout="NCHW"``) or [N, H, W, C] (``"NHWC"``)
    w : int8 or uint8 ndarray [O, C / group, KH, KW], or ``pack_conv_int8(w, group=group)``
    x_zero_point : int in the range of ``x``'s dtype; also the value of the padded border
    w_zero_point : int or int array [O] in the range of ``w``'s dtype
    strides, dilations : int or (h, w) pair, >= 1
    pads : (top, left, bottom, right) as ONNX, (h, w), one int, or "same", "same_lower", "valid"
    group : positive divisor of C and O
    out : int32 ndarray shaped like the result (in ``layout``), optional

    Returns
    -------
    int32 ndarray [N, O, OH, OW] (NCHW) or [N, OH, OW, O] (NHWC)

    Raises ``ValueError`` when a filter holds more values than
    :func:`kernels.max_k_int32` allows (the int32 result could overflow). To run
    one layer many times, prepare it once with :func:`conv2d_int8_plan`.
    """
    if type(x) is not np.ndarray or x.ndim != 4:
        x = _activation_array(x, layout)
    key, plan = _lookup(w, (x.shape, x.dtype, layout, x_zero_point, _bytes(w_zero_point), strides, pads, dilations,
                             group))
    if plan is None:
        plan = conv2d_int8_plan(w, x.shape, x.dtype, x_zero_point=x_zero_point, w_zero_point=w_zero_point,
                                strides=strides, pads=pads, dilations=dilations, group=group, layout=layout)
        if key is not None:
            w.plans.put(key, plan)
    return plan(x, out)


def _bytes(v: object) -> object:
    """An argument in a one-shot call's key: an array by dtype, shape and bytes (so a changed array makes a new
    key), anything else as it is."""
    return (v.dtype.char, v.shape, v.tobytes()) if type(v) is np.ndarray else v


def _lookup(w: object, key: tuple) -> tuple[tuple | None, ConvPlan | None]:
    """``(key, plan)``: the plan of a one-shot call kept by its packed weights ``w`` under ``key`` (every argument
    the plan depends on, with the types that change its result), or None; the key normalised when some argument
    is not hashable (pads as a list), None when ``w`` is not packed. Plans hold no scratch between calls: threads
    may share them."""
    if type(w) is not PackedConvInt8:
        return None, None
    try:
        return key, w.plans.get(key)
    except TypeError:
        key = tuple(value_key(v) for v in key)
        return key, w.plans.get(key)


def _activation_array(x: object, layout: str) -> np.ndarray:
    """``x`` once it is known to be a 4-D ndarray: its shape and dtype then prepare the plan, which checks them."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D {layout} array, got shape {x.shape}")
    return x


def qlinear_conv2d_plan(w: np.ndarray | PackedConvInt8, x_shape: tuple[int, int, int, int], x_scale: float,
                        x_zero_point: int, w_scale: float | np.ndarray, w_zero_point: int | np.ndarray,
                        y_scale: float | None, y_zero_point: int | np.ndarray | None, bias: np.ndarray | None = None,
                        *, x_dtype=np.uint8, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
                        activation: str | tuple | None = None, layout: str = "NCHW",
                        out_dtype: type | np.dtype | None = None) -> ConvPlan:
    """:func:`qlinear_conv2d` prepared for activations of ``x_shape`` and ``x_dtype``: ``plan(x, out=None)``."""
    packed, x_dtype, geo, za, zw = _prepare(w, x_shape, x_dtype, x_zero_point, w_zero_point, strides, pads,
                                            dilations, group, layout)
    if out_dtype is None:
        out_dtype = y_zero_point.dtype if isinstance(y_zero_point, (np.ndarray, np.generic)) else x_dtype
    epi, out_dtype = fused_epilogue(geo.out_channels, x_scale, w_scale, bias, activation, out_dtype, y_scale,
                                    y_zero_point, names=("x_scale", "y_scale", "y_zero_point"))
    return ConvPlan(packed, x_shape, x_dtype, layout, geo, za, zw, epi, out_dtype)


def qlinear_conv2d(x: np.ndarray, x_scale: float, x_zero_point: int, w: np.ndarray | PackedConvInt8,
                   w_scale: float | np.ndarray, w_zero_point: int | np.ndarray, y_scale: float | None,
                   y_zero_point: int | np.ndarray | None, bias: np.ndarray | None = None, *, strides=(1, 1),
                   pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, activation: str | tuple | None = None,
                   layout: str = "NCHW", out_dtype: type | np.dtype | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Fused quantized convolution: ONNX QLinearConv, with an optional fused activation.

    With ``acc`` the exact accumulators of :func:`conv2d_int8` and
    ``s[o] = x_scale * w_scale[o]``::

        real = act(acc * s + bias)                                            out_dtype float32
        y    = saturate(rint(real / y_scale + y_zero_point))                  uint8 / int8

    rounding half to even. ``bias`` is int32 in accumulator units (ONNX:
    ``x_scale * w_scale`` per unit) or float in real units; ``activation`` is None,
    "relu", "relu6" or ``("clip", lo, hi)`` in real units. The output dtype is
    ``out_dtype`` if given, else that of ``y_zero_point`` when it is a NumPy value,
    else that of ``x``; for ``out_dtype=numpy.float32`` pass ``y_scale`` and
    ``y_zero_point`` as None. Other arguments as :func:`conv2d_int8`; ``w_scale``
    is a positive float or float array [O]. Returns NCHW or NHWC like ``x``. To
    run one layer many times, prepare it once with :func:`qlinear_conv2d_plan`.
    """
    if type(x) is not np.ndarray or x.ndim != 4:
        x = _activation_array(x, layout)
    key, plan = _lookup(w, (x.shape, x.dtype, layout, x_scale, x_zero_point, _bytes(w_scale),
                             _bytes(w_zero_point), y_scale, type(y_zero_point), y_zero_point, _bytes(bias), strides,
                             pads, dilations, group, activation, out_dtype))
    if plan is None:
        plan = qlinear_conv2d_plan(w, x.shape, x_scale, x_zero_point, w_scale, w_zero_point, y_scale, y_zero_point,
                                   bias, x_dtype=x.dtype, strides=strides, pads=pads, dilations=dilations, group=group,
                                   activation=activation, layout=layout, out_dtype=out_dtype)
        if key is not None:
            w.plans.put(key, plan)
    return plan(x, out)
