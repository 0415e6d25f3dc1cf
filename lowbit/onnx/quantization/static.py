"""``quantize_static``: weights and calibrated activations, in QDQ or QOperator form
(:mod:`lowbit.onnx.quantization`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lowbit.onnx.accuracy import AccuracyTarget
from lowbit.onnx.quantization._common import (_OBSERVERS, EVALUATION_BATCHES, PASS_THROUGH, CalibrationMethod,
                                               QuantFormat, QuantizationReport, QuantType, _calibration_method,
                                               _check_reader, _Held, _ignored, _Model, _op_types, _quant_format,
                                               _quant_type, _run_float, _search)
from lowbit.onnx.quantization._weights import _weight_codes
from lowbit.onnx.quantization.dynamic import _bias_vector, _product

STATIC_OPS = ("Conv", "MatMul", "Gemm")


@dataclass
class _Group:
    """A quantized Conv / MatMul / Gemm: its activation input ``x``, the float weights and bias, the activation
    (Relu / Clip(0, 6)) that alone reads its output, the tensor quantized at its output (``out``: the activation's
    output if any) and its own output ``pre``."""

    node: Any
    x: str
    weight: np.ndarray
    bias: np.ndarray | None
    axis: int  # the output-channel axis of the stored weight
    act: Any | None
    out: str
    pre: str
    attrs: dict[str, Any]


def _activation(model: _Model, tensor: str) -> Any | None:
    """The Relu / Clip(0, 6) that alone reads ``tensor``, else None."""
    act = model.private(tensor)
    if act is None or act.domain not in ("", "ai.onnx") or len(act.output) != 1:
        return None
    if act.op_type == "Relu":
        return act
    if act.op_type != "Clip":
        return None
    attrs = {a.name: model.onnx.helper.get_attribute_value(a) for a in act.attribute}
    bounds = []
    for index, key in ((1, "min"), (2, "max")):
        name = act.input[index] if len(act.input) > index else ""
        value = model.constant(name) if name else attrs.get(key)
        if value is None or np.size(value) != 1:
            return None
        bounds.append(float(np.asarray(value).reshape(-1)[0]))
    return act if bounds == [0.0, 6.0] else None


def _fold_batch_norms(model: _Model, report: QuantizationReport, wanted: Callable[[Any], bool]) -> None:
    """Fold each BatchNormalization that alone reads a wanted Conv's output into the Conv's weights and bias
    (``w' = w g / sqrt(v + eps)``, ``b' = (b - mean) g / sqrt(v + eps) + beta``, in float64)."""
    onnx = model.onnx
    removed = set()
    for node in model.nodes:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not wanted(node):
            continue
        bn = model.private(node.output[0])
        if bn is None or bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        w = model.constant(node.input[1])
        params = [model.constant(t) for t in bn.input[1:]]
        b = model.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(len(w), np.float32)
        if w is None or b is None or any(p is None or p.size != len(w) for p in params) or w.dtype != np.float32:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        factor = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        folded_w = (w.astype(np.float64) * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        folded_b = ((b.astype(np.float64) - mean) * factor + beta).astype(np.float32)
        names = [model.add(f"{node.input[1]}_bn_folded", folded_w), model.add(f"{node.name}.bias_bn_folded", folded_b)]
        model._values.update(zip(names, (folded_w, folded_b)))
        del node.input[1:]
        node.input.extend(names)
        node.output[0] = bn.output[0]
        removed.add(id(bn))
        report.notes.append(f"BatchNormalization {bn.name!r} folded into Conv {node.name!r}")
    model.commit([n for n in model.nodes if id(n) not in removed])


def _group(model: _Model, node: Any) -> tuple[_Group | None, str]:
    """The quantizable Conv / MatMul / Gemm ``node`` as a :class:`_Group`, or ``(None, why not)``."""
    x = node.input[0]
    if model.constant(x) is not None:
        return None, "its input is a constant (folded ahead of a run)"
    attrs = {a.name: model.onnx.helper.get_attribute_value(a) for a in node.attribute}
    bias = None
    if node.op_type == "Conv":
        w, why = model.float_weight(node.input[1])
        if w is None:
            return None, why
        axis = 0
        if len(node.input) > 2 and node.input[2]:
            bias = _bias_vector(model.constant(node.input[2]), w.shape[0])
            if bias is None:
                return None, f"its bias {node.input[2]!r} is not a constant float32 vector"
    elif node.op_type == "MatMul":
        w, why = model.float_weight(node.input[1], 2)
        if w is None:
            return None, why
        axis = 1
    else:
        found, why = _product(model, node, fold_bias=False)
        if found is None:
            return None, why
        w, bias = model.constant(node.input[1]), found.bias
        axis = 0 if attrs.get("transB", 0) else 1
    act = None if node.output[0] in model.outputs else _activation(model, node.output[0])
    out = act.output[0] if act is not None else node.output[0]
    return _Group(node, x, w, bias, axis, act, out, node.output[0], attrs), ""


def _scheme(activation: QuantType, symmetric: bool):
    from lowbit.quantization.scheme import QScheme

    signed = activation is QuantType.QInt8
    return QScheme(8, signed=signed, symmetric=symmetric, name="int8" if signed else "uint8")


def _observer_factory(method: CalibrationMethod, scheme: Any, options: dict) -> Callable[[], Any]:
    from lowbit.quantization.calibration import get_observer

    name, kwargs = _OBSERVERS[method], {}
    if method is CalibrationMethod.MinMax and options.get("CalibMovingAverage", False):
        name, kwargs = "moving_average", {"momentum": 1.0 - float(options.get("CalibMovingAverageConstant", 0.01))}
    if method is CalibrationMethod.Percentile:
        kwargs["percentile"] = float(options.get("CalibPercentile", 99.999))
    if method is not CalibrationMethod.MinMax and "CalibNumBins" in options:
        kwargs["bins"] = int(options["CalibNumBins"])
    get_observer(name, scheme, **kwargs)  # checks the options once, before any batch is read
    return lambda: get_observer(name, scheme, **kwargs)


def quantize_static(model_input: Any, model_output: Any, calibration_data_reader: Any = None,
                    quant_format: Any = QuantFormat.QDQ, op_types_to_quantize: Any = None, per_channel: bool = False,
                    reduce_range: bool = False, activation_type: Any = QuantType.QUInt8,
                    weight_type: Any = QuantType.QInt8, nodes_to_quantize: Any = None, nodes_to_exclude: Any = None,
                    use_external_data_format: bool = False, calibrate_method: Any = CalibrationMethod.MinMax,
                    calibration_providers: Any = None, extra_options: dict | None = None,
                    calibration_cache_path: Any = None, *, accuracy_target: Any = None) -> QuantizationReport:
    """Quantize ``model_input``'s Conv, MatMul and Gemm nodes with constant weights (and the activations between
    them, calibrated on ``calibration_data_reader``'s batches) to 8 bits; write ``model_output`` in ``quant_format``
    (QDQ or QOperator); return a :class:`QuantizationReport`. See the module docstring for what is written.

    ``activation_type`` / ``weight_type``: QUInt8 or QInt8. ``per_channel``: one weight scale per output channel.
    ``reduce_range``: 7-bit weights. ``calibrate_method``: MinMax, Entropy, Percentile or lowbit's MSE.
    ``calibration_providers`` and ``calibration_cache_path`` are accepted for compatibility and not used (lowbit
    calibrates on its own CPU kernels, every time). ``accuracy_target`` (lowbit's): which layers stay float so that
    the outputs meet it (module docstring).
    """
    fmt = _quant_format(quant_format, "quant_format")
    activation = _quant_type(activation_type, "activation_type")
    wtype = _quant_type(weight_type, "weight_type")
    for argument, value in (("activation_type", activation), ("weight_type", wtype)):
        if value not in (QuantType.QInt8, QuantType.QUInt8):
            raise ValueError(f"{argument}: quantize_static writes QInt8 or QUInt8, got {value.name} (4-bit and lowbit "
                             "weight formats: quantize_dynamic)")
    method = _calibration_method(calibrate_method, "calibrate_method")
    _check_reader(calibration_data_reader, "calibration_data_reader", "quantize_static")
    target = None if accuracy_target is None else AccuracyTarget.of(accuracy_target)
    held: list[dict[str, np.ndarray]] = []
    reader = calibration_data_reader if target is None else _Held(calibration_data_reader, EVALUATION_BATCHES, held)
    options = dict(extra_options or {})
    act_symmetric = bool(options.get("ActivationSymmetric", options.get("CalibTensorRangeSymmetric",
                                                                        activation is QuantType.QInt8)))
    w_dtype = "int8" if wtype is QuantType.QInt8 else "uint8"
    w_symmetric = bool(options.get("WeightSymmetric", wtype is QuantType.QInt8))
    scheme = _scheme(activation, act_symmetric)
    new_observer = _observer_factory(method, scheme, options)

    model = _Model(model_input)
    op_types = _op_types(op_types_to_quantize, STATIC_OPS + PASS_THROUGH)
    excluded = model.selection(nodes_to_quantize, nodes_to_exclude)
    report = QuantizationReport(str(model_output), f"quantize_static ({fmt.name}, activations {activation.name}, "
                                f"weights {wtype.name}, {method.name})")
    _ignored(report, options)
    if fmt is QuantFormat.QOperator and activation is QuantType.QInt8 and wtype is QuantType.QUInt8:
        report.notes.append("ONNX Runtime 1.32 has no QLinearConv for int8 activations with uint8 weights: only "
                            "lowbit runs such Conv nodes (QDQ, or QInt8 weights, run in both)")
    opset = model.opset.get("", 1)
    if per_channel and opset < 13:
        report.notes.append(f"per_channel: opset {opset} has no per-axis DequantizeLinear (13 on); weights per tensor")
        per_channel = False

    def wanted(node: Any) -> bool:
        return node.domain in ("", "ai.onnx") and node.op_type in op_types and not excluded(node)

    _fold_batch_norms(model, report, wanted)

    # plan: the groups, the pass-through nodes, and the tensor whose observer gives each quantized tensor's params
    groups: dict[int, _Group] = {}
    passes: dict[int, Any] = {}
    root: dict[str, str] = {}
    acts = set()
    for node in model.nodes:
        if id(node) in acts:
            continue
        if node.domain in ("", "ai.onnx") and node.op_type in STATIC_OPS:
            why = excluded(node) or ("" if node.op_type in op_types else "not in op_types_to_quantize")
            group, because = (None, why) if why else _group(model, node)
            if group is None:
                report.add(node, "float", because)
                continue
            groups[id(node)] = group
            root.setdefault(group.x, group.x)
            root[group.out] = group.out
            if group.act is not None:
                acts.add(id(group.act))
        elif (node.domain in ("", "ai.onnx") and node.op_type in PASS_THROUGH and wanted(node) and node.input
              and node.input[0] in root and len(node.output) == 1
              and not (node.op_type == "MaxPool" and fmt is QuantFormat.QOperator and opset < 12)):
            passes[id(node)] = node
            root[node.output[0]] = root[node.input[0]]

    observed = set(root.values()) | ({g.pre for g in groups.values() if g.act is not None}
                                     if fmt is QuantFormat.QOperator else set())
    observers = {t: new_observer() for t in observed}
    if observers:
        report.batches = _run_float(model.proto, reader, sorted(observers),
                                    lambda name, value: observers[name].observe(value), "calibration_data_reader")
    codes_type = np.dtype(np.int8 if activation is QuantType.QInt8 else np.uint8)
    params: dict[str, tuple[str, str, float, int]] = {}  # root -> (scale name, zero point name, scale, zero point)

    def qparams(tensor: str) -> tuple[str, str, float, int]:
        key = root.get(tensor, tensor)
        if key not in params:
            p = observers[key].qparams()
            scale, zero = np.float32(p.scale.reshape(())), codes_type.type(int(p.zero_point.reshape(())))
            params[key] = (model.add(f"{key}_scale", scale), model.add(f"{key}_zero_point", zero), float(scale),
                           int(zero))
        return params[key]

    writer = (_write_qdq if fmt is QuantFormat.QDQ else _write_qoperator)
    weights = _WeightWriter(model, w_dtype, w_symmetric, per_channel, reduce_range, fmt)
    originals = [_copy(node) for node in model.nodes]

    def write(kept: dict[int, _Group], into: QuantizationReport) -> Any:
        """The model with the ``kept`` groups quantized, and the pass-through ops on their tensors (the writers
        rewire nodes in place: undone after)."""
        weights.start()
        used = {root[t] for g in kept.values() for t in (g.x, g.out)}
        active = {key: node for key, node in passes.items() if root[node.output[0]] in used}
        nodes, domains = writer(model, kept, active, root, qparams, into, weights, codes_type)
        proto = model.assemble(nodes, domains)
        for node, original in zip(model.nodes, originals):
            node.CopyFrom(original)
        return proto

    if target is not None and groups:
        by_name = {g.node.name: key for key, g in groups.items()}
        chosen = _search(model, held, {n: groups[k].weight.size for n, k in by_name.items()}, ["int8", "float"],
                         lambda n, p: groups[by_name[n]].weight.size * (1 if p == "int8" else 4),
                         lambda assignment: write({by_name[n]: groups[by_name[n]] for n, p in assignment.items()
                                                   if p == "int8"}, QuantizationReport("", "")), target, report)
        for name, precision in chosen.items():
            if precision == "float":
                report.add(groups[by_name[name]].node, "float", f"kept float by the accuracy target ({target})")
                del groups[by_name[name]]
    proto = write(groups, report)
    model.save(proto, model_output, use_external_data_format)
    return report


def _copy(node: Any) -> Any:
    copy = type(node)()
    copy.CopyFrom(node)
    return copy


class _WeightWriter:
    """Integer weights and int32 biases of the groups, as initializers (with a DequantizeLinear in QDQ)."""

    def __init__(self, model: _Model, dtype: str, symmetric: bool, per_channel: bool, reduce_range: bool,
                 fmt: QuantFormat):
        self.model, self.dtype, self.symmetric = model, dtype, symmetric
        self.per_channel, self.reduce_range, self.fmt = per_channel, reduce_range, fmt
        self.done: dict[tuple[str, int], tuple[list[str], np.ndarray, str, Any]] = {}
        self.placed: set[tuple[str, int]] = set()
        self.biases: dict[str, list[str]] = {}

    def start(self) -> None:
        """A new model is written (an accuracy search writes several): each DequantizeLinear is placed again."""
        self.placed = set()

    def weights(self, group: _Group) -> tuple[list[str], np.ndarray, str, Any]:
        """``([codes, scale, zero point], scale value, dequantized name, new DequantizeLinear or None)`` of the
        group's weight, made once per weight tensor: the DequantizeLinear (QDQ only) comes back the first time in a
        model, for the caller to place before its first reader."""
        key = (group.node.input[1], group.axis)
        if key not in self.done:
            model, stem = self.model, group.node.input[1]
            codes, scale, zero = _weight_codes(group.weight, group.axis if self.per_channel else None, self.dtype,
                                               self.symmetric, self.reduce_range)
            names = [model.add(f"{stem}_quantized", codes), model.add(f"{stem}_scale", scale),
                     model.add(f"{stem}_zero_point", zero)]
            dq, out = None, ""
            if self.fmt is QuantFormat.QDQ:
                out = model.fresh(f"{stem}_dequantized")
                attrs = {"axis": group.axis} if self.per_channel else {}
                dq = model.node("DequantizeLinear", names, [out], f"{stem}_DequantizeLinear", **attrs)
            self.done[key] = (names, scale, out, dq)
        names, scale, out, dq = self.done[key]
        placed, self.placed = key in self.placed, self.placed | {key}
        return names, scale, out, None if placed else dq

    def bias(self, group: _Group, x_scale: float, w_scale: np.ndarray, report_detail: list[str]) -> list[str]:
        """``[codes, scale, zero point]`` of the group's bias as int32 codes of ``x_scale * w_scale``."""
        unit = (np.float64(np.float32(x_scale)) * w_scale.astype(np.float64)).astype(np.float32)
        exact = np.rint(group.bias.astype(np.float64) / unit.astype(np.float64))
        limit = np.iinfo(np.int32)
        if np.any(exact > limit.max) or np.any(exact < limit.min):
            report_detail.append("bias clipped to int32")
        codes = np.clip(exact, limit.min, limit.max).astype(np.int32)
        stem = f"{group.node.name}.bias"
        if stem not in self.biases:
            self.biases[stem] = [self.model.add(f"{stem}_quantized", codes), self.model.add(f"{stem}_scale", unit),
                                 self.model.add(f"{stem}_zero_point", np.zeros(unit.shape, np.int32))]
        return self.biases[stem]


def _describe(group: _Group, writer: _WeightWriter, activation: np.dtype) -> list[str]:
    detail = [f"{writer.dtype} weights {'per channel' if writer.per_channel else 'per tensor'}"
              f"{' (7-bit)' if writer.reduce_range else ''}", f"{activation.name} activations"]
    if group.bias is not None:
        detail.append("int32 bias")
    return detail


def _write_qdq(model: _Model, groups: dict[int, _Group], passes: dict[int, Any], root: dict[str, str],
               qparams: Callable, report: QuantizationReport, weights: _WeightWriter, codes_type: np.dtype
               ) -> tuple[list[Any], set[str]]:
    """The nodes of the QDQ model: every original node (weights and biases read through DequantizeLinear), with a
    QuantizeLinear -> DequantizeLinear pair after each quantized tensor. A tensor a quantized node writes (a group's
    output, a pass-through op's) is read through its pair by every reader: its producer is renamed to write a fresh
    tensor and the DQ writes the original name, so that the float tensor inside the group has no other reader (as
    fusion needs). A float node's output or a graph input keeps its float readers; the pair feeds its quantized
    readers only (the residual stream of a transformer stays float)."""
    nodes: list[Any] = []
    readers = {id(g.node) for g in groups.values()} | set(passes)
    quantized_out = {id(g.act if g.act is not None else g.node) for g in groups.values()} | set(passes)

    def pair(tensor: str, source: str, target: str) -> list[Any]:
        """Q(source) -> DQ -> target, with ``tensor``'s parameters."""
        scale, zero = qparams(tensor)[:2]
        codes = model.fresh(f"{tensor}_quantized")
        return [model.node("QuantizeLinear", [source, scale, zero], [codes], f"{tensor}_QuantizeLinear"),
                model.node("DequantizeLinear", [codes, scale, zero], [target], f"{tensor}_DequantizeLinear")]

    rewired: dict[str, str] = {}
    for name in model.inputs:
        if name in root:
            rewired[name] = model.fresh(f"{name}_dequantized")
            nodes += pair(name, name, rewired[name])
    for node in model.nodes:
        group = groups.get(id(node))
        if id(node) in readers and node.input[0] in rewired:
            node.input[0] = rewired[node.input[0]]
        if group is not None:
            names, w_scale, w_name, dq = weights.weights(group)
            if dq is not None:
                nodes.append(dq)
            node.input[1] = w_name
            detail = _describe(group, weights, codes_type)
            if group.bias is not None:
                bias = weights.bias(group, qparams(group.x)[2], w_scale, detail)
                out = model.fresh(f"{group.node.name}.bias_dequantized")
                attrs = {"axis": 0} if np.ndim(w_scale) else {}
                nodes.append(model.node("DequantizeLinear", bias, [out], f"{group.node.name}.bias_DequantizeLinear",
                                        **attrs))
                if len(node.input) > 2:
                    node.input[2] = out
                else:
                    node.input.append(out)
            if group.act is not None:
                detail.append(f"{group.act.op_type} {group.act.name!r} inside the group")
            report.add(node, "QDQ", ", ".join(detail))
        elif id(node) in passes:
            report.add(node, "QDQ", "same scale and zero point as its input: runs on the codes")
        nodes.append(node)
        for i, t in enumerate(node.output):
            if t not in root:
                continue
            if id(node) in quantized_out:  # the producer writes a fresh tensor; Q -> DQ writes the original name
                fresh = model.fresh(f"{t}_float")
                node.output[i] = fresh
                nodes += pair(t, fresh, t)
            else:  # Q -> DQ beside the float tensor, for the quantized readers
                rewired[t] = model.fresh(f"{t}_dequantized")
                nodes += pair(t, t, rewired[t])
    return nodes, set()


def _write_qoperator(model: _Model, groups: dict[int, _Group], passes: dict[int, Any], root: dict[str, str],
                     qparams: Callable, report: QuantizationReport, weights: _WeightWriter, codes_type: np.dtype
                     ) -> tuple[list[Any], set[str]]:
    """The nodes of the QOperator model: QLinearConv / QLinearMatMul / com.microsoft.QGemm and the pass-through ops
    on codes, a QuantizeLinear where codes of a float tensor are first needed, and a DequantizeLinear writing each
    quantized op's float output under its original name (dropped when nothing reads it)."""
    nodes: list[Any] = []
    codes: dict[str, str] = {}  # float tensor -> its codes
    domains: set[str] = set()
    qmin = int(np.iinfo(codes_type).min)
    dropped = set()

    def codes_of(tensor: str) -> str:
        if tensor not in codes:
            scale, zero = qparams(tensor)[:2]
            codes[tensor] = model.fresh(f"{tensor}_quantized")
            nodes.append(model.node("QuantizeLinear", [tensor, scale, zero], [codes[tensor]],
                                    f"{tensor}_QuantizeLinear"))
        return codes[tensor]

    def dequantized(code_name: str, tensor: str, params_of: str) -> None:
        scale, zero = qparams(params_of)[:2]
        nodes.append(model.node("DequantizeLinear", [code_name, scale, zero], [tensor], f"{tensor}_DequantizeLinear"))

    for node in model.nodes:
        if id(node) in dropped:
            continue
        group = groups.get(id(node))
        if group is None and id(node) not in passes:
            nodes.append(node)
            continue
        if group is None:  # a pass-through op on codes
            out = node.output[0]
            y = model.fresh(f"{out}_quantized")
            nodes.append(model.onnx.helper.make_node(node.op_type, [codes_of(node.input[0]), *node.input[1:]], [y],
                                                     name=node.name, **{a.name: model.onnx.helper.get_attribute_value(a)
                                                                        for a in node.attribute}))
            codes[out] = y
            dequantized(y, out, out)
            report.add(node, node.op_type, "on the codes (same scale and zero point as its input)")
            continue
        x = codes_of(group.x)
        xs, xz, x_scale, _ = qparams(group.x)
        names, w_scale = weights.weights(group)[:2]
        detail = _describe(group, weights, codes_type)
        absorbed = group.act is not None and qparams(group.out)[3] == qmin
        target = group.out if group.act is None or absorbed else group.pre
        ys, yz = qparams(target)[:2]
        y = model.fresh(f"{target}_quantized")
        bias = weights.bias(group, x_scale, w_scale, detail)[0] if group.bias is not None else ""
        kind = node.op_type
        if kind == "Conv":
            conv_attrs = {k: v for k, v in group.attrs.items()}
            new = model.onnx.helper.make_node("QLinearConv", [x, xs, xz, *names, ys, yz, *([bias] if bias else [])],
                                              [y], name=node.name, **conv_attrs)
            op = "QLinearConv"
        elif kind == "MatMul":
            new = model.onnx.helper.make_node("QLinearMatMul", [x, xs, xz, *names, ys, yz], [y], name=node.name)
            op = "QLinearMatMul"
        else:
            new = model.onnx.helper.make_node("QGemm", [x, xs, xz, *names, bias, ys, yz], [y], name=node.name,
                                              domain="com.microsoft", transB=int(group.attrs.get("transB", 0)))
            op, _ = "com.microsoft.QGemm", domains.add("com.microsoft")
        nodes.append(new)
        codes[target] = y
        dequantized(y, target, target)
        if group.act is not None:
            if absorbed:
                dropped.add(id(group.act))
                detail.append(f"{group.act.op_type} {group.act.name!r} absorbed (output zero point = lowest code)")
            else:
                detail.append(f"{group.act.op_type} {group.act.name!r} kept in float (symmetric output)")
        report.add(node, op, ", ".join(detail))
    return nodes, domains
