"""Shared tail of the group-wise sub-byte products (``gemm_int4``, ``gemm_ternary``, ``gemm_codebook``).

:class:`GroupedPlan` is one product prepared for a packed weight and a batch of M rows: the variant chosen, the
kernel that quantizes the activations and runs the tiles (``kernels.gemm.grouped_driver.PRODUCTS``), and its
:meth:`GroupedPlan.entry`. The one-shot functions keep their plans on the packed weight
(``kernels.pack.plans``); large products split the output over ``kernels.threads`` as the int8 GEMM does.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate, dispatch, threads
from kernels._jit import machine_entry
from kernels.entry import Entry, In, Out
from kernels.gemm.grouped_driver import DRIVERS, PRODUCTS, TEAMS, quantize_activations
from kernels.gemm.grouped_microkernels import kind_name
from kernels.pack.grouped import PackedGrouped

class GroupedPlan:
    """``x [m, K] (float32) @ packed.dequantize().T`` prepared once: ``plan(x, out=None)``, and :meth:`entry`.

    Made by ``kernels.gemm_int4_plan``, ``gemm_ternary_plan`` and ``gemm_codebook_plan`` (and, kept on the packed
    weight, by the one-shot functions). Results and errors are those of :func:`kernels.gemm_int4`.
    """

    def __init__(self, op: str, packed: PackedGrouped, m: int):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"m: expected a row count >= 0, got {m!r}")
        self.op, self.packed, self.m = op, packed, int(m)
        n, k = packed.n, packed.k
        self.variant = dispatch.choose(op, self.m, n, k)
        kind = kind_name(self.variant.kind, packed.bits, packed.symmetric, packed.lookup)
        self.kind = kind
        self._fn = PRODUCTS[kind]
        self._machine = None  # self._fn's machine entry (kernels._jit.machine_entry), made by the first call
        # the kernel's arguments after the scratch (xq, sx, sumx)
        self._weights = (packed.data, packed.panel_zeros, packed.panel_scales, packed.group_steps, packed.steps,
                         packed.zero, packed.kernel_table)
        # single-thread time from compute (~250 GOPS with the unpacking) and weight streaming (~25 GB/s)
        self._estimate = 2 * self.m * n * k / 250e3 + packed.data.nbytes / 25e3
        self._parallel = self._estimate >= 2 * threads.MIN_US_PER_THREAD
        # no rows: the kernel allocates its scratch (of these widths), so that threads may share the plan
        self._no_scratch = _scratch(packed, 0)
        self._call_args = (packed.group_size, *self._no_scratch, *self._weights)  # all but x and out, read once

    def entry(self) -> Entry:
        """``plan(x, out)`` as one unchecked team entry (:mod:`kernels.entry`; ``x [..., K]`` of ``m`` rows and
        ``out [..., N]`` float32, C-contiguous, checked by the caller; non-finite ``x`` raises ValueError); binds
        its own scratch."""
        packed, m = self.packed, self.m
        return Entry(TEAMS[self.kind], (In(0), packed.group_size, *_scratch(packed, m), *self._weights, Out(0)),
                     team=True)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The product for ``x [m, K]`` float32 (C-contiguous, finite); ``out [m, N]`` float32 optional."""
        packed = self.packed
        # exact: x and out have the types of the machine entry's arguments (see kernels._jit.machine_entry)
        exact = (type(x) is np.ndarray and x.dtype is _F32 and (flags := x.flags).c_contiguous
                 and x.shape == (self.m, packed.k))
        if not exact:
            x = self._checked(x)
        shape = (self.m, packed.n)
        if out is None:
            out = np.empty(shape, np.float32)
        elif not (type(out) is np.ndarray and out.dtype is _F32 and out.shape == shape
                  and (out_flags := out.flags).c_contiguous and out_flags.writeable and out_flags.aligned):
            out = _validate.out(out, shape, _F32, x=x)
            exact = False
        else:  # the checks above, inline: only the overlap is left
            _validate.disjoint(out, "x", x)
        if self.m == 0:
            return out
        args = self._call_args
        if self._parallel and threads.get_num_threads() > 1:
            self._threaded(x, out)
        elif exact and flags.writeable and flags.aligned:
            if self._machine is None:
                self._machine = machine_entry(self._fn, (x, *args, out))
            self._machine(x, *args, out)
        else:
            self._fn(x, *args, out)
        return out

    def _checked(self, x: object) -> np.ndarray:
        x = _validate.array("x", x, (np.float32,), 2)
        if x.shape[1] != self.packed.k:
            raise ValueError(f"x: expected K = {self.packed.k} columns to match weights of shape "
                             f"{self.packed.shape}, got shape {x.shape}")
        if x.shape[0] != self.m:
            raise ValueError(f"x: expected M = {self.m} rows (as prepared), got shape {x.shape}")
        return x

    def _threaded(self, x: np.ndarray, out: np.ndarray) -> None:
        packed, n = self.packed, self.packed.n
        xq, sx, sumx, finite = quantize_activations(x, packed.group_size, packed.n_groups, packed.k_padded)
        if not finite:
            raise ValueError("x: values must be finite")
        driver = DRIVERS[self.kind]

        def part(p0: int, p1: int, i0: int, i1: int) -> None:
            driver(xq, sx, sumx, packed.data, packed.panel_zeros, packed.panel_scales, packed.group_steps,
                   packed.steps, packed.zero, packed.kernel_table, n, p0, p1, i0, i1, out)

        threads.run_tiled(part, packed.n_panels, self.m, self.variant.rows, self._estimate)


_F32 = np.dtype(np.float32)


def _scratch(packed: PackedGrouped, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quantized activations' arrays ``xq [m, k_padded]`` (zero), ``sx`` and ``sumx`` ``[m, n_groups]``."""
    return (np.zeros((m, packed.k_padded), np.int8), np.zeros((m, packed.n_groups), np.float32),
            np.zeros((m, packed.n_groups), np.int32))


def plan(op: str, packed: object, packed_type: type, m: object) -> GroupedPlan:
    """A checked :class:`GroupedPlan` of ``op`` for ``packed`` (a ``packed_type``) and ``m`` rows."""
    if not isinstance(packed, packed_type):
        raise TypeError(f"packed: expected a {packed_type.__name__}, got {type(packed).__name__}")
    return GroupedPlan(op, packed, m)


def run(op: str, x: object, packed: object, packed_type: type, out: np.ndarray | None) -> np.ndarray:
    """Validate and run ``out ~= x @ packed.dequantize().T``, with the plan kept on ``packed`` for ``x``'s rows."""
    if type(packed) is packed_type and type(x) is np.ndarray and x.ndim == 2:
        key = (op, x.shape[0])
        found = packed.plans.get(key)
        if found is None:
            found = packed.plans.put(key, GroupedPlan(op, packed, x.shape[0]))
        return found(x, out)
    x = _validate.array("x", x, (np.float32,), 2)
    if not isinstance(packed, packed_type):
        raise TypeError(f"packed: expected a {packed_type.__name__}, got {type(packed).__name__}")
    return GroupedPlan(op, packed, x.shape[0])(x, out)
