"""Float32 elementwise ops of CNNs and transformers as compiled loops: activations and broadcast arithmetic.

Every kernel takes C-contiguous float32 arrays of any rank (read and written flat, so ``out`` only needs as many
elements as the result) and writes ``out``, which may be ``x`` itself. They are plain loops that LLVM vectorises,
so each costs one pass over memory and no temporaries, and each is one call: an :class:`~kernels.entry.Entry`
can chain it between convolutions and matrix products (:func:`unary_entry`, :func:`binary_entry`).

Exactness. Relu / Clip, LeakyRelu, HardSigmoid, HardSwish, Neg, Abs, Sqrt, Reciprocal and Add / Sub / Mul / Div
compute in float32 operation for operation as their NumPy formulas (bit for bit; NaN kept as ONNX). The
transcendental ones (Exp, Sigmoid, Tanh, Erf, both Gelu forms) compute in float64 and round once, so they are
within an ulp or so of their function (closer than the float32 NumPy formulas, which lose all relative precision
where ``1 + tanh`` or ``1 + erf`` cancels; the erf form of Gelu keeps the rational's 2e-9 absolute error in
``1 + erf``, so its relative error grows below ``x = -4``, where ``|y| < 1.3e-4``). :func:`exp64` is the one
transcendental: a degree-9 Taylor polynomial of ``e^r``, ``|r| <= ln2 / 2`` (truncation error below ``1e-11``),
scaled by ``2^n`` through the float64 exponent bits (no libm call, so the loops vectorise; Numba has no vector
math library here); divisions are float32's and a Newton step (:func:`reciprocal64`). Erf is the
rational ``x P(x^2) / Q(x^2)`` of :data:`ERF_P` in float64. The same construction in float32, for kernels
whose float32 result allows it (``kernels.softmax``), is :mod:`kernels.math_ir`.
"""

from __future__ import annotations

import math

import numpy as np

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kernels import _validate, threads
from kernels._jit import kernel
from kernels.entry import Entry, In, Out, flat_rows
from kernels.gemm.llvm_ir import I1, I32, I64, array_ptr, emit_loop, is_array, masked, splat
from kernels.math_ir import emit_erf, fused_multiply_add

F32 = np.dtype(np.float32)

#: ``erf(x) = x P(x^2) / Q(x^2)`` for ``|x| <= ERF_CLAMP`` (past it erf is 1 to float32 precision). The
#: coefficients (ascending powers of ``u = x^2``) were fitted for lowbit by Lawson-reweighted linear least squares
#: on 8000 Chebyshev points of [0, 3.92] against ``math.erf``: the rational is within 1.9e-9 relative of erf there.
#: Evaluated in float64 and rounded once (:func:`erf` here, ``lowbit.runtime.evaluators.erf``), 0.54 ulp of float32.
ERF_P = (1.1283791691460208, 0.1851352766883202, 0.054244002671555075, 0.0038386246091286244,
         0.0003767598215663367, 4.6092573704617916e-06, -1.279991779691585e-08)
ERF_Q = (1.0, 0.4974052733382146, 0.11387377362787732, 0.015430055158578038, 0.0013015264416001697,
         6.239939761289734e-05)
ERF_CLAMP = 3.92

_LOG2E, _LN2 = 1.4426950408889634, 0.6931471805599453
_ROUND64 = 1.5 * 2.0**52  # t + _ROUND64 holds rint(t) in its low mantissa bits for |t| < 2^51
_ROUND64_BITS = np.int64(0x4338000000000000)  # the bits of _ROUND64
_EXP_LO, _EXP_HI = -110.0, 90.0  # e^x rounds to 0 / inf in float32 past these; 2^n stays a normal float64
_SQRT_HALF, _SQRT_2_PI = 1 / math.sqrt(2.0), math.sqrt(2.0 / math.pi)
_SIXTH = np.float32(1 / 6)
US_PER_VALUE = 3e-4  # the slower unary kernels' single-thread time per value, for thread splits
_FLOAT = ir.FloatType()
_V16F32 = ir.VectorType(_FLOAT, 16)


# ---- scalar helpers (inlined into the loops) -------------------------------------------------------------------------

