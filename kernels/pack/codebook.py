"""Group-wise 4-bit codebook weights: indices into a table of at most 16 values, ``PackedCodebook``.

A weight is ``w[n, k] ~ scale[n, g] * T[c[n, k]]`` with ``c`` in ``0 .. len(T) - 1``,
``T`` sorted, in [-1, 1] (NF4, a powers-of-two table, ...) and one float32 scale per
group of G k values (the last group may be shorter). The indices are stored as
int4 nibbles in the panel layout of ``kernels.pack.grouped``.

The kernels multiply integers, so the table is represented in int8::

    tmax = max |T|    (float32 table)
    T8   = rint(127 * T / tmax)    (int8, |T8| <= 127, padded with zeros to 16 entries)

which moves each table value by at most half a step: ``|T - T8 * tmax / 127| <= tmax / 254``.
The product then uses the per-group weight scale ``sw = float32(float32(scale * tmax) / 127)``
(``panel_scales``), so the kernels' weights are ``sw * T8[c]`` (:meth:`PackedCodebook.kernel_weights`).

For the VNNI kernels (see ``kernels.gemm.grouped_vnni``), ``panel_zeros`` holds
``128 * sum_{k in g} T8[c[n, k]]`` per channel and group, the k range of the group
padded to whole steps (padding has index 0).
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels.pack.grouped import GROUP_SIZES, PackedGrouped, _per_panel, check_group_size, check_scales, check_weights, pack_fields
from kernels.pack.int4 import _groups

BITS = 4
MAX_ENTRIES = 1 << BITS


class PackedCodebook(PackedGrouped):
    """4-bit codebook weights ``[N, K]`` packed once by :func:`pack_codebook` or :func:`pack_codebook_weights`.

    Extra attributes: ``table`` (float32 [T], as given), ``table_max`` (``max|table|``),
    ``table8`` (int8 [16], ``rint(127 * table / table_max)`` zero padded).
    """

    __slots__ = ("table", "table_max", "table8")
    lookup = True

    def __init__(self, data, n, k, group_size, scales, table):
        super().__init__(data, n, k, BITS, group_size, scales, None, 0)
        self.table = table
        self.table_max = np.float32(np.abs(table).max())
        self.table8 = table_int8(table)
        # the codebook's kernel scales and zero-point sums replace the grouped ones, still while packing
        object.__setattr__(self, "panel_scales", _per_panel(self.kernel_scales, np.float32))
        # 128 * sum of T8 over each group's steps, padding included (index 0 there)
        steps = self.steps
        padded = np.zeros((n, steps * self.k_span), np.int64)
        padded[:, :k] = self.table8[self.codes()]
        padded[:, k:] = self.table8[0]
        span = self.group_steps * self.k_span
        groups = self.n_groups
        full = np.zeros((n, groups * span), np.int64)
        full[:, : padded.shape[1]] = padded
        sums = full.reshape(n, groups, span).sum(axis=2) * 128
        object.__setattr__(self, "panel_zeros", _per_panel(sums.astype(np.int32), np.int32))

    @property
    def kernel_table(self) -> np.ndarray:
        return self.table8

    @property
    def kernel_scales(self) -> np.ndarray:
        """float32 [N, n_groups]: ``float32(float32(scale * table_max) / 127)``."""
        return ((self.scales * self.table_max).astype(np.float32) / np.float32(127)).astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """``scale * table[code]`` as float32 ``[N, K]``: the weights the codes stand for."""
        g = np.arange(self.k) // self.group_size
        return (self.table[self.codes()] * self.scales[:, g]).astype(np.float32)

    def kernel_weights(self) -> np.ndarray:
        """``kernel_scales * table8[code]`` as float32 ``[N, K]``: the weights the kernels multiply."""
        g = np.arange(self.k) // self.group_size
        return (self.table8[self.codes()].astype(np.float32) * self.kernel_scales[:, g]).astype(np.float32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape=({self.n}, {self.k}), group_size={self.group_size}, "
                f"entries={self.table.size}, nbytes={self.data.nbytes})")


def table_int8(table: np.ndarray) -> np.ndarray:
    """``rint(127 * table / max|table|)`` as int8, zero padded to 16 entries (float32 table)."""
    t = np.asarray(table, np.float32).astype(np.float64)
    out = np.zeros(MAX_ENTRIES, np.int8)
    out[: t.size] = np.rint(127 * t / np.abs(t).max()).astype(np.int8)
    return out


def check_table(table: object) -> np.ndarray:
    """At most 16 real values, finite, in [-1, 1], strictly increasing, not all zero; float32 ``[T]``."""
    if isinstance(table, (str, bytes)) or not isinstance(table, (np.ndarray, list, tuple)):
        raise TypeError(f"table: expected a 1-D array or sequence of floats, got {type(table).__name__}")
    t = np.asarray(table)
    if t.dtype.kind not in "fiu":
        raise TypeError(f"table: expected real values, got dtype {t.dtype}")
    if t.ndim != 1 or t.size == 0 or t.size > MAX_ENTRIES:
        raise ValueError(f"table: expected 1 to {MAX_ENTRIES} values in a 1-D array, got shape {t.shape}")
    t = t.astype(np.float32)
    if not np.all(np.isfinite(t)) or np.abs(t).max() > 1:
        raise ValueError("table: values must be finite and lie in [-1, 1]")
    if np.any(np.diff(t) <= 0):
        raise ValueError("table: values must be sorted in strictly increasing order")
    if not np.any(t != 0):
        raise ValueError("table: needs a nonzero value")
    return t


def pack_codebook(codes: np.ndarray, scales: np.ndarray, table, *, group_size: int) -> PackedCodebook:
    """Pack codebook indices: ``w[n, k] ~ scales[n, g] * table[codes[n, k]]`` (module docstring).

    Parameters
    ----------
    codes : uint8 [N, K] in ``0 .. len(table) - 1``, C-contiguous
    scales : float32 or float16 [N, ceil(K / group_size)], finite, >= 0
    table : 1 to 16 real values, strictly increasing, in [-1, 1], not all zero
    group_size : 32, 64, 128 or 256
    """
    codes = _validate.array("codes", codes, (np.uint8,), 2)
    g = check_group_size(group_size, GROUP_SIZES)
    t = check_table(table)
    n, k = codes.shape
    if n == 0 or k == 0:
        raise ValueError(f"codes: expected a non-empty matrix, got shape {codes.shape}")
    _validate.integer_in("codes", codes, 0, t.size - 1)
    s = check_scales(scales, n, -(-k // g))
    return PackedCodebook(pack_fields(codes, BITS), n, k, g, s, t)


def quantize_codebook(w: np.ndarray, table, group_size: int = 64):
    """``(codes uint8 [N, K], scales float32 [N, groups])``: ``scale = max|w|`` per group
    (1 for an all-zero group) and the nearest table entry of ``w / scale`` (a tie goes to
    the larger entry), as lowbit's codebook grids (e.g. the nf4 preset) fit them."""
    w = check_weights("w", w)
    t = check_table(table)
    g = check_group_size(group_size, GROUP_SIZES)
    n, k = w.shape
    amax = np.abs(_groups(w, g)).max(axis=2)
    scales = np.where(amax > 0, amax, np.float32(1)).astype(np.float32)
    ratio = w / np.repeat(scales, g, axis=1)[:, :k]
    midpoints = (t[1:] + t[:-1]) / 2
    return np.searchsorted(midpoints, ratio, side="right").astype(np.uint8), scales


def pack_codebook_weights(w: np.ndarray, table, group_size: int = 64) -> PackedCodebook:
    """Quantize float32 weights ``w [N, K]`` to the codebook (:func:`quantize_codebook`) and pack them."""
    codes, scales = quantize_codebook(w, table, group_size)
    return pack_codebook(codes, scales, table, group_size=group_size)
