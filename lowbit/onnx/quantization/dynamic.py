"""``quantize_dynamic``: weights quantized ahead, activations at run time (:mod:`lowbit.onnx.quantization`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lowbit.onnx.accuracy import AccuracyTarget
from lowbit.onnx.quantization._common import (EVALUATION_BATCHES, QuantizationReport, QuantType, _batches,
                                               _check_reader, _Held, _ignored, _Model, _op_types, _quant_type,
                                               _run_float, _search)
from lowbit.onnx.quantization._weights import (MAX_ROWS, _int8_scheme, _nbits_rtn, _nbits_scheme, _pack_nibbles,
                                               _Rows, _weight_codes)
from lowbit.quantization.formats import DOMAIN, FORMATS

DYNAMIC_OPS = ("MatMul", "Gemm")


@dataclass
class _Product:
    """A MatMul / Gemm to quantize: input ``a``, float weights ``w [N, K]``, bias, the nodes it replaces."""

    node: Any
    a: str
    w: np.ndarray
    bias: np.ndarray | None
    output: str
    replaced: list[Any]
    detail: str = ""
    smoothed: bool = False  # w scaled by SmoothQuant's factors, a the smoothed input


def _bias_vector(value: np.ndarray | None, n: int) -> np.ndarray | None:
    """``value`` as ``[n]`` float32 when it is one value per column (``[n]`` or ``[1, n]``), else None."""
    if value is None or value.dtype != np.float32 or value.size != n or any(d != 1 for d in value.shape[:-1]):
        return None
    return value.reshape(n)


def _product(model: _Model, node: Any, fold_bias: bool = True) -> tuple[_Product | None, str]:
    """The MatMul / Gemm ``node`` as a :class:`_Product`, or ``(None, why not)``."""
    a = node.input[0]
    if model.constant(a) is not None:
        return None, "its input A is a constant (folded ahead of a run)"
    if node.op_type == "MatMul":
        w, why = model.float_weight(node.input[1], 2)
        if w is None:
            return None, why
        product = _Product(node, a, np.ascontiguousarray(w.T), None, node.output[0], [node])
        add = model.private(node.output[0]) if fold_bias else None
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.input) == 2:
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            bias = _bias_vector(model.constant(other), w.shape[1])
            if bias is not None:
                product.bias, product.output = bias, add.output[0]
                product.replaced.append(add)
                product.detail = f"bias of {add.name!r} folded in"
        return product, ""
    attrs = {at.name: model.onnx.helper.get_attribute_value(at) for at in node.attribute}
    c = node.input[2] if len(node.input) > 2 else ""
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or (c and attrs.get("beta", 1.0) != 1.0):
        return None, "Gemm with transA, alpha != 1 or beta != 1"
    w, why = model.float_weight(node.input[1], 2)
    if w is None:
        return None, why
    w = np.ascontiguousarray(w if attrs.get("transB", 0) else w.T)
    bias = None
    if c:
        bias = _bias_vector(model.constant(c), w.shape[0])
        if bias is None:
            return None, f"its C {c!r} is not a constant float32 vector of N = {w.shape[0]} values"
    return _Product(node, a, w, bias, node.output[0], [node], "C as the bias" if c else ""), ""


def _collect(model: _Model, reader: Any, products: list[_Product], method: str) -> dict[str, _Rows]:
    """GPTQ's / AWQ's statistics of every product's input, from one pass over the reader."""
    stats = {p.a: _Rows(p.w.shape[1], method, seed=i) for i, p in enumerate(products)}

    def visit(name: str, value: np.ndarray) -> None:
        if value.shape[-1:] != (stats[name].k,):
            raise ValueError(f"calibration_data_reader: tensor {name!r} has shape {value.shape}, expected [..., "
                             f"{stats[name].k}]")
        stats[name].add(value)

    _run_float(model.proto, reader, list(stats), visit, "calibration_data_reader")
    return stats