@kernel(inline="always")
def exp64(x):
    """``e^x`` in float64 to ~1e-11 relative for ``x`` clamped to ``[-110, 90]`` (0 below; NaN stays NaN):
    ``x = n ln2 + r``, ``n = rint(x log2 e)``, ``e^r`` by Taylor's polynomial of degree 9, times ``2^n`` built from
    its bits."""
    c = _EXP_LO if x < _EXP_LO else x
    c = _EXP_HI if c > _EXP_HI else c
    shifted = c * _LOG2E + _ROUND64
    n = shifted - _ROUND64
    r = c - n * _LN2
    p = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (
        1 / 5040 + r * (1 / 40320 + r * (1 / 362880)))))))))
    scale = np.int64((np.float64(shifted).view(np.int64) - _ROUND64_BITS + 1023) << 52).view(np.float64)
    return 0.0 if x < _EXP_LO else p * scale  # exactly 0 there, so that x sigmoid(x) is NaN at -inf as x * 0


@kernel(inline="always")
def reciprocal64(d):
    """``1 / d`` in float64 to ~4e-15 relative for ``d`` in float32's normal range: float32's division (several
    times the throughput of float64's) and one Newton step ``r (2 - d r)``, which squares its error."""
    r = np.float64(np.float32(1) / np.float32(d))
    return r * (2.0 - d * r)


@kernel(inline="always")
def _sigmoid64(x):
    """``1 / (1 + e^-x)`` in float64, from ``t = e^-|x| <= 1``: ``1 / (1 + t)``, or ``t / (1 + t)`` for ``x < 0``."""
    t = exp64(-abs(x))
    s = reciprocal64(1.0 + t)
    return s if x >= 0 else t * s


@kernel(inline="always")
def _tanh64(x):
    """``tanh x`` in float64: ``(1 - t) / (1 + t)``, ``t = e^-2|x|``, signed; Taylor's odd polynomial below
    ``|x| < 1/16`` (where ``1 - t`` would cancel; the omitted terms are below 1e-14 relative)."""
    a = abs(x)
    u = x * x
    small = x * (1.0 + u * (-1 / 3 + u * (2 / 15 + u * (-17 / 315 + u * (62 / 2835)))))
    t = exp64(-2.0 * a)
    large = math.copysign((1.0 - t) * reciprocal64(1.0 + t), x)
    return small if a < 0.0625 else large


@kernel(inline="always")
def _erf64(x):
    """``erf x`` in float64: ``c P(c^2) / Q(c^2)``, ``c`` = x clamped to ``[-ERF_CLAMP, ERF_CLAMP]`` (NaN kept)."""
    c = ERF_CLAMP if x > ERF_CLAMP else (-ERF_CLAMP if x < -ERF_CLAMP else x)
    u = c * c
    p = ERF_P[0] + u * (ERF_P[1] + u * (ERF_P[2] + u * (ERF_P[3] + u * (ERF_P[4] + u * (ERF_P[5] + u * ERF_P[6])))))
    q = ERF_Q[0] + u * (ERF_Q[1] + u * (ERF_Q[2] + u * (ERF_Q[3] + u * (ERF_Q[4] + u * ERF_Q[5]))))
    return c * p * reciprocal64(q)


@kernel(inline="always")
def _clamp(v, lo, hi):
    """``min(max(v, lo), hi)`` (``hi`` wherever ``lo > hi``), NaN kept."""
    v = lo if v < lo else v
    return hi if v > hi else v


# ---- unary ops -------------------------------------------------------------------------------------------------------

@kernel(error_model="numpy")
def clip(x, out, lo, hi):
    """Clip (and Relu: ``lo = 0, hi = inf``): ``out = min(max(x, lo), hi)``, ``hi`` wherever ``lo > hi``, NaN kept.
    ``x``, ``out``: C-contiguous float32 of ``x.size`` elements, any rank; ``lo``, ``hi``: float32."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = _clamp(xf[i], lo, hi)


@kernel(error_model="numpy")
def leaky_relu(x, out, alpha):
    """LeakyRelu: ``out = x`` if ``x >= 0`` else ``alpha x`` (float32 ``alpha``); arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        v = xf[i]
        yf[i] = v if v >= 0 else alpha * v


