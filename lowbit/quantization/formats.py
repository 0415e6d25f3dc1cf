"""The table of weight formats: every way lowbit can store a layer's weights, described once.

A row of :data:`FORMATS` says how a float weight matrix ``w [out, K]`` becomes codes and
scales (its scheme), how the codes are stored in a ``.lowbit`` file (a ``kernels.qtypes``
code), which op computes a float Conv / Gemm in the format, how the codes dequantize, and
how the runtime packs them and runs the product. Post-training quantization
(``lowbit.ptq``), the graph passes (fusion, the float twin), saving, the runtime's
preparers, the sensitivity analysis, ONNX quantization, the tests and the benchmarks
iterate over it: adding a format is adding a row.

The weight-only ops of a format share one signature (``x`` float32, ``act`` the optional
attribute ``activation``, "relu" or "relu6")::

    op(x, codes, scales, bias?)       y = act(x @ W.T + bias)         (Gemm ops: x [..., K])
                                      y = act(conv(x, W) + bias)      (Conv ops: NCHW, W OIHW)

with ``W = dequantize(codes, scales)`` per row:

=========  =====  ===========================  ==============================================
format     bits   codes                        ``W[o, k]``
=========  =====  ===========================  ==============================================
int8       8      int8, per output channel     ``codes[o, k] scales[o]`` (DynamicQGemm adds a zero point)
int4       4      int8 in -8..7                ``codes[o, k] scales[o, k // group_size]``
nf4        4      uint8 indices 0..15          ``NF4[codes[o, k]] scales[o, k // group_size]``
ternary    2      int8 in {-1, 0, 1}           ``codes[o, k] scales[o]`` (TWN)
binary     1      int8 in {-1, +1}             ``codes[o, k] scales[o]``; the op also takes ``sign(x)``
=========  =====  ===========================  ==============================================

Grouped formats carry the attribute ``group_size`` (groups along K). int8 is special in one
way: its static form (calibrated uint8 activations: QLinearConv, lowbit.QGemm) is built by
``lowbit.ptq`` itself; its weight-only row is the dynamic ``lowbit.DynamicQGemm``
(``x, w, w_scale, w_zero_point?, bias?``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import kernels
from kernels.pack.grouped import GROUP_SIZES
from kernels.qtypes import QTYPES, QType
from lowbit.quantization import grid
from lowbit.quantization.scheme import NF4, QScheme, binary, int4, int8, nf4, ternary

#: lowbit's ONNX domain: the ops of this table that ONNX cannot express (``lowbit.<op>`` in a graph).
DOMAIN = "lowbit"


@dataclass(frozen=True)
class WeightFormat:
    """One weight format (see the module docstring).

    name : the precision's name ("int4", ...), as ``QuantConfig.precision`` and the CLI take it
    bits : bits per weight in a saved file (scales aside)
    storage : ``kernels.qtypes`` code of the codes in a ``.lowbit`` file
    ops : float op ("Gemm", "Conv") -> the weight-only op computing it in this format
    group_sizes : allowed groups along K (attribute ``group_size``); empty: one scale per output channel
    default_group_size : the group size used when none is given (grouped formats)
    grouped_conv : whether the Conv op takes ``group > 1``
    conv_layout : the Conv op's codes: "rows" ``[out, (ky, kx, c)]`` (2-D, grouped along K) or "OIHW" (the filters)
    binarizes_input : whether the op computes on ``sign(x)`` instead of ``x``
    grid : the weight scheme for a group size (None for per-channel formats)
    product : ``(codes, scales, group_size, m) -> plan`` computing ``x [m, K] @ W.T`` (binary: ``sign(x) @ W.T``)
        as ``plan(x, out=...)``; None for int8, whose product is lowbit.DynamicQGemm's
    codebook : the values the codes index (NF4), or None when the codes are the values
    tolerance : relative error of the op against ``x @ W.T`` on its own dequantized weights
        (activations rounded to int8 on the fly; binary: exact up to float rounding)
    """

    name: str
    bits: int
    storage: str
    ops: dict[str, str]
    group_sizes: tuple[int, ...] = ()
    default_group_size: int | None = None
    grouped_conv: bool = True
    conv_layout: str = "rows"
    binarizes_input: bool = False
    grid: Callable[[int | None], QScheme] | None = field(default=None, compare=False)
    product: Callable[..., Any] | None = field(default=None, compare=False)
    codebook: tuple[float, ...] | None = None
    tolerance: float = 2e-2
    description: str = field(default="", compare=False)

    @property
    def qtype(self) -> QType:
        return QTYPES[self.storage]

    @property
    def grouped(self) -> bool:
        return bool(self.group_sizes)

    def group_size(self, value: int | None) -> int | None:
        """``value`` checked against :attr:`group_sizes` (None: the default); None for per-channel formats."""
        if not self.grouped:
            return None
        g = self.default_group_size if value is None else value
        if isinstance(g, bool) or g not in self.group_sizes:
            raise ValueError(f"group_size: {self.name} takes one of {list(self.group_sizes)}, got {value!r}")
        return int(g)

    def scheme(self, group_size: int | None = None) -> QScheme:
        """The weight grid of ``w [out, K]``: groups of ``group_size`` along K, or one scale per output row."""
        return self.grid(self.group_size(group_size))

    def op(self, float_op: str, group: int = 1) -> str | None:
        """The op computing ``float_op`` ("Gemm" / "Conv", with ``group``) in this format, or None (not available)."""
        op = self.ops.get(float_op)
        if op is not None and float_op == "Conv" and group != 1 and not self.grouped_conv:
            return None
        return op

    def quantize(self, w: np.ndarray, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Round-to-nearest ``(codes [out, K], scales)`` of float ``w [out, K]`` (scales ``[out, groups]`` or
        ``[out]``)."""
        scheme = self.scheme(group_size)
        params = grid.fit(w, scheme)
        return grid.quantize(w, scheme, params), params.scale.astype(np.float32)

    def dequantize(self, codes: np.ndarray, scales: np.ndarray, group_size: int | None = None) -> np.ndarray:
        """Float32 ``W [out, K]`` of ``codes`` and ``scales`` (the module docstring's table)."""
        values = np.asarray(self.codebook, np.float64)[codes] if self.codebook else codes.astype(np.float64)
        s = np.asarray(scales, np.float64).reshape(codes.shape[0], -1)
        if self.grouped:
            s = np.repeat(s, self.group_size(group_size), axis=1)[:, :codes.shape[1]]
        return (values * s).astype(np.float32)

    def check_codes(self, codes: np.ndarray, where: str) -> np.ndarray:
        """``codes`` as a C-contiguous [out, K] array, or ValueError naming ``where`` and the expected values."""
        q = self.qtype
        binary_values = self.storage == "b1"
        ok = codes.dtype == q.dtype and codes.ndim == 2 and codes.size > 0 and (
            np.all(np.abs(codes) == 1) if binary_values else codes.min() >= q.qmin and codes.max() <= q.qmax)
        if not ok:
            values = "-1 and +1" if binary_values else f"{q.qmin}..{q.qmax}"
            got = f" with values {codes.min()}..{codes.max()}" if codes.size and codes.dtype.kind in "iu" else ""
            raise ValueError(f"{where}: codes must be {q.dtype} [out, in] with values {values} ({self.name}), got "
                             f"{codes.dtype} of shape {codes.shape}{got}")
        return np.ascontiguousarray(codes)

    def plan(self, codes: np.ndarray, scales: np.ndarray, group_size: int | None, m: int) -> Any:
        """A ``kernels`` plan computing ``x [m, K] @ W.T`` (binary: ``sign(x) @ W.T``) as ``plan(x, out=...)``."""
        if self.product is None:
            raise ValueError(f"{self.name}: its product runs through lowbit.DynamicQGemm, not a weight-only plan")
        return self.product(codes, np.ascontiguousarray(scales, np.float32), self.group_size(group_size), m)


