"""Weight codes as ONNX Runtime's quantizer writes them (8-bit, MatMulNBits' 4-bit blocks) and the activation
statistics GPTQ and AWQ need, in bounded memory (:mod:`lowbit.onnx.quantization`)."""

from __future__ import annotations

import numpy as np

#: AWQ keeps at most this many activation rows (tokens) per input tensor: a uniform sample of the stream.
MAX_ROWS = 2048


def _range_codes(dtype: str, symmetric: bool, reduce_range: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of 8-bit weights (ONNX Runtime's: symmetric int8 leaves out -128; 7 bits with
    ``reduce_range``)."""
    if dtype == "int8":
        return (-64, 64) if reduce_range else ((-127, 127) if symmetric else (-128, 127))
    return (0, 127) if reduce_range else (0, 255)


def _weight_codes(w: np.ndarray, axis: int | None, dtype: str, symmetric: bool, reduce_range: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scale, zero_point)`` of float ``w`` in 8 bits, one scale per index of ``axis`` (None: one in all)::

        symmetric:  scale = 2 max|w| / (qmax - qmin),  zero_point = (qmin + qmax) / 2 rounded
        asymmetric: scale = (max(w, 0) - min(w, 0)) / (qmax - qmin),  zero_point = rint(qmin - min(w, 0) / scale)
        codes = clip(rint(w / scale) + zero_point, qmin, qmax)                     in float32, half to even

    (a scale of 0 becomes 1)."""
    w = np.asarray(w, np.float32)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    qmin, qmax = _range_codes(dtype, symmetric, reduce_range)
    lo, hi = np.minimum(rows.min(axis=1), 0).astype(np.float32), np.maximum(rows.max(axis=1), 0).astype(np.float32)
    if symmetric:
        scale = (np.maximum(-lo, hi) * np.float32(2) / np.float32(qmax - qmin)).astype(np.float32)
        zero = np.full(len(rows), np.rint((qmin + qmax) / 2), np.float32)
    else:
        scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        zero = np.clip(np.rint(np.float32(qmin) - lo / safe), qmin, qmax).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    codes = np.clip(np.rint(w / scale.reshape(shape)) + zero.reshape(shape), qmin, qmax).astype(dtype)
    if axis is None:
        return codes, scale.reshape(()), zero.astype(dtype).reshape(())
    return codes, scale, zero.astype(dtype)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes a byte along the last axis (even length), the first in the low nibble."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _nbits_rtn(w: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest 4-bit codes of ``w [N, K]`` in blocks of ``block`` along K (the last block padded with
    zeros): ``(codes uint8 [N, blocks * block], scales float32 [N, blocks], zero points uint8 [N, blocks] or None)``.

    Symmetric (zero point 8): a block whose largest magnitude is a negative value ``v`` takes ``scale = -v / 8`` (v on
    code 0), otherwise ``max / 7`` (on code 15). Asymmetric: ``scale = (max(w, 0) - min(w, 0)) / 15``, zero point
    ``rint(-min(w, 0) / scale)``."""
    n, k = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w
    grouped = padded.reshape(n, blocks, block)
    if symmetric:
        where = np.abs(grouped).argmax(axis=2)
        extreme = np.take_along_axis(grouped, where[..., None], axis=2)[..., 0]
        scale = np.where(extreme < 0, -extreme / np.float32(8), extreme / np.float32(7)).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        codes = np.clip(np.rint(grouped / scale[..., None]), -8, 7) + 8
        return codes.astype(np.uint8).reshape(n, -1), scale, None
    lo, hi = np.minimum(grouped.min(axis=2), 0), np.maximum(grouped.max(axis=2), 0)
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    codes = np.clip(np.rint(grouped / scale[..., None]) + zero[..., None], 0, 15)
    return codes.astype(np.uint8).reshape(n, -1), scale, zero.astype(np.uint8)


def _nbits_scheme(block: int, symmetric: bool):
    from lowbit.quantization.scheme import QScheme

    return QScheme(4, signed=symmetric, symmetric=symmetric, granularity="group", axis=-1, group_size=block,
                   name=f"{'int4' if symmetric else 'uint4'}-g{block}")


def _int8_scheme(per_channel: bool, dtype: str, symmetric: bool):
    from lowbit.quantization.scheme import QScheme

    return QScheme(8, signed=dtype == "int8", symmetric=symmetric, granularity="channel" if per_channel else "tensor",
                   axis=0, narrow_range=dtype == "int8" and symmetric, name=dtype)


# ---- activation statistics for GPTQ / AWQ ----------------------------------------------------------------------------

class _Rows:
    """What the weight methods need of one input tensor's rows ``[-1, K]``, in bounded memory: the largest
    ``|x_j|`` (SmoothQuant) and the mean (bias correction) per channel, and ``X^T X`` (GPTQ) or a uniform sample of at most :data:`MAX_ROWS` rows
    (AWQ, reservoir sampling, seeded)."""

    def __init__(self, k: int, method: str, seed: int):
        self.k, self.method, self.seen = k, method, 0
        self.absmax = np.zeros(k, np.float32)
        self.sum = np.zeros(k)
        self.gram = np.zeros((k, k)) if method == "gptq" else None
        self.rows = np.empty((0, k), np.float32)
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray) -> None:
        rows = np.asarray(x, np.float32).reshape(-1, self.k)
        if len(rows):
            np.maximum(self.absmax, np.abs(rows).max(axis=0), out=self.absmax)
            self.sum += rows.sum(axis=0, dtype=np.float64)
        if self.gram is not None:
            as64 = rows.astype(np.float64)
            self.gram += as64.T @ as64
        elif self.method == "awq":
            room = MAX_ROWS - len(self.rows)
            if room > 0:
                self.rows = np.concatenate([self.rows, rows[:room]])
            rest = rows[max(room, 0):]
            if len(rest):
                index = self.seen + max(room, 0) + np.arange(len(rest))
                slots = (self.rng.random(len(rest)) * (index + 1)).astype(np.int64)
                keep = slots < MAX_ROWS
                self.rows[slots[keep]] = rest[keep]
        self.seen += len(rows)

    def divide(self, s: np.ndarray) -> None:
        """The statistics of ``x / s`` instead (``s`` per channel: SmoothQuant's factors)."""
        self.absmax = (self.absmax / s).astype(np.float32)
        self.sum /= s
        if self.gram is not None:
            self.gram /= np.outer(s, s)
        self.rows = (self.rows / s).astype(np.float32)

    @property
    def mean(self) -> np.ndarray:
        """``E[x_j]`` per channel (bias correction)."""
        return self.sum / max(self.seen, 1)

    def activations(self) -> np.ndarray:
        """Rows whose ``X^T X`` is the accumulated one (GPTQ: its square root from ``eigh``), or the sample."""
        if self.gram is None:
            return self.rows
        values, vectors = np.linalg.eigh(self.gram / max(self.seen, 1))
        return np.sqrt(np.maximum(values, 0))[:, None] * vectors.T
