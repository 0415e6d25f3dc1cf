"""ONNX ops as NumPy functions: ``outputs = EVALUATORS[op](node, inputs, opset)``.

One function per op computes the outputs from the input arrays (None for an absent
optional input) and the node's attributes, with ONNX's semantics at every opset from
11 to 23 (``opset`` is the node's domain's version: where an attribute became an input,
Squeeze's ``axes`` at 13 say, both forms are read). They serve twice:

- constant folding: the session evaluates, once per set of input shapes, every node
  whose inputs are all constants, and every Shape node;
- the run-time kernel (:func:`prepare_evaluated`) of every op without a dedicated,
  faster preparer in :mod:`lowbit.runtime.float_ops` / :mod:`lowbit.runtime.quant_ops`.

Dtypes are ONNX's: Shape / Size / ArgMax / TopK's indices are int64, comparisons bool,
Cast gives its target; float math runs in the inputs' float type (float32 stays float32,
float64 stays float64) and inputs that ONNX types alike (``T``) must share one dtype.

:data:`SHAPE_INPUTS` names, per op, the inputs whose *values* decide output shapes
(Reshape's shape, Slice's starts, ...): a kernel needs them as constants (or folded from
shapes) when it is prepared. Inputs that only change values are read at every call even
when computed: CumSum's axis, Trilu's k, Pad's constant_value, Resize's roi (a
``tf_crop_and_resize`` output size is ``floor(size * scale)``, without the roi, as ONNX
Runtime and ONNX's reference compute it), Clip's bounds.

``com.microsoft`` ops (named ``com.microsoft.<op>``) follow ONNX Runtime's contrib
operators; ``SimplifiedLayerNormalization`` is in the default domain, where ONNX Runtime
defines it (and is read under com.microsoft too).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any, Callable

import numpy as np

from kernels.activations import ERF_CLAMP, ERF_P, ERF_Q

# The dedicated preparers register first, so that the loop at the bottom of this module gives the generic
# evaluator kernel only to the ops left without one (the faster kernel wins).
import lowbit.runtime.float_ops  # noqa: F401
import lowbit.runtime.quant_ops  # noqa: F401
from lowbit.graph.ir import Graph, Node
from lowbit.runtime.float_ops import _axis, _fail, _product, attr
from lowbit.runtime.float_ops import _sigmoid as _sigmoid_into
from lowbit.runtime.registry import PREPARERS, Kernel, Shape, check_size, preparer

Evaluator = Callable[[Node, list[np.ndarray | None], int], list[np.ndarray]]
EVALUATORS: dict[str, Evaluator] = {}
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {}


def evaluator(*ops: str, shape_inputs: tuple[int, ...] = ()) -> Callable[[Evaluator], Evaluator]:
    """Register the decorated function as the evaluator of ``ops``, whose inputs at ``shape_inputs`` decide
    output shapes."""

    def register(fn: Evaluator) -> Evaluator:
        for op in ops:
            if op in EVALUATORS:
                raise ValueError(f"op {op!r} already has an evaluator: {EVALUATORS[op].__qualname__}")
            EVALUATORS[op] = fn
            if shape_inputs:
                SHAPE_INPUTS[op] = tuple(shape_inputs)
        return fn

    return register


def evaluate(node: Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """The outputs of ``node`` on ``inputs`` (C-contiguous arrays), floating-point exceptions silent as in ONNX.

    NumPy's own errors (shapes that do not broadcast, an index out of range) come back as ValueError /
    TypeError naming the node.
    """
    fn = EVALUATORS.get(node.op)
    if fn is None:
        raise NotImplementedError(f"node {node.name!r}: op {node.op!r} has no evaluator; evaluated ops: "
                                  f"{sorted(EVALUATORS)}")
    try:
        with np.errstate(all="ignore"):
            outputs = fn(node, inputs, opset)
    except (ValueError, TypeError, IndexError) as error:
        prefix = f"node {node.name!r} ({node.op}): "
        if str(error).startswith(prefix):
            raise
        raise (TypeError if isinstance(error, TypeError) else ValueError)(f"{prefix}{error}") from error
    arrays = [np.asarray(y) for y in outputs]
    for y in arrays:
        if not y.flags.c_contiguous:  # a view (Expand's broadcast) about to become an array
            check_size(node, y.shape, y.dtype)
    return [y if y.flags.c_contiguous else np.ascontiguousarray(y) for y in arrays]


def prepare_evaluated(node: Node, graph: Graph, inputs: list[tuple[Shape, np.dtype] | None]) -> Kernel:
    """The evaluator of ``node.op`` as a kernel: output shapes and dtypes found by evaluating it once on the
    constants of ``graph.params`` and zeros of the given shapes and dtypes for the other inputs."""
    opset = graph.opset_of(node.op)
    shape_inputs = SHAPE_INPUTS.get(node.op, ())
    probe = []
    for index, (name, spec) in enumerate(zip(node.inputs, inputs)):
        if not name:
            probe.append(None)
        elif name in graph.params:
            probe.append(graph.params[name])
        elif index in shape_inputs:
            raise _fail(node, f"input {index} ({name!r}) decides the output shape, so it must be computable ahead "
                              "of a run (a constant or computed from shapes), got a tensor computed at run time")
        else:
            probe.append(np.zeros(spec[0], spec[1]))
    outputs = evaluate(node, probe, opset)  # zeros may divide by zero: evaluate keeps that silent
    return Kernel(lambda ins, outs: evaluate(node, ins, opset), [(y.shape, y.dtype) for y in outputs],
                  ops=sum(y.size for y in outputs), note="numpy")


# ---- helpers ---------------------------------------------------------------------------------------------------------

def _arg(inputs: list[np.ndarray | None], index: int) -> np.ndarray | None:
    """Optional input ``index`` (None when absent or past the end)."""
    return inputs[index] if index < len(inputs) else None


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1).tolist()]


def _scalar(node: Node, value: np.ndarray, what: str):
    """The one value of a scalar (or one-element) input, as a Python number."""
    if np.size(value) != 1:
        raise _fail(node, f"{what} must have one value, got shape {list(np.shape(value))}")
    return np.asarray(value).reshape(-1)[0].item()


def _same_type(node: Node, *arrays: np.ndarray | None) -> None:
    """ONNX types these inputs alike (``T``): one dtype for all."""
    dtypes = [a.dtype for a in arrays if a is not None]
    if any(d != dtypes[0] for d in dtypes):
        raise _fail(node, f"inputs must share one dtype, got {[str(d) for d in dtypes]}", TypeError)


def _choice(node: Node, name: str, default: str, allowed) -> str:
    value = attr(node, name, default)
    if value not in allowed:
        raise _fail(node, f"attribute {name} must be one of {sorted(allowed)}, got {value!r}")
    return value


def _axes(node: Node, axes, rank: int) -> tuple[int, ...]:
    """``axes`` in ``[-rank, rank)`` as distinct non-negative axes."""
    normalized = tuple(_axis(node, a, rank, "axes") for a in axes)
    if len(set(normalized)) != len(normalized):
        raise _fail(node, f"axes {list(axes)} repeat an axis")
    return normalized


def _attr_or_input(node: Node, inputs: list, opset: int, name: str, index: int, since: int):
    """An operand that is attribute ``name`` before opset ``since`` and input ``index`` from it (None if absent)."""
    return _arg(inputs, index) if opset >= since else attr(node, name, None)


def _float_type(x: np.ndarray) -> np.dtype:
    """The dtype float math on ``x`` runs in: its own if it is float32 / float64, else float32."""
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


# ---- erf -------------------------------------------------------------------------------------------------------------

# One rational for erf in lowbit: kernels.activations' coefficients (see ERF_P there), evaluated here in float64.
ERF_EXACT_UP_TO = 64  # elements: smaller arrays call math.erf per element, cheaper than 25 whole-array passes
_math_erf = np.frompyfunc(math.erf, 1, 1)


def _horner(coefficients: tuple[float, ...], u: np.ndarray) -> np.ndarray:
    result = np.full_like(u, coefficients[-1])
    for c in coefficients[-2::-1]:
        result *= u
        result += c
    return result


def erf(x: np.ndarray) -> np.ndarray:
    """The error function ``2 / sqrt(pi) int_0^x e^(-t^2) dt`` elementwise, in ``x``'s dtype (see :data:`ERF_P`)."""
    if x.size <= ERF_EXACT_UP_TO:
        return np.asarray(_math_erf(x), np.float64).astype(x.dtype)  # a 0-d x gives a Python float
    t = np.clip(x, -ERF_CLAMP, ERF_CLAMP, dtype=np.float64)
    u = t * t
    t *= _horner(ERF_P, u)
    t /= _horner(ERF_Q, u)
    return t.astype(x.dtype)


