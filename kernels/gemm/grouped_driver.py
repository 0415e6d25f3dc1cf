"""Drivers of the group-wise sub-byte products: activation quantization and the tile loops.

``quantize_activations`` turns float32 ``x [M, K]`` into int8 codes per row and
per block of the weights' group size, as ONNX Runtime MatMulNBits
(accuracy_level 4) and llama.cpp's q8 blocks do, all in float32::

    sx[m, g]  = max_{k in g} |x[m, k]| / 127
    xq[m, k]  = clip(rint(x[m, k] / sx[m, g]), -127, 127)   (half to even; 0 when sx == 0)
    sumx[m, g] = sum_{k in g} xq[m, k]

One driver per micro-kernel kind then walks its output range panel by panel: per
panel, rows in tiles of the kernel's height. A GEMV's panel (64 x K codes) is
read from memory once per row tile, the first time from L3 / DRAM and then from
L2; each tile leaves the micro-kernel in a scratch buffer and is copied to ``out``.
:data:`PRODUCTS` holds, per kind, the whole product on one thread (quantization, then every tile): what a
``kernels.gemm.grouped.GroupedPlan`` calls and gives as its entry.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels._jit import kernel
from kernels.sync import barrier, share, tile_share
from kernels.gemm.grouped_microkernels import TILES, grouped_microkernel
from kernels.gemm.select import selector
from kernels.pack.grouped import STEP_BYTES
from kernels.pack.panels import PANEL


ROUND = np.float32(1.5 * 2**23)


@intrinsic
def _as_float32(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0],
                               ir.FloatType())

    return types.float32(bits), codegen


@kernel
def _abs_max_bits(v):
    """``max |v|`` as the int32 bits of a float32: sign cleared, compared as integers (vectorises)."""
    bits = v.view(np.int32)
    top = np.int32(0)
    for j in range(bits.size):
        top = max(top, bits[j] & np.int32(0x7FFFFFFF))
    return top


@kernel
def _quantize_block(v, s, out):
    """``out = clip(rint(v / s), -127, 127)``; returns the sum of the codes."""
    total = np.int32(0)
    for j in range(v.size):
        q = np.int32((v[j] / s + ROUND) - ROUND)  # rint for |v / s| < 2**22, half to even
        q = min(max(q, np.int32(-127)), np.int32(127))
        out[j] = np.int8(q)
        total += q
    return total


@kernel
def quantize_into(x, group, xq, sx, sums):
    """Write ``xq [M, >= K]`` (int8; the padding past K is left as it is), ``sx`` and ``sums`` (``[M, ng]``) of
    ``x [M, K]`` (module docstring); returns whether every value was finite (a non-finite group is left out).

    ``max|x|`` is taken on the float bits as integers, so a non-finite value shows
    up as bits >= 0x7f800000 and is reported by ``finite``.
    """
    m, k = x.shape
    finite = True
    for i in range(m):
        row = x[i]
        out = xq[i]
        for g in range(sx.shape[1]):
            k0 = g * group
            k1 = min(k, k0 + group)
            top = _abs_max_bits(row[k0:k1])
            if top >= np.int32(0x7F800000):
                finite = False
                continue
            s = _as_float32(top) / np.float32(127)
            sx[i, g] = s
            if s > 0:
                sums[i, g] = _quantize_block(row[k0:k1], s, out[k0:k1])
            else:  # (scratch reused by an entry holds the last call's codes)
                out[k0:k1] = 0
                sums[i, g] = 0
    return finite


@kernel
def quantize_activations(x, group, ng, ldx):
    """``(xq int8 [M, ldx] zero padded, sx float32 [M, ng], sumx int32 [M, ng], finite)``: :func:`quantize_into`
    into new arrays."""
    m = x.shape[0]
    xq = np.zeros((m, ldx), np.int8)
    sx = np.zeros((m, ng), np.float32)
    sums = np.zeros((m, ng), np.int32)
    finite = quantize_into(x, group, xq, sx, sums)
    return xq, sx, sums, finite


def _make_driver(kind: str):
    rows = TILES[kind].rows

    @kernel
    def grouped_tiles(xq, sx, sumx, w, wz, ws, gsteps, nsteps, zc, tab, n, p0, p1, i0, i1, out):
        """Output panels ``p0..p1``, rows ``i0..i1`` of ``out [M, n]`` (float32) with kernel ``kind``.

        xq, sx, sumx : from :func:`quantize_activations` (``xq`` row stride >= nsteps * k per step)
        w, wz, ws    : ``data``, ``panel_zeros``, ``panel_scales`` of a ``PackedGrouped``
        tab          : its ``kernel_table`` (int8 [16]; read by codebook kinds only)
        """
        ldx = xq.shape[1]
        ng = sx.shape[1]
        xf = xq.reshape(-1)
        sxf = sx.reshape(-1)
        sumf = sumx.reshape(-1)
        tile = np.empty(rows * PANEL, np.float32)
        for p in range(p0, p1):
            col0 = p * PANEL
            cols = min(PANEL, n - col0)
            for i in range(i0, i1, rows):
                m = min(rows, i1 - i)
                grouped_microkernel(kind, xf, i * ldx, ldx, m, sxf, sumf, i * ng, w, p * nsteps * STEP_BYTES, wz, ws,
                                    p * ng * PANEL, ng, gsteps, nsteps, zc, tab, tile)
                for r in range(m):
                    out[i + r, col0 : col0 + cols] = tile[r * PANEL : r * PANEL + cols]

    return grouped_tiles


# One driver per kind; a driver compiles (or loads) only when first called.
DRIVERS = {kind: _make_driver(kind) for kind in TILES}
_tiles = selector(DRIVERS, "grouped_tiles")


def _make_product(kind: str):
    @kernel
    def grouped_product(x, group, xq, sx, sumx, w, wz, ws, gsteps, nsteps, zc, tab, out):
        """The whole product on one thread: :func:`quantize_into` (into the scratch ``xq``, ``sx``, ``sumx``
        when they have ``x``'s rows, else new arrays), then driver ``kind`` over all of ``out [M, N]``.

        ``xq`` is ``[M, ldx]`` zero-padded past K; the other arguments are the driver's. Non-finite ``x`` raises
        ValueError.
        """
        m = x.shape[0]
        n = out.shape[1]
        if xq.shape[0] != m:
            xq, sx, sumx = (np.zeros((m, xq.shape[1]), np.int8), np.zeros((m, sx.shape[1]), np.float32),
                            np.zeros((m, sx.shape[1]), np.int32))
        if not quantize_into(x, group, xq, sx, sumx):
            raise ValueError("x: values must be finite")
        _tiles(kind, (xq, sx, sumx, w, wz, ws, gsteps, nsteps, zc, tab, n, 0, -(-n // PANEL), 0, m, out))

    return grouped_product


# The entry of every driver: what a prepared product calls on one thread (kernels.gemm.grouped.GroupedPlan).
PRODUCTS = {kind: _make_product(kind) for kind in TILES}


def _make_team(kind: str):
    rows = TILES[kind].rows

    @kernel
    def grouped_team(x, group, xq, sx, sumx, w, wz, ws, gsteps, nsteps, zc, tab, out, ith, nth, sync):
        """Thread ``ith``'s part of :func:`grouped_product` by a team of ``nth`` (:mod:`kernels.sync`): its share of
        the rows of ``x [..., K]`` quantized into the scratch ``xq``, ``sx``, ``sumx`` (``x``'s rows each), a
        barrier, then its :func:`~kernels.sync.tile_share` of the row tiles or column panels of ``out [..., N]``.
        The same bits for every team size; non-finite ``x`` raises ValueError in the thread that meets it (a
        compiled chain then releases the others)."""
        k, n = x.shape[-1], out.shape[-1]
        m = x.size // k
        x2, out2 = x.reshape((m, k)), out.reshape((m, n))
        r0, r1 = share(m, ith, nth)
        if not quantize_into(x2[r0:r1], group, xq[r0:r1], sx[r0:r1], sumx[r0:r1]):
            raise ValueError("x: values must be finite")
        barrier(sync, nth)
        p0, p1, i0, i1 = tile_share(m, rows, -(-n // PANEL), ith, nth)
        if p1 > p0 and i1 > i0:
            _tiles(kind, (xq, sx, sumx, w, wz, ws, gsteps, nsteps, zc, tab, n, p0, p1, i0, i1, out2))

    return grouped_team


# The team entry of every driver (kernels.gemm.grouped.GroupedPlan.entry), for chains run by teams of threads.
TEAMS = {kind: _make_team(kind) for kind in TILES}
