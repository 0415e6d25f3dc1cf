"""Graph rewrites run before a graph is prepared: batch-norm folding and activation fusion.

Both are pure: they return a new :class:`~lowbit.graph.ir.Graph` whose new
parameters are new arrays under new names, and never modify the input graph or
its parameter arrays. A node is rewritten only when the tensor between the two
nodes has no other consumer and is not a graph output (so nothing else can
observe it).
"""

from __future__ import annotations

import numpy as np

from lowbit.graph.ir import Graph, GraphIndex, Node, fresh_name
from lowbit.quantization.formats import FORMATS, OPS

#: Producers that apply attr ``activation`` ("relu" / "relu6") after their bias.
FUSABLE = ("Conv", "Gemm", "Add", "QLinearConv", "lowbit.QGemm", *OPS)
#: Producers whose output may be quantized codes (y_zero_point at input 7).
_QUANTIZED_OUT = ("QLinearConv", "lowbit.QGemm")


def _private(graph: Graph, index: GraphIndex, tensor: str) -> Node | None:
    """The only consumer of ``tensor`` when it has exactly one and is not a graph output, else None."""
    if tensor in graph.outputs:
        return None
    consumers = index.consumers.get(tensor, [])
    return consumers[0] if len(consumers) == 1 else None


def _fresh(graph: Graph, stem: str) -> str:
    return fresh_name(stem, set(graph.params) | set(graph.inputs) | {t for n in graph.nodes for t in n.outputs})


def _drop_unused(graph: Graph, candidates: set[str]) -> None:
    used = {t for n in graph.nodes for t in n.inputs} | set(graph.outputs)
    for name in candidates - used:
        graph.params.pop(name, None)


def fold_constants(graph: Graph) -> Graph:
    """Evaluate once every node whose inputs are all parameters; its outputs become parameters.

    What an exporter leaves to be computed from constants (weights transposed or cast, dequantized
    weight-only constants, shape arithmetic on fixed shapes) then costs nothing per run. Shape arithmetic
    that depends on the inputs' shapes is folded by the session once those are known.
    """
    from lowbit.runtime.evaluators import EVALUATORS, evaluate  # evaluators import the op modules

    out = graph.copy()
    kept = []
    for node in out.nodes:
        if node.op in EVALUATORS and node.inputs and all(not t or t in out.params for t in node.inputs):
            values = evaluate(node, [out.params[t] if t else None for t in node.inputs], out.opset_of(node.op))
            out.params.update(zip(node.outputs, values))
        else:
            kept.append(node)
    out.nodes = kept
    _drop_unused(out, set(out.params))
    return out


#: Products whose kernels have a compiled entry only without their bias input (input index of the bias).
BIAS_INPUT = {"com.microsoft.MatMulNBits": 5,
              **{op: 3 for op, (fmt, float_op) in OPS.items() if float_op == "Gemm" and fmt.product is not None
                 and not fmt.binarizes_input}}


def split_constant_bias(graph: Graph) -> Graph:
    """Move the constant bias of each :data:`BIAS_INPUT` product into an Add after it: ``op(x, ..., b) -> y`` becomes
    ``op(x, ...) -> y'; Add(y', b) -> y``. The product then has a compiled entry, and so has the Add, so that a
    session's compiled chain runs both instead of stopping at the product (twice as fast for a small encoder at batch
    1). Products with an ``activation`` attribute keep their bias (it comes before the activation)."""
    out = graph.copy()
    taken = set(out.params) | set(out.inputs) | {t for n in out.nodes for t in n.outputs} | {n.name for n in out.nodes}
    nodes = []
    for node in out.nodes:
        index = BIAS_INPUT.get(node.op)
        bias = node.inputs[index] if index is not None and len(node.inputs) > index else ""
        if not bias or bias not in out.params or node.attrs.get("activation") or len(node.outputs) != 1:
            nodes.append(node)
            continue
        inputs = node.inputs[:index]
        while inputs and not inputs[-1]:
            inputs.pop()
        product = fresh_name(f"{node.outputs[0]}_unbiased", taken)
        nodes += [Node(node.op, inputs, [product], dict(node.attrs), node.name),
                  Node("Add", [product, bias], [node.outputs[0]], {}, fresh_name(f"{node.name}_bias", taken))]
    out.nodes = nodes
    return out