def _smooth(model: _Model, products: list[_Product], stats: dict[str, _Rows], alpha: float,
            report: QuantizationReport) -> dict[int | None, list[Any]]:
    """SmoothQuant (:func:`lowbit.quantization.weights.smoothquant_scales`) on each input shared by products: the
    weights' columns scaled up by ``s``, the input divided by it, folded into the LayerNormalization making it when
    only these products read it, else one ``Mul(x, 1 / s)`` after its producer. Returns the nodes replacing those
    producers (id -> nodes; None -> the nodes going first, for graph inputs)."""
    from lowbit.quantization.weights import smoothquant_scales

    groups: dict[str, list[_Product]] = {}
    for p in products:
        groups.setdefault(p.a, []).append(p)
    quantized = {id(p.node) for p in products}
    replacing: dict[int | None, list[Any]] = {}
    for a, group in groups.items():
        producer = model.producer.get(a)
        if producer is not None and id(producer) in quantized:
            report.notes.append(f"smoothquant: {a!r} is a quantized product's output, left as it is")
            continue
        s = smoothquant_scales(stats[a].absmax, np.concatenate([p.w for p in group]), alpha).astype(np.float32)
        stats[a].divide(s)
        readers = model.consumers.get(a, [])
        gamma, beta = ((model.constant(producer.input[i]) if len(producer.input) > i and producer.input[i] else None)
                       for i in (1, 2)) if producer is not None else (None, None)
        foldable = (producer is not None and producer.op_type == "LayerNormalization" and gamma is not None
                    and gamma.shape == s.shape and (beta is None or beta.shape == s.shape)
                    and a not in model.outputs and all(id(r) in {id(p.node) for p in group} for r in readers))
        if foldable:
            ln = model.onnx.NodeProto()
            ln.CopyFrom(producer)
            ln.input[1] = model.add(f"{ln.name}.scale_smoothed", (gamma / s).astype(np.float32))
            if beta is not None:
                ln.input[2] = model.add(f"{ln.name}.bias_smoothed", (beta / s).astype(np.float32))
            replacing[id(producer)] = [ln]
            smoothed, how = a, f"folded into {producer.name!r}"
        else:
            smoothed = model.fresh(f"{a}_smoothed")
            mul = model.node("Mul", [a, model.add(f"{a}.smooth_inverse", (1 / s).astype(np.float32))], [smoothed],
                             f"{a}_smooth")
            if producer is not None:
                replacing[id(producer)] = [*replacing.get(id(producer), [producer]), mul]
            else:  # a graph input: first of all
                replacing.setdefault(None, []).append(mul)
            how = f"a Mul by 1 / s on {a!r}"
        for p in group:
            p.w, p.a, p.smoothed = (p.w * s).astype(np.float32), smoothed, True
        stats[smoothed] = stats.pop(a)
        report.notes.append(f"smoothquant alpha {alpha:g}: {', '.join(p.node.name for p in group)}: {how}")
    return replacing


def _awq_or_gptq(method: str, w: np.ndarray, x: np.ndarray, scheme: Any) -> tuple[Any, np.ndarray | None]:
    """``(QTensor of w [N, K] under scheme, AWQ's factors s or None)``."""
    from lowbit.quantization.weights import awq, gptq

    if method == "gptq":
        return gptq(w, x, scheme), None
    qt, s = awq(w, x, scheme)
    return qt, s.astype(np.float32)


