"""Fake quantization for training in any framework: NumPy forward and backward functions.

Every quantizer is a pair of pure functions, ``*_forward`` (quantize, then dequantize
back to floats) and ``*_backward`` (the gradient the training framework should use in
place of the true one, which is zero almost everywhere). Plug them into any autograd
system as a custom op: run ``forward`` in the forward pass, keep ``x``, and return
``backward(grad_out, x, ...)`` from the backward pass. The small classes at the end
hold that state for you, and ``get(name)`` builds one from a name::

    q = get("lsq", scheme=int8())            # or FakeQuantizer(int8(), method="lsq")
    y = q.forward(w)                         # fake-quantized weights
    grad_w = q.backward(grad_y)              # q.grad_step holds dL/d step

Forward values come from ``grid.quantize`` / ``grid.dequantize`` and so match
``QTensor`` storage exactly; this module adds only gradients.

References
----------
- Bengio et al. 2013, straight-through estimator: https://arxiv.org/abs/1308.3432
- Courbariaux et al. 2015, BinaryConnect (clipped STE of sign): https://arxiv.org/abs/1511.00363
- Rastegari et al. 2016, XNOR-Net (sign times mean |x|): https://arxiv.org/abs/1603.05279
- Li & Liu 2016, Ternary Weight Networks: https://arxiv.org/abs/1605.04711
- Esser et al. 2020, Learned Step Size Quantization (ICLR): https://arxiv.org/abs/1902.08153
- larq ``SteSign`` / ``SteTern`` / ``MagnitudeAwareSign`` (https://larq.dev): ``clip_value``.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from lowbit.quantization import grid
from lowbit.quantization import scheme as schemes
from lowbit.quantization.grid import QParams
from lowbit.quantization.scheme import QScheme

_BINARY_TENSOR = QScheme(1, grid="binary", name="sign")


# ---------------------------------------------------------------------------- checks

def _floats(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
    return x if x.dtype.kind == "f" else x.astype(np.float32)


def _grad(grad_out, x: np.ndarray) -> np.ndarray:
    grad_out = _floats("grad_out", grad_out)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out: expected the shape of x {x.shape}, got {grad_out.shape}")
    return grad_out


def _scheme(scheme, func: str, grids: tuple[str, ...]) -> QScheme:
    if not isinstance(scheme, QScheme):
        raise TypeError(f"scheme: {func} expected a QScheme, got {type(scheme).__name__}")
    if scheme.grid not in grids:
        raise ValueError(f"scheme: {func} needs grid {' or '.join(map(repr, grids))}, got {scheme.grid!r}")
    return scheme


def _params(params, x: np.ndarray, scheme: QScheme) -> QParams:
    if params is None:
        return grid.fit(x, scheme)
    if not isinstance(params, QParams):
        raise TypeError(f"params: expected a grid.QParams, got {type(params).__name__}")
    want = grid.param_shape(x.shape, scheme)
    if np.shape(params.scale) != want:
        raise ValueError(f"params: scale has shape {np.shape(params.scale)}, expected {want} for x {x.shape}")
    needs = {"uniform": "zero_point", "ternary": "threshold"}.get(scheme.grid)
    if needs and getattr(params, needs) is None:
        raise ValueError(f"params: grid {scheme.grid!r} needs params.{needs}, got None")
    return params


def _clip_value(clip_value) -> float | None:
    if clip_value is not None and not (np.isscalar(clip_value) and clip_value > 0):
        raise ValueError(f"clip_value: expected a positive number or None, got {clip_value!r}")
    return clip_value


def _inside(x: np.ndarray, clip_value: float | None) -> np.ndarray:
    return np.ones(x.shape, bool) if clip_value is None else np.abs(x) <= clip_value


# ---------------------------------------------------------------------------- any grid

def fake_quantize(x, scheme: QScheme, params: QParams | None = None, rng=None) -> np.ndarray:
    """Quantize and dequantize: ``x_hat = dequantize(quantize(x))`` in the dtype of ``x``.

    Forward (uniform grid, ONNX)::

        x_hat = (clip(rint(x / scale) + zp, qmin, qmax) - zp) * scale

    and ``scale * code`` / ``scale * table[code]`` on the other grids (see ``grid``).
    ``params`` default to ``grid.fit(x, scheme)``; ``rng`` serves stochastic rounding.
    The backward pass depends on the method: ``ste_backward``, ``lsq_backward``,
    ``sign_backward``, ``xnor_backward`` or ``ternary_backward``.
    """
    x = _floats("x", x)
    scheme = _scheme(scheme, "fake_quantize", schemes.GRIDS)
    params = _params(params, x, scheme)
    return grid.dequantize(grid.quantize(x, scheme, params, rng), scheme, params, dtype=x.dtype)


def representable_range(shape: tuple[int, ...], scheme: QScheme, params: QParams) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest value of the grid, broadcast over data of ``shape``:
    ``(qmin - zp) * scale, (qmax - zp) * scale`` (uniform) or ``scale * table[0], scale * table[-1]``."""
    scale = grid.expand(params.scale, shape, scheme)
    if scheme.table is not None:
        return scale * scheme.table[0], scale * scheme.table[-1]
    zero = grid.expand(params.zero_point, shape, scheme)
    return (scheme.qmin - zero) * scale, (scheme.qmax - zero) * scale


