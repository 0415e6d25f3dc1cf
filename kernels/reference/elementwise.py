"""NumPy oracles of the quantized elementwise ops (``kernels.elementwise``).

Nothing here is fast. Two definitions of add and mul:

* ``qlinear_add_ref`` / ``qlinear_mul_ref``: the spec, the exact real value rounded half to even,
  computed in float64 as ``rint((a_real op b_real) / c_scale) + c_zero_point``, saturated. The
  kernels' exact path equals it bit for bit.
* ``qlinear_add_single_ref`` / ``qlinear_mul_single_ref``: the float32 formula of the kernels' fast
  path (ONNX Runtime's), every step rounded to float32 as the kernel rounds it, ``fma`` emulated
  exactly. The fast path equals it bit for bit.

Scales are rounded to float32 first, as ONNX stores them. ``qlinear_lookup_ref`` is the table
lookup by the code's byte.
"""

from __future__ import annotations

import numpy as np

F32, F64 = np.float32, np.float64


def _codes(dtype, activation, zero_point: int) -> tuple[int, int]:
    """The code range of ``dtype``, its lower end raised to ``zero_point`` for ReLU."""
    info = np.iinfo(dtype)
    return (max(info.min, zero_point) if activation == "relu" else info.min), info.max


def _spec(op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype, activation):
    a_real = (a.astype(F64) - a_zero_point) * F64(F32(a_scale))
    b_real = (b.astype(F64) - b_zero_point) * F64(F32(b_scale))
    lo, hi = _codes(dtype, activation, c_zero_point)
    return np.clip(np.rint(op(a_real, b_real) / F64(F32(c_scale))) + c_zero_point, lo, hi).astype(dtype)


def qlinear_add_ref(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                    activation=None) -> np.ndarray:
    """``clip(rint(((a - za) sa + (b - zb) sb) / sc) + zc)`` in float64, broadcast as NumPy; ``dtype`` out."""
    return _spec(np.add, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                 activation)


def qlinear_mul_ref(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                    activation=None) -> np.ndarray:
    """``clip(rint(((a - za) sa) ((b - zb) sb) / sc) + zc)`` in float64, broadcast as NumPy; ``dtype`` out."""
    return _spec(np.multiply, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                 activation)


def fma32(x: np.ndarray, r: np.float32, y: np.ndarray) -> np.ndarray:
    """``x * r + y`` rounded once to float32: integer ``x`` (|x| < 2**16), float32 ``r`` and ``y``.

    ``x r`` is exact in float64; the float64 sum ``s`` and its exact error ``e`` (TwoSum) give
    ``x r + y = s + e``. Rounding ``s`` to float32 is right unless ``s`` is exactly halfway between
    two float32 values and ``e != 0``: then the true value lies on ``e``'s side of the half.
    """
    p = np.asarray(x, F64) * F64(r)
    y = np.asarray(y, F32).astype(F64)
    s = p + y
    bv = s - p
    e = (p - (s - bv)) + (y - bv)
    f = s.astype(F32)
    f64 = f.astype(F64)
    g = np.nextafter(f, np.where(s > f64, F32(np.inf), F32(-np.inf)).astype(F32))  # the neighbour across s
    half = (s != f64) & (2 * s == f64 + g.astype(F64)) & (e != 0)
    return np.where(half & (np.sign(e) == np.sign(g.astype(F64) - s)), g, f)


def _outer_is_b(a_shape: tuple, b_shape: tuple) -> bool:
    """Whether ``b`` plays ``x`` in the float32 formula: ``a`` is broadcast along the output's last axis
    longer than 1 (where ONNX Runtime swaps the operands)."""
    shape = np.broadcast_shapes(a_shape, b_shape)
    for axis in range(1, len(shape) + 1):
        if shape[-axis] > 1:
            return axis > len(a_shape) or a_shape[-axis] == 1
    return False


def _single(op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype, activation):
    shape = np.broadcast_shapes(a.shape, b.shape)
    pa = (np.broadcast_to(a, shape).astype(np.int64), a_scale, a_zero_point)
    pb = (np.broadcast_to(b, shape).astype(np.int64), b_scale, b_zero_point)
    (x, sx, zx), (y, sy, zy) = (pb, pa) if _outer_is_b(a.shape, b.shape) else (pa, pb)
    sx, sy, sc, zc = F32(sx), F32(sy), F32(c_scale), c_zero_point
    if op == "add":
        rx, ry = sx / sc, sy / sc
        f = F32(zc) - fma32(np.array([zx]), rx, np.array([ry * F32(zy)]))[0]
        v = fma32(x, rx, fma32(y, ry, np.full(shape, f, F32)))
    else:
        m = (sx * sy) / sc
        v = ((x - zx) * (y - zy)).astype(F32) * m + F32(zc)
    lo, hi = _codes(dtype, activation, zc)
    return np.clip(np.rint(v.astype(F64)), lo, hi).astype(dtype)


def qlinear_add_single_ref(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                           activation=None) -> np.ndarray:
    """The float32 formula: ``clip(rint(fma(x, rx, fma(y, ry, f))))`` with ``rx = sx / sc``, ``ry = sy / sc``,
    ``f = zc - fma(rx, zx, ry zy)``; ``x`` is ``a`` unless ``a`` is broadcast along the output's last axis
    longer than 1, ``y`` the other."""
    return _single("add", a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                   activation)


def qlinear_mul_single_ref(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                           activation=None) -> np.ndarray:
    """The float32 formula: ``clip(rint(((a - za) (b - zb)) m + zc))``, ``m = (sa sb) / sc``."""
    return _single("mul", a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point, dtype,
                   activation)


def qlinear_lookup_ref(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[byte of x]``: ``table[x]`` for uint8 codes, ``table[x & 255]`` for int8 ones."""
    return table[np.asarray(x).astype(np.uint8)]
