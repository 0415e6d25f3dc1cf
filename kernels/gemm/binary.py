"""Public binary products over sign bits packed by ``kernels.pack.bits`` (set bit = -1).

* :func:`gemm_binary`: the exact dot products of ±1 vectors, ``k - 2 popcount(a ^ b)``
  (int32), or fused with a per-channel multiplier and bias (float32);
* :func:`gemm_binary_to_bits`: the same dot products thresholded per channel and
  packed again as sign bits, the input of a following binary layer;
* :func:`gemm_binary_int8`: binary weights times int8 activations (int32).

Every function validates its arguments first, chooses a variant through
``kernels.dispatch`` (AVX-512 or portable) and splits the output over ``kernels.threads``.

Output transform (as larq compute engine's ``output_transform.h``): with ``x``,
``y`` in {-1, +1}^k and bits ``x_i = 1`` for -1, ``x_i y_i = 1 - 2 (x_i xor y_i)``,
so ``dot = sum_i x_i y_i = k - 2 popcount(x xor y)``. Padding bits are 0 in both
operands and add nothing, so only the true ``k`` enters. A batch norm
``gamma (dot - mu) / sigma + beta`` folds into ``multiplier = gamma / sigma`` and
``bias = beta - gamma mu / sigma``; its sign for the next binary layer is
``dot < mu - beta sigma / gamma`` when ``gamma > 0`` (flip the weight row's bits
when ``gamma < 0``), which is the ``thresholds`` argument.

Binary weights ``w = 1 - 2 bit`` times activations ``a``:
``sum_k a w = sum_k a - 2 sum_{bit set} a``. The kernels sum unsigned bytes
``u = a + 128``, so ``sum_{bit set} a = S - 128 popcount(w bits)`` with
``S = sum_{bit set} u``, and ``out = sum_k a + 256 popcount(bits) - 2 S``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kernels import _validate, dispatch, threads
from kernels._jit import machine_entry
from kernels.entry import Entry, In, Out
from kernels.gemm.binary_driver import BITS, INTEGER, POPCOUNT_DRIVERS, REAL, SIGN_DRIVERS, row_popcounts
from kernels.gemm.binary_tiles import POPCOUNT_TILES, SIGN_TILES
from kernels.pack.bits import WORD_BITS, check_padding_bits, word_count
from kernels.pack.plans import PlanCache

MAX_K = 2**31 - 1  # |dot| <= k must fit int32
MAX_K_INT8 = (2**31 - 1) // 128  # |sum a w| <= 128 k
L2_ROW_BYTES = 256 * 1024  # activation words of one row block (kept in L2)
# single-thread rates for the thread-split estimate: binary GOPS (popcount), GOPS (binary x int8)
RATE_OPS_PER_US = {"gemm_binary": 800e3, "gemm_binary_int8": 300e3}


def _bits(name: str, x: object) -> np.ndarray:
    return _validate.array(name, x, (np.uint64,), 2)


def _k(k: object, words: int, b_name: str, limit: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= limit:
        raise ValueError(f"k: expected 1 <= k <= {limit}, got {k}")
    if word_count(k) != words:
        raise ValueError(f"k: {k} bits need {word_count(k)} words of 64, but {b_name} has {words} words per row")
    return k


def _operands(a_bits: object, b_bits: object, k: object) -> tuple[np.ndarray, np.ndarray, int]:
    a = _bits("a_bits", a_bits)
    b = _bits("b_bits", b_bits)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a_bits: expected {b.shape[1]} words per row to match b_bits of shape {b.shape}, "
                         f"got shape {a.shape}")
    k = _k(k, b.shape[1], "b_bits", MAX_K)
    check_padding_bits("a_bits", a, k)
    check_padding_bits("b_bits", b, k)
    return a, b, k


def _per_channel(name: str, value: object, n: int, default: float) -> np.ndarray:
    if value is None:
        return np.full(n, default, np.float64)
    return _validate.per_channel(name, value, n, np.float64)


def _split(run: Callable[[int, int, int, int], None], op: str, m: int, n: int, k: int, rows: int,
           col_align: int) -> None:
    """Run ``run(i0, i1, j0, j1)`` over disjoint parts: column ranges (multiples of ``col_align``), else rows."""
    units = -(-n // col_align)
    threads.run_tiled(lambda u0, u1, i0, i1: run(i0, i1, u0 * col_align, min(n, u1 * col_align)),
                      units, m, rows, 2 * m * n * k / RATE_OPS_PER_US[op])


def _row_block(rows: int, row_bytes: int) -> int:
    return max(rows, L2_ROW_BYTES // max(1, row_bytes) // rows * rows)


_POPCOUNT_STATES: dict[tuple, tuple] = {}  # (M, N, words, k, mode) -> _popcount_state(...), a few hundred at most
_STATES_KEPT = 256


def _popcount_state(m: int, n: int, words: int, k: int, mode: int) -> tuple:
    """``(driver, row_block, tile, whether threads could pay)`` of a popcount product (remembered per shape)."""
    key = (m, n, words, k, mode)
    state = _POPCOUNT_STATES.get(key)
    if state is None:
        variant = dispatch.choose("gemm_binary", m, n, k)
        tile = POPCOUNT_TILES[variant.kind]
        parallel = 2 * m * n * k / RATE_OPS_PER_US["gemm_binary"] >= 2 * threads.MIN_US_PER_THREAD
        state = (POPCOUNT_DRIVERS[variant.kind, mode], _row_block(tile.rows, 8 * words), tile, parallel)
        if len(_POPCOUNT_STATES) >= _STATES_KEPT:
            _POPCOUNT_STATES.clear()
        _POPCOUNT_STATES[key] = state
    return state


def _popcount(a: np.ndarray, b: np.ndarray, k: int, mode: int, mult: np.ndarray, bias: np.ndarray,
              thr: np.ndarray, out: np.ndarray) -> np.ndarray:
    m, words = a.shape
    n = b.shape[0]
    driver, row_block, tile, parallel = _popcount_state(m, n, words, k, mode)
    if not parallel or threads.get_num_threads() == 1:
        driver(a, b, k, words, 0, m, 0, n, row_block, mult, bias, thr, out)  # the whole output, this thread
        return out

    def run(i0: int, i1: int, j0: int, j1: int) -> None:
        driver(a, b, k, words, i0, i1, j0, j1, row_block, mult, bias, thr, out)

    align = WORD_BITS if mode == BITS else tile.cols
    _split(run, "gemm_binary", m, n, k, tile.rows, align)
    return out


class PopcountPlan:
    """:func:`gemm_binary` prepared once for weights ``b_bits`` and ``m`` activation rows: ``plan(a_bits,
    out=None)`` and :meth:`entry`. The weights are read at every call (their padding bits checked once, here)."""

    def __init__(self, b_bits: object, k: object, m: object, multiplier=None, bias=None, out_dtype=None):
        b = _bits("b_bits", b_bits)
        self.k = _k(k, b.shape[1], "b_bits", MAX_K)
        check_padding_bits("b_bits", b, self.k)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"m: expected a row count >= 0, got {m!r}")
        self.b, self.m, n = b, int(m), b.shape[0]
        fused = multiplier is not None or bias is not None
        self.out_dtype = np.dtype(out_dtype if out_dtype is not None else (np.float32 if fused else np.int32))
        if self.out_dtype not in (np.dtype(np.int32), np.dtype(np.float32)):
            raise TypeError(f"out_dtype: expected int32 or float32, got {self.out_dtype}")
        if fused and self.out_dtype != np.float32:
            raise ValueError("out_dtype: multiplier and bias give float32 output, not int32")
        self.mode = INTEGER if self.out_dtype == np.int32 else REAL
        if self.mode == REAL:
            self.mult = _per_channel("multiplier", multiplier, n, 1.0)
            self.shift = _per_channel("bias", bias, n, 0.0)
        else:
            self.mult = self.shift = _NONE
        words = b.shape[1]
        driver, row_block, _, self._parallel = _popcount_state(self.m, n, words, self.k, self.mode)
        self._args = (self.b, self.k, words, 0, self.m, 0, n, row_block, self.mult, self.shift, _NO_THRESHOLDS)
        self._driver = driver
        self._machine = None  # the driver's machine entry (kernels._jit.machine_entry), made by the first call
        self._a_shape, self._shape = (self.m, words), (self.m, n)

    def entry(self) -> Entry:
        """``plan(a_bits, out)`` as one unchecked call on one thread: inputs ``a_bits [m, W]`` uint64 with zero
        padding bits, outputs ``out [m, N]`` of the output dtype, C-contiguous, checked by the caller."""
        return Entry(self._driver, (In(0), *self._args, Out(0)))

    def __call__(self, a_bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The dot products of ``a_bits [m, W]`` (uint64, zero padding bits) with the prepared weights."""
        a = a_bits
        # exact: a and out have the types of the machine entry's arguments (see kernels._jit.machine_entry)
        exact = (type(a) is np.ndarray and a.dtype is _U64 and (flags := a.flags).c_contiguous
                 and a.shape == self._a_shape)
        if not exact:
            a = _bits("a_bits", a)
            if a.shape != self._a_shape:
                raise ValueError(f"a_bits: expected shape {self._a_shape} (M as prepared, the words of b_bits), "
                                 f"got {a.shape}")
        if self.k % WORD_BITS:
            check_padding_bits("a_bits", a, self.k)
        if out is None:
            out = np.empty(self._shape, self.out_dtype)
        else:
            out = _validate.out(out, self._shape, self.out_dtype, a_bits=a)
            exact = exact and type(out) is np.ndarray and out.flags.aligned
        if self._parallel and threads.get_num_threads() > 1:
            return _popcount(a, self.b, self.k, self.mode, self.mult, self.shift, _NO_THRESHOLDS, out)
        if exact and flags.writeable and flags.aligned:
            if self._machine is None:
                self._machine = machine_entry(self._driver, (a, *self._args, out))
            self._machine(a, *self._args, out)
        else:
            self._driver(a, *self._args, out)
        return out