def ste_backward(grad_out, x, scheme: QScheme, params: QParams) -> np.ndarray:
    """Straight-through estimator with clipping (Bengio et al. 2013; TF ``fake_quant``).

    Forward: ``fake_quantize``. Backward: rounding counts as the identity and the clip
    keeps its derivative, so, with ``lo, hi = representable_range(...)`` per group::

        dL/dx = dL/dx_hat  if lo <= x <= hi  else 0

    Uniform, pow2 and codebook grids; binary and ternary grids have ``sign_backward``,
    ``xnor_backward`` and ``ternary_backward``.
    """
    x = _floats("x", x)
    grad_out = _grad(grad_out, x)
    scheme = _scheme(scheme, "ste_backward", ("uniform", "pow2", "codebook"))
    if params is None:
        raise ValueError("params: ste_backward needs the params used in the forward pass")
    lo, hi = representable_range(x.shape, scheme, _params(params, x, scheme))
    return np.where((x >= lo) & (x <= hi), grad_out, 0).astype(grad_out.dtype)


# ---------------------------------------------------------------------------- LSQ

def _lsq_setup(x, step, scheme: QScheme, zero_point, func: str):
    x = _floats("x", x)
    scheme = _scheme(scheme, func, ("uniform",))
    if scheme.rounding != "half_even":
        raise ValueError(f"scheme: {func} needs rounding 'half_even', got {scheme.rounding!r}")
    want = grid.param_shape(x.shape, scheme)
    step = _floats("step", step)
    if step.shape != want:
        raise ValueError(f"step: expected shape {want} for x {x.shape} with granularity "
                         f"{scheme.granularity!r}, got {step.shape}")
    if not np.all(np.isfinite(step) & (step > 0)):
        raise ValueError(f"step: every step must be positive and finite, got min {step.min()!r}")
    if zero_point is None:
        if not scheme.symmetric:
            raise ValueError("zero_point: required for an asymmetric scheme (LSQ learns only the step; "
                             "pass the fixed zero point, e.g. 0 for unsigned activations as in the paper)")
        zero_point = 0 if scheme.signed else (scheme.qmin + scheme.qmax + 1) // 2
    zero = np.asarray(zero_point)
    if zero.dtype.kind not in "iu":
        raise TypeError(f"zero_point: expected integers, got dtype {zero.dtype}")
    if zero.shape not in ((), want):
        raise ValueError(f"zero_point: expected a scalar or shape {want}, got {zero.shape}")
    if np.any((zero < scheme.qmin) | (zero > scheme.qmax)):
        raise ValueError(f"zero_point: must lie in [{scheme.qmin}, {scheme.qmax}]")
    return x, scheme, QParams(step, np.broadcast_to(zero, want).astype(np.int32))


def _positive_codes(scheme: QScheme, zero: np.ndarray) -> np.ndarray:
    """The paper's Q_P: codes above the zero point (or below it, if there are none above)."""
    return np.where(scheme.qmax > zero, scheme.qmax - zero, zero - scheme.qmin)


