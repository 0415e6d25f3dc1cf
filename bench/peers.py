"""What lowbit is measured against: NumPy's float32 BLAS and ONNX Runtime's MatMulInteger.

Each builder returns a :class:`Contender`: a zero-argument call that computes the
product into a preallocated output, plus a context that pins the threads it may
use. Operands are prepared once (weights converted, transposed or prepacked), as
a deployed model would, so only the product itself is timed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

OPSET = 13
IR_VERSION = 9  # the newest IR the installed onnxruntime accepts; onnx writes a newer one by default


@dataclass(frozen=True)
class Contender:
    """One implementation of ``a @ b.T``, ready to be timed."""

    name: str
    call: Callable[[], np.ndarray]  # computes the product, returns the output array
    pinned: Callable[[], AbstractContextManager]  # while entered, ``call`` uses the requested threads


def numpy_float32(a: np.ndarray, b: np.ndarray, threads: int) -> Contender:
    """NumPy ``a @ b.T`` on float32 copies of the operands: the usual unquantized baseline.

    BLAS threads are set with threadpoolctl while ``pinned()`` is entered, not per
    call, because limiting them costs far more than a GEMV.
    """
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    out = np.empty((a.shape[0], b.shape[0]), np.float32)
    return Contender(
        "numpy",
        lambda: np.matmul(a32, b32.T, out=out),
        functools.partial(threadpool_limits, limits=threads, user_api="blas"),
    )


def blas_libraries() -> list[dict]:
    """The BLAS libraries loaded in this process, as threadpoolctl reports them.

    For OpenBLAS, ``architecture`` names the kernel set it chose (e.g.
    ``"SkylakeX"``); ``OPENBLAS_CORETYPE`` can force a slower one.
    """
    return [lib for lib in threadpool_info() if lib["user_api"] == "blas"]


def _bound_session(model, threads: int, input_name: str, x: np.ndarray, out: np.ndarray) -> Callable[[], np.ndarray]:
    """An ONNX Runtime session on ``threads`` threads with ``x`` and ``out`` bound once: a call runs only the graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input(input_name, x)
    binding.bind_output("Y", "cpu", 0, out.dtype, out.shape, out.ctypes.data)

    def call() -> np.ndarray:
        session.run_with_iobinding(binding)
        return out

    return call


