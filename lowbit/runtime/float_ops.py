"""Preparers of the float32 ops (ONNX semantics), in NumPy: BLAS for the matrix products, ``out=`` ufuncs elsewhere.

Everything that depends only on parameters and shapes is done at prepare time:
convolution weights reshaped to matrices, Gemm's ``alpha`` / ``transB`` / ``beta``
folded into the operands, batch norm reduced to one scale and shift, padded
scratch buffers allocated with their borders filled once. ``Kernel.ops`` counts
2 per multiply-add for Conv / Gemm / MatMul and one per output element otherwise.

Conv and Gemm honour the lowbit attribute ``activation`` (``"relu"`` or
``"relu6"``) set by :func:`lowbit.runtime.passes.fuse_activations`, applied in
place after the bias.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import kernels
from lowbit.graph.ir import Graph, Node
from lowbit.runtime.registry import Kernel, Shape, preparer

Spec = tuple[Shape, np.dtype]
F32 = np.dtype(np.float32)
ACTIVATIONS = ("relu", "relu6")


def attr(node: Node, name: str, default: Any) -> Any:
    return node.attrs.get(name, default)


def param(node: Node, graph: Graph, index: int, *, required: bool = True) -> np.ndarray | None:
    """The constant feeding input ``index`` of ``node`` (None when absent and not ``required``)."""
    name = node.inputs[index] if index < len(node.inputs) else ""
    if name in graph.params:
        return graph.params[name]
    if required:
        raise ValueError(f"node {node.name!r} ({node.op}): input {index} ({name!r}) must be a parameter")
    return None


def activation_of(node: Node) -> Callable[[np.ndarray], None]:
    """The in-place epilogue of attr ``activation``: relu ``max(y, 0)``, relu6 ``min(max(y, 0), 6)``, or nothing."""
    name = attr(node, "activation", None)
    if name is None:
        return lambda y: None
    if name not in ACTIVATIONS:
        raise ValueError(f"node {node.name!r}: activation must be one of {ACTIVATIONS}, got {name!r}")
    if name == "relu":
        return lambda y: np.maximum(y, 0, out=y)
    return lambda y: np.clip(y, 0, 6, out=y)


def _product(values) -> int:
    return int(np.prod(values, dtype=np.int64))


# ---- window geometry (Conv, MaxPool, AveragePool) ------------------------------------------------------------------

def window_geometry(node: Node, in_hw: tuple[int, int], kernel_hw: tuple[int, int], *, ceil_mode: bool = False):
    """ONNX ``strides``, ``dilations``, ``pads`` (top, left, bottom, right) / ``auto_pad`` and the output size.

    Per axis, ``o = floor_or_ceil((i + p0 + p1 - d (k - 1) - 1) / s) + 1``; with ``ceil_mode``
    a last window starting in the end padding is dropped (as ONNX and PyTorch).
    """
    strides = tuple(attr(node, "strides", (1, 1)))
    dilations = tuple(attr(node, "dilations", (1, 1)))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for axis in range(2):
            extent = dilations[axis] * (kernel_hw[axis] - 1) + 1
            total = max(0, (-(-in_hw[axis] // strides[axis]) - 1) * strides[axis] + extent - in_hw[axis])
            small, large = total // 2, total - total // 2
            pads[axis], pads[axis + 2] = (large, small) if auto_pad == "SAME_LOWER" else (small, large)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = list(attr(node, "pads", (0, 0, 0, 0)))
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise ValueError(f"node {node.name!r} ({node.op}): only 2-D windows are supported "
                         f"(strides {strides}, dilations {dilations}, pads {pads})")
    out_hw = []
    for axis in range(2):
        span = in_hw[axis] + pads[axis] + pads[axis + 2] - dilations[axis] * (kernel_hw[axis] - 1) - 1
        if span < 0:
            raise ValueError(f"node {node.name!r} ({node.op}): window {kernel_hw} larger than the padded input {in_hw}")
        size = (-(-span // strides[axis]) if ceil_mode else span // strides[axis]) + 1
        if ceil_mode and (size - 1) * strides[axis] >= in_hw[axis] + pads[axis]:
            size -= 1
        out_hw.append(size)
    return strides, dilations, tuple(int(p) for p in pads), tuple(out_hw)


class _Padded:
    """A scratch copy of NCHW ``x`` with fixed borders: ``pads`` plus ``extra`` at the end (ceil_mode overhang)."""

    def __init__(self, shape: Shape, pads, extra: tuple[int, int], fill: float, dtype: np.dtype):
        n, c, h, w = shape
        top, left, bottom, right = pads
        self.trivial = not any(pads) and not any(extra)
        self.buffer = np.full((n, c, top + h + bottom + extra[0], left + w + right + extra[1]), fill, dtype)
        self.interior = self.buffer[:, :, top:top + h, left:left + w]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.trivial:
            return x
        np.copyto(self.interior, x)
        return self.buffer


def _window_view(xp: np.ndarray, kernel_hw, strides, dilations, out_hw) -> np.ndarray:
    """``[N, C, OH, OW, KH, KW]`` view of the windows of padded ``xp`` (no copy)."""
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel_hw))
    view = sliding_window_view(xp, extent, axis=(2, 3))
    return view[:, :, :(out_hw[0] - 1) * strides[0] + 1:strides[0], :(out_hw[1] - 1) * strides[1] + 1:strides[1],
                ::dilations[0], ::dilations[1]]


def _taps(xp: np.ndarray, kernel_hw, strides, dilations, out_hw) -> list[np.ndarray]:
    """The ``KH KW`` strided ``[N, C, OH, OW]`` views of padded ``xp``, one per window tap (basic slicing: no copy,
    and far cheaper per call than ``sliding_window_view``)."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel_hw, strides, dilations, out_hw
    return [xp[:, :, ky * dh:ky * dh + (oh - 1) * sh + 1:sh, kx * dw:kx * dw + (ow - 1) * sw + 1:sw]
            for ky in range(kh) for kx in range(kw)]


