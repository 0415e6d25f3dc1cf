"""Depthwise int8 convolution (``group == C == O``: one filter per channel), NHWC.

With ``x'`` the activations minus their zero point (zero in the padding) and
``w'`` the weights minus theirs, output pixel ``m = (n * OH + oy) * OW + ox``::

    acc[m, c] = sum_{ky, kx} x'[n, oy SH + ky DH - PT, ox SW + kx DW - PL, c] * w'[c, ky, kx]

then ``kernels.epilogue.finish_tile`` turns ``acc`` into the caller's output (an
int32 output without a bias takes ``acc`` directly).

Taps go in pairs ``(kx, kx + 1)`` of one kernel row (an odd last tap pairs with a
zero weight), so that one ``vpmaddwd`` does two multiply-adds per int32 lane: a
*pair row* holds, for each pair position ``p`` and channel ``c``, the int16
values ``(x'[.., p, c], x'[.., p + DW, c])`` side by side, and the packed weights
hold ``(w'[c, ky, 2j], w'[c, ky, 2j + 1])`` likewise. A tap pair of every output
pixel is then one load of channels from a pair row, multiplied by one load of
weights: a contiguous, branch-free loop over channels that LLVM vectorises. Pair
rows are built once per padded input row into a ring holding the last
``(KH - 1) DH + 1`` of them, with zeros for the padding, so no tap needs a bounds
test. Channels go in blocks of ``CB``: a block's ring and weights stay in L2.

Exactness: ``|x'|, |w'| <= 255``, so one tap is at most ``65025`` in magnitude
and ``int32`` sums are exact up to ``MAX_TAPS_INT32 = 33025`` taps; longer
kernels accumulate in ``int64``.

This portable kernel is the "generic" variant of the op "conv_depthwise";
``kernels.dispatch`` prefers ``kernels.conv.depthwise_vnni`` where it applies.
"""

from __future__ import annotations

import numba
import numpy as np

from kernels import _validate, dispatch, threads
from kernels._jit import kernel
from kernels.conv import depthwise_planes, depthwise_vnni
from kernels.conv.geometry import ConvGeometry, check_layout
from kernels.conv.int8_driver import nhwc_entry_args, nhwc_entry_kernel, variant
from kernels.conv.layout import nchw_to_nhwc, nhwc_to_nchw
from kernels.entry import Entry, In, Out
from kernels.epilogue import (INTEGER, MODES, QUANT, REAL, Epilogue, bias_bound, code_bounds, codes_fit, finish_tile,
                              quantized_bounds, single_precision_codes, single_precision_table)
from kernels.gemm.int8 import _finite
from kernels.pack.panels import Sealed

MAX_TAP = 255 * 255  # largest |x'| * |w'|
PAIR_MAX = 2 * MAX_TAP  # largest |sum of one tap pair|
MAX_TAPS_INT32 = (2**31 - 1) // MAX_TAP  # 33025
CB = 256  # channels per block
TILE_PIXELS = 16  # output pixels per epilogue tile
SPECIALISED = ((3, 3, 1, 1), (3, 3, 2, 2), (5, 5, 1, 1), (5, 5, 2, 2))  # (KH, KW, SH, SW), dilation 1
OUT_DTYPES = {INTEGER: (np.dtype(np.int32),), REAL: (np.dtype(np.float32),),
              QUANT: (np.dtype(np.uint8), np.dtype(np.int8))}


