"""Public int8 matrix products: ``gemm_int8`` (exact int32) and ``linear_int8`` (fused layer).

Both validate every argument, bring the activations to the unsigned form the
micro-kernels multiply (int8 ``a`` becomes ``a + 128`` with its zero point moved
by 128; K is zero-padded to a multiple of 4), choose a variant through
``kernels.dispatch`` and split the output panels over ``kernels.threads``.

A :class:`LinearPlan` (``linear_int8_plan``, ``gemm_int8_plan``) does all of that but the product once; its
call checks the activations and makes one compiled call (``kernels.gemm.driver.LINEAR``), which
:meth:`LinearPlan.entry` also gives as a :class:`kernels.entry.Entry`. The one-shot functions keep their
plans on a packed weight (``PackedInt8.plans``), keyed by the call's dtypes and quantization arguments.
"""

from __future__ import annotations

import math
import numpy as np

from kernels import _validate, dispatch, epilogue, threads
from kernels._jit import kernel, machine_entry
from kernels.epilogue import Epilogue
from kernels.entry import Entry, In, Out
from kernels.gemm.driver import DRIVERS, LINEAR, unsigned_rows
from kernels.gemm.microkernels import TILES
from kernels.pack.panels import KGROUP, PANEL, PackedInt8, pack_int8
from kernels.pack.plans import value_key
from kernels.qtypes import QTYPES, qtype_of

INT32_MAX = 2**31 - 1
MIN_K_LIMIT = INT32_MAX // (255 * 255)  # no zero points can make the int32 bound smaller
ACTIVATIONS = {None: (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 6.0)}  # clamp, real units
OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int8))


def max_k_int32(a_dtype=np.uint8, a_zero_point: int = 0, b_zero_point=0) -> int:
    """Longest K for which ``gemm_int8`` cannot overflow its int32 output.

    ``|sum_k (a - za)(b - zb)| <= K * max|a - za| * max|b - zb|``, so the bound is
    ``(2**31 - 1) // (max|a - za| * max|b - zb|)``: 65793 for uint8 x int8 and
    131071 for int8 x int8 with zero zero points.
    """
    qa, qb = qtype_of(a_dtype), QTYPES["s8"]
    zb = np.asarray(b_zero_point, dtype=np.int64)
    a_dev = max(a_zero_point - qa.qmin, qa.qmax - a_zero_point)
    b_dev = int(np.max(np.maximum(zb - qb.qmin, qb.qmax - zb)))
    return INT32_MAX // max(1, a_dev * b_dev)


def _weights(w: object, name: str) -> PackedInt8:
    if isinstance(w, PackedInt8):
        return w
    return pack_int8(_validate.array(name, w, (np.int8,), 2))


def check_zero_point(name: str, value: object, dtype: np.dtype, n: int | None = None):
    """A zero point in the range of ``dtype``: an int, or with ``n`` an int64 ``[n]`` per-channel array."""
    q = qtype_of(dtype)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and q.qmin <= value <= q.qmax:
        return np.full(n, value, np.int64) if n else int(value)  # the common case, without NumPy checks
    if n is None and np.size(value) != 1:
        raise ValueError(f"{name}: expected a scalar, got shape {np.shape(value)}")
    v = _validate.per_channel(name, value, n or 1, np.int64)
    _validate.integer_in(name, v, q.qmin, q.qmax)
    return v if n else int(v[0])


def sum_bound(k: int, za: int, col_bias: np.ndarray | int) -> int:
    """A bound on every exact ``|sum_k (a - za) w + col_bias|`` of uint8 ``a`` and int8 ``w``."""
    return k * max(za, 255 - za) * 128 + epilogue.bias_bound(col_bias)


def fits_int32(k: int, za: int, col_bias: np.ndarray | int) -> bool:
    """Whether every exact result ``sum_k (a - za) w + col_bias`` of uint8 ``a`` and int8 ``w`` fits int32."""
    return sum_bound(k, za, col_bias) <= INT32_MAX


