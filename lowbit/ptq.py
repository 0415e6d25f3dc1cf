"""Post-training quantization of a float graph's Conv and Gemm layers: :func:`quantize_model`.

Steps, on a copy of the graph:

1. fold batch norms and fuse Relu / Clip(0, 6) into the layers (``lowbit.runtime.passes``);
2. optionally SmoothQuant the int8 Gemm layers: ``W' = W * s`` with ``s = max|x| ** a / max|W| ** (1 - a)``
   per input channel, ``x / s`` folded into the producing Gemm's rows when it is private to the
   layer (``relu(z) / s = relu(z / s)`` for ``s > 0``), else computed by an explicit Mul;
3. run the float graph over the calibration data, streaming each layer's input and output
   into an activation observer (``lowbit.quantization.calibration``) and a running mean;
4. quantize each layer's weights to its precision and rewrite it:

   ========  ==============================  ==============================================
   int8      Conv -> QLinearConv             x, y uint8 per tensor (calibrated, static); w int8
             Gemm -> lowbit.QGemm            symmetric per output channel; bias int32 in units of
             (dynamic: lowbit.DynamicQGemm)  ``x_scale * w_scale`` (QLinearConv) or float32
   other     the op of its weight format     weight only, round to nearest on the format's grid
             (``lowbit.quantization.         (int4 / nf4: per group of ``group_size`` along K;
             formats``)                      ternary, binary: per output channel)
   float     unchanged
   ========  ==============================  ==============================================

   A layer whose format has no op for it (a ternary or nf4 Conv, a grouped binary Conv) becomes
   int8, and :meth:`Quantizer.substitutions` says so (``quantize_model`` warns).
   Consecutive int8 layers pass uint8 codes to each other: a QuantizeLinear where a run
   starts, a DequantizeLinear only before a consumer that needs floats. MaxPool, Flatten and
   Reshape of codes run on the codes (:data:`CODE_OPS`: max commutes with the monotone
   dequantization, the others only move values), keeping the chain unbroken. Conv layers are
   always static; ``activations="dynamic"`` applies to Gemm layers, which then need no data.

With ``bias_correction`` each quantized (non-binary) layer's bias becomes
``b - (W_q - W) @ E[x]`` (``lowbit.quantization.weights.bias_correction``; for a Conv,
``E[x]`` per input channel against the spatially summed filters, ignoring the border).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping

import numpy as np

from lowbit.graph.ir import Graph, Node, fresh_name
from lowbit.quantization import grid
from lowbit.quantization.calibration import OBSERVERS, Observer, get_observer
from lowbit.quantization.formats import FORMATS
from lowbit.quantization.scheme import int8
from lowbit.quantization.weights import apply_smoothing, bias_correction, smoothquant_scales
from lowbit.runtime.passes import fold_batch_norm, fuse_activations, quantized_op

#: Float ops that run unchanged on uint8 codes, whose output keeps the input's scale and zero point.
CODE_OPS = ("MaxPool", "Flatten", "Reshape")
from lowbit.runtime.session import Session

PRECISIONS = (*FORMATS, "float")
BITS = {"float": 32, **{name: fmt.bits for name, fmt in FORMATS.items()}}
ACTIVATION_SCHEME = int8(signed=False, symmetric=False)  # uint8 activations, per tensor


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`quantize_model` does.

    precision : default for Conv / Gemm layers: a weight format ("int8", "int4", "nf4", "ternary", "binary") or
        "float"
    layers : node name -> precision, overriding the default (and ``keep_first_last``)
    per_channel : int8 weight scales per output channel (else one per layer)
    observer : activation observer (``lowbit.quantization.calibration.OBSERVERS``)
    activations : "static" (calibrated uint8 qparams) or "dynamic" (Gemm: per batch at run time)
    bias_correction : correct each layer's bias for the mean shift of its weight error
    smoothquant : SmoothQuant migration strength ``a`` in [0, 1] for int8 Gemm layers, or None
    keep_first_last : with a binary / ternary default, the first and last layers stay int8
    group_size : group size along K of the grouped formats (int4, nf4), or None for each format's default
    """

    precision: str = "int8"
    layers: Mapping[str, str] = field(default_factory=dict)
    per_channel: bool = True
    observer: str = "minmax"
    activations: str = "static"
    bias_correction: bool = False
    smoothquant: float | None = None
    keep_first_last: bool = True
    group_size: int | None = None

    def __post_init__(self) -> None:
        _one_of("config.precision", self.precision, PRECISIONS)
        if not isinstance(self.layers, Mapping):
            raise TypeError(f"config.layers: expected a dict of node name -> precision, got {type(self.layers).__name__}")
        object.__setattr__(self, "layers", dict(self.layers))
        for name, precision in self.layers.items():
            _one_of(f"config.layers[{name!r}]", precision, PRECISIONS)
        _one_of("config.observer", self.observer, tuple(OBSERVERS))
        _one_of("config.activations", self.activations, ("static", "dynamic"))
        used = {self.precision, *self.layers.values()} - {"float"}
        grouped = [f for f in FORMATS.values() if f.grouped and (f.name in used or self.group_size is not None)]
        for fmt in grouped if self.group_size is None else [f for f in grouped if f.name in used] or grouped[:1]:
            try:
                fmt.group_size(self.group_size)
            except ValueError as error:
                raise ValueError(f"config.{error}") from None
        if self.smoothquant is not None and (isinstance(self.smoothquant, bool)
                                             or not isinstance(self.smoothquant, (int, float))
                                             or not 0.0 <= self.smoothquant <= 1.0):
            raise ValueError(f"config.smoothquant: expected None or a number in [0, 1], got {self.smoothquant!r}")

    @classmethod
    def of(cls, config: QuantConfig | Mapping | None) -> QuantConfig:
        """A config from None (the defaults), a dict of fields, or a config."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = set(config) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"config: unknown fields {sorted(unknown)}; fields: {[f.name for f in fields(cls)]}")
            return cls(**config)
        raise TypeError(f"config: expected a QuantConfig, a dict or None, got {type(config).__name__}")


def _one_of(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


@dataclass
class Layer:
    """A quantizable Conv / Gemm node: float32 weights (Conv OIHW, Gemm [out, in]) and bias."""

    node: Node
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def x(self) -> str:
        return self.node.inputs[0]

    @property
    def y(self) -> str:
        return self.node.outputs[0]


def find_layers(graph: Graph) -> list[Layer]:
    """The Conv / Gemm nodes with constant weights (and bias) in a form the quantized ops take, in order."""
    layers = []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 2 or node.inputs[1] not in graph.params:
            continue
        bias_name = node.inputs[2] if len(node.inputs) > 2 else ""
        if bias_name and bias_name not in graph.params:
            continue
        w = graph.params[node.inputs[1]].astype(np.float32)
        b = graph.params[bias_name].astype(np.float32).reshape(-1) if bias_name else None
        a = node.attrs
        if node.op == "Conv":
            if a.get("auto_pad", "NOTSET") != "NOTSET" or w.ndim != 4:
                continue
        else:
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (b is not None and a.get("beta", 1.0) != 1.0):
                continue
            w = w if a.get("transB", 0) else np.ascontiguousarray(w.T)
        if b is not None and b.size != w.shape[0]:
            continue
        layers.append(Layer(node, np.ascontiguousarray(w), b))
    return layers


def effective_precision(layer: Layer, precision: str) -> str:
    """The precision a layer really gets: its own, or int8 when its format has no op for it (see the module)."""
    if precision == "float" or FORMATS[precision].op(layer.node.op, layer.node.attrs.get("group", 1)):
        return precision
    return "int8"


def _feeds(graph: Graph, data: object) -> list[dict[str, np.ndarray]]:
    """Calibration batches as feed dicts: an iterable of dicts (or arrays, for a one-input graph); one dict or
    array is one batch."""
    if isinstance(data, (dict, np.ndarray)):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"calibration_data: expected an iterable of feed dicts or arrays, got {type(data).__name__}")
    feeds = []
    for item in data:
        if isinstance(item, np.ndarray):
            if len(graph.inputs) != 1:
                raise ValueError(f"calibration_data: arrays need a one-input graph; this one has inputs "
                                 f"{list(graph.inputs)}: give feed dicts")
            item = {next(iter(graph.inputs)): item}
        if not isinstance(item, dict):
            raise TypeError(f"calibration_data: expected feed dicts or arrays, got an item of type {type(item).__name__}")
        feeds.append(item)
    if not feeds:
        raise ValueError("calibration_data: no batches")
    return feeds


class _Statistics:
    """Streamed per-tensor statistics: an activation observer, and the mean over all axes but 1."""

    def __init__(self, observer: str):
        self.observer: Observer = get_observer(observer, ACTIVATION_SCHEME)
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        self.observer.observe(x)
        axes = tuple(a for a in range(x.ndim) if a != 1)
        s = x.sum(axis=axes, dtype=np.float64)
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.size // x.shape[1]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count


class Quantizer:
    """A float graph prepared once (folded, fused, smoothed, calibrated) to build quantized variants of.

    ``build(precisions)`` rewrites it with one precision per layer; :func:`quantize_model` builds
    the config's, ``lowbit.sensitivity`` builds many without calibrating again.
    """

    def __init__(self, graph: Graph, calibration_data: object = None, config: QuantConfig | Mapping | None = None):
        if not isinstance(graph, Graph):
            raise TypeError(f"graph: expected a lowbit.graph.Graph, got {type(graph).__name__}")
        self.config = QuantConfig.of(config)
        quantized = [n.name for n in graph.nodes if quantized_op(n.op)]
        if quantized:
            raise ValueError(f"graph: already quantized (nodes {quantized[:5]}{' ...' if len(quantized) > 5 else ''}); "
                             f"quantize the float model it was made from")
        self.graph = fuse_activations(fold_batch_norm(graph.copy().validate()))
        self.layers = find_layers(self.graph)
        names = [layer.name for layer in self.layers]
        unknown = sorted(set(self.config.layers) - set(names))
        if unknown:
            raise ValueError(f"config.layers: no Conv / Gemm layer named {unknown}; the layers are {names}")
        self.feeds = None if calibration_data is None else _feeds(self.graph, calibration_data)
        self.stats: dict[str, _Statistics] = {}
        if self.config.smoothquant is not None:
            self._smooth()
        if self.feeds is not None:
            self._calibrate()

    def precisions(self) -> dict[str, str]:
        """The config's precision of every layer (name -> precision)."""
        c, last = self.config, len(self.layers) - 1
        keep = c.keep_first_last and c.precision in ("binary", "ternary")
        return {layer.name: c.layers.get(layer.name, "int8" if keep and i in (0, last) else c.precision)
                for i, layer in enumerate(self.layers)}

    def _run(self, graph: Graph, fetch: list[str]):
        session = Session(graph, optimize=False)
        for feeds in self.feeds:
            yield session.run(feeds, fetch)

    def _smooth(self) -> None:
        """SmoothQuant every int8 Gemm layer (needs one extra pass for the input maxima)."""
        if self.feeds is None:
            raise ValueError("calibration_data: required with config.smoothquant")
        chosen = self.precisions()
        targets = [layer for layer in self.layers if layer.node.op == "Gemm" and chosen[layer.name] == "int8"]
        absmax: dict[str, np.ndarray] = {}
        for values in self._run(self.graph, sorted({layer.x for layer in targets})):
            for name, x in values.items():
                m = np.abs(x).max(axis=0)
                absmax[name] = np.maximum(absmax[name], m) if name in absmax else m
        graph = self.graph
        for layer in targets:
            s = smoothquant_scales(absmax[layer.x], layer.weight, float(self.config.smoothquant))
            graph.params[layer.node.inputs[1]] = apply_smoothing(layer.weight, s).astype(np.float32)
            layer.node.attrs["transB"] = 1
            producer = graph.producer(layer.x)
            private = layer.x not in graph.outputs and len(graph.consumers(layer.x)) == 1
            if (private and producer is not None and producer.op == "Gemm" and producer.attrs.get("activation") in
                    (None, "relu") and producer.name in {t.name for t in self.layers}):
                prev = next(t for t in self.layers if t.name == producer.name)
                graph.params[producer.inputs[1]] = (prev.weight / s[:, None]).astype(np.float32)
                producer.attrs["transB"] = 1
                if prev.bias is not None:
                    graph.params[producer.inputs[2]] = (prev.bias / s).astype(np.float32)
            else:
                inv = _fresh_name(graph, f"{layer.name}_smooth_inv")
                smoothed = _fresh_name(graph, f"{layer.x}_smoothed")
                graph.params[inv] = (1.0 / s).astype(np.float32)
                graph.nodes.insert(graph.nodes.index(layer.node),
                                   Node("Mul", [layer.x, inv], [smoothed], {}, _fresh_name(graph, f"{layer.name}_smooth")))
                layer.node.inputs[0] = smoothed
            self.layers = find_layers(graph.validate())

    def _calibrate(self) -> None:
        tensors = sorted({t for layer in self.layers for t in (layer.x, layer.y)})
        self.stats = {t: _Statistics(self.config.observer) for t in tensors}
        for values in self._run(self.graph, tensors):
            for name, x in values.items():
                self.stats[name].update(x)

    def _qparams(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        if tensor not in self.stats:
            raise ValueError("calibration_data: required for static int8 layers (Conv, or Gemm with "
                             "activations='static') and for bias_correction")
        params = self.stats[tensor].observer.qparams()
        return params.scale.astype(np.float32).reshape(()), params.zero_point.astype(np.uint8).reshape(())

    def build(self, precisions: Mapping[str, str] | None = None) -> Graph:
        """The quantized graph for ``precisions`` (layer name -> precision; default :meth:`precisions`)."""
        chosen = self.precisions()
        if precisions is not None:
            unknown = sorted(set(precisions) - set(chosen))
            if unknown:
                raise ValueError(f"precisions: no Conv / Gemm layer named {unknown}; the layers are {list(chosen)}")
            for name, p in precisions.items():
                _one_of(f"precisions[{name!r}]", p, PRECISIONS)
            chosen.update(precisions)
        effective = {layer.name: effective_precision(layer, chosen[layer.name]) for layer in self.layers}
        return _Rewriter(self, effective).graph

    def substitutions(self, precisions: Mapping[str, str] | None = None) -> list[str]:
        """One line per layer that does not get the precision asked for (default :meth:`precisions`), saying what
        it gets instead and why, e.g. ``"conv_3: ternary not available for Conv, kept int8"``."""
        chosen = {**self.precisions(), **(precisions or {})}
        lines = []
        for layer in self.layers:
            asked = chosen[layer.name]
            if effective_precision(layer, asked) != asked:
                group = layer.node.attrs.get("group", 1)
                what = f"grouped {layer.node.op} (group {group})" if layer.node.op in FORMATS[asked].ops else \
                    layer.node.op
                lines.append(f"{layer.name}: {asked} not available for {what}, kept int8")
        return lines

    def summary(self) -> str:
        """A table of the config's layers: op, the precision each really gets, and why when it is not the config's
        default (an override, keep_first_last, or no op of that format for the layer)."""
        c, chosen = self.config, self.precisions()
        rows = [("layer", "op", "precision", "why")]
        for layer in self.layers:
            asked, got = chosen[layer.name], effective_precision(layer, chosen[layer.name])
            why = ""
            if layer.name in c.layers:
                why = "config.layers"
            elif asked != c.precision:
                why = "first or last layer (keep_first_last)"
            if got != asked:
                why = f"{asked} not available for {layer.node.op}" + (f" (group {layer.node.attrs['group']})" if
                                                                       layer.node.attrs.get("group", 1) != 1 else "")
            rows.append((layer.name, layer.node.op, got, why))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)
        return "\n".join(line.rstrip() for line in lines)