class PackedDepthwise(Sealed):
    """Depthwise weights ``[C, 1, KH, KW]`` minus their zero points, paired by :func:`pack_depthwise`.

    Attributes
    ----------
    pairs : int16 [ceil(C / CB), KH * ceil(KW / 2), 2 CB], blocks of ``CB`` channels with
        ``pairs[b, ky ceil(KW / 2) + j, 2k + e] = w[b CB + k, 0, ky, 2j + e] - zw[b CB + k]`` (0 past KW and C)
    channels : C
    kernel_hw : (KH, KW)
    quads : int8 ``kernels.conv.depthwise_vnni.pack_quads`` of the same weights, or None
        unless the kernel is one of ``depthwise_vnni.KERNELS`` and every ``w - zw`` fits int8
    sums : int64 [C], ``sum_{ky, kx} (w[c, 0, ky, kx] - zw[c])``
    """

    __slots__ = ("pairs", "channels", "kernel_hw", "quads", "sums")

    def __init__(self, pairs: np.ndarray, channels: int, kernel_hw: tuple[int, int], quads: np.ndarray | None,
                 sums: np.ndarray):
        self.pairs, self.channels, self.kernel_hw, self.quads, self.sums = pairs, channels, kernel_hw, quads, sums

    @property
    def weights(self) -> np.ndarray:
        """int16 ``[KH * KW, C]``: ``w - zw``, tap-major, channels contiguous."""
        kh, kw = self.kernel_hw
        blocks = self.pairs.shape[0]
        taps = self.pairs.reshape(blocks, kh, -1, CB, 2).transpose(1, 2, 4, 0, 3).reshape(kh, -1, blocks * CB)
        return np.ascontiguousarray(taps[:, :kw, : self.channels].reshape(kh * kw, self.channels))

    def __repr__(self) -> str:
        return f"PackedDepthwise(channels={self.channels}, kernel_hw={self.kernel_hw})"