def lsq_init_step(x, scheme: QScheme, zero_point=None) -> np.ndarray:
    """The paper's initial step, ``s = 2 * mean|x| / sqrt(Q_P)`` per group (1 for all-zero groups)."""
    x = _floats("x", x)
    ones = np.ones(grid.param_shape(x.shape, scheme), np.float32)
    _, scheme, params = _lsq_setup(x, ones, scheme, zero_point, "lsq_init_step")
    step = 2 * grid.reduce(np.abs(x), scheme, np.nanmean) / np.sqrt(_positive_codes(scheme, params.zero_point))
    return np.where(step > 0, step, 1).astype(x.dtype)


def lsq_forward(x, step, scheme: QScheme, zero_point=None) -> np.ndarray:
    """Learned Step Size Quantization forward (Esser et al. 2020, eq. 1-2)::

        x_hat = (clip(rint(x / s) + zp, qmin, qmax) - zp) * s

    which, with ``zp = 0``, is the paper's ``round(clip(x / s, -Q_N, Q_P)) * s``.
    ``step`` has ``grid.param_shape(x.shape, scheme)`` (per tensor, channel or group);
    ``zero_point`` stays fixed: by default 0 (signed) or the middle of an unsigned
    range, and it must be given for an asymmetric scheme.
    """
    x, scheme, params = _lsq_setup(x, step, scheme, zero_point, "lsq_forward")
    return fake_quantize(x, scheme, params)