def fold_batch_norm(graph: Graph) -> Graph:
    """Fold each inference BatchNormalization that follows a Conv or Gemm into that node's weights and bias.

    With ``s = scale / sqrt(var + epsilon)`` (per output channel ``o``)::

        Conv:  w'[o, ...] = w[o, ...] s[o],            b'[o] = (b[o] - mean[o]) s[o] + bias[o]
        Gemm:  B' = B s (scaling output column o),     C'[o] = (beta C[o] - mean[o]) s[o] + bias[o],  beta' = 1

    (``b`` and ``C`` are 0 when absent), computed in float64 and stored as float32. A BN
    is folded only when its input is the private output of the Conv / Gemm, its statistics
    and the weights are parameters, and (Gemm) C is absent or one value per output.
    """
    out = graph.copy()
    replaced: set[str] = set()
    index, removed = out.index(), set()
    for bn in [n for n in out.nodes if n.op == "BatchNormalization"]:
        producer = index.producer.get(bn.inputs[0])
        if producer is None or producer.op not in ("Conv", "Gemm") or _private(out, index, bn.inputs[0]) is not bn:
            continue
        if "activation" in producer.attrs or len(bn.outputs) > 1:
            continue
        if not all(t in out.params for t in bn.inputs[1:5]) or producer.inputs[1] not in out.params:
            continue
        scale, bias, mean, var = (out.params[t].astype(np.float64) for t in bn.inputs[1:5])
        s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w = out.params[producer.inputs[1]].astype(np.float64)
        bias_name = producer.inputs[2] if len(producer.inputs) > 2 else ""
        if bias_name and bias_name not in out.params:
            continue
        b = out.params[bias_name].astype(np.float64) if bias_name else np.zeros(s.shape)
        if producer.op == "Conv":
            w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            if b.size not in (1, s.size):
                continue
            trans_b = int(producer.attrs.get("transB", 0))
            w = w * (s[:, None] if trans_b else s[None, :])
            b = float(producer.attrs.get("beta", 1.0)) * b.reshape(-1)
            producer.attrs["beta"] = 1.0
        b = (b - mean) * s + bias
        weight_name = _fresh(out, producer.inputs[1] + "_bn")
        new_bias = _fresh(out, (bias_name or producer.outputs[0]) + "_bn")
        out.params[weight_name] = w.astype(np.float32)
        out.params[new_bias] = b.astype(np.float32)
        replaced.update(t for t in producer.inputs[1:3] + bn.inputs[1:5] if t)
        producer.inputs[1:] = [weight_name, new_bias]
        producer.outputs[0] = bn.outputs[0]
        index.producer[bn.outputs[0]] = producer
        removed.add(id(bn))
    out.nodes = [n for n in out.nodes if id(n) not in removed]
    _drop_unused(out, replaced)
    return out


def _activation_name(graph: Graph, node: Node) -> str | None:
    """``"relu"`` for Relu, ``"relu6"`` for Clip to [0, 6] (attrs or parameter inputs), else None."""
    if node.op == "Relu":
        return "relu"
    if node.op != "Clip":
        return None
    bounds = []
    for index, key in ((1, "min"), (2, "max")):
        name = node.inputs[index] if len(node.inputs) > index else ""
        if name and name not in graph.params:
            return None
        bounds.append(float(graph.params[name].item()) if name else node.attrs.get(key))
    return "relu6" if bounds == [0.0, 6.0] else None


def _codes_out(graph: Graph, node: Node) -> np.ndarray | None:
    """The output zero point of a producer writing quantized codes, else None (float output)."""
    if node.op not in _QUANTIZED_OUT or len(node.inputs) < 8 or not node.inputs[7]:
        return None
    return graph.params.get(node.inputs[7], np.array([1]))


