"""Float channels-last regions (lowbit.runtime.layout.nhwc_chains seeded by float Conv) and the float preparers'
``layout="NHWC"``: which nodes go NHWC, where the Transposes go, that the rewritten graph gives the original's
values to float32 rounding (lowbit.Session on both), each preparer's NHWC against its NCHW, on the register tiles
and on the portable path (LOWBIT_ISA=generic), and the example ResNet / MobileNetV2 against ONNX Runtime."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from kernels import dispatch
from lowbit import Session
from lowbit.graph.ir import Graph, Node, TensorSpec
from lowbit.runtime.layout import TO_NCHW, TO_NHWC, nhwc_chains
from lowbit.runtime.registry import prepare
from tests.graphs import GraphDraft

RNG = np.random.default_rng(5)
TILES = dispatch.choose("conv_float32", 1, 8, 8).kind == "avx512"
needs_tiles = pytest.mark.skipif(not TILES, reason="float regions are seeded where the register tiles run")


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same numbers whichever tests ran before it."""
    global RNG
    RNG = np.random.default_rng(5)


class Floats(GraphDraft):
    """A float32 graph under construction from input ``x``; helpers return their output's name."""

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, **attrs) -> str:
        """Conv with He-normal weights and a bias; ``attrs`` as ONNX's (pads default k // 2)."""
        attrs.setdefault("pads", [k // 2] * 4)
        w = self.param("w", (RNG.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k)))
                       .astype(np.float32))
        b = self.param("b", RNG.normal(0, 0.1, cout).astype(np.float32))
        return self.op("Conv", [x, w, b], kernel_shape=[k, k], group=group, **attrs)

    def bn(self, x: str, c: int, **kwargs) -> str:
        stats = [RNG.uniform(0.5, 1.5, c), RNG.normal(0, 0.1, c), RNG.normal(0, 0.1, c), RNG.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x, *(self.param(s, v.astype(np.float32))
                                                   for s, v in zip(("g", "beta", "mean", "var"), stats))], **kwargs)

    def clip(self, x: str, lo: float = 0.0, hi: float = 6.0, **kwargs) -> str:
        return self.op("Clip", [x, self.param("lo", np.float32(lo)), self.param("hi", np.float32(hi))], **kwargs)

    def graph(self, *outputs: str) -> Graph:
        return Graph(list(self.nodes), dict(self.inputs), list(outputs), dict(self.params)).validate()

    def feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(seed).normal(0, 1, self.shape).astype(np.float32)}


def _ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def _nhwc(graph: Graph) -> list[str]:
    """Names of the nodes the pass laid out NHWC."""
    return [n.name for n in graph.nodes if n.attrs.get("layout") == "NHWC"]


def _transposes(graph: Graph) -> list[tuple[str, str, list[int]]]:
    return [(n.inputs[0], n.outputs[0], n.attrs["perm"]) for n in graph.nodes if n.op == "Transpose"]


