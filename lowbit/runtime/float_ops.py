"""Preparers of the float ops (ONNX semantics), in NumPy: BLAS for the matrix products (float32 ones with a constant
2-D weight on ``kernels.linear_float32_plan``), ``out=`` ufuncs elsewhere.

Everything that depends only on parameters and shapes is done at prepare time:
convolution weights reshaped to matrices, Gemm's ``alpha`` / ``transB`` / ``beta``
folded into the operands, batch norm reduced to one scale and shift, padded
scratch buffers allocated with their borders filled once, constants cast to the
dtype of the tensor they meet. ``Kernel.ops`` counts 2 per multiply-add for Conv /
ConvTranspose / Gemm / MatMul and one per output element otherwise.

Convolutions and pools take any number of spatial axes, with window geometry (output
sizes, auto_pad, ceil_mode) from :mod:`lowbit.runtime.windows`. The few cases without a
fast path here (Erf / Gelu / LayerNormalization on other dtypes than float32, batch norm
statistics or a Reshape target computed at run time) are handed to the generic NumPy
evaluator of :mod:`lowbit.runtime.evaluators`; the kernel's note says why.

Conv and Gemm honour the lowbit attribute ``activation`` (``"relu"`` or
``"relu6"``) set by :func:`lowbit.runtime.passes.fuse_activations`, applied in
place after the bias.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np

import kernels
from kernels import activations, dispatch
from kernels.entry import Entry, In, Out, flat_rows
from lowbit.graph.ir import Graph, Node
from lowbit.runtime.registry import Kernel, Shape, preparer
from lowbit.runtime.windows import (Window, conv_transpose_window, conv_window, kernel_shape, window_geometry,
                                    window_view)

Spec = tuple[Shape, np.dtype]
F32 = np.dtype(np.float32)
ACTIVATIONS = ("relu", "relu6")
Elementwise = Callable[[np.ndarray, np.ndarray], Any]  # fn(x, y): y = f(x), written into y


def attr(node: Node, name: str, default: Any) -> Any:
    return node.attrs.get(name, default)


def _fail(node: Node, message: str, error: type[Exception] = ValueError) -> Exception:
    return error(f"node {node.name!r} ({node.op}): {message}")


def _given(node: Node, index: int) -> bool:
    """Whether optional input ``index`` is present."""
    return index < len(node.inputs) and bool(node.inputs[index])


def param(node: Node, graph: Graph, index: int, *, required: bool = True) -> np.ndarray | None:
    """The constant feeding input ``index`` of ``node`` (None when absent or computed, unless ``required``)."""
    name = node.inputs[index] if index < len(node.inputs) else ""
    if name in graph.params:
        return graph.params[name]
    if required:
        raise _fail(node, f"input {index} ({name!r}) must be a parameter")
    return None


def activation_of(node: Node) -> Callable[[np.ndarray], None]:
    """The in-place epilogue of attr ``activation``: relu ``max(y, 0)``, relu6 ``min(max(y, 0), 6)``, or nothing."""
    name = attr(node, "activation", None)
    if name is None:
        return lambda y: None
    if name not in ACTIVATIONS:
        raise _fail(node, f"activation must be one of {ACTIVATIONS}, got {name!r}")
    if name == "relu":
        return lambda y: np.maximum(y, 0, out=y)
    return lambda y: np.clip(y, 0, 6, out=y)


def _product(values) -> int:
    return int(np.prod(values, dtype=np.int64))


def _evaluated(node: Node, graph: Graph, inputs: list[Spec], why: str) -> Kernel:
    """The generic NumPy evaluator's kernel for a case without a fast path here (``why`` goes in its note)."""
    from lowbit.runtime.evaluators import prepare_evaluated  # imported here: evaluators import this module

    kernel = prepare_evaluated(node, graph, inputs)
    kernel.note = f"{why}: evaluator" + (f"; {kernel.note}" if kernel.note else "")
    return kernel


def _operands(node: Node, graph: Graph, inputs: list[Spec], indices: tuple[int, ...]
              ) -> tuple[np.dtype, dict[int, np.ndarray]]:
    """The one dtype ONNX requires of ``node``'s present inputs at ``indices``, and each constant among them cast
    to it (index -> array): constants take the computed inputs' dtype (a float64 scalar meeting float32
    activations becomes float32), while two computed inputs of different dtypes are a TypeError."""
    present = [i for i in indices if _given(node, i)]
    computed = {np.dtype(inputs[i][1]) for i in present if node.inputs[i] not in graph.params}
    if len(computed) > 1:
        raise _fail(node, f"inputs {present} must have one dtype, got {[str(inputs[i][1]) for i in present]}",
                    TypeError)
    dtype = computed.pop() if computed else np.dtype(inputs[present[0]][1])
    return dtype, {i: np.asarray(graph.params[node.inputs[i]], dtype, order="C") for i in present  # 0-d stays 0-d
                   if node.inputs[i] in graph.params}