def quantize_dynamic(model_input: Any, model_output: Any, op_types_to_quantize: Any = None, per_channel: bool = True,
                     reduce_range: bool = False, weight_type: Any = QuantType.QInt8, nodes_to_quantize: Any = None,
                     nodes_to_exclude: Any = None, use_external_data_format: bool = False,
                     extra_options: dict | None = None, *, block_size: int = 128, method: str = "rtn",
                     calibration_data_reader: Any = None, per_token: bool = True,
                     accuracy_target: Any = None, smoothquant: float | None = None,
                     bias_correction: bool = False) -> QuantizationReport:
    """Quantize the weights of ``model_input``'s MatMul and Gemm nodes ahead; activations are quantized at run time.
    Write the model to ``model_output``; return a :class:`QuantizationReport`.

    ``weight_type``: ``QInt8`` / ``QUInt8`` (DynamicQuantizeMatMul: ``lowbit``'s, per token, or with
    ``per_token=False`` ``com.microsoft``'s), ``QInt4`` / ``QUInt4`` (``com.microsoft.MatMulNBits`` in blocks of
    ``block_size`` along K). ``per_channel``: one int8 weight scale per output column (else one in all).
    ``NF4`` / ``Ternary`` / ``Binary``: lowbit's weight-only ops (module docstring). ``reduce_range``: 7-bit int8
    weights. ``method``: ``"rtn"`` (round to nearest), ``"gptq"`` or ``"awq"`` (int8 / int4; these two need
    ``calibration_data_reader``). ``accuracy_target``: a precision per layer meeting it (module docstring; needs
    ``calibration_data_reader``). ``smoothquant``: SmoothQuant's migration strength; ``bias_correction``: each
    bias corrected for its weights' rounding error (module docstring; both need ``calibration_data_reader``).
    ``op_types_to_quantize`` (default MatMul and Gemm), ``nodes_to_quantize``, ``nodes_to_exclude``: which nodes.
    See the module docstring for what each node becomes.
    """
    wtype = _quant_type(weight_type, "weight_type")
    if wtype not in _PRECISION_OF:
        raise ValueError(f"weight_type: quantize_dynamic writes {[t.name for t in _PRECISION_OF]}, got {wtype.name}")
    if not isinstance(method, str) or method.lower() not in ("rtn", "gptq", "awq"):
        raise ValueError(f"method: expected 'rtn', 'gptq' or 'awq', got {method!r}")
    method = method.lower()
    low = _PRECISION_OF[wtype]
    if low in ("int4", "uint4") and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                     or not 16 <= block_size <= 256 or block_size & (block_size - 1)):
        raise ValueError(f"block_size: expected a power of two from 16 to 256 (MatMulNBits' blocks along K), got "
                         f"{block_size!r}")
    if low == "nf4":  # lowbit's grouped format (int4 is MatMulNBits, whose blocks are checked above)
        FORMATS[low].group_size(block_size)  # ValueError naming the sizes the format takes
    if method != "rtn" and low in FORMATS and low not in ("int8", "int4"):
        raise ValueError(f"method: {method!r} fits int8 and int4 weights; {low} weights are rounded to nearest "
                         f"(method='rtn')")
    if method != "rtn":
        _check_reader(calibration_data_reader, "calibration_data_reader", f"method={method!r}")
    if smoothquant is not None:
        if isinstance(smoothquant, bool) or not isinstance(smoothquant, (int, float)) or not 0 <= smoothquant <= 1:
            raise ValueError(f"smoothquant: expected None or a migration strength in [0, 1] (0.5 is usual), got "
                             f"{smoothquant!r}")
        _check_reader(calibration_data_reader, "calibration_data_reader", "smoothquant")
    if bias_correction:
        if method != "rtn":
            raise ValueError(f"bias_correction: corrects rounded-to-nearest weights; method={method!r} already fits "
                             f"the weights to the activations")
        _check_reader(calibration_data_reader, "calibration_data_reader", "bias_correction")
    target = None
    if accuracy_target is not None:
        target = AccuracyTarget.of(accuracy_target)
        _check_reader(calibration_data_reader, "calibration_data_reader", "accuracy_target")
    options = dict(extra_options or {})
    level = int(options.get("accuracy_level", 4))
    model = _Model(model_input)
    op_types = _op_types(op_types_to_quantize, DYNAMIC_OPS)
    excluded = model.selection(nodes_to_quantize, nodes_to_exclude)
    report = QuantizationReport(str(model_output), f"quantize_dynamic ({wtype.name}, {method})")
    _ignored(report, options)

    products: list[_Product] = []
    for node in model.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in DYNAMIC_OPS + ("Conv",):
            continue
        if node.op_type == "Conv":
            report.add(node, "float", excluded(node) or "quantize_dynamic keeps Conv float in lowbit "
                                                        "(quantize_static quantizes convolutions)")
            continue
        why = excluded(node) or ("" if node.op_type in op_types else "not in op_types_to_quantize")
        found, because = (None, why) if why else _product(model, node)
        if found is None:
            report.add(node, "float", because)
            continue
        products.append(found)

    held: list[dict[str, np.ndarray]] = []
    reader = calibration_data_reader
    if accuracy_target is not None:
        reader = _Held(reader, EVALUATION_BATCHES, held)
    needs_data = method != "rtn" or smoothquant is not None or bias_correction
    stats = _collect(model, reader, products, method) if needs_data and products else {}
    if accuracy_target is not None and not held:
        held.extend(itertools.islice(_batches(reader, "calibration_data_reader"), EVALUATION_BATCHES))
    smoothing = _smooth(model, products, stats, float(smoothquant), report) if smoothquant is not None else {}
    writer = _DynamicWriter(model, per_channel, reduce_range, block_size, method, level, per_token, stats,
                            bias_correction)
    chosen = {id(p): low for p in products}
    if accuracy_target is not None and products:
        chosen = _meet(model, products, writer, low, held, target, report, smoothing)
    replaced: dict[int | None, list[Any]] = dict(smoothing)
    domains = set()
    for product in products:
        written = writer(product, chosen[id(product)])
        report.add(product.node, written.action, written.detail)
        domains.update({written.domain} - {None})
        for old in product.replaced:
            replaced[id(old)] = []
        replaced[id(product.replaced[-1])] = written.nodes  # the last replaced node's place keeps the order
    if method != "rtn" and products:
        report.notes.append(f"{method}: activations of {len(stats)} input tensor(s) from the calibration data"
                            + (f", at most {MAX_ROWS} sampled rows each" if method == "awq" else ", X^T X streamed"))
    model.write(_nodes(model, replaced), model_output, use_external_data_format, domains)
    return report


