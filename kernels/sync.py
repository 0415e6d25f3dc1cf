"""A team of threads inside one compiled function: each thread's share of a range, and a spin barrier.

Handing work to a pool thread from Python costs a wake-up and two passes of the GIL, 20-50 us on these machines:
more than a small kernel takes. A team instead enters one compiled function once, every thread with its index
``ith`` of ``nth``, and then runs a whole chain of kernels without Python: each thread computes its
:func:`share` of a kernel's units, and :func:`barrier` holds every thread until all have finished the kernel
(ggml runs a graph the same way). The barrier spins on an atomic counter (``pause`` between reads): a fraction
of a microsecond while every thread is on a core. A thread still waiting after :data:`SPINS` reads yields its
core between reads (``sched_yield``), so that a team on an oversubscribed machine (more runnable threads than
cores) lets the member it waits for run instead of spinning against it.

A ``sync`` array (:func:`new_sync`, int64, one per team) holds the barrier's state on separate cache lines:
the count of threads that arrived, the generation (how many times the barrier opened) and an abort flag. A
caller whose thread failed sets the flag (:func:`abort`), so that the others stop waiting at barriers instead of
waiting for ever; it then raises the failure. :func:`reset` clears the flag before the next run.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels._jit import kernel
from kernels.gemm.llvm_ir import declare
from kernels.threads import MIN_TILES_PER_THREAD

COUNT, GENERATION, ABORTED = 0, 8, 16  # int64 slots, 64 bytes apart
SIZE = 24
SPINS = 1 << 14  # reads with pause (~0.1-1 ms) before a waiting thread starts yielding its core
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_POSIX = platform.system() != "Windows"


def new_sync() -> np.ndarray:
    """A team's barrier state, cleared."""
    return np.zeros(SIZE, np.int64)


def _slot(context, builder, sig, args):
    array = context.make_array(sig.args[0])(context, builder, args[0])
    return builder.gep(array.data, [args[1]])


@intrinsic
def _load(typingctx, sync, index):
    """``sync[index]``, read atomically with acquire ordering."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "acquire", 8)

    return types.int64(sync, index), codegen


@intrinsic
def _store(typingctx, sync, index, value):
    """``sync[index] = value``, written atomically with release ordering."""
    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _slot(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()

    return types.void(sync, index, value), codegen


@intrinsic
def _fetch_add(typingctx, sync, index, value):
    """``sync[index] += value`` atomically (sequentially consistent); the value before."""
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), args[2], "seq_cst")

    return types.int64(sync, index, value), codegen


@intrinsic
def _pause(typingctx):
    """A spin-wait hint (x86 ``pause``; nothing elsewhere): the waiting core yields to its sibling and saves power."""
    def codegen(context, builder, sig, args):
        if _X86:
            builder.call(declare(builder, "llvm.x86.sse2.pause", ir.FunctionType(ir.VoidType(), [])), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _yield(typingctx):
    """Give the core to another runnable thread (POSIX ``sched_yield``; a ``pause`` elsewhere)."""
    def codegen(context, builder, sig, args):
        if _POSIX:
            builder.call(declare(builder, "sched_yield", ir.FunctionType(ir.IntType(32), [])), [])
        elif _X86:
            builder.call(declare(builder, "llvm.x86.sse2.pause", ir.FunctionType(ir.VoidType(), [])), [])
        return context.get_dummy_value()

    return types.void(), codegen


@kernel(inline="always")
def share(units, ith, nth):
    """Thread ``ith``'s contiguous part ``[lo, hi)`` of ``range(units)`` cut into ``nth`` nearly equal parts."""
    return units * ith // nth, units * (ith + 1) // nth


@kernel(inline="always")
def tile_share(m, height, panels, ith, nth):
    """Thread ``ith`` of ``nth``'s part ``(p0, p1, i0, i1)`` of a product's output: column panels ``[p0, p1)`` by
    rows ``[i0, i1)`` of ``m``. Its share of the row tiles (``height`` rows each) when every thread gets
    ``MIN_TILES_PER_THREAD`` of them (as ``kernels.threads.run_tiled``), else of the ``panels``, all rows."""
    tiles = (m + height - 1) // height
    if tiles >= MIN_TILES_PER_THREAD * nth:
        t0, t1 = share(tiles, ith, nth)
        return 0, panels, t0 * height, min(m, t1 * height)
    p0, p1 = share(panels, ith, nth)
    return p0, p1, 0, m


@kernel
def barrier(sync, nth):
    """Return once all ``nth`` threads of the team have called it (or the team was aborted): everything a thread
    wrote before the call is then visible to every thread."""
    if nth <= 1:
        return
    generation = _load(sync, GENERATION)
    if _fetch_add(sync, COUNT, 1) == nth - 1:  # the last to arrive opens the barrier
        _store(sync, COUNT, 0)
        _store(sync, GENERATION, generation + 1)
        return
    spins = 0
    while _load(sync, GENERATION) == generation and _load(sync, ABORTED) == 0:
        if spins < SPINS:
            _pause()
            spins += 1
        else:
            _yield()


def abort(sync: np.ndarray) -> None:
    """Release every thread waiting at the team's barriers, now and until :func:`reset` (a thread failed)."""
    sync[ABORTED] = 1


def reset(sync: np.ndarray) -> None:
    """Clear the team's state for its next run (no thread may be running in it)."""
    sync[:] = 0
