"""Weight quantization techniques that use calibration activations.

A linear layer computes ``y = x @ W.T + b`` with ``W`` of shape ``[N_out, K_in]``
(one row per output channel) and activations ``x`` of shape ``[batch, K_in]``.
Round-to-nearest (RTN, ``lowbit.quantize(W, scheme)``) minimises the error of each
weight on its own; the functions here aim at the layer's *output* instead.

``bias_correction``   removes the mean output shift of the weight error
                      (Nagel et al. 2019, "Data-Free Quantization Through Weight
                      Equalization and Bias Correction").
``smoothquant_scales``, ``apply_smoothing``
                      move activation outliers into the weights with an exact
                      per-input-channel rescaling (Xiao et al. 2023, "SmoothQuant:
                      Accurate and Efficient Post-Training Quantization for LLMs").
``gptq``              quantizes one input column at a time and spreads each
                      column's error over the columns not yet quantized, weighted
                      by the inverse Hessian of the output error (Frantar et al.
                      2022, "GPTQ: Accurate Post-Training Quantization for
                      Generative Pre-trained Transformers").
``awq``               searches a per-input-channel scale ``s = mean|x_j| ** a`` that
                      protects the weights of salient input channels (Lin et al.
                      2023, "AWQ: Activation-aware Weight Quantization for LLM
                      Compression and Acceleration").

``gptq`` and ``awq`` take uniform grids only (int8, int4 / int2, symmetric or
asymmetric, any granularity) and return a :class:`lowbit.QTensor`.
"""

from __future__ import annotations

import numpy as np

from lowbit.qtensor import QTensor, quantize
from lowbit.quantization import grid
from lowbit.quantization.scheme import QScheme, get

__all__ = ["apply_smoothing", "awq", "bias_correction", "gptq", "smoothquant_scales"]


# ----------------------------------------------------------------------------- validation

def _matrix(a, name: str) -> np.ndarray:
    a = np.asarray(a.dequantize() if isinstance(a, QTensor) else a)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {a.shape}")
    if a.dtype.kind not in "fiu" or not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite real values")
    return a.astype(np.float64)


def _vector(v, name: str, length: int, *, positive: bool = False, nonnegative: bool = False) -> np.ndarray:
    v = np.asarray(v)
    if v.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {v.shape}")
    if v.dtype.kind not in "fiu" or not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: expected finite real values")
    v = v.astype(np.float64)
    if positive and np.any(v <= 0):
        raise ValueError(f"{name}: expected positive values")
    if nonnegative and np.any(v < 0):
        raise ValueError(f"{name}: expected non-negative values")
    return v


def _activations(X, W: np.ndarray) -> np.ndarray:
    X = _matrix(X, "X")
    if X.shape[1] != W.shape[1]:
        raise ValueError(f"X: expected [batch, {W.shape[1]}] (W is [N_out, K_in] = {list(W.shape)}), "
                         f"got {list(X.shape)}")
    return X


def _uniform(scheme, fn: str) -> QScheme:
    scheme = get(scheme)
    if scheme.grid != "uniform":
        raise ValueError(f"scheme: {fn} supports uniform grids only, got grid {scheme.grid!r} ({scheme.name})")
    return scheme


# ----------------------------------------------------------------------------- bias correction

def bias_correction(W, W_q, x_mean, b=None) -> np.ndarray:
    """The bias that cancels the expected output shift of quantized weights.

    With the error ``eps = W_q - W`` the quantized layer computes
    ``x @ W_q.T = x @ W.T + x @ eps.T``, so ``E[y_q] - E[y] = eps @ E[x]``. The
    corrected bias (Nagel et al. 2019, section 4.2, empirical variant) is::

        b' = b - (W_q - W) @ E[x]

    after which ``E[x @ W_q.T + b'] = E[x @ W.T + b]`` for the activation
    distribution ``E[x]`` was estimated on (a calibration batch's mean).

    Parameters
    ----------
    W : [N, K] float weights
    W_q : [N, K] quantized-dequantized weights, or a QTensor (dequantized here)
    x_mean : [K] the mean input activation per input channel
    b : [N] the original bias, or None (zero)

    Returns the float64 corrected bias of shape [N].
    """
    W = _matrix(W, "W")
    W_q = _matrix(W_q, "W_q")
    if W_q.shape != W.shape:
        raise ValueError(f"W_q: expected W's shape {W.shape}, got {W_q.shape}")
    x_mean = _vector(x_mean, "x_mean", W.shape[1])
    b = np.zeros(W.shape[0]) if b is None else _vector(b, "b", W.shape[0])
    return b - (W_q - W) @ x_mean


