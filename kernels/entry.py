"""Unchecked entries: a prepared kernel call as data, which Python or generated compiled code can make.

A plan validates its arguments once, when it is made; what it then runs is one call of a compiled function
on arrays and constants that are all known except the activations. An :class:`Entry` records that call:
``fn`` (a Numba dispatcher) and its arguments, where :class:`In` / :class:`Out` stand for the call's ``k``-th
input and output array and everything else is bound (weights, tables, scratch, geometry tuples, scalars).
``entry(ins, outs)`` makes the call from Python; a caller that chains many entries (a whole graph) can
instead emit one compiled function that makes every call in turn, paying Python's dispatch once.

An entry runs on one thread, and its bound scratch makes it usable by one caller at a time. A *split* entry
(:meth:`Entry.split`) also tells how a team of threads may share it: its output is ``rows`` independent rows,
and the arguments at positions ``cut`` hold one row each per output row; a thread given rows ``[lo, hi)``
calls ``fn`` with each of those arguments viewed as ``[rows, -1]`` (flat ``[rows * w]`` for one axis) and cut
to ``[lo, hi)``, the rest unchanged, and computes those rows only (no shared scratch). A *team* entry
(``team=True``) shares itself out: ``fn`` takes three more arguments ``ith, nth, sync`` (:mod:`kernels.sync`),
every thread of a team calls it, and it waits for the others itself where its steps need their results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels._jit import kernel
from kernels.sync import new_sync


@dataclass(frozen=True)
class In:
    """The entry's ``index``-th input array."""

    index: int


@dataclass(frozen=True)
class Out:
    """The entry's ``index``-th output array (written by the call)."""

    index: int


@dataclass(frozen=True)
class Entry:
    """``fn(*args)`` with :class:`In` / :class:`Out` replaced by the call's arrays.

    ``reshape``: no call; output 0 is input 0 (C-contiguous) viewed with this shape, as a Reshape or Flatten.
    """

    fn: Any
    args: tuple = ()
    reshape: tuple[int, ...] | None = None
    rows: int = 0  # > 0: a split entry (module docstring)
    cut: tuple[int, ...] = ()
    team: bool = False  # fn takes ith, nth, sync last (module docstring)

    @classmethod
    def view(cls, shape: tuple[int, ...]) -> Entry:
        """Output 0 is input 0 reshaped to ``shape`` (no copy)."""
        return cls(None, (In(0),), tuple(int(v) for v in shape))

    def reading(self, *positions: int) -> Entry:
        """This entry with its ``k``-th input taken from input ``positions[k]`` of the caller (a node whose
        activations are not its first inputs, e.g. QLinearAdd's A and B at positions 0 and 3)."""
        def moved(arg: Any) -> Any:
            if isinstance(arg, In):
                return In(positions[arg.index])
            return tuple(moved(a) for a in arg) if isinstance(arg, tuple) else arg

        return Entry(self.fn, tuple(moved(a) for a in self.args), self.reshape, self.rows, self.cut, self.team)

    def split(self, rows: int, *cut: int) -> Entry:
        """This entry made split (module docstring): ``rows`` independent output rows, the arguments at positions
        ``cut`` holding one row each per output row (each one's size a multiple of ``rows``)."""
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows: expected an int >= 1, got {rows!r}")
        if not cut or any(not 0 <= c < len(self.args) for c in cut):
            raise ValueError(f"cut: expected positions among the {len(self.args)} arguments, got {cut}")
        return Entry(self.fn, self.args, self.reshape, int(rows), tuple(int(c) for c in cut), self.team)

    def __post_init__(self) -> None:
        # where each marker sits, found once: a call then only fills those slots (the call is on hot paths)
        flat = not any(isinstance(a, tuple) and any(isinstance(b, (In, Out, tuple)) for b in a) for a in self.args)
        object.__setattr__(self, "_slots", tuple((i, a) for i, a in enumerate(self.args) if isinstance(a, (In, Out)))
                           if flat else None)

    def __call__(self, ins: list[np.ndarray], outs: list[np.ndarray]) -> list[np.ndarray] | None:
        """Make the call; a view entry returns its view (like a kernel returning results), others None."""
        if self.reshape is not None:
            return [ins[0].reshape(self.reshape)]
        alone = (0, 1, _ALONE) if self.team else ()
        if self._slots is None:
            self.fn(*[_resolve(a, ins, outs) for a in self.args], *alone)
            return None
        args = list(self.args)
        for i, marker in self._slots:
            args[i] = ins[marker.index] if type(marker) is In else outs[marker.index]
        self.fn(*args, *alone)
        return None


_ALONE = new_sync()  # a team of one never touches its sync


@kernel
def _untouched(x, out):
    """Nothing: the work of a call whose output is empty."""


def empty_entry() -> Entry:
    """The entry of a plan prepared for an empty batch (``x`` and ``out`` of 0 images): it does nothing."""
    return Entry(_untouched, (In(0), Out(0)))


def flat_rows(size: int) -> int:
    """Rows to split an elementwise entry of ``size`` values into: pieces of at most 1024 values, a power of two
    (whole vectors while the size allows), the count dividing ``size``."""
    return max(1, size // math.gcd(size, 1024))


def _resolve(arg: Any, ins: list[np.ndarray], outs: list[np.ndarray]) -> Any:
    if isinstance(arg, In):
        return ins[arg.index]
    if isinstance(arg, Out):
        return outs[arg.index]
    if isinstance(arg, tuple):
        return tuple(_resolve(a, ins, outs) for a in arg)
    return arg