# ---- shapes and layout -----------------------------------------------------------------------------------------------

@evaluator("Shape")
def _shape(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``int64(shape(x)[start:end])`` (``start`` / ``end`` from opset 15, clamped as Python slices are)."""
    return [np.array(inputs[0].shape[attr(node, "start", 0):attr(node, "end", None)], np.int64)]


@evaluator("Size")
def _size(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``int64(prod(shape(x)))``, a scalar."""
    return [np.array(inputs[0].size, np.int64)]


@evaluator("Reshape", shape_inputs=(1,))
def _reshape(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` in the target shape: one -1 is inferred; a 0 copies ``x``'s dimension unless ``allowzero`` (opset 14)."""
    x, target = inputs[0], _ints(inputs[1])
    if target.count(-1) > 1:
        raise _fail(node, f"the target shape {target} has more than one -1")
    if not attr(node, "allowzero", 0):
        if len(target) < len(x.shape) and any(t == 0 for t in target[len(x.shape):]):
            raise _fail(node, f"a 0 in the target shape {target} has no dimension of {list(x.shape)} to copy")
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    if -1 in target:
        known = _product([t for t in target if t != -1])
        if known == 0 or x.size % known:
            raise _fail(node, f"cannot reshape {list(x.shape)} to {target}")
        target[target.index(-1)] = x.size // known
    if _product(target) != x.size:
        raise _fail(node, f"cannot reshape {list(x.shape)} ({x.size} elements) to {target}")
    return [x.reshape(target)]


@evaluator("Flatten")
def _flatten(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` as ``[prod(shape[:axis]), prod(shape[axis:])]`` (axis default 1, in ``[-rank, rank]``)."""
    x, axis = inputs[0], attr(node, "axis", 1)
    if not -x.ndim <= axis <= x.ndim:
        raise _fail(node, f"axis {axis} is out of range [{-x.ndim}, {x.ndim}]")
    axis = axis + x.ndim if axis < 0 else axis
    return [x.reshape(_product(x.shape[:axis]), _product(x.shape[axis:]))]


@evaluator("Transpose")
def _transpose(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` with its axes permuted by ``perm`` (default: reversed)."""
    x = inputs[0]
    perm = list(attr(node, "perm", range(x.ndim - 1, -1, -1)))
    if sorted(perm) != list(range(x.ndim)):
        raise _fail(node, f"perm {perm} is not a permutation of the {x.ndim} axes")
    return [x.transpose(perm)]


@evaluator("Squeeze", shape_inputs=(1,))
def _squeeze(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` without its size-1 axes ``axes`` (attribute before opset 13, input from 13; absent or empty: all
    size-1 axes, as ONNX Runtime reads an empty list)."""
    x, axes = inputs[0], _attr_or_input(node, inputs, opset, "axes", 1, 13)
    if axes is None or not np.size(axes):
        return [x.reshape([d for d in x.shape if d != 1])]
    axes = _axes(node, _ints(axes), x.ndim)
    if any(x.shape[a] != 1 for a in axes):
        raise _fail(node, f"axes {list(axes)} of shape {list(x.shape)} are not all of size 1")
    return [x.reshape([d for i, d in enumerate(x.shape) if i not in axes])]


@evaluator("Unsqueeze", shape_inputs=(1,))
def _unsqueeze(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` with size-1 axes inserted at ``axes`` of the output (attribute before opset 13, input from 13)."""
    x, axes = inputs[0], _attr_or_input(node, inputs, opset, "axes", 1, 13)
    if axes is None:
        raise _fail(node, "axes are required")
    axes = _ints(axes)
    return [np.expand_dims(x, _axes(node, axes, x.ndim + len(axes)))]


@evaluator("Concat")
def _concat(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """The inputs joined along ``axis``."""
    xs = [x for x in inputs if x is not None]
    _same_type(node, *xs)
    if "axis" not in node.attrs:
        raise _fail(node, "attribute axis is required")
    return [np.concatenate(xs, axis=_axis(node, attr(node, "axis", 0), xs[0].ndim))]


@evaluator("Split", shape_inputs=(1,))
def _split(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` cut along ``axis`` into pieces of sizes ``split`` (attribute before opset 13, input from 13), or into
    ``num_outputs`` (opset 18; default the number of outputs) pieces of ``ceil(dim / n)``, the last one smaller."""
    x = inputs[0]
    axis, count = _axis(node, attr(node, "axis", 0), x.ndim), len(node.outputs)
    dim = x.shape[axis]
    split = _attr_or_input(node, inputs, opset, "split", 1, 13)
    if split is not None and np.size(split):
        sizes = _ints(split)
        if len(sizes) != count or sum(sizes) != dim or min(sizes) < 0:
            raise _fail(node, f"split {sizes} does not cut dimension {dim} into {count} outputs")
    else:
        parts = attr(node, "num_outputs", count)
        if parts != count:
            raise _fail(node, f"num_outputs {parts} differs from the {count} outputs")
        chunk = -(-dim // count)
        sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
        if sizes[-1] < 0:
            raise _fail(node, f"dimension {dim} does not split into {count} pieces of {chunk}")
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


@evaluator("Slice", shape_inputs=(1, 2, 3, 4))
def _slice(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x[starts:ends:steps]`` along ``axes`` (default the first ``len(starts)``; steps default 1). Negative
    starts / ends count from the end, then clamp to ``[0, dim]`` (``[0, dim - 1]`` and ``[-1, dim - 1]`` for a
    negative step)."""
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if _arg(inputs, 3) is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if _arg(inputs, 4) is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise _fail(node, f"starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, _axes(node, axes, x.ndim), steps):
        if step == 0:
            raise _fail(node, "a step is 0")
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index[axis] = slice(start, None if end < 0 else end, step)
    return [x[tuple(index)]]


@evaluator("Expand", shape_inputs=(1,))
def _expand(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` broadcast with ``shape`` (both ways: a 1 in ``shape`` keeps ``x``'s dimension)."""
    x = inputs[0]
    return [np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(inputs[1]))))]


@evaluator("Tile", shape_inputs=(1,))
def _tile(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` repeated ``repeats[i]`` times along each axis ``i``."""
    x, repeats = inputs[0], _ints(inputs[1])
    if len(repeats) != x.ndim or min(repeats, default=0) < 0:
        raise _fail(node, f"repeats {repeats} must be {x.ndim} non-negative counts")
    check_size(node, tuple(d * r for d, r in zip(x.shape, repeats)), x.dtype)
    return [np.tile(x, repeats)]


@evaluator("ConstantOfShape", shape_inputs=(0,))
def _constant_of_shape(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """A tensor of shape ``input`` filled with the one value of attribute ``value`` (default float32 0)."""
    value = np.asarray(attr(node, "value", np.zeros(1, np.float32)))
    if value.size != 1:
        raise _fail(node, f"attribute value must hold one element, got shape {list(value.shape)}")
    shape = _ints(inputs[0])
    if min(shape, default=0) < 0:
        raise _fail(node, f"shape {shape} has a negative dimension")
    check_size(node, shape, value.dtype)
    return [np.full(shape, value.reshape(()), value.dtype)]


@evaluator("Range", shape_inputs=(0, 1, 2))
def _range(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``start + i delta`` for ``i < max(ceil((limit - start) / delta), 0)``, in the inputs' dtype."""
    _same_type(node, *inputs[:3])
    start, limit, delta = (_scalar(node, v, name) for v, name in zip(inputs, ("start", "limit", "delta")))
    if delta == 0:
        raise _fail(node, "delta is 0")
    dtype = inputs[0].dtype
    count = max(-((start - limit) // delta) if dtype.kind in "iu" else math.ceil((limit - start) / delta), 0)
    check_size(node, (count,), dtype)
    return [np.arange(count, dtype=dtype) * inputs[2].reshape(()) + inputs[0].reshape(())]


@evaluator("Gather")
def _gather(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``data`` indexed by ``indices`` (negative ones count from the end) along ``axis``: output shape
    ``shape[:axis] + shape(indices) + shape[axis + 1:]``."""
    data, indices = inputs[0], inputs[1]
    return [np.take(data, indices.astype(np.intp, copy=False), axis=_axis(node, attr(node, "axis", 0), data.ndim))]


@evaluator("GatherElements")
def _gather_elements(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``y[i..] = data[i.. with i_axis replaced by indices[i..]]``: output shaped as ``indices``."""
    data, indices = inputs[0], inputs[1].astype(np.int64, copy=False)
    axis = _axis(node, attr(node, "axis", 0), data.ndim)
    if indices.ndim != data.ndim or any(i > d for k, (i, d) in enumerate(zip(indices.shape, data.shape))
                                        if k != axis):
        raise _fail(node, f"indices {list(indices.shape)} must have data's rank {data.ndim} and no larger "
                          f"dimension than data {list(data.shape)} outside axis {axis}")
    dim = data.shape[axis]
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise _fail(node, f"indices out of range [{-dim}, {dim - 1}] along axis {axis}")
    window = tuple(slice(None) if k == axis else slice(0, i) for k, i in enumerate(indices.shape))
    return [np.take_along_axis(data[window], np.where(indices < 0, indices + dim, indices), axis=axis)]


@evaluator("DepthToSpace")
def _depth_to_space(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``[N, C, H, W] -> [N, C / b^2, H b, W b]``: channel ``(i b + j) C / b^2 + c`` (mode DCR) or
    ``c b^2 + i b + j`` (CRD) goes to pixel ``(h b + i, w b + j)`` of channel ``c``."""
    x, b = inputs[0], int(attr(node, "blocksize", 0))
    mode = _choice(node, "mode", "DCR", ("DCR", "CRD"))
    n, c, h, w = x.shape
    if b < 1 or c % (b * b):
        raise _fail(node, f"blocksize {b} must be >= 1 with blocksize^2 dividing the {c} channels")
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


@evaluator("SpaceToDepth")
def _space_to_depth(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``[N, C, H, W] -> [N, C b^2, H / b, W / b]``: pixel ``(h b + i, w b + j)`` of channel ``c`` goes to
    channel ``(i b + j) C + c``."""
    x, b = inputs[0], int(attr(node, "blocksize", 0))
    n, c, h, w = x.shape
    if b < 1 or h % b or w % b:
        raise _fail(node, f"blocksize {b} must be >= 1 and divide the spatial size {h} x {w}")
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


@evaluator("Pad", shape_inputs=(1, 3))
def _pad(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` padded by ``pads`` (all begins, then all ends, over ``axes``: input 3 from opset 18, default all) with
    ``constant_value`` (default 0), or by mode ``reflect`` / ``edge`` / ``wrap`` (opset 19); a negative pad crops."""
    x, pads = inputs[0], _ints(inputs[1])
    mode = _choice(node, "mode", "constant", ("constant", "reflect", "edge", "wrap") if opset >= 19
                   else ("constant", "reflect", "edge"))
    axes = _axes(node, _ints(inputs[3]), x.ndim) if _arg(inputs, 3) is not None else tuple(range(x.ndim))
    if len(pads) != 2 * len(axes):
        raise _fail(node, f"pads {pads} must hold 2 values per axis of {list(axes)}")
    width = [(0, 0)] * x.ndim
    for i, axis in enumerate(axes):
        width[axis] = (pads[i], pads[i + len(axes)])
    x = x[tuple(slice(max(-b, 0), d - max(-e, 0)) for (b, e), d in zip(width, x.shape))]
    width = [(max(b, 0), max(e, 0)) for b, e in width]
    check_size(node, tuple(d + b + e for (b, e), d in zip(width, x.shape)), x.dtype)
    if mode != "constant":
        if any(d == 0 and (b or e) for (b, e), d in zip(width, x.shape)):
            raise _fail(node, f"mode {mode} cannot pad an empty axis of {list(x.shape)}")
        return [np.pad(x, width, mode=mode)]
    value = _arg(inputs, 2)
    return [np.pad(x, width, constant_values=0 if value is None or not value.size else value.reshape(-1)[0])]


# ---- Resize ----------------------------------------------------------------------------------------------------------

RESIZE_TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                     "tf_crop_and_resize", "tf_half_pixel_for_nn")
NEAREST: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "round_prefer_floor": lambda x: np.ceil(x - 0.5), "round_prefer_ceil": lambda x: np.floor(x + 0.5),
    "floor": np.floor, "ceil": np.ceil}


def _source_coordinates(transform: str, size: int, length: int, scale: float, roi: tuple[float, float]
                        ) -> np.ndarray:
    """``x_original`` of output positions ``0 .. size - 1`` along an axis of ``length`` (ONNX
    coordinate_transformation_mode). ``length_resized`` is the integer output size (as in ONNX Runtime; ONNX's
    reference uses ``scale * length`` for align_corners), and pytorch_half_pixel maps a size-1 output to 0."""
    x = np.arange(size, dtype=np.float64)
    if transform in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
        if transform == "pytorch_half_pixel" and size <= 1:
            return np.zeros(size)
        offset = length / 2 * (1 - size / (scale * length)) if transform == "half_pixel_symmetric" else 0.0
        return offset + (x + 0.5) / scale - 0.5
    if transform == "align_corners":
        return x * (length - 1) / (size - 1) if size > 1 else np.zeros(size)
    if transform == "asymmetric":
        return x / scale
    if transform == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    start, end = roi  # tf_crop_and_resize
    if size > 1:
        return start * (length - 1) + x * (end - start) * (length - 1) / (size - 1)
    return np.full(size, 0.5 * (start + end) * (length - 1))


def _keys(a: float) -> Callable[[np.ndarray], np.ndarray]:
    """Keys' cubic convolution kernel with coefficient ``a``."""

    def kernel(d):
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    return kernel


def _resize_taps(node: Node, coordinates: np.ndarray, length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output position, the input indices ``[size, taps]`` (edge-clamped) and weights ``[size, taps]`` of
    linear (taps 2) or cubic (4) interpolation; with ``antialias`` and ``scale < 1`` the kernel is stretched by
    ``1 / scale`` (more taps) and the weights renormalized. Taps start left of ``x``: at ``ceil(x) - 1``, so a whole
    ``x`` weighs its right neighbour 1, as ONNX's reference does."""
    mode = attr(node, "mode", "nearest")
    kernel, radius = (lambda d: np.maximum(1 - np.abs(d), 0.0), 1) if mode == "linear" else \
        (_keys(float(attr(node, "cubic_coeff_a", -0.75))), 2)
    stretch = min(scale, 1.0) if attr(node, "antialias", 0) else 1.0
    first = math.floor(-radius / stretch) + 1
    offsets = np.arange(first, 2 - first)
    left = np.ceil(coordinates) - 1
    weights = kernel((offsets - (coordinates - left)[:, None]) * stretch)
    indices = left.astype(np.int64)[:, None] + offsets
    if attr(node, "exclude_outside", 0):
        weights[(indices < 0) | (indices >= length)] = 0.0
    if stretch != 1.0 or attr(node, "exclude_outside", 0):
        total = weights.sum(axis=1, keepdims=True)
        weights /= np.where(total == 0, 1.0, total)
    return np.clip(indices, 0, length - 1), weights


def _resize_axis(node: Node, y: np.ndarray, axis: int, size: int, scale: float, roi: tuple[float, float]
                 ) -> np.ndarray:
    """``y`` resized along one axis (Resize is separable)."""
    length, mode = y.shape[axis], attr(node, "mode", "nearest")
    transform = attr(node, "coordinate_transformation_mode", "half_pixel")
    coordinates = _source_coordinates(transform, size, length, scale, roi)
    if mode == "nearest":
        rounding = NEAREST[_choice(node, "nearest_mode", "round_prefer_floor", NEAREST)]
        out = np.take(y, np.clip(rounding(coordinates), 0, length - 1).astype(np.intp), axis=axis)
    else:
        indices, weights = _resize_taps(node, coordinates, length, scale)
        shape = [1] * y.ndim
        shape[axis] = size
        out = None
        for tap in range(indices.shape[1]):
            term = np.take(y, indices[:, tap], axis=axis)
            term *= weights[:, tap].astype(y.dtype).reshape(shape)
            out = term if out is None else np.add(out, term, out=out)
    if transform == "tf_crop_and_resize":
        shape = [1] * y.ndim
        shape[axis] = size
        outside = ((coordinates < 0) | (coordinates > length - 1)).reshape(shape)
        out = np.where(outside, np.asarray(attr(node, "extrapolation_value", 0.0)).astype(y.dtype), out)
    return out


@evaluator("Resize", shape_inputs=(2, 3))
def _resize(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` resized over ``axes`` (opset 18; default all) to ``sizes`` (``keep_aspect_ratio_policy`` stretch /
    not_larger / not_smaller: one scale ``min`` / ``max(sizes / shape)``, sizes ``round(scale * shape)``) or to
    ``floor(shape * scales)``, sampling input coordinate ``x_original(x)`` (see :func:`_source_coordinates`) by
    ``mode``: nearest (``nearest_mode`` rounding, clamped), linear or cubic (:func:`_resize_taps`, separable over
    the axes, edge-clamped). tf_crop_and_resize puts ``extrapolation_value`` where ``x_original`` is outside
    ``[0, length - 1]``. Linear / cubic integer outputs are rounded half to even and saturated."""
    x = inputs[0]
    mode = _choice(node, "mode", "nearest", ("nearest", "linear", "cubic"))
    transform = _choice(node, "coordinate_transformation_mode", "half_pixel", RESIZE_TRANSFORMS)
    axes = _axes(node, attr(node, "axes", range(x.ndim)), x.ndim)
    roi, scales, sizes = (v if v is not None and v.size else None for v in (_arg(inputs, i) for i in (1, 2, 3)))
    if (scales is None) == (sizes is None):
        raise _fail(node, "exactly one of scales and sizes must be given")
    lengths = [x.shape[a] for a in axes]
    if sizes is not None:
        sizes = _ints(sizes)
        if len(sizes) != len(axes) or min(sizes) < 0 or 0 in lengths:
            raise _fail(node, f"sizes {sizes} must be {len(axes)} sizes >= 0 of non-empty axes {lengths}")
        factors = [s / n for s, n in zip(sizes, lengths)]
        policy = _choice(node, "keep_aspect_ratio_policy", "stretch", ("stretch", "not_larger", "not_smaller"))
        if policy != "stretch":
            scale = (min if policy == "not_larger" else max)(factors)
            factors, sizes = [scale] * len(axes), [int(scale * n + 0.5) for n in lengths]
    else:
        factors = [float(s) for s in scales.reshape(-1)]
        if len(factors) != len(axes) or min(factors) <= 0:
            raise _fail(node, f"scales {factors} must be {len(axes)} positive factors")
        sizes = [math.floor(n * s) for n, s in zip(lengths, factors)]
    shape = list(x.shape)
    for axis, size in zip(axes, sizes):
        shape[axis] = size
    check_size(node, tuple(shape), np.float64 if x.dtype.kind in "iu" and mode != "nearest" else x.dtype)
    if transform == "tf_crop_and_resize":
        if roi is None or roi.size != 2 * len(axes):
            raise _fail(node, f"tf_crop_and_resize needs a roi of {2 * len(axes)} values")
        bounds = [(float(b), float(e)) for b, e in zip(roi.reshape(-1)[:len(axes)], roi.reshape(-1)[len(axes):])]
    else:
        bounds = [(0.0, 1.0)] * len(axes)
    # linear / cubic: in the float type of x (float32 for float16 ...), in float64 for integers (as exact .5 cases)
    work = _float_type(x) if x.dtype.kind == "f" else np.dtype(np.float64)
    y = x if mode == "nearest" else x.astype(work, copy=False)
    for axis, size, scale, roi_axis in zip(axes, sizes, factors, bounds):
        if not (scale == 1.0 and size == y.shape[axis] and transform != "tf_crop_and_resize"):
            y = _resize_axis(node, y, axis, size, scale, roi_axis)
    if y.dtype == x.dtype:
        return [y]
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        return [np.clip(np.rint(y), info.min, info.max).astype(x.dtype)]
    return [y.astype(x.dtype)]


# ---- types -----------------------------------------------------------------------------------------------------------

#: ONNX TensorProto data types -> NumPy dtypes (the ml_dtypes names are looked up when used: optional package).
TENSOR_TYPES: dict[int, Any] = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
                                7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32,
                                13: np.uint64, 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz",
                                19: "float8_e5m2", 20: "float8_e5m2fnuz", 23: "float4_e2m1fn"}
#: uint4 / int4, stored unpacked one per byte: (lowest value, storage dtype).
SUB_BYTE_TYPES = {21: (0, np.uint8), 22: (-8, np.int8)}


def _dtype_of(node: Node, to: int) -> np.dtype:
    """The NumPy dtype of ONNX type ``to``."""
    if to not in TENSOR_TYPES:
        raise _fail(node, f"attribute to = {to} is not a numeric ONNX type supported here; supported: "
                          f"{sorted([*TENSOR_TYPES, *SUB_BYTE_TYPES])}")
    dtype = TENSOR_TYPES[to]
    if isinstance(dtype, str):
        import ml_dtypes  # only for these types: lowbit itself does not depend on it

        dtype = getattr(ml_dtypes, dtype)
    return np.dtype(dtype)


def _cast(x: np.ndarray, dtype: np.dtype, saturate: bool) -> np.ndarray:
    """``x`` as ``dtype`` as ONNX Cast does: float to integer truncates toward zero, integer to integer wraps,
    floats round to nearest even, and with ``saturate`` a float8 target clamps to its largest finite value
    (infinities included, as ONNX's reference and ONNX Runtime do for every float8 type)."""
    if saturate and dtype.name.startswith("float8") and x.dtype.kind == "f":
        import ml_dtypes

        top = float(ml_dtypes.finfo(dtype).max)
        x = np.clip(x, -top, top)
    return x.astype(dtype)


def _cast_sub_byte(x: np.ndarray, to: int) -> np.ndarray:
    """``x`` as ONNX uint4 / int4 codes, one per byte: truncated toward zero, then wrapped to 4 bits."""
    low, storage = SUB_BYTE_TYPES[to]
    codes = (np.trunc(x) if x.dtype.kind == "f" else x).astype(np.int64)
    return ((codes - low) % 16 + low).astype(storage)


@evaluator("Cast")
def _cast_op(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` as ONNX type ``to`` (:func:`_cast`; uint4 / int4 as wrapped codes in uint8 / int8); ``saturate``
    (opset 19, default 1) applies to float8 targets."""
    to = int(attr(node, "to", 0))
    if to in SUB_BYTE_TYPES:
        return [_cast_sub_byte(inputs[0], to)]
    return [_cast(inputs[0], _dtype_of(node, to), bool(attr(node, "saturate", 1)))]


@evaluator("CastLike")
def _cast_like(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x`` as the dtype of ``target_type`` (as Cast)."""
    return [_cast(inputs[0], inputs[1].dtype, bool(attr(node, "saturate", 1)))]


# ---- elementwise -----------------------------------------------------------------------------------------------------

def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b``; integers truncate toward zero (as C), not toward minus infinity as ``//`` does."""
    if a.dtype.kind not in "iu":
        return np.divide(a, b)
    quotient = np.floor_divide(a, b)
    if a.dtype.kind == "i":
        quotient += ((np.remainder(a, b) != 0) & ((a < 0) != (b < 0))).astype(a.dtype)
    return quotient


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a ^ b`` in ``a``'s dtype: an integer base meets a float or negative exponent in float64, then truncates."""
    if a.dtype.kind == "f":
        return np.power(a, b.astype(a.dtype, copy=False))
    if b.dtype.kind in "iu" and not (b < 0).any():
        return np.power(a, b.astype(a.dtype, copy=False))
    return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)


BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _divide,
    "Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
}


@evaluator(*BINARY)
def _binary(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """With broadcasting: Add ``a + b``, Sub ``a - b``, Mul ``a b``, Div ``a / b`` (integers truncate toward zero);
    Equal / Less / LessOrEqual / Greater / GreaterOrEqual (bool); And / Or / Xor of bools."""
    a, b = inputs[0], inputs[1]
    _same_type(node, a, b)
    return [BINARY[node.op](a, b)]


@evaluator("Pow")
def _pow_op(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``a ^ b`` with broadcasting, in the base's dtype (:func:`_pow`)."""
    return [_pow(inputs[0], inputs[1])]


@evaluator("Mod")
def _mod(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``a mod b``: the remainder takes the divisor's sign (integers), or with ``fmod=1`` the dividend's (C fmod,
    required for floats)."""
    a, b = inputs[0], inputs[1]
    _same_type(node, a, b)
    if attr(node, "fmod", 0):
        return [np.fmod(a, b)]
    if a.dtype.kind == "f":
        raise _fail(node, "fmod must be 1 for floating-point inputs")
    return [np.mod(a, b)]


VARIADIC: dict[str, np.ufunc] = {"Sum": np.add, "Mean": np.add, "Min": np.minimum, "Max": np.maximum}


@evaluator(*VARIADIC)
def _variadic(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Elementwise over all inputs, broadcast: Sum, Mean ``Sum / n``, Min, Max."""
    xs = [x for x in inputs if x is not None]
    _same_type(node, *xs)
    y = reduce(VARIADIC[node.op], xs[1:], xs[0])
    return [np.divide(y, len(xs)).astype(y.dtype, copy=False) if node.op == "Mean" else y]


UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Identity": lambda x: x, "Neg": np.negative, "Abs": np.abs, "Sign": np.sign, "Reciprocal": np.reciprocal,
    "Floor": np.floor, "Ceil": np.ceil, "Round": np.rint, "Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log,
    "Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin, "Acos": np.arccos, "Atan": np.arctan,
    "Sinh": np.sinh, "Cosh": np.cosh, "Asinh": np.arcsinh, "Acosh": np.arccosh, "Atanh": np.arctanh,
    "Tanh": np.tanh, "Not": np.logical_not, "IsNaN": np.isnan, "Erf": erf,
}


@evaluator(*UNARY)
def _unary(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Elementwise: Identity, Neg ``-x``, Abs, Sign, Reciprocal ``1 / x``, Floor, Ceil, Round (half to even), Sqrt,
    Exp, Log, the trigonometric and hyperbolic functions and their inverses, Tanh, Not, IsNaN, Erf (:func:`erf`)."""
    return [UNARY[node.op](inputs[0])]


@evaluator("IsInf")
def _is_inf(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x == +inf`` (unless ``detect_positive=0``) or ``x == -inf`` (unless ``detect_negative=0``)."""
    x = inputs[0]
    return [(np.isposinf(x) & bool(attr(node, "detect_positive", 1)))
            | (np.isneginf(x) & bool(attr(node, "detect_negative", 1)))]


@evaluator("Where")
def _where(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``condition ? x : y`` with broadcasting."""
    _same_type(node, inputs[1], inputs[2])
    return [np.where(inputs[0], inputs[1], inputs[2])]


@evaluator("Clip")
def _clip(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``min(max(x, min), max)``: bounds are attributes before opset 11, optional inputs from 11."""
    x = inputs[0]
    if opset < 11:
        low, high = attr(node, "min", None), attr(node, "max", None)
    else:
        low, high = (None if v is None else np.asarray(v).reshape(()) for v in (_arg(inputs, 1), _arg(inputs, 2)))
        _same_type(node, x, low, high)
    if low is not None:
        x = np.maximum(x, low)
    return [x if high is None else np.minimum(x, high)]


@evaluator("Dropout")
def _dropout(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Inference: ``output = data``, and the optional ``mask`` all true; training mode (input 2) is refused."""
    training = _arg(inputs, 2)
    if training is not None and _scalar(node, training, "training_mode"):
        raise _fail(node, "training_mode is true: only inference Dropout is supported")
    x = inputs[0]
    return [x, np.ones(x.shape, np.bool_)][:len(node.outputs)]


# ---- activations -----------------------------------------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    y = np.empty_like(x)
    _sigmoid_into(x, y)
    return y


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(x, 0).astype(x.dtype, copy=False)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (erf(x * (1 / math.sqrt(2.0))) + 1)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)) + 1)


ACTIVATIONS: dict[str, Callable[[Node, np.ndarray], np.ndarray]] = {
    "Relu": lambda node, x: np.maximum(x, 0),
    "LeakyRelu": lambda node, x: np.where(x < 0, x * attr(node, "alpha", 0.01), x),
    "Elu": lambda node, x: np.where(x < 0, attr(node, "alpha", 1.0) * np.expm1(x), x),
    "Selu": lambda node, x: attr(node, "gamma", 1.05070102214813232421875)
    * np.where(x > 0, x, attr(node, "alpha", 1.67326319217681884765625) * np.expm1(x)),
    "Celu": lambda node, x: np.maximum(x, 0)
    + np.minimum(0, attr(node, "alpha", 1.0) * np.expm1(x / attr(node, "alpha", 1.0))),
    "ThresholdedRelu": lambda node, x: np.where(x > attr(node, "alpha", 1.0), x, 0),
    "Sigmoid": lambda node, x: _sigmoid(x),
    "HardSigmoid": lambda node, x: np.clip(x * attr(node, "alpha", 0.2) + attr(node, "beta", 0.5), 0, 1),
    "HardSwish": lambda node, x: x * np.clip(x * (1 / 6) + 0.5, 0, 1),
    "Softplus": lambda node, x: _softplus(x),
    "Softsign": lambda node, x: x / (1 + np.abs(x)),
    "Mish": lambda node, x: x * np.tanh(_softplus(x)),
    "Gelu": lambda node, x: (_gelu_tanh if _choice(node, "approximate", "none", ("none", "tanh")) == "tanh"
                             else _gelu_erf)(x),
    "com.microsoft.Gelu": lambda node, x: _gelu_erf(x),
    "com.microsoft.QuickGelu": lambda node, x: x * _sigmoid(x * attr(node, "alpha", 1.702)),
}


@evaluator(*ACTIVATIONS)
def _activation(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Relu ``max(x, 0)``; LeakyRelu ``x < 0 ? alpha x : x`` (alpha 0.01); Elu ``x < 0 ? alpha (e^x - 1) : x``;
    Selu ``gamma (x > 0 ? x : alpha (e^x - 1))``; Celu ``max(0, x) + min(0, alpha (e^(x / alpha) - 1))``;
    ThresholdedRelu ``x > alpha ? x : 0``; Sigmoid ``1 / (1 + e^-x)``; HardSigmoid ``clip(alpha x + beta, 0, 1)``
    (0.2, 0.5); HardSwish ``x clip(x / 6 + 1 / 2, 0, 1)``; Softplus ``log(1 + e^x)``; Softsign ``x / (1 + |x|)``;
    Mish ``x tanh(softplus(x))``; Gelu (opset 20) ``x / 2 (1 + erf(x / sqrt 2))`` or, approximate="tanh",
    ``x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``; com.microsoft Gelu (erf form), QuickGelu
    ``x sigmoid(alpha x)`` (alpha 1.702)."""
    return [ACTIVATIONS[node.op](node, inputs[0])]


@evaluator("PRelu")
def _prelu(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``x < 0 ? slope x : x``, ``slope`` broadcast to ``x``'s shape (one way)."""
    x, slope = inputs[0], inputs[1]
    _same_type(node, x, slope)
    if np.broadcast_shapes(x.shape, slope.shape) != x.shape:
        raise _fail(node, f"slope {list(slope.shape)} does not broadcast to x {list(x.shape)}")
    return [np.where(x < 0, x * slope, x)]


@evaluator("com.microsoft.FastGelu", "com.microsoft.BiasGelu")
def _bias_gelu(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``gelu(x + bias)``: FastGelu in the tanh form (bias optional), BiasGelu in the erf form."""
    x, bias = inputs[0], _arg(inputs, 1)
    _same_type(node, x, bias)
    x = x if bias is None else x + bias
    return [_gelu_tanh(x) if node.op.endswith("FastGelu") else _gelu_erf(x)]


@evaluator("lowbit.Attention", shape_inputs=(1, 3, 5))
def _attention(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """lowbit's attention block (:mod:`lowbit.runtime.transformer_fusion`) as the ONNX ops it stands for::

        qh = Transpose(Reshape(q, q_shape), [0, 2, 1, 3]);  kt = Transpose(Reshape(k, k_shape), [0, 2, 3, 1])
        vh = Transpose(Reshape(v, v_shape), [0, 2, 1, 3])
        y = Transpose(MatMul(Softmax(scale * MatMul(qh, kt) + mask), vh), [0, 2, 1, 3])
    """
    (q, q_shape, k, k_shape, v, v_shape, mask), scale = inputs, attr(node, "scale", 1.0)
    qh, kt, vh = (_reshape(node, [x, shape], opset)[0].transpose(perm) for x, shape, perm in
                  ((q, q_shape, (0, 2, 1, 3)), (k, k_shape, (0, 2, 3, 1)), (v, v_shape, (0, 2, 1, 3))))
    return [np.ascontiguousarray(_attend(qh, kt, vh, scale, mask).transpose(0, 2, 1, 3))]


def _attend(qh: np.ndarray, kt: np.ndarray, vh: np.ndarray, scale: float, mask: np.ndarray) -> np.ndarray:
    """``softmax(scale qh kt + mask) vh`` over the last axis, in the inputs' float type (batched matmuls)."""
    scores = np.matmul(qh, kt) * np.asarray(scale, qh.dtype) + mask
    scores = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    scores /= np.sum(scores, axis=-1, keepdims=True)
    return np.matmul(scores, vh)


def multi_head_attention_parts(node: Node, shapes: list[tuple[int, ...] | None]) -> tuple[int, float]:
    """``(heads, scale)`` of a com.microsoft.MultiHeadAttention whose input shapes are ``shapes`` (None: absent),
    after checking that it is a case lowbit runs: query, key and value ``[B, S, H D]``, ``[B, L, H D]``,
    ``[B, L, H Dv]``; optional bias ``[2 H D + H Dv]``, key_padding_mask ``[B, L]`` and attention_bias
    ``[B or 1, H or 1, S, L]``; no past key / value, not unidirectional, one output."""
    shapes = [None if x is None else tuple(x) for x in (list(shapes) + [None] * 8)[:8]]
    heads = int(attr(node, "num_heads", 0))
    q, k, v, bias, padding, _, past_key, past_value = shapes
    if heads < 1:
        raise _fail(node, f"num_heads must be >= 1, got {heads}")
    if q is None or k is None or v is None or len(q) != 3 or len(k) != 3 or len(v) != 3:
        raise _fail(node, "lowbit runs MultiHeadAttention on separate 3-D query, key and value [B, S, hidden] only "
                          f"(packed or per-head layouts are not supported), got {q}, {k}, {v}")
    if past_key is not None or past_value is not None or len(node.outputs) > 1 or attr(node, "unidirectional", 0):
        raise _fail(node, "past key / value, present outputs and unidirectional (decoding with a cache) are not "
                          "supported")
    if q[0] != k[0] or k[:2] != v[:2] or q[2] != k[2] or q[2] % heads or v[2] % heads:
        raise _fail(node, f"query {q}, key {k} and value {v} do not make {heads} heads")
    if bias is not None and tuple(bias) != (2 * q[2] + v[2],):
        raise _fail(node, f"bias must be [{2 * q[2] + v[2]}] (query, key and value biases), got {bias}")
    if padding is not None and tuple(padding) != (k[0], k[1]):
        raise _fail(node, f"key_padding_mask: lowbit takes the [batch, key length] = {[k[0], k[1]]} form only, "
                          f"got {padding}")
    return heads, float(attr(node, "scale", 0.0)) or 1.0 / math.sqrt(q[2] // heads)


@evaluator("com.microsoft.MultiHeadAttention")
def _multi_head_attention(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """ONNX Runtime's MultiHeadAttention in the cases :func:`multi_head_attention_parts` accepts:
    ``softmax(scale (q + bq)(k + bk)' + padding + attention_bias) (v + bv)`` per head, where ``padding`` is
    ``mask_filter_value`` (default -10000) at the keys whose key_padding_mask is 0."""
    inputs = (list(inputs) + [None] * 8)[:8]
    heads, scale = multi_head_attention_parts(node, [None if x is None else x.shape for x in inputs])
    q, k, v, bias, padding, attention_bias = inputs[:6]
    if bias is not None:
        width = q.shape[2]
        q, k, v = q + bias[:width], k + bias[width:2 * width], v + bias[2 * width:]
    mask = np.zeros((), q.dtype) if attention_bias is None else attention_bias
    if padding is not None:
        filler = np.asarray(attr(node, "mask_filter_value", -10000.0), q.dtype)
        mask = mask + np.where(padding == 0, filler, np.zeros((), q.dtype))[:, None, None, :]
    (b, length, _), s = k.shape, q.shape[1]
    qh, kt, vh = (x.reshape(b, n, heads, -1).transpose(perm) for x, n, perm in
                  ((q, s, (0, 2, 1, 3)), (k, length, (0, 2, 3, 1)), (v, length, (0, 2, 1, 3))))
    return [np.ascontiguousarray(_attend(qh, kt, vh, scale, mask).transpose(0, 2, 1, 3)).reshape(b, s, -1)]


@evaluator("lowbit.Linear")
def _linear(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """lowbit's MatMul with its bias (:mod:`lowbit.runtime.transformer_fusion`): ``x @ W + b``."""
    x, w, b = inputs
    return [np.matmul(x, w) + b]


@evaluator("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Along ``axis``: Softmax ``e^(x - max) / sum e^(x - max)``, LogSoftmax ``x - max - log sum e^(x - max)``,
    Hardmax (1 at the first maximum, else 0). Before opset 13 ``axis`` (default 1) splits ``x`` into a matrix
    ``[prod(shape[:axis]), prod(shape[axis:])]`` computed along its rows; from 13 it is one axis (default -1)."""
    x = inputs[0]
    if opset < 13:
        split = _axis(node, attr(node, "axis", 1), x.ndim)
        y, axis = x.reshape(_product(x.shape[:split]), _product(x.shape[split:])), 1
    else:
        y, axis = x, _axis(node, attr(node, "axis", -1), x.ndim)
    if node.op == "Hardmax":
        out = np.zeros_like(y)
        np.put_along_axis(out, np.expand_dims(np.argmax(y, axis=axis), axis), 1, axis=axis)
    else:
        shifted = y - np.max(y, axis=axis, keepdims=True)
        total = np.sum(np.exp(shifted), axis=axis, keepdims=True)
        out = shifted - np.log(total) if node.op == "LogSoftmax" else np.exp(shifted) / total
    return [out.reshape(x.shape)]


# ---- reductions ------------------------------------------------------------------------------------------------------

def _lowest(dtype: np.dtype, highest: bool = False):
    """The identity of max (``highest``: of min) over ``dtype``: -inf / the smallest integer / False."""
    if dtype.kind == "f":
        return np.inf if highest else -np.inf
    if dtype.kind == "b":
        return highest
    info = np.iinfo(dtype)
    return info.max if highest else info.min


def _log_sum_exp(x: np.ndarray, axes, keepdims: bool) -> np.ndarray:
    top = np.max(x, axis=axes, keepdims=True, initial=_lowest(x.dtype))
    top = np.where(np.isfinite(top), top, 0).astype(x.dtype)
    y = np.log(np.sum(np.exp(x - top), axis=axes, keepdims=True)) + top
    return y if keepdims else np.squeeze(y, axis=axes)


#: op -> (reduction(x, axes, keepdims), the opset from which ``axes`` is an input rather than an attribute)
REDUCTIONS: dict[str, tuple[Callable[[np.ndarray, Any, bool], np.ndarray], int]] = {
    "ReduceSum": (lambda x, a, k: np.sum(x, axis=a, keepdims=k, dtype=x.dtype), 13),
    "ReduceMean": (lambda x, a, k: np.mean(x, axis=a, keepdims=k, dtype=None if x.dtype.kind == "f" else np.float64),
                   18),
    "ReduceMax": (lambda x, a, k: np.max(x, axis=a, keepdims=k, initial=_lowest(x.dtype)), 18),
    "ReduceMin": (lambda x, a, k: np.min(x, axis=a, keepdims=k, initial=_lowest(x.dtype, True)), 18),
    "ReduceProd": (lambda x, a, k: np.prod(x, axis=a, keepdims=k, dtype=x.dtype), 18),
    "ReduceL1": (lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k, dtype=x.dtype), 18),
    "ReduceL2": (lambda x, a, k: np.sqrt(np.sum(np.square(x), axis=a, keepdims=k, dtype=_float_type(x))), 18),
    "ReduceSumSquare": (lambda x, a, k: np.sum(np.square(x), axis=a, keepdims=k, dtype=x.dtype), 18),
    "ReduceLogSum": (lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k, dtype=_float_type(x))), 18),
    "ReduceLogSumExp": (lambda x, a, k: _log_sum_exp(x.astype(_float_type(x), copy=False), a, k), 18),
}


@evaluator(*REDUCTIONS, shape_inputs=(1,))
def _reduce(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Over ``axes`` (attribute, or input 1 from opset 13 for ReduceSum and 18 for the others; none: all axes, or
    with ``noop_with_empty_axes`` none at all), keeping them as size 1 when ``keepdims`` (default 1): ReduceSum,
    ReduceMean, ReduceMax / ReduceMin (an empty set gives -inf / +inf), ReduceProd, ReduceL1 ``sum |x|``,
    ReduceL2 ``sqrt sum x^2``, ReduceSumSquare ``sum x^2``, ReduceLogSum ``log sum x``, ReduceLogSumExp
    ``log sum e^x``. Integer results are truncated back to the input's dtype."""
    x = inputs[0]
    fn, since = REDUCTIONS[node.op]
    axes = _attr_or_input(node, inputs, opset, "axes", 1, since)
    if axes is None or not np.size(axes):
        if opset >= since and attr(node, "noop_with_empty_axes", 0):
            return [x]
        axes = tuple(range(x.ndim))
    y = fn(x, _axes(node, _ints(axes), x.ndim), bool(attr(node, "keepdims", 1)))
    return [np.asarray(y).astype(x.dtype, copy=False)]


@evaluator("ArgMax", "ArgMin")
def _arg_extreme(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """int64 index of the first (``select_last_index``: last) maximum / minimum along ``axis`` (default 0),
    kept as size 1 when ``keepdims`` (default 1)."""
    x = inputs[0]
    axis = _axis(node, attr(node, "axis", 0), x.ndim)
    fn = np.argmax if node.op == "ArgMax" else np.argmin
    if attr(node, "select_last_index", 0):
        y = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis, keepdims=True)
    else:
        y = fn(x, axis=axis, keepdims=True)
    return [(y if attr(node, "keepdims", 1) else np.squeeze(y, axis)).astype(np.int64)]


@evaluator("CumSum")
def _cumsum(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Running sum along ``axis`` (input 1, read at each call: it does not change the shape); ``exclusive`` leaves
    each element out of its own sum, ``reverse`` sums from the end."""
    x = inputs[0]
    axis = _axis(node, int(_scalar(node, inputs[1], "axis")), x.ndim)
    reverse = bool(attr(node, "reverse", 0))
    y = np.cumsum(np.flip(x, axis) if reverse else x, axis=axis, dtype=x.dtype)
    if attr(node, "exclusive", 0):
        shifted = np.zeros_like(y)
        head, tail = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        head[axis], tail[axis] = slice(1, None), slice(None, -1)
        shifted[tuple(head)] = y[tuple(tail)]
        y = shifted
    return [np.flip(y, axis) if reverse else y]


@evaluator("TopK", shape_inputs=(1,))
def _top_k(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """The ``K`` largest (``largest=0``: smallest) values along ``axis`` (default -1), sorted, and their int64
    indices; equal values keep index order."""
    x = inputs[0]
    axis = _axis(node, attr(node, "axis", -1), x.ndim)
    k, dim = int(_scalar(node, inputs[1], "K")), x.shape[axis]
    if not 0 <= k <= dim:
        raise _fail(node, f"K = {k} is out of range [0, {dim}] for axis {axis}")
    if attr(node, "largest", 1):
        # a stable ascending sort of the reversed axis, read backwards: descending, equal values by index
        order = dim - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, indices, axis=axis), indices.astype(np.int64)]


@evaluator("OneHot", shape_inputs=(1,))
def _one_hot(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``values[1]`` where ``indices`` (negative ones count from ``depth``) equals the position along a new axis
    ``axis`` (default -1) of size ``depth``, ``values[0]`` elsewhere (out-of-range indices: all off)."""
    indices, values = inputs[0], inputs[2]
    depth = int(_scalar(node, inputs[1], "depth"))
    if values.size != 2 or depth < 1:
        raise _fail(node, f"values must be [off, on] and depth >= 1, got {values.size} values, depth {depth}")
    axis = _axis(node, attr(node, "axis", -1), indices.ndim + 1)
    check_size(node, (*indices.shape, depth), values.dtype)
    idx = np.trunc(indices).astype(np.int64) if indices.dtype.kind == "f" else indices.astype(np.int64)
    idx = np.expand_dims(np.where(idx < 0, idx + depth, idx), axis)
    shape = [1] * (indices.ndim + 1)
    shape[axis] = depth
    off, on = values.reshape(-1)
    return [np.where(idx == np.arange(depth).reshape(shape), on, off)]


@evaluator("Trilu")
def _trilu(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """The upper (``upper=1``, default) or lower triangle of the last two axes from diagonal ``k`` (input 1,
    default 0), zeros elsewhere."""
    k = int(_scalar(node, inputs[1], "k")) if _arg(inputs, 1) is not None else 0
    return [(np.triu if attr(node, "upper", 1) else np.tril)(inputs[0], k)]


@evaluator("ScatterND")
def _scatter_nd(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """A copy of ``data`` with ``data[indices[i..]] = updates[i..]`` (``reduction`` none; add / mul from opset 16,
    max / min from 18, combine instead)."""
    data, indices, updates = inputs
    _same_type(node, data, updates)
    reduction = _choice(node, "reduction", "none", ("none", "add", "mul", "max", "min"))
    if indices.shape[-1] > data.ndim or updates.shape != indices.shape[:-1] + data.shape[indices.shape[-1]:]:
        raise _fail(node, f"indices {list(indices.shape)} and updates {list(updates.shape)} do not fit data "
                          f"{list(data.shape)}")
    y, index = data.copy(), tuple(np.moveaxis(indices.astype(np.intp), -1, 0))
    if reduction == "none":
        y[index] = updates
    else:
        {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction].at(y, index, updates)
    return [y]


# ---- matrix products -------------------------------------------------------------------------------------------------

@evaluator("MatMul")
def _matmul(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``a @ b`` (numpy.matmul: batch axes broadcast, 1-D operands promoted then dropped)."""
    _same_type(node, inputs[0], inputs[1])
    return [np.matmul(inputs[0], inputs[1])]


@evaluator("Gemm")
def _gemm(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``alpha A' B' + beta C`` (``A' = A.T`` if transA, ``B' = B.T`` if transB; C optional, broadcast to the
    output)."""
    a, b, c = inputs[0], inputs[1], _arg(inputs, 2)
    _same_type(node, a, b, c)
    if a.ndim != 2 or b.ndim != 2:
        raise _fail(node, f"A and B must be 2-D, got {list(a.shape)} and {list(b.shape)}")
    y = np.matmul(a.T if attr(node, "transA", 0) else a, b.T if attr(node, "transB", 0) else b)
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        if np.broadcast_shapes(c.shape, y.shape) != y.shape:
            raise _fail(node, f"C {list(c.shape)} does not broadcast to the output {list(y.shape)}")
        y = y + (c if beta == 1.0 else c * beta)
    return [y.astype(a.dtype, copy=False)]


@evaluator("Einsum")
def _einsum(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """numpy.einsum of the inputs by ``equation`` (ONNX's subscripts are NumPy's)."""
    _same_type(node, *inputs)
    return [np.einsum(str(attr(node, "equation", "")).replace(" ", ""), *inputs)]


@evaluator("com.microsoft.FusedMatMul")
def _fused_matmul(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``alpha A' @ B'`` (ONNX Runtime): transBatchA moves A's first axis behind the other batch axes
    (``[b0, b1.., m, k] -> [b1.., b0, m, k]``), then transA swaps the last two; likewise for B."""
    a, b = inputs[0], inputs[1]
    _same_type(node, a, b)

    def arranged(x, batch, last):
        if x.ndim < 2:
            return x
        perm = [*range(1, x.ndim - 1), 0, x.ndim - 1] if attr(node, batch, 0) else list(range(x.ndim))
        if attr(node, last, 0):
            perm[-2:] = perm[-1], perm[-2]
        return x.transpose(perm)

    y = np.matmul(arranged(a, "transBatchA", "transA"), arranged(b, "transBatchB", "transB"))
    alpha = attr(node, "alpha", 1.0)
    return [y if alpha == 1.0 else (y * alpha).astype(y.dtype, copy=False)]


# ---- normalization ---------------------------------------------------------------------------------------------------

def _standardize(x: np.ndarray, axes: tuple[int, ...], epsilon: float, centered: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``((x - mean) inv, mean, inv)`` over ``axes`` (kept), ``inv = 1 / sqrt(var + epsilon)``; not ``centered``
    (RMS): ``(x inv, None, inv)`` with ``inv = 1 / sqrt(mean x^2 + epsilon)``."""
    mean = np.mean(x, axis=axes, keepdims=True) if centered else None
    deviation = x - mean if centered else x
    inv = 1 / np.sqrt(np.mean(np.square(deviation), axis=axes, keepdims=True) + epsilon)
    return deviation * inv, mean, inv


@evaluator("LayerNormalization", "SimplifiedLayerNormalization", "com.microsoft.SimplifiedLayerNormalization",
           "RMSNormalization")
def _layer_norm(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Over axes ``axis..`` (default -1), computed in ``stash_type`` (default float32) and cast back:
    LayerNormalization ``(x - mean) / sqrt(var + eps) scale + B``, outputs Y, Mean, InvStdDev (axes kept as 1);
    SimplifiedLayerNormalization (ONNX Runtime's, default domain; also read as com.microsoft) and RMSNormalization
    (opset 23) ``x / sqrt(mean x^2 + eps) scale``, outputs Y and (Simplified only) inv_std_var."""
    x, scale, bias = inputs[0], inputs[1], _arg(inputs, 2) if node.op == "LayerNormalization" else None
    _same_type(node, x, scale, bias)
    axis = _axis(node, attr(node, "axis", -1), x.ndim)
    stash = _dtype_of(node, int(attr(node, "stash_type", 1)))
    normalized, mean, inv = _standardize(x.astype(stash, copy=False), tuple(range(axis, x.ndim)),
                                         float(attr(node, "epsilon", 1e-5)), node.op == "LayerNormalization")
    y = normalized.astype(x.dtype, copy=False) * scale
    outputs = [y if bias is None else y + bias]
    outputs += [mean, inv] if node.op == "LayerNormalization" else [inv]
    return outputs[:len(node.outputs)]


@evaluator("com.microsoft.SkipLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization")
def _skip_layer_norm(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``s = input + skip (+ bias)`` normalized over the last axis: SkipLayerNormalization
    ``(s - mean) / sqrt(var + eps) gamma (+ beta)``, SkipSimplifiedLayerNormalization ``s / sqrt(mean s^2 + eps)
    gamma`` (eps default 1e-12); outputs output, mean (not for the simplified form), inv_std_var (float32, shaped
    ``s`` with the last axis 1) and ``s``."""
    simplified = node.op.endswith("SkipSimplifiedLayerNormalization")
    x, skip, gamma = inputs[0], inputs[1], inputs[2]
    beta, bias = (None, _arg(inputs, 3)) if simplified else (_arg(inputs, 3), _arg(inputs, 4))
    _same_type(node, x, skip, gamma, beta, bias)
    if simplified and len(node.outputs) > 1 and node.outputs[1]:
        raise _fail(node, "output 1 (mean) is not defined for the simplified (RMS) form")
    total = x + skip if bias is None else x + skip + bias
    normalized, mean, inv = _standardize(total.astype(np.float32, copy=False), (total.ndim - 1,),
                                         float(attr(node, "epsilon", 1e-12)), not simplified)
    y = normalized.astype(x.dtype, copy=False) * gamma
    mean = np.zeros(0, np.float32) if simplified else mean  # a placeholder in the slot of the absent output
    return [y if beta is None else y + beta, mean, inv, total][:len(node.outputs)]


@evaluator("BatchNormalization")
def _batch_norm(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Inference: ``(x - mean) / sqrt(var + epsilon) scale + B`` per channel (axis 1); training mode is refused."""
    if attr(node, "training_mode", 0) or len([t for t in node.outputs if t]) > 1:
        raise _fail(node, "only inference batch normalization (one output, training_mode 0) is supported")
    x = inputs[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale, bias, mean, var = (v.reshape(shape) for v in inputs[1:5])
    return [((x - mean) / np.sqrt(var + attr(node, "epsilon", 1e-5)) * scale + bias).astype(x.dtype, copy=False)]


@evaluator("InstanceNormalization")
def _instance_norm(node: Node, inputs: list, opset: int) -> list[np.ndarray]:
    """``(x - mean) / sqrt(var + epsilon) scale + B`` with mean and var per sample and channel (axes 2..)."""
    x = inputs[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    normalized, _, _ = _standardize(x, tuple(range(2, x.ndim)), float(attr(node, "epsilon", 1e-5)))
    return [normalized * inputs[1].reshape(shape) + inputs[2].reshape(shape)]


# Every evaluated op without a dedicated preparer runs its evaluator (float_ops / quant_ops registered theirs above).
for _op in EVALUATORS:
    if _op not in PREPARERS:
        preparer(_op)(prepare_evaluated)
