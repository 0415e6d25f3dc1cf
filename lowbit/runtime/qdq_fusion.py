"""QDQ fusion: the DequantizeLinear -> op -> QuantizeLinear groups of "QDQ" ONNX models become integer ops.

ONNX Runtime's quantizer (``quantize_static``, QDQ format) writes float ops with a DequantizeLinear (DQ) on
each input and a QuantizeLinear (Q) on the output; ONNX Runtime folds each such group into one integer kernel,
and :func:`fuse_qdq` does the same so that the group runs on lowbit's int8 kernels. A fused op computes
``Q(op(DQ(inputs)))`` with ``op`` evaluated exactly (ONNX's rounding of the real-valued result); the QDQ graph
evaluated in float32 may land one code off near a rounding tie. One more difference is ONNX's own: at an exact
tie with an odd output zero point, QuantizeLinear's ``rint(v) + zp`` and the ``rint(v + zp)`` of ONNX's
reference QLinearConv / QLinearMatMul (which lowbit's kernels follow) part by one code.

Groups (``x``, ``a``, ``b``: activations, one scale and zero point each; ``w``: constant int8 / uint8 weights,
per tensor or per output channel: axis 0 for Conv and for Gemm's ``B`` with transB=1, axis 1 for MatMul's
``B [K, N]`` and Gemm's with transB=0; ``act``: an optional Relu or Clip(0, 6), becoming lowbit's attribute
``activation`` = "relu" / "relu6")::

    DQ(x), DQ(w) [, DQ(bias)] -> Conv [-> act] -> Q            QLinearConv
    DQ(x), DQ(w) -> MatMul -> Q                                QLinearMatMul (x of any rank, w 2-D)
    DQ(x), DQ(w) -> MatMul [-> Add(bias)] [-> act] -> Q        lowbit.QGemm (x 2-D)
    DQ(x), DQ(w) [, DQ(bias)] -> Gemm [-> act] -> Q            lowbit.QGemm (transA=0, alpha=1, beta=1 with C),
                                                               else com.microsoft.QGemm (no act)
    DQ(a), DQ(b) -> Add | Mul -> Q                             com.microsoft.QLinearAdd | QLinearMul
    DQ(x) -> AveragePool | GlobalAveragePool | Sigmoid | LeakyRelu -> Q
                                                               com.microsoft.QLinear<op>
    DQ(x1), DQ(x2) ... -> Concat -> Q                          com.microsoft.QLinearConcat, or Concat of the codes
                                                               when every scale and zero point is the output's
    DQ(x) -> MaxPool | Reshape | Flatten | Transpose | Squeeze | Unsqueeze | Slice | Gather | Identity
             | Resize (nearest) -> Q, with the same scale and zero point on both sides
                                                               the op on the codes (input 0; the others kept)
    DQ(constant 8-bit codes) still read by a float op          the dequantized constant (int32 codes, a bias:
                                                               left to passes.fold_constants)

A Conv or Gemm bias is a DQ of int32 codes with zero point 0 and scale ``x_scale * w_scale`` (per output
channel, up to float32 rounding): ONNX's integer ops read it in those units (com.microsoft.QGemm: ``alpha /
beta * x_scale * w_scale``). lowbit.QGemm takes any other constant bias too (a float constant, or a DQ of a
constant), in real units.

A group fuses only when the float tensors inside it (the op's output, the activation's, the bias Add's) have no
other reader and are not graph outputs, and every scale and zero point is a constant (the activations' per
tensor, their zero points present and uint8 / int8). A DQ's output may have other readers: the DQ stays for
them, and goes once nothing reads it (ONNX Runtime duplicates shared DQs first, to the same effect). So the
Q -> DQ pair between two fused ops vanishes: the second op reads the first one's codes. uint8 weights become
int8 codes ``w - 128`` with zero points ``zero_point - 128`` (the same ``w - zero_point``), for lowbit's int8
kernels.
"""

from __future__ import annotations

import numpy as np

from lowbit.graph.ir import Graph, Node
from lowbit.quantization.qdq import dequantize_linear
from lowbit.runtime.passes import _activation_name, _drop_unused, _private

