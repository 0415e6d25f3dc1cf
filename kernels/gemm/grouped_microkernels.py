"""Micro-kernels of the group-wise sub-byte products and the compile-time switch between them.

Every micro-kernel computes one ``rows x 64`` float32 tile over all of K with the
contract of ``kernels.gemm.grouped_vnni.make_tile`` (exact int32 dot per group,
exact zero-point correction, then ``acc = acc + float32(e) * (sx * sw)``). A
kind is ``"<base>:<bits>:<u|v|c>"``: the base names the implementation and height,
``bits`` the stored code width (4 or 2), ``u`` a shared zero point (symmetric
int4, ternary), ``v`` per-group zero points and ``c`` 4-bit codebook indices looked
up in an int8 table (``tab``; ``wz`` then holds what the tile subtracts, which the
portable tile, computing ``sum xq * tab[code]`` directly, does not need).

``grouped_microkernel(kind, ...)`` is resolved while a driver compiles, from the
string literal ``kind``, so VNNI IR is only compiled when a driver for a VNNI
kind is called, which ``kernels.gemm.grouped`` allows only on capable CPUs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from numba import types
from numba.extending import overload

from kernels._jit import kernel
from kernels.gemm import grouped_vnni


def make_portable(bits: int, uniform: bool, lookup: bool = False):
    """Portable tile: plain loops over the 64 channels, which LLVM vectorises.

    With ``lookup`` the stored code indexes the int8 table ``tab`` and no zero point is subtracted.
    """
    fields = 8 // bits
    mask = (1 << bits) - 1

    @kernel
    def tile(x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc, tab, out):
        """The contract of ``kernels.gemm.grouped_vnni.make_tile`` for ``m`` rows, in plain loops."""
        dot = np.empty(64, np.int32)
        for r in range(m):
            acc = out[r * 64 : r * 64 + 64]
            acc[:] = 0
            xr = x_off + r * ldx
            for g in range(ng):
                dot[:] = 0
                s1 = min(nsteps, (g + 1) * gsteps)
                for s in range(g * gsteps, s1):
                    wb = w[w_off + s * 256 : w_off + s * 256 + 256]
                    for f in range(fields):
                        k = xr + 4 * (s * fields + f)
                        x0, x1, x2, x3 = np.int32(x[k]), np.int32(x[k + 1]), np.int32(x[k + 2]), np.int32(x[k + 3])
                        sh = bits * f
                        for c in range(64):
                            b0, b1 = (wb[4 * c] >> sh) & mask, (wb[4 * c + 1] >> sh) & mask
                            b2, b3 = (wb[4 * c + 2] >> sh) & mask, (wb[4 * c + 3] >> sh) & mask
                            if lookup:
                                v0, v1 = np.int32(tab[b0]), np.int32(tab[b1])
                                v2, v3 = np.int32(tab[b2]), np.int32(tab[b3])
                            else:
                                v0, v1, v2, v3 = np.int32(b0), np.int32(b1), np.int32(b2), np.int32(b3)
                            dot[c] += x0 * v0 + x1 * v1 + x2 * v2 + x3 * v3
                sxg = sx[a_off + r * ng + g]
                total = np.int32(sumx[a_off + r * ng + g])
                zs = ws[p_off + g * 64 : p_off + g * 64 + 64]
                zz = wz[p_off + g * 64 : p_off + g * 64 + 64]
                for c in range(64):
                    z = np.int32(0) if lookup else (np.int32(zc) if uniform else zz[c])
                    e = dot[c] - z * total
                    acc[c] = acc[c] + np.float32(e) * (sxg * zs[c])

    return tile


class Tile(NamedTuple):
    """One micro-kernel: its height and its ``tile``."""

    rows: int
    tile: Callable


# Bases: height, and the VNNI prefetch distance (bytes ahead). A GEMV streams the
# weights from L3 or DRAM once (long distance); GEMM reuses a panel from L2.
BASES = {
    "generic": (4, None),
    "avx512-vnni-gemv1": (1, 4096),
    "avx512-vnni-gemv": (4, 4096),
    "avx512-vnni": (5, 1024),
}
BITS = (4, 2)


def kind_name(base: str, bits: int, uniform: bool, lookup: bool = False) -> str:
    return f"{base}:{bits}:{'c' if lookup else 'u' if uniform else 'v'}"


def _tile(base: str, bits: int, uniform: bool, lookup: bool = False) -> Tile:
    rows, distance = BASES[base]
    if distance is None:
        return Tile(rows, make_portable(bits, uniform, lookup))
    return Tile(rows, grouped_vnni.make_tile(rows, bits, uniform, distance, lookup))


TILES = {kind_name(base, bits, uniform): _tile(base, bits, uniform)
         for base in BASES for bits in BITS for uniform in (True, False)}
TILES.update({kind_name(base, 4, True, True): _tile(base, 4, True, True) for base in BASES})  # codebook (4-bit)


def grouped_microkernel(kind, x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc,
                        tab, out):
    """Compute one tile with the micro-kernel named by the literal ``kind`` (jitted code only)."""
    raise NotImplementedError("grouped_microkernel() is only callable from compiled kernels")


@overload(grouped_microkernel)
def _select(kind, x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc, tab, out):
    if not isinstance(kind, types.StringLiteral):
        return None
    tile = TILES[kind.literal_value].tile

    def run(kind, x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc, tab, out):
        tile(x, x_off, ldx, m, sx, sumx, a_off, w, w_off, wz, ws, p_off, ng, gsteps, nsteps, zc, tab, out)

    return run
