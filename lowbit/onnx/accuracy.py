"""Accuracy targets for ONNX quantization: the metric a quantized model is held to, and the greedy search that
picks a precision per layer to meet it.

A target is a minimum cosine or a maximum relative error of the model's outputs against the float model's, on
calibration batches::

    cosine          min over outputs and rows of  <y, y_ref> / (|y| |y_ref|)     (a row: the last axis; two zero
                                                                                   rows count as 1)
    relative_error  max over outputs of           |y - y_ref|_F / |y_ref|_F

:func:`choose_precisions` starts every layer at the middle of its ladder of precisions (say int8 between int4 and
float), raises the most helpful layers to float while the target is missed, then lowers layers one at a time to
the cheapest precision, greatest bytes saved per metric lost first (each layer's loss measured alone), keeping each
step only when the whole model still meets the target. Every decision is measured on the model as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

METRICS = ("cosine", "relative_error")


@dataclass(frozen=True)
class AccuracyTarget:
    """``metric`` ("cosine": at least ``value``; "relative_error": at most ``value``)."""

    metric: str
    value: float

    @classmethod
    def of(cls, target: float | Mapping[str, float] | AccuracyTarget) -> AccuracyTarget:
        """A target from a number (a minimum cosine), ``{"cosine": 0.999}`` or ``{"relative_error": 0.02}``."""
        if isinstance(target, cls):
            return target
        if isinstance(target, Mapping) and len(target) == 1:
            (metric, value), = target.items()
        elif isinstance(target, (int, float, np.floating)) and not isinstance(target, bool):
            metric, value = "cosine", target
        else:
            raise TypeError(f"accuracy_target: expected a minimum cosine (a number such as 0.999), "
                            f"{{'cosine': value}} or {{'relative_error': value}}, got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"accuracy_target: the metric must be one of {list(METRICS)}, got {metric!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
                0 < value <= 1 if metric == "cosine" else value >= 0):
            bound = "in (0, 1]" if metric == "cosine" else ">= 0"
            raise ValueError(f"accuracy_target: {metric} must be a number {bound}, got {value!r}")
        return cls(metric, float(value))

    def measure(self, outputs: Sequence[Sequence[np.ndarray]], references: Sequence[Sequence[np.ndarray]]) -> float:
        """The metric of ``outputs[batch][output]`` against ``references`` of the same layout."""
        if self.metric == "cosine":
            return min(_min_cosine(y, r) for ys, rs in zip(outputs, references) for y, r in zip(ys, rs))
        err = [np.sum((np.float64(y) - r) ** 2) for ys, rs in zip(outputs, references) for y, r in zip(ys, rs)]
        ref = [np.sum(np.float64(r) ** 2) for rs in references for r in rs]
        n = len(references[0])
        return max(np.sqrt(sum(err[i::n]) / max(sum(ref[i::n]), 1e-300)) for i in range(n))

    def met(self, value: float) -> bool:
        return value >= self.value if self.metric == "cosine" else value <= self.value

    def loss(self, base: float, value: float) -> float:
        """How much worse ``value`` is than ``base`` (>= 0 when worse)."""
        return base - value if self.metric == "cosine" else value - base

    def __str__(self) -> str:
        return f"{'min cosine >=' if self.metric == 'cosine' else 'relative error <='} {self.value:g}"


def _min_cosine(y: np.ndarray, r: np.ndarray) -> float:
    y, r = (np.float64(a).reshape(-1, a.shape[-1] if a.ndim else 1) for a in (y, r))
    dot, ny, nr = (y * r).sum(axis=1), np.linalg.norm(y, axis=1), np.linalg.norm(r, axis=1)
    both_zero = (ny == 0) & (nr == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(ny * nr, 1e-300))
    return float(cos.min()) if cos.size else 1.0


@dataclass(frozen=True)
class Choice:
    """One layer's outcome: its precision, its size in bytes there, and the metric lost with it alone at the
    cheapest precision (None when not measured)."""

    precision: str
    nbytes: int
    alone_loss: float | None


def choose_precisions(layers: Sequence[str], ladder: Sequence[str], nbytes: Callable[[str, str], int],
                      evaluate: Callable[[Mapping[str, str]], float], target: AccuracyTarget
                      ) -> tuple[dict[str, Choice], float]:
    """Precisions (name -> :class:`Choice`) for ``layers`` from ``ladder`` (cheapest first, e.g. int4, int8, float)
    meeting ``target`` (see the module docstring), and the metric reached. ``nbytes(layer, precision)``: the layer's
    weight bytes; ``evaluate(assignment)``: the metric of the model with every layer at its assigned precision."""
    ladder = list(dict.fromkeys(ladder))
    low, middle = ladder[0], ladder[-2] if len(ladder) > 1 else ladder[0]
    current = {name: middle for name in layers}
    value = evaluate(current)
    if not target.met(value) and ladder[-1] != middle:  # raise to float, most metric gained per byte first
        gains = {}
        for name in layers:
            gains[name] = -target.loss(value, evaluate({**current, name: ladder[-1]})) / max(
                nbytes(name, ladder[-1]) - nbytes(name, middle), 1)
        for name in sorted(layers, key=lambda n: -gains[n]):
            current[name] = ladder[-1]
            value = evaluate(current)
            if target.met(value):
                break
    losses: dict[str, float] = {}
    if low != middle and target.met(value):  # lower to the cheapest, most bytes saved per metric lost first
        candidates = [n for n in layers if current[n] == middle]
        for name in candidates:
            losses[name] = target.loss(value, evaluate({**current, name: low}))
        saved = {n: nbytes(n, middle) - nbytes(n, low) for n in candidates}
        for name in sorted(candidates, key=lambda n: -saved[n] / max(losses[n], 1e-12)):
            trial = evaluate({**current, name: low})
            if target.met(trial):
                current[name], value = low, trial
    return {n: Choice(current[n], nbytes(n, current[n]), losses.get(n)) for n in layers}, value