def pack_depthwise(w: np.ndarray, w_zero_point: int | np.ndarray = 0) -> PackedDepthwise:
    """Pack int8 depthwise weights ``w [C, 1, KH, KW]`` (ONNX OIHW) minus ``w_zero_point``.

    ``w_zero_point`` is an int or an int ``[C]`` array, in the int8 range.
    """
    w = _validate.array("w", w, (np.int8,), 4)
    c, one, kh, kw = w.shape
    if one != 1 or min(c, kh, kw) < 1:
        raise ValueError(f"w: expected shape (C, 1, KH, KW) with C, KH, KW >= 1 (one input channel per filter), "
                         f"got {w.shape}")
    zw = _validate.per_channel("w_zero_point", w_zero_point, c, np.int64)
    _validate.integer_in("w_zero_point", zw, -128, 127)
    pairs = np.zeros((-(-c // CB), kh * -(-kw // 2), 2 * CB), np.int16)
    _pack_pairs(w, zw, pairs)
    centred = w[:, 0].astype(np.int16) - zw.astype(np.int16)[:, None, None]
    quads = None
    if (kh, kw) in depthwise_vnni.KERNELS and -128 <= centred.min() and centred.max() <= 127:
        quads = depthwise_vnni.pack_quads(centred)
    return PackedDepthwise(pairs, c, (kh, kw), quads, centred.reshape(c, -1).sum(1, dtype=np.int64))


@kernel
def _pack_pairs(w, zw, pairs):
    """``pairs[b, ky ceil(KW / 2) + j, 2k + e] = w[b CB + k, 0, ky, 2j + e] - zw[b CB + k]``; other entries stay."""
    c, _, kh, kw = w.shape
    kwp = (kw + 1) // 2
    for ch in range(c):
        b, k = divmod(ch, CB)
        for ky in range(kh):
            for kx in range(kw):
                pairs[b, ky * kwp + kx // 2, 2 * k + kx % 2] = w[ch, 0, ky, kx] - zw[ch]


@kernel(inline="always")
def _pair(xr, wr, c):
    """``xr[2c] wr[2c] + xr[2c + 1] wr[2c + 1]`` as int32: one ``vpmaddwd`` lane once vectorised.

    ``min`` is the identity here (``|pair| <= PAIR_MAX``) but stops LLVM from
    reassociating the running sum, which would split the pair into two ``vpmulld``.
    """
    pair = np.int32(np.int32(xr[2 * c]) * np.int32(wr[2 * c]) + np.int32(xr[2 * c + 1]) * np.int32(wr[2 * c + 1]))
    return min(pair, np.int32(PAIR_MAX))


@kernel
def build_pair_row(xf, src, row_ok, zx, w_in, c, pl, dw, g, c0, cb, dst):
    """Pair row of one input row (starting at ``xf[src]``), channels ``c0 .. c0 + cb``, into ``dst``.

    ``dst[p, 2k + e] = xf[src + (p g - PL + e DW) C + c0 + k] - zx``, or 0 where that
    column is outside the image or ``row_ok`` is false (a padding row).
    """
    positions = dst.shape[0]
    # positions whose two columns are both inside the image
    p_lo = min(positions, -(-pl // g)) if row_ok else positions
    p_hi = max(p_lo, min(positions, (w_in - 1 - dw + pl) // g + 1))
    if g == 1 and cb == c:  # all channels, every column: the interior is one linear run
        d = dst.reshape(-1)
        base = src - pl * c
        for i in range(p_lo * c, p_hi * c):
            d[np.uint64(2 * i)] = np.int16(xf[np.uint64(base + i)]) - zx
            d[np.uint64(2 * i + 1)] = np.int16(xf[np.uint64(base + i + dw * c)]) - zx
    else:
        for p in range(p_lo, p_hi):
            d = dst[p]
            sa = src + (p * g - pl) * c + c0
            sb = sa + dw * c
            for k in range(cb):
                d[2 * k] = np.int16(xf[np.uint64(sa + k)]) - zx
                d[2 * k + 1] = np.int16(xf[np.uint64(sb + k)]) - zx
    for p in range(positions):
        if p_lo <= p < p_hi:
            continue
        # a border position: read a column inside the image, then zero it where it is not
        a = p * g - pl
        b = a + dw
        ma = np.int16(row_ok and 0 <= a < w_in)
        mb = np.int16(row_ok and 0 <= b < w_in)
        sa = src + min(max(a, 0), w_in - 1) * c + c0
        sb = src + min(max(b, 0), w_in - 1) * c + c0
        d = dst[p]
        for k in range(cb):
            d[2 * k] = (np.int16(xf[np.uint64(sa + k)]) - zx) * ma
            d[2 * k + 1] = (np.int16(xf[np.uint64(sb + k)]) - zx) * mb


def _make_driver(spec: tuple[int, int, int, int] | None, mode: int, wide: bool):
    """The driver for kernel size and strides ``spec`` (None: any, with dilation), epilogue ``mode``.

    ``spec`` and ``mode`` are compile-time constants in it, so the tap loops unroll
    and only one epilogue loop is kept; ``wide`` accumulates in int64.
    """
    general = spec is None
    KH, KW, SH, SW = (1, 1, 1, 1) if general else spec
    acc_dtype = np.int64 if wide else np.int32
    DIRECT = mode == INTEGER and not wide  # int32 sums may go straight to the output

    @numba.njit(nogil=True)  # compiled into the driver only: a closure is no disk-cache entry of its own
    def pixel_row(ring, first, wb, kh, kwp, sw, dh, dw, g, ox0, tw, cb, tile):
        """``tile[t, :cb] = acc`` of output pixels ``ox0 .. ox0 + tw`` of one output row.

        ring : int16 [rows, positions, >= 2 cb], pair row ``ky`` of the window in
               ``ring[(first + ky DH) % rows]``
        wb   : int16 [KH * ceil(KW / 2), 2 CB], the block's weight pairs
        tile : [>= tw, >= cb], int32 or int64
        The loops over channels index every array by ``c`` alone, so LLVM sees plain
        contiguous streams and needs no run-time overflow checks to vectorise them.
        A specialised kernel sums all its taps in registers (the tap loops unroll);
        the general one adds one tap pair at a time to the tile.
        """
        if not general:
            kh, kwp, sw, dh, dw, g = KH, (KW + 1) // 2, SW, 1, 1, 2 if SW % 2 == 0 else 1
        depth = ring.shape[0]
        for t in range(tw):
            dst = tile[t]
            p0 = (ox0 + t) * sw // g
            if general:
                dst[:cb] = 0
                for ky in range(kh):
                    row = first + ky * dh
                    row -= depth * (row >= depth)
                    for j in range(kwp):
                        xr = ring[row, p0 + 2 * j * dw // g]
                        wr = wb[ky * kwp + j]
                        for c in range(cb):
                            dst[c] += _pair(xr, wr, c)
                continue
            for c in range(cb):
                a = acc_dtype(0)
                for ky in range(kh):
                    for j in range(kwp):
                        row = first + ky * dh
                        row -= depth * (row >= depth)  # a modulo would divide in the channel loop
                        a += _pair(ring[row, p0 + 2 * j * dw // g], wb[ky * kwp + j], c)
                dst[c] = a

    def depthwise_rows(x, window, zx, pairs, b0, b1, r0, r1, col_term, w_zp, row_sums, mult, shift, lo, hi, zp,
                       qmin, qmax, out):
        """Channel blocks ``b0 .. b1`` (of ``CB``) of output rows ``r0 .. r1`` (``r = n * OH + oy``).

        x     : uint8 or int8 [N, H, W, C] C-contiguous NHWC
        pairs : ``PackedDepthwise.pairs``
        out   : [N * OH * OW, C]; the other arguments are those of ``finish_tile``
        An int32 output of one block without ``col_term`` takes the sums directly.
        """
        h, w_in, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow = window
        c = x.shape[3]
        xf = x.reshape(-1)
        kwp = (kw + 1) // 2
        g = 2 if sw % 2 == 0 else 1  # the pair positions read are multiples of g
        positions = ((ow - 1) * sw + 2 * (kwp - 1) * dw) // g + 1
        depth = (kh - 1) * dh + 1  # padded rows one output row reads
        ring = np.empty((depth, positions, 2 * min(CB, c)), np.int16)
        held = np.empty(depth, np.int64)  # which (image, padded row) each ring slot holds
        tile = np.empty((TILE_PIXELS, CB), acc_dtype)
        direct = False
        if DIRECT:  # a compile-time constant: the other drivers never type the direct call
            direct = c <= CB and not col_term.any()
        for b in range(b0, b1):
            c0 = b * CB
            cb = min(CB, c - c0)
            held[:] = -1
            for r in range(r0, r1):
                n = r // oh
                oy = r % oh
                top = oy * sh
                for ky in range(kh):
                    prow = top + ky * dh
                    slot = prow % depth
                    key = n * (oh * sh + depth) + prow
                    if held[slot] != key:
                        iy = prow - pt
                        row_ok = 0 <= iy < h
                        build_pair_row(xf, (n * h + iy) * w_in * c if row_ok else 0, row_ok, zx, w_in, c, pl, dw, g,
                                       c0, cb, ring[slot])
                        held[slot] = key
                if DIRECT and direct:
                    rows = out[r * ow : (r + 1) * ow]
                    pixel_row(ring, top % depth, pairs[b], kh, kwp, sw, dh, dw, g, 0, ow, cb, rows)
                    continue
                for ox0 in range(0, ow, TILE_PIXELS):
                    tw = min(TILE_PIXELS, ow - ox0)
                    pixel_row(ring, top % depth, pairs[b], kh, kwp, sw, dh, dw, g, ox0, tw, cb, tile)
                    finish_tile(tile, r * ow + ox0, tw, c0, cb, col_term, w_zp, row_sums, False, mult, shift, lo,
                                hi, zp, qmin, qmax, mode, out)

    return depthwise_rows


def _driver_name(spec: tuple[int, int, int, int] | None, mode: int, wide: bool) -> str:
    shape = "any" if spec is None else "{}x{}s{}{}".format(*spec)
    return f"depthwise_rows_{shape}_{mode}{'_wide' * wide}"


DRIVERS = {(spec, mode, wide): variant(__name__, _driver_name(spec, mode, wide), _make_driver(spec, mode, wide))
           for spec in SPECIALISED + (None,) for mode in MODES for wide in (False, True) if spec is None or not wide}


X_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


class DepthwisePlan:
    """A depthwise convolution prepared once: geometry, weights, zero point, epilogue, layout and kernel.

    ``plan(x, out)`` then checks only ``x`` and ``out`` and runs (``plan.run(x, out)``
    does not check). ``layout`` "NHWC": ``x [N, H, W, C]`` and ``out [N OH OW, C]``;
    "NCHW": ``x [N, C, H, W]`` and ``out [N, C, OH, OW]``, convolved plane by plane by
    ``kernels.conv.depthwise_planes`` where that applies (``kind`` "avx512-vnni-planes"),
    else through one NHWC copy each way. All compute ``acc`` of the module docstring
    (the padding contributes 0, as if it held ``x_zero_point``) and write what
    ``kernels.epilogue.finish_tile`` makes of ``acc + epi.col_bias``. An int32 output
    wraps if that sum exceeds int32: the caller checks.
    """

    def __init__(self, geo: ConvGeometry, packed: PackedDepthwise, x_dtype: object, x_zero_point: int,
                 epi: Epilogue, layout: str = "NHWC"):
        _check_setup(geo, packed, x_dtype, x_zero_point, epi)
        check_layout(layout)
        self.geo, self.packed, self.x_dtype, self.zx, self.epi, self.layout = (
            geo, packed, np.dtype(x_dtype), int(x_zero_point), epi, layout)
        c = packed.channels
        self.out_dtypes = OUT_DTYPES[epi.mode]
        nchw = layout == "NCHW"
        self.x_shape = (geo.batch, c, geo.in_h, geo.in_w) if nchw else (geo.batch, geo.in_h, geo.in_w, c)
        self.out_shape = (geo.batch, c, geo.out_h, geo.out_w) if nchw else (geo.rows, c)
        if nchw and dispatch.choose("conv_depthwise_nchw", geo.rows, c,
                                    _planes_taps(geo, packed, epi)).kind == "avx512-vnni":
            self.kind = "avx512-vnni-planes"
            self.driver, self._args, self._split, self.estimate_us = self._planes()
        else:
            self.kind = dispatch.choose("conv_depthwise", geo.rows, c, _vnni_taps(geo, packed, epi)).kind
            self.driver, self._args, self._split, self.estimate_us = (
                self._vnni() if self.kind == "avx512-vnni" else self._generic())
        self._layouts: dict[np.dtype, tuple] = {}  # output dtype -> the layout arguments of its entry

    def entry(self, out_dtype: object) -> Entry:
        """``plan(x, out)`` for ``out`` of ``out_dtype`` as one unchecked call on one thread: ``entry([x], [out])``
        with ``x`` and ``out`` C-contiguous, shaped as prepared (``out`` NHWC may also be ``[N, OH, OW, C]``)."""
        out_dtype = np.dtype(out_dtype)
        if out_dtype not in self.out_dtypes:
            raise TypeError(f"out_dtype: expected {' or '.join(map(str, self.out_dtypes))}, got {out_dtype}")
        return Entry(*self._call(out_dtype, True))

    def _call(self, out_dtype: np.dtype, scratch: bool) -> tuple:
        """``(kernel, args)`` of the entry, ``In(0)`` / ``Out(0)`` for ``x`` and ``out``; with its own scratch."""
        full = self._args(0, self._split[0], 0, self._split[1])
        if self.kind == "avx512-vnni-planes":
            return self.driver, (In(0), *full, Out(0))
        layout = nhwc_entry_args(self.layout == "NCHW", self.x_shape, self.out_shape, self.x_dtype, out_dtype,
                                 scratch)
        return nhwc_entry_kernel(self.driver), (In(0), *layout, full, Out(0))

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        """The convolution of checked, C-contiguous ``x`` into ``out``: on one thread the entry's call, else split
        over ``kernels.threads``."""
        if self.estimate_us < 2 * threads.MIN_US_PER_THREAD or threads.get_num_threads() == 1:
            call = self._layouts.get(out.dtype)
            if call is None:
                call = self._layouts[out.dtype] = self._call(out.dtype, False)
            fn, args = call
            fn(x, *args[1:-1], out)
            return
        if self.layout == "NCHW" and self.kind != "avx512-vnni-planes":
            rows = np.empty((self.geo.rows, self.geo.out_channels), out.dtype)
            self._threaded(nchw_to_nhwc(x), rows)
            nhwc_to_nchw(rows.reshape(self.geo.out_shape_nhwc), out)
        else:
            self._threaded(x, out)

    def _threaded(self, x: np.ndarray, out: np.ndarray) -> None:
        driver, args = self.driver, self._args
        panels, rows = self._split

        def part(p0: int, p1: int, r0: int, r1: int) -> None:
            driver(x, *args(p0, p1, r0, r1), out)

        threads.run_tiled(part, panels, rows, 1, self.estimate_us)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The convolution of ``x`` (dtype and shape as prepared) into ``out``; returns ``out``."""
        x = _validate.array("x", x, (self.x_dtype,), 4)
        if x.shape != self.x_shape:
            raise ValueError(f"x: expected {self.layout} shape {self.x_shape}, got {x.shape}")
        out = _validate.array("out", out, self.out_dtypes, len(self.out_shape))
        _validate.out(out, self.out_shape, out.dtype, x=x)
        self.run(x, out)
        return out

    def _factors(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``mult`` and ``shift`` as float64 arrays of ``size`` values, zeros past C (kernels load whole vectors)."""
        c, epi = self.packed.channels, self.epi
        if epi.mode == INTEGER:
            return np.zeros(size), np.zeros(size)
        return tuple(np.concatenate([v[:c], np.zeros(size - c)]) for v in (epi.mult, epi.shift))

    def _bounds(self) -> tuple[float, float]:
        epi = self.epi
        if epi.mode == QUANT:  # the vector epilogues skip the clamp to [qmin, qmax]
            return quantized_bounds(epi.lo, epi.hi, epi.zp, epi.qmin, epi.qmax)
        return epi.lo, epi.hi

    def _vnni(self):
        """The NHWC run by ``kernels.conv.depthwise_vnni`` (``_vnni_taps`` > 0)."""
        geo, packed, epi = self.geo, self.packed, self.epi
        c = packed.channels
        vectors = -(-c // depthwise_vnni.LANES)
        mult, shift = self._factors(vectors * depthwise_vnni.LANES)
        lo, hi = self._bounds()
        zp = float(epi.zp)
        qlo, qhi = code_bounds(lo, hi, zp) if epi.mode == QUANT else (0, 0)
        single = single_precision_table(single_precision_codes(mult[:c], shift[:c], zp, _largest(geo, epi)),
                                        vectors * depthwise_vnni.LANES)
        signed = self.x_dtype == np.int8
        driver = depthwise_vnni.DRIVERS[geo.kernel_h, geo.kernel_w, geo.stride_w, signed, bool(shift.any())]
        col_term = depthwise_vnni.col_terms(packed.sums, epi.col_bias, self.zx, signed)
        pad = np.full(geo.in_w * c, self.zx & 0xFF, np.uint8)
        window, zx = geo.window(), self.zx
        lo, hi = _finite(lo), _finite(hi)

        def args(v0: int, v1: int, r0: int, r1: int) -> tuple:
            return (window, zx, packed.quads, col_term, pad, mult, shift, lo, hi, zp, qlo, qhi, single, v0, v1, r0,
                    r1)

        # single-thread time measured here: ~0.1 ns per output and kernel row
        return driver, args, (vectors, geo.batch * geo.out_h), geo.rows * c * geo.kernel_h * 1e-4

    def _planes(self):
        """The NCHW run by ``kernels.conv.depthwise_planes`` (``_planes_taps`` > 0): no layout copy."""
        geo, packed, epi = self.geo, self.packed, self.epi
        c = packed.channels
        kh, kw = packed.kernel_hw
        taps = depthwise_planes.pack_taps(packed.weights.T.reshape(c, kh, kw))
        signed = self.x_dtype == np.int8
        flip = 0x80 if signed else 0
        col_term = depthwise_vnni.col_terms(packed.sums, epi.col_bias, self.zx, signed)[:c].astype(np.int64)
        mult, shift = self._factors(c)
        zp = float(epi.zp)
        qlo, qhi = code_bounds(*self._bounds(), zp)
        single = single_precision_codes(mult, shift, zp, _largest(geo, epi))
        driver = depthwise_planes.DRIVERS[kh, kw, bool(shift.any())]
        pads, pad_byte = np.array(geo.pads, np.int64), (self.zx & 0xFF) ^ flip

        def args(p0: int, p1: int, _r0: int, _r1: int) -> tuple:
            return pads, pad_byte, flip, taps, col_term, mult, shift, zp, qlo, qhi, single, p0, p1

        # single-thread time measured here: ~0.3 ns per output
        return driver, args, (geo.batch * c, 1), geo.rows * c * 3e-4

    def _generic(self):
        """The NHWC run by the portable kernel of this module."""
        geo, packed, epi = self.geo, self.packed, self.epi
        c = packed.channels
        spec = (geo.kernel_h, geo.kernel_w, geo.stride_h, geo.stride_w)
        specialised = spec in SPECIALISED and geo.dilation_h == geo.dilation_w == 1
        driver = DRIVERS[spec if specialised else None, epi.mode, geo.taps > MAX_TAPS_INT32]
        col_term = np.zeros(c, np.int64) + epi.col_bias
        w_zp = np.zeros(c, np.int64)  # the weights are already centred
        row_sums = np.zeros(1, np.int64)
        window, zx = geo.window(), self.zx
        lo, hi = _finite(epi.lo), _finite(epi.hi)

        def args(b0: int, b1: int, r0: int, r1: int) -> tuple:
            return (window, zx, packed.pairs, b0, b1, r0, r1, col_term, w_zp, row_sums, epi.mult, epi.shift, lo, hi,
                    epi.zp, epi.qmin, epi.qmax)

        # single-thread time measured here: ~20 GOPS of multiply-adds, ~1.5 ns per output of float epilogue
        return (driver, args, (-(-c // CB), geo.batch * geo.out_h),
                geo.rows * c * (geo.taps * 1e-4 + (1.5e-3 if epi.mode != INTEGER else 0.0)))


def _check_setup(geo: object, packed: object, x_dtype: object, x_zero_point: object, epi: object) -> None:
    if not isinstance(geo, ConvGeometry):
        raise TypeError(f"geo: expected a kernels.conv.geometry.ConvGeometry, got {type(geo).__name__}")
    if not isinstance(packed, PackedDepthwise):
        raise TypeError(f"packed: expected a PackedDepthwise, got {type(packed).__name__}")
    c = packed.channels
    if not geo.group == geo.in_channels == geo.out_channels == c:
        raise ValueError(f"geo: expected a depthwise convolution of {c} channels (group == C == O == {c}), got "
                         f"group={geo.group}, C={geo.in_channels}, O={geo.out_channels}")
    if (geo.kernel_h, geo.kernel_w) != packed.kernel_hw:
        raise ValueError(f"geo: expected kernel {packed.kernel_hw}, got {(geo.kernel_h, geo.kernel_w)}")
    if np.dtype(x_dtype) not in X_RANGES:
        raise TypeError(f"x: expected dtype uint8 or int8, got {np.dtype(x_dtype)}")
    lo, hi = X_RANGES[np.dtype(x_dtype)]
    if (isinstance(x_zero_point, bool) or not isinstance(x_zero_point, (int, np.integer))
            or not lo <= x_zero_point <= hi):
        raise ValueError(f"x_zero_point: expected an int in [{lo}, {hi}], got {x_zero_point!r}")
    if not isinstance(epi, Epilogue) or epi.mode not in OUT_DTYPES:
        raise TypeError(f"epi: expected a kernels.epilogue.Epilogue, got {epi!r:.80}")
    if isinstance(epi.col_bias, np.ndarray) and (epi.col_bias.dtype != np.int64 or epi.col_bias.shape != (c,)):
        raise ValueError(f"epi.col_bias: expected an int64 array of shape ({c},), got {epi.col_bias.dtype} "
                         f"{epi.col_bias.shape}")
    if epi.mode != INTEGER:
        for name in ("mult", "shift"):
            v = getattr(epi, name)
            if not isinstance(v, np.ndarray) or v.dtype != np.float64 or v.ndim != 1 or v.shape[0] < c:
                raise ValueError(f"epi.{name}: expected a float64 array of at least {c} values, got {v!r:.60}")


def depthwise_int8(x: np.ndarray, geo: ConvGeometry, packed: PackedDepthwise, x_zero_point: int, epi: Epilogue,
                   out: np.ndarray) -> np.ndarray:
    """Depthwise convolution of NHWC ``x`` with ``packed``, finished by ``epi`` into ``out`` (a one-shot plan).

    x   : uint8 or int8 [N, H, W, C] C-contiguous, NHWC
    geo : ``kernels.conv.geometry.conv_geometry`` of the convolution, ``group == C == O``
    out : [N * OH * OW, C] C-contiguous: int32 (``epi.mode`` INTEGER), float32 (REAL),
          uint8 or int8 (QUANT)
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    return DepthwisePlan(geo, packed, x.dtype, x_zero_point, epi)(x, out)


def _largest(geo: ConvGeometry, epi: Epilogue) -> int:
    """A bound on ``|acc + col_bias|``."""
    return bias_bound(epi.col_bias) + geo.taps * MAX_TAP


#: Output pixels per plane below which the NCHW planes kernel loses to the NHWC one (see :func:`_planes_taps`).
PLANES_MIN_PIXELS = 128


def _planes_taps(geo: ConvGeometry, packed: PackedDepthwise, epi: Epilogue) -> int:
    """The K of "conv_depthwise_nchw": ``KH KW``, or 0 where ``kernels.conv.depthwise_planes`` does not apply.

    It applies where the NHWC VNNI kernel does (:func:`_vnni_taps`), to an int8 / uint8
    output of a kernel of ``depthwise_planes.KERNELS`` with stride 1, on planes of at least
    :data:`PLANES_MIN_PIXELS` outputs: smaller ones fill too little of its 64-output blocks (measured,
    batch 32, one thread: the NHWC kernel takes 0.35x its time on 4x4 planes, 0.7x on 8x8; 0.35x the
    NHWC kernel's time is the planes kernel's on 16x16).
    """
    if (epi.mode != QUANT or (geo.kernel_h, geo.kernel_w) not in depthwise_planes.KERNELS
            or geo.stride_h != 1 or geo.stride_w != 1 or geo.out_h * geo.out_w < PLANES_MIN_PIXELS):
        return 0
    return _vnni_taps(geo, packed, epi)


def _vnni_taps(geo: ConvGeometry, packed: PackedDepthwise, epi: Epilogue) -> int:
    """The K of "conv_depthwise" for ``kernels.dispatch``: ``KH KW``, or 0 where the VNNI kernel does not apply.

    It applies to the kernels of ``depthwise_vnni.KERNELS`` with strides in
    ``depthwise_vnni.STRIDES`` and dilation 1, when ``w - w_zp`` fits int8 (``packed.quads``),
    for a float epilogue when ``acc + col_bias`` surely fits int32 (its int32 sums wrap),
    and for an int8 / uint8 output when the rounded codes surely fit int32
    (``kernels.epilogue.codes_fit``: it clamps them as integers).
    """
    if (packed.quads is None or geo.dilation_h != 1 or geo.dilation_w != 1
            or geo.stride_h not in depthwise_vnni.STRIDES or geo.stride_w not in depthwise_vnni.STRIDES):
        return 0
    if epi.mode == INTEGER:
        return geo.taps
    largest = _largest(geo, epi)
    if largest > 2**31 - 1 or (epi.mode == QUANT and not codes_fit(epi, largest)):
        return 0
    return geo.taps