@kernel(error_model="numpy")
def hard_sigmoid(x, out, alpha, beta):
    """HardSigmoid: ``out = max(0, min(1, alpha x + beta))`` in float32 (float32 ``alpha``, ``beta``), NaN kept;
    arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = _clamp(xf[i] * alpha + beta, np.float32(0), np.float32(1))


@kernel(error_model="numpy")
def hard_swish(x, out):
    """HardSwish: ``out = x max(0, min(1, x (1/6) + 1/2))`` in float32 (``1/6`` rounded to float32), NaN kept;
    arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        v = xf[i]
        yf[i] = v * _clamp(v * _SIXTH + np.float32(0.5), np.float32(0), np.float32(1))


@kernel(error_model="numpy")
def neg(x, out):
    """Neg: ``out = -x``; arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = -xf[i]


@kernel(error_model="numpy")
def absolute(x, out):
    """Abs: ``out = |x|``; arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = abs(xf[i])


@kernel(error_model="numpy")
def sqrt(x, out):
    """Sqrt: ``out = sqrt(x)`` correctly rounded (NaN for ``x < 0``); arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = np.sqrt(xf[i])


@kernel(error_model="numpy")
def reciprocal(x, out):
    """Reciprocal: ``out = 1 / x`` correctly rounded (``+-inf`` at ``+-0``); arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = np.float32(1) / xf[i]


@kernel(error_model="numpy")
def exp(x, out):
    """Exp: ``out = e^x`` (float64 :func:`exp64`, rounded once: 0 below -103.98, inf above 88.73); arrays as
    :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = np.float32(exp64(np.float64(xf[i])))


@kernel(error_model="numpy")
def sigmoid(x, out):
    """Sigmoid: ``out = 1 / (1 + e^-x)`` (float64, rounded once; never overflows); arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = np.float32(_sigmoid64(np.float64(xf[i])))


@kernel(error_model="numpy")
def quick_gelu(x, out, alpha):
    """QuickGelu: ``out = x sigmoid(alpha x)`` (float64 ``alpha``, computed in float64, rounded once); arrays as
    :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        v = np.float64(xf[i])
        yf[i] = np.float32(v * _sigmoid64(alpha * v))


@kernel(error_model="numpy")
def tanh(x, out):
    """Tanh: ``out = tanh x`` (float64 :func:`_tanh64`, rounded once); arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = np.float32(_tanh64(np.float64(xf[i])))


