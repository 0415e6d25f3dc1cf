"""Panel layout of group-wise quantized sub-byte weights (int4, ternary) for the grouped kernels.

A weight matrix of unsigned codes ``u [N, K]`` (``bits`` = 4 or 2 each; signed and
ternary codes are stored shifted, with their zero point shifted alike) is cut
into panels of ``PANEL = 64`` output channels like ``kernels.pack.panels``. One
*step* covers ``F = 8 // bits`` k groups of 4 (8 k values for int4, 16 for
ternary) and takes 256 bytes: per channel 4 bytes, byte ``u`` of channel ``c``
holding field ``f`` of k value ``4 f + u`` of the step::

    data[((p * S + s) * 64 + c) * 4 + u] = sum_f code[64 p + c, s * 4F + 4 f + u] << (bits * f)

with ``S = ceil(K / 4F)`` steps. Masking field ``f`` out of four 64-byte vectors
gives exactly the operand ``vpdpbusd`` multiplies by 4 broadcast activation bytes
(the same 16 channels x 4 k lanes as the int8 panels), so a GEMV streams the
``N * K * bits / 8`` bytes once and unpacks in registers. Padding (channels past
N, k past K) is zero; the activations are zero there, so it adds nothing.

Scales (float32) and zero points (int32, in the shifted unsigned code space) are
stored twice: ``[N, G_count]`` as given, and per panel ``[P, G_count, 64]`` so a
kernel loads 16 channels of one group with one vector load. Without explicit
zero points every group shares one constant (8 for s4, 1 for ternary, 0 for u4),
which the kernels subtract without a multiply.
"""

from __future__ import annotations

import numpy as np

from kernels import _validate
from kernels.pack.panels import PANEL, PanelWeights, aligned_empty
from kernels.pack.plans import PlanCache

STEP_BYTES = 256  # one step of one panel: 64 channels x 4 bytes
NO_TABLE = np.zeros(16, np.int8)  # the kernels' ``tab`` argument for formats without a codebook