def _nodes(model: _Model, replaced: dict[int | None, list[Any]]) -> list[Any]:
    """The model's nodes with ``replaced``'s in their places (id of a node -> its replacements; None -> first)."""
    return [*replaced.get(None, []), *(m for n in model.nodes for m in replaced.get(id(n), [n]))]


#: weight_type -> the precision quantize_dynamic writes (lowbit.quantization.formats' names; uint8 / uint4: ONNX
#: Runtime's asymmetric 8-bit and 4-bit weights).
_PRECISION_OF = {QuantType.QInt8: "int8", QuantType.QUInt8: "uint8", QuantType.QInt4: "int4",
                 QuantType.QUInt4: "uint4", QuantType.NF4: "nf4", QuantType.Ternary: "ternary",
                 QuantType.Binary: "binary"}


@dataclass
class _Written:
    """What one product becomes in one precision: the nodes replacing it, their domain, the report's words and the
    bytes of its weights as written."""

    nodes: list[Any]
    domain: str | None
    action: str
    detail: str
    nbytes: int


class _DynamicWriter:
    """The nodes of a product in a precision, made once (weights quantized, initializers added) and then reused, so
    that an accuracy search can try each layer in each precision without quantizing it again."""

    def __init__(self, model: _Model, per_channel: bool, reduce_range: bool, block_size: int, method: str,
                 level: int, per_token: bool, stats: dict[str, _Rows], bias_correction: bool):
        self.model, self.per_channel, self.reduce_range = model, per_channel, reduce_range
        self.block_size, self.method, self.level = block_size, method, level
        self.per_token, self.stats, self.bias_correction = per_token, stats, bias_correction
        self.made: dict[tuple[int, str], _Written] = {}

    def __call__(self, product: _Product, precision: str) -> _Written:
        key = (id(product), precision)
        if key not in self.made:
            self.made[key] = self._make(product, precision)
        return self.made[key]

    def _make(self, product: _Product, precision: str) -> _Written:
        model, w = self.model, product.w
        n, k = w.shape
        if precision == "float":
            nodes = product.replaced if not product.smoothed else self._float(product)
            return _Written(nodes, None, "float", "kept float (accuracy target)", 4 * n * k)
        a, stem, new = product.a, product.node.name, []
        qt = None
        if self.method != "rtn":
            four_bit = precision in ("int4", "uint4")
            scheme = (_nbits_scheme(self.block_size, precision == "int4") if four_bit else
                      _int8_scheme(self.per_channel, precision, precision == "int8"))
            qt, s = _awq_or_gptq(self.method, w, self.stats[a].activations(), scheme)
            if s is not None:  # AWQ: the layer computes (a / s) @ (w s)^T
                scaled = model.fresh(f"{a}_awq_{stem}")
                new.append(model.node("Mul", [a, model.add(f"{stem}.awq_inverse_scales", (1 / s).astype(np.float32))],
                                      [scaled], f"{stem}_awq_scale"))
                a = scaled
        bias = self._bias_of(product)
        if precision in ("int4", "uint4"):
            written = self._nbits(product, precision, a, bias, qt)
        elif precision in ("int8", "uint8"):
            written = self._int8(product, precision, a, bias, qt)
        else:
            written = self._lowbit(product, FORMATS[precision], a, bias)
        written.nodes[:0] = new
        written.detail = "; ".join(filter(None, [written.detail, product.detail]))
        return written

    def _float(self, product: _Product) -> list[Any]:
        """A smoothed product in float: ``MatMul(a, (w s).T)`` and the bias."""
        model, stem = self.model, product.node.name
        out = product.output if product.bias is None else model.fresh(f"{stem}.product")
        nodes = [model.node("MatMul", [product.a, model.add(f"{stem}.weight_smoothed", np.ascontiguousarray(
            product.w.T))], [out], stem, replacing=True)]
        if product.bias is not None:
            nodes.append(model.node("Add", [out, model.add(f"{stem}.bias", product.bias)], [product.output],
                                    f"{stem}.bias_add"))
        return nodes

    def _bias_of(self, product: _Product) -> Callable[[np.ndarray], str]:
        """The bias input's name given the dequantized weights ``w_q [N, K]``: the product's bias, corrected with
        ``bias_correction`` for the mean output shift of the weight error, ``b - (w_q - w) @ E[a]``."""
        def name(w_q: np.ndarray) -> str:
            bias = product.bias
            if self.bias_correction and w_q is not product.w:
                shift = (w_q.astype(np.float64) - product.w) @ self.stats[product.a].mean
                bias = ((0 if bias is None else bias) - shift).astype(np.float32)
            return "" if bias is None else self.model.add(f"{product.node.name}.bias", bias)
        return name

    def _nbits(self, product: _Product, precision: str, a: str, bias: Callable[[np.ndarray], str],
               qt: Any) -> _Written:
        model, w, block = self.model, product.w, self.block_size
        n, k = w.shape
        symmetric, blocks, stem = precision == "int4", -(-k // block), product.node.name
        if qt is None:
            codes, scales, zeros = _nbits_rtn(w, block, symmetric)
        else:
            codes = np.full((n, blocks * block), 8, np.uint8)
            codes[:, :k] = qt.codes().astype(np.int16) + (8 if symmetric else 0)
            scales = qt.scale.reshape(n, blocks)
            zeros = None if symmetric else qt.zero_point.reshape(n, blocks).astype(np.uint8)
        packed = _pack_nibbles(codes).reshape(n, blocks, block // 2)
        centered = codes.astype(np.float64) - (8 if zeros is None else np.repeat(zeros, block, axis=1))
        w_q = (centered * np.repeat(scales, block, axis=1))[:, :k]
        inputs = [a, model.add(f"{stem}.q4", packed),
                  model.add(f"{stem}.q4_scales", scales.astype(np.float32).reshape(-1)),
                  "" if zeros is None else model.add(f"{stem}.q4_zero_points", _pack_nibbles(
                      np.pad(zeros, ((0, 0), (0, blocks % 2))))), "", bias(w_q)]
        node = model.node("MatMulNBits", inputs, [product.output], stem, "com.microsoft", replacing=True, K=k, N=n,
                          bits=4, block_size=int(block), accuracy_level=self.level)
        what = (f"{'symmetric' if symmetric else 'asymmetric'} 4-bit, blocks of {block}"
                f"{', K padded' if k % block else ''}, {self.method}")
        return _Written([node], "com.microsoft", "com.microsoft.MatMulNBits", what, packed.nbytes + 4 * n * blocks)

    def _int8(self, product: _Product, dtype: str, a: str, bias: Callable[[np.ndarray], str], qt: Any) -> _Written:
        import kernels

        model, w, stem = self.model, product.w, product.node.name
        n, k = w.shape
        if qt is None:
            codes, scale, zero = _weight_codes(w, 0 if self.per_channel else None, dtype, dtype == "int8",
                                               self.reduce_range)
        else:
            codes, scale = qt.codes().astype(dtype), qt.scale.astype(np.float32)
            zero = np.zeros(scale.shape, dtype) if qt.zero_point is None else qt.zero_point.astype(dtype)
        lowbit_op = self.per_token and k <= kernels.DynamicLinearPlan.max_k
        domain = "lowbit" if lowbit_op else "com.microsoft"
        w_q = (codes.astype(np.float64) - np.reshape(zero, (-1, 1))) * np.reshape(scale, (-1, 1))
        inputs = [a, model.add(f"{stem}.weight_quantized", np.ascontiguousarray(codes.T)),
                  model.add(f"{stem}.weight_scale", scale), model.add(f"{stem}.weight_zero_point", zero), bias(w_q)]
        node = model.node("DynamicQuantizeMatMul", inputs, [product.output], stem, domain, replacing=True)
        what = (f"{dtype} weights {'per column' if self.per_channel else 'per tensor'}"
                f"{', 7-bit' if self.reduce_range and qt is None else ''}, {self.method}; activations "
                + ("per token" if lowbit_op else "per tensor"
                   + (f" (K = {k} > {kernels.DynamicLinearPlan.max_k}, lowbit's per-token limit)"
                      if self.per_token else "")))
        return _Written([node], domain, f"{domain}.DynamicQuantizeMatMul", what, codes.nbytes + 4 * scale.size)

    def _lowbit(self, product: _Product, fmt: Any, a: str, bias: Callable[[np.ndarray], str]) -> _Written:
        """A weight-only op of lowbit's format table (lowbit domain): codes stored in ONNX's sub-byte types."""
        onnx, model, w, stem = self.model.onnx, self.model, product.w, product.node.name
        n, k = w.shape
        group = fmt.group_size(self.block_size) if fmt.grouped else None
        codes, scales = fmt.quantize(w, group)
        q = fmt.qtype
        kind = {(4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4}.get(
            (q.bits, q.signed), onnx.TensorProto.INT2)  # ternary and binary codes fit int2
        name = model.fresh(f"{stem}.codes")
        model.new_initializers.append(onnx.helper.make_tensor(name, kind, codes.shape, codes.reshape(-1)))
        # a binary op takes sign(a): a weight-error correction against E[a] does not apply
        inputs = [a, name, model.add(f"{stem}.scales", scales),
                  bias(product.w if fmt.binarizes_input else fmt.dequantize(codes, scales, group))]
        op = fmt.ops["Gemm"].partition(".")[2]
        node = model.node(op, inputs, [product.output], stem, DOMAIN, replacing=True,
                          **({"group_size": group} if group else {}))
        what = f"{fmt.description}{f', groups of {group}' if group else ''}, rtn"
        bits = 2 if q.bits == 1 else q.bits
        return _Written([node], DOMAIN, f"{DOMAIN}.{op}", what, -(-codes.size * bits // 8) + 4 * scales.size)


def _meet(model: _Model, products: list[_Product], writer: _DynamicWriter, low: str, held: list, target: Any,
          report: QuantizationReport, smoothing: dict[int | None, list[Any]]) -> dict[int, str]:
    """Per product, the precision from (``low``, 8-bit, float) that keeps the model within ``target`` on the ``held``
    batches (:func:`_search`)."""
    by_name = {p.node.name: p for p in products}

    def write(assignment: dict[str, str]) -> Any:
        replaced: dict[int | None, list[Any]] = dict(smoothing)
        domains: set[str] = set()
        for name, precision in assignment.items():
            written = writer(by_name[name], precision)
            domains.update({written.domain} - {None})
            for old in by_name[name].replaced:
                replaced[id(old)] = []
            replaced[id(by_name[name].replaced[-1])] = written.nodes
        return model.assemble(_nodes(model, replaced), domains)

    ladder = [low, "uint8" if low == "uint8" else "int8", "float"]
    chosen = _search(model, held, {n: p.w.size for n, p in by_name.items()}, ladder,
                     lambda n, p: writer(by_name[n], p).nbytes, write, target, report)
    return {id(by_name[n]): precision for n, precision in chosen.items()}
