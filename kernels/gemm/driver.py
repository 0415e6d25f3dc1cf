"""The int8 GEMM tile driver: loops over output tiles, calls a micro-kernel, finishes each tile.

One call covers the column panels ``p0..p1`` and rows ``i0..i1`` of the output;
``kernels.threads`` gives each thread a disjoint range, so no two threads write
the same element. Per panel (per ``width`` channels of it, for a narrow
micro-kernel), the rows are walked in tiles of the micro-kernel's height: the
panel's weights (64 x K bytes) stay in L2 while every activation tile streams
past them, and each finished tile goes through the epilogue while it is still in L1.

Overflow: the int32 sums cover at most ``K_CHUNK`` products of a uint8 and an
int8, each at most 255 * 128 in magnitude, so they cannot wrap
(65792 * 32640 < 2**31). Longer K is cut into chunks whose sums are added in
int64, so the driver is exact for any K; only an int32 *output* can overflow,
which the public functions check.

:data:`LINEAR` holds one entry kernel per driver: the whole product of a prepared layer on one thread
(activations brought to unsigned bytes, row sums, then the driver over every tile), which
``kernels.gemm.int8.LinearPlan`` calls and gives as its :class:`kernels.entry.Entry`. A tile of one row
runs the one-row twin of its micro-kernel (``kernels.gemm.microkernels.ONE_ROW``), if it has one.
"""

from __future__ import annotations

import numpy as np

from kernels._jit import kernel
from kernels.epilogue import INTEGER, MODES, finish_tile
from kernels.gemm.microkernels import ONE_ROW, TILES, microkernel, microkernel_finish, microkernel_store
from kernels.gemm.select import selector
from kernels.pack.panels import KGROUP, PANEL
from kernels.sync import tile_share

K_CHUNK = 65792  # largest multiple of KGROUP with K_CHUNK * 255 * 128 < 2**31
assert K_CHUNK % KGROUP == 0 and K_CHUNK * 255 * 128 < 2**31 <= (K_CHUNK + KGROUP) * 255 * 128


def _make_driver(kind: str, mode: int):
    rows, width = TILES[kind].rows, TILES[kind].width
    single = ONE_ROW.get(kind, kind)  # the micro-kernel of a one-row tile

    @kernel
    def gemm_tiles(a, lda, n, b, kq, p0, p1, i0, i1,
                   col_term, col_term32, w_zp, row_sums, row_term, fused, mult, shift, factors, lo, hi, zp, qmin, qmax,
                   out):
        """Compute output panels ``p0..p1``, rows ``i0..i1`` with micro-kernel ``kind``, epilogue ``mode``.

        a    : uint8 [M * lda] flattened activations, lda % 4 == 0, zero-padded past K
        b    : int8 panel data of ``kernels.pack.panels`` with ``kq`` k groups
        out  : [M, n] C-contiguous, int32, float32, uint8 or int8 (see ``kernels.epilogue``)
        col_term32 : int32 [panels * 64], ``col_term`` wrapped to int32 and zero-padded
        fused : whether the micro-kernel finishes each tile from its registers with
                ``col_term32`` (``microkernel_store`` / ``microkernel_finish``): the
                caller checked there is no row term and, for the float modes, that
                every exact result fits int32; ``mult`` and ``shift`` are then padded
                to ``panels * 64`` too, and ``factors`` is ``kernels.epilogue.single_table``
        Other arguments are those of ``kernels.epilogue.finish_tile``.
        """
        tile = np.empty((rows, PANEL), np.int32)
        chunk = K_CHUNK // KGROUP
        long_k = kq > chunk
        wide = np.empty((rows if long_k else 0, PANEL), np.int64)
        fused = fused and not long_k
        flat_out = out.reshape(-1)
        for p in range(p0, p1):
            for col0 in range(p * PANEL, min((p + 1) * PANEL, n), width):  # the tiles' channels in the panel
                b_panel = p * kq * PANEL * KGROUP + (col0 - p * PANEL) * KGROUP
                cols = min(width, n - col0)
                for i in range(i0, i1, rows):
                    m = min(rows, i1 - i)
                    if fused:
                        if mode == INTEGER and m == 1:  # (mode: a compile-time constant; each driver types one)
                            microkernel_store(single, a, i * lda, lda, m, b, b_panel, kq, col_term32, col0, cols,
                                              flat_out, i * n + col0, n)
                        elif mode == INTEGER:
                            microkernel_store(kind, a, i * lda, lda, m, b, b_panel, kq, col_term32, col0, cols,
                                              flat_out, i * n + col0, n)
                        elif m == 1:
                            microkernel_finish(single, a, i * lda, lda, m, b, b_panel, kq, col_term32, mult, shift,
                                               factors, lo, hi, zp, qmin, qmax, col0, cols, flat_out, i * n + col0, n)
                        else:
                            microkernel_finish(kind, a, i * lda, lda, m, b, b_panel, kq, col_term32, mult, shift,
                                               factors, lo, hi, zp, qmin, qmax, col0, cols, flat_out, i * n + col0, n)
                        continue
                    if not long_k and m == 1:
                        microkernel(single, a, i * lda, lda, m, b, b_panel, kq, tile)
                        finish_tile(tile, i, m, col0, cols, col_term, w_zp, row_sums, row_term, mult, shift, lo, hi,
                                    zp, qmin, qmax, mode, out)
                        continue
                    if not long_k:
                        microkernel(kind, a, i * lda, lda, m, b, b_panel, kq, tile)
                        finish_tile(tile, i, m, col0, cols, col_term, w_zp, row_sums, row_term, mult, shift, lo, hi,
                                    zp, qmin, qmax, mode, out)
                        continue
                    for q0 in range(0, kq, chunk):
                        microkernel(kind, a, i * lda + q0 * KGROUP, lda, m, b, b_panel + q0 * PANEL * KGROUP,
                                    min(chunk, kq - q0), tile)
                        if q0 == 0:
                            wide[:] = tile
                        else:
                            wide += tile
                    finish_tile(wide, i, m, col0, cols, col_term, w_zp, row_sums, row_term, mult, shift, lo, hi, zp,
                                qmin, qmax, mode, out)

    return gemm_tiles