def lsq_backward(grad_out, x, step, scheme: QScheme, zero_point=None,
                 grad_scale: bool | float = True) -> tuple[np.ndarray, np.ndarray]:
    """LSQ gradients ``(dL/dx, dL/ds)`` (Esser et al. 2020, eq. 3-5).

    With ``v = x / s``, ``lo = qmin - zp`` and ``hi = qmax - zp`` (the paper's
    ``-Q_N`` and ``Q_P`` when ``zp = 0``), rounding passes gradients straight through::

        dx_hat/dx = 1 if lo < v < hi else 0
        dx_hat/ds = -v + rint(v)  if lo < v < hi
                    lo            if v <= lo
                    hi            if v >= hi

    ``dL/ds`` sums ``dL/dx_hat * dx_hat/ds`` over the elements sharing each step and is
    multiplied by the gradient scale ``g = 1 / sqrt(N * Q_P)`` (N elements per step,
    ``Q_P = qmax - zp``). ``grad_scale``: True for that g, False for none, or a number
    to use as g (e.g. the paper's ``1 / sqrt(N_F * Q_P)`` with N_F features per example
    when ``x`` holds a batch of activations).
    """
    x, scheme, params = _lsq_setup(x, step, scheme, zero_point, "lsq_backward")
    grad_out = _grad(grad_out, x)
    scale = grid.expand(params.scale, x.shape, scheme).astype(x.dtype)
    zero = grid.expand(params.zero_point, x.shape, scheme)
    lo, hi = scheme.qmin - zero, scheme.qmax - zero
    v = x / scale  # as grid.quantize divides
    inside = (v > lo) & (v < hi)
    dstep = np.where(inside, np.rint(v) - v, np.where(v <= lo, lo, hi))
    grad_x = np.where(inside, grad_out, 0).astype(grad_out.dtype)
    grad_step = grid.reduce((grad_out * dstep).astype(np.float64), scheme, np.nansum)
    if isinstance(grad_scale, (bool, np.bool_)):
        if grad_scale:
            count = grid.reduce(np.ones(x.shape), scheme, np.nansum)
            grad_step = grad_step / np.sqrt(count * _positive_codes(scheme, params.zero_point))
    else:
        if not (np.isscalar(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale: expected True, False or a positive number, got {grad_scale!r}")
        grad_step = grad_step * grad_scale
    return grad_x, np.asarray(grad_step).astype(params.scale.dtype)


# ---------------------------------------------------------------------------- binary

def sign_forward(x, scale=None) -> np.ndarray:
    """Binarize: ``q(x) = scale * (-1 if x < 0 else +1)``; 0 maps to +1 (BinaryConnect).

    ``scale`` (default 1) is a number or an array broadcastable to ``x``.
    """
    x = _floats("x", x)
    codes = grid.quantize(x, _BINARY_TENSOR, QParams(np.float32(1)))
    return (codes * (1 if scale is None else np.asarray(scale))).astype(x.dtype)


def sign_backward(grad_out, x, clip_value: float | None = 1.0, scale=None) -> np.ndarray:
    """Clipped straight-through gradient of the sign (BinaryConnect; larq ``SteSign``)::

        dL/dx = scale * dL/dq  if |x| <= clip_value  else 0

    ``clip_value=None`` passes every gradient; ``scale`` is the one given to ``sign_forward``.
    """
    x = _floats("x", x)
    grad_out = _grad(grad_out, x)
    grad = np.where(_inside(x, _clip_value(clip_value)), grad_out, 0)
    return (grad * (1 if scale is None else np.asarray(scale))).astype(grad_out.dtype)


def xnor_forward(x, scheme: QScheme, params: QParams | None = None) -> np.ndarray:
    """XNOR-Net binary weights: ``x_hat = alpha * sign(x)``, ``alpha = mean |x|`` per group
    of a binary ``scheme`` (``grid.fit``; e.g. ``scheme.binary()`` for output channels)."""
    return fake_quantize(x, _scheme(scheme, "xnor_forward", ("binary",)), params)


def xnor_backward(grad_out, x, scheme: QScheme, params: QParams | None = None,
                  clip_value: float | None = 1.0, through_scale: bool = False) -> np.ndarray:
    """Gradient of ``alpha * sign(x)`` (Rastegari et al. 2016; larq ``MagnitudeAwareSign``).

    With ``alpha`` held constant (default, as larq)::

        dL/dx_i = alpha * dL/dx_hat_i * [|x_i| <= clip_value]

    With ``through_scale=True`` the chain rule also runs through ``alpha = mean_G |x|``
    over the n elements of the group G of i::

        dL/dx_i += sign(x_i) / n * sum_{j in G} dL/dx_hat_j * sign(x_j)

    (the paper writes the simplified ``dL/dx_hat_i * (1/n + alpha * [|x_i| <= 1])``).
    """
    x = _floats("x", x)
    grad_out = _grad(grad_out, x)
    scheme = _scheme(scheme, "xnor_backward", ("binary",))
    params = _params(params, x, scheme)
    alpha = grid.expand(params.scale, x.shape, scheme)
    grad = np.where(_inside(x, _clip_value(clip_value)), grad_out, 0) * alpha
    if through_scale:
        signs = sign_forward(x)
        count = grid.reduce(np.ones(x.shape), scheme, np.nansum)
        total = grid.reduce((grad_out * signs).astype(np.float64), scheme, np.nansum) / count
        grad = grad + signs * grid.expand(total, x.shape, scheme)
    return grad.astype(grad_out.dtype)


# ---------------------------------------------------------------------------- ternary

def ternary_forward(x, scheme: QScheme, params: QParams | None = None) -> np.ndarray:
    """Ternary Weight Networks (Li & Liu 2016) per group of a ternary ``scheme``::

        delta = 0.7 * mean |x|,    alpha = mean { |x| : |x| > delta },
        x_hat = alpha * sign(x) * [|x| > delta]

    (``grid.fit`` / ``grid.quantize``; pass ``params`` to reuse a fit).
    """
    return fake_quantize(x, _scheme(scheme, "ternary_forward", ("ternary",)), params)


def ternary_backward(grad_out, x, clip_value: float | None = None) -> np.ndarray:
    """Straight-through gradient of ternarization (TWN; larq ``SteTern``)::

        dL/dx = dL/dx_hat  if |x| <= clip_value  else 0

    ``clip_value=None`` (default, as in TWN) passes every gradient unchanged.
    """
    x = _floats("x", x)
    grad_out = _grad(grad_out, x)
    return np.where(_inside(x, _clip_value(clip_value)), grad_out, 0).astype(grad_out.dtype)


# ---------------------------------------------------------------------------- classes

class _Quantizer:
    """``forward(x)`` keeps ``x``, so that ``backward(grad_out)`` needs only the gradient."""

    precision: int = 32
    _x: np.ndarray | None = None

    def forward(self, x) -> np.ndarray:
        self._x = _floats("x", x)
        return self._forward(self._x)

    def backward(self, grad_out) -> np.ndarray:
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first")
        return self._backward(grad_out, self._x)

    __call__ = forward


class FakeQuantizer(_Quantizer):
    """A uniform (or pow2 / codebook) fake quantizer trained by STE or LSQ.

    method "ste": params are ``params`` if given, else fitted to every input
    (``fake_quantize`` / ``ste_backward``). method "lsq": the learned ``step`` starts at
    ``step`` or ``lsq_init_step`` of the first input; ``backward`` leaves ``dL/d step``
    in ``grad_step`` for your optimizer, which updates ``step`` in place or reassigns it.
    """

    def __init__(self, scheme: QScheme | None = None, method: str = "ste", *, params: QParams | None = None,
                 step=None, zero_point=None, grad_scale: bool | float = True):
        if method not in ("ste", "lsq"):
            raise ValueError(f"method: expected one of ['ste', 'lsq'], got {method!r}")
        self.scheme = schemes.int8() if scheme is None else scheme
        _scheme(self.scheme, f"FakeQuantizer(method={method!r})",
                ("uniform",) if method == "lsq" else ("uniform", "pow2", "codebook"))
        self.method, self.params, self.step, self.zero_point, self.grad_scale = \
            method, params, step, zero_point, grad_scale
        self.precision, self.grad_step, self._fitted = self.scheme.bits, None, None

    def _forward(self, x):
        if self.method == "lsq":
            if self.step is None:
                self.step = lsq_init_step(x, self.scheme, self.zero_point)
            return lsq_forward(x, self.step, self.scheme, self.zero_point)
        self._fitted = _params(self.params, x, self.scheme)
        return fake_quantize(x, self.scheme, self._fitted)

    def _backward(self, grad_out, x):
        if self.method == "ste":
            return ste_backward(grad_out, x, self.scheme, self._fitted)
        grad_x, self.grad_step = lsq_backward(grad_out, x, self.step, self.scheme, self.zero_point, self.grad_scale)
        return grad_x


class SignQuantizer(_Quantizer):
    """``sign_forward`` / ``sign_backward`` (larq ``SteSign``)."""

    precision = 1

    def __init__(self, clip_value: float | None = 1.0):
        self.clip_value = _clip_value(clip_value)

    def _forward(self, x):
        return sign_forward(x)

    def _backward(self, grad_out, x):
        return sign_backward(grad_out, x, self.clip_value)


class XnorQuantizer(_Quantizer):
    """``xnor_forward`` / ``xnor_backward``: mean |x| per group (default ``scheme.binary()``) times sign."""

    precision = 1

    def __init__(self, scheme: QScheme | None = None, clip_value: float | None = 1.0, through_scale: bool = False):
        self.scheme = _scheme(schemes.binary() if scheme is None else scheme, "XnorQuantizer", ("binary",))
        self.clip_value, self.through_scale = _clip_value(clip_value), through_scale

    def _forward(self, x):
        return xnor_forward(x, self.scheme)

    def _backward(self, grad_out, x):
        return xnor_backward(grad_out, x, self.scheme, None, self.clip_value, self.through_scale)


class TernaryQuantizer(_Quantizer):
    """``ternary_forward`` / ``ternary_backward`` (TWN; default ``scheme.ternary()``)."""

    precision = 2

    def __init__(self, scheme: QScheme | None = None, clip_value: float | None = None):
        self.scheme = _scheme(schemes.ternary() if scheme is None else scheme, "TernaryQuantizer", ("ternary",))
        self.clip_value = _clip_value(clip_value)

    def _forward(self, x):
        return ternary_forward(x, self.scheme)

    def _backward(self, grad_out, x):
        return ternary_backward(grad_out, x, self.clip_value)


QUANTIZERS = {
    "ste": partial(FakeQuantizer, method="ste"),
    "lsq": partial(FakeQuantizer, method="lsq"),
    "ste_sign": SignQuantizer,
    "xnor": XnorQuantizer,
    "twn": TernaryQuantizer,
}


def get(identifier, **kwargs) -> _Quantizer:
    """A quantizer from a name in ``QUANTIZERS`` (``kwargs`` go to its class), or one returned as is."""
    if isinstance(identifier, _Quantizer):
        return identifier
    if isinstance(identifier, str) and identifier in QUANTIZERS:
        return QUANTIZERS[identifier](**kwargs)
    raise ValueError(f"quantizer: expected one of {list(QUANTIZERS)} or a quantizer, got {identifier!r}")