# ----------------------------------------------------------------------------- SmoothQuant

def smoothquant_scales(x_absmax, W, alpha: float = 0.5) -> np.ndarray:
    """Per-input-channel smoothing factors (SmoothQuant, Xiao et al. 2023, eq. 4)::

        s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

    ``alpha`` in [0, 1] sets how much of the activation range moves into the
    weights: 0 leaves the activations alone (``s_j = 1 / max|W_:,j|``, weights
    normalised), 1 flattens them completely (``s_j = max|X_j|``); 0.5 balances the
    two so that both ``max|X_j / s_j|`` and ``max|W_:,j * s_j|`` become
    ``sqrt(max|X_j| max|W_:,j|)``. Channels whose activation or weight maximum is
    zero get ``s_j = 1`` (nothing to balance).

    Parameters
    ----------
    x_absmax : [K] calibration maximum of ``|x|`` per input channel
    W : [N, K] weights
    alpha : migration strength in [0, 1]
    """
    W = _matrix(W, "W")
    x_absmax = _vector(x_absmax, "x_absmax", W.shape[1], nonnegative=True)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    w_absmax = np.max(np.abs(W), axis=0)
    ok = (x_absmax > 0) & (w_absmax > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(ok, x_absmax ** alpha / w_absmax ** (1.0 - alpha), 1.0)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0)


def apply_smoothing(W, s) -> np.ndarray:
    """The smoothed weights ``W * s`` (column ``j`` times ``s_j``).

    The activations must be divided by the same factors, which is exact in real
    arithmetic::

        x @ W.T == (x / s) @ (W * s).T        since  sum_j x_j W_ij = sum_j (x_j / s_j)(s_j W_ij)

    In a network ``1 / s`` is folded into whatever produces ``x`` (the previous
    layer norm's gain or the previous linear layer's output rows), so the
    division costs nothing at inference time.
    """
    W = _matrix(W, "W")
    s = _vector(s, "s", W.shape[1], positive=True)
    return W * s


# ----------------------------------------------------------------------------- GPTQ

def _span(scheme: QScheme, K: int) -> int:
    """How many consecutive columns of a [N, K] weight share their scales.

    Groups along K share ``group_size`` columns; per-column parameters (channel
    axis 1, or groups along N) are one column each; per-tensor and per-row
    parameters involve every column and are fitted once, before any update.
    """
    if scheme.granularity == "tensor":
        return K
    axis = grid._axis(scheme, 2)
    if scheme.granularity == "group" and axis == 1:
        return scheme.group_size
    if scheme.granularity == "group" or axis == 1:
        return 1
    return K


def _assemble(parts: list[np.ndarray], scheme: QScheme, span: int, K: int) -> np.ndarray:
    """Per-span parameter arrays joined into one array of ``param_shape``."""
    if span == K:
        return parts[0]
    # group along K: [N, 1] each; groups along N: [G, 1] each; channel axis 1: (1,) each
    return np.concatenate(parts, axis=0 if parts[0].ndim == 1 else 1)