def _fresh_name(graph: Graph, stem: str) -> str:
    return fresh_name(stem, set(graph.params) | set(graph.inputs) | {t for n in graph.nodes for t in n.outputs} | {
        n.name for n in graph.nodes})


class _Rewriter:
    """One pass over the float graph emitting quantized nodes; tensors live as floats, as uint8 codes, or both."""

    def __init__(self, q: Quantizer, precisions: dict[str, str]):
        self.q, self.config = q, q.config
        source = q.graph
        self.params = dict(source.params)
        self.nodes: list[Node] = []
        self.taken = set(source.params) | set(source.inputs) | {t for n in source.nodes for t in n.outputs} | {
            n.name for n in source.nodes}
        self.floats = set(source.inputs) | set(source.params)
        self.codes: dict[str, tuple[str, str, str]] = {}  # float tensor -> (codes, scale, zero point)
        layers = {layer.name: layer for layer in q.layers}
        static = {name for name, p in precisions.items() if p == "int8" and (
            layers[name].node.op == "Conv" or self.config.activations == "static")}
        static_inputs = {layers[name].x for name in static}
        for node in source.nodes:
            layer = layers.get(node.name)
            precision = precisions[node.name] if layer is not None else "float"
            if precision == "float" and self._on_codes(node):
                continue
            if precision == "float":
                for t in node.inputs:
                    self._float(t)
                self.nodes.append(node)
                self.floats.update(node.outputs)
            elif node.name in static:
                self._static_int8(layer, quantized_out=node.op == "Conv" or layer.y in static_inputs)
            else:
                self._float(layer.x)
                self._weight_only(layer, precision)
                self.floats.add(layer.y)
        for t in source.outputs:
            self._float(t)
        used = {t for n in self.nodes for t in n.inputs}
        self.graph = Graph(self.nodes, dict(source.inputs), list(source.outputs),
                           {k: v for k, v in self.params.items() if k in used}).copy().validate()

    def _fresh(self, stem: str) -> str:
        return fresh_name(stem, self.taken)

    def _param(self, stem: str, value: np.ndarray) -> str:
        name = self._fresh(stem)
        self.params[name] = np.ascontiguousarray(value)
        return name

    def _float(self, tensor: str) -> None:
        """Make ``tensor`` available as floats (a DequantizeLinear of its codes when needed)."""
        if tensor and tensor not in self.floats:
            codes, scale, zero = self.codes[tensor]
            self.nodes.append(Node("DequantizeLinear", [codes, scale, zero], [tensor], {},
                                   self._fresh(f"{tensor}_dequantize")))
            self.floats.add(tensor)

    def _on_codes(self, node: Node) -> bool:
        """Emit a :data:`CODE_OPS` node on the codes of its input when that exists only as codes; whether it did."""
        x = node.inputs[0] if node.inputs else ""
        if node.op not in CODE_OPS or len(node.outputs) != 1 or x not in self.codes or x in self.floats:
            return False
        codes, scale, zero = self.codes[x]
        out = self._fresh(f"{node.outputs[0]}_quantized")
        self.nodes.append(Node(node.op, [codes, *node.inputs[1:]], [out], dict(node.attrs), node.name))
        self.codes[node.outputs[0]] = (out, scale, zero)
        return True

    def _codes(self, tensor: str) -> tuple[str, str, str]:
        """``tensor`` as uint8 codes (a QuantizeLinear of the floats when needed)."""
        if tensor not in self.codes:
            scale, zero = self.q._qparams(tensor)
            names = (self._fresh(f"{tensor}_quantized"), self._param(f"{tensor}_scale", scale),
                     self._param(f"{tensor}_zero_point", zero))
            self._float(tensor)
            self.nodes.append(Node("QuantizeLinear", [tensor, *names[1:]], [names[0]], {},
                                   self._fresh(f"{tensor}_quantize")))
            self.codes[tensor] = names
        return self.codes[tensor]

    def _attrs(self, layer: Layer) -> dict:
        keep = ("kernel_shape", "strides", "pads", "dilations", "group", "activation")
        attrs = {k: v for k, v in layer.node.attrs.items() if k in keep}
        if layer.node.op == "Conv":
            attrs["kernel_shape"] = list(layer.weight.shape[2:])
        return attrs

    def _corrected_bias(self, layer: Layer, w_q: np.ndarray) -> np.ndarray | None:
        """The layer's bias, corrected for the weight error ``w_q - w`` when configured."""
        if not self.config.bias_correction:
            return layer.bias
        if layer.x not in self.q.stats:
            raise ValueError("calibration_data: required for bias_correction")
        w, wq = layer.weight, w_q.reshape(layer.weight.shape)
        if layer.node.op == "Conv":  # E[x] per input channel against the filters summed over the window
            w, wq = _dense_channels(w, layer), _dense_channels(wq, layer)
        return bias_correction(w, wq, self.q.stats[layer.x].mean, layer.bias).astype(np.float32)

    def _static_int8(self, layer: Layer, quantized_out: bool) -> None:
        x_codes, x_scale, x_zero = self._codes(layer.x)
        codes, w_scale = _int8_weights(layer.weight, self.config.per_channel)
        bias = self._corrected_bias(layer, codes * w_scale.reshape((-1,) + (1,) * (codes.ndim - 1)))
        sx = self.params[x_scale]
        stem = layer.name
        w_names = [self._param(f"{stem}_w", codes), self._param(f"{stem}_w_scale", w_scale),
                   self._param(f"{stem}_w_zero_point", np.zeros(w_scale.shape, np.int8))]
        if quantized_out:
            y_scale, y_zero = self.q._qparams(layer.y)
            y = (self._fresh(f"{layer.y}_quantized"), self._param(f"{layer.y}_scale", y_scale),
                 self._param(f"{layer.y}_zero_point", y_zero))
            self.codes[layer.y] = y
            out, y_inputs = y[0], list(y[1:])
        else:
            out, y_inputs = layer.y, ["", ""]
            self.floats.add(layer.y)
        if bias is None:
            b = ""
        elif layer.node.op == "Conv":  # ONNX: int32 in accumulator units
            unit = np.float64(sx) * w_scale.astype(np.float64)
            b = self._param(f"{stem}_b", np.clip(np.rint(bias / unit), -2**31, 2**31 - 1).astype(np.int32))
        else:
            b = self._param(f"{stem}_b", bias)
        op = "QLinearConv" if layer.node.op == "Conv" else "lowbit.QGemm"
        self.nodes.append(Node(op, [x_codes, x_scale, x_zero, *w_names, *y_inputs, b], [out], self._attrs(layer),
                               layer.name))

    def _weight_only(self, layer: Layer, precision: str) -> None:
        """Layers with float inputs and outputs: dynamic int8 Gemm, or a weight-only format of the table."""
        w, stem, attrs = layer.weight, layer.name, self._attrs(layer)
        conv = layer.node.op == "Conv"
        if precision == "int8":  # dynamic Gemm
            codes, scale = _int8_weights(w, self.config.per_channel)
            scale = np.broadcast_to(scale, (w.shape[0],)).astype(np.float32)
            inputs = [self._param(f"{stem}_w", codes), self._param(f"{stem}_w_scale", scale), ""]
            op, w_q = "lowbit.DynamicQGemm", codes * scale[:, None]
        else:
            fmt = FORMATS[precision]
            op = fmt.op(layer.node.op, layer.node.attrs.get("group", 1))
            group_size = fmt.group_size(self.config.group_size)
            rows_of_filters = conv and fmt.conv_layout == "rows"  # columns in (ky, kx, c) order
            rows = w.transpose(0, 2, 3, 1) if rows_of_filters else w
            codes, scales = fmt.quantize(rows.reshape(w.shape[0], -1), group_size)
            w_q = fmt.dequantize(codes, scales, group_size).reshape(rows.shape)
            if rows_of_filters:
                w_q = w_q.transpose(0, 3, 1, 2)
            else:
                codes = codes.reshape(w.shape)
            inputs = [self._param(f"{stem}_codes", codes), self._param(f"{stem}_scales", scales)]
            if group_size is not None:
                attrs["group_size"] = group_size
            if fmt.binarizes_input and conv:
                attrs["pad_value"] = 0  # as the float Conv pads sign(x)
        # binary layers also binarize their inputs: a weight-error correction does not apply
        bias = layer.bias if FORMATS[precision].binarizes_input else self._corrected_bias(layer, w_q)
        inputs.append("" if bias is None else self._param(f"{stem}_b", bias))
        self.nodes.append(Node(op, [layer.x, *inputs], [layer.y], attrs, layer.name))


