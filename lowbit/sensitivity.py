"""Which layers tolerate quantization: per-layer sensitivity and a greedy mixed-precision search.

:func:`sensitivity` quantizes one Conv / Gemm layer at a time (every other layer stays
float) and measures the graph's final output against the float graph's on ``data``::

    SQNR = 10 log10(sum y^2 / sum (y - y_q)^2)      over all outputs, in dB (higher: less sensitive)

and, given ``metric(outputs) -> float`` (e.g. accuracy), ``delta = metric(quantized) - metric(float)``.
:func:`mixed_precision` starts every layer at the widest of ``choices`` and lowers one layer
at a time by one step, the least sensitive first, until the model fits ``size_budget`` bytes
(``lowbit.io.model_size``); a step that would make the metric drop more than
``accuracy_budget`` below the float model's is undone and its layer kept where it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from lowbit.extras import require
from lowbit.graph.ir import Graph
from lowbit.io import model_size
from lowbit.quantization.metrics import sqnr_db
from lowbit.ptq import BITS, PRECISIONS, QuantConfig, Quantizer, effective_precision
from lowbit.runtime.session import Session

Metric = Callable[[dict[str, np.ndarray]], float]


def evaluate(graph: Graph, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The graph's outputs over all batches, concatenated along the batch axis."""
    session = Session(graph)
    runs = [session.run(f) for f in feeds]
    return {name: np.concatenate([r[name] for r in runs]) for name in graph.outputs}


def _sqnr(reference: dict[str, np.ndarray], approx: dict[str, np.ndarray]) -> float:
    flat = [np.concatenate([d[n].ravel() for n in reference]) for d in (reference, approx)]
    return sqnr_db(*flat)


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    op: str
    precision: str
    sqnr_db: float
    metric: float | None  # metric of the quantized graph, when a metric was given
    delta: float | None  # metric change against the float graph
    size: int  # model bytes with only this layer quantized


