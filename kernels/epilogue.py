"""Turning exact int32 dot products into the caller's output, one tile at a time.

The GEMM driver hands every finished tile to :func:`finish_tile` while it is still
in L1 (the VNNI micro-kernels finish outputs without weight zero points from their
registers instead). With ``v`` the tile's raw sums of unsigned activation bytes
``a`` times signed weights ``w``, the zero-point corrected accumulator is
(derivation: expand ``sum_k (a - za)(w - zw)``)::

    y[m, n] = v[m, n] + col_term[n] - w_zp[n] * row_sums[m]
    col_term[n] = -za * sum_k w[n, k] + K * za * w_zp[n] (+ an int32 bias, if any)
    row_sums[m] = sum_k a[m, k]

computed in int64, so it is exact. Then, by ``mode``:

* ``INTEGER``: ``out = y`` (int32; exact when y fits, which the caller checks).
* ``REAL``:    ``out = float32(clip(y * mult[n] + shift[n], lo, hi))``.
* ``QUANT``:   ``out = clip(rint(clip(y * mult[n] + shift[n], lo, hi) + zp), qmin, qmax)``,
  rounding half to even as ONNX QLinearMatMul does.

The float part runs in float64 in the order written, with no contraction, so
``kernels.reference`` reproduces it bit for bit. Vector epilogues may round
``QUANT`` codes in float32 instead, where :func:`single_precision_codes` proves
them the same, and in float64 wherever it cannot.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kernels._jit import kernel
from kernels.epilogue_row import finish_row, finish_row_plain

# Output modes of every driver, one number each across the package (BITS: the binary products' bit-packed
# output, see kernels.gemm.binary_driver); this module's epilogues finish the first three.
INTEGER, REAL, QUANT, BITS = 0, 1, 2, 3
MODES = (INTEGER, REAL, QUANT)
_UNUSED = np.zeros(1)
_UNUSED32 = np.zeros(1, np.float32)


class Epilogue(NamedTuple):
    """How ``kernels.epilogue`` finishes the product (see the module docstring for the formulas).

    For ``QUANT``, ``rint(clip(t, lo, hi) + zp)`` never leaves ``[qmin, qmax]`` (see
    :func:`quantized_bounds`), which lets vector code skip the last clamp. Integer
    ``qmin`` and ``qmax`` (made by :func:`with_codes`) also promise that every shift
    is 0 and that the codes fit int32, so vector code may clamp those instead.
    """

    mode: int
    col_bias: np.ndarray | int = 0  # int64 [N] added to the corrected sums: an int32 bias
    mult: np.ndarray = _UNUSED  # float64 [N]
    shift: np.ndarray = _UNUSED  # float64 [N]
    lo: float = -math.inf
    hi: float = math.inf
    zp: float = 0.0
    qmin: float = 0.0
    qmax: float = 0.0


def quantized_bounds(lo: float, hi: float, zp: float, qmin: float, qmax: float) -> tuple[float, float]:
    """The activation clamp ``[lo, hi]`` narrowed to ``[qmin - zp, qmax - zp]``, without changing any output.

    ``rint`` is monotonic and keeps integers, so ``clip(rint(clip(t, lo, hi) + zp),
    qmin, qmax) == clip(rint(clip(t, lo2, hi2) + zp), qmin, qmax)`` with the
    narrowed bounds; when the two ranges do not meet, every output is ``qmax``
    (activation range above) or ``qmin`` (below), and both bounds pin to it.
    """
    if lo > qmax - zp:
        return qmax - zp, qmax - zp
    if hi < qmin - zp:
        return qmin - zp, qmin - zp
    return max(lo, qmin - zp), min(hi, qmax - zp)


CODES_LIMIT = 2.0**30  # under 2**31, with room for the float64 rounding of the bound itself


def bias_bound(col_bias: np.ndarray | int) -> int:
    """``max |col_bias|`` of a scalar or per-channel int bias."""
    return int(np.abs(col_bias).max()) if np.ndim(col_bias) else abs(int(col_bias))


def codes_fit(epi: Epilogue, largest: int) -> bool:
    """Whether ``|y mult + shift + zp| < CODES_LIMIT`` for every sum with ``|y| <= largest``: the rounded
    codes then fit int32, so vector epilogues may clamp them as integers (see :func:`with_codes`)."""
    return largest * float(np.abs(epi.mult).max()) + float(np.abs(epi.shift).max()) + abs(epi.zp) < CODES_LIMIT


def code_bounds(lo: float, hi: float, zp: float) -> tuple[int, int]:
    """``rint(lo + zp)`` and ``rint(hi + zp)`` in float64, as ``finish_tile`` rounds: the codes that clamping
    ``t`` to ``[lo, hi]`` allows (``t -> rint(t + zp)`` is monotonic)."""
    return int(np.rint(np.float64(lo) + zp)), int(np.rint(np.float64(hi) + zp))


SINGLE_MARGIN_UNIT = 2.0**-22  # the error bound of a single-precision code, per unit of magnitude
CODE_REACH = 256  # no int8 / uint8 code bound lies outside [-256, 256]


def single_precision_codes(mult: np.ndarray, shift: np.ndarray, zp: float, largest: int | None = None) -> np.ndarray:
    """What rounding ``QUANT`` codes in float32 needs, per channel, to give exactly the float64 ones.

    The code of an exact sum ``y`` is ``rint(y mult + shift + zp)`` in float64, in
    ``finish_tile``'s order, then clamped to the code bounds ``[qlo, qhi]``.
    ``b = fma(float32(y), m32, c32)``, with ``m32 = float32(mult)`` and
    ``c32 = float32(shift + zp)``, is within ``eps`` of the float64 value before
    rounding wherever ``|y mult| <= T``::

        eps = 2**-22 (T + |shift| + |zp| + 1)

    bounds the roundings of ``y``, ``mult``, ``c32``, the fma and ``b - rint(b)``
    (``2**-24`` of each magnitude) and of the float64 reference, with room to spare.
    So wherever ``|b - rint(b)| < 0.5 - eps``, no tie lies within ``eps`` of ``b`` and
    ``rint(b)`` is the float64 code; elsewhere (about ``2 eps`` of the sums) the caller
    computes it in float64. ``T`` comes from one of two uses:

    * ``largest`` given (every ``|y| <= largest``): ``T = largest |mult|``, and the
      caller rounds ``b`` as it is;
    * ``largest`` None: the caller first clamps ``b`` to ``[qlo, qhi]``, so lanes that
      round there have ``|b| <= CODE_REACH``, hence ``T = CODE_REACH + |shift| + |zp|``;
      a lane it clamps is clamped in float64 too, as ``b`` is within ``2**-22`` of the
      exact value, relative to it, plus ``eps <= 2**-5``: short of the half it would
      take to round across a code bound.

    Returns float32 ``[C, 3]`` rows ``(m32, c32, limit)``, with ``limit = 0.5 - eps``
    rounded down, or all 0 (float64 always) where ``eps > 2**-5`` or ``|mult| > 2**64``.
    """
    mult = np.asarray(mult, np.float64)
    shift = np.broadcast_to(np.asarray(shift, np.float64), mult.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        reach = CODE_REACH + np.abs(shift) + abs(zp) if largest is None else largest * np.abs(mult)
        eps = SINGLE_MARGIN_UNIT * (reach + np.abs(shift) + abs(zp) + 1.0)
        usable = np.isfinite(eps) & (eps <= 2.0**-5) & (np.abs(mult) <= 2.0**64)
        factors = np.zeros((mult.shape[0], 3), np.float32)
        factors[usable, 0] = mult[usable]
        factors[usable, 1] = shift[usable] + zp
    factors[usable, 2] = np.nextafter((0.5 - eps[usable]).astype(np.float32), np.float32(0))
    return factors


def single_precision_table(factors: np.ndarray, size: int) -> np.ndarray:
    """``single_precision_codes`` rows ``[C, 3]`` as vector kernels read them: float32 ``[size / 16, 3, 16]`` flat.

    Per 16 channels the 16 ``m32``, then the ``c32``, then the ``limit``; past C, 0
    with a limit of 0.5 (their ``b`` is an integer, never near a tie). ``size`` is a
    multiple of 16, at least C.
    """
    c = factors.shape[0]
    rows = np.zeros((size, 3), np.float32)
    rows[:, 2] = 0.5
    rows[:c] = factors
    return np.ascontiguousarray(rows.reshape(size // 16, 16, 3).transpose(0, 2, 1)).reshape(-1)


def single_table(epi: Epilogue, mult: np.ndarray) -> np.ndarray:
    """The float32 factors with which vector epilogues round ``epi``'s codes, for channels with ``mult``.

    :func:`single_precision_table` of the clamped use of :func:`single_precision_codes`
    (``len(mult)`` a multiple of 16) for an epilogue with integer codes
    (:func:`with_codes`, whose shifts are 0); a placeholder, never read, for any other.
    """
    if not isinstance(epi.qmin, (int, np.integer)):
        return _UNUSED32
    return single_precision_table(single_precision_codes(mult, 0.0, epi.zp), mult.shape[0])


def with_codes(epi: Epilogue, largest: int) -> Epilogue:
    """``epi`` with integer ``qmin, qmax = code_bounds(lo, hi, zp)`` where that is safe.

    Clamping ``t`` to ``[lo, hi]`` and clamping the rounded code to those two integers
    give the same outputs; vector epilogues (``kernels.gemm.vnni.rounded_codes`` and
    ``single_codes``) do the latter, on integers, and skip adding the shift. Safe for a
    ``QUANT`` epilogue whose shifts are all 0 and whose codes fit int32 for every
    ``|y| <= largest`` (:func:`codes_fit`); other epilogues come back unchanged.
    The outputs are the same either way.
    """
    if epi.mode != QUANT or epi.shift.any() or not codes_fit(epi, largest):
        return epi
    lo, hi = quantized_bounds(epi.lo, epi.hi, epi.zp, epi.qmin, epi.qmax)
    qmin, qmax = code_bounds(lo, hi, epi.zp)
    return epi._replace(lo=lo, hi=hi, qmin=qmin, qmax=qmax)


@kernel
def finish_tile(v, i0, rows, c0, cols, col_term, w_zp, row_sums, row_term, mult, shift, lo, hi, zp, qmin, qmax, mode,
                out):
    """Write ``out[i0:i0+rows, c0:c0+cols]`` from the tile ``v[:rows, :cols]`` (see module docstring).

    ``mode`` is a compile-time constant in every caller, so only its branch is
    kept: integer loops that vectorise, or ``kernels.epilogue_row.finish_row`` per
    row for the float modes. ``row_term`` is false when ``w_zp`` is all zero,
    which spares the multiply.
    """
    ct = col_term[c0 : c0 + cols]
    wz = w_zp[c0 : c0 + cols]
    for r in range(rows):
        src = v[r]
        dst = out[i0 + r, c0 : c0 + cols]
        rs = row_sums[i0 + r] if row_term else 0
        if mode == INTEGER:
            if row_term:
                for c in range(cols):
                    dst[c] = src[c] + ct[c] - wz[c] * rs
            else:  # the common case: no multiply (vpmullq is slow)
                for c in range(cols):
                    dst[c] = src[c] + ct[c]
            continue
        if row_term:
            finish_row(src, col_term, w_zp, np.float64(row_sums[i0 + r]), c0, cols, mult, shift, lo, hi, zp, qmin,
                       qmax, out, i0 + r, c0)
        else:
            finish_row_plain(src, col_term, w_zp, 0.0, c0, cols, mult, shift, lo, hi, zp, qmin, qmax, out, i0 + r,
                             c0)