def _close(got: np.ndarray, want: np.ndarray, name: str = "") -> None:
    """Equal to float32 rounding (sums in another order), relative to the tensor's largest finite value."""
    assert got.dtype == want.dtype and got.shape == want.shape, name
    scale = max(1.0, float(np.abs(np.where(np.isfinite(want), want, 0)).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def _same_values(graph: Graph, rewritten: Graph, feeds: dict[str, np.ndarray]) -> None:
    """Both graphs give the same outputs on ``feeds``, to float32 rounding."""
    want = Session(graph, fallback=False).run(feeds)
    got = Session(rewritten, fallback=False).run(feeds)
    assert want.keys() == got.keys()
    for name in want:
        _close(got[name], want[name], name)


# ----------------------------------------------------------------------------- the pass on float graphs

@needs_tiles
def test_float_chain_is_one_region_with_a_transpose_at_each_border():
    b = Floats((2, 3, 13, 11))  # odd sizes
    c1 = b.conv("x", 3, 16, name="c1")
    r1 = b.op("Relu", [b.bn(c1, 16, name="bn")], name="relu")
    dw = b.clip(b.conv(r1, 16, 16, group=16, strides=[2, 2], name="dw"), name="clip")  # depthwise, strided
    p = b.op("MaxPool", [dw], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool")
    pw = b.conv(p, 16, 32, k=1, pads=[0] * 4, name="pw")
    gap = b.op("GlobalAveragePool", [pw], name="gap")
    flat = b.op("Flatten", [gap], name="flat")
    graph = b.graph(b.op("Gemm", [flat, b.param("fc", RNG.normal(size=(32, 5)).astype(np.float32))], name="fc"))
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1", "bn", "relu", "dw", "clip", "pool", "pw", "gap"]
    assert _transposes(out) == [("x", "x_nhwc", TO_NHWC), (f"{gap}_nhwc", gap, TO_NCHW)]
    assert _ops(out) == ["Transpose", "Conv", "BatchNormalization", "Relu", "Conv", "Clip", "MaxPool", "Conv",
                         "GlobalAveragePool", "Transpose", "Flatten", "Gemm"]
    assert out.node("clip").inputs[1:] == graph.node("clip").inputs[1:]  # the bounds stay as they are
    assert _nhwc(graph) == [] and graph.node("c1").inputs[0] == "x"  # pure
    _same_values(graph, out, b.feeds())


def test_global_pool_exit_is_a_view():
    """[N, 1, 1, C] -> [N, C, 1, 1] moves only axes of size 1: the Transpose returns its input reshaped."""
    node = Node("Transpose", ["x"], ["y"], {"perm": TO_NCHW}, "exit")
    kernel = prepare(node, Graph([], {}, []), [((3, 1, 1, 7), np.dtype(np.float32))])
    x = RNG.normal(size=(3, 1, 1, 7)).astype(np.float32)
    y = kernel([x], [np.empty(*kernel.outputs[0])])[0]
    assert kernel.note == "view" and y.shape == (3, 7, 1, 1) and np.shares_memory(x, y)
    np.testing.assert_array_equal(y, x.transpose(TO_NCHW))
    copy = prepare(node, Graph([], {}, []), [((3, 2, 1, 7), np.dtype(np.float32))])
    assert copy.note != "view"


@needs_tiles
def test_residual_adds_and_elementwise_ops_share_the_region():
    b = Floats((2, 5, 9, 7))
    stem = b.conv("x", 5, 8, name="stem")
    left = b.conv(stem, 8, 8, name="left")
    right = b.conv(b.op("Relu", [stem], name="relu"), 8, 8, k=1, pads=[0] * 4, name="right")
    add = b.op("Add", [left, right], name="add")
    mul = b.op("Mul", [add, stem], name="mul")
    sub = b.op("Sub", [mul, left], name="sub")
    act = b.op("LeakyRelu", [sub], alpha=0.1, name="leaky")
    act = b.op("HardSwish", [b.op("HardSigmoid", [b.op("Sigmoid", [act], name="sigmoid")], name="hsig")],
               name="hswish")
    avg = b.op("AveragePool", [act], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=1,
               ceil_mode=1, name="avg")
    gmp = b.op("GlobalMaxPool", [avg], name="gmp")
    graph = b.graph(gmp)
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["stem", "left", "relu", "right", "add", "mul", "sub", "leaky", "sigmoid", "hsig", "hswish",
                          "avg", "gmp"]
    assert _transposes(out) == [("x", "x_nhwc", TO_NHWC), (f"{gmp}_nhwc", gmp, TO_NCHW)]
    assert out.node("add").inputs == [f"{left}_nhwc", f"{right}_nhwc"] and out.node("mul").inputs[1] == f"{stem}_nhwc"
    _same_values(graph, out, b.feeds())


@needs_tiles
def test_outside_readers_and_graph_outputs_inside_a_region_keep_their_name_and_layout():
    b = Floats((3, 4, 8, 6))
    c1 = b.conv("x", 4, 8, name="c1")
    c2 = b.conv(c1, 8, 8, name="c2")
    shift = b.param("shift", RNG.normal(size=(8, 1, 1)).astype(np.float32))  # [C, 1, 1]: another rank
    outside = b.op("Add", [c1, shift], name="outside")  # broadcasts a constant: stays NCHW
    c4 = b.conv(b.conv(outside, 8, 8, name="c3"), 8, 4, name="c4")
    graph = b.graph(c1, c2, c4)
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c1", "c2", "c3", "c4"]  # two regions, the Add between them NCHW
    assert _transposes(out) == [("x", "x_nhwc", TO_NHWC), (f"{c1}_nhwc", c1, TO_NCHW), (f"{c2}_nhwc", c2, TO_NCHW),
                                (outside, f"{outside}_nhwc", TO_NHWC), (f"{c4}_nhwc", c4, TO_NCHW)]
    assert out.node("outside").inputs[0] == c1 and "layout" not in out.node("outside").attrs
    assert out.outputs == graph.outputs
    _same_values(graph, out, b.feeds())


@needs_tiles
def test_the_pass_is_idempotent():
    b = Floats((2, 3, 6, 6))
    graph = b.graph(b.op("GlobalAveragePool", [b.op("Relu", [b.conv(b.conv("x", 3, 8), 8, 8)])]))
    once = nhwc_chains(graph)
    twice = nhwc_chains(once)
    assert _nhwc(once) and [(n.op, n.inputs, n.outputs, n.attrs) for n in twice.nodes] == \
        [(n.op, n.inputs, n.outputs, n.attrs) for n in once.nodes]


@needs_tiles
def test_a_lone_float_convolution_stays_nchw():
    """Between two transposes it would run slower than on NCHW: a float region needs two convolutions."""
    b = Floats((2, 4, 6, 6))
    graph = b.graph(b.op("MaxPool", [b.op("Relu", [b.conv("x", 4, 8)])], kernel_shape=[2, 2]))
    out = nhwc_chains(graph)
    assert _ops(out) == _ops(graph) and _nhwc(out) == []


@needs_tiles
def test_what_cannot_go_nhwc_stays_out():
    b = Floats((2, 4, 6, 6))
    c1 = b.conv(b.conv("x", 4, 4, name="c0"), 4, 4, name="c1")
    fed = b.op("Conv", [c1, "w_fed"], kernel_shape=[1, 1], name="fed")  # weights computed (fed): no plan
    b.inputs["w_fed"] = TensorSpec((4, 4, 1, 1))
    bound = b.op("Clip", [c1, b.param("lo", np.float32(0)), "hi_fed"], name="clip")  # a bound computed
    b.inputs["hi_fed"] = TensorSpec(())
    stats = b.op("BatchNormalization", [c1, "g_fed", *(b.param(s, np.ones(4, np.float32)) for s in "bmv")],
                 name="bn")  # statistics computed
    b.inputs["g_fed"] = TensorSpec((4,))
    b.nodes.append(Node("MaxPool", [c1], ["mp", "mp_indices"], {"kernel_shape": [2, 2]}, "mp"))
    w1d = b.param("w1d", RNG.normal(size=(4, 4, 3)).astype(np.float32))
    one_d = b.op("Conv", [b.op("Reshape", [c1, b.param("to3d", np.array([2, 4, 36]))]), w1d], kernel_shape=[3],
                 name="conv1d")
    w64 = b.param("w64", RNG.normal(size=(4, 4, 1, 1)))  # float64 weights: another dtype than the tiles'
    f64 = b.op("Conv", [b.op("Cast", [c1], to=11, name="cast"), w64], kernel_shape=[1, 1], name="f64")
    graph = b.graph(fed, bound, stats, "mp", one_d, f64)
    out = nhwc_chains(graph)
    assert _nhwc(out) == ["c0", "c1"]
    assert [t[2] for t in _transposes(out)] == [TO_NHWC, TO_NCHW]


def test_generic_isa_leaves_the_graph_nchw(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    b = Floats((2, 3, 6, 6))
    graph = b.graph(b.op("Relu", [b.conv(b.conv("x", 3, 8), 8, 8)]))
    out = nhwc_chains(graph)
    assert _ops(out) == _ops(graph) and _nhwc(out) == []


@needs_tiles
def test_a_graph_laid_out_for_the_tiles_runs_on_the_portable_path(monkeypatch):
    """Prepared where dispatch picks the NumPy convolutions, an NHWC graph still computes the same values."""
    b = Floats((2, 3, 7, 6))
    c = b.conv(b.op("MaxPool", [b.conv("x", 3, 8)], kernel_shape=[2, 2], pads=[0, 0, 1, 1]), 8, 8, group=8)
    graph = b.graph(b.op("GlobalAveragePool", [b.op("Add", [c, b.conv(c, 8, 8, k=1, pads=[0] * 4)])]))
    out = nhwc_chains(graph)
    assert len(_nhwc(out)) == 6
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    _same_values(graph, out, b.feeds())
    session = Session(out, fallback=False)
    session.run(b.feeds())
    assert all("NHWC transposed" in session.notes[n.name] for n in out.nodes if n.op == "Conv")


# ----------------------------------------------------------------------------- the preparers' layout attribute

def _nhwc_matches_nchw(node: Node, graph: Graph, x: np.ndarray, others: list[np.ndarray] = ()) -> str:
    """``node`` with ``layout="NHWC"`` on ``x`` transposed gives its NCHW result transposed; the NHWC kernel's
    note. ``others``: further inputs, 4-D ones transposed alike."""
    def spec(a):
        return a.shape, a.dtype

    def to_nhwc(a):
        return np.ascontiguousarray(a.transpose(TO_NHWC)) if a.ndim == 4 else a

    nchw = prepare(node, graph, [spec(x), *map(spec, others)])
    want = nchw([x, *others], [np.empty(*o) for o in nchw.outputs])[0]
    laid = Node(node.op, node.inputs, node.outputs, {**node.attrs, "layout": "NHWC"}, node.name)
    ins = [to_nhwc(x), *map(to_nhwc, others)]
    kernel = prepare(laid, graph, list(map(spec, ins)))
    assert kernel.outputs[0][0] == want.transpose(TO_NHWC).shape
    got = kernel(ins, [np.empty(*o) for o in kernel.outputs])[0]
    _close(got, np.ascontiguousarray(want.transpose(TO_NHWC)), node.op)
    return kernel.note


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("case", ["plain", "depthwise", "grouped", "pointwise"])
def test_conv_nhwc_matches_nchw(monkeypatch, case, generic):
    """The register tiles in NHWC (where dispatch picks them), else the NumPy paths transposed around."""
    if generic:
        monkeypatch.setenv("LOWBIT_ISA", "generic")
    b = Floats((2, 6, 9, 7))
    k, group, cout, attrs = {"plain": (3, 1, 16, {"strides": [2, 1]}), "depthwise": (3, 6, 6, {}),
                             "grouped": (3, 2, 4, {"dilations": [2, 1]}), "pointwise": (1, 1, 32, {})}[case]
    b.conv("x", 6, cout, k=k, group=group, activation="relu", **attrs)
    x = b.feeds()["x"]
    note = _nhwc_matches_nchw(b.nodes[0], b.graph(), x)
    assert ("NHWC transposed" in note) == (generic or not TILES)
    assert "NHWC" in note


@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [2, 2]}),  # unpadded: the input read in place
    ("MaxPool", {"kernel_shape": [1, 2], "pads": [1, 0, 0, 1]}),  # windows wholly in the padding: -inf (NumPy)
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0], "count_include_pad": 1, "ceil_mode": 1,
                     "strides": [2, 2]}),
    ("GlobalAveragePool", {}), ("GlobalMaxPool", {}), ("Relu", {}), ("HardSwish", {}),
    ("LeakyRelu", {"alpha": 0.2}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pools_and_elementwise_nhwc_match_nchw(op, attrs, dtype):
    """float32 pools run the kernels (unless a window holds no input), float64 ones the NumPy windows."""
    x = RNG.normal(size=(2, 7, 9, 5)).astype(dtype)
    note = _nhwc_matches_nchw(Node(op, ["x"], ["y"], attrs, "n"), Graph([], {}, []), x)
    if op in ("MaxPool", "AveragePool"):
        assert note.endswith(", NHWC") == (dtype == np.float32 and attrs.get("pads") != [1, 0, 0, 1])


def test_batch_norm_clip_and_binary_nhwc_match_nchw():
    b = Floats((2, 7, 5, 3))
    x = b.feeds()["x"]
    b.bn("x", 7, name="bn")
    b.clip("x", -0.5, 0.5, name="clip")
    graph = b.graph()
    _nhwc_matches_nchw(graph.node("bn"), graph, x)
    _nhwc_matches_nchw(graph.node("clip"), graph, x, [graph.params[t] for t in graph.node("clip").inputs[1:]])
    row = RNG.normal(size=(1, 7, 5, 1)).astype(np.float32)  # broadcasting over N and W, 4-D: the same in NHWC
    for op in ("Add", "Mul", "Sub"):
        _nhwc_matches_nchw(Node(op, ["x", "b"], ["y"], {}, op), Graph([], {}, []), x, [row])


@pytest.mark.parametrize("op, specs, attrs, message", [
    ("Conv", [(2, 4, 5, 5)], {"kernel_shape": [1, 1], "layout": "NWHC"}, "layout must be 'NCHW' or 'NHWC', got 'NWHC'"),
    ("Conv", [(2, 5, 4)], {"kernel_shape": [1], "layout": "NHWC"}, "layout NHWC needs a 4-D input"),
    ("AveragePool", [(2, 5, 4)], {"kernel_shape": [2], "layout": "NHWC"}, "layout NHWC needs a 4-D input"),
    ("GlobalAveragePool", [(2, 5, 4, 3, 2)], {"layout": "NHWC"}, "layout NHWC needs a 4-D input"),
    ("GlobalMaxPool", [(2, 5, 4, 3)], {"layout": "nhwc"}, "got 'nhwc'"),
    ("Relu", [(2, 5)], {"layout": "NHWC"}, "layout NHWC needs a 4-D input"),
    ("Clip", [(2, 5, 4, 3)], {"layout": 1}, "got 1"),
    ("Add", [(2, 5, 4, 3), (3,)], {"layout": "NHWC"}, r"two 4-D inputs \[N, H, W, C\], got .* and \[3\]"),
    ("com.microsoft.BiasGelu", [(2, 5, 4, 3), (3,)], {"layout": "NHWC"}, "no bias input"),
    ("BatchNormalization", [(2, 5, 4, 3)], {"layout": "NHWC", "training_mode": 1}, "layout NHWC is for inference"),
])
def test_bad_layouts_are_refused(op, specs, attrs, message):
    params = {}
    inputs = ["x", *(f"in{i}" for i in range(1, len(specs)))]
    if op == "Conv":
        params["w"] = np.ones((3, 4 if len(specs[0]) == 4 else 5, *attrs["kernel_shape"]), np.float32)
        inputs.append("w")
    if op == "BatchNormalization":
        params.update({s: np.ones(3, np.float32) for s in "sbmv"})
        inputs += list("sbmv")
    node = Node(op, inputs, ["y"], attrs, "n")
    specs = [(s, np.dtype(np.float32)) for s in specs] + [(p.shape, p.dtype) for p in params.values()]
    with pytest.raises(ValueError, match=rf"node 'n' \({op}\): .*{message}"):
        prepare(node, Graph([], {}, [], params), specs)


# ----------------------------------------------------------------------------- the example models against ORT

@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2"])
def test_example_models_match_onnx_runtime(name):
    ort = pytest.importorskip("onnxruntime")
    import lowbit.onnx
    from lowbit.onnx import examples

    model = getattr(examples, name)(image=20).SerializeToString()
    session = lowbit.onnx.InferenceSession(model)
    graph = session.graph  # loading keeps NCHW; the session moves the conv chains channels-last
    if TILES:
        laid = collections.Counter(n.op for n in graph.nodes if n.attrs.get("layout") == "NHWC")
        assert laid["Conv"] == _ops(graph).count("Conv") and laid["GlobalAveragePool"] == 1
        assert [t[2] for t in _transposes(graph)] == [TO_NHWC, TO_NCHW]  # in at the input, out after the pool
    feeds = examples.image_feed(3, 20, 1)
    got = session.run(None, feeds)[0]
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