CODES = (np.dtype(np.uint8), np.dtype(np.int8))
FLOAT = 1  # onnx.TensorProto.FLOAT: the only DQ output_dtype / Q precision the integer ops reproduce
#: Ops that only move, pick or compare elements: on the codes they give ``Q(op(DQ(x)))`` exactly when the DQ
#: and the Q share scale and zero point (input 0 is the data; the other inputs are kept as they are).
ON_CODES = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity",
            "Resize")
#: One-input ops and their com.microsoft op, read as (X, x_scale, x_zero_point, y_scale, y_zero_point).
UNARY = {"AveragePool": "com.microsoft.QLinearAveragePool",
         "GlobalAveragePool": "com.microsoft.QLinearGlobalAveragePool",
         "Sigmoid": "com.microsoft.QLinearSigmoid", "LeakyRelu": "com.microsoft.QLinearLeakyRelu"}
#: (A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point).
BINARY = {"Add": "com.microsoft.QLinearAdd", "Mul": "com.microsoft.QLinearMul"}
#: Ops an activation (Relu, Clip(0, 6)) after them fuses into (an Add only as a MatMul's bias).
ACTIVATED = ("Conv", "Gemm", "MatMul", "Add")
#: How far a bias's scale may stray from ``x_scale * w_scale``: a few float32 roundings of the product.
BIAS_SCALE_RTOL = 2.0**-20

#: Ops whose output has the rank of their first input, and those whose inputs broadcast (see :func:`_ranks`).
_SAME_RANK = frozenset(("QuantizeLinear", "DequantizeLinear", "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu",
                        "HardSwish", "HardSigmoid", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Cast",
                        "Identity", "Dropout", "Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization",
                        "InstanceNormalization", "Conv", "QLinearConv", "MaxPool", "AveragePool",
                        "GlobalAveragePool", "Transpose", "Resize", "Concat", "Slice", "Pad"))
_BROADCAST = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"))


def _ranks(graph: Graph) -> dict[str, int]:
    """The rank of each tensor that is known without shapes: graph inputs and parameters, then node by node
    through ops that keep, broadcast or fix the rank (the others' outputs are left out: unknown)."""
    ranks = {name: len(spec.shape) for name, spec in graph.inputs.items()}
    ranks.update((name, value.ndim) for name, value in graph.params.items())
    for node in graph.nodes:
        known = [ranks.get(t) for t in node.inputs if t]
        if not known or not node.outputs:
            continue
        out = node.outputs[0]
        if node.op in _SAME_RANK and known[0] is not None:
            ranks[out] = known[0]
        elif node.op in ("Gemm", "Flatten"):
            ranks[out] = 2
        elif node.op == "Reshape" and len(node.inputs) > 1 and node.inputs[1] in graph.params:
            ranks[out] = graph.params[node.inputs[1]].size
        elif None not in known and (node.op in _BROADCAST or node.op == "MatMul" and min(known) >= 2):
            ranks[out] = max(known)
    return ranks


def _float_out(dq: Node) -> bool:
    """Whether a DQ writes float32 (its opset-23 ``output_dtype`` absent, or FLOAT)."""
    return dq.attrs.get("output_dtype", 0) in (0, FLOAT)


def _row(shape: tuple[int, ...], n: int) -> bool:
    """Whether a constant of ``shape`` broadcasts along the rows of an ``[M, n]`` result only (one value per
    column or one in all), leaving its shape ``[M, n]``."""
    return len(shape) <= 2 and all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, n))