def fuse_activations(graph: Graph) -> Graph:
    """Drop each Relu / Clip(0, 6) that follows a :data:`FUSABLE` node, setting attr ``activation`` on it instead.

    A producer that writes quantized codes (QLinearConv, lowbit.QGemm with y_scale / y_zero_point)
    takes only a Relu, and only when its output zero point is 0: then Relu on the codes equals
    Relu on the real values (a Clip(0, 6) on codes would clip at code 6, not at 6.0).
    """
    out = graph.copy()
    index, removed = out.index(), set()
    for act in [n for n in out.nodes if n.op in ("Relu", "Clip")]:
        producer = index.producer.get(act.inputs[0])
        name = _activation_name(out, act)
        if (name is None or producer is None or producer.op not in FUSABLE or "activation" in producer.attrs
                or len(producer.outputs) != 1 or _private(out, index, act.inputs[0]) is not act):
            continue
        zero_point = _codes_out(out, producer)
        if zero_point is not None and (name != "relu" or np.any(zero_point != 0)):
            continue
        producer.attrs["activation"] = name
        producer.outputs[0] = act.outputs[0]
        index.producer[act.outputs[0]] = producer
        removed.add(id(act))
    out.nodes = [n for n in out.nodes if id(n) not in removed]
    _drop_unused(out, {t for n in graph.nodes if n.op == "Clip" for t in n.inputs[1:] if t})
    return out


def _dequantized(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None]:
    """The float weights ``(w - w_zp) w_scale`` (per output channel) and float bias of a QLinearConv / QGemm."""
    p = graph.params
    w = p[node.inputs[3]].astype(np.float64)
    lead = (-1,) + (1,) * (w.ndim - 1)
    w_scale = np.broadcast_to(p[node.inputs[4]].astype(np.float64).reshape(-1), (w.shape[0],)).reshape(lead)
    w_zero = p[node.inputs[5]].astype(np.float64).reshape(-1) if node.inputs[5] else np.zeros(1)
    w_float = (w - np.broadcast_to(w_zero, (w.shape[0],)).reshape(lead)) * w_scale
    bias_name = node.inputs[8] if len(node.inputs) > 8 else ""
    if not bias_name:
        return w_float.astype(np.float32), None
    bias = p[bias_name].astype(np.float64).reshape(-1)
    if p[bias_name].dtype == np.int32:  # in units of x_scale * w_scale
        bias = bias * p[node.inputs[1]].astype(np.float64).reshape(()) * w_scale.reshape(-1)
    return w_float.astype(np.float32), np.broadcast_to(bias, (w.shape[0],)).astype(np.float32)


#: Weight-only quantized ops (float activations) the twin maps to float: every op of the weight-format table but the
#: binary ones, which binarize their inputs too.
WEIGHT_ONLY = {op: float_op for op, (fmt, float_op) in OPS.items() if not fmt.binarizes_input}
_CONV_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad", "activation")


def _weight_only_float(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None]:
    """The float weights (``[out, in]``, or OIHW for a Conv op) and bias of a :data:`WEIGHT_ONLY` node, dequantized
    as its format says (``lowbit.quantization.formats``; DynamicQGemm: ``w = (w - w_zp[o]) w_scale[o]``, its bias
    at input 4). Conv codes are ``[out, (ky, kx, c)]`` columns, reordered to OIHW."""
    p, (fmt, float_op) = graph.params, OPS[node.op]
    codes, scales = p[node.inputs[1]], p[node.inputs[2]]
    bias_index = 3
    if node.op == FORMATS["int8"].ops["Gemm"]:
        zero_name = node.inputs[3] if len(node.inputs) > 3 else ""
        codes = codes.astype(np.int32) - (p[zero_name].astype(np.int32).reshape(-1, 1) if zero_name else 0)
        bias_index = 4
    w = fmt.dequantize(codes, scales, node.attrs.get("group_size"))
    if float_op == "Conv":
        kh, kw = node.attrs["kernel_shape"]
        w = w.reshape(w.shape[0], kh, kw, -1).transpose(0, 3, 1, 2)
    bias_name = node.inputs[bias_index] if len(node.inputs) > bias_index else ""
    bias = np.broadcast_to(p[bias_name].astype(np.float32).reshape(-1), (w.shape[0],)) if bias_name else None
    return np.ascontiguousarray(w, np.float32), bias