class PackedGrouped(PanelWeights):
    """Sub-byte codes ``[N, K]`` in panel layout with per-group scales (see module docstring).

    Attributes
    ----------
    data : uint8 [n_panels * steps * 256], 64-byte aligned
    n, k : logical weight shape
    bits : 4 or 2 bits per stored code
    group_size : k values per scale group (the last group may be shorter)
    scales : float32 [N, n_groups]
    zero_points : int32 [N, n_groups] in stored-code units, or None when ``zero`` is shared
    zero : the shared zero point (stored-code units) when ``zero_points`` is None
    panel_scales, panel_zeros : float32 / int32 [n_panels * n_groups * 64], zero padded
    plans : :class:`kernels.pack.plans.PlanCache` of the one-shot calls with this weight
    """

    __slots__ = ("data", "n", "k", "bits", "group_size", "scales", "zero_points", "zero", "panel_scales",
                 "panel_zeros", "plans")
    lookup = False  # codes index a table (kernels.pack.codebook)
    kernel_table = NO_TABLE  # int8 [16] table the codebook kernels look codes up in

    def __init__(self, data, n, k, bits, group_size, scales, zero_points, zero):
        self.data, self.n, self.k, self.bits, self.group_size = data, n, k, bits, group_size
        self.scales, self.zero_points, self.zero = scales, zero_points, zero
        zeros = np.full(scales.shape, zero, np.int32) if zero_points is None else zero_points
        self.panel_scales = _per_panel(scales, np.float32)
        self.panel_zeros = _per_panel(zeros, np.int32)
        self.plans = PlanCache()  # the one-shot calls' plans with this weight (kernels.pack.plans)

    @property
    def fields(self) -> int:
        """k groups of 4 per step (codes per byte)."""
        return 8 // self.bits

    @property
    def k_span(self) -> int:
        """k values per step."""
        return 4 * self.fields

    @property
    def steps(self) -> int:
        return -(-self.k // self.k_span)

    @property
    def k_padded(self) -> int:
        return self.steps * self.k_span

    @property
    def group_steps(self) -> int:
        """Steps per full group."""
        return -(-self.group_size // self.k_span)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def codes(self) -> np.ndarray:
        """The stored unsigned codes ``[N, K]`` (uint8), unpacked from ``data``."""
        f, p, s = self.fields, self.n_panels, self.steps
        blocks = self.data.reshape(p, s, PANEL, 4, 1)
        shifts = (np.arange(f, dtype=np.uint8) * self.bits).reshape(1, 1, 1, 1, f)
        fields = (blocks >> shifts) & ((1 << self.bits) - 1)  # [P, S, 64, 4(u), F]
        full = fields.transpose(0, 2, 1, 4, 3).reshape(p * PANEL, s * self.k_span)
        return np.ascontiguousarray(full[: self.n, : self.k])

    def zero_point_array(self) -> np.ndarray:
        """Zero points ``[N, n_groups]`` (int32, stored-code units), the shared one broadcast."""
        if self.zero_points is None:
            return np.full(self.scales.shape, self.zero, np.int32)
        return self.zero_points

    def dequantize(self) -> np.ndarray:
        """``scale * (code - zero)`` as float32 ``[N, K]``: the weights the kernels multiply."""
        g = np.arange(self.k) // self.group_size
        diff = self.codes().astype(np.int32) - self.zero_point_array()[:, g]
        return (diff.astype(np.float32) * self.scales[:, g]).astype(np.float32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape=({self.n}, {self.k}), group_size={self.group_size}, "
                f"symmetric={self.symmetric}, nbytes={self.data.nbytes})")


def _per_panel(values: np.ndarray, dtype) -> np.ndarray:
    """``[N, G]`` -> flat ``[P, G, 64]``, zero padded past N."""
    n, g = values.shape
    p = -(-n // PANEL)
    out = np.zeros((p * PANEL, g), dtype)
    out[:n] = values
    return np.ascontiguousarray(out.reshape(p, PANEL, g).transpose(0, 2, 1)).reshape(-1)


def pack_fields(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes [N, K]`` (each < 2**bits) in the panel layout of the module docstring."""
    n, k = codes.shape
    f = 8 // bits
    span = 4 * f
    steps = -(-k // span)
    p = -(-n // PANEL)
    padded = np.zeros((p * PANEL, steps * span), np.uint8)
    padded[:n, :k] = codes
    # [P, 64(c), S, F, 4(u)] -> [P, S, 64(c), 4(u), F], then the fields of one byte are OR-ed
    blocks = padded.reshape(p, PANEL, steps, f, 4).transpose(0, 2, 1, 4, 3)
    shifts = (np.arange(f, dtype=np.uint8) * bits)
    data = aligned_empty(p * steps * STEP_BYTES, np.uint8)
    data.reshape(p, steps, PANEL, 4)[...] = np.bitwise_or.reduce(blocks << shifts, axis=-1)
    return data


#: The group sizes (k values per scale) the grouped kernels (int4, ternary, codebook) take.
GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(group_size: int, allowed: tuple[int, ...] = GROUP_SIZES) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size not in allowed:
        raise ValueError(f"group_size: expected one of {allowed}, got {group_size!r}")
    return int(group_size)


def check_weights(name: str, w: object) -> np.ndarray:
    """A non-empty, finite, C-contiguous float32 ``[N, K]`` matrix."""
    w = _validate.array(name, w, (np.float32,), 2)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: values must be finite")
    return w


def check_scales(scales: object, n: int, groups: int) -> np.ndarray:
    """float32 or float16 ``[N, groups]``, finite and non-negative; returned as float32."""
    if not isinstance(scales, np.ndarray):
        raise TypeError(f"scales: expected a numpy.ndarray of float32 or float16, got {type(scales).__name__}")
    if scales.dtype not in (np.float32, np.float16):
        raise TypeError(f"scales: expected dtype float32 or float16, got {scales.dtype}")
    if scales.shape != (n, groups):
        raise ValueError(f"scales: expected shape ({n}, {groups}), got {scales.shape}")
    s = np.ascontiguousarray(scales, dtype=np.float32)
    if not (np.all(np.isfinite(s)) and np.all(s >= 0)):
        raise ValueError("scales: values must be finite and non-negative")
    return s