class _Fuser:
    """The fusion of one graph (which it reads, and to whose ``params`` it adds): an index of its producers and
    consumers, the ranks it can tell, and new parameters under names nothing else uses."""

    def __init__(self, graph: Graph):
        self.graph, self.params = graph, graph.params
        self.index = graph.index()
        # passes._fresh gathers every name per call: one set here keeps the pass linear in the graph's size
        self.taken = set(graph.params) | set(graph.inputs) | set(self.index.producer)
        self._ranks: dict[str, int] | None = None
        self._weights: dict[tuple[int, bool], list[str]] = {}
        self.with_act = {"Conv": self.conv, "Gemm": self.gemm, "MatMul": self.matmul}
        self.without_act = {**dict.fromkeys(BINARY, self.binary), **dict.fromkeys(UNARY, self.unary),
                            "Concat": self.concat, **dict.fromkeys(ON_CODES, self.on_codes)}

    # ---- lookups -------------------------------------------------------------------------------------------------

    def add(self, stem: str, value: np.ndarray) -> str:
        """A new parameter holding ``value``, named ``stem`` or ``stem_<k>``: the first name not taken."""
        name, k = stem, 0
        while name in self.taken:
            k += 1
            name = f"{stem}_{k}"
        self.taken.add(name)
        self.params[name] = value
        return name

    def rank(self, tensor: str) -> int | None:
        if self._ranks is None:
            self._ranks = _ranks(self.graph)
        return self._ranks.get(tensor)

    def producer(self, tensor: str, op: str) -> Node | None:
        node = self.index.producer.get(tensor)
        return node if node is not None and node.op == op else None

    def private(self, tensor: str) -> Node | None:
        return _private(self.graph, self.index, tensor)

    def quant_params(self, node: Node) -> list[str] | None:
        """``[scale, zero_point]`` of a Q or DQ node when they are constants of one value each, a float32 scale
        and a uint8 / int8 zero point (for a Q, the type it writes: not a 4-bit one), else None."""
        scale, zero = (node.inputs[1:3] + ["", ""])[:2]
        s, z = self.params.get(scale), self.params.get(zero)
        if s is None or z is None or s.size != 1 or z.size != 1 or s.dtype != np.float32 or z.dtype not in CODES:
            return None
        if node.op == "DequantizeLinear":
            return [scale, zero] if _float_out(node) else None
        same_type = node.attrs.get("output_dtype_name", z.dtype.name) == z.dtype.name
        return [scale, zero] if same_type and node.attrs.get("precision", 0) in (0, FLOAT) else None

    def activation(self, tensor: str) -> list[str] | None:
        """``[codes, scale, zero_point]`` of the per-tensor DQ writing ``tensor`` (see :meth:`quant_params`)."""
        dq = self.producer(tensor, "DequantizeLinear")
        params = None if dq is None else self.quant_params(dq)
        return None if params is None else [dq.inputs[0], *params]

    def same_type(self, *groups: list[str]) -> bool:
        """Whether the ``[..., scale, zero_point]`` groups all have zero points of one type (their codes' type)."""
        return len({self.params[g[-1]].dtype for g in groups}) == 1

    def same_params(self, x: list[str], y: list[str]) -> bool:
        """Whether two ``[..., scale, zero_point]`` groups quantize alike: equal scales, equal zero points."""
        (sx, zx), (sy, zy) = ([self.params[t] for t in g[-2:]] for g in (x, y))
        return sx.item() == sy.item() and zx.dtype == zy.dtype and zx.item() == zy.item()

    # ---- constants -----------------------------------------------------------------------------------------------

    def dequantized(self, dq: Node) -> np.ndarray | None:
        """The value of a DQ of constant 8-bit codes (scale and zero point constants too), else None."""
        names = (dq.inputs + ["", ""])[:3]
        codes, scale, zero = (self.params.get(t) if t else None for t in names)
        if codes is None or scale is None or (names[2] and zero is None) or codes.dtype not in CODES:
            return None
        if not _float_out(dq):
            return None
        try:
            return dequantize_linear(codes, scale, zero, axis=int(dq.attrs.get("axis", 1)),
                                     block_size=int(dq.attrs.get("block_size", 0)))
        except ValueError as error:  # scales or zero points that do not fit the codes' shape
            raise ValueError(f"node {dq.name!r} (DequantizeLinear): codes {list(codes.shape)}, scale "
                             f"{list(scale.shape)}: {error}") from None

    def weights(self, tensor: str, axis: int, ndim: int | None = None
                ) -> tuple[Node, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(dq, codes, scale, zero_point)`` of the DQ of constant int8 / uint8 weights (``ndim``-D if given)
        writing ``tensor``, quantized per tensor or per channel along ``axis`` (zero point 0 when absent)."""
        dq = self.producer(tensor, "DequantizeLinear")
        if dq is None or dq.attrs.get("block_size", 0) or not _float_out(dq):
            return None
        codes, scale = (self.params.get(t) for t in dq.inputs[:2])
        if codes is None or scale is None or codes.dtype not in CODES or scale.dtype != np.float32:
            return None
        if ndim is not None and codes.ndim != ndim or codes.ndim <= axis:
            return None
        zero_name = dq.inputs[2] if len(dq.inputs) > 2 else ""
        zero = self.params.get(zero_name) if zero_name else np.zeros((), codes.dtype)
        if zero is None or zero.dtype != codes.dtype or zero.size != scale.size:
            return None
        per_channel = scale.ndim == 1 and scale.size == codes.shape[axis] and \
            int(dq.attrs.get("axis", 1)) % codes.ndim == axis
        return (dq, codes, scale, zero) if scale.size == 1 or per_channel else None

    def weight_inputs(self, dq: Node, codes: np.ndarray, zero: np.ndarray, transpose: bool = False) -> list[str]:
        """``[w, w_scale, w_zero_point]`` for an integer op: int8 codes (uint8 ones and their zero points shifted
        by 128), transposed if asked (MatMul's ``[K, N]`` as lowbit.QGemm's ``[N, K]``); new parameters only
        where they differ from the DQ's, made once per DQ."""
        key = (id(dq), transpose)
        if key not in self._weights:
            w_name, scale_name = dq.inputs[:2]
            zero_name = dq.inputs[2] if len(dq.inputs) > 2 else ""
            if codes.dtype == np.uint8:  # (w - 128) - (zero - 128) = w - zero
                codes, zero = (codes ^ np.uint8(0x80)).view(np.int8), (zero.astype(np.int16) - 128).astype(np.int8)
                w_name = zero_name = ""
            if transpose:
                codes, w_name = np.ascontiguousarray(codes.T), ""
            stem = dq.inputs[0] + ("_t" if transpose else "")
            self._weights[key] = [w_name or self.add(f"{stem}_s8", codes), scale_name,
                                  zero_name or self.add(f"{stem}_zero_point", zero)]
        return self._weights[key]

    def int32_bias(self, tensor: str, unit: np.ndarray, n: int) -> str | None:
        """The int32 codes of the DQ writing ``tensor`` when they count ``unit`` each (``x_scale * w_scale``, per
        tensor or per channel: its scale up to float32 rounding, zero point 0) and give one value per output
        column (of ``n``) or one in all, as ONNX's integer ops read a bias; else None."""
        dq = self.producer(tensor, "DequantizeLinear")
        if dq is None:
            return None
        codes, scale = (self.params.get(t) for t in dq.inputs[:2])
        zero_name = dq.inputs[2] if len(dq.inputs) > 2 else ""
        zero = self.params.get(zero_name) if zero_name else np.zeros(1, np.int32)
        if codes is None or scale is None or zero is None or codes.dtype != np.int32 or np.any(zero != 0):
            return None
        if not _row(codes.shape, n) or scale.size not in (1, n) or scale.dtype != np.float32:
            return None
        close = np.allclose(scale.astype(np.float64).reshape(-1), unit, rtol=BIAS_SCALE_RTOL, atol=0)
        return dq.inputs[0] if close else None

    def real_bias(self, tensor: str, n: int) -> str | None:
        """A constant bias in real units for lowbit.QGemm: a float32 parameter, or a DQ of constant codes (as a
        new float32 parameter), with one value per output column (of ``n``) or one in all; else None."""
        value = self.params.get(tensor)
        if value is not None:
            return tensor if value.dtype == np.float32 and _row(value.shape, n) else None
        dq = self.producer(tensor, "DequantizeLinear")
        value = None if dq is None else self.dequantized(dq)
        if value is None or value.dtype != np.float32 or not _row(value.shape, n):
            return None
        return self.add(f"{tensor}_value", value)

    def unit(self, x: list[str], w_scale: np.ndarray) -> np.ndarray:
        """What one unit of the integer accumulator is worth: ``x_scale * w_scale`` (1 or N values), in float64."""
        return np.float64(self.params[x[1]].item()) * w_scale.astype(np.float64).reshape(-1)

    def gemm_bias(self, tensor: str, x: list[str], w_scale: np.ndarray, n: int) -> str | None:
        """lowbit.QGemm's bias: int32 codes in accumulator units when they are, else real units."""
        found = self.int32_bias(tensor, self.unit(x, w_scale), n)
        return found if found is not None else self.real_bias(tensor, n)

    # ---- the groups ----------------------------------------------------------------------------------------------

    def fuse(self, q: Node) -> tuple[Node, list[Node]] | None:
        """The integer node that replaces ``q`` (writing its codes) and the float nodes it absorbs, when ``q``
        ends a fusable group; else None."""
        y = self.quant_params(q)
        top = self.index.producer.get(q.inputs[0])
        if y is None or top is None or self.private(q.inputs[0]) is not q:
            return None
        group, act = [top], None
        inner = self.index.producer.get(top.inputs[0]) if top.op in ("Relu", "Clip") else None
        if inner is not None and inner.op in ACTIVATED and self.private(top.inputs[0]) is top:
            act = _activation_name(self.graph, top)
            group = [inner, top] if act else group
        if any(len(node.outputs) != 1 for node in group):
            return None
        core = group[0]
        if core.op == "Add" and (found := self.matmul_bias(core)) is not None:
            group.insert(0, found[0])
            fused = self.matmul(found[0], act, y, q.outputs, found[1])
        elif core.op in self.with_act:
            fused = self.with_act[core.op](core, act, y, q.outputs)
        elif act is None and core.op in self.without_act:
            fused = self.without_act[core.op](core, y, q.outputs)
        else:
            fused = None
        return None if fused is None else (fused, group)

    def matmul_bias(self, add: Node) -> tuple[Node, str] | None:
        """``(matmul, bias)`` when ``add`` adds ``bias`` to a MatMul's private output (:meth:`matmul` checks that
        the bias is a constant)."""
        for k in (0, 1):
            matmul = self.producer(add.inputs[k], "MatMul")
            if matmul is not None and self.private(add.inputs[k]) is add:
                return matmul, add.inputs[1 - k]
        return None

    def conv(self, node: Node, act: str | None, y: list[str], outputs: list[str]) -> Node | None:
        x, w = self.activation(node.inputs[0]), self.weights(node.inputs[1], axis=0)
        if x is None or w is None:
            return None
        dq, codes, scale, zero = w
        bias = node.inputs[2] if len(node.inputs) > 2 else ""
        b = self.int32_bias(bias, self.unit(x, scale), codes.shape[0]) if bias else ""
        if b is None:
            return None
        attrs = {**node.attrs, **({"activation": act} if act else {})}
        return Node("QLinearConv", [*x, *self.weight_inputs(dq, codes, zero), *y, *([b] if b else [])], outputs,
                    attrs, node.name)

    def matmul(self, node: Node, act: str | None, y: list[str], outputs: list[str], bias: str = "") -> Node | None:
        x, w = self.activation(node.inputs[0]), self.weights(node.inputs[1], axis=1, ndim=2)
        if x is None or w is None:
            return None
        dq, codes, scale, zero = w
        if act is None and not bias:
            return Node("QLinearMatMul", [*x, *self.weight_inputs(dq, codes, zero), *y], outputs, {}, node.name)
        if self.rank(node.inputs[0]) != 2:  # lowbit.QGemm reads [M, K]
            return None
        b = self.gemm_bias(bias, x, scale, codes.shape[1]) if bias else ""
        if b is None:
            return None
        return self.qgemm(node, x, self.weight_inputs(dq, codes, zero, transpose=True), y, b, act, outputs)

    def gemm(self, node: Node, act: str | None, y: list[str], outputs: list[str]) -> Node | None:
        trans_b = bool(node.attrs.get("transB", 0))
        x, w = self.activation(node.inputs[0]), self.weights(node.inputs[1], axis=0 if trans_b else 1, ndim=2)
        if x is None or w is None:
            return None
        dq, codes, scale, zero = w
        n = codes.shape[0 if trans_b else 1]
        c = node.inputs[2] if len(node.inputs) > 2 else ""
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        if not node.attrs.get("transA", 0) and alpha == 1.0 and (beta == 1.0 or not c):
            b = self.gemm_bias(c, x, scale, n) if c else ""
            if b is None:
                return None
            return self.qgemm(node, x, self.weight_inputs(dq, codes, zero, transpose=not trans_b), y, b, act,
                              outputs)
        if act is not None or c and beta == 0.0:
            return None
        b = self.int32_bias(c, alpha / beta * self.unit(x, scale), n) if c else ""  # QGemm's C counts alpha too
        if b is None:
            return None
        attrs = {k: node.attrs[k] for k in ("transA", "transB", "alpha") if k in node.attrs}
        return Node("com.microsoft.QGemm", [*x, *self.weight_inputs(dq, codes, zero), b, *y], outputs, attrs,
                    node.name)

    @staticmethod
    def qgemm(node: Node, x: list[str], w: list[str], y: list[str], bias: str, act: str | None,
              outputs: list[str]) -> Node:
        """lowbit.QGemm (x, x_scale, x_zero_point, w [N, K], w_scale, w_zero_point, y_scale, y_zero_point, B)."""
        return Node("lowbit.QGemm", [*x, *w, *y, *([bias] if bias else [])], outputs,
                    {"activation": act} if act else {}, node.name)

    def binary(self, node: Node, y: list[str], outputs: list[str]) -> Node | None:
        a, b = (self.activation(t) for t in node.inputs[:2])
        if a is None or b is None or not self.same_type(a, b, y):
            return None
        return Node(BINARY[node.op], [*a, *b, *y], outputs, {}, node.name)

    def unary(self, node: Node, y: list[str], outputs: list[str]) -> Node | None:
        x = self.activation(node.inputs[0])
        if x is None or not self.same_type(x, y) or any(d != 1 for d in node.attrs.get("dilations", ())):
            return None  # com.microsoft.QLinearAveragePool has no dilations
        attrs = {k: v for k, v in node.attrs.items() if k != "dilations"}
        return Node(UNARY[node.op], [*x, *y], outputs, attrs, node.name)

    def concat(self, node: Node, y: list[str], outputs: list[str]) -> Node | None:
        xs = [self.activation(t) for t in node.inputs]
        if not xs or None in xs or not self.same_type(*xs, y):
            return None
        if all(self.same_params(x, y) for x in xs):
            return Node("Concat", [x[0] for x in xs], outputs, dict(node.attrs), node.name)
        return Node("com.microsoft.QLinearConcat", [*y, *(t for x in xs for t in x)], outputs, dict(node.attrs),
                    node.name)

    def on_codes(self, node: Node, y: list[str], outputs: list[str]) -> Node | None:
        x = self.activation(node.inputs[0])
        if x is None or not self.same_params(x, y):
            return None
        if node.op == "Resize" and (node.attrs.get("mode", "nearest") != "nearest" or
                                    node.attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"):
            return None  # interpolation makes new values; a crop's extrapolation_value is a real, not a code
        return Node(node.op, [x[0], *node.inputs[1:]], outputs, dict(node.attrs), node.name)


def fuse_qdq(graph: Graph) -> Graph:
    """``graph`` with its QDQ groups fused into integer ops (see the module docstring for the groups).

    Pure: the result is a new graph; new parameters are new arrays under new names, and neither ``graph`` nor
    its arrays change. Each fused node takes the name of the float op it replaces and writes the Q's output;
    DQ nodes nothing reads any more are dropped, those of constants still read become float32 parameters
    (under the DQ's output name), and parameters nothing reads are dropped. Linear in the graph's size.
    """
    out = graph.copy()
    fuser = _Fuser(out)
    fused: dict[int, Node] = {}
    absorbed: set[int] = set()
    for node in out.nodes:
        found = fuser.fuse(node) if node.op == "QuantizeLinear" else None
        if found is not None:
            fused[id(node)] = found[0]
            absorbed.update(id(n) for n in found[1])
    nodes = [fused.get(id(n), n) for n in out.nodes if id(n) not in absorbed]
    read = {t for n in nodes for t in n.inputs}
    out.nodes = []
    for node in nodes:
        if node.op == "DequantizeLinear" and node.outputs[0] not in out.outputs:
            if node.outputs[0] not in read:
                continue  # its readers were all fused
            value = fuser.dequantized(node)
            if value is not None:  # weights of a float op: dequantized once, here
                out.params[node.outputs[0]] = value
                continue
        out.nodes.append(node)
    _drop_unused(out, set(out.params))
    return out
