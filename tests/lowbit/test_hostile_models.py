"""Small ONNX files that ask for unbounded work get a clear ValueError, with little memory spent first.

A few bytes of model (a pad, a shape constant, a repeat count) can ask for gigabytes; a long chain of nodes
asks for preparation time. Each case below is run under ``tracemalloc``, which sees NumPy's allocations, and
asserts that the refusal comes before anything large is allocated.
"""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc

import numpy as np
import pytest

from lowbit.graph.collector import paused
from lowbit.runtime.registry import MAX_TENSOR_BYTES

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lowbit.onnx import InferenceSession  # noqa: E402

HUGE = int(np.sqrt(MAX_TENSOR_BYTES)) + 1  # a square float32 of HUGE x HUGE is more than the machine's memory


def _model(nodes, inputs, output, initializers=()) -> bytes:
    graph = helper.make_graph(nodes, "hostile", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT,
                                                                                       None)], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _image(name: str = "x"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 8, 8])


def _conv(**attrs) -> bytes:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [_image()], "y", [w])


def _shape(*dims: int):
    return numpy_helper.from_array(np.array(dims, np.int64), "shape")


HOSTILE = {  # name -> (model bytes, the input fed an image (None: no input), what the error says)
    "conv pads 4000": (_conv(pads=[4000] * 4), "x", "wholly in the padding"),
    "max pool pads 4000": (_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2],
                                                    pads=[0, 0, 4000, 0])], [_image()], "y"), "x",
                           "wholly in the padding"),
    "ConstantOfShape": (_model([helper.make_node("ConstantOfShape", ["shape"], ["y"],
                                                 value=numpy_helper.from_array(np.ones(1, np.float32)))],
                               [], "y", [_shape(HUGE, HUGE)]), None, "more than this machine's memory"),
    "Expand": (_model([helper.make_node("Expand", ["x", "shape"], ["y"])], [_image()], "y",
                      [_shape(HUGE, HUGE, 1, 1, 1)]), "x", "more than this machine's memory"),
    "Tile": (_model([helper.make_node("Tile", ["x", "shape"], ["y"])], [_image()], "y", [_shape(HUGE, 1, HUGE, 1)]),
             "x", "more than this machine's memory"),
    "Pad": (_model([helper.make_node("Pad", ["x", "shape"], ["y"])], [_image()], "y",
                   [_shape(0, 0, HUGE, HUGE, 0, 0, 0, 0)]), "x", "more than this machine's memory"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_model_is_refused_before_allocating(name):
    model, fed, message = HOSTILE[name]
    feeds = {fed: np.ones((1, 3, 8, 8), np.float32)} if fed else {}
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message) as raised:
            InferenceSession(model).run(None, feeds)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    assert "node " in str(raised.value)  # the message names the node


def _relu_chain(n: int) -> bytes:
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    return _model(nodes, [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])], f"t{n}")


def _prepare_seconds(n: int) -> float:
    model = _relu_chain(n)
    start = time.perf_counter()
    session = InferenceSession(model)
    y = session.run(None, {"t0": np.array([[-1, 0, 1, 2]], np.float32)})[0]
    assert y.tolist() == [[0, 0, 1, 2]]
    return time.perf_counter() - start


def test_preparation_is_linear_in_nodes():
    """Import, rewrite and preparation of a Relu chain: 8x the nodes cost about 8x the time (a quadratic step,
    as the collector's passes over a growing graph were, makes it 64x). 100,000 nodes take about 17 s."""
    _prepare_seconds(500)  # compiled kernels loaded, imports done
    small, large = min(_prepare_seconds(1500) for _ in range(2)), _prepare_seconds(12000)
    assert large / small < 20, (small, large)


def test_collector_pause_is_counted_across_threads():
    """Overlapping pauses (threads preparing at once) restore the collector once, when the last one ends, and
    only if it was enabled before: a user's gc.disable() survives."""
    assert gc.isenabled()
    first_in, second_out = threading.Event(), threading.Event()

    def second():
        first_in.wait()
        with paused():
            pass
        second_out.set()

    thread = threading.Thread(target=second)
    thread.start()
    with paused():
        first_in.set()
        second_out.wait()
        assert not gc.isenabled()  # the second pause ended inside the first one: still paused
    thread.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("name, value, message", [
    ("b", np.full(4, 2**40, np.int64), "the bias must be int32, got int64"),
    ("b", np.full(4, 1.5, np.float32), "the bias must be int32, got float32"),
    ("xz", np.int64(300), "x's zero point must be uint8, got int64"),
    ("wz", np.int64(200), "the weights' zero point must be int8, got int64"),
])
def test_quantized_parameters_are_never_cast_silently(name, value, message):
    """A saved graph's zero points and integer biases must have their ONNX types: a cast would wrap them."""
    from lowbit import Graph, Node, Session, TensorSpec

    params = {"xs": np.float32(0.1), "xz": np.uint8(3), "w": np.ones((4, 3, 3, 3), np.int8), "ws": np.float32(0.01),
              "wz": np.int8(0), "ys": np.float32(0.5), "yz": np.uint8(5), "b": np.zeros(4, np.int32), name: value}
    inputs = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    graph = Graph([Node("QLinearConv", inputs, ["y"], {}, "n")], {"x": TensorSpec((1, 3, 8, 8), "uint8")}, ["y"],
                  params)
    with pytest.raises(ValueError, match=message):
        Session(graph, fallback=False).run({"x": np.zeros((1, 3, 8, 8), np.uint8)})
