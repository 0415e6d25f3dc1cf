"""Kernel variants and the choice between them: the only code that reads the CPU level.

Each :class:`Variant` names a micro-kernel (``kernels.gemm.microkernels.TILES`` for
the int8 products, ``kernels.gemm.grouped_microkernels.BASES`` for the group-wise
sub-byte ones), the instruction-set level it needs and the problems it accepts. :func:`choose`
walks the list in order (most specialised first) and returns the first variant
the active level allows; the portable variant accepts everything and comes last,
so a choice always exists. ``LOWBIT_ISA=generic`` therefore selects only
portable code, on any CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from kernels import cpu
from kernels.conv.int8_driver import INDIRECT_TILES
from kernels.gemm.binary_tiles import POPCOUNT_TILES, SIGN_TILES
from kernels.gemm.grouped_microkernels import BASES
from kernels.gemm.microkernels import TILES
from kernels.gemm.popcount_lanes import LANES_TILES

GEMV_MAX_ROWS = 8
NARROW_MAX_CHANNELS = 32  # up to here (output channels per group) the 32-channel VNNI tiles run, twice as fast
BINARY_GEMV_MAX_ROWS = 4  # up to here, prefetching the binary weights beats prefetching activations
#: What the vector registers hold, in bytes: the float32 register tiles (kernels.conv.float32, portable code at every
#: level) take their heights from it, as the variants below take their micro-kernels from the level
VECTOR_REGISTER_BYTES = cpu.vector_register_bytes()


@dataclass(frozen=True)
class Variant:
    """One implementation of an op: its micro-kernel, level and shape guard."""

    op: str
    kind: str  # the micro-kernel, passed to its driver as a compile-time literal
    level: cpu.Level
    accepts: Callable[[int, int, int], bool]  # (M, N, K) -> usable?
    rows: int  # height of the micro-tile: drivers and thread splits step rows by it


def _any_shape(m: int, n: int, k: int) -> bool:
    return True


def _gemv(m: int, n: int, k: int) -> bool:
    return m <= GEMV_MAX_ROWS


def _narrow(m: int, n: int, k: int) -> bool:
    return n <= NARROW_MAX_CHANNELS


def _int8(kind: str, level: cpu.Level, accepts=_any_shape) -> Variant:
    return Variant("gemm_int8", kind, level, accepts, TILES[kind].rows)


def _grouped(op: str) -> tuple[Variant, ...]:
    """The int4, ternary and codebook products share micro-kernels: one list serves all."""
    rows = [("avx512-vnni-gemv1", cpu.AVX512_VNNI, lambda m, n, k: m == 1),
            ("avx512-vnni-gemv", cpu.AVX512_VNNI, _gemv),
            ("avx512-vnni", cpu.AVX512_VNNI, _any_shape),
            ("generic", cpu.GENERIC, _any_shape)]
    return tuple(Variant(op, kind, level, accepts, BASES[kind][0]) for kind, level, accepts in rows)


def _conv_int8(kind: str, level: cpu.Level, accepts=_any_shape) -> Variant:
    """For "conv_int8", (M, N, K) are (output pixels, channels out per group, channels in per group)."""
    rows = INDIRECT_TILES[kind][0] if kind in INDIRECT_TILES else 1
    return Variant("conv_int8", kind, level, accepts, rows)


def _depthwise_vnni(m: int, n: int, k: int) -> bool:
    """For "conv_depthwise", (M, N, K) are (output pixels, channels, taps KH KW), with K = 0 when the
    window is not 3x3 or 5x5 with strides 1 or 2 and dilation 1, or ``w - w_zero_point`` does not fit int8
    (``kernels.conv.depthwise._vnni_taps``)."""
    return k in (9, 25)


def _binary(op: str, kind: str, level: cpu.Level, accepts=_any_shape) -> Variant:
    tiles = {"gemm_binary": POPCOUNT_TILES, "gemm_binary_int8": SIGN_TILES, "conv_binary": LANES_TILES}[op]
    return Variant(op, kind, level, accepts, tiles[kind].rows)


# The AVX-512 binary tiles need avx512f + avx512bw (vpternlogq, vpshufb, vpsadbw, masked
# loads) and, for binary x int8, avx512vnni: all in AVX512_VNNI; the vpopcntq tiles also VPOPCNTDQ.
VARIANTS: tuple[Variant, ...] = (
    _int8("avx512-vnni-gemv", cpu.AVX512_VNNI, _gemv),
    _int8("amx", cpu.AMX),  # from 9 rows: a tile of fewer rows pays for the rows it pads (the GEMV tile reads less)
    _int8("avx512-vnni-narrow", cpu.AVX512_VNNI, _narrow),
    _int8("avx512-vnni", cpu.AVX512_VNNI),
    _int8("avx2", cpu.AVX2),
    _int8("generic", cpu.GENERIC),
    # the indirect kernel reads whole k groups of 4 channels from each tap; "im2col" runs gemm_int8's choice
    _conv_int8("avx512-vnni-indirect-narrow", cpu.AVX512_VNNI, lambda m, n, k: k % 4 == 0 and _narrow(m, n, k)),
    _conv_int8("avx512-vnni-indirect", cpu.AVX512_VNNI, lambda m, n, k: k % 4 == 0),
    _conv_int8("im2col", cpu.GENERIC),
    *_grouped("gemm_int4"),
    *_grouped("gemm_ternary"),
    *_grouped("gemm_codebook"),
    _binary("gemm_binary", "avx512-vpopcntdq-gemv", cpu.AVX512_VPOPCNTDQ, lambda m, n, k: m <= BINARY_GEMV_MAX_ROWS),
    _binary("gemm_binary", "avx512-vpopcntdq", cpu.AVX512_VPOPCNTDQ),
    _binary("gemm_binary", "avx512-vnni-gemv", cpu.AVX512_VNNI, lambda m, n, k: m <= BINARY_GEMV_MAX_ROWS),
    _binary("gemm_binary", "avx512-vnni", cpu.AVX512_VNNI),
    _binary("gemm_binary", "generic", cpu.GENERIC),
    _binary("gemm_binary_int8", "avx512-vnni", cpu.AVX512_VNNI),
    _binary("gemm_binary_int8", "generic", cpu.GENERIC),
    _binary("conv_binary", "avx512-vnni", cpu.AVX512_VNNI),
    _binary("conv_binary", "generic", cpu.GENERIC),
    Variant("conv_depthwise", "avx512-vnni", cpu.AVX512_VNNI, _depthwise_vnni, 1),
    Variant("conv_depthwise", "generic", cpu.GENERIC, _any_shape, 1),
    # (M, N, K) = (output pixels, output channels, input channels) of a 1x1 NCHW convolution that
    # kernels.conv.pointwise.applies to; "nhwc" is the general path, through layout copies
    Variant("conv_pointwise_nchw", "avx512-vnni", cpu.AVX512_VNNI, _any_shape, 1),
    Variant("conv_pointwise_nchw", "nhwc", cpu.GENERIC, _any_shape, 1),
    # (M, N, K) as for "conv_depthwise", with K = 0 where kernels.conv.depthwise_planes does not apply
    # (kernels.conv.depthwise._planes_taps); "nhwc" is the general path, through layout copies
    Variant("conv_depthwise_nchw", "avx512-vnni", cpu.AVX512_VNNI, _depthwise_vnni, 1),
    Variant("conv_depthwise_nchw", "nhwc", cpu.GENERIC, _any_shape, 1),
    # (M, N, K) = (output pixels, output channels, filter length) of a float32 convolution:
    # kernels.conv.float32's register tiles need AVX-512's 32 vector registers; elsewhere im2col + BLAS
    Variant("conv_float32", "avx512", cpu.AVX512_VNNI, _any_shape, 1),
    Variant("conv_float32", "blas", cpu.GENERIC, _any_shape, 1),
)


def choose(op: str, m: int, n: int, k: int, level: cpu.Level | None = None) -> Variant:
    """The first variant of ``op`` that the level allows and that accepts the shape.

    ``level`` defaults to :func:`kernels.cpu.active_level` (which honours ``LOWBIT_ISA``).
    """
    return _choose(op, m, n, k, level or cpu.active_level())


@functools.lru_cache(maxsize=1024)
def _choose(op: str, m: int, n: int, k: int, level: cpu.Level) -> Variant:
    for variant in VARIANTS:
        if variant.op == op and cpu.allows(variant.level, level) and variant.accepts(m, n, k):
            return variant
    raise ValueError(f"no kernel variant for op {op!r}; known ops: {sorted({v.op for v in VARIANTS})}")


def variants(op: str | None = None) -> tuple[Variant, ...]:
    """All registered variants (of one op), in preference order."""
    return tuple(v for v in VARIANTS if op is None or v.op == op)