def _reduce_taps(taps: list[np.ndarray], ufunc: np.ufunc, out: np.ndarray) -> None:
    """``out = ufunc.reduce`` over the window taps, one whole tap at a time."""
    np.copyto(out, taps[0])
    for tap in taps[1:]:
        ufunc(out, tap, out=out)


def _extra(in_hw, pads, kernel_hw, strides, dilations, out_hw) -> tuple[int, int]:
    """Rows / columns past the end padding that the last (ceil_mode) window reaches."""
    return tuple(max(0, (o - 1) * s + d * (k - 1) + 1 - (i + p0 + p1))
                 for i, p0, p1, k, s, d, o in zip(in_hw, pads[:2], pads[2:], kernel_hw, strides, dilations, out_hw))


# ---- Conv ----------------------------------------------------------------------------------------------------------

@preparer("Conv")
def prepare_conv(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Conv, NCHW::

        y[n, o, oy, ox] = B[o] + sum_{c, ky, kx} w[o, c, ky, kx] x_pad[n, g C_g + c, oy SH + ky DH, ox SW + kx DW]

    over the ``C_g = C / group`` channels of ``o``'s group ``g``. group 1: im2col (a window
    view of the zero-padded input, copied once into a ``[N, C KH KW, OH OW]`` scratch) and
    one batched float32 matmul writing NCHW directly; 1x1 stride-1 unpadded convolutions
    skip the im2col. Depthwise (one input and one output channel per group): a sum over
    the taps of whole-tensor multiply-adds. Other groups: one matmul per group, batched.
    """
    (x_shape, _), w = inputs[0], param(node, graph, 1).astype(np.float32)
    bias = param(node, graph, 2, required=False)
    n, c, h, wd = x_shape
    o, cg, kh, kw = w.shape
    group = int(attr(node, "group", 1))
    if c != cg * group or o % group:
        raise ValueError(f"node {node.name!r} (Conv): input channels {c}, weight {w.shape} and group {group} disagree")
    strides, dilations, pads, (oh, ow) = window_geometry(node, (h, wd), (kh, kw))
    padded = _Padded(x_shape, pads, (0, 0), 0.0, F32)
    act = activation_of(node)
    b = None if bias is None else bias.astype(np.float32).reshape(1, o, 1, 1)
    og = o // group
    pointwise = kh == kw == 1 and strides == (1, 1) and not any(pads)

    def windows(x):
        return _window_view(padded(x), (kh, kw), strides, dilations, (oh, ow))

    if group == 1:
        wm = np.ascontiguousarray(w.reshape(o, cg * kh * kw))
        cols = None if pointwise else np.empty((n, c, kh, kw, oh, ow), np.float32)

        def body(x, y):
            if pointwise:
                lhs = x.reshape(n, c, h * wd)
            else:
                np.copyto(cols, windows(x).transpose(0, 1, 4, 5, 2, 3))
                lhs = cols.reshape(n, c * kh * kw, oh * ow)
            np.matmul(wm, lhs, out=y.reshape(n, o, oh * ow))
    elif cg == 1 and og == 1:
        taps = [np.ascontiguousarray(w[:, 0, ky, kx]).reshape(1, o, 1, 1) for ky in range(kh) for kx in range(kw)]
        scratch = np.empty((n, o, oh, ow), np.float32)

        def body(x, y):
            view = windows(x)
            for t, weight in enumerate(taps):
                np.multiply(view[..., t // kw, t % kw], weight, out=y if t == 0 else scratch)
                if t:
                    np.add(y, scratch, out=y)
    else:
        wg = np.ascontiguousarray(w.reshape(group, og, cg * kh * kw))
        cols = np.empty((n, group, cg, kh, kw, oh, ow), np.float32)

        def body(x, y):
            view = windows(x).reshape(n, group, cg, oh, ow, kh, kw)
            np.copyto(cols, view.transpose(0, 1, 2, 5, 6, 3, 4))
            np.matmul(wg, cols.reshape(n, group, cg * kh * kw, oh * ow), out=y.reshape(n, group, og, oh * ow))

    def run(ins, outs):
        y = outs[0]
        body(ins[0], y)
        if b is not None:
            np.add(y, b, out=y)
        act(y)

    return Kernel(run, [((n, o, oh, ow), F32)], ops=2 * n * o * oh * ow * cg * kh * kw,
                  note="im2col + BLAS" if group == 1 else ("depthwise taps" if cg == og == 1 else "grouped BLAS"))


# ---- matrix products -----------------------------------------------------------------------------------------------

@preparer("Gemm")
def prepare_gemm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Gemm: ``Y = alpha A' B' + beta C`` (``A' = A.T`` if transA, ``B' = B.T`` if transB, C broadcast).

    A constant B is stored once as ``alpha B'`` (contiguous ``[K, N]``) and a constant C as ``beta C``.
    """
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    a_shape, b_shape = inputs[0][0], inputs[1][0]
    m, k = a_shape[::-1] if trans_a else a_shape
    kb, cols = b_shape[::-1] if trans_b else b_shape
    if k != kb:
        raise ValueError(f"node {node.name!r} (Gemm): A {a_shape} (transA={trans_a}) and B {b_shape} "
                         f"(transB={trans_b}) do not multiply")
    b_const = param(node, graph, 1, required=False)
    w = None if b_const is None else np.ascontiguousarray(alpha * (b_const.T if trans_b else b_const), np.float32)
    c_const = param(node, graph, 2, required=False)
    has_c = len(node.inputs) > 2 and bool(node.inputs[2])
    c = None if c_const is None else (beta * c_const).astype(np.float32)
    act = activation_of(node)

    def run(ins, outs):
        y = outs[0]
        a = ins[0].T if trans_a else ins[0]
        if w is not None:
            np.matmul(a, w, out=y)
        else:
            np.matmul(a, ins[1].T if trans_b else ins[1], out=y)
            if alpha != 1.0:
                np.multiply(y, np.float32(alpha), out=y)
        if has_c:
            np.add(y, c if c is not None else np.float32(beta) * ins[2], out=y)
        act(y)

    return Kernel(run, [((m, cols), F32)], ops=2 * m * k * cols, note="BLAS")


