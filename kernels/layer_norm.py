"""Layer normalization over the last axis, in float32, one pass of compiled code per row: LayerNorm, RMSNorm, and
both with a residual input added first (ONNX Runtime's SkipLayerNormalization).

For a row ``x`` of ``D`` values::

    h    = x (+ skip) (+ bias)                                     the residual sum (optionally written out)
    mean = sum(h) / D                                              (0 for RMSNorm)
    inv  = 1 / sqrt(sum((h - mean)^2) / D + epsilon)
    y    = (h - mean) * inv * gamma (+ beta)

The mean is subtracted before squaring, so a mean far larger than the spread loses nothing. Sums are float32,
accumulated in 16 lanes (:mod:`kernels.lanes`), so ``mean`` and ``inv`` are within about ``D * 2^-24`` relative of
the exact float64 values, and ``y`` within ``4e-6 * (1 + |mean| inv)
|gamma|`` absolute of them; the tests hold every row to that against a float64 NumPy oracle.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels._jit import kernel
from kernels.entry import Entry, In, Out
from kernels.lanes import lane_squares, lane_sum

F32 = np.dtype(np.float32)
_NONE = np.zeros(0, np.float32)  # an absent optional operand


@kernel
def _layer_norm_rows(x, skip, bias, gamma, beta, epsilon, centred, sums, means, invs, out):
    """Every row of ``x [R, D]`` (C-contiguous float32, as ``skip``; ``bias``, ``gamma``, ``beta`` ``[D]``; absent
    operands and outputs empty): ``out [R, D]`` by the module's formula; ``sums [R, D]`` gets ``h``, ``means``
    and ``invs`` ``[R]`` the row statistics, where given."""
    rows, d = x.shape
    with_skip, with_bias, with_beta = skip.size > 0, bias.size > 0, beta.size > 0
    scale = np.float32(1.0 / d)
    for r in range(rows):
        y = out[r]
        if with_skip:
            xr, sr = x[r], skip[r]
            for j in range(d):
                y[j] = xr[j] + sr[j]
            if with_bias:
                for j in range(d):
                    y[j] += bias[j]
            h = y
            if sums.size > 0:
                sums[r, :] = y
        else:
            h = x[r]
        mean = lane_sum(h) * scale if centred else np.float32(0.0)
        squares = lane_squares(h, mean)
        inv = np.float32(1.0) / np.sqrt(squares * scale + np.float32(epsilon))
        if with_beta:
            for j in range(d):
                y[j] = (h[j] - mean) * inv * gamma[j] + beta[j]
        else:
            for j in range(d):
                y[j] = (h[j] - mean) * inv * gamma[j]
        if means.size > 0:
            means[r] = mean
        if invs.size > 0:
            invs[r] = inv


@kernel
def _layer_norm_all(x, skip, bias, gamma, beta, epsilon, centred, sums, means, invs, out):
    """:func:`_layer_norm_rows` over C-contiguous arrays of any rank, normalized over their last axis (``skip``,
    ``sums`` x's shape or empty; ``means``, ``invs`` of ``x.size / D`` elements or empty)."""
    d = gamma.size
    rows = x.size // max(d, 1)
    _layer_norm_rows(x.reshape((rows, d)), skip.reshape((skip.size // max(d, 1), d)), bias, gamma, beta, epsilon,
                     centred, sums.reshape((sums.size // max(d, 1), d)), means.reshape(means.size),
                     invs.reshape(invs.size), out.reshape((rows, d)))


def _vector(name: str, value: object, d: int) -> np.ndarray:
    if value is None:
        return _NONE
    return np.ascontiguousarray(_validate.per_channel(name, value, d, np.float32))


class LayerNormPlan:
    """:func:`layer_norm` prepared for inputs of one shape and fixed ``gamma``, ``beta``, ``bias``: ``plan(x,
    skip=None)`` and :meth:`entry`. Made by :func:`layer_norm_plan`."""

    def __init__(self, shape: tuple[int, ...], gamma, beta, bias, epsilon: float, rms: bool, skip: bool):
        shape = tuple(int(s) for s in shape)
        if not shape or shape[-1] < 1:
            raise ValueError(f"shape: expected at least one axis, the last non-empty, got {shape}")
        d = shape[-1]
        self.shape, self.skip, self.rms = shape, bool(skip), bool(rms)
        if gamma is None:
            raise TypeError(f"gamma: expected {d} float values, got None")
        self.gamma = _vector("gamma", gamma, d)
        self.beta, self.bias = _vector("beta", beta, d), _vector("bias", bias, d)
        if self.bias.size and not self.skip:
            raise ValueError("bias: only with skip (the residual's bias, added before normalizing)")
        self.epsilon = float(epsilon)
        if not np.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon: expected a finite value >= 0, got {epsilon!r}")

    def entry(self, outputs: tuple[str, ...] = ("y",)) -> Entry:
        """The normalization as one unchecked call: inputs ``x`` (and ``skip`` when prepared with one), outputs
        named by ``outputs`` in order: ``"y"`` (required), ``"mean"`` and ``"inv"`` (``x.size / D`` float32 each),
        ``"sum"`` (``h``, x's shape); all C-contiguous float32 of those shapes (checked by the caller)."""
        unknown = set(outputs) - {"y", "mean", "inv", "sum"}
        if "y" not in outputs or unknown or len(set(outputs)) != len(outputs):
            raise ValueError(f"outputs: expected distinct names among y, mean, inv, sum, y included; got {outputs}")
        out = {name: Out(k) for k, name in enumerate(outputs)}
        entry = Entry(_layer_norm_all, (In(0), In(1) if self.skip else _NONE, self.bias, self.gamma, self.beta,
                                        self.epsilon, not self.rms, out.get("sum", _NONE), out.get("mean", _NONE),
                                        out.get("inv", _NONE), out["y"]))
        cut = [0, 1] if self.skip else [0]  # x (and skip), then the outputs given
        cut += [position for position, name in ((7, "sum"), (8, "mean"), (9, "inv"), (10, "y")) if name in out]
        return entry.split(int(np.prod(self.shape[:-1], dtype=np.int64)), *cut)

    def __call__(self, x: np.ndarray, skip: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        x = _validate.float32_input("x", x, self.shape)
        if self.skip != (skip is not None):
            raise ValueError("skip: " + ("expected the residual input (prepared with skip=True)" if self.skip else
                                         "not expected (prepared with skip=False)"))
        skip = _NONE if skip is None else _validate.float32_input("skip", skip, self.shape)
        out = np.empty(self.shape, F32) if out is None else _validate.out(out, self.shape, F32)
        _layer_norm_all(x, skip, self.bias, self.gamma, self.beta, self.epsilon, not self.rms, _NONE, _NONE, _NONE,
                        out)
        return out


def _float32(name: str, value: object) -> np.ndarray:
    """``value``, a float32 ndarray of at least one axis, C-contiguous (a strided one copied once)."""
    if not isinstance(value, np.ndarray) or value.dtype != F32:
        raise TypeError(f"{name}: expected a float32 numpy.ndarray, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.ndim == 0:
        raise ValueError(f"{name}: expected at least one axis, got a 0-d array")
    return np.ascontiguousarray(value)


def layer_norm_plan(shape: tuple[int, ...], gamma: np.ndarray, beta: np.ndarray | None = None, *,
                    epsilon: float = 1e-5, skip: bool = False, bias: np.ndarray | None = None,
                    rms: bool = False) -> LayerNormPlan:
    """:func:`layer_norm` prepared for float32 inputs of ``shape`` (and a ``skip`` input of the same shape when
    ``skip``): ``plan(x, skip=None, out=None)`` and ``plan.entry()``."""
    return LayerNormPlan(shape, gamma, beta, bias, epsilon, rms, skip)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None, *, epsilon: float = 1e-5,
               skip: np.ndarray | None = None, bias: np.ndarray | None = None, rms: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
    """Layer normalization of float32 ``x`` over its last axis (formula and error bound in the module docstring).

    Parameters
    ----------
    x : float32 ndarray [..., D]
    gamma, beta : D float values (the scale, and an optional shift)
    epsilon : float >= 0, added to the variance
    skip : float32 ndarray of x's shape, optional: the residual, ``h = x + skip (+ bias)`` is normalized
    bias : D float values, optional, only with ``skip``
    rms : normalize by the root mean square, without centring (RMSNorm; ``mean = 0``)
    out : float32 C-contiguous ndarray of x's shape, optional

    Returns float32 ndarray of x's shape (``out`` if given).
    """
    x = _float32("x", x)
    return layer_norm_plan(x.shape, gamma, beta, epsilon=epsilon, skip=skip is not None, bias=bias, rms=rms)(
        x, skip, out)
