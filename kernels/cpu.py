"""CPU feature detection and the ordered instruction-set levels kernels target.

A *level* names a set of CPU features that one family of kernel variants needs.
Levels of one architecture are ordered by ``rank`` (generic < avx2 < avx-vnni <
avx512-vnni < avx512-vpopcntdq < amx on x86-64; generic < neon-dotprod on aarch64). The ranks say which
variant to prefer, not which CPUs run what: a Cascade Lake has avx512-vnni but not
the VEX-encoded avx-vnni, so a level is *supported* only when all of its own
features are present.

The features are the ones Numba compiles for: the host's, as llvmlite reports
them, unless ``NUMBA_CPU_NAME`` names another CPU, in which case only the features
listed in ``NUMBA_CPU_FEATURES`` count. Compiling a target intrinsic for a CPU
without the feature aborts the process, so nothing ISA-specific may be compiled
before :func:`active_level` allows it.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass

import llvmlite.binding as llvm
import numba

from kernels import _env


@dataclass(frozen=True)
class Level:
    """One instruction-set level: a name, its architecture, its rank and its features."""

    name: str
    arch: str  # "any", "x86_64" or "aarch64"
    rank: int
    features: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


GENERIC = Level("generic", "any", 0, ())
AVX2 = Level("avx2", "x86_64", 1, ("avx2", "fma"))
AVX_VNNI = Level("avx-vnni", "x86_64", 2, ("avx2", "fma", "avxvnni"))
AVX512_VNNI = Level("avx512-vnni", "x86_64", 3, ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
AVX512_VPOPCNTDQ = Level("avx512-vpopcntdq", "x86_64", 4, (*AVX512_VNNI.features, "avx512vpopcntdq"))
AMX = Level("amx", "x86_64", 5, ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "amx-tile", "amx-int8"))
NEON_DOTPROD = Level("neon-dotprod", "aarch64", 1, ("neon", "dotprod"))

LEVELS: dict[str, Level] = {lv.name: lv for lv in (GENERIC, AVX2, AVX_VNNI, AVX512_VNNI, AVX512_VPOPCNTDQ, AMX,
                                                   NEON_DOTPROD)}
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158  # Linux x86-64


def host_arch() -> str:
    """``"x86_64"``, ``"aarch64"`` or the raw machine name for anything else."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.cache
def target_features() -> frozenset[str]:
    """The CPU features Numba generates code for in this process."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        spec = numba.config.CPU_FEATURES or ""
    else:
        spec = llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in spec.split(",") if f.startswith("+"))


@functools.cache
def supported_levels() -> tuple[Level, ...]:
    """The levels this CPU can run, lowest rank first."""
    arch, have = host_arch(), target_features()
    found = [lv for lv in LEVELS.values() if lv.arch in ("any", arch) and have.issuperset(lv.features)
             and (lv is not AMX or amx_permitted())]
    return tuple(sorted(found, key=lambda lv: lv.rank))


@functools.cache
def amx_permitted() -> bool:
    """Ask Linux for the AMX tile data state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``): True when granted.

    The kernel enables the 8 KB of tile registers per process only on request; a tile instruction before that
    faults. Granted once, it holds for every thread of the process. Other systems: False (no AMX kernels).
    """
    if platform.system() != "Linux" or host_arch() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def vector_register_bytes() -> int:
    """What the vector registers Numba's code uses hold, in bytes: 32 x 64 with AVX-512, 16 x 32 with AVX / AVX2,
    32 x 16 with NEON (aarch64), else 16 x 16 (SSE). Register tiles size their sums by it."""
    have = target_features()
    if "avx512f" in have:
        return 32 * 64
    if "avx" in have:
        return 16 * 32
    return 32 * 16 if host_arch() == "aarch64" else 16 * 16


def host_level() -> Level:
    """The highest level this CPU supports."""
    return supported_levels()[-1]


def active_level() -> Level:
    """The level kernels may use: the host's, or the lower one named by ``LOWBIT_ISA``.

    Raises
    ------
    ValueError
        If ``LOWBIT_ISA`` names no known level, or a level this CPU cannot run.
    """
    return _resolve(_env.requested_isa())


@functools.cache
def _resolve(wanted: str | None) -> Level:
    if wanted is None:
        return host_level()
    level = LEVELS.get(wanted)
    if level is None:
        raise ValueError(
            f"{_env.ISA_VAR}={wanted!r} is not a known level; expected one of: {', '.join(LEVELS)}"
        )
    if level not in supported_levels():
        raise ValueError(
            f"{_env.ISA_VAR}={wanted!r} is not supported by this CPU; it supports: "
            f"{', '.join(lv.name for lv in supported_levels())}"
        )
    return level


def allows(level: Level, active: Level) -> bool:
    """True when code for ``level`` may run while ``active`` is the active level."""
    return level in supported_levels() and level.rank <= active.rank and level.arch in ("any", active.arch)


def cpu_name() -> str:
    """The CPU model Numba targets (llvmlite's name, e.g. ``"cascadelake"``)."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return numba.config.CPU_NAME
    return llvm.get_host_cpu_name()


RELEVANT_FEATURES = ("avx2", "fma", "avxvnni", "avx512f", "avx512bw", "avx512vl", "avx512vnni",
                     "avx512vpopcntdq", "amx-tile", "amx-int8", "neon", "dotprod", "i8mm")