def onnxruntime_matmul_integer(a: np.ndarray, b: np.ndarray, threads: int) -> Contender | None:
    """ONNX Runtime ``MatMulInteger`` (uint8 ``a`` [M, K] x int8 ``B = b.T`` [K, N] -> int32).

    ``B`` is a graph initializer, so ORT prepacks it at session creation like
    ``kernels.pack_int8``; input and output are bound once so a call runs only the
    kernel. Returns None when onnx or onnxruntime is not installed.
    """
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnx import TensorProto, helper, numpy_helper
    m, k = a.shape
    n = b.shape[0]
    node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
    graph = helper.make_graph(
        [node],
        "matmul_integer_u8s8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(b.T), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION

    call = _bound_session(model, threads, "A", a, np.empty((m, n), np.int32))
    return Contender("onnxruntime", call, contextlib.nullcontext)


def ort_matmul_nbits(x: np.ndarray, packed, threads: int, accuracy_level: int = 4) -> Contender | None:
    """ONNX Runtime ``com.microsoft.MatMulNBits`` on the same int4 codes and scales as ``packed``.

    ``packed`` is a ``kernels.PackedInt4``. B is uint8 ``[N, n_blocks, block / 2]``
    (element 2j in the low nibble of byte j, unsigned codes: s4 + 8, whose default
    zero point 8 ORT assumes), scales float32 ``[N * n_blocks]``, zero points
    (asymmetric only) packed two per byte along the blocks; ``accuracy_level=4``
    quantizes the activations to int8 per block, as ``kernels.gemm_int4`` does.
    Input and output are bound once. None when onnxruntime is missing.
    """
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnx import TensorProto, helper, numpy_helper
    m, k = x.shape
    n, g, blocks = packed.n, packed.group_size, packed.n_groups
    codes = np.full((n, blocks * g), packed.zero, np.uint8)
    codes[:, :k] = packed.codes()
    pairs = codes.reshape(n, blocks, g // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    inputs = ["A", "B", "scales"]
    initializers = [numpy_helper.from_array(b, "B"),
                    numpy_helper.from_array(np.ascontiguousarray(packed.scales).reshape(-1), "scales")]
    if not packed.symmetric:
        zp = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
        zp[:, :blocks] = packed.zero_points
        initializers.append(numpy_helper.from_array((zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=g, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION
    call = _bound_session(model, threads, "A", x, np.empty((m, n), np.float32))
    return Contender(f"ORT-g{g}", call, contextlib.nullcontext)


def _conv_model(node_inputs: list[str], initializers: list, x: np.ndarray, out_type: int, **attributes):
    """A one-node ONNX model ``Y = op(X, ...)`` with the given initializers (op from ``attributes["op"]``,
    in the ONNX Runtime domain ``com.microsoft`` when ``attributes["domain"]`` says so)."""
    from onnx import helper

    op = attributes.pop("op")
    node = helper.make_node(op, node_inputs, ["Y"], **attributes)
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph([node], op.lower(), [helper.make_tensor_value_info("X", elem, list(x.shape))],
                              [helper.make_tensor_value_info("Y", out_type, None)], initializer=initializers)
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in {node.domain} - {""}]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR_VERSION
    return model


def onnxruntime_qlinear_conv(x: np.ndarray, w: np.ndarray, out_shape: tuple, attributes: dict, threads: int,
                             scales: tuple[float, int, float, float, int], nhwc: bool = False) -> Contender | None:
    """ONNX Runtime ``QLinearConv`` (uint8 NCHW ``x``, int8 OIHW ``w`` initializer, uint8 output).

    ``scales`` is ``(x_scale, x_zero_point, w_scale, y_scale, y_zero_point)``; the
    weight zero point is 0. ``attributes``: ``pads``, ``strides``, ``group`` (ONNX).
    With ``nhwc``, ``x`` and the output are NHWC, through ORT's own ``com.microsoft``
    QLinearConv with ``channels_last=1``. Input and output are bound once. None when
    onnx or onnxruntime is missing.
    """
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnx import TensorProto, numpy_helper
    xs, xz, ws, ys, yz = scales
    values = {"xs": np.float32(xs), "xz": np.uint8(xz), "w": w, "ws": np.float32(ws), "wz": np.int8(0),
              "ys": np.float32(ys), "yz": np.uint8(yz)}
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in values.items()]
    if nhwc:
        attributes = dict(attributes, domain="com.microsoft", channels_last=1)
    model = _conv_model(["X", "xs", "xz", "w", "ws", "wz", "ys", "yz"], inits, x, TensorProto.UINT8,
                        op="QLinearConv", **attributes)
    call = _bound_session(model, threads, "X", x, np.empty(out_shape, np.uint8))
    return Contender("ORT NHWC" if nhwc else "ORT int8", call, contextlib.nullcontext)


def onnxruntime_conv_float(x: np.ndarray, w: np.ndarray, out_shape: tuple, attributes: dict,
                           threads: int) -> Contender | None:
    """ONNX Runtime float32 ``Conv`` on float copies of ``x`` and ``w``: the unquantized baseline."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnx import TensorProto, numpy_helper
    x32 = x.astype(np.float32)
    model = _conv_model(["X", "w"], [numpy_helper.from_array(w.astype(np.float32), "w")], x32, TensorProto.FLOAT,
                        op="Conv", **attributes)
    call = _bound_session(model, threads, "X", x32, np.empty(out_shape, np.float32))
    return Contender("ORT float", call, contextlib.nullcontext)