@kernel(error_model="numpy")
def erf(x, out):
    """Erf: ``out = erf x = 2 / sqrt(pi) int_0^x e^(-t^2) dt`` (the rational of :data:`ERF_P` in float64, rounded
    once); arrays as :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        yf[i] = np.float32(_erf64(np.float64(xf[i])))


def _gelu_intrinsic(biased: bool):
    """``run(x, b, out)``: ``out[j] = gelu(x[j] + b[j])`` (``b`` ignored unless ``biased``) for 1-D C-contiguous
    float32 arrays of x's length, 16 lanes at a time (:func:`gelu`'s formula), the last lanes masked."""

    @intrinsic
    def run(typingctx, x, b, out):
        if not all(is_array(t, types.float32, 1) for t in (x, b, out)):
            return None

        def codegen(context, builder, signature, args):
            x_ptr, b_ptr, y_ptr = (array_ptr(context, builder, t, v, _FLOAT) for t, v in zip(signature.args, args))
            n = builder.extract_value(context.make_array(signature.args[0])(context, builder, args[0]).shape, 0)
            load, store = masked(builder, "load", _V16F32), masked(builder, "store", _V16F32)
            zero = ir.Constant(_V16F32, None)

            def vector(at, mask):
                v = builder.call(load, [_at(builder, x_ptr, at), ir.Constant(I32, 4), mask, zero])
                if biased:
                    v = builder.fadd(v, builder.call(load, [_at(builder, b_ptr, at), ir.Constant(I32, 4), mask, zero]))
                half = builder.fmul(v, ir.Constant(_V16F32, [0.5] * 16))
                e = emit_erf(builder, builder.fmul(v, ir.Constant(_V16F32, [float(np.float32(_SQRT_HALF))] * 16)),
                             ERF_P, ERF_Q, ERF_CLAMP)
                builder.call(store, [fused_multiply_add(builder, half, e, half), _at(builder, y_ptr, at),
                                     ir.Constant(I32, 4), mask])

            every = ir.Constant(ir.VectorType(I1, 16), [True] * 16)

            def block(q, accs):
                vector(builder.mul(q, ir.Constant(I64, 16)), every)
                return []

            full = builder.sdiv(n, ir.Constant(I64, 16))
            emit_loop(builder, full, _V16F32, 0, block)
            rest = builder.sub(n, builder.mul(full, ir.Constant(I64, 16)))
            lanes = ir.Constant(ir.VectorType(I64, 16), list(range(16)))
            vector(builder.mul(full, ir.Constant(I64, 16)),
                   builder.icmp_signed("<", lanes, splat(builder, rest, ir.VectorType(I64, 16))))
            return context.get_dummy_value()

        return types.void(x, b, out), codegen

    return run


_gelu_plain, _gelu_biased = _gelu_intrinsic(False), _gelu_intrinsic(True)


def _at(builder: ir.IRBuilder, base: ir.Value, index: ir.Value) -> ir.Value:
    """``&base[index]`` as a pointer to 16 float32 lanes."""
    return builder.bitcast(builder.gep(base, [index]), _V16F32.as_pointer())


@kernel(error_model="numpy")
def gelu(x, out):
    """Gelu (exact form): ``out = x (1 + erf(x / sqrt 2)) / 2`` in float32, 16 lanes at a time: ``h = x / 2``,
    ``out = h erf(x sqrt(1/2)) + h`` (one rounding), erf by :func:`kernels.math_ir.emit_erf`; within
    ``2.5e-7 |x|`` plus an ulp of the exact value (tested); arrays as :func:`clip`."""
    _gelu_plain(x.reshape(x.size), x.reshape(x.size), out.reshape(x.size))


@kernel(error_model="numpy")
def bias_gelu(x, bias, out):
    """ONNX Runtime's BiasGelu: :func:`gelu` of ``x + bias`` (the sum rounded to float32 first), ``bias [C]``
    float32 along x's last axis (``x [..., C]``, ``out`` alike, C-contiguous)."""
    c = bias.size
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for r in range(x.size // c if c else 0):
        _gelu_biased(xf[r * c:(r + 1) * c], bias, yf[r * c:(r + 1) * c])


@kernel(error_model="numpy")
def gelu_tanh(x, out):
    """Gelu (tanh approximation): ``out = x (1 + tanh(z)) / 2``, ``z = sqrt(2 / pi) (x + 0.044715 x^3)``, computed
    as ``x sigmoid(2 z)`` (equal, without the cancellation of ``1 + tanh``) in float64, rounded once; arrays as
    :func:`clip`."""
    xf, yf = x.reshape(x.size), out.reshape(x.size)
    for i in range(x.size):
        v = np.float64(xf[i])
        yf[i] = np.float32(v * _sigmoid64(2.0 * _SQRT_2_PI * (v + 0.044715 * v * v * v)))


#: unary op name -> (kernel, names of its float32 parameters in call order)
UNARY = {"clip": (clip, ("lo", "hi")), "leaky_relu": (leaky_relu, ("alpha",)),
         "hard_sigmoid": (hard_sigmoid, ("alpha", "beta")), "hard_swish": (hard_swish, ()), "neg": (neg, ()),
         "abs": (absolute, ()), "sqrt": (sqrt, ()), "reciprocal": (reciprocal, ()), "exp": (exp, ()),
         "sigmoid": (sigmoid, ()), "quick_gelu": (quick_gelu, ("alpha",)), "tanh": (tanh, ()), "erf": (erf, ()),
         "gelu": (gelu, ()), "gelu_tanh": (gelu_tanh, ())}


def unary_split(entry: Entry, x: np.ndarray, out: np.ndarray) -> None:
    """Run :func:`unary_entry`'s ``entry`` on ``x`` and ``out`` (C-contiguous float32 of one size), their flat
    ranges split over ``kernels.threads`` when that pays (the ops are elementwise: any cut gives the same values)."""
    fn, params = entry.fn, entry.args[2:]
    xf, yf = x.reshape(-1), out.reshape(-1)
    threads.run_split(lambda i0, i1: fn(xf[i0:i1], yf[i0:i1], *params), xf.size, xf.size * US_PER_VALUE)


def bias_gelu_split(x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """:func:`bias_gelu` with x's rows split over ``kernels.threads`` when that pays; the arrays checked first
    (float32, C-contiguous, ``bias [C]`` along x's last axis, ``out`` x's shape)."""
    for name, a in (("x", x), ("bias", bias), ("out", out)):
        if not isinstance(a, np.ndarray) or a.dtype != F32 or not a.flags.c_contiguous:
            raise TypeError(f"{name}: expected a C-contiguous float32 numpy.ndarray, got "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
    if x.ndim < 1 or bias.shape != x.shape[-1:] or out.shape != x.shape or not out.flags.writeable:
        raise ValueError(f"bias, out: expected bias of shape {x.shape[-1:]} and a writeable out of shape {x.shape}, "
                         f"got {bias.shape} and {out.shape}")
    c = max(bias.size, 1)
    x2, y2 = x.reshape(-1, c), out.reshape(-1, c)
    threads.run_split(lambda r0, r1: bias_gelu(x2[r0:r1], bias, y2[r0:r1]), x2.shape[0], x.size * US_PER_VALUE)


def unary_entry(op: str, **params: float) -> Entry:
    """The entry ``fn(In(0), Out(0), *params)`` of unary ``op`` (a key of :data:`UNARY`) on float32 arrays of any
    one size; ``params`` (float32, QuickGelu's alpha float64) by name, e.g. ``unary_entry("clip", lo=0, hi=6)``."""
    if op not in UNARY:
        raise ValueError(f"op: expected one of {sorted(UNARY)}, got {op!r}")
    fn, names = UNARY[op]
    if set(params) != set(names):
        raise TypeError(f"op {op!r}: expected parameters {list(names)}, got {sorted(params)}")
    kind = np.float64 if op == "quick_gelu" else np.float32
    return Entry(fn, (In(0), Out(0), *(kind(params[n]) for n in names)))


# ---- binary ops with broadcasting ------------------------------------------------------------------------------------

ADD, SUB, MUL, DIV = 0, 1, 2, 3
_A, _B = In(0), In(1)  # binary_entry's operands by default: the call's inputs 0 and 1
BINARY_OPS = {"add": ADD, "sub": SUB, "mul": MUL, "div": DIV}


@kernel(inline="always")
def _apply(op, a, b):
    if op == ADD:
        return a + b
    if op == SUB:
        return a - b
    if op == MUL:
        return a * b
    return a / b


@kernel(inline="always")
def _rows(op, x, v, out, reverse, lo, hi):
    """The loop of :func:`binary_rows` for one ``op`` and order (inlined with them constant, so it vectorises)."""
    n, c = x.size, v.size
    xf, vf, yf = x.reshape(n), v.reshape(c), out.reshape(n)
    for r in range(n // c if c else 0):
        base = r * c
        for j in range(c):
            a, b = xf[base + j], vf[j]
            yf[base + j] = _clamp(_apply(op, b, a) if reverse else _apply(op, a, b), lo, hi)


@kernel(inline="always")
def _planes(op, x, v, out, inner, reverse, lo, hi):
    """The loop of :func:`binary_planes` for one ``op`` and order (inlined with them constant)."""
    n, c = x.size, v.size
    xf, vf, yf = x.reshape(n), v.reshape(c), out.reshape(n)
    for p in range(n // (c * inner) if c * inner else 0):
        for k in range(c):
            b, base = vf[k], (p * c + k) * inner
            for j in range(inner):
                a = xf[base + j]
                yf[base + j] = _clamp(_apply(op, b, a) if reverse else _apply(op, a, b), lo, hi)


@kernel(error_model="numpy")
def binary_rows(op, x, v, out, reverse, lo, hi):
    """``out[r, j] = clamp(x[r, j] OP v[j], lo, hi)`` (``v[j] OP x[r, j]`` when ``reverse``) over ``x`` viewed as
    rows of ``v.size``: the same shape (one row) or ``v`` along the last axes. OP: ``op`` of :data:`BINARY_OPS`
    (``+ - * /`` in float32); clamp keeps NaN (``lo, hi = -inf, inf``: none; ``0, inf``: a fused relu). ``x``,
    ``out``: C-contiguous float32 of ``x.size`` elements, a multiple of ``v.size``; ``v``: C-contiguous float32."""
    if op == ADD:
        _rows(ADD, x, v, out, False, lo, hi)
    elif op == MUL:
        _rows(MUL, x, v, out, False, lo, hi)
    elif op == SUB:
        if reverse:
            _rows(SUB, x, v, out, True, lo, hi)
        else:
            _rows(SUB, x, v, out, False, lo, hi)
    elif reverse:
        _rows(DIV, x, v, out, True, lo, hi)
    else:
        _rows(DIV, x, v, out, False, lo, hi)


@kernel(error_model="numpy")
def binary_planes(op, x, v, out, inner, reverse, lo, hi):
    """``out[p, k, j] = clamp(x[p, k, j] OP v[k], lo, hi)`` over ``x`` viewed as ``[-1, v.size, inner]``: a scalar
    (``v.size = 1``) or ``v`` along middle axes (axis 1 of NCHW: ``inner = H W``); the rest as :func:`binary_rows`.
    """
    if op == ADD:
        _planes(ADD, x, v, out, inner, False, lo, hi)
    elif op == MUL:
        _planes(MUL, x, v, out, inner, False, lo, hi)
    elif op == SUB:
        if reverse:
            _planes(SUB, x, v, out, inner, True, lo, hi)
        else:
            _planes(SUB, x, v, out, inner, False, lo, hi)
    elif reverse:
        _planes(DIV, x, v, out, inner, True, lo, hi)
    else:
        _planes(DIV, x, v, out, inner, False, lo, hi)


def _product(values) -> int:
    return int(np.prod(values, dtype=np.int64))


def binary_entry(op: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], a=_A, b=_B,
                 activation: str | None = None) -> Entry | None:
    """The entry of ``out = activation(a OP b)`` (NumPy broadcasting, float32) for operands of these shapes, or
    None for a broadcast it does not serve. One operand must have the result's size (the *full* one); the other
    is served when it is a scalar, the same, or varies along one run of axes ``[i, j)`` equal to the result's
    there and is 1 elsewhere (a channel vector ``[C]`` of the last axis, ``[1, C, 1, 1]`` of NCHW ...).

    ``a``, ``b``: what the entry passes for each operand, ``In(k)`` or a bound C-contiguous float32 array of its
    shape. ``op``: a key of :data:`BINARY_OPS`; ``activation``: None, ``"relu"`` or ``"relu6"``.
    """
    if op not in BINARY_OPS:
        raise ValueError(f"op: expected one of {sorted(BINARY_OPS)}, got {op!r}")
    bounds = {None: (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}
    if activation not in bounds:
        raise ValueError(f"activation: expected None, 'relu' or 'relu6', got {activation!r}")
    for name, x, shape in (("a", a, a_shape), ("b", b, b_shape)):
        if not isinstance(x, In) and _validate.array(name, x, (F32,), len(shape)).shape != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {x.shape}")
    shape = tuple(np.broadcast_shapes(a_shape, b_shape))
    size = _product(shape)
    if _product(a_shape) == size:
        full, other, other_shape, reverse = a, b, b_shape, False
    elif _product(b_shape) == size:
        full, other, other_shape, reverse = b, a, a_shape, True
    else:
        return None
    lo, hi = (np.float32(v) for v in bounds[activation])
    padded = (1,) * (len(shape) - len(other_shape)) + tuple(other_shape)
    varying = [i for i, d in enumerate(padded) if d != 1]
    if not varying:  # a scalar: planes of one channel, as many as a split needs
        rows = flat_rows(size)
        return Entry(binary_planes, (BINARY_OPS[op], full, other, Out(0), max(size // rows, 1), reverse, lo,
                                     hi)).split(rows, 1, 3)
    first, last = varying[0], varying[-1] + 1
    if padded[first:last] != shape[first:last]:
        return None
    inner = _product(shape[last:])
    if 0 < size == _product(other_shape):  # the same shape: both operands cut alike
        return Entry(binary_rows, (BINARY_OPS[op], full, other, Out(0), reverse, lo, hi)).split(flat_rows(size), 1,
                                                                                               2, 3)
    rows = max(size // max(_product(other_shape) * inner, 1), 1)  # of the full operand: each holds all of the other
    if inner == 1:
        return Entry(binary_rows, (BINARY_OPS[op], full, other, Out(0), reverse, lo, hi)).split(rows, 1, 3)
    return Entry(binary_planes, (BINARY_OPS[op], full, other, Out(0), inner, reverse, lo, hi)).split(rows, 1, 3)