class _BinaryPlan:
    """``sign(x) @ W.T`` with ``W = codes * alpha`` as ``plan(x, out=...)``: signs packed per call, then
    XNOR-popcount."""

    def __init__(self, codes: np.ndarray, alpha: np.ndarray, m: int):
        self.k = codes.shape[1]
        self.plan = kernels.gemm_binary_plan(kernels.pack_bits(codes), self.k, m, multiplier=alpha)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.plan(kernels.pack_bits(x), out=out)


_ROWS = (
    WeightFormat("int8", 8, "s8", {"Gemm": "lowbit.DynamicQGemm"},
                 grid=lambda g: int8(granularity="channel", axis=0),
                 description="symmetric int8 per output channel; static Conv / Gemm or dynamic Gemm activations"),
    WeightFormat("int4", 4, "s4", {"Gemm": "lowbit.Int4Gemm", "Conv": "lowbit.Int4Conv"}, GROUP_SIZES, 32,
                 grid=lambda g: int4(group_size=g),
                 product=lambda c, s, g, m: kernels.gemm_int4_plan(kernels.pack_int4_codes(c, s, group_size=g), m),
                 description="symmetric int4, one float32 scale (max|w| / 7) per group along K"),
    WeightFormat("nf4", 4, "u4", {"Gemm": "lowbit.NF4Gemm"}, GROUP_SIZES, 64, codebook=NF4,
                 grid=lambda g: nf4(group_size=g),
                 product=lambda c, s, g, m: kernels.gemm_codebook_plan(kernels.pack_codebook(c, s, NF4, group_size=g),
                                                                       m),
                 description="NF4 (QLoRA) codebook indices, one float32 scale (max|w|) per group along K"),
    WeightFormat("ternary", 2, "t2", {"Gemm": "lowbit.TernaryGemm"}, grid=lambda g: ternary(),
                 product=lambda c, s, g, m: kernels.gemm_ternary_plan(kernels.pack_ternary_codes(c, s.reshape(-1, 1)),
                                                                      m),
                 description="TWN: 0 below 0.7 mean|w|, else the sign, scaled per output channel"),
    WeightFormat("binary", 1, "b1", {"Gemm": "lowbit.BinaryGemm", "Conv": "lowbit.BinaryConv"},
                 grouped_conv=False, conv_layout="OIHW", binarizes_input=True, tolerance=1e-5,
                 grid=lambda g: binary(), product=lambda c, s, g, m: _BinaryPlan(c, s.reshape(-1), m),
                 description="XNOR-Net: sign(w) times mean|w| per output channel, on sign(x)"),
)

#: name -> format, widest first.
FORMATS: dict[str, WeightFormat] = {f.name: f for f in _ROWS}
#: weight-only op -> (its format, the float op it computes)
OPS: dict[str, tuple[WeightFormat, str]] = {op: (f, float_op) for f in _ROWS for float_op, op in f.ops.items()}