# One driver per micro-kernel and epilogue mode, both compile-time constants in it:
# a driver compiles only its own micro-kernel (when first called), and the epilogue
# loses its dead branches (a runtime mode measured 30% slower at 1024^3).
DRIVERS = {(kind, mode): _make_driver(kind, mode) for kind in TILES for mode in MODES}
_tiles = selector({f"{kind}:{mode}": driver for (kind, mode), driver in DRIVERS.items()}, "gemm_tiles")


@kernel(inline="always")
def unsigned_rows(a, offset, scratch, sums, row_term):
    """``(flat, lda, row_sums)``: activations ``a [M, K]`` (uint8, or int8 with ``offset`` 128) as drivers read them.

    ``flat[i * lda + k] = a[i, k] + offset`` (uint8), rows zero-padded to ``lda = ceil(K / 4) * 4``: ``a`` itself
    when nothing changes (uint8, ``K % 4 == 0``), else written into ``scratch`` (uint8, used when it holds
    ``M * lda`` bytes, else allocated). ``row_sums[i] = sum_k flat[i * lda + k]`` when ``row_term``, in ``sums``
    (int64 [M], likewise), else ``sums`` untouched (and not read by the drivers).
    """
    m, k = a.shape
    lda = -(-k // KGROUP) * KGROUP
    if offset == 0 and lda == k:
        flat = a.reshape(-1).view(np.uint8)
    else:
        rows = scratch[: m * lda] if scratch.size >= m * lda else np.empty(m * lda, np.uint8)
        for i in range(m):
            row = rows[i * lda : (i + 1) * lda]
            for j in range(k):
                row[j] = np.uint8(np.int64(a[i, j]) + offset)
            row[k:] = 0
        flat = rows  # (a read-only a makes flat read-only: written only through rows)
    row_sums = sums[:m] if sums.size >= m or not row_term else np.empty(m, np.int64)
    if row_term:
        for i in range(m):
            t = np.int64(0)
            for j in range(lda):
                t += flat[i * lda + j]
            row_sums[i] = t
    return flat, lda, row_sums


def _make_linear(kind: str, mode: int):
    key = f"{kind}:{mode}"

    @kernel
    def linear(a, offset, scratch, sums, b, terms, col_term32, scales, single, row_term, fused, lo, hi, zp, qmin,
               qmax, out):
        """The whole product on one thread: :func:`unsigned_rows`, then driver ``kind``, ``mode`` over all of ``out``.

        terms  : int64 [2, N], the driver's ``col_term`` and ``w_zp``
        scales : float64 [2, *], its ``mult`` and ``shift``
        row_term, fused : ints (0 / 1); the other arguments are the driver's.
        """
        m, n = out.shape
        flat, lda, row_sums = unsigned_rows(a, offset, scratch, sums, row_term != 0)
        _tiles(key, (flat, lda, n, b, lda // KGROUP, 0, -(-n // PANEL), 0, m, terms[0], col_term32, terms[1],
                     row_sums, row_term != 0, fused != 0, scales[0], scales[1], single, lo, hi, zp, qmin, qmax, out))

    return linear


# The entry of every driver: what a prepared layer calls on one thread (kernels.gemm.int8.LinearPlan.entry).
LINEAR = {(kind, mode): _make_linear(kind, mode) for kind in TILES for mode in MODES}


def _make_linear_team(kind: str, mode: int):
    key, height = f"{kind}:{mode}", TILES[kind].rows

    @kernel
    def linear_team(a, b, terms, col_term32, scales, single, fused, lo, hi, zp, qmin, qmax, out, ith, nth):
        """Thread ``ith``'s part of :func:`linear` by a team of ``nth`` (:mod:`kernels.sync`), for uint8
        ``a [M, K]`` (C-contiguous, ``K % 4 == 0``, used as it is) without a row term: its
        :func:`~kernels.sync.tile_share` of the row tiles or column panels. ``out [M, N]`` and the other arguments
        as :func:`linear`'s; threads write disjoint tiles."""
        m, n = out.shape
        p0, p1, i0, i1 = tile_share(m, height, -(-n // PANEL), ith, nth)
        if p1 > p0 and i1 > i0:
            lda = a.shape[1]
            no_sums = np.empty(0, np.int64)  # read only with a row term
            _tiles(key, (a.reshape(-1), lda, n, b, lda // KGROUP, p0, p1, i0, i1, terms[0], col_term32, terms[1],
                         no_sums, False, fused != 0, scales[0], scales[1], single, lo, hi, zp, qmin, qmax, out))

    return linear_team


# A thread's part of a prepared layer's product, for teams (kernels.gemm.dynamic's entries).
LINEAR_TEAM = {(kind, mode): _make_linear_team(kind, mode) for kind in TILES for mode in MODES}