def quantized_op(op: str) -> bool:
    """Whether ``op`` computes on quantized values: a weight format's op, or an integer / Q-DQ op of ONNX, ONNX
    Runtime or lowbit (QLinear*, *Integer*, *Quantize*, *QGemm, MatMulNBits)."""
    name = op.rpartition(".")[2]
    return op in OPS or any(word in name for word in ("QLinear", "Integer", "Quantize", "QGemm", "NBits"))


def _foreign(node: Node) -> bool:
    """A node the twin cannot map to float: an integer op other than those it rewrites (an imported ONNX model's
    QLinearMatMul, com.microsoft QLinearAdd, ...), or one working channels-last (``layout``)."""
    if node.attrs.get("layout") == "NHWC":
        return True
    known = node.op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "lowbit.QGemm") or node.op in OPS
    return not known and quantized_op(node.op)


def _twinnable(graph: Graph) -> bool:
    """Whether the graph has something to twin: a QuantizeLinear (an int8 chain) or a weight-only quantized
    node whose weights are all parameters, and no node the twin cannot map (:func:`_foreign`)."""
    if any(_foreign(n) for n in graph.nodes):
        return False
    weight_only = [n for n in graph.nodes if n.op in WEIGHT_ONLY]
    if not weight_only and not any(n.op == "QuantizeLinear" for n in graph.nodes):
        return False
    return all(t in graph.params for n in weight_only for t in n.inputs[1:] if t)


def float_twin(graph: Graph) -> Graph | None:
    """The graph with its quantized parts computed in float32, or None when it has none (or no twin exists).

    Static int8 chains: QuantizeLinear and DequantizeLinear become identities (their tensors merged);
    QLinearConv and lowbit.QGemm become Conv and Gemm (``transB=1``) on the dequantized weights and bias,
    keeping attr ``activation``; MaxPool / Flatten / Reshape of codes run on the floats. Weight-only
    quantized nodes (:data:`WEIGHT_ONLY`: int4, ternary, dynamic int8) become Gemm / Conv on their
    dequantized weights. Every other node is kept. The twin computes what the quantized graph
    approximates, without the rounding of the activations: a :class:`~lowbit.runtime.session.Session`
    runs it instead when it is faster.
    """
    if not _twinnable(graph):
        return None
    same: dict[str, str] = {}  # tensor -> the float tensor it stands for

    def find(t: str) -> str:
        while t in same:
            t = same[t]
        return t

    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            a, b = find(node.inputs[0]), find(node.outputs[0])
            keep_b = b in graph.outputs  # the graph's own names must survive
            if a == b or (keep_b and (a in graph.outputs or a in graph.inputs)):
                return None
            if keep_b:
                same[a] = b
            else:
                same[b] = a
    out = Graph([], dict(graph.inputs), list(graph.outputs), dict(graph.params))
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        inputs, outputs = [find(t) if t else t for t in node.inputs], [find(t) for t in node.outputs]
        attrs = dict(node.attrs)
        quantized = node.op in ("QLinearConv", "lowbit.QGemm")
        if quantized or node.op in WEIGHT_ONLY:
            w, bias = _dequantized(graph, node) if quantized else _weight_only_float(graph, node)
            names = [_fresh(out, f"{node.name}_w_float")]
            out.params[names[0]] = w
            if bias is not None:
                names.append(_fresh(out, f"{node.name}_b_float"))
                out.params[names[1]] = bias
            conv = node.op == "QLinearConv" or WEIGHT_ONLY.get(node.op) == "Conv"
            keep = _CONV_ATTRS if conv else ("activation",)
            attrs = {**({} if conv else {"transB": 1}), **{k: v for k, v in attrs.items() if k in keep}}
            node = Node("Conv" if conv else "Gemm", [inputs[0], *names], outputs, attrs, node.name)
        else:
            node = Node(node.op, inputs, outputs, attrs, node.name)
        out.nodes.append(node)
    _drop_unused(out, set(out.params))
    return out.validate()
