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
"""

from __future__ import annotations

import numpy as np

from kernels._jit import kernel
from kernels.epilogue import INTEGER, MODES, finish_tile
from kernels.gemm.microkernels import TILES, microkernel, microkernel_finish, microkernel_store
from kernels.pack.panels import KGROUP, PANEL

K_CHUNK = 65792  # largest multiple of KGROUP with K_CHUNK * 255 * 128 < 2**31
assert K_CHUNK % KGROUP == 0 and K_CHUNK * 255 * 128 < 2**31 <= (K_CHUNK + KGROUP) * 255 * 128


def _make_driver(kind: str, mode: int):
    rows, width = TILES[kind].rows, TILES[kind].width

    @kernel
    def gemm_tiles(a, lda, n, b, kq, p0, p1, i0, i1,
                   col_term, col_term32, w_zp, row_sums, row_term, fused, mult, shift, single, lo, hi, zp, qmin, qmax,
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
                to ``panels * 64`` too, and ``single`` is ``kernels.epilogue.single_table``
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
                        if mode == INTEGER:  # a compile-time constant: each driver types one of the two
                            microkernel_store(kind, a, i * lda, lda, m, b, b_panel, kq, col_term32, col0, cols,
                                              flat_out, i * n + col0, n)
                        else:
                            microkernel_finish(kind, a, i * lda, lda, m, b, b_panel, kq, col_term32, mult, shift,
                                               single, lo, hi, zp, qmin, qmax, col0, cols, flat_out, i * n + col0, n)
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


@kernel
def row_sums_u8(a, m, lda):
    """``s[i] = sum_k a[i * lda + k]`` over one padded row (the padding is zero)."""
    s = np.empty(m, np.int64)
    for i in range(m):
        t = np.int64(0)
        for k in range(lda):
            t += a[i * lda + k]
        s[i] = t
    return s