@dataclass
class SensitivityReport:
    """Rows in layer order; ``str()`` (:meth:`table`) lists them most sensitive first."""

    rows: list[SensitivityRow]
    float_metric: float | None
    float_size: int

    def ranked(self) -> list[SensitivityRow]:
        """Most sensitive first: lowest SQNR (or, with a metric, largest drop)."""
        return sorted(self.rows, key=lambda r: (r.delta if r.delta is not None else 0.0, r.sqnr_db))

    def table(self) -> str:
        header = ["layer", "op", "precision", "sqnr_db", "metric", "delta", "size"]
        rows = [[r.layer, r.op, r.precision, f"{r.sqnr_db:.2f}",
                 "-" if r.metric is None else f"{r.metric:.4g}", "-" if r.delta is None else f"{r.delta:+.4g}",
                 str(r.size)] for r in self.ranked()]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in [header, *rows]]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """A bar chart of SQNR per layer and precision, saved to ``path`` (needs matplotlib)."""
        require("matplotlib", "plot", "SensitivityReport.plot").use("Agg")
        import matplotlib.pyplot as plt
        layers = list(dict.fromkeys(r.layer for r in self.rows))
        precisions = list(dict.fromkeys(r.precision for r in self.rows))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) * len(precisions)), 3.5))
        width = 0.8 / len(precisions)
        for j, p in enumerate(precisions):
            values = {r.layer: r.sqnr_db for r in self.rows if r.precision == p}
            ax.bar(np.arange(len(layers)) + j * width, [values.get(name, np.nan) for name in layers], width, label=p)
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=45, ha="right")
        ax.set_ylabel("output SQNR (dB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _config(config: QuantConfig | Mapping | None) -> QuantConfig:
    """The config with every layer float unless told otherwise (overrides drop: they are what varies)."""
    c = QuantConfig.of(config)
    return QuantConfig(**{**c.__dict__, "layers": {}})


def sensitivity(graph: Graph, data: object, config: QuantConfig | Mapping | None = None, metric: Metric | None = None,
                *, precisions: tuple[str, ...] | None = None) -> SensitivityReport:
    """Quantize each Conv / Gemm layer alone, at each of ``precisions`` (default: the config's
    precision), and report the output SQNR against the float graph on ``data`` (also the
    calibration data) and the change of ``metric(outputs)``, if given."""
    c = _config(config)
    precisions = (c.precision,) if precisions is None else tuple(precisions)
    for p in precisions:
        if p not in PRECISIONS or p == "float":
            raise ValueError(f"precisions: expected quantized precisions from {list(PRECISIONS[:-1])}, got {p!r}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric: expected a callable outputs -> float, got {type(metric).__name__}")
    quantizer = Quantizer(graph, data, c)
    everything_float = {layer.name: "float" for layer in quantizer.layers}
    reference = evaluate(quantizer.build(everything_float), quantizer.feeds)
    float_metric = None if metric is None else float(metric(reference))
    return SensitivityReport(_rows(quantizer, reference, metric, float_metric, precisions), float_metric,
                             model_size(quantizer.build(everything_float)))


def _rows(quantizer: Quantizer, reference: dict[str, np.ndarray], metric: Metric | None, float_metric: float | None,
          precisions: tuple[str, ...]) -> list[SensitivityRow]:
    everything_float = {layer.name: "float" for layer in quantizer.layers}
    rows = []
    for layer in quantizer.layers:
        for p in precisions:
            if effective_precision(layer, p) != p:  # no op of that format for this layer (Quantizer.substitutions)
                continue
            q = quantizer.build({**everything_float, layer.name: p})
            outputs = evaluate(q, quantizer.feeds)
            value = None if metric is None else float(metric(outputs))
            rows.append(SensitivityRow(layer.name, layer.node.op, p, _sqnr(reference, outputs), value,
                                       None if value is None else value - float_metric, model_size(q)))
    return rows


def mixed_precision(graph: Graph, data: object, *, choices: tuple[str, ...] = ("int8", "int4"),
                    size_budget: int | None = None, accuracy_budget: float | None = None, metric: Metric | None = None,
                    config: QuantConfig | Mapping | None = None) -> dict[str, str]:
    """A precision per layer (name -> precision) found greedily; see the module docstring.

    ``choices``: precisions to pick from (ordered here by bits); ``size_budget``: bytes of the
    saved model to reach; ``accuracy_budget``: largest allowed ``metric(float) - metric(quantized)``
    (needs ``metric``); at least one budget is required. ``config`` sets the other options.
    """
    choices = tuple(sorted(dict.fromkeys(choices), key=lambda p: -BITS.get(p, 0)))
    if not choices or any(p not in PRECISIONS for p in choices):
        raise ValueError(f"choices: expected precisions from {list(PRECISIONS)}, got {choices!r}")
    if size_budget is None and accuracy_budget is None:
        raise ValueError("size_budget, accuracy_budget: give at least one")
    if size_budget is not None and (not isinstance(size_budget, (int, np.integer)) or size_budget <= 0):
        raise ValueError(f"size_budget: expected a positive number of bytes, got {size_budget!r}")
    if accuracy_budget is not None and metric is None:
        raise ValueError("metric: required with accuracy_budget")
    c = _config(config)
    quantizer = Quantizer(graph, data, c)
    names = [layer.name for layer in quantizer.layers]
    reference = evaluate(quantizer.build({n: "float" for n in names}), quantizer.feeds)
    float_metric = None if metric is None else float(metric(reference))
    rows = _rows(quantizer, reference, metric, float_metric, tuple(p for p in choices if p != "float"))
    score = {(r.layer, r.precision): (r.delta or 0.0, r.sqnr_db) for r in rows}
    current = {n: choices[0] for n in names}
    frozen: set[str] = set()

    def size() -> int:
        return model_size(quantizer.build(current))

    while size_budget is None or size() > size_budget:
        steps = [(n, choices[choices.index(current[n]) + 1]) for n in names
                 if n not in frozen and current[n] != choices[-1]]
        steps = [s for s in steps if s in score or s[1] == "float"]  # a layer's format must have an op for it
        if not steps:
            break
        name, lower = max(steps, key=lambda s: score.get(s, (0.0, np.inf)))
        previous, current[name] = current[name], lower
        if accuracy_budget is not None:
            drop = float_metric - float(metric(evaluate(quantizer.build(current), quantizer.feeds)))
            if drop > accuracy_budget:
                current[name] = previous
                frozen.add(name)
    return current