def gptq(W, X, scheme="int4", *, damp: float = 0.01, block_size: int = 128) -> QTensor:
    """Quantize ``W`` [N, K] with GPTQ (Frantar et al. 2022) for inputs like ``X`` [batch, K].

    The output error of quantized weights ``Q`` is, row by row,
    ``||X w - X q||^2 = (w - q)^T H (w - q) / 2`` with the Hessian::

        H = 2 X^T X + damp * mean(diag(2 X^T X)) * I

    (the damping keeps ``H`` invertible; input channels that are always zero get
    ``H_jj = 1``). Optimal Brain Surgeon says: after fixing column ``j`` to its
    quantized value, the remaining columns ``F`` should move by
    ``-(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j,F}``. GPTQ visits columns in order
    and obtains every ``H_F^-1`` row at once from the upper Cholesky factor
    ``U`` of ``H^-1`` (``H^-1 = U^T U``)::

        for j = 0 .. K-1:
            q_j  = Q(w_j)                               (round to nearest on the grid)
            e_j  = (w_j - q_j) / U_jj
            w_k -= e_j * U_jk        for k > j          (error compensation)

    The updates of a block of ``block_size`` columns are applied to the rest of
    the matrix in one product ``W[:, after] -= E @ U[block, after]`` ("lazy batch
    updates"); the result does not depend on ``block_size``.

    Scales follow the scheme. With groups along K (``int4(group_size=g)``) each
    group's scale and zero point are fitted when the first column of the group
    is reached, from the current, error-compensated weights, as GPTQ's
    ``groupsize`` option does; per-column parameters are fitted column by
    column; per-tensor and per-row parameters are fitted to ``W`` up front.
    With ``H`` a multiple of the identity no error propagates and the result is
    exactly round-to-nearest (``lowbit.quantize(W, scheme)``).

    Parameters
    ----------
    W : [N_out, K_in] float weights
    X : [batch, K_in] calibration activations
    scheme : a uniform-grid QScheme or preset name (default ``int4``: groups of 128)
    damp : relative damping, >= 0 (0.01 in the paper)
    block_size : columns per lazy batch update, >= 1

    Returns a QTensor of ``W``'s shape under ``scheme``.
    """
    W = _matrix(W, "W")
    X = _activations(X, W)
    scheme = _uniform(scheme, "gptq")
    if scheme.rounding != "half_even":
        raise ValueError(f"scheme: gptq rounds to nearest; rounding {scheme.rounding!r} is not supported")
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.number)) or not np.isfinite(damp) \
            or damp < 0:
        raise ValueError(f"damp: expected a finite number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")
    N, K = W.shape
    span = _span(scheme, K)

    H = 2.0 * (X.T @ X)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError as e:
        raise ValueError(f"damp: the Hessian 2 X^T X is singular; use damp > 0 (got {damp})") from e

    W = W.copy()
    codes = np.empty((N, K), np.int64)
    scales, zeros = [], []
    params = None
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((N, i2 - i1)), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % span == 0:  # entering a new scale group: fit it to the current weights
                end = min(j + span, K)
                current = W1[:, i:end - i1]
                if end > i2:  # columns past this block, with this block's pending updates so far
                    after = W[:, i2:end] - E1[:, :i] @ U[i1:i1 + i, i2:end]
                    current = np.concatenate([current, after], axis=1)
                params = grid.fit(current.astype(np.float32), scheme)
                scales.append(params.scale)
                zeros.append(params.zero_point)
            w = W1[:, i:i + 1].astype(np.float32)
            c = grid.quantize(w, scheme, params)
            q = grid.dequantize(c, scheme, params).astype(np.float64)[:, 0]
            codes[:, j] = c[:, 0]
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    final = grid.QParams(_assemble(scales, scheme, span, K), _assemble(zeros, scheme, span, K))
    return QTensor.from_codes(codes.reshape(N, K), scheme, final)


# ----------------------------------------------------------------------------- AWQ

def awq(W, X, scheme="int4", grid_points: int = 20) -> tuple[QTensor, np.ndarray]:
    """Activation-aware scaling before round-to-nearest (AWQ, Lin et al. 2023, section 3.2).

    Weights of input channels with large activations matter most. Scaling column
    ``j`` of ``W`` up by ``s_j`` (and the activation down by it, exactly as in
    :func:`apply_smoothing`) shrinks their relative rounding error. AWQ searches
    ``s = mean|x_j| ** a`` over ``a`` on ``grid_points`` evenly spaced values in
    [0, 1], normalised so that ``sqrt(max(s) min(s)) = 1``, and keeps the
    ``a`` that minimises the calibration output error::

        || X @ W.T - (X / s) @ Q(W * s).T ||^2

    where ``Q`` is round-to-nearest under ``scheme``. ``a = 0`` is plain RTN, so
    the result is never worse than RTN on ``X``.

    Returns ``(qt, s)``: ``qt`` quantizes ``W * s`` and the layer computes
    ``(x / s) @ qt.dequantize().T`` (fold ``1 / s`` into the producer of ``x``,
    or use ``qt.dequantize() / s`` as the effective weights).
    """
    W = _matrix(W, "W")
    X = _activations(X, W)
    scheme = _uniform(scheme, "awq")
    if isinstance(grid_points, bool) or not isinstance(grid_points, (int, np.integer)) or grid_points < 2:
        raise ValueError(f"grid_points: expected an integer >= 2, got {grid_points!r}")
    x_mean = np.mean(np.abs(X), axis=0)
    top = x_mean.max()
    x_mean = np.maximum(x_mean, 1e-6 * top) if top > 0 else np.ones_like(x_mean)
    Y = X @ W.T
    best = None
    for a in np.linspace(0.0, 1.0, grid_points):
        s = x_mean ** a
        s = s / np.sqrt(s.max() * s.min())
        qt = quantize((W * s).astype(np.float32), scheme)
        err = float(np.mean((Y - (X / s) @ qt.dequantize().astype(np.float64).T) ** 2))
        if best is None or err < best[0]:
            best = (err, qt, s)
    return best[1], best[2]