def _matmul_shape(node: Node, a: Shape, b: Shape) -> Shape:
    """numpy.matmul's result shape (1-D operands promoted then squeezed)."""
    a2, b2 = (1,) + a if len(a) == 1 else a, b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError(f"node {node.name!r} (MatMul): shapes {a} and {b} do not multiply")
    try:
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    except ValueError:
        raise ValueError(f"node {node.name!r} (MatMul): batch dimensions of {a} and {b} do not broadcast") from None
    return batch + a2[-2:-1] * (len(a) > 1) + b2[-1:] * (len(b) > 1)


@preparer("MatMul")
def prepare_matmul(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX MatMul (numpy.matmul semantics, batch dimensions broadcast)."""
    (a, a_dtype), (b, b_dtype) = inputs
    shape = _matmul_shape(node, a, b)
    k = a[-1]
    rows_cols = _product(shape)  # every output element is one K-long dot product

    def run(ins, outs):
        np.matmul(ins[0], ins[1], out=outs[0])

    return Kernel(run, [(shape, np.result_type(a_dtype, b_dtype))], ops=2 * rows_cols * k, note="BLAS")


# ---- normalization -------------------------------------------------------------------------------------------------

@preparer("BatchNormalization")
def prepare_batch_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Inference batch norm over axis 1: ``y = x s + t``, ``s = scale / sqrt(var + eps)``, ``t = bias - mean s``."""
    shape, dtype = inputs[0]
    scale, bias, mean, var = (param(node, graph, i).astype(np.float64) for i in range(1, 5))
    s = scale / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    lead = (1, -1) + (1,) * (len(shape) - 2)
    s32, t32 = s.astype(np.float32).reshape(lead), (bias - mean * s).astype(np.float32).reshape(lead)

    def run(ins, outs):
        np.multiply(ins[0], s32, out=outs[0])
        np.add(outs[0], t32, out=outs[0])

    return Kernel(run, [(shape, dtype)], ops=2 * _product(shape))


@preparer("LayerNormalization")
def prepare_layer_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX LayerNormalization: over axes ``axis..rank-1``, ``y = (x - mean) / sqrt(var + eps) * scale + bias``."""
    if len(node.outputs) > 1:
        raise ValueError(f"node {node.name!r} (LayerNormalization): only output Y is supported")
    shape, dtype = inputs[0]
    axis = int(attr(node, "axis", -1)) % len(shape)
    axes = tuple(range(axis, len(shape)))
    eps = float(attr(node, "epsilon", 1e-5))
    scale = param(node, graph, 1)
    bias = param(node, graph, 2, required=False)

    def run(ins, outs):
        x, y = ins[0], outs[0]
        np.subtract(x, x.mean(axis=axes, keepdims=True), out=y)
        inv = 1.0 / np.sqrt(np.mean(np.square(y), axis=axes, keepdims=True) + eps)
        np.multiply(y, inv.astype(dtype, copy=False), out=y)
        np.multiply(y, scale, out=y)
        if bias is not None:
            np.add(y, bias, out=y)

    return Kernel(run, [(shape, dtype)], ops=8 * _product(shape))


# ---- elementwise ---------------------------------------------------------------------------------------------------

def _erf(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, float32 rounding): NumPy has no erf.

    ``erf(x) = sign(x) (1 - (a1 t + a2 t^2 + ... + a5 t^5) exp(-x^2))``, ``t = 1 / (1 + p |x|)``.
    """
    ax = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    np.multiply(poly, np.exp(-ax * ax), out=out)
    np.subtract(1.0, out, out=out)
    return np.copysign(out, x, out=out)


def _gelu(node: Node) -> Callable[[np.ndarray, np.ndarray], None]:
    approximate = attr(node, "approximate", "none")
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = np.float32(math.sqrt(2.0 / math.pi))

        def tanh_form(x, y):
            np.tanh(c * (x + np.float32(0.044715) * x * x * x), out=y)
            np.add(y, 1, out=y)
            np.multiply(y, 0.5 * x, out=y)
        return tanh_form
    if approximate != "none":
        raise ValueError(f"node {node.name!r} (Gelu): approximate must be 'none' or 'tanh', got {approximate!r}")

    def erf_form(x, y):  # 0.5 x (1 + erf(x / sqrt 2))
        _erf(x * np.float32(1 / math.sqrt(2.0)), y)
        np.add(y, 1, out=y)
        np.multiply(y, 0.5 * x, out=y)
    return erf_form


def _sigmoid(x, y):  # 1 / (1 + e^-x) = (1 + tanh(x / 2)) / 2, which never overflows
    np.multiply(x, 0.5, out=y)
    np.tanh(y, out=y)
    np.add(y, 1, out=y)
    np.multiply(y, 0.5, out=y)


def _hard_swish(x, y):  # x max(0, min(1, x / 6 + 1 / 2))
    np.multiply(x, np.float32(1 / 6), out=y)
    np.add(y, 0.5, out=y)
    np.clip(y, 0, 1, out=y)
    np.multiply(y, x, out=y)


UNARY: dict[str, Callable[[Node], Callable[[np.ndarray, np.ndarray], Any]]] = {
    "Relu": lambda node: lambda x, y: np.maximum(x, 0, out=y),
    "Sigmoid": lambda node: _sigmoid,
    "Tanh": lambda node: lambda x, y: np.tanh(x, out=y),
    "HardSwish": lambda node: _hard_swish,
    "Gelu": _gelu,
}


@preparer(*UNARY)
def prepare_unary(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Relu ``max(x, 0)``, Sigmoid ``1 / (1 + e^-x)``, Tanh, HardSwish ``x clip(x / 6 + 1/2, 0, 1)``,
    Gelu ``0.5 x (1 + erf(x / sqrt 2))`` (or its ``approximate="tanh"`` form)."""
    fn = UNARY[node.op](node)
    shape, dtype = inputs[0]

    def run(ins, outs):
        fn(ins[0], outs[0])

    return Kernel(run, [(shape, dtype)], ops=_product(shape))


@preparer("Clip")
def prepare_clip(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """``min(max(x, lo), hi)``; bounds from inputs 1 and 2 (opset >= 11) or attrs ``min`` / ``max``.

    An absent bound is unbounded."""
    shape, dtype = inputs[0]
    bounds = []
    for index, name in ((1, "min"), (2, "max")):
        value = param(node, graph, index, required=False)
        if value is None and len(node.inputs) > index and node.inputs[index]:
            raise ValueError(f"node {node.name!r} (Clip): bound {name} must be a parameter")
        bounds.append(attr(node, name, None) if value is None else value.item())
    lo, hi = bounds

    def run(ins, outs):
        np.clip(ins[0], lo, hi, out=outs[0])

    return Kernel(run, [(shape, dtype)], ops=_product(shape))


BINARY = {"Add": np.add, "Mul": np.multiply}


@preparer(*BINARY)
def prepare_binary(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Add / Mul with NumPy (= ONNX multidirectional) broadcasting."""
    (a, a_dtype), (b, b_dtype) = inputs
    try:
        shape = np.broadcast_shapes(a, b)
    except ValueError:
        raise ValueError(f"node {node.name!r} ({node.op}): shapes {a} and {b} do not broadcast") from None
    ufunc = BINARY[node.op]

    def run(ins, outs):
        ufunc(ins[0], ins[1], out=outs[0])

    return Kernel(run, [(shape, np.result_type(a_dtype, b_dtype))], ops=_product(shape))


@preparer("Softmax")
def prepare_softmax(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Softmax (opset 13) along ``axis`` (default -1): ``e^(x - max) / sum e^(x - max)``."""
    shape, dtype = inputs[0]
    axis = int(attr(node, "axis", -1)) % len(shape)

    def run(ins, outs):
        y = outs[0]
        np.subtract(ins[0], ins[0].max(axis=axis, keepdims=True), out=y)
        np.exp(y, out=y)
        np.divide(y, y.sum(axis=axis, keepdims=True), out=y)

    return Kernel(run, [(shape, dtype)], ops=4 * _product(shape))


# ---- pooling -------------------------------------------------------------------------------------------------------

def _pool_setup(node: Node, shape: Shape):
    if len(node.outputs) > 1:
        raise ValueError(f"node {node.name!r} ({node.op}): the Indices output is not supported")
    kernel_hw = tuple(attr(node, "kernel_shape", ()))
    if len(kernel_hw) != 2 or len(shape) != 4:
        raise ValueError(f"node {node.name!r} ({node.op}): only 2-D pooling of NCHW tensors is supported")
    ceil_mode = bool(attr(node, "ceil_mode", 0))
    strides, dilations, pads, out_hw = window_geometry(node, shape[2:], kernel_hw, ceil_mode=ceil_mode)
    extra = _extra(shape[2:], pads, kernel_hw, strides, dilations, out_hw)
    return kernel_hw, strides, dilations, pads, out_hw, extra


@preparer("MaxPool")
def prepare_max_pool(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX MaxPool: the max over each window of the input padded with -inf (padding never wins).

    uint8 / int8 inputs (quantized codes inside an int8 chain: max commutes with the monotone
    dequantization) run ``kernels.max_pool2d``, which ignores the padding likewise.
    """
    shape, dtype = inputs[0]
    kernel_hw, strides, dilations, pads, out_hw, extra = _pool_setup(node, shape)
    out_shape = shape[:2] + out_hw
    ops = _product(out_shape) * _product(kernel_hw)
    if np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.int8)):
        options = {"strides": strides, "pads": pads, "dilations": dilations,
                   "ceil_mode": bool(attr(node, "ceil_mode", 0))}

        def run_codes(ins, outs):
            kernels.max_pool2d(ins[0], kernel_hw, out=outs[0], **options)

        return Kernel(run_codes, [(out_shape, dtype)], ops=ops, precision="int8", note="max_pool2d on codes")
    padded = _Padded(shape, pads, extra, -np.inf, dtype)

    def run(ins, outs):
        _reduce_taps(_taps(padded(ins[0]), kernel_hw, strides, dilations, out_hw), np.maximum, outs[0])

    return Kernel(run, [(out_shape, dtype)], ops=ops)


@preparer("AveragePool")
def prepare_average_pool(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX AveragePool: window sum of the zero-padded input / count, where count is the number of taps inside
    the input, or with ``count_include_pad`` inside the padded input (never the ceil_mode overhang)."""
    shape, dtype = inputs[0]
    kernel_hw, strides, dilations, pads, out_hw, extra = _pool_setup(node, shape)
    padded = _Padded(shape, pads, extra, 0.0, dtype)
    (top, left, bottom, right), (h, w) = pads, shape[2:]
    mask = np.zeros((top + h + bottom + extra[0], left + w + right + extra[1]))
    mask[:top + h + bottom, :left + w + right] = bool(attr(node, "count_include_pad", 0))
    mask[top:top + h, left:left + w] = 1
    counts = _window_view(mask[None, None], kernel_hw, strides, dilations, out_hw).sum(axis=(4, 5))
    if (counts == 0).any():
        raise ValueError(f"node {node.name!r} (AveragePool): a window lies wholly in the padding")
    inverse = (1.0 / counts).astype(dtype)

    def run(ins, outs):
        _reduce_taps(_taps(padded(ins[0]), kernel_hw, strides, dilations, out_hw), np.add, outs[0])
        np.multiply(outs[0], inverse, out=outs[0])

    out_shape = shape[:2] + out_hw
    return Kernel(run, [(out_shape, dtype)], ops=_product(out_shape) * _product(kernel_hw))


@preparer("GlobalAveragePool")
def prepare_global_average_pool(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Mean over the spatial axes, keeping them as size 1."""
    shape, dtype = inputs[0]
    axes = tuple(range(2, len(shape)))

    def run(ins, outs):
        np.mean(ins[0], axis=axes, keepdims=True, out=outs[0])

    return Kernel(run, [(shape[:2] + (1,) * len(axes), dtype)], ops=_product(shape))


# ---- layout --------------------------------------------------------------------------------------------------------

@preparer("Concat")
def prepare_concat(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Concat along ``axis``."""
    shapes = [s for s, _ in inputs]
    axis = int(attr(node, "axis", 1)) % len(shapes[0])
    if any(len(s) != len(shapes[0]) or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]
           for s in shapes):
        raise ValueError(f"node {node.name!r} (Concat): shapes {shapes} differ outside axis {axis}")
    shape = shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]

    def run(ins, outs):
        np.concatenate(ins, axis=axis, out=outs[0])

    return Kernel(run, [(shape, np.result_type(*(d for _, d in inputs)))], ops=_product(shape))


def _reshaped(node: Node, shape: Shape, target) -> Shape:
    """ONNX Reshape's target: 0 copies the input's dimension (allowzero=0), one -1 is inferred."""
    target = [shape[i] if t == 0 else int(t) for i, t in enumerate(target)]
    if target.count(-1) > 1:
        raise ValueError(f"node {node.name!r} (Reshape): more than one -1 in {target}")
    if -1 in target:
        known = _product([t for t in target if t != -1])
        if known == 0 or _product(shape) % known:
            raise ValueError(f"node {node.name!r} (Reshape): cannot reshape {shape} to {target}")
        target[target.index(-1)] = _product(shape) // known
    if _product(target) != _product(shape):
        raise ValueError(f"node {node.name!r} (Reshape): cannot reshape {shape} to {target}")
    return tuple(target)


@preparer("Reshape", "Flatten")
def prepare_reshape(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Reshape (target shape a parameter) and Flatten (``[prod(shape[:axis]), prod(shape[axis:])]``): a view."""
    shape, dtype = inputs[0]
    if node.op == "Reshape":
        out_shape = _reshaped(node, shape, param(node, graph, 1).reshape(-1).tolist())
    else:
        axis = int(attr(node, "axis", 1)) % (len(shape) + 1)
        out_shape = (_product(shape[:axis]), _product(shape[axis:]))
    return Kernel(lambda ins, outs: [ins[0].reshape(out_shape)], [(out_shape, dtype)], note="view")


@preparer("Transpose")
def prepare_transpose(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Transpose (``perm`` default: reversed axes), copied into the output buffer."""
    shape, dtype = inputs[0]
    perm = tuple(attr(node, "perm", range(len(shape) - 1, -1, -1)))
    if sorted(perm) != list(range(len(shape))):
        raise ValueError(f"node {node.name!r} (Transpose): perm {perm} is not a permutation of {len(shape)} axes")

    def run(ins, outs):
        np.copyto(outs[0], ins[0].transpose(perm))

    return Kernel(run, [(tuple(shape[p] for p in perm), dtype)], ops=_product(shape))