def _bind(constants: dict[int, np.ndarray]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """``ins -> operands``: the inputs, each constant replaced by its prepared (cast) array."""
    if not constants:
        return lambda ins: ins

    def operands(ins: list[np.ndarray]) -> list[np.ndarray]:
        xs = list(ins)
        for i, value in constants.items():
            xs[i] = value
        return xs

    return operands


def _broadcast(node: Node, *shapes: Shape) -> Shape:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise _fail(node, f"shapes {[list(s) for s in shapes]} do not broadcast") from None


def _axis(node: Node, value: int, rank: int, name: str = "axis") -> int:
    """``value`` in ``[-rank, rank)`` as a non-negative axis."""
    if not -rank <= value < rank:
        raise _fail(node, f"{name} {value} is out of range for rank {rank}")
    return value % rank


# ---- channels-last activations (the NHWC regions of lowbit.runtime.layout) -------------------------------------------

def channels_last(node: Node, shape: Shape) -> bool:
    """Whether ``node`` has lowbit's attribute ``layout="NHWC"`` (``lowbit.runtime.layout``: its activations are
    ``[N, H, W, C]``, which needs a 4-D ``shape``) rather than ONNX's NCHW (absent, or ``"NCHW"``)."""
    layout = attr(node, "layout", "NCHW")
    if layout not in ("NCHW", "NHWC"):
        raise _fail(node, f"attribute layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if layout == "NHWC" and len(shape) != 4:
        raise _fail(node, f"layout NHWC needs a 4-D input [N, H, W, C], got shape {list(shape)}")
    return layout == "NHWC"


def nchw_shape(shape: Shape) -> Shape:
    """``[N, C, H, W]`` of an NHWC ``[N, H, W, C]`` shape."""
    return (shape[0], shape[3], shape[1], shape[2])


def nhwc_shape(shape: Shape) -> Shape:
    """``[N, H, W, C]`` of an NCHW ``[N, C, H, W]`` shape."""
    return (shape[0], shape[2], shape[3], shape[1])


def transposed_nhwc(kernel: Kernel) -> Kernel:
    """``kernel`` (and its fallback), of NCHW input 0 and output 0 (its only one), on NHWC arrays: transposed
    around each call by the kernels' block transposes, through a scratch NCHW output."""
    (shape, dtype), = kernel.outputs
    y = np.empty(shape, dtype)

    def run(ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        kernels.nchw_to_nhwc(kernel([kernels.nhwc_to_nchw(ins[0]), *ins[1:]], [y])[0], out=outs[0])

    return Kernel(run, [(nhwc_shape(shape), dtype)], kernel.ops, kernel.precision, f"{kernel.note}, NHWC transposed",
                  None if kernel.fallback is None else transposed_nhwc(kernel.fallback))


# ---- windows (Conv, ConvTranspose, MaxPool, AveragePool over any number of spatial axes) ---------------------------

def _spatial(slices, nhwc: bool = False) -> tuple:
    """An index of ``[N, C, *spatial]`` arrays (``[N, *spatial, C]`` when ``nhwc``) taking all of N and C and
    ``slices`` of the spatial axes."""
    return (slice(None), *slices, slice(None)) if nhwc else (slice(None), slice(None), *slices)


def _offsets(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every tap of a kernel, in row-major order."""
    return list(itertools.product(*(range(k) for k in kernel)))


class _Padded:
    """A scratch copy of ``[N, C, *spatial]`` ``x`` (``shape``; laid out ``[N, *spatial, C]`` when ``nhwc``) with
    fixed borders: ``pads`` (begins, ends) plus ``extra`` at the end of each axis (the ceil_mode overhang), filled
    with ``fill`` once."""

    def __init__(self, shape: Shape, pads: tuple[int, ...], extra: tuple[int, ...], fill: float, dtype: np.dtype,
                 nhwc: bool = False):
        k = len(shape) - 2
        self.trivial = not any(pads) and not any(extra)
        sizes = tuple(b + i + e + x for b, i, e, x in zip(pads[:k], shape[2:], pads[k:], extra))
        self.buffer = np.full((shape[0],) + sizes + (shape[1],) if nhwc else tuple(shape[:2]) + sizes, fill, dtype)
        self.interior = self.buffer[_spatial((slice(b, b + i) for b, i in zip(pads[:k], shape[2:])), nhwc)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.trivial:
            return x
        np.copyto(self.interior, x)
        return self.buffer


def _tap_indices(kernel: tuple[int, ...], window: Window, nhwc: bool = False) -> list[tuple]:
    """Per tap, the index of its strided ``[N, C, *out]`` (``[N, *out, C]`` when ``nhwc``) view of the padded
    input (basic slicing: no copy, and far cheaper per call than ``sliding_window_view``)."""
    return [_spatial((slice(t * d, t * d + (o - 1) * s + 1, s)
                      for t, d, o, s in zip(tap, window.dilations, window.out, window.strides)), nhwc)
            for tap in _offsets(kernel)]


def _reduce_taps(xp: np.ndarray, taps: list[tuple], ufunc: np.ufunc, out: np.ndarray) -> None:
    """``out = ufunc.reduce`` over the window taps of padded ``xp``, one whole tap at a time."""
    np.copyto(out, xp[taps[0]])
    for tap in taps[1:]:
        ufunc(out, xp[tap], out=out)


def _extra(in_shape: Shape, kernel: tuple[int, ...], window: Window) -> tuple[int, ...]:
    """Positions past the end padding that the last (ceil_mode) window reaches, per spatial axis."""
    k, p = len(kernel), window.pads
    return tuple(max(0, (o - 1) * s + d * (q - 1) + 1 - (i + p0 + p1))
                 for i, p0, p1, q, s, d, o in zip(in_shape, p[:k], p[k:], kernel, window.strides, window.dilations,
                                                  window.out))


# ---- Conv, ConvTranspose -------------------------------------------------------------------------------------------

def _conv_operands(node: Node, graph: Graph, inputs: list[Spec]) -> tuple[np.dtype, dict[int, np.ndarray]]:
    """The float dtype of a convolution's x, w, B and their constants cast to it."""
    dtype, constants = _operands(node, graph, inputs, (0, 1, 2))
    if dtype.kind != "f":
        raise _fail(node, f"inputs must be floats, got {dtype}", TypeError)
    return dtype, constants


def _prepared(constants: dict[int, np.ndarray], index: int, prepare: Callable[[np.ndarray], Any]
              ) -> Callable[[list[np.ndarray]], Any]:
    """``ins -> prepare(input index)``: computed once for a constant, at every call for a computed input."""
    if index in constants:
        ready = prepare(constants[index])
        return lambda ins: ready
    return lambda ins: prepare(ins[index])


def _conv_tiles(node: Node, x_shape: Shape, w_shape: Shape, group: int, window: Window, dtype: np.dtype,
                constants: dict[int, np.ndarray], nhwc: bool) -> Kernel | None:
    """A float32 1-D / 2-D convolution with constant weights and bias on ``kernels.conv2d_float32_plan`` (register
    tiles reading the padded image directly, bias and activation fused) where ``kernels.dispatch`` picks it; None
    elsewhere (then im2col + BLAS). A 1-D convolution runs as a 2-D one of height 1 (views, no copy). ``x_shape``
    is NCHW; with ``nhwc`` the plan reads and writes ``[N, H, W, C]`` (2-D only)."""
    k = len(w_shape) - 2
    if dtype != F32 or k not in (1, 2) or 1 not in constants or (_given(node, 2) and 2 not in constants):
        return None
    o, filter_length = w_shape[0], _product(w_shape[1:])
    if dispatch.choose("conv_float32", _product((x_shape[0],) + window.out), o, filter_length).kind != "avx512":
        return None
    lift = (lambda t: t) if k == 2 else (lambda t: t[:-1] + (1,) + t[-1:])  # [..., L] -> [..., 1, L]
    pads = window.pads if k == 2 else (0, window.pads[0], 0, window.pads[1])
    strides, dilations = (tuple(window.strides), tuple(window.dilations)) if k == 2 else (
        (1, window.strides[0]), (1, window.dilations[0]))
    x4 = nhwc_shape(x_shape) if nhwc else lift(tuple(x_shape))
    plan = kernels.conv2d_float32_plan(constants[1].reshape(lift(tuple(w_shape))), x4, constants.get(2),
                                       strides=strides, pads=pads, dilations=dilations, group=group,
                                       activation=attr(node, "activation", None), layout="NHWC" if nhwc else "NCHW")
    out_shape = tuple(x_shape[:1]) + (o,) + tuple(window.out)

    def run(ins, outs):
        plan(ins[0].reshape(x4), outs[0].reshape(plan.out_shape))

    return Kernel(run, [(nhwc_shape(out_shape) if nhwc else out_shape, F32)],
                  ops=2 * _product(out_shape) * filter_length, note=f"conv2d_float32 {plan.kind}{', NHWC' * nhwc}",
                  entry=plan.entry() if k == 2 else None)


@preparer("Conv")
def prepare_conv(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Conv over any number of spatial axes (2-D shown), NCHW::

        y[n, o, oy, ox] = B[o] + sum_{c, ky, kx} w[o, c, ky, kx] x_pad[n, g C_g + c, oy SH + ky DH, ox SW + kx DW]

    over the ``C_g = C / group`` channels of ``o``'s group ``g``. group 1: im2col (a window
    view of the zero-padded input, copied once into a ``[N, C KH KW, OH OW]`` scratch) and
    one batched matmul writing NCHW directly; 1x1 stride-1 unpadded convolutions skip the
    im2col. Depthwise (one input and one output channel per group): a sum over the taps of
    whole-tensor multiply-adds. Other groups: one matmul per group, batched. Constant
    weights are laid out once; computed ones at each call.

    With lowbit's attribute ``layout="NHWC"`` (:func:`channels_last`) x is ``[N, H, W, C]`` and y
    ``[N, OH, OW, O]`` (w stays ``[O, C / group, KH, KW]``): the register tiles run in that layout;
    the other paths transpose around themselves.
    """
    # quant_ops' float fallbacks give only x's spec: the others are those of their parameters
    inputs = list(inputs) + [(p.shape, p.dtype) for p in map(graph.params.get, node.inputs[len(inputs):])
                             if p is not None]
    (x_shape, _), (w_shape, _) = inputs[:2]
    nhwc = channels_last(node, x_shape)
    x_shape = nchw_shape(x_shape) if nhwc else tuple(x_shape)
    group, window = conv_window(node, x_shape, w_shape)
    dtype, constants = _conv_operands(node, graph, inputs)
    tiles = _conv_tiles(node, x_shape, w_shape, group, window, dtype, constants, nhwc)
    if tiles is not None:
        return tiles
    kernel = _conv_numpy(node, x_shape, w_shape, group, window, dtype, constants)
    return transposed_nhwc(kernel) if nhwc else kernel


def _conv_numpy(node: Node, x_shape: Shape, w_shape: Shape, group: int, window: Window, dtype: np.dtype,
                constants: dict[int, np.ndarray]) -> Kernel:
    """:func:`prepare_conv` in NumPy on NCHW: im2col + BLAS, depthwise taps, or grouped BLAS."""
    n, c, spatial = x_shape[0], x_shape[1], tuple(x_shape[2:])
    o, cg, kernel = w_shape[0], w_shape[1], tuple(w_shape[2:])
    k, taps, out, og = len(kernel), _product(kernel), window.out, o // group
    padded = _Padded(x_shape, window.pads, (0,) * k, 0.0, dtype)
    act = activation_of(node)
    bias = _prepared(constants, 2, lambda b: b.reshape((1, o) + (1,) * k)) if _given(node, 2) else None
    pointwise = taps == 1 and set(window.strides) == {1} and not any(window.pads)
    offsets = _offsets(kernel)

    def windows(x):
        return window_view(padded(x), kernel, window)

    if group == 1:
        weights = _prepared(constants, 1, lambda w: np.ascontiguousarray(w.reshape(o, cg * taps)))
        cols = None if pointwise else np.empty((n, c) + kernel + out, dtype)
        to_cols = (0, 1) + tuple(range(2 + k, 2 + 2 * k)) + tuple(range(2, 2 + k))  # [N, C, *kernel, *out]

        def body(x, w, y):
            if pointwise:
                lhs = x.reshape(n, c, _product(spatial))
            else:
                np.copyto(cols, windows(x).transpose(to_cols))
                lhs = cols.reshape(n, c * taps, _product(out))
            np.matmul(w, lhs, out=y.reshape(n, o, _product(out)))
    elif cg == 1 and og == 1:
        weights = _prepared(constants, 1, lambda w: [np.ascontiguousarray(w[(slice(None), 0) + tap])
                                                     .reshape((1, o) + (1,) * k) for tap in offsets])
        scratch = np.empty((n, o) + out, dtype)

        def body(x, w, y):
            view = windows(x)
            for t, (tap, weight) in enumerate(zip(offsets, w)):
                np.multiply(view[(Ellipsis, *tap)], weight, out=y if t == 0 else scratch)
                if t:
                    np.add(y, scratch, out=y)
    else:
        weights = _prepared(constants, 1, lambda w: np.ascontiguousarray(w.reshape(group, og, cg * taps)))
        cols = np.empty((n, group, cg) + kernel + out, dtype)
        to_cols = (0, 1, 2) + tuple(range(3 + k, 3 + 2 * k)) + tuple(range(3, 3 + k))

        def body(x, w, y):
            view = windows(x).reshape((n, group, cg) + out + kernel)
            np.copyto(cols, view.transpose(to_cols))
            np.matmul(w, cols.reshape(n, group, cg * taps, _product(out)), out=y.reshape(n, group, og, _product(out)))

    def run(ins, outs):
        y = outs[0]
        body(ins[0], weights(ins), y)
        if bias is not None:
            np.add(y, bias(ins), out=y)
        act(y)

    return Kernel(run, [((n, o) + out, dtype)], ops=2 * n * o * _product(out) * cg * taps,
                  note="im2col + BLAS" if group == 1 else ("depthwise taps" if cg == og == 1 else "grouped BLAS"))


def _tap_range(size: int, stride: int, dilation: int, crop: int, out: int, tap: int) -> tuple[slice, slice] | None:
    """Which inputs ``t`` a ConvTranspose tap moves to which outputs ``t stride + tap dilation - crop`` inside
    ``[0, out)``: ``(input slice, output slice)``, or None when none lands inside."""
    shift = tap * dilation - crop
    first, last = max(0, -(shift // stride)), min(size - 1, (out - 1 - shift) // stride)
    if first > last:
        return None
    start = first * stride + shift
    return slice(first, last + 1), slice(start, start + (last - first) * stride + 1, stride)


@preparer("ConvTranspose")
def prepare_conv_transpose(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX ConvTranspose over any number of spatial axes (2-D shown), NCHW, weights ``[C, O / group, KH, KW]``::

        y[n, g O_g + o, iy SH + ky DH - PT, ix SW + kx DW - PL] += x[n, g C_g + c, iy, ix] w[g C_g + c, o, ky, kx]

    plus ``B[o]`` everywhere (output positions no tap reaches, as output_padding adds, hold the
    bias alone). col2im: one batched matmul ``[O_g KH KW, C_g] @ [C_g, H W]`` per group, then each
    tap's ``[N, O, H, W]`` plane scatter-added to its strided place in the output (cropped by the pads).
    """
    (x_shape, _), (w_shape, _) = inputs[:2]
    group, window = conv_transpose_window(node, x_shape, w_shape)
    dtype, constants = _conv_operands(node, graph, inputs)
    n, c, spatial = x_shape[0], x_shape[1], tuple(x_shape[2:])
    og, kernel, k, cg = w_shape[1], tuple(w_shape[2:]), len(spatial), c // group
    taps = _product(kernel)
    weights = _prepared(constants, 1, lambda w: np.ascontiguousarray(w.reshape(group, cg, og * taps)
                                                                     .transpose(0, 2, 1)))
    cols = np.empty((n, group, og * taps, _product(spatial)), dtype)
    planes = cols.reshape((n, group, og) + kernel + spatial)
    scatter = []
    for tap in _offsets(kernel):
        ranges = [_tap_range(i, s, d, p, o, t) for i, s, d, p, o, t in
                  zip(spatial, window.strides, window.dilations, window.pads[:k], window.out, tap)]
        if all(ranges):
            scatter.append((planes[(slice(None),) * 3 + tap + tuple(r[0] for r in ranges)],
                            (slice(None),) * 3 + tuple(r[1] for r in ranges)))
    bias = _prepared(constants, 2, lambda b: b.reshape((1, group, og) + (1,) * k)) if _given(node, 2) else None
    y_shape = (n, og * group) + window.out

    def run(ins, outs):
        np.matmul(weights(ins), ins[0].reshape(n, group, cg, _product(spatial)), out=cols)
        y = outs[0].reshape((n, group, og) + window.out)
        if bias is None:
            y.fill(0)
        else:
            np.copyto(y, bias(ins))
        for plane, target in scatter:
            view = y[target]
            np.add(view, plane, out=view)

    return Kernel(run, [(y_shape, dtype)], ops=2 * n * c * _product(spatial) * og * taps, note="BLAS + col2im")


# ---- matrix products -----------------------------------------------------------------------------------------------

@preparer("Gemm")
def prepare_gemm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Gemm: ``Y = alpha A' B' + beta C`` (``A' = A.T`` if transA, ``B' = B.T`` if transB, C broadcast).

    A constant B is stored once as ``alpha B'`` (contiguous ``[K, N]``) and a constant C as ``beta C``.
    """
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    a_shape, b_shape = inputs[0][0], inputs[1][0]
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise _fail(node, f"A and B must be 2-D, got {list(a_shape)} and {list(b_shape)}")
    m, k = a_shape[::-1] if trans_a else a_shape
    kb, cols = b_shape[::-1] if trans_b else b_shape
    if k != kb:
        raise _fail(node, f"A {list(a_shape)} (transA={trans_a}) and B {list(b_shape)} (transB={trans_b}) "
                          "do not multiply")
    has_c = _given(node, 2) and beta != 0.0
    dtype, constants = _operands(node, graph, inputs, (0, 1, 2))
    operands, b_const, c_const = _bind(constants), constants.get(1), constants.get(2)
    if has_c and _broadcast(node, inputs[2][0], (m, cols)) != (m, cols):
        raise _fail(node, f"C {list(inputs[2][0])} does not broadcast to the output [{m}, {cols}]")
    w = None if b_const is None else np.ascontiguousarray((b_const.T if trans_b else b_const) * dtype.type(alpha))
    c = None if c_const is None or not has_c else c_const * dtype.type(beta)
    act = activation_of(node)

    def run(ins, outs):
        y, xs = outs[0], operands(ins)
        a = xs[0].T if trans_a else xs[0]
        if w is not None:
            np.matmul(a, w, out=y)
        else:
            np.matmul(a, xs[1].T if trans_b else xs[1], out=y)
            if alpha != 1.0:
                np.multiply(y, dtype.type(alpha), out=y)
        if c is not None:
            np.add(y, c, out=y)
        elif has_c:
            np.add(y, xs[2] if beta == 1.0 else dtype.type(beta) * xs[2], out=y)
        act(y)

    return Kernel(run, [((m, cols), dtype)], ops=2 * m * k * cols, note="BLAS")


def _matmul_shape(node: Node, a: Shape, b: Shape) -> Shape:
    """numpy.matmul's result shape (1-D operands promoted then squeezed)."""
    a2, b2 = (1,) + a if len(a) == 1 else a, b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise _fail(node, f"shapes {list(a)} and {list(b)} do not multiply")
    try:
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    except ValueError:
        raise _fail(node, f"batch dimensions of {list(a)} and {list(b)} do not broadcast") from None
    return tuple(batch) + a2[-2:-1] * (len(a) > 1) + b2[-1:] * (len(b) > 1)


def _matmul_kernel(node: Node, inputs: list[Spec], dtype: np.dtype, constants: dict[int, np.ndarray],
                   perms: tuple[tuple[int, ...] | None, tuple[int, ...] | None], alpha: float) -> Kernel:
    """``alpha op(A) @ op(B)``, ``op`` the axis permutation ``perms[i]`` (None: none). A constant B is stored
    permuted, scaled by alpha and contiguous once; when it is 2-D, all rows of A multiply it in one BLAS call."""
    shapes = [tuple(inputs[i][0][p] for p in perm) if perm else tuple(inputs[i][0]) for i, perm in enumerate(perms)]
    shape = _matmul_shape(node, *shapes)
    ops = 2 * _product(shape) * shapes[0][-1]
    w = constants.get(1)
    if w is not None:
        w = np.ascontiguousarray((w.transpose(perms[1]) if perms[1] else w) * dtype.type(alpha))
        perms, alpha = (perms[0], None), 1.0
    if w is not None and w.ndim == 2 and len(shapes[0]) >= 2 and not perms[0] and 0 not in constants:
        rows, k = _product(shapes[0][:-1]), shapes[0][-1]
        if dtype == F32 and min(w.shape) > 0:
            plan = kernels.linear_float32_plan(w)

            def run_plan(ins, outs):
                plan(ins[0], out=outs[0])

            return Kernel(run_plan, [(shape, dtype)], ops=ops, note="kernels.linear_float32", entry=plan.entry())

        def run_rows(ins, outs):
            np.matmul(ins[0].reshape(rows, k), w, out=outs[0].reshape(rows, w.shape[1]))

        return Kernel(run_rows, [(shape, dtype)], ops=ops, note="BLAS, rows of A at once")
    operands = _bind({**constants, 1: w} if w is not None else constants)

    def run(ins, outs):
        a, b = operands(ins)
        np.matmul(a.transpose(perms[0]) if perms[0] else a, b.transpose(perms[1]) if perms[1] else b, out=outs[0])
        if alpha != 1.0:
            np.multiply(outs[0], dtype.type(alpha), out=outs[0])

    return Kernel(run, [(shape, dtype)], ops=ops, note="BLAS")


@preparer("MatMul")
def prepare_matmul(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX MatMul (numpy.matmul: 1-D operands promoted then squeezed, batch dimensions broadcast both ways)."""
    dtype, constants = _operands(node, graph, inputs, (0, 1))
    return _matmul_kernel(node, inputs, dtype, constants, (None, None), 1.0)


def _fused_perm(node: Node, rank: int, trans: int, trans_batch: int, name: str) -> tuple[int, ...] | None:
    """FusedMatMul's operand permutation: transBatch moves axis 0 to just before the last, [d1 .. d_{r-2}, d0,
    d_{r-1}]; trans then swaps the last two axes."""
    if (trans and rank < 2) or (trans_batch and rank < 3):
        raise _fail(node, f"{name} of rank {rank} cannot be transposed (trans {trans}, transBatch {trans_batch})")
    if not trans and not trans_batch:
        return None
    perm = list(range(1, rank - 1)) + [0, rank - 1] if trans_batch else list(range(rank))
    if trans:
        perm[-2:] = perm[:-3:-1]
    return tuple(perm)


@preparer("com.microsoft.FusedMatMul")
def prepare_fused_matmul(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Runtime FusedMatMul: ``Y = alpha op(A) @ op(B)`` (MatMul semantics after the permutations:
    transA / transB swap the last two axes, transBatchA / transBatchB move axis 0 to just before the last)."""
    dtype, constants = _operands(node, graph, inputs, (0, 1))
    perms = tuple(_fused_perm(node, len(inputs[i][0]), int(attr(node, f"trans{s}", 0)),
                              int(attr(node, f"transBatch{s}", 0)), s) for i, s in enumerate("AB"))
    return _matmul_kernel(node, inputs, dtype, constants, perms, float(attr(node, "alpha", 1.0)))


# ---- normalization -------------------------------------------------------------------------------------------------

@preparer("BatchNormalization")
def prepare_batch_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Inference batch norm over axis 1 of ``[N, C, ...]``: ``y = x s + t``, ``s = scale / sqrt(var + eps)``,
    ``t = bias - mean s``. Computed statistics go to the evaluator; ``training_mode=1``: see
    :func:`_batch_norm_training`. With attribute ``layout="NHWC"`` (:func:`channels_last`) x and y are
    ``[N, H, W, C]``: the channels are the last axis (inference with constant statistics only)."""
    shape, dtype = inputs[0]
    if len(shape) < 2:
        raise _fail(node, f"input must have rank >= 2, got shape {list(shape)}")
    nhwc = channels_last(node, shape)
    training = int(attr(node, "training_mode", 0))
    if nhwc and (training or len(node.outputs) > 1):
        raise _fail(node, "layout NHWC is for inference: training_mode=1 and the statistics outputs are refused")
    if training or len(node.outputs) > 1:
        if not training or graph.opset_of(node.op) < 14 or len(node.outputs) > 3:
            raise _fail(node, f"{len(node.outputs)} outputs with training_mode {training}: "
                              "the running statistics outputs need training_mode=1 (opset >= 14)")
        return _batch_norm_training(node, graph, inputs)
    stats = [param(node, graph, i, required=nhwc) for i in range(1, 5)]
    if any(s is None for s in stats):
        return _evaluated(node, graph, inputs, "statistics computed at run time")
    channels = shape[3] if nhwc else shape[1]
    if any(s.size != channels for s in stats):
        raise _fail(node, f"scale, bias, mean and var must have {channels} values (channels), got shapes "
                          f"{[list(s.shape) for s in stats]}")
    scale, bias, mean, var = (s.astype(np.float64).reshape(-1) for s in stats)
    s = scale / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    lead = (-1,) if nhwc else (1, -1) + (1,) * (len(shape) - 2)  # broadcast along the channel axis
    s32, t32 = s.astype(dtype).reshape(lead), (bias - mean * s).astype(dtype).reshape(lead)

    def run(ins, outs):
        np.multiply(ins[0], s32, out=outs[0])
        np.add(outs[0], t32, out=outs[0])

    return Kernel(run, [(shape, dtype)], ops=2 * _product(shape))


def _batch_norm_training(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """BatchNormalization with ``training_mode=1``: x normalized by the batch's own mean ``m`` and (population)
    variance ``v`` over all axes but 1, ``y = (x - m) / sqrt(v + eps) scale + bias``; optional outputs the running
    statistics ``momentum mean + (1 - momentum) m`` and ``momentum var + (1 - momentum) v`` (momentum 0.9)."""
    shape, dtype = inputs[0]
    axes, lead = (0,) + tuple(range(2, len(shape))), (1, -1) + (1,) * (len(shape) - 2)
    momentum, eps = float(attr(node, "momentum", 0.9)), float(attr(node, "epsilon", 1e-5))
    operands = _bind(_operands(node, graph, inputs, (0, 1, 2, 3, 4))[1])

    def run(ins, outs):
        x, scale, bias, mean, var = operands(ins)
        batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
        y = outs[0]
        np.subtract(x, batch_mean.reshape(lead), out=y)
        np.multiply(y, (scale / np.sqrt(batch_var + eps)).reshape(lead), out=y)
        np.add(y, bias.reshape(lead), out=y)
        for out, running, batch in zip(outs[1:], (mean, var), (batch_mean, batch_var)):
            np.add(momentum * running, (1 - momentum) * batch, out=out)

    return Kernel(run, [(shape, dtype)] + [((shape[1],), dtype)] * (len(node.outputs) - 1), ops=6 * _product(shape),
                  note="training mode")


def _normalizer(rows: int, d: int, eps: float, centred: bool) -> Callable:
    """``fn(x, y, mean, inv)`` over ``[rows, d]`` float32 ``x``: per row ``mean`` (when ``centred``) and
    ``inv = 1 / sqrt(mean((x - mean)^2) + eps)`` into ``[rows]`` vectors, and ``y = (x - mean) inv``.

    The mean is a BLAS matrix-vector product and the sum of squares one einsum pass (both several times
    faster than ``ndarray.sum`` over rows); the mean is subtracted before squaring, so a mean far larger than
    the spread loses nothing (``E[x^2] - E[x]^2`` would).
    """
    averaging = np.full(d, 1.0 / d, np.float32)

    def normalize(x, y, mean, inv):
        if centred:
            np.matmul(x, averaging, out=mean)
            np.subtract(x, mean[:, None], out=y)
            x = y
        np.einsum("ij,ij->i", x, x, out=inv)
        np.multiply(inv, 1.0 / d, out=inv)
        np.add(inv, eps, out=inv)
        np.sqrt(inv, out=inv)
        np.divide(1.0, inv, out=inv)
        np.multiply(x, inv[:, None], out=y)

    return normalize


def _normalization(node: Node, graph: Graph, inputs: list[Spec], axis: int, *, centred: bool, eps: float,
                   scale: int, bias: int | None, skip: tuple[int, int] | None, layout: tuple[str, ...]) -> Kernel:
    """The LayerNormalization family in float32: ``h = x (+ skip + skip bias)``, normalized over axes ``axis..``
    (:func:`_normalizer`), then ``y = h_norm * scale (+ bias)``. ``layout`` names the node's outputs in order:
    ``"y"``, ``"mean"``, ``"inv"`` (``[*shape[:axis], 1, ...]`` float32) and ``"sum"`` (``h``). Other dtypes go to
    the evaluator."""
    shape = tuple(inputs[0][0])
    indices = (0, scale) + ((bias,) if bias is not None else ()) + (skip or ())
    dtype, constants = _operands(node, graph, inputs, indices)
    if dtype != F32:
        return _evaluated(node, graph, inputs, f"{dtype} inputs")
    for i in indices[1:]:
        if _given(node, i) and _broadcast(node, inputs[i][0], shape) != shape:
            raise _fail(node, f"input {i} of shape {list(inputs[i][0])} does not broadcast to X {list(shape)}")
    if len(node.outputs) > len(layout):
        raise _fail(node, f"expected at most {len(layout)} outputs ({', '.join(layout)}), got {len(node.outputs)}")
    position = {kind: i for i, kind in enumerate(layout[:len(node.outputs)])}
    if not centred and "mean" in position and node.outputs[position["mean"]]:
        raise _fail(node, "output mean is not defined for a root-mean-square normalization")
    rows, d = _product(shape[:axis]), _product(shape[axis:])
    stats = shape[:axis] + (1,) * (len(shape) - axis)
    specs = {"y": (shape, F32), "mean": (stats, F32), "inv": (stats, F32), "sum": (shape, F32)}
    names = layout[:len(node.outputs)]
    last = axis == len(shape) - 1
    vectors = _last_axis_vectors(node, constants, d, (scale, bias, skip and skip[1])) if last else None
    if vectors is not None and vectors[0] is not None and (skip is None or tuple(inputs[skip[0]][0]) == shape):
        gamma, beta, skip_bias = vectors
        plan = kernels.layer_norm_plan(shape, gamma, beta, epsilon=eps, skip=skip is not None, bias=skip_bias,
                                       rms=not centred)
        entry = plan.entry(names)

        def run_kernel(ins, outs):
            entry([np.ascontiguousarray(x) if x is not None else x for x in ins], outs)

        return Kernel(run_kernel, [specs[kind] for kind in names], ops=8 * _product(shape),
                      note="kernels.layer_norm", entry=entry)
    scratch = {kind: np.empty(specs[kind][0], F32) for kind in ("mean", "inv", "sum") if kind not in position}
    normalize, operands = _normalizer(rows, d, eps, centred), _bind(constants)
    present_bias = bias is not None and _given(node, bias)
    skip_bias = skip is not None and _given(node, skip[1])

    def run(ins, outs):
        xs = operands(ins)
        buffers = {kind: outs[i] for kind, i in position.items()}
        buffers.update(scratch)
        x, y = xs[0], buffers["y"]
        if skip is not None:
            x = buffers["sum"]
            np.add(xs[0], xs[skip[0]], out=x)
            if skip_bias:
                np.add(x, xs[skip[1]], out=x)
        normalize(x.reshape(rows, d), y.reshape(rows, d), buffers["mean"].reshape(rows), buffers["inv"].reshape(rows))
        np.multiply(y, xs[scale], out=y)
        if present_bias:
            np.add(y, xs[bias], out=y)

    return Kernel(run, [specs[kind] for kind in layout[:len(node.outputs)]], ops=8 * _product(shape))


def _last_axis_vectors(node: Node, constants: dict[int, np.ndarray], d: int, indices: tuple) -> tuple | None:
    """The constant inputs at ``indices`` as ``[d]`` float32 vectors (None for an absent optional input or index),
    when each is a constant broadcasting along the last axis only; else None."""
    vectors = []
    for i in indices:
        if i is None or not _given(node, i):
            vectors.append(None)
            continue
        value = constants.get(i)
        if value is None or value.size != d or any(s != 1 for s in value.shape[:-1]):
            return None
        vectors.append(np.ascontiguousarray(value.reshape(d), np.float32))
    return tuple(vectors)


@preparer("LayerNormalization")
def prepare_layer_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX LayerNormalization over axes ``axis..rank-1`` (default -1)::

        y = (x - mean) / sqrt(var + epsilon) * scale + bias,   outputs Y, Mean, InvStdDev = 1 / sqrt(var + eps)

    computed in float32 (stash_type 1); other dtypes and stash types go to the evaluator."""
    axis = _axis(node, int(attr(node, "axis", -1)), len(inputs[0][0]))
    if int(attr(node, "stash_type", 1)) != 1:
        return _evaluated(node, graph, inputs, f"stash_type {attr(node, 'stash_type', 1)}")
    return _normalization(node, graph, inputs, axis, centred=True, eps=float(attr(node, "epsilon", 1e-5)), scale=1,
                          bias=2, skip=None, layout=("y", "mean", "inv"))


@preparer("SimplifiedLayerNormalization", "com.microsoft.SimplifiedLayerNormalization")
def prepare_simplified_layer_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Runtime SimplifiedLayerNormalization (RMSNorm) over axes ``axis..rank-1`` (default -1)::

        y = x / sqrt(mean(x^2) + epsilon) * scale,   outputs Y, inv_std_var = 1 / sqrt(mean(x^2) + epsilon)"""
    axis = _axis(node, int(attr(node, "axis", -1)), len(inputs[0][0]))
    return _normalization(node, graph, inputs, axis, centred=False, eps=float(attr(node, "epsilon", 1e-5)), scale=1,
                          bias=None, skip=None, layout=("y", "inv"))


@preparer("com.microsoft.SkipLayerNormalization")
def prepare_skip_layer_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Runtime SkipLayerNormalization over the last axis (inputs: input, skip, gamma, beta?, bias?)::

        h = input + skip (+ bias),   y = (h - mean) / sqrt(var + epsilon) * gamma (+ beta)

    outputs: y, mean, inv_std_var, input_skip_bias_sum ``h``; epsilon default 1e-12."""
    return _normalization(node, graph, inputs, len(inputs[0][0]) - 1, centred=True,
                          eps=float(attr(node, "epsilon", 1e-12)), scale=2, bias=3, skip=(1, 4),
                          layout=("y", "mean", "inv", "sum"))


@preparer("com.microsoft.SkipSimplifiedLayerNormalization")
def prepare_skip_simplified_layer_norm(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Runtime SkipSimplifiedLayerNormalization (RMSNorm) over the last axis (inputs: input, skip, gamma,
    bias?)::

        h = input + skip (+ bias),   y = h / sqrt(mean(h^2) + epsilon) * gamma

    outputs: y, (mean: not defined, refused), inv_std_var, input_skip_bias_sum ``h``; epsilon default 1e-12."""
    return _normalization(node, graph, inputs, len(inputs[0][0]) - 1, centred=False,
                          eps=float(attr(node, "epsilon", 1e-12)), scale=2, bias=None, skip=(1, 3),
                          layout=("y", "mean", "inv", "sum"))


# ---- elementwise ---------------------------------------------------------------------------------------------------

def _compiled(entry: Entry, outputs: list[Spec], ops: int) -> Kernel:
    """A kernel that is ``entry`` (a :mod:`kernels.activations` call of one output), from Python too: the one code
    path, its In / Out arguments filled straight in (``Entry.__call__`` resolves every argument, microseconds
    per call); an input that is not C-contiguous (the loops read it flat) is copied first."""
    fn, args = entry.fn, entry.args
    inputs = tuple((i, a.index) for i, a in enumerate(args) if isinstance(a, In))
    (output,) = (i for i, a in enumerate(args) if isinstance(a, Out))

    def run(ins, outs):
        call = list(args)
        for i, k in inputs:
            x = ins[k]
            call[i] = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        call[output] = outs[0]
        fn(*call)

    return Kernel(run, outputs, ops=ops, note="kernels.activations", entry=entry)


def _sigmoid(x, y):
    """``1 / (1 + e^-x) = (1 + tanh(x / 2)) / 2``, which never overflows (works in place)."""
    np.multiply(x, 0.5, out=y)
    np.tanh(y, out=y)
    np.add(y, 1.0, out=y)
    np.multiply(y, 0.5, out=y)


def _leaky_relu(node: Node) -> Elementwise:
    """LeakyRelu: ``x`` if ``x >= 0`` else ``alpha x`` (alpha default 0.01) = ``max(x, alpha x)`` for
    ``alpha <= 1`` (negative alphas too), ``min(x, alpha x)`` for ``alpha > 1``."""
    alpha = float(attr(node, "alpha", 0.01))
    pick = np.maximum if alpha <= 1 else np.minimum

    def leaky_relu(x, y):
        np.multiply(x, alpha, out=y)
        pick(x, y, out=y)
    return leaky_relu


def _hard_sigmoid(node: Node) -> Elementwise:
    """HardSigmoid: ``max(0, min(1, alpha x + beta))`` (alpha 0.2, beta 0.5 by default)."""
    alpha, beta = float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))

    def hard_sigmoid(x, y):
        np.multiply(x, alpha, out=y)
        np.add(y, beta, out=y)
        np.maximum(y, 0.0, out=y)
        np.minimum(y, 1.0, out=y)
    return hard_sigmoid


def _hard_swish(node: Node) -> Elementwise:
    """HardSwish: ``x max(0, min(1, x / 6 + 1 / 2))``."""
    def hard_swish(x, y):
        np.multiply(x, 1 / 6, out=y)
        np.add(y, 0.5, out=y)
        np.maximum(y, 0.0, out=y)
        np.minimum(y, 1.0, out=y)
        np.multiply(y, x, out=y)
    return hard_swish


def _ufunc(ufunc: np.ufunc, *args) -> Callable[[Node], Elementwise]:
    """An op that is one NumPy ufunc: ``ufunc(x, *args)``."""
    return lambda node: lambda x, y: ufunc(x, *args, out=y)


def _gelu_kernel(node: Node) -> tuple[str, dict]:
    """Gelu: ``0.5 x (1 + erf(x / sqrt 2))``, or with ``approximate="tanh"``
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``."""
    approximate = attr(node, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _fail(node, f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return ("gelu_tanh" if approximate == "tanh" else "gelu"), {}


def _fixed(name: str, **params: float) -> Callable[[Node], tuple[str, dict]]:
    return lambda node: (name, params)


#: op -> factory(node) of its float32 kernel, ``(name in kernels.activations.UNARY, its parameters)``; the
#: formulas are in kernels.activations. ONNX Runtime's Gelu and BiasGelu are the erf form, FastGelu the tanh form.
KERNELS: dict[str, Callable[[Node], tuple[str, dict]]] = {
    "Relu": _fixed("clip", lo=0.0, hi=np.inf), "Tanh": _fixed("tanh"), "Exp": _fixed("exp"), "Sqrt": _fixed("sqrt"),
    "Neg": _fixed("neg"), "Abs": _fixed("abs"), "Reciprocal": _fixed("reciprocal"), "Sigmoid": _fixed("sigmoid"),
    "LeakyRelu": lambda node: ("leaky_relu", {"alpha": float(attr(node, "alpha", 0.01))}),
    "HardSigmoid": lambda node: ("hard_sigmoid", {"alpha": float(attr(node, "alpha", 0.2)),
                                                  "beta": float(attr(node, "beta", 0.5))}),
    "HardSwish": _fixed("hard_swish"), "Erf": _fixed("erf"), "Gelu": _gelu_kernel,
    "com.microsoft.Gelu": _fixed("gelu"), "com.microsoft.BiasGelu": _fixed("gelu"),
    "com.microsoft.FastGelu": _fixed("gelu_tanh"),
    "com.microsoft.QuickGelu": lambda node: ("quick_gelu", {"alpha": float(attr(node, "alpha", 1.702))}),
}
#: op -> factory(node) of its NumPy elementwise function, for the dtypes other than float32 (and Log)
UNARY: dict[str, Callable[[Node], Elementwise]] = {
    "Relu": _ufunc(np.maximum, 0), "Tanh": _ufunc(np.tanh), "Exp": _ufunc(np.exp), "Log": _ufunc(np.log),
    "Sqrt": _ufunc(np.sqrt), "Neg": _ufunc(np.negative), "Abs": _ufunc(np.absolute),
    "Reciprocal": _ufunc(np.reciprocal), "Sigmoid": lambda node: _sigmoid, "LeakyRelu": _leaky_relu,
    "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish,
}
#: ops that approximate, float32 only (other dtypes go to the evaluator); ``BIASED`` ones add their optional
#: input 1 (a bias) to x first
FLOAT32_ONLY = ("Erf", "Gelu", "com.microsoft.Gelu", "com.microsoft.BiasGelu", "com.microsoft.FastGelu",
                "com.microsoft.QuickGelu")
BIASED = ("com.microsoft.BiasGelu", "com.microsoft.FastGelu")


@preparer(*UNARY, *FLOAT32_ONLY)
def prepare_unary(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """The elementwise ops of :data:`KERNELS` / :data:`UNARY`. Float32 runs the compiled loops of
    :mod:`kernels.activations` (one call, an entry: :func:`_compiled`); other dtypes ``out=`` ufuncs into the
    output, Relu ``max(x, 0)``, Tanh, Exp, Log, Sqrt, Neg, Abs, Reciprocal ``1 / x`` one ufunc each, Sigmoid
    ``(1 + tanh(x / 2)) / 2``, LeakyRelu, HardSigmoid, HardSwish as their factories say (Log has no kernel).
    ONNX Runtime's BiasGelu (erf form) and FastGelu (tanh form) add their bias (input 1; optional for FastGelu)
    to x first. Elementwise, they compute alike in any layout: attribute ``layout="NHWC"`` (:func:`channels_last`)
    only says that the 4-D x and y are ``[N, H, W, C]``; a bias (BiasGelu, FastGelu) is refused there, as its
    broadcast would depend on the layout."""
    shape, dtype = inputs[0]
    if channels_last(node, shape) and node.op in BIASED:
        raise _fail(node, "layout NHWC has no bias input (its broadcast would change meaning)")
    if node.op in FLOAT32_ONLY and np.dtype(dtype) != F32:
        return _evaluated(node, graph, inputs, f"{np.dtype(dtype)} input")
    ops, outputs = _product(shape), [(shape, dtype)]
    if np.dtype(dtype) != F32 or node.op not in KERNELS:
        fn = UNARY[node.op](node)

        def run(ins, outs):
            fn(ins[0], outs[0])

        return Kernel(run, outputs, ops=ops)
    name, params = KERNELS[node.op](node)
    entry = activations.unary_entry(name, **params).split(flat_rows(ops), 0, 1)
    if node.op not in BIASED or not _given(node, 1):

        def run_unary(ins, outs):  # alone: split over the kernels' threads; in a compiled chain: the entry
            activations.unary_split(entry, np.ascontiguousarray(ins[0]), outs[0])

        return Kernel(run_unary, outputs, ops=ops, note="kernels.activations", entry=entry)
    if _broadcast(node, shape, inputs[1][0]) != tuple(shape):
        raise _fail(node, f"bias {list(inputs[1][0])} does not broadcast to the input {list(shape)}")
    _, constants = _operands(node, graph, inputs, (0, 1))
    operands = _bind(constants)
    if name == "gelu" and tuple(inputs[1][0]) == tuple(shape[-1:]):  # one bias per channel: added in the kernel

        def run_bias_gelu(ins, outs):
            x, bias = operands(ins)
            activations.bias_gelu_split(np.ascontiguousarray(x), np.ascontiguousarray(bias, F32), outs[0])

        bias = constants.get(1)  # a constant bias: an entry split by rows, chained like the other activations
        chained = (Entry(activations.bias_gelu, (In(0), bias, Out(0))).split(ops // bias.size, 0, 2)
                   if bias is not None and ops > 0 else None)
        return Kernel(run_bias_gelu, outputs, ops=2 * ops, note="kernels.activations.bias_gelu", entry=chained)
    biased = np.empty(shape, dtype)

    def run_biased(ins, outs):
        x, bias = operands(ins)
        np.add(x, bias, out=biased)
        entry([biased], outs)

    return Kernel(run_biased, outputs, ops=2 * ops, note="kernels.activations after the bias")


@preparer("PRelu")
def prepare_prelu(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX PRelu: ``x`` if ``x >= 0`` else ``slope x``, slope broadcast to x. A constant slope within [.., 1]
    everywhere is ``max(x, slope x)`` (within [1, ..] ``min``); otherwise ``max(x, 0) + slope min(x, 0)``."""
    shape = tuple(inputs[0][0])
    if _broadcast(node, shape, inputs[1][0]) != shape:
        raise _fail(node, f"slope {list(inputs[1][0])} does not broadcast to the input {list(shape)}")
    dtype, constants = _operands(node, graph, inputs, (0, 1))
    operands, slope = _bind(constants), constants.get(1)
    pick = None if slope is None else np.maximum if np.all(slope <= 1) else np.minimum if np.all(slope >= 1) else None
    scratch = np.empty(shape, dtype)

    def run(ins, outs):
        x, s = operands(ins)
        y = outs[0]
        if pick is not None:
            np.multiply(x, s, out=y)
            pick(x, y, out=y)
        else:
            np.minimum(x, 0, out=y)
            np.multiply(y, s, out=y)
            np.maximum(x, 0, out=scratch)
            np.add(y, scratch, out=y)

    return Kernel(run, [(shape, dtype)], ops=2 * _product(shape))


@preparer("Clip")
def prepare_clip(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Clip: ``min(max(x, lo), hi)`` (``hi`` wherever ``lo > hi``); the bounds are inputs 1 and 2
    (opset >= 11, constant or computed) or attrs ``min`` / ``max`` (opset < 11); an absent bound is no bound.
    Float32 runs ``kernels.activations.clip`` (NaN kept), an entry when the bounds are constant or absent.
    Elementwise: attribute ``layout="NHWC"`` (:func:`channels_last`) only says that x and y are ``[N, H, W, C]``."""
    shape, dtype = inputs[0]
    channels_last(node, shape)
    _, constants = _operands(node, graph, inputs, (0, 1, 2))
    operands = _bind(constants)
    bounds = []
    for index, name in ((1, "min"), (2, "max")):
        if _given(node, index):
            if inputs[index][0] not in ((), (1,)):
                raise _fail(node, f"bound {name} must be a scalar, got shape {list(inputs[index][0])}")
            bounds.append(constants[index].reshape(()) if index in constants else index)
        else:
            value = attr(node, name, None)
            bounds.append(None if value is None else np.asarray(value, dtype))
    lo, hi = bounds

    def bound(xs: list[np.ndarray], which):
        return xs[which].reshape(()) if isinstance(which, int) else which

    if np.dtype(dtype) == F32:
        limits = [np.float32(default if b is None else b) if not isinstance(b, int) else b
                  for b, default in zip(bounds, (-np.inf, np.inf))]
        if not any(isinstance(b, int) for b in limits):
            return _compiled(activations.unary_entry("clip", lo=limits[0], hi=limits[1]), [(shape, dtype)],
                             _product(shape))

        def run_computed(ins, outs):  # a bound computed at run time: the same kernel, called from Python
            xs = operands(ins)
            activations.clip(np.ascontiguousarray(xs[0]), outs[0],
                             *(np.float32(bound(xs, b)) if isinstance(b, int) else b for b in limits))

        return Kernel(run_computed, [(shape, dtype)], ops=_product(shape), note="kernels.activations")

    def run(ins, outs):
        xs = operands(ins)
        x, y = xs[0], outs[0]
        if lo is not None:
            np.maximum(x, bound(xs, lo), out=y)
            x = y
        if hi is not None:
            np.minimum(x, bound(xs, hi), out=y)
        elif lo is None:
            np.copyto(y, x)

    return Kernel(run, [(shape, dtype)], ops=_product(shape))


def _truncating_divide(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """Integer ``a / b`` rounded toward zero (ONNX, C) rather than down (NumPy's //): ``(a - fmod(a, b)) // b``,
    whose dividend is an exact multiple of b. Division by zero gives 0 (undefined in ONNX)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        np.fmod(a, b, out=out)
        np.subtract(a, out, out=out)
        np.floor_divide(out, b, out=out)


def _power(b: np.ndarray | None, dtype: np.dtype) -> Callable | None:
    """A faster ufunc for a constant scalar exponent: ``x^2`` squares, ``x^0.5`` is sqrt, ``x^1`` copies."""
    if b is None or b.size != 1 or dtype.kind != "f":
        return None
    return {2.0: lambda x, e, out: np.square(x, out=out), 0.5: lambda x, e, out: np.sqrt(x, out=out),
            1.0: lambda x, e, out: np.copyto(out, x)}.get(float(b.reshape(-1)[0]))


BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}


@preparer(*BINARY)
def prepare_binary(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Add ``a + b``, Sub ``a - b``, Mul ``a b``, Div ``a / b`` (integers: rounded toward zero), Pow ``a^b``, with
    NumPy (= ONNX multidirectional) broadcasting, into the output with ``out=``; then the lowbit attribute
    ``activation`` ("relu" / "relu6"), which :func:`~lowbit.runtime.passes.fuse_activations` sets on an Add.

    Types are ONNX's: both operands of one dtype (a constant is cast to the other's), except Pow, whose result has
    the base's dtype whatever the exponent's. Float32 Add / Sub / Mul / Div whose broadcast
    ``kernels.activations.binary_entry`` serves (the same shapes, a scalar, a vector along the last axes or axis 1
    of NCHW) run its compiled loops, activation fused (an entry); other broadcasts and dtypes the ufuncs. With
    attribute ``layout="NHWC"`` (:func:`channels_last`) both operands are 4-D ``[N, H, W, C]``, permuted alike, so
    that broadcasting them means what it did on NCHW."""
    (a, a_dtype), (b, _) = inputs
    if channels_last(node, a) and len(b) != 4:
        raise _fail(node, f"layout NHWC needs two 4-D inputs [N, H, W, C], got shapes {list(a)} and {list(b)}")
    shape = _broadcast(node, a, b)
    if node.op == "Pow":
        dtype, constants = np.dtype(a_dtype), {}
        exponent = param(node, graph, 1, required=False)
        if exponent is not None:
            constants[1] = np.asarray(exponent, dtype if dtype.kind == "f" else exponent.dtype)
        fast = _power(constants.get(1), dtype)
        ufunc = fast or (lambda x, e, out: np.power(x, e, out=out, casting="unsafe"))
    else:
        dtype, constants = _operands(node, graph, inputs, (0, 1))
        ufunc = _truncating_divide if node.op == "Div" and dtype.kind in "iu" else BINARY[node.op]
    act = activation_of(node)  # Add + Relu: a residual block's end, fused by passes.fuse_activations
    if dtype == F32 and node.op != "Pow":
        entry = activations.binary_entry(node.op.lower(), tuple(a), tuple(b),
                                         *(constants.get(i, In(i)) for i in (0, 1)),
                                         activation=attr(node, "activation", None))
        if entry is not None:
            return _compiled(entry, [(shape, dtype)], _product(shape))
    operands = _bind(constants)

    def run(ins, outs):
        x, e = operands(ins)
        ufunc(x, e, out=outs[0])
        act(outs[0])

    return Kernel(run, [(shape, dtype)], ops=_product(shape))


@preparer("Softmax", "LogSoftmax")
def prepare_softmax(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Softmax ``e^(x - max) / sum e^(x - max)`` and LogSoftmax ``x - max - log(sum e^(x - max))``.

    Opset >= 13: along ``axis`` (default -1). Opset < 13: over all axes from ``axis`` on (default 1), the input
    coerced to 2-D ``[prod(shape[:axis]), prod(shape[axis:])]``. Either way the input is viewed as
    ``[pre, reduced, post]`` and reduced over the middle axis into buffers prepared once.
    """
    shape, dtype = inputs[0]
    opset = graph.opset_of(node.op)
    axis = _axis(node, int(attr(node, "axis", -1 if opset >= 13 else 1)), len(shape))
    if node.op == "Softmax" and np.dtype(dtype) == F32 and axis == len(shape) - 1 and shape[-1] > 0:
        return _softmax_kernel(tuple(shape), 1.0, None)
    pre = _product(shape[:axis])
    view = (pre, shape[axis], _product(shape[axis + 1:])) if opset >= 13 else (pre, _product(shape[axis:]), 1)
    reduced = np.empty((view[0], 1, view[2]), dtype)
    exps = np.empty(view, dtype) if node.op == "LogSoftmax" else None

    def run(ins, outs):
        x, y = ins[0].reshape(view), outs[0].reshape(view)
        np.max(x, axis=1, keepdims=True, out=reduced)
        np.subtract(x, reduced, out=y)
        if exps is None:
            np.exp(y, out=y)
            np.sum(y, axis=1, keepdims=True, out=reduced)
            np.divide(y, reduced, out=y)
        else:
            np.exp(y, out=exps)
            np.sum(exps, axis=1, keepdims=True, out=reduced)
            np.log(reduced, out=reduced)
            np.subtract(y, reduced, out=y)

    return Kernel(run, [(shape, dtype)], ops=4 * _product(shape))


def _softmax_kernel(shape: Shape, scale: float, mask_shape: Shape | None) -> Kernel:
    """Softmax of ``scale x (+ mask)`` over the last axis on ``kernels.softmax`` (an entry, which compiled chains
    run on one thread; alone, the plan, which splits rows over the kernels' threads; inputs x, mask)."""
    plan = kernels.softmax_plan(shape, scale=scale, mask_shape=mask_shape)
    entry = plan.entry()

    def run(ins, outs):
        plan(*(np.ascontiguousarray(x) for x in ins), out=outs[0])

    return Kernel(run, [(shape, F32)], ops=4 * _product(shape), note="kernels.softmax", entry=entry)


@preparer("lowbit.MaskedSoftmax")
def prepare_masked_softmax(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """lowbit's attention softmax (:mod:`lowbit.runtime.transformer_fusion`): ``Softmax(scale * x + mask)`` over
    the last axis, float32; a mask that does not broadcast along the scores' rows (or other dtypes) computes the
    three ONNX ops in NumPy."""
    (shape, dtype), (mask_shape, mask_dtype) = inputs[0], inputs[1]
    scale = float(attr(node, "scale", 1.0))
    shape, mask_shape = tuple(shape), tuple(mask_shape)
    if _broadcast(node, mask_shape, shape) != shape:
        raise _fail(node, f"mask {list(mask_shape)} does not broadcast to the scores {list(shape)}")
    if (np.dtype(dtype) == F32 and np.dtype(mask_dtype) == F32 and shape and shape[-1] > 0 and mask_shape
            and mask_shape[-1] == shape[-1]):
        return _softmax_kernel(shape, scale, mask_shape)
    view = (_product(shape[:-1]), shape[-1]) if shape else (1, 1)

    def run(ins, outs):
        y = outs[0]
        np.add(ins[0] * np.asarray(scale, dtype), ins[1], out=y)
        rows = y.reshape(view)
        rows -= rows.max(axis=1, keepdims=True)
        np.exp(rows, out=rows)
        rows /= rows.sum(axis=1, keepdims=True)

    return Kernel(run, [(shape, dtype)], ops=5 * _product(shape))


@preparer("lowbit.Attention")
def prepare_attention(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """lowbit's attention block (:mod:`lowbit.runtime.transformer_fusion`; inputs q, q_shape, k, k_shape, v, v_shape,
    mask) on ``kernels.attention`` when float32 q, k, v ``[B, S, H D]`` are split into H heads along their last axis
    and the float32 mask broadcasts to the scores ``[B, H, Sq, Sk]`` along their rows: one team entry, output
    ``[B, Sq, H, Dv]``. Other cases (head shapes computed at run time included) go to the evaluator."""
    targets = [param(node, graph, i, required=False) for i in (1, 3, 5)]
    (q, q_dtype), (k, k_dtype), (v, v_dtype), (mask, mask_dtype) = (inputs[i] for i in (0, 2, 4, 6))
    if any(t is None for t in targets):
        return _evaluated(node, graph, inputs, "head shapes computed at run time")
    if any(np.dtype(d) != F32 for d in (q_dtype, k_dtype, v_dtype, mask_dtype)):
        return _evaluated(node, graph, inputs, "not float32")
    shapes = [tuple(s) for s in (q, k, v)]
    split = [_reshaped(node, s, [int(t) for t in target.reshape(-1)], False) for s, target in zip(shapes, targets)]
    heads_last = all(len(s) == 3 and len(t) == 4 and t[:2] == s[:2] for s, t in zip(shapes, split))
    if heads_last:
        (b, sq, h, d), (kb, sk, kh, kd), (vb, vk, vh, dv) = split
        heads_last = (kb, kh, kd) == (b, h, d) and (vb, vk, vh) == (b, sk, h)
    mask = tuple(mask)
    if not heads_last or len(mask) > 4 or not mask or mask[-1] != sk or _broadcast(node, mask, (b, h, sq, sk)) != (
            b, h, sq, sk):
        return _evaluated(node, graph, inputs, "heads not split along the last axis of [B, S, H D]")
    plan = kernels.attention_plan(q, k, v, heads=h, scale=float(attr(node, "scale", 1.0)), mask_shape=mask)

    def run(ins, outs):
        plan(ins[0], ins[2], ins[4], ins[6], out=outs[0].reshape(plan.out_shape))

    return Kernel(run, [((b, sq, h, dv), F32)], ops=2 * plan.macs, note="kernels.attention",
                  entry=plan.entry().reading(0, 2, 4, 6))


@preparer("lowbit.Linear")
def prepare_linear(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """lowbit's MatMul with its bias (:mod:`lowbit.runtime.transformer_fusion`): ``x @ W + b`` for float32
    ``x [..., K]`` and constant ``W [K, N]``, ``b [N]`` on ``kernels.linear_float32_plan`` (one team entry, the bias
    in the sums); other cases the evaluator."""
    (shape, dtype), w, b = inputs[0], param(node, graph, 1, required=False), param(node, graph, 2, required=False)
    if (np.dtype(dtype) != F32 or w is None or b is None or w.dtype != F32 or b.dtype != F32 or w.ndim != 2
            or not shape or shape[-1] != w.shape[0] or b.shape != (w.shape[1],) or min(w.shape) == 0):
        return _evaluated(node, graph, inputs, "not float32 [..., K] @ constant [K, N] + [N]")
    plan = kernels.linear_float32_plan(np.ascontiguousarray(w), np.ascontiguousarray(b))
    out = (*shape[:-1], w.shape[1])

    def run(ins, outs):
        plan(ins[0], out=outs[0])

    return Kernel(run, [(out, F32)], ops=2 * _product(out) * w.shape[0], note="kernels.linear_float32",
                  entry=plan.entry())


@preparer("com.microsoft.MultiHeadAttention")
def prepare_multi_head_attention(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Runtime's MultiHeadAttention, in the cases :func:`lowbit.runtime.evaluators.multi_head_attention_parts`
    accepts (separate 3-D query, key and value; no cache): float32 query, key, value and attention_bias without a
    bias input or key_padding_mask run ``kernels.attention`` (one team entry), the rest the evaluator."""
    from lowbit.runtime.evaluators import multi_head_attention_parts  # imported here: evaluators import this module

    specs = (list(inputs) + [None] * 8)[:8]
    heads, scale = multi_head_attention_parts(node, [None if spec is None else spec[0] for spec in specs])
    present = [i for i, spec in enumerate(specs) if spec is not None]
    if 3 in present or 4 in present or any(np.dtype(specs[i][1]) != F32 for i in present):
        return _evaluated(node, graph, inputs, "a bias input, a key padding mask or not float32")
    (q, _), (k, _), (v, _) = specs[:3]
    masked = 5 in present
    plan = kernels.attention_plan(q, k, v, heads=heads, scale=scale,
                                  mask_shape=tuple(specs[5][0]) if masked else None)

    def run(ins, outs):
        plan(ins[0], ins[1], ins[2], ins[5] if masked else None, out=outs[0])

    entry = plan.entry().reading(0, 1, 2, 5) if masked else plan.entry()
    return Kernel(run, [(plan.out_shape, F32)], ops=2 * plan.macs, note="kernels.attention", entry=entry)


# ---- pooling -------------------------------------------------------------------------------------------------------

def _pool_window(node: Node, shape: Shape) -> tuple[tuple[int, ...], Window]:
    """``(kernel, window)`` of a pool over the spatial axes of ``[N, C, *spatial]``."""
    if len(shape) < 3:
        raise _fail(node, f"input must be [N, C, *spatial], got shape {list(shape)}")
    kernel = kernel_shape(node, len(shape) - 2)
    return kernel, window_geometry(node, tuple(shape[2:]), kernel, ceil_mode=bool(attr(node, "ceil_mode", 0)))


def _inside_counts(shape: Shape, kernel: tuple[int, ...], window: Window, extra: tuple[int, ...],
                   include_pad: bool) -> np.ndarray:
    """``[1, 1, *out]`` float64: how many taps of each window of ``[N, C, *spatial]`` lie inside the input, or with
    ``include_pad`` inside the padded input (never in the ceil_mode overhang ``extra``)."""
    k = len(kernel)
    counted = _Padded((1, 1) + tuple(shape[2:]), window.pads, extra, 0.0, np.float64)
    counted.buffer[_spatial(slice(0, b + i + e) for b, i, e in zip(window.pads[:k], shape[2:], window.pads[k:]))] \
        = include_pad
    counted.interior[...] = 1
    return window_view(counted.buffer, kernel, window).sum(axis=tuple(range(-k, 0)))


def _argmax_indices(node: Node, shape: Shape, kernel: tuple[int, ...], window: Window) -> Callable:
    """``fn(xp, taps, out)``: MaxPool's Indices, the flat index into ``x`` (spatial axes row-major, or column-major
    with ``storage_order=1``) of the first largest value of each window of padded ``xp`` (padding never wins)."""
    order = int(attr(node, "storage_order", 0))
    if order not in (0, 1):
        raise _fail(node, f"storage_order must be 0 or 1, got {order}")
    k, sizes = len(kernel), np.array(shape[2:], np.int64)
    strides = np.append(np.cumprod(sizes[:0:-1])[::-1], 1) if order == 0 else np.append(1, np.cumprod(sizes[:-1]))
    starts = np.indices(window.out).reshape(k, -1) * np.array(window.strides)[:, None] \
        - np.array(window.pads[:k])[:, None]  # [k, outputs]: where each window starts in x
    shifts = np.array(_offsets(kernel)).reshape(-1, k).T * np.array(window.dilations)[:, None]  # [k, taps]
    flat = (strides @ shifts)[:, None] + (strides @ starts)[None, :]  # [taps, outputs]: flat spatial index
    channels = np.arange(shape[0] * shape[1], dtype=np.int64)[:, None] * int(sizes.prod())
    positions = np.arange(flat.shape[1])

    def indices(xp, taps, out):
        stacked = np.stack([xp[tap] for tap in taps]).reshape(len(taps), len(channels), -1)
        np.add(channels, flat[stacked.argmax(axis=0), positions], out=out.reshape(len(channels), -1))
    return indices


@preparer("MaxPool")
def prepare_max_pool(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX MaxPool over any number of spatial axes: the max over each window of the input padded with the
    dtype's lowest value (-inf for floats: padding never wins), and optionally Indices (see
    :func:`_argmax_indices`).

    2-D float32, uint8 and int8 inputs (quantized codes inside an int8 chain: max commutes with the monotone
    dequantization) run ``kernels.max_pool2d``, which ignores the padding likewise, unless a window lies wholly
    in the padding (its max is the lowest value here, an error there). With attribute ``layout="NHWC"``
    (:func:`channels_last`) input and output are ``[N, H, W, C]``, the windows sliding over axes 1 and 2;
    Indices are then refused.
    """
    shape, dtype = inputs[0]
    with_indices = len(node.outputs) > 1
    nhwc = channels_last(node, shape)
    if nhwc:
        if with_indices:
            raise _fail(node, "layout NHWC has no Indices output (ONNX defines them on NCHW)")
        shape = nchw_shape(shape)
    kernel, window = _pool_window(node, shape)
    out_shape = tuple(shape[:2]) + window.out
    ops = _product(out_shape) * _product(kernel)
    extra = _extra(shape[2:], kernel, window)
    if (np.dtype(dtype) in (F32, np.dtype(np.uint8), np.dtype(np.int8)) and len(shape) == 4 and not with_indices
            and _inside_counts(shape, kernel, window, extra, False).all()):
        options = {"strides": window.strides, "pads": window.pads, "dilations": window.dilations,
                   "ceil_mode": bool(attr(node, "ceil_mode", 0)), "layout": "NHWC" if nhwc else "NCHW"}

        codes = np.dtype(dtype) != F32
        plan = kernels.max_pool2d_plan(nhwc_shape(shape) if nhwc else tuple(shape), dtype, kernel, **options)
        return Kernel(lambda ins, outs: [plan(ins[0], out=outs[0])],
                      [(nhwc_shape(out_shape) if nhwc else out_shape, dtype)], ops=ops,
                      precision="int8" if codes else "float32",
                      note=f"max_pool2d{' on codes' * codes}{', NHWC' * nhwc}", entry=plan.entry())
    lowest = -np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).min
    padded = _Padded(shape, window.pads, extra, lowest, dtype, nhwc)
    taps = _tap_indices(kernel, window, nhwc)
    indices = _argmax_indices(node, shape, kernel, window) if with_indices else None

    def run(ins, outs):
        xp = padded(ins[0])
        _reduce_taps(xp, taps, np.maximum, outs[0])
        if indices is not None:
            indices(xp, taps, outs[1])

    return Kernel(run, [(nhwc_shape(out_shape) if nhwc else out_shape, dtype)]
                  + [(out_shape, np.dtype(np.int64))] * with_indices, ops=ops)


@preparer("AveragePool")
def prepare_average_pool(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX AveragePool over any number of spatial axes (dilations as opset 19): the window sum of the zero-padded
    input / count, where count is the number of taps inside the input, or with ``count_include_pad`` inside the
    padded input (never the ceil_mode overhang). 2-D float32 inputs run ``kernels.avg_pool2d_float32`` (its sums
    in another order: equal to float32 rounding). With attribute ``layout="NHWC"`` (:func:`channels_last`) input
    and output are ``[N, H, W, C]``, the windows sliding over axes 1 and 2."""
    shape, dtype = inputs[0]
    nhwc = channels_last(node, shape)
    shape = nchw_shape(shape) if nhwc else shape
    kernel, window = _pool_window(node, shape)
    extra, include_pad = _extra(shape[2:], kernel, window), bool(attr(node, "count_include_pad", 0))
    counts = _inside_counts(shape, kernel, window, extra, include_pad)
    if (counts == 0).any():
        raise _fail(node, "a window lies wholly in the padding")
    out_shape = tuple(shape[:2]) + window.out
    out = [(nhwc_shape(out_shape) if nhwc else out_shape, dtype)]
    ops = _product(out_shape) * _product(kernel)
    if np.dtype(dtype) == F32 and len(shape) == 4:
        options = {"strides": window.strides, "pads": window.pads, "dilations": window.dilations,
                   "ceil_mode": bool(attr(node, "ceil_mode", 0)), "count_include_pad": include_pad,
                   "layout": "NHWC" if nhwc else "NCHW"}

        def run_kernel(ins, outs):
            kernels.avg_pool2d_float32(ins[0], kernel, out=outs[0], **options)

        return Kernel(run_kernel, out, ops=ops, note=f"avg_pool2d_float32{', NHWC' * nhwc}")
    padded = _Padded(shape, window.pads, extra, 0.0, dtype, nhwc)
    inverse = (1.0 / counts).astype(dtype)  # [1, 1, *out]
    inverse = np.moveaxis(inverse, 1, -1) if nhwc else inverse
    taps = _tap_indices(kernel, window, nhwc)

    def run(ins, outs):
        _reduce_taps(padded(ins[0]), taps, np.add, outs[0])
        np.multiply(outs[0], inverse, out=outs[0])

    return Kernel(run, out, ops=ops)


GLOBAL_POOLS = {"GlobalAveragePool": np.mean, "GlobalMaxPool": np.max}


@preparer(*GLOBAL_POOLS)
def prepare_global_pool(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """GlobalAveragePool (mean) and GlobalMaxPool (max) over the spatial axes of ``[N, C, *spatial]``, which stay
    as size 1. With attribute ``layout="NHWC"`` (:func:`channels_last`) input ``[N, H, W, C]``, output
    ``[N, 1, 1, C]`` (the reduction is over axes 1 and 2)."""
    shape, dtype = inputs[0]
    if len(shape) < 3:
        raise _fail(node, f"input must be [N, C, *spatial], got shape {list(shape)}")
    nhwc = channels_last(node, shape)
    axes, reduce = tuple(range(1, 3) if nhwc else range(2, len(shape))), GLOBAL_POOLS[node.op]
    out_shape = tuple(1 if i in axes else d for i, d in enumerate(shape))
    n, c, area = shape[0], shape[-1] if nhwc else shape[1], _product([shape[i] for i in axes])
    if node.op == "GlobalAveragePool" and np.dtype(dtype).kind == "f":
        # matrix-vector products with 1 / area: BLAS, where numpy.mean's reduction over short rows is ~20x slower
        weights = np.full(area, 1.0 / area, dtype)

        def run_mean(ins, outs):
            np.matmul(ins[0].reshape(n * c, area), weights, out=outs[0].reshape(n * c))

        def run_mean_nhwc(ins, outs):  # per image, the weights times its [area, C] pixels
            np.matmul(weights, ins[0].reshape(n, area, c), out=outs[0].reshape(n, c))

        return Kernel(run_mean_nhwc if nhwc else run_mean, [(out_shape, dtype)], ops=_product(shape))

    def run(ins, outs):
        reduce(ins[0], axis=axes, keepdims=True, out=outs[0])

    return Kernel(run, [(out_shape, dtype)], ops=_product(shape))


# ---- layout --------------------------------------------------------------------------------------------------------

@preparer("Concat")
def prepare_concat(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Concat along ``axis`` (negative counts from the end) of inputs of one dtype and rank."""
    shapes = [tuple(s) for s, _ in inputs]
    dtypes = {np.dtype(d) for _, d in inputs}
    if len(dtypes) > 1:
        raise _fail(node, f"inputs must have one dtype, got {[str(d) for _, d in inputs]}", TypeError)
    axis = _axis(node, int(attr(node, "axis", 1)), len(shapes[0]))
    if any(len(s) != len(shapes[0]) or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]
           for s in shapes):
        raise _fail(node, f"shapes {[list(s) for s in shapes]} differ outside axis {axis}")
    shape = shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]

    def run(ins, outs):
        np.concatenate(ins, axis=axis, out=outs[0])

    return Kernel(run, [(shape, dtypes.pop())], ops=_product(shape))


def _reshaped(node: Node, shape: Shape, target: list[int], allowzero: bool) -> Shape:
    """ONNX Reshape's target: 0 copies the input's dimension (unless ``allowzero``: then it is 0), one -1 is
    inferred."""
    if not allowzero:
        if len(target) > len(shape) and 0 in target[len(shape):]:
            raise _fail(node, f"shape {target} copies (0) a dimension the input {list(shape)} does not have")
        target = [shape[i] if t == 0 else t for i, t in enumerate(target)]
    if target.count(-1) > 1 or any(t < -1 for t in target) or (allowzero and 0 in target and -1 in target):
        raise _fail(node, f"invalid target shape {target} (one -1 at most, no other negative, not with a 0 "
                          "when allowzero=1)")
    if -1 in target:
        known = _product([t for t in target if t != -1])
        if known == 0 or _product(shape) % known:
            raise _fail(node, f"cannot reshape {list(shape)} to {target}")
        target[target.index(-1)] = _product(shape) // known
    if _product(target) != _product(shape):
        raise _fail(node, f"cannot reshape {list(shape)} ({_product(shape)} elements) to {target}")
    return tuple(target)


def _view(shape: Shape, dtype: np.dtype) -> Kernel:
    """A kernel returning its input viewed as ``shape`` (no copy), in compiled chains too."""
    return Kernel(lambda ins, outs: [ins[0].reshape(shape)], [(shape, dtype)], note="view", entry=Entry.view(shape))


@preparer("Reshape")
def prepare_reshape(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Reshape to the constant shape of input 1 (0 copies a dimension unless ``allowzero=1``, opset >= 14;
    one -1 is inferred): a view. A shape computed at run time goes to the evaluator."""
    shape, dtype = inputs[0]
    target = param(node, graph, 1, required=False)
    if target is None:
        return _evaluated(node, graph, inputs, "target shape computed at run time")
    return _view(_reshaped(node, tuple(shape), [int(t) for t in target.reshape(-1)],
                           bool(attr(node, "allowzero", 0))), dtype)


@preparer("Flatten")
def prepare_flatten(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Flatten: ``[prod(shape[:axis]), prod(shape[axis:])]`` with axis in ``[-rank, rank]`` (default 1):
    a view."""
    shape, dtype = inputs[0]
    axis = int(attr(node, "axis", 1))
    if not -len(shape) <= axis <= len(shape):
        raise _fail(node, f"axis {axis} is out of range for rank {len(shape)}")
    axis %= len(shape) + 1 if axis >= 0 else len(shape)
    return _view((_product(shape[:axis]), _product(shape[axis:])), dtype)


@preparer("Identity", "Dropout")
def prepare_identity(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """Identity, and Dropout at inference (``y = x``; its optional mask output all true): the input itself.
    Dropout in training mode (a constant true ``training_mode``, input 2) is refused."""
    shape, dtype = inputs[0]
    if node.op == "Dropout" and _given(node, 2):
        mode = param(node, graph, 2, required=False)
        if mode is None or bool(mode.reshape(-1)[0]):
            raise _fail(node, "training_mode must be a constant false: lowbit runs inference only")
    if len(node.outputs) < 2:
        return _view(tuple(shape), dtype)

    def run(ins, outs):
        outs[1].fill(True)
        return [ins[0], outs[1]]

    return Kernel(run, [(tuple(shape), dtype), (tuple(shape), np.dtype(bool))], note="view")


@preparer("Transpose")
def prepare_transpose(node: Node, graph: Graph, inputs: list[Spec]) -> Kernel:
    """ONNX Transpose (``perm`` default: reversed axes), copied into the output buffer; a view when it only moves
    axes of size 1 (the bytes stay in order: the exit of a channels-last region after a global pool, ``[N, 1, 1,
    C]`` to ``[N, C, 1, 1]``)."""
    shape, dtype = inputs[0]
    perm = tuple(int(p) for p in attr(node, "perm", range(len(shape) - 1, -1, -1)))
    if sorted(perm) != list(range(len(shape))):
        raise _fail(node, f"perm {list(perm)} is not a permutation of {len(shape)} axes")
    kept = [p for p in perm if shape[p] != 1]
    if kept == sorted(kept):
        return _view(tuple(shape[p] for p in perm), dtype)

    # NCHW <-> NHWC (the borders of lowbit.runtime.layout's channels-last regions): the kernels' block transposes,
    # ~10x NumPy's strided copy on uint8 images; prepared (and a compiled entry) for 1- and 4-byte numbers
    blocked = {(0, 2, 3, 1): kernels.nchw_to_nhwc, (0, 3, 1, 2): kernels.nhwc_to_nchw}.get(perm)
    plan = None
    if blocked is not None and np.dtype(dtype).itemsize in (1, 4):
        make = kernels.nchw_to_nhwc_plan if perm == (0, 2, 3, 1) else kernels.nhwc_to_nchw_plan
        plan = make(tuple(shape), dtype)

    def run(ins, outs):
        if plan is not None:
            plan(ins[0], out=outs[0])
        elif blocked is not None:
            blocked(ins[0], out=outs[0])
        else:
            np.copyto(outs[0], ins[0].transpose(perm))

    return Kernel(run, [(tuple(shape[p] for p in perm), dtype)], ops=_product(shape),
                  note="kernels block transpose" if blocked else "", entry=plan and plan.entry())