_U64 = np.dtype(np.uint64)


def gemm_binary_plan(b_bits: np.ndarray, k: int, m: int, *, multiplier=None, bias=None,
                     out_dtype=None) -> PopcountPlan:
    """:func:`gemm_binary` prepared once for the weights ``b_bits`` and ``m`` rows of activations:
    ``plan(a_bits, out=None)`` (the same values and errors; the weights are checked once, here), and
    ``plan.entry()``, the same call as a :class:`kernels.entry.Entry` (input ``a_bits [m, W]``, output
    ``out [m, N]``)."""
    return PopcountPlan(b_bits, k, m, multiplier, bias, out_dtype)


_NONE = np.zeros(1)
_NO_THRESHOLDS = np.zeros(1, np.int64)
# gemm_binary's one-shot plans, by the weights' id (a plan holds its weights, so the id stays theirs while
# it is kept); the weights are a plain array, which has no room for plans of its own
_ONE_SHOT = PlanCache(16)


def gemm_binary(a_bits: np.ndarray, b_bits: np.ndarray, k: int, *, multiplier=None, bias=None,
                out_dtype=None, out: np.ndarray | None = None) -> np.ndarray:
    """Dot products of ±1 vectors given as sign bits: ``out[m, n] = k - 2 popcount(a[m] xor b[n])``.

    Parameters
    ----------
    a_bits : uint64 ndarray, shape (M, W), C-contiguous
        Activations, ``kernels.pack_bits(x)`` of ``x [M, k]``.
    b_bits : uint64 ndarray, shape (N, W), C-contiguous
        Weights, one row per output channel, packed the same way.
    k : int
        Values per row, ``ceil(k / 64) == W``; the padding bits must be 0.
    multiplier, bias : float scalar or array of shape (N,), optional
        Per output channel: ``out = float32(dot * multiplier[n] + bias[n])``,
        computed in float64 (defaults 1 and 0). Either one makes the output float32.
    out_dtype : numpy.int32 or numpy.float32, optional
        int32 (exact ``dot``, the default) or float32 (the fused transform).
    out : ndarray of shape (M, N) and the output dtype, C-contiguous, optional

    Returns
    -------
    int32 or float32 ndarray, shape (M, N)
    """
    if multiplier is None and bias is None and type(b_bits) is np.ndarray and type(a_bits) is np.ndarray:
        key = (id(b_bits), b_bits.shape, a_bits.shape, k, out_dtype)
        plan = _ONE_SHOT.get(key)
        if plan is None or plan.b is not b_bits:
            a_bits = _bits("a_bits", a_bits)  # (its shape in the message, not as prepared)
            if a_bits.shape[1] != np.shape(b_bits)[-1]:
                _operands(a_bits, b_bits, k)  # raises
            plan = _ONE_SHOT.put(key, PopcountPlan(b_bits, k, a_bits.shape[0], None, None, out_dtype))
        return plan(a_bits, out)
    a, b, k = _operands(a_bits, b_bits, k)
    m, n = a.shape[0], b.shape[0]
    fused = multiplier is not None or bias is not None
    dtype = np.dtype(out_dtype if out_dtype is not None else (np.float32 if fused else np.int32))
    if dtype not in (np.dtype(np.int32), np.dtype(np.float32)):
        raise TypeError(f"out_dtype: expected int32 or float32, got {dtype}")
    if fused and dtype != np.float32:
        raise ValueError("out_dtype: multiplier and bias give float32 output, not int32")
    shape = (m, n)
    out = np.empty(shape, dtype) if out is None else _validate.out(out, shape, dtype, a_bits=a, b_bits=b)
    if dtype == np.int32:
        return _popcount(a, b, k, INTEGER, _NONE, _NONE, _NO_THRESHOLDS, out)
    mult = _per_channel("multiplier", multiplier, n, 1.0)
    shift = _per_channel("bias", bias, n, 0.0)
    return _popcount(a, b, k, REAL, mult, shift, _NO_THRESHOLDS, out)


