"""Quantization schemes: what grid values land on, and how finely scales are shared.

A :class:`QScheme` is plain, frozen data. It says nothing about any particular
tensor; the functions of ``lowbit.quantization.grid`` fit scales to data under a
scheme, and ``lowbit.QTensor`` stores the result. Schemes serialise to plain dicts
(``to_dict`` / ``from_dict``), never to pickles.

Grids
-----
``uniform``   integer codes ``q`` in ``[qmin, qmax]``, ``x ~ scale * (q - zero_point)``
``ternary``   codes -1, 0, +1, ``x ~ scale * q``; a threshold decides 0 (TWN)
``binary``    codes -1, +1, ``x ~ scale * q`` with ``scale = mean |x|`` (XNOR-Net)
``pow2``      signed powers of two and zero, ``x ~ scale * 2**-e``
``codebook``  any table of ``2**bits`` values in [-1, 1] (NF4 is one), ``x ~ scale * table[q]``

Granularity
-----------
``tensor``  one scale; ``channel``: one per index of ``axis``; ``group``: one per run
of ``group_size`` consecutive elements along ``axis`` (ONNX's blocked quantization:
the scale has the tensor's shape with ``axis`` shortened to ``ceil(n / group_size)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from kernels.qtypes import QTYPES, QType

GRIDS = ("uniform", "ternary", "binary", "pow2", "codebook")
GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("half_even", "stochastic")

# NF4 (QLoRA): 16 quantiles of a standard normal, rescaled to [-1, 1], with an exact 0;
# 8 on the positive side and 7 on the negative side.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)


def pow2_table(bits: int) -> tuple[float, ...]:
    """Zero and ``+-2**-e`` for ``e = 0 .. 2**(bits-1) - 2``: ``2**bits - 1`` values, sorted."""
    magnitudes = [2.0 ** -e for e in range(2 ** (bits - 1) - 1)]
    return tuple(sorted([-m for m in magnitudes] + [0.0] + magnitudes))


@dataclass(frozen=True)
class QScheme:
    """How to quantize a tensor: grid, bits, signedness, scale granularity, rounding.

    Parameters
    ----------
    bits : 1, 2, 4 or 8 (binary needs 1, ternary 2; pow2 and codebook index a table)
    signed : codes below zero (uniform grid only)
    symmetric : zero point fixed (0, or the middle of an unsigned range)
    granularity : "tensor", "channel" or "group"
    axis : the channel axis, or the axis along which groups run
    group_size : elements per group (granularity "group")
    rounding : "half_even" (ONNX) or "stochastic" (floor(x / scale + U[0, 1)))
    narrow_range : drop the most negative code, so that the range is symmetric
    grid : "uniform", "ternary", "binary", "pow2" or "codebook"
    codebook : the table for grid "codebook", values in [-1, 1], at most ``2**bits``
    name : a label for reports
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    rounding: str = "half_even"
    narrow_range: bool = False
    grid: str = "uniform"
    codebook: tuple[float, ...] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _one_of("grid", self.grid, GRIDS)
        _one_of("granularity", self.granularity, GRANULARITIES)
        _one_of("rounding", self.rounding, ROUNDINGS)
        needed = {"binary": (1,), "ternary": (2,), "uniform": (2, 4, 8), "pow2": (2, 4, 8), "codebook": (2, 4, 8)}
        if self.bits not in needed[self.grid]:
            raise ValueError(f"bits: grid {self.grid!r} takes bits in {needed[self.grid]}, got {self.bits}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("group_size: required with granularity 'group' and only then, "
                             f"got {self.group_size!r} with {self.granularity!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size: expected a positive integer, got {self.group_size}")
        if self.grid == "codebook":
            if not self.codebook or len(self.codebook) > 2 ** self.bits:
                raise ValueError(f"codebook: expected 1 to {2 ** self.bits} values for {self.bits} bits")
            if any(not -1.0 <= v <= 1.0 for v in self.codebook) or list(self.codebook) != sorted(self.codebook):
                raise ValueError("codebook: values must be sorted and lie in [-1, 1]")
        elif self.codebook is not None:
            raise ValueError(f"codebook: only for grid 'codebook', got grid {self.grid!r}")
        if self.grid != "uniform" and not (self.signed and self.symmetric):
            raise ValueError(f"signed, symmetric: grid {self.grid!r} is always signed and symmetric")

    @property
    def qtype(self) -> QType:
        """The storage format of the codes (``kernels.qtypes``)."""
        if self.grid == "binary":
            return QTYPES["b1"]
        if self.grid == "ternary":
            return QTYPES["t2"]
        if self.grid in ("pow2", "codebook"):  # codes are table indices
            return QTYPES[f"u{self.bits}"]
        return QTYPES[f"{'s' if self.signed else 'u'}{self.bits}"]

    @property
    def qmin(self) -> int:
        """Smallest code of a uniform grid (after ``narrow_range``)."""
        return self.qtype.qmin + (1 if self.narrow_range and self.signed else 0)

    @property
    def qmax(self) -> int:
        return self.qtype.qmax

    @property
    def table(self) -> tuple[float, ...] | None:
        """The values codes index (pow2 and codebook grids), else None."""
        if self.grid == "pow2":
            return pow2_table(self.bits)
        return self.codebook

    def with_(self, **changes: Any) -> "QScheme":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields; ``from_dict`` restores the scheme."""
        d = asdict(self)
        d["codebook"] = list(self.codebook) if self.codebook is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QScheme":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"scheme: unknown fields {sorted(unknown)}")
        d = dict(d)
        if d.get("codebook") is not None:
            d["codebook"] = tuple(d["codebook"])
        return cls(**d)


def _one_of(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def int8(*, signed: bool = True, symmetric: bool = True, granularity: str = "tensor", axis: int = 0,
         group_size: int | None = None, narrow_range: bool = False) -> QScheme:
    """8-bit uniform (ONNX int8 / uint8)."""
    return QScheme(8, signed, symmetric, granularity, axis, group_size, narrow_range=narrow_range,
                   name="int8" if signed else "uint8")


def int4(*, group_size: int | None = 128, signed: bool = True, symmetric: bool = True, axis: int = -1) -> QScheme:
    """4-bit uniform, by default in groups of 128 along the last axis (K of a [N, K] weight)."""
    granularity = "group" if group_size else "channel"
    name = f"int4-g{group_size}" if group_size else "int4"
    return QScheme(4, signed, symmetric, granularity, axis if group_size else 0, group_size, name=name)


def ternary(*, granularity: str = "channel", axis: int = 0, group_size: int | None = None) -> QScheme:
    """-1, 0, +1 times a scale; threshold and scale fitted as in Ternary Weight Networks."""
    return QScheme(2, granularity=granularity, axis=axis, group_size=group_size, grid="ternary", name="ternary")


def binary(*, granularity: str = "channel", axis: int = 0, group_size: int | None = None) -> QScheme:
    """-1, +1 times ``mean |x|`` (XNOR-Net), per output channel by default."""
    return QScheme(1, granularity=granularity, axis=axis, group_size=group_size, grid="binary", name="binary")


def nf4(*, group_size: int = 64, axis: int = -1) -> QScheme:
    """4-bit NormalFloat (QLoRA) codebook, scaled by the absolute maximum of each group."""
    return QScheme(4, granularity="group", axis=axis, group_size=group_size, grid="codebook", codebook=NF4,
                   name=f"nf4-g{group_size}")


def pow2(*, bits: int = 4, granularity: str = "channel", axis: int = 0, group_size: int | None = None) -> QScheme:
    """Logarithmic grid: zero and signed powers of two below the absolute maximum."""
    return QScheme(bits, granularity=granularity, axis=axis, group_size=group_size, grid="pow2",
                   name=f"pow2-{bits}bit")


PRESETS: dict[str, Callable[..., QScheme]] = {
    "int8": int8, "int4": int4, "ternary": ternary, "binary": binary, "nf4": nf4, "pow2": pow2,
}


def get(identifier: str | dict | QScheme) -> QScheme:
    """A scheme from a preset name, a ``to_dict`` dict, or a scheme (returned as is)."""
    if isinstance(identifier, QScheme):
        return identifier
    if isinstance(identifier, dict):
        return QScheme.from_dict(identifier)
    if isinstance(identifier, str) and identifier in PRESETS:
        return PRESETS[identifier]()
    raise ValueError(f"scheme: expected a QScheme, a dict or one of {list(PRESETS)}, got {identifier!r}")