def register_epilogue(epi: Epilogue, k: int, za: int, col_bias: np.ndarray | int,
                      row_term: bool) -> Epilogue | None:
    """The epilogue that the VNNI tiles finish from their registers, or None when they cannot.

    They cannot with a row term (weight zero points), nor for a float or quantized
    output whose exact sums could overflow int32 (an int32 output wraps either way).
    Otherwise ``epi``, with integer codes where :func:`kernels.epilogue.with_codes` allows.
    """
    if row_term or (epi.mode != epilogue.INTEGER and not fits_int32(k, za, col_bias)):
        return None
    return epilogue.with_codes(epi, sum_bound(k, za, col_bias))


FLOAT_MAX = float(np.finfo(np.float64).max)
ROW_STATES = 16  # batch sizes a plan remembers the variant of (past this, it starts over)


def _finite(v: float) -> float:
    """``v`` with infinities as the largest float64: the same clamp of every finite value, and a bound that an
    entry's generated source can spell (``kernels.entry``)."""
    return min(max(float(v), -FLOAT_MAX), FLOAT_MAX)


class LinearPlan:
    """An int8 product prepared once: weights packed, zero-point and bias terms, epilogue; ``plan(a, out=None)``.

    Made by :func:`linear_int8_plan` (and, for one call, by :func:`gemm_int8` and
    :func:`linear_int8`). Everything that does not depend on the activations is
    derived here, so a call only checks ``a`` (dtype, K) and ``out`` and runs; M
    (the batch) may differ from call to call. :meth:`entry` gives the same call for
    one M as a :class:`kernels.entry.Entry`.
    """

    def __init__(self, packed: PackedInt8, a_dtype: np.dtype, a_zero_point: int, w_zp: np.ndarray, epi: Epilogue,
                 out_dtype: np.dtype):
        n, k = packed.n, packed.k
        self.packed, self.a_dtype, self.epi, self.out_dtype, self.w_zp = packed, np.dtype(a_dtype), epi, out_dtype, w_zp
        self._za = za = int(a_zero_point) + (128 if self.a_dtype == np.int8 else 0)  # int8 a runs as a + 128
        self.row_term = bool(w_zp.any())
        if za == 0 and not self.row_term and np.ndim(epi.col_bias) == 0 and epi.col_bias == 0:
            self.col_term = np.zeros(n, np.int64)  # uint8 activations without zero points: nothing to correct
        else:
            self.col_term = -za * packed.col_sums + k * za * w_zp + epi.col_bias
        fused = register_epilogue(epi, k, za, epi.col_bias, self.row_term)
        self.fused = fused is not None
        self.epi = fused or epi
        self.single = epilogue.single_table(self.epi, self.epi.mult)
        self.col_term32 = np.zeros(packed.n_panels * PANEL, np.int32)
        self.col_term32[:n] = self.col_term  # wraps modulo 2**32, as the int32 sums do
        epi = self.epi
        # what every call passes after (a, scratch, sums): see kernels.gemm.driver.LINEAR
        self._offset = 128 if self.a_dtype == np.int8 else 0
        self._bound = (packed.data, np.stack([self.col_term, np.broadcast_to(w_zp, (n,))]).astype(np.int64),
                       self.col_term32, np.stack([epi.mult, epi.shift]).astype(np.float64), self.single,
                       int(self.row_term), int(self.fused), _finite(epi.lo), _finite(epi.hi), epi.zp, epi.qmin,
                       epi.qmax)
        self._fixed = (self.a_dtype, k, n, out_dtype, self._offset, self._bound)
        self._rows: dict[int, tuple] = {}  # M -> (LINEAR kernel, variant, whether threads could pay)

    def _estimate(self, m: int, kind: str) -> float:
        """Single-thread time (us) of micro-kernel ``kind`` from compute (its measured ``ops_per_us``) and weight
        streaming (~20 GB/s)."""
        n, k = self.packed.n, self.packed.k
        return 2 * m * n * k / TILES[kind].ops_per_us + n * k / 20e3

    def _for_rows(self, m: int) -> tuple:
        """The kernel, the variant, whether threads could pay, and the kernel's machine entry for C-contiguous,
        writeable, aligned ``a`` and ``out`` (made by the first call that runs it), for M rows (remembered per M)."""
        state = self._rows.get(m)
        if state is None:
            n, k = self.packed.n, self.packed.k
            variant = dispatch.choose("gemm_int8", m, n, k)
            fn = LINEAR[variant.kind, self.epi.mode]
            state = [fn, variant, self._estimate(m, variant.kind) >= 2 * threads.MIN_US_PER_THREAD, None]
            if len(self._rows) >= ROW_STATES:
                self._rows.clear()
            self._rows[m] = state
        return state

    def entry(self, m: int) -> Entry:
        """``plan(a, out)`` for ``a [m, K]`` as one unchecked call on one thread: ``entry([a], [out])``.

        The inputs are ``a`` (C-contiguous ``[m, K]`` of the plan's dtype) and ``out`` (C-contiguous ``[m, N]`` of
        its output dtype), which the caller checks; the entry binds its own scratch (one caller at a time).
        """
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"m: expected a row count >= 0, got {m!r}")
        m = int(m)
        lda = -(-self.packed.k // KGROUP) * KGROUP
        copies = self._offset or lda != self.packed.k
        scratch = np.zeros(m * lda if copies else 0, np.uint8)
        sums = np.zeros(m if self.row_term else 0, np.int64)
        return Entry(self._for_rows(m)[0], (In(0), self._offset, scratch, sums, *self._bound, Out(0)))

    def __call__(self, a: np.ndarray, out: np.ndarray | None = None, bound: tuple | None = None) -> np.ndarray:
        """``linear(a)`` for activations ``a [M, K]`` of the prepared dtype; ``out [M, N]`` optional; ``bound``
        the plan's arguments for another activation scale and zero point (:meth:`requantized`)."""
        a_dtype, k, n, out_dtype, offset, own = self._fixed  # one lookup: this layer is most of a small call
        bound = own if bound is None else bound
        # exact: a and out have the types of the machine entry's arguments (see kernels._jit.machine_entry)
        exact = type(a) is np.ndarray and a.dtype is a_dtype and (flags := a.flags).c_contiguous
        if not exact:
            a = self._checked(a)
        shape = a.shape
        if len(shape) != 2 or shape[1] != k:
            self._checked(a)  # raises
        m = shape[0]
        state = self._rows.get(m) or self._for_rows(m)
        fn, variant, parallel, machine = state
        if out is None:
            out = np.empty((m, n), out_dtype)
        elif not (type(out) is np.ndarray and out.dtype is out_dtype and out.shape == (m, n)
                  and (out_flags := out.flags).c_contiguous and out_flags.writeable and out_flags.aligned):
            out = _validate.out(out, (m, n), out_dtype, a=a)
            exact = False
        else:  # the checks above, inline: only the overlap is left
            _validate.disjoint(out, "a", a)
        if parallel and threads.get_num_threads() > 1:
            self._threaded(a, variant, bound, out)
        elif exact and flags.writeable and flags.aligned:
            if machine is None:
                machine = state[3] = machine_entry(fn, (a, offset, _NO_BYTES, _NO_SUMS, *bound, out))
            machine(a, offset, _NO_BYTES, _NO_SUMS, *bound, out)  # the entry's call; scratch made inside
        else:
            fn(a, offset, _NO_BYTES, _NO_SUMS, *bound, out)
        return out

    def _checked(self, a: object) -> np.ndarray:
        a = _validate.array("a", a, (self.a_dtype,), 2)
        if a.shape[1] != self.packed.k:
            raise ValueError(f"a: expected K = {self.packed.k} columns to match w of shape {self.packed.shape}, "
                             f"got shape {a.shape}")
        return a

    def _threaded(self, a: np.ndarray, variant, bound: tuple, out: np.ndarray) -> None:
        """The product split over ``kernels.threads``: activations prepared once, then the driver per range."""
        packed = self.packed
        n = packed.n
        a_u8, lda, row_sums = unsigned_rows(a, self._offset, _NO_BYTES, _NO_SUMS, self.row_term)
        driver = DRIVERS[variant.kind, self.epi.mode]
        data, terms, col_term32, scales, single, row_term, fused, lo, hi, zp, qmin, qmax = bound

        def run(p0: int, p1: int, i0: int, i1: int) -> None:
            driver(a_u8, lda, n, data, packed.k_groups, p0, p1, i0, i1, terms[0], col_term32, terms[1], row_sums,
                   row_term, fused, scales[0], scales[1], single, lo, hi, zp, qmin, qmax, out)

        threads.run_tiled(run, packed.n_panels, a.shape[0], variant.rows, self._estimate(a.shape[0], variant.kind))

    def requantized(self, a_scale: np.float32, a_zero_point: int, w_scale: np.ndarray) -> tuple:
        """The plan's arguments (``plan(a, out, bound)``) for activations of another scale and zero point, as
        :func:`linear_int8_plan` would derive them for a float32 output: column terms ``-za sum_k w + K za zw +
        col_bias`` and multipliers ``float32(a_scale * w_scale)`` (``w_scale`` float32 ``[N]``, the plan's). For
        uint8 activations and K at most ``MIN_K_LIMIT``, whose int32 sums fit for every zero point, so the plan's
        choice of fused epilogue holds (``kernels.gemm.dynamic``)."""
        data, base, col_term32, scales, *rest = self._bound
        terms, col_term32, scales = base.copy(), col_term32.copy(), scales.copy()
        requantized_terms(np.float32(a_scale), a_zero_point - self._za, self.packed.k, self.packed.col_sums,
                          w_scale, base, terms, col_term32, scales)
        return (data, terms, col_term32, scales, *rest)


@kernel
def requantized_terms(a_scale, dz, k, col_sums, w_scale, base, terms, col_term32, scales):
    """Rows 0 of ``terms`` (int64 ``[2, N]``: column terms, weight zero points; row 1 as ``base``'s) and ``scales``
    (float64 ``[2, panels * 64]``: multipliers, shifts), and ``col_term32``: the plan's ``base`` terms with the
    activations' zero point moved by ``dz`` and their scale ``a_scale`` (float32)."""
    for c in range(col_sums.size):
        term = base[0, c] + dz * (k * base[1, c] - col_sums[c])
        terms[0, c] = term
        col_term32[c] = np.int32(term)  # wraps modulo 2**32, as the int32 sums do
        scales[0, c] = np.float64(a_scale * w_scale[c])


_NO_BYTES, _NO_SUMS = np.zeros(0, np.uint8), np.zeros(0, np.int64)  # scratch the kernels allocate themselves


def gemm_int8(a: np.ndarray, b: np.ndarray | PackedInt8, *, a_zero_point: int = 0,
              b_zero_point: int | np.ndarray = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Exact integer matrix product ``(a - a_zero_point) @ (b - b_zero_point).T`` in int32.

    ``out[m, n] = sum_k (a[m, k] - za) * (b[n, k] - zb[n])``; with the default zero
    points this is ``a @ b.T``. It is ONNX MatMulInteger with ``b`` transposed.

    Parameters
    ----------
    a : uint8 or int8 ndarray, shape (M, K), C-contiguous
        Activations.
    b : int8 ndarray, shape (N, K), C-contiguous, or PackedInt8
        Weights, one row per output channel; ``kernels.pack_int8(b)`` packs them
        once for repeated calls.
    a_zero_point : int, optional
        Subtracted from every activation; in the range of ``a``'s dtype.
    b_zero_point : int or int array of shape (N,), optional
        Subtracted from the weights, per tensor or per output channel.
    out : int32 ndarray, shape (M, N), C-contiguous, optional
        Written in place and returned.

    Returns
    -------
    int32 ndarray, shape (M, N)

    Raises
    ------
    TypeError
        For a wrong type or dtype.
    ValueError
        For a wrong rank, mismatched K, non-contiguous arrays, zero points out of
        range, or K past :func:`max_k_int32` (131071 for int8 x int8, 65793 for
        uint8 x int8 with zero zero points), beyond which an int32 result could
        overflow: use ``linear_int8``, which accumulates any K exactly.
    """
    if type(b) is PackedInt8 and type(a) is np.ndarray:  # a packed weight keeps its plans (kernels.pack.plans)
        key = ("gemm_int8", a.dtype, a_zero_point, b_zero_point)
        plan = _cached(b, key)
        if plan is None:
            plan = b.plans.put(_stored_key(key), _gemm_plan(a, b, a_zero_point, b_zero_point))
        return plan(a, out)
    return _gemm_plan(a, b, a_zero_point, b_zero_point)(a, out)


def _cached(packed: PackedInt8, key: tuple) -> LinearPlan | None:
    """The plan of ``packed`` stored under ``key`` (call arguments as they are), or None."""
    try:
        return packed.plans.get(key)
    except TypeError:  # an array argument: keyed by its contents
        return packed.plans.get(tuple(value_key(v) for v in key))


def _stored_key(key: tuple):
    """``key`` as the cache stores it: as it is when it hashes, else by contents (see :func:`_cached`)."""
    try:
        hash(key)
        return key
    except TypeError:
        return tuple(value_key(v) for v in key)


def gemm_int8_plan(b: np.ndarray | PackedInt8, *, a_dtype=np.uint8, a_zero_point: int = 0,
                   b_zero_point: int | np.ndarray = 0) -> LinearPlan:
    """:func:`gemm_int8` prepared once for activations of ``a_dtype`` (uint8 or int8): ``plan(a, out=None)`` for
    any M, and ``plan.entry(m)``, the same call for M rows as a :class:`kernels.entry.Entry` (input ``a``, output
    the int32 ``out``). Every argument is checked here, once, as :func:`gemm_int8` checks it."""
    a_dtype = np.dtype(a_dtype)
    if a_dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise TypeError(f"a_dtype: expected uint8 or int8, got {a_dtype}")
    packed = _weights(b, "b")
    k = packed.k
    za = check_zero_point("a_zero_point", a_zero_point, a_dtype)
    zb = check_zero_point("b_zero_point", b_zero_point, np.dtype(np.int8), packed.n)
    if k > MIN_K_LIMIT and k > (limit := max_k_int32(a_dtype, za, zb)):
        raise ValueError(
            f"a: K = {k} exceeds {limit}, the longest K for which the int32 result of {a_dtype} x int8 with "
            "these zero points cannot overflow; split K and add the parts in int64, or use linear_int8"
        )
    return LinearPlan(packed, a_dtype, za, zb, Epilogue(epilogue.INTEGER), np.dtype(np.int32))


def _gemm_plan(a: object, b: object, a_zero_point: object, b_zero_point: object) -> LinearPlan:
    """The plan of ``gemm_int8(a, b, ...)`` for ``a``'s dtype, ``a`` checked first (its errors come first)."""
    a = _validate.array("a", a, (np.uint8, np.int8), 2)
    packed = _weights(b, "b")
    if a.shape[1] != packed.k:
        raise ValueError(f"a: expected K = {packed.k} columns to match b of shape {packed.shape}, got shape {a.shape}")
    return gemm_int8_plan(packed, a_dtype=a.dtype, a_zero_point=a_zero_point, b_zero_point=b_zero_point)


def _positive(name: str, value: object, n: int) -> np.ndarray | float | np.floating:
    """A positive finite scale: a float scalar (kept in its own dtype) or a ``[n]`` array."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value > 0:
        # the common case, without NumPy calls; a Python float is a float64 (NumPy would treat it as weak and
        # form a_scale * w_scale in float32 with float32 w_scale, 1 ulp from the reference)
        return np.float64(value) if type(value) is float else value
    v = np.asarray(value)
    if v.dtype.kind != "f" and v.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected a float scalar or [{n}] array, got dtype {v.dtype}")
    if v.ndim == 1 and v.shape[0] == 1:
        v = v.reshape(())
    if v.ndim not in (0, 1) or (v.ndim == 1 and v.shape != (n,)):
        raise ValueError(f"{name}: expected a scalar or shape ({n},), got shape {v.shape}")
    if not (np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError(f"{name}: scales must be finite and positive")
    return v


def linear_int8(a: np.ndarray, w: np.ndarray | PackedInt8, *, a_scale: float, a_zero_point: int,
                w_scale: float | np.ndarray, w_zero_point: int | np.ndarray = 0, bias: np.ndarray | None = None,
                activation: str | None = None, out_dtype: type | np.dtype = np.float32,
                out_scale: float | None = None, out_zero_point: int | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Fused quantized linear layer: integer product, rescale, bias, activation, requantize.

    With ``acc[m, n] = sum_k (a[m, k] - a_zero_point) * (w[n, k] - w_zero_point[n])``
    (exact, any K) and ``s[n] = a_scale * w_scale[n]``::

        real[m, n] = act(acc[m, n] * s[n] + bias[n])                  out_dtype float32
        out[m, n]  = saturate(rint(real[m, n] / out_scale + out_zero_point))   uint8 / int8

    Rounding is half to even and saturation clips to the output type, as in ONNX
    QLinearMatMul. The multiplier ``a_scale * w_scale / out_scale`` is formed in the
    scales' own dtype (so float16 scales behave as ONNX's; a Python float is a
    float64), then applied in float64. Scales and a float bias must be finite, and
    so must the multiplier (else ``ValueError``); a float32 result beyond float32's
    range becomes +-inf, as the float32 conversion of the reference does.

    Parameters
    ----------
    a : uint8 or int8 ndarray, shape (M, K), C-contiguous
    w : int8 or uint8 ndarray, shape (N, K), or PackedInt8 (int8)
        Weights, one row per output channel. uint8 weights are shifted to int8
        together with their zero point, which changes nothing in the result.
    a_scale : positive float
    a_zero_point : int in the range of ``a``'s dtype
    w_scale : positive float, or float array of shape (N,) for per-channel scales
    w_zero_point : int or int array of shape (N,), in the range of ``w``'s dtype
    bias : float array of shape (N,) in real units, or int32 array of shape (N,)
        in accumulator units (``a_scale * w_scale`` per unit, as ONNX QLinearConv).
    activation : None, "relu", "relu6" or ("clip", lo, hi) in real units
    out_dtype : numpy.float32, numpy.uint8 or numpy.int8
    out_scale, out_zero_point : required scale (and optional zero point, default 0)
        of an integer output; not allowed for float output.
    out : ndarray of shape (M, N) and dtype ``out_dtype``, optional

    Returns
    -------
    ndarray, shape (M, N), dtype ``out_dtype``
    """
    if type(w) is PackedInt8 and type(a) is np.ndarray:  # a packed weight keeps its plans (kernels.pack.plans)
        # the scales' types matter (the multiplier is formed in their dtype), the zero points' do not
        key = (a.dtype, a_scale, type(a_scale), a_zero_point, w_scale, type(w_scale), w_zero_point, bias, activation,
               out_dtype, out_scale, type(out_scale), out_zero_point)
        try:
            plan = w.plans.get(key)
        except TypeError:  # an array argument: keyed by its contents
            plan = _cached(w, key)
        if plan is not None:
            return plan(a, out)
    cached = type(w) is PackedInt8 and type(a) is np.ndarray
    a = _validate.array("a", a, (np.uint8, np.int8), 2)
    plan = linear_int8_plan(w, a_dtype=a.dtype, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale,
                            w_zero_point=w_zero_point, bias=bias, activation=activation, out_dtype=out_dtype,
                            out_scale=out_scale, out_zero_point=out_zero_point)
    if cached:
        w.plans.put(_stored_key(key), plan)
    return plan(a, out)


def linear_int8_plan(w: np.ndarray | PackedInt8, *, a_dtype=np.uint8, a_scale: float, a_zero_point: int,
                     w_scale: float | np.ndarray, w_zero_point: int | np.ndarray = 0,
                     bias: np.ndarray | None = None, activation: str | tuple | None = None,
                     out_dtype: type | np.dtype = np.float32, out_scale: float | None = None,
                     out_zero_point: int | None = None) -> LinearPlan:
    """:func:`linear_int8` prepared once for activations of ``a_dtype``: ``plan(a, out=None)`` for any M.

    All arguments are checked here, once; a call then costs only the product.
    """
    a_dtype = np.dtype(a_dtype)
    if a_dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise TypeError(f"a_dtype: expected uint8 or int8, got {a_dtype}")
    if isinstance(w, np.ndarray) and w.dtype == np.uint8:
        w = _validate.array("w", w, (np.uint8,), 2)
        w_dtype = np.dtype(np.uint8)
        packed = pack_int8((w ^ 0x80).view(np.int8))
    else:
        w_dtype = np.dtype(np.int8)
        packed = _weights(w, "w")
    n = packed.n
    za = check_zero_point("a_zero_point", a_zero_point, a_dtype)
    zw = check_zero_point("w_zero_point", w_zero_point, w_dtype, n)
    if w_dtype == np.uint8:
        zw = zw - 128
    epi, out_dtype = fused_epilogue(n, a_scale, w_scale, bias, activation, out_dtype, out_scale, out_zero_point)
    return LinearPlan(packed, a_dtype, za, zw, epi, out_dtype)


def _activation_bounds(activation: object) -> tuple[float, float]:
    """The clamp, in real units, of ``None``, ``"relu"``, ``"relu6"`` or ``("clip", lo, hi)``."""
    if isinstance(activation, tuple) and len(activation) == 3 and activation[0] == "clip":
        lo, hi = (float(v) for v in activation[1:])
        if not lo < hi:
            raise ValueError(f"activation: a clip needs lo < hi, got {activation!r}")
        return lo, hi
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {list(ACTIVATIONS)} or ('clip', lo, hi), got {activation!r}")
    return ACTIVATIONS[activation]


def fused_epilogue(n: int, a_scale: object, w_scale: object, bias: object, activation: str | None, out_dtype: object,
                   out_scale: object, out_zero_point: object,
                   names: tuple[str, str, str] = ("a_scale", "out_scale", "out_zero_point"),
                   ) -> tuple[Epilogue, np.dtype]:
    """Check the quantization arguments of a fused layer over ``n`` output channels; return its epilogue.

    The arguments are those of :func:`linear_int8`; ``names`` are what the caller
    calls ``a_scale``, ``out_scale`` and ``out_zero_point`` in its errors (for
    ``kernels.qlinear_conv2d``: ``x_scale``, ``y_scale``, ``y_zero_point``). The
    result says how ``kernels.epilogue`` turns the exact accumulators into
    ``out_dtype`` values.
    """
    a_name, out_name, zp_name = names
    bounds = _activation_bounds(activation)
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype}")

    s_a = _positive(a_name, a_scale, n)
    s_w = _positive("w_scale", w_scale, n)
    if np.ndim(s_a):
        raise ValueError(f"{a_name}: expected a scalar, got shape {s_a.shape}")
    quantized = out_dtype != np.float32
    if quantized:
        if out_scale is None:
            raise ValueError(f"{out_name}: required for out_dtype {out_dtype}")
        s_out = _positive(out_name, out_scale, n)
        if np.ndim(s_out):
            raise ValueError(f"{out_name}: expected a scalar, got shape {s_out.shape}")
        zp = check_zero_point(zp_name, 0 if out_zero_point is None else out_zero_point, out_dtype)
        unit = float(s_out)
    else:
        if out_scale is not None or out_zero_point is not None:
            raise ValueError(f"{out_name}, {zp_name}: only for integer out_dtype (uint8 or int8)")
        zp, s_out, unit = 0, None, 1.0
    with np.errstate(over="ignore", under="ignore"):  # checked below
        mult = s_a * s_w if s_out is None else s_a * s_w / s_out
    if not (np.all(np.isfinite(mult)) and np.all(np.asarray(mult) > 0)):
        raise ValueError(f"{a_name}, w_scale{', ' + out_name if quantized else ''}: their product / quotient "
                         f"over- or underflows {np.result_type(mult)}; rescale them")
    padded = -(-n // PANEL) * PANEL  # the fused micro-kernels load whole panels
    mult = np.concatenate([np.broadcast_to(np.asarray(mult, np.float64), (n,)), np.zeros(padded - n)])

    col_bias, shift = 0, np.zeros(padded, np.float64)
    if bias is not None:
        b = np.asarray(bias)
        if b.shape != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {b.shape}")
        if b.dtype == np.int32:
            col_bias = b.astype(np.int64)
        elif b.dtype.kind == "f":
            if not np.all(np.isfinite(b)):
                raise ValueError(f"bias: {np.count_nonzero(~np.isfinite(b))} value(s) are NaN or infinite")
            shift[:n] = b.astype(np.float64) / unit
        else:
            raise TypeError(f"bias: expected float (real units) or int32 (accumulator units), got {b.dtype}")
    lo, hi = (bound / unit for bound in bounds)
    if quantized:
        q = qtype_of(out_dtype)
        lo, hi = epilogue.quantized_bounds(lo, hi, float(zp), float(q.qmin), float(q.qmax))
        epi = Epilogue(epilogue.QUANT, col_bias, mult, shift, lo, hi, float(zp), float(q.qmin), float(q.qmax))
    else:
        epi = Epilogue(epilogue.REAL, col_bias, mult, shift, lo, hi)
    return epi, out_dtype
