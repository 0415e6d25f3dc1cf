"""Shared tail of the group-wise sub-byte products (``gemm_int4``, ``gemm_ternary``, ``gemm_codebook``).

Validates the arguments, quantizes the activations (``kernels.gemm.grouped_driver``),
chooses a variant and splits the output over ``kernels.threads`` as the int8 GEMM
does.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate, dispatch, threads
from kernels.gemm.grouped_driver import DRIVERS, quantize_activations
from kernels.gemm.grouped_microkernels import kind_name
from kernels.pack.grouped import PackedGrouped

def run(op: str, x: object, packed: object, packed_type: type, out: np.ndarray | None) -> np.ndarray:
    """Validate, quantize ``x``, choose, split and run: ``out ~= x @ packed.dequantize().T``."""
    x = _validate.array("x", x, (np.float32,), 2)
    if not isinstance(packed, packed_type):
        raise TypeError(f"packed: expected a {packed_type.__name__}, got {type(packed).__name__}")
    m, k = x.shape
    if k != packed.k:
        raise ValueError(f"x: expected K = {packed.k} columns to match weights of shape {packed.shape}, "
                         f"got shape {x.shape}")
    n = packed.n
    shape = (m, n)
    out = np.empty(shape, np.float32) if out is None else _validate.out(out, shape, np.dtype(np.float32))
    if m == 0:
        return out
    return _run(op, x, packed, out)


def _run(op: str, x: np.ndarray, packed: PackedGrouped, out: np.ndarray) -> np.ndarray:
    m, k = x.shape
    n = packed.n
    xq, sx, sumx, finite = quantize_activations(x, packed.group_size, packed.n_groups, packed.k_padded)
    if not finite:
        raise ValueError("x: values must be finite")
    variant = dispatch.choose(op, m, n, k)
    driver = DRIVERS[kind_name(variant.kind, packed.bits, packed.symmetric, packed.lookup)]

    def part(p0: int, p1: int, i0: int, i1: int) -> None:
        driver(xq, sx, sumx, packed.data, packed.panel_zeros, packed.panel_scales, packed.group_steps,
               packed.steps, packed.zero, packed.kernel_table, n, p0, p1, i0, i1, out)

    # single-thread time from compute (~250 GOPS with the unpacking) and weight streaming (~25 GB/s)
    threads.run_tiled(part, packed.n_panels, m, variant.rows, 2 * m * n * k / 250e3 + packed.data.nbytes / 25e3)
    return out
