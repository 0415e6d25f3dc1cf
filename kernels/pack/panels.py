"""Column-panel layout of int8 weights for the int8 GEMM micro-kernels.

The weight matrix ``w`` (``[N, K]`` int8, one row per output channel) is cut into
panels of ``PANEL = 64`` output channels. Inside a panel, K runs in groups of
``KGROUP = 4``; for each group the 64 channels are stored one after another, each
as its 4 consecutive k values::

    data[((p * Kq + q) * PANEL + c) * KGROUP + u] = w[p * PANEL + c, q * KGROUP + u]

with ``Kq = ceil(K / 4)``. N is padded with zero rows to a multiple of 64 and K with
zero columns to a multiple of 4, so padded lanes add nothing to any dot product.
One k group of a panel is 256 contiguous bytes: four 512-bit registers, each
holding 16 channels x 4 k values, which is exactly the operand ``vpdpbusd``
multiplies by four broadcast activation bytes. The portable kernel reads the same
layout, so a packed weight serves every CPU level.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels.pack.plans import PlanCache

PANEL = 64
KGROUP = 4
ALIGN = 64  # bytes; one cache line, and the width of a 512-bit load


def aligned_empty(nbytes: int, dtype=np.int8) -> np.ndarray:
    """An uninitialised 1-byte-element array whose data starts on an ``ALIGN``-byte boundary."""
    raw = np.empty(nbytes + ALIGN, dtype=dtype)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


class Sealed:
    """Packed weights whose fields are fixed once set: compiled kernels index the arrays by them through raw
    pointers, so a changed field (a larger ``k``, a shorter ``data``) would read or write outside the arrays."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        try:
            getattr(self, name)
        except AttributeError:  # the first assignment, while packing
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"{type(self).__name__}.{name} is read-only: packed weights keep the fields they were "
                             f"packed with; pack new weights instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__}.{name} cannot be deleted: packed weights are read-only")


class PanelWeights(Sealed):
    """Base of weights ``[N, K]`` stored in 64-channel panels: sizes derived from ``n`` and ``k``."""

    __slots__ = ()
    n: int
    k: int

    @property
    def n_panels(self) -> int:
        return -(-self.n // PANEL)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)


class PackedInt8(PanelWeights):
    """An int8 weight matrix ``[N, K]`` in panel layout, made once by :func:`pack_int8`.

    Attributes
    ----------
    data : int8 [n_panels * Kq * 64 * 4], 64-byte aligned (see the module docstring)
    n, k : the logical shape of the weight
    col_sums : int64 [N], ``sum_k w[n, k]``; the zero-point corrections use it
    plans : :class:`kernels.pack.plans.PlanCache` of the one-shot calls with this weight
    """

    __slots__ = ("data", "n", "k", "col_sums", "plans")

    def __init__(self, data: np.ndarray, n: int, k: int, col_sums: np.ndarray):
        self.data, self.n, self.k, self.col_sums = data, n, k, col_sums
        self.plans = PlanCache()  # the one-shot calls' plans with this weight (kernels.pack.plans)

    @property
    def k_groups(self) -> int:
        return -(-self.k // KGROUP)

    def __repr__(self) -> str:
        return f"PackedInt8(shape=({self.n}, {self.k}), panels={self.n_panels}, nbytes={self.data.nbytes})"


def pack_int8(w: np.ndarray) -> PackedInt8:
    """Pack an int8 weight matrix ``w [N, K]`` (row n = output channel n) once for reuse.

    The result can be passed as ``b`` to :func:`kernels.gemm_int8` and as ``w`` to
    :func:`kernels.linear_int8` any number of times; packing costs about as much as
    reading ``w`` twice.
    """
    w = _validate.array("b", w, (np.int8,), 2)
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"b: expected a non-empty matrix, got shape {w.shape}")
    n_pad = -(-n // PANEL) * PANEL
    k_pad = -(-k // KGROUP) * KGROUP
    padded = np.zeros((n_pad, k_pad), dtype=np.int8)
    padded[:n, :k] = w
    data = aligned_empty(n_pad * k_pad)
    # [panel, channel, group, u] -> [panel, group, channel, u]
    panels = padded.reshape(n_pad // PANEL, PANEL, k_pad // KGROUP, KGROUP).transpose(0, 2, 1, 3)
    data.reshape(panels.shape)[...] = panels
    col_sums = w.sum(axis=1, dtype=np.int64)
    return PackedInt8(data, n, k, col_sums)