def _int8_weights(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and scales (``max|w| / 127``, per output channel or per tensor)."""
    scheme = int8(granularity="channel", axis=0) if per_channel else int8()
    params = grid.fit(w, scheme)
    return grid.quantize(w, scheme, params), params.scale.astype(np.float32)


def _dense_channels(w: np.ndarray, layer: Layer) -> np.ndarray:
    """OIHW filters summed over the window, as a dense [O, C] matrix (block diagonal for grouped Conv)."""
    group = int(layer.node.attrs.get("group", 1))
    o, cg = w.shape[:2]
    og = o // group
    summed = w.sum(axis=(2, 3))
    dense = np.zeros((o, cg * group), np.float64)
    for g in range(group):
        dense[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = summed[g * og:(g + 1) * og]
    return dense


def quantize_model(graph: Graph, calibration_data: object = None,
                   config: QuantConfig | Mapping | None = None) -> Graph:
    """Quantize the Conv / Gemm layers of float ``graph`` (see the module docstring); returns a new graph.

    ``calibration_data``: an iterable of feed dicts (or arrays for a one-input graph), streamed
    once (twice with SmoothQuant); needed unless every int8 layer is a dynamic Gemm and
    neither bias correction nor SmoothQuant is asked for. ``config``: a :class:`QuantConfig`,
    a dict of its fields, or None for int8 static per-channel min-max.
    """
    quantizer = Quantizer(graph, calibration_data, config)
    for line in quantizer.substitutions():
        warnings.warn(line, stacklevel=2)
    return quantizer.build()