def check_thresholds(value: object, n: int, k: int) -> np.ndarray:
    """Per-channel thresholds as int64: ``dot < t`` iff ``dot < ceil(t)`` for integer ``dot`` in [-k, k]."""
    t = np.asarray(value)
    if t.dtype.kind not in "iuf":
        raise TypeError(f"thresholds: expected a real scalar or [{n}] array, got dtype {t.dtype}")
    if t.dtype.kind == "f" and np.isnan(t).any():
        raise ValueError("thresholds: NaN is not a threshold")
    t = _validate.per_channel("thresholds", t, n, t.dtype)
    if t.dtype.kind == "f":
        t = np.ceil(t)
    return np.clip(t, -k - 1, k + 1).astype(np.int64)


def gemm_binary_to_bits(a_bits: np.ndarray, b_bits: np.ndarray, k: int, thresholds, *,
                        out: np.ndarray | None = None) -> np.ndarray:
    """Sign bits of ``dot - thresholds[n]`` for a following binary layer, packed as ``kernels.pack_bits`` does.

    ``dot[m, n] = k - 2 popcount(a[m] xor b[n])``; bit ``n % 64`` of ``out[m, n // 64]``
    is 1 (value -1) exactly when ``dot[m, n] < thresholds[n]``, and 0 (+1) when
    ``dot >= thresholds[n]``: ``pack_bits(dot - thresholds)``, with the same zero
    padding bits. Thresholds are per output channel (a scalar applies to all);
    real values compare exactly (``dot < t`` iff ``dot < ceil(t)``).

    Returns
    -------
    uint64 ndarray, shape (M, ceil(N / 64))
    """
    a, b, k = _operands(a_bits, b_bits, k)
    m, n = a.shape[0], b.shape[0]
    thr = check_thresholds(thresholds, n, k)
    shape = (m, word_count(n))
    out = np.zeros(shape, np.uint64) if out is None else _validate.out(out, shape, np.dtype(np.uint64), a_bits=a,
                                                                        b_bits=b)
    out[...] = 0
    return _popcount(a, b, k, BITS, _NONE, _NONE, thr, out)


