"""Window geometry of ONNX's sliding-window ops: the one place that turns their attributes into output sizes.

Conv, ConvInteger, QLinearConv, MaxPool, AveragePool (and ConvTranspose, by its own rule) read
``kernel_shape``, ``strides``, ``dilations``, ``pads`` and ``auto_pad`` through these helpers, for any
number of spatial axes. Per axis of input size ``i``, kernel ``k``, stride ``s``, dilation ``d`` and pads
``p0`` (begin), ``p1`` (end)::

    o = floor_or_ceil((i + p0 + p1 - d (k - 1) - 1) / s) + 1

rounded down, or up with ``ceil_mode`` (pools), where a last window that would start past the input
and the begin padding is dropped (it would see only end padding), as ONNX's reference and PyTorch do.
``auto_pad`` SAME_UPPER / SAME_LOWER pad so that ``o = ceil(i / s)``, the odd unit of padding at the end
(UPPER) or the beginning (LOWER); VALID pads nothing. An explicit pad may not exceed both the window's
extent ``d (k - 1) + 1`` and the input's size: it would only add windows that see nothing but padding.
Pads are in ONNX order: all begins, then all ends.
:func:`window_view` then shows every window of a padded input without copying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lowbit.graph.ir import Node

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass(frozen=True)
class Window:
    """Geometry of a sliding window over ``len(out)`` spatial axes; ``pads`` are all begins, then all ends."""

    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    out: tuple[int, ...]


def _fail(node: Node, message: str) -> ValueError:
    return ValueError(f"node {node.name!r} ({node.op}): {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _ints(node: Node, name: str, length: int, default: int, minimum: int) -> tuple[int, ...]:
    """Attribute ``name``: ``length`` ints >= ``minimum`` (``default`` each when absent)."""
    value: Any = node.attrs.get(name)
    if value is None:
        return (default,) * length
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != length or not all(_is_int(v) for v in values):
        raise _fail(node, f"{name} must be {length} ints, got {value!r}")
    if any(v < minimum for v in values):
        raise _fail(node, f"{name} must be >= {minimum}, got {values}")
    return tuple(int(v) for v in values)


def kernel_shape(node: Node, spatial: int, weights: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """``kernel_shape``: ``spatial`` ints >= 1; with ``weights`` (the kernel's spatial dimensions) it may be
    absent and must agree with them when present."""
    if "kernel_shape" not in node.attrs:
        if weights is None:
            raise _fail(node, "attribute kernel_shape is required")
        return tuple(int(k) for k in weights)
    kernel = _ints(node, "kernel_shape", spatial, 1, 1)
    if weights is not None and kernel != tuple(weights):
        raise _fail(node, f"kernel_shape {list(kernel)} does not match the weights' spatial dimensions "
                          f"{list(weights)}")
    return kernel


def group(node: Node) -> int:
    """Attribute ``group``: an int >= 1 (default 1)."""
    value = node.attrs.get("group", 1)
    if not _is_int(value) or value < 1:
        raise _fail(node, f"group must be an int >= 1, got {value!r}")
    return int(value)


def _auto_pad(node: Node) -> str:
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in AUTO_PADS:
        raise _fail(node, f"auto_pad must be one of {AUTO_PADS}, got {auto_pad!r}")
    return auto_pad


def _split(total: int, upper: bool) -> tuple[int, int]:
    """``total`` padding as (begin, end); an odd unit at the end when ``upper``, else at the beginning."""
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


def window_geometry(node: Node, in_shape_spatial: tuple[int, ...], kernel_shape: tuple[int, ...], *,
                    ceil_mode: bool = False) -> Window:
    """Strides, dilations, pads and output sizes of ``node``'s window (see the module docstring) over an input
    of spatial sizes ``in_shape_spatial``, for a kernel of spatial sizes ``kernel_shape``."""
    n = len(in_shape_spatial)
    if len(kernel_shape) != n or any(k < 1 for k in kernel_shape):
        raise _fail(node, f"kernel_shape must be {n} ints >= 1 for {n} spatial axes, got {list(kernel_shape)}")
    strides = _ints(node, "strides", n, 1, 1)
    dilations = _ints(node, "dilations", n, 1, 1)
    auto_pad = _auto_pad(node)
    extents = [d * (k - 1) + 1 for d, k in zip(dilations, kernel_shape)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        split = [_split(max(0, (-(-i // s) - 1) * s + e - i), auto_pad == "SAME_UPPER")
                 for i, s, e in zip(in_shape_spatial, strides, extents)]
        pads = tuple(b for b, _ in split) + tuple(e for _, e in split)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * n)
    else:
        pads = _ints(node, "pads", 2 * n, 0, 0)
        # a pad wider than both the window and the input only adds outputs that read nothing but padding, and
        # lets a tiny file ask for gigabytes at run time (pads=4000 on an 8x8 image)
        sizes = tuple(in_shape_spatial) * 2
        if any(p >= e and p > i for p, e, i in zip(pads, extents + extents, sizes)):
            raise _fail(node, f"pads {list(pads)} exceed both the window's extent {extents} (dilation * (kernel - 1)"
                              f" + 1 per axis) and the input's size {list(in_shape_spatial)}: windows would lie "
                              f"wholly in the padding")
    out = []
    for axis, (i, s, e) in enumerate(zip(in_shape_spatial, strides, extents)):
        span = i + pads[axis] + pads[axis + n] - e
        if span < 0:
            raise _fail(node, f"window {list(kernel_shape)} (dilations {list(dilations)}) is larger than the "
                              f"padded input: spatial {list(in_shape_spatial)}, pads {list(pads)}")
        size = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (size - 1) * s >= i + pads[axis]:
            size -= 1
        out.append(size)
    return Window(strides, dilations, pads, tuple(out))


def window_view(padded: np.ndarray, kernel: tuple[int, ...], window: Window) -> np.ndarray:
    """The ``[..., *out, *kernel]`` view (no copy) of every window over the last ``len(kernel)`` axes of
    ``padded`` (``[N, C, *spatial]`` in NCHW), an input already padded by ``window.pads`` (and, with ceil_mode,
    past the end as far as the last window reaches)."""
    nd = len(kernel)
    extents = tuple(d * (k - 1) + 1 for d, k in zip(window.dilations, kernel))
    view = sliding_window_view(padded, extents, axis=tuple(range(padded.ndim - nd, padded.ndim)))
    starts = (slice(None, (o - 1) * s + 1, s) for o, s in zip(window.out, window.strides))
    return view[(Ellipsis, *starts, *(slice(None, None, d) for d in window.dilations))]


def conv_window(node: Node, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[int, Window]:
    """``(group, window)`` of a Conv-like node (Conv, ConvInteger, QLinearConv) on an input ``[N, C, *spatial]``
    with weights ``[O, C / group, *kernel]``, checking that ranks, channels, group and kernel_shape agree."""
    if len(x_shape) < 3 or len(w_shape) != len(x_shape):
        raise _fail(node, f"input {list(x_shape)} and weights {list(w_shape)} must have the same rank >= 3")
    g = group(node)
    if x_shape[1] != w_shape[1] * g or w_shape[0] % g:
        raise _fail(node, f"input channels {x_shape[1]}, weights {list(w_shape)} and group {g} disagree: "
                          f"expected C = {w_shape[1]} * group and O divisible by group")
    kernel = kernel_shape(node, len(x_shape) - 2, tuple(w_shape[2:]))
    return g, window_geometry(node, tuple(x_shape[2:]), kernel)


def conv_transpose_window(node: Node, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[int, Window]:
    """``(group, window)`` of ConvTranspose on ``[N, C, *spatial]`` with weights ``[C, O / group, *kernel]``.

    Per axis the full (uncropped) output has ``f = s (i - 1) + output_padding + d (k - 1) + 1`` positions and
    ``pads`` crop it: ``o = f - p0 - p1``. Given ``output_shape`` (or with auto_pad SAME_*, ``o = i s``), the
    total ``f - o`` is split as ONNX says: the odd unit at the end for SAME_UPPER, at the beginning otherwise;
    a negative total (an output larger than ``f``) pads with zeros. ``window.pads`` are those crops.
    """
    if len(x_shape) < 3 or len(w_shape) != len(x_shape):
        raise _fail(node, f"input {list(x_shape)} and weights {list(w_shape)} must have the same rank >= 3")
    g = group(node)
    if x_shape[1] != w_shape[0] or w_shape[0] % g:
        raise _fail(node, f"input channels {x_shape[1]}, weights {list(w_shape)} and group {g} disagree: "
                          f"expected weights [C, O / group, ...] with C divisible by group")
    n = len(x_shape) - 2
    kernel = kernel_shape(node, n, tuple(w_shape[2:]))
    strides = _ints(node, "strides", n, 1, 1)
    dilations = _ints(node, "dilations", n, 1, 1)
    extra = _ints(node, "output_padding", n, 0, 0)
    if any(p >= max(s, d) for p, s, d in zip(extra, strides, dilations)):
        raise _fail(node, f"output_padding {list(extra)} must be less than the stride or the dilation "
                          f"(strides {list(strides)}, dilations {list(dilations)})")
    full = [s * (i - 1) + p + d * (k - 1) + 1
            for i, s, p, d, k in zip(x_shape[2:], strides, extra, dilations, kernel)]
    auto_pad = _auto_pad(node)
    if "output_shape" in node.attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = (_ints(node, "output_shape", n, 1, 1) if "output_shape" in node.attrs
               else tuple(i * s for i, s in zip(x_shape[2:], strides)))
        split = [_split(f - o, auto_pad == "SAME_UPPER") for f, o in zip(full, out)]
        pads = tuple(b for b, _ in split) + tuple(e for _, e in split)
    else:
        pads = (0,) * (2 * n) if auto_pad == "VALID" else _ints(node, "pads", 2 * n, 0, 0)
        out = tuple(f - pads[a] - pads[a + n] for a, f in enumerate(full))
        if min(out) < 1:
            raise _fail(node, f"pads {list(pads)} leave no output (uncropped output {full})")
    return g, Window(strides, dilations, pads, out)