def gemm_binary_int8(a: np.ndarray, b_bits: np.ndarray, k: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Binary weights times int8 activations, exact: ``out[m, n] = sum_k a[m, k] * w[n, k]``.

    ``w[n, k] = -1`` where bit ``k`` of ``b_bits[n]`` is set, else +1 (``kernels.pack_bits``).

    Parameters
    ----------
    a : int8 ndarray, shape (M, k), C-contiguous
    b_bits : uint64 ndarray, shape (N, ceil(k / 64)), C-contiguous, zero padding bits
    k : int, the columns of ``a`` (at most 16777215, so that the int32 result cannot overflow)
    out : int32 ndarray, shape (M, N), C-contiguous, optional

    Returns
    -------
    int32 ndarray, shape (M, N)
    """
    a = _validate.array("a", a, (np.int8,), 2)
    b = _bits("b_bits", b_bits)
    words = b.shape[1]
    k = _k(k, words, "b_bits", MAX_K_INT8)
    if a.shape[1] != k:
        raise ValueError(f"a: expected k = {k} columns, got shape {a.shape}")
    m, n = a.shape[0], b.shape[0]
    shape = (m, n)
    out = np.empty(shape, np.int32) if out is None else _validate.out(out, shape, np.dtype(np.int32), a=a, b_bits=b)
    lda = WORD_BITS * words
    padded = np.zeros((m, lda), np.uint8)
    padded[:, :k] = a.view(np.uint8) ^ 0x80  # u = a + 128; the padding stays 0 and its bits are 0
    row_term = a.sum(axis=1, dtype=np.int64)
    col_term = 256 * row_popcounts(b)
    variant = dispatch.choose("gemm_binary_int8", m, n, k)
    tile = SIGN_TILES[variant.kind]
    driver = SIGN_DRIVERS[variant.kind]
    flat = padded.reshape(-1)
    row_block = _row_block(tile.rows, lda)

    def run(i0: int, i1: int, j0: int, j1: int) -> None:
        driver(flat, lda, b, words, i0, i1, j0, j1, row_block, row_term, col_term, out)

    _split(run, "gemm_binary_int8", m, n, k, tile.rows, tile.cols)
    return out

