"""The float runtime: every float op against NumPy / ONNX references, the graph passes, Session and Profile."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from lowbit.graph import Graph, GraphBuilder, Node, Sequential, TensorSpec
from lowbit.runtime import Kernel, Session, fold_batch_norm, fuse_activations
from lowbit.runtime.registry import PREPARERS, preparer


def _one_node(op: str, shapes: list[tuple], attrs: dict | None = None, params: dict | None = None,
              outputs: int = 1) -> Graph:
    """A graph of one ``op`` node: runtime inputs ``x0, x1, ...`` of ``shapes``, then parameter inputs."""
    g = GraphBuilder({f"x{i}": TensorSpec(s) for i, s in enumerate(shapes)})
    names = [f"x{i}" for i in range(len(shapes))] + [g.param("p", v) if v is not None else ""
                                                       for v in (params or {}).values()]
    return g.build([g.add_node(op, names, attrs, outputs=outputs)])


def _run(graph: Graph, *xs: np.ndarray) -> np.ndarray:
    (y,) = Session(graph, optimize=False).run({f"x{i}": x for i, x in enumerate(xs)}).values()
    return y


def _conv_ref(x, w, b, strides, pads, dilations, group):
    """Direct ONNX Conv in float64."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, o, oh, ow))
    og = o // group
    for oc in range(o):
        g = oc // og
        for ky in range(kh):
            for kx in range(kw):
                y0, x0 = ky * dilations[0], kx * dilations[1]
                patch = xp[:, g * cg:(g + 1) * cg, y0:y0 + (oh - 1) * strides[0] + 1:strides[0],
                           x0:x0 + (ow - 1) * strides[1] + 1:strides[1]]
                y[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, ky, kx])
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("c, o, k, strides, pads, dilations, group", [
    (3, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (4, 6, 3, (2, 2), (0, 1, 2, 0), (1, 1), 1),
    (5, 7, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),  # pointwise: no im2col
    (4, 4, 3, (1, 2), (2, 2, 2, 2), (2, 1), 1),
    (6, 6, 3, (2, 2), (1, 1, 1, 1), (1, 1), 6),  # depthwise
    (6, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 6),  # depthwise, multiplier 2
    (8, 4, 3, (1, 1), (1, 0, 1, 0), (1, 1), 2),  # grouped
])
def test_conv_matches_direct_reference(rng, c, o, k, strides, pads, dilations, group):
    x = rng.standard_normal((2, c, 9, 8)).astype(np.float32)
    w = rng.standard_normal((o, c // group, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    g = GraphBuilder({"x0": TensorSpec((None, c, 9, 8))})
    graph = g.build([g.conv("x0", w, b, strides=strides, pads=pads, dilations=dilations, group=group)])
    expected = _conv_ref(x, w, b, strides, pads, dilations, group)
    np.testing.assert_allclose(_run(graph, x), expected, rtol=1e-4, atol=1e-4)


def _gelu_ref(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _pool_ref(x, k, s, pads, reduce, ceil=False, include_pad=False):
    n, c, h, w = x.shape
    size = []
    for i, (dim, p0, p1) in enumerate(((h, pads[0], pads[2]), (w, pads[1], pads[3]))):
        span = dim + p0 + p1 - k[i]
        o = (-(-span // s[i]) if ceil else span // s[i]) + 1
        size.append(o - 1 if ceil and (o - 1) * s[i] >= dim + p0 else o)
    y = np.zeros((n, c, *size))
    for oy in range(size[0]):
        for ox in range(size[1]):
            y0, x0 = oy * s[0] - pads[0], ox * s[1] - pads[1]
            win = x[:, :, max(y0, 0):min(y0 + k[0], h), max(x0, 0):min(x0 + k[1], w)]
            if reduce == "max":
                y[:, :, oy, ox] = win.max(axis=(2, 3))
            else:
                ye, xe = min(y0 + k[0], h + pads[2]), min(x0 + k[1], w + pads[3])
                count = (ye - y0) * (xe - x0) if include_pad else win.shape[2] * win.shape[3]
                y[:, :, oy, ox] = win.sum(axis=(2, 3)) / count
    return y


def test_elementwise_and_layout_ops_match_numpy(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 3
    s = x.shape
    cases = [
        ("Relu", {}, np.maximum(x, 0)),
        ("Sigmoid", {}, 1 / (1 + np.exp(-x.astype(np.float64)))),
        ("Tanh", {}, np.tanh(x)),
        ("HardSwish", {}, x * np.clip(x / 6 + 0.5, 0, 1)),
        ("Gelu", {}, _gelu_ref(x.astype(np.float64))),
        ("Gelu", {"approximate": "tanh"}, 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
        ("Clip", {"min": -1.0, "max": 2.0}, np.clip(x, -1, 2)),
        ("Clip", {"max": 0.5}, np.minimum(x, 0.5)),
        ("Softmax", {"axis": 1}, np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)),
        ("Transpose", {"perm": [0, 2, 3, 1]}, x.transpose(0, 2, 3, 1)),
        ("Transpose", {}, x.T),
        ("Flatten", {"axis": 2}, x.reshape(6, 20)),
        ("GlobalAveragePool", {}, x.mean(axis=(2, 3), keepdims=True)),
        ("MaxPool", {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [1, 0, 0, 1]},
         _pool_ref(x, (2, 3), (1, 2), (1, 0, 0, 1), "max")),
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
         _pool_ref(x, (3, 3), (2, 2), (0,) * 4, "max", True)),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         _pool_ref(x, (3, 3), (2, 2), (1, 1, 1, 1), "avg")),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
         _pool_ref(x, (3, 3), (2, 2), (1, 1, 1, 1), "avg", include_pad=True)),
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1,
                         "count_include_pad": 1}, _pool_ref(x, (2, 2), (2, 2), (0, 0, 1, 1), "avg", True, True)),
    ]
    for op, attrs, expected in cases:
        np.testing.assert_allclose(_run(_one_node(op, [s], attrs), x), expected, rtol=2e-6, atol=2e-6,
                                   err_msg=f"{op} {attrs}")


def test_parametrised_ops_match_numpy(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    c = rng.standard_normal(5).astype(np.float32)
    gemm = _one_node("Gemm", [(4, 6)], {"alpha": 0.5, "beta": 2.0, "transB": 1}, {"B": w.T.copy(), "C": c})
    np.testing.assert_allclose(_run(gemm, x), 0.5 * x @ w + 2 * c, rtol=1e-5, atol=1e-5)
    gemm_ta = _one_node("Gemm", [(6, 4)], {"transA": 1}, {"B": w})
    np.testing.assert_allclose(_run(gemm_ta, x.T.copy()), x @ w, rtol=1e-5, atol=1e-5)
    gemm_in = _one_node("Gemm", [(4, 6), (5, 6), (1, 5)], {"alpha": 2.0, "beta": 0.5, "transB": 1})
    np.testing.assert_allclose(_run(gemm_in, x, w.T.copy(), c[None]), 2 * x @ w + 0.5 * c, rtol=1e-5, atol=1e-5)
    a, b = rng.standard_normal((3, 4, 6)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    np.testing.assert_allclose(_run(_one_node("MatMul", [a.shape, b.shape]), a, b), a @ b, rtol=1e-5, atol=1e-5)
    vector = _one_node("MatMul", [(6,), b.shape])
    np.testing.assert_allclose(_run(vector, a[0, 0], b), a[0, 0] @ b, rtol=1e-5, atol=1e-5)
    y = rng.standard_normal((1, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(_run(_one_node("Add", [a.shape, y.shape]), a, y), a + y)
    np.testing.assert_allclose(_run(_one_node("Mul", [a.shape, y.shape]), a, y), a * y)
    concat = _one_node("Concat", [a.shape, a.shape], {"axis": 2})
    np.testing.assert_allclose(_run(concat, a, a), np.concatenate([a, a], 2))
    shape = np.array([0, -1, 2], np.int64)
    np.testing.assert_array_equal(_run(_one_node("Reshape", [a.shape], {}, {"shape": shape}), a), a.reshape(3, 12, 2))
    scale, bias = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    mean, var = rng.standard_normal(4).astype(np.float32), rng.random(4).astype(np.float32) + 0.5
    xb = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    bn = _one_node("BatchNormalization", [xb.shape], {"epsilon": 1e-3},
                   {"s": scale[:4], "b": bias[:4], "m": mean, "v": var})
    ref = (xb - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * scale[:4, None, None] + bias[:4, None, None]
    np.testing.assert_allclose(_run(bn, xb), ref, rtol=1e-5, atol=1e-5)
    ln = _one_node("LayerNormalization", [a.shape], {"axis": -1, "epsilon": 1e-5}, {"s": scale, "b": bias})
    centred = a - a.mean(-1, keepdims=True)
    ref = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_allclose(_run(ln, a), ref, rtol=1e-5, atol=1e-5)
    clip = _one_node("Clip", [a.shape], {}, {"lo": np.float32(-0.5), "hi": np.float32(0.25)})
    np.testing.assert_array_equal(_run(clip, a), np.clip(a, -0.5, 0.25))


ONNX_CASES = [  # op, input shapes, attrs, params
    ("Conv", [(1, 4, 7, 7)], {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 2},
     {"W": (6, 2, 3, 3), "B": (6,)}),
    ("Conv", [(2, 3, 6, 6)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"W": (4, 3, 3, 3)}),
    ("Gemm", [(3, 5)], {"alpha": 0.7, "beta": 1.5, "transB": 1}, {"B": (4, 5), "C": (4,)}),
    ("MatMul", [(2, 3, 5), (5, 4)], {}, {}),
    ("Gelu", [(3, 7)], {}, {}),
    ("Gelu", [(3, 7)], {"approximate": "tanh"}, {}),
    ("HardSwish", [(3, 7)], {}, {}),
    ("Sigmoid", [(3, 7)], {}, {}),
    ("Softmax", [(3, 7)], {"axis": 0}, {}),
    ("LayerNormalization", [(2, 3, 4)], {"axis": 1, "epsilon": 1e-4}, {"scale": (3, 4), "bias": (3, 4)}),
    ("BatchNormalization", [(2, 3, 4, 4)], {"epsilon": 1e-3}, {"scale": (3,), "B": (3,), "mean": (3,), "var": (3,)}),
    ("MaxPool", [(1, 2, 7, 6)], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 0], "ceil_mode": 1}, {}),
    ("MaxPool", [(1, 2, 8, 8)], {"kernel_shape": [2, 2], "dilations": [2, 2]}, {}),
    ("AveragePool", [(1, 2, 7, 6)], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                     "ceil_mode": 1, "count_include_pad": 1}, {}),
    ("AveragePool", [(1, 2, 7, 6)], {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [1, 0, 0, 1]}, {}),
    ("Concat", [(2, 3), (2, 4)], {"axis": -1}, {}),
    ("Transpose", [(2, 3, 4)], {"perm": [1, 2, 0]}, {}),
    ("Flatten", [(2, 3, 4)], {"axis": 0}, {}),
]


@pytest.mark.parametrize("op, shapes, attrs, params", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_float_ops_match_onnx_reference(rng, op, shapes, attrs, params):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    values = {k: (rng.random(s) + 0.5 if k == "var" else rng.standard_normal(s)).astype(np.float32)
              for k, s in params.items()}
    names = [f"x{i}" for i in range(len(xs))] + list(values)
    model = helper.make_model(
        helper.make_graph([helper.make_node(op, names, ["y"], **attrs)], "one",
                          [helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, x.shape)
                           for i, x in enumerate(xs)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in values.items()]),
        opset_imports=[helper.make_opsetid("", 20)])
    (expected,) = ReferenceEvaluator(model).run(None, {f"x{i}": x for i, x in enumerate(xs)})
    graph = Graph([Node(op, names, ["y"], attrs)], {f"x{i}": TensorSpec(x.shape) for i, x in enumerate(xs)}, ["y"],
                  values).validate()
    np.testing.assert_allclose(_run(graph, *xs), expected, rtol=1e-5, atol=1e-5)


# ---- passes --------------------------------------------------------------------------------------------------------

def _bn_params(rng, n):
    return (rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n), rng.random(n) + 0.1)


def test_fold_batch_norm_is_exact_and_pure(rng):
    w, b = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    g = GraphBuilder({"x": TensorSpec((None, 3, 6, 6))})
    h = g.batch_norm(g.conv("x", w, b, pads=(1, 1, 1, 1)), *_bn_params(rng, 8))
    h = g.flatten(g.global_average_pool(h))
    y = g.batch_norm(g.gemm(h, rng.standard_normal((5, 8))), *_bn_params(rng, 5))
    graph = g.build([y])
    before = {k: v.copy() for k, v in graph.params.items()}
    folded = fold_batch_norm(graph)
    assert [n.op for n in folded.nodes] == ["Conv", "GlobalAveragePool", "Flatten", "Gemm"]
    assert len(graph.nodes) == 6 and all(np.array_equal(before[k], v) for k, v in graph.params.items())
    assert not any("scale" in k or "mean" in k for k in folded.params)
    x = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(Session(folded, optimize=False).run(x)[y], Session(graph, optimize=False).run(x)[y],
                               rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_skips_shared_output(rng):
    g = GraphBuilder({"x": TensorSpec((None, 2, 4, 4))})
    c = g.conv("x", rng.standard_normal((2, 2, 1, 1)))
    graph = g.build([g.add(g.batch_norm(c, *_bn_params(rng, 2)), c)])
    assert [n.op for n in fold_batch_norm(graph).nodes] == ["Conv", "BatchNormalization", "Add"]


def test_fuse_activations(rng):
    g = GraphBuilder({"x": TensorSpec((None, 2, 4, 4))})
    a = g.relu(g.conv("x", rng.standard_normal((3, 2, 3, 3)), pads=(1, 1, 1, 1)))
    b = g.relu6(g.conv(a, rng.standard_normal((3, 3, 1, 1))))
    shared = g.conv(b, rng.standard_normal((3, 3, 1, 1)))
    c = g.add(g.relu(shared), shared)  # the conv output has two readers: not fused
    y = g.relu(g.gemm(g.flatten(c), rng.standard_normal((4, 48))))
    graph = g.build([y])
    fused = fuse_activations(graph)
    assert [(n.op, n.attrs.get("activation")) for n in fused.nodes] == [
        ("Conv", "relu"), ("Conv", "relu6"), ("Conv", None), ("Relu", None), ("Add", None), ("Flatten", None),
        ("Gemm", "relu")]
    assert "activation" not in graph.nodes[0].attrs
    x = {"x": rng.standard_normal((2, 2, 4, 4)).astype(np.float32) * 4}
    np.testing.assert_allclose(Session(fused, optimize=False).run(x)[y], Session(graph, optimize=False).run(x)[y],
                               rtol=1e-5, atol=1e-5)


def test_fuse_skips_quantized_output_with_nonzero_zero_point():
    def qconv(zero_point):
        params = {n: np.array(v) for n, v in (("xs", 0.1), ("xz", np.uint8(0)), ("w", np.ones((1, 1, 1, 1), np.int8)),
                                              ("ws", 0.1), ("wz", np.int8(0)), ("ys", 0.1), ("yz", zero_point))}
        nodes = [Node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["q"]), Node("Relu", ["q"], ["y"])]
        return Graph(nodes, {"x": TensorSpec((1, 1, 2, 2), "uint8")}, ["y"], params).validate()

    assert [n.op for n in fuse_activations(qconv(np.int8(0))).nodes] == ["QLinearConv"]
    assert [n.op for n in fuse_activations(qconv(np.int8(3))).nodes] == ["QLinearConv", "Relu"]


# ---- Session -------------------------------------------------------------------------------------------------------

def _chain(rng, depth=6):
    layers = [("conv", rng.standard_normal((4, 4, 3, 3)) * 0.3, None, {"pads": (1, 1, 1, 1)}) for _ in range(depth)]
    return Sequential((None, 4, 8, 8), layers).graph


def test_buffers_are_reused_along_a_chain(rng):
    graph = _chain(rng)
    session = Session(graph, optimize=False)  # every conv output keeps its name (no channels-last renaming)
    x = {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    out = session.run(x)
    ((lane,),) = session._lanes.values()
    ((fetch, plan),) = lane.plans.items()
    assert plan.buffers == 2  # ping-pong: the output takes a freed buffer and is then never released
    # fetching every intermediate pins them all: one buffer each, same values
    names = [n.outputs[0] for n in graph.nodes]
    everything = session.run(x, fetch=names)
    assert max(p.buffers for p in lane.plans.values()) == len(names)
    np.testing.assert_array_equal(everything[names[-1]], out[names[-1]])
    h = x["x"]
    for node in graph.nodes:  # intermediates are right, not overwritten by later layers
        h = _conv_ref(h, graph.params[node.inputs[1]], None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        np.testing.assert_allclose(everything[node.outputs[0]], h, rtol=1e-4, atol=1e-4)


def test_views_keep_their_source_alive(rng):
    g = GraphBuilder({"x": TensorSpec((None, 4))})
    a = g.relu(g.reshape("x", [-1, 2, 2]))
    b = g.reshape(a, [-1, 4])  # a view of a, read after relu's buffer would otherwise be free
    c = g.add_node("Sigmoid", [g.add_node("Tanh", [b])])
    y = g.add(g.flatten(a), c)
    x = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    got = Session(g.build([y])).run(x)[y]
    r = np.maximum(x["x"], 0)
    np.testing.assert_allclose(got, r + 1 / (1 + np.exp(-np.tanh(r))), rtol=1e-6)


def test_run_returns_copies_and_caches_per_shape(rng):
    graph = _chain(rng, 2)
    session = Session(graph)
    y = graph.outputs[0]
    x2, x3 = (rng.standard_normal((n, 4, 8, 8)).astype(np.float32) for n in (2, 3))
    first = session.run({"x": x2})[y]
    first += 100
    assert not np.array_equal(session.run({"x": x2})[y], first)
    assert session.run({"x": x3})[y].shape == (3, 4, 8, 8)
    assert len(session._lanes) == 2


def test_bad_feeds_and_fetch_are_refused(rng):
    session = Session(_chain(rng, 1))
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="missing inputs \\['x'\\]"):
        session.run({})
    with pytest.raises(ValueError, match="unknown names \\['z'\\]"):
        session.run({"x": x, "z": x})
    with pytest.raises(TypeError, match="feeds\\['x'\\]: expected dtype float32, got float64"):
        session.run({"x": x.astype(np.float64)})
    with pytest.raises(ValueError, match="feeds\\['x'\\]: expected shape \\(None, 4, 8, 8\\)"):
        session.run({"x": x[:, :3]})
    with pytest.raises(TypeError, match="expected an ndarray"):
        session.run({"x": x.tolist()})
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        session.run({"x": x}, fetch=["nope"])
    with pytest.raises(ValueError, match="threads"):
        Session(_chain(rng, 1), threads=0)


def test_fetching_a_fused_tensor_explains(rng):
    g = GraphBuilder({"x": TensorSpec((None, 4, 8, 8))})
    c = g.conv("x", rng.standard_normal((4, 4, 1, 1)))
    graph = g.build([g.relu(c)])
    x = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    with pytest.raises(ValueError, match="optimize=False"):
        Session(graph).run(x, fetch=[c])
    assert Session(graph, optimize=False).run(x, fetch=[c])[c].min() < 0


def test_profile_rows_and_table(rng):
    graph = Sequential((None, 4, 8, 8), [("conv", rng.standard_normal((8, 4, 3, 3)), None, {"pads": (1, 1, 1, 1)}),
                                         ("relu",), ("global_average_pool",), ("flatten",),
                                         ("gemm", rng.standard_normal((3, 8)), np.zeros(3))]).graph
    profile = Session(graph, threads=1).profile({"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}, repeat=2)
    assert [r.op for r in profile.rows] == ["Conv", "GlobalAveragePool", "Flatten", "Gemm"]
    conv = profile.rows[0]
    assert conv.precision == "float32" and conv.ms > 0
    assert conv.gops == pytest.approx(2 * 2 * 8 * 64 * 36 / (conv.ms * 1e6))
    assert sum(r.share for r in profile.rows) == pytest.approx(100)
    assert profile.total_ms == pytest.approx(sum(r.ms for r in profile.rows))
    table = str(profile).splitlines()
    assert table[0].split()[:6] == ["node", "op", "precision", "ms", "GOPS", "share"]
    assert table[-2].startswith("total") and f"{profile.total_ms:.3f}" in table[-2]
    assert table[-1] == "ran: 4 float32"
    assert len({len(line) for line in table[2:-3] if not any(note in line for note in ("view", "BLAS", "conv2d"))}
               | {0}) <= 2  # rows without a note are as wide as each other


def test_fallback_keeps_the_faster_kernel(rng):
    def slow(ins, outs):
        for _ in range(200):
            np.multiply(ins[0], 2, out=outs[0])

    def fast(ins, outs):
        np.multiply(ins[0], 2, out=outs[0])

    @preparer("test.Double")
    def prepare_double(node, graph, inputs):
        (shape, dtype), = inputs
        primary, backup = (slow, fast) if node.attrs["slow"] else (fast, slow)
        return Kernel(primary, [(shape, dtype)], precision="int8", note="fake",
                      fallback=Kernel(backup, [(shape, dtype)]))

    try:
        x = {"x0": rng.standard_normal((64, 64)).astype(np.float32)}
        slow_graph = _one_node("test.Double", [(64, 64)], {"slow": True})
        profile = Session(slow_graph).profile(x, repeat=1)
        assert profile.rows[0].precision == "float32"
        assert profile.rows[0].note.startswith("fell back to float: int8 ") and " ms > float " in profile.rows[0].note
        assert Session(slow_graph, fallback=False).profile(x, repeat=1).rows[0].precision == "int8"
        kept = Session(_one_node("test.Double", [(64, 64)], {"slow": False})).profile(x, repeat=1).rows[0]
        assert kept.precision == "int8" and kept.note.startswith("fake; int8 ")
        (y,) = Session(slow_graph).run(x).values()
        np.testing.assert_array_equal(y, 2 * x["x0"])
    finally:
        del PREPARERS["test.Double"]


def test_unsupported_op_names_the_node():
    graph = Graph([Node("Frobnicate", ["x"], ["y"], name="f")], {"x": TensorSpec((1,))}, ["y"]).validate()
    with pytest.raises(NotImplementedError, match="node 'f': op 'Frobnicate'"):
        Session(graph).run({"x": np.zeros(1, np.float32)})


def test_int_max_pool_and_float_twin(rng):
    from lowbit.graph.ir import Graph, Node, TensorSpec
    from lowbit.runtime.passes import float_twin
    x = (rng.random((2, 3, 6, 6)) * 250).astype(np.uint8)
    node = Node("MaxPool", ["x"], ["y"], {"kernel_shape": [2, 2], "strides": [2, 2]}, "mp")
    graph = Graph([node], {"x": TensorSpec((None, 3, 6, 6), "uint8")}, ["y"], {})
    want = x.reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(Session(graph).run({"x": x})["y"], want)
    assert float_twin(graph) is None  # no int8 chain: nothing to twin


def _int4_mlp(rng):
    """x [N, 64] -> Int4Gemm (relu) -> TernaryGemm: weight-only layers, no QuantizeLinear."""
    codes = rng.integers(-8, 8, (16, 64)).astype(np.int8)
    scales = (rng.random((16, 2)) * 0.1 + 0.01).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    t_codes = rng.integers(-1, 2, (4, 16)).astype(np.int8)
    t_scales = (rng.random(4) + 0.5).astype(np.float32)
    params = {"c": codes, "s": scales, "b": bias, "tc": t_codes, "ts": t_scales}
    nodes = [Node("lowbit.Int4Gemm", ["x", "c", "s", "b"], ["h"], {"group_size": 32, "activation": "relu"}, "q4"),
             Node("lowbit.TernaryGemm", ["h", "tc", "ts"], ["y"], {}, "t")]
    graph = Graph(nodes, {"x": TensorSpec((None, 64))}, ["y"], params).validate()
    w4 = codes.astype(np.float64) * np.repeat(scales, 32, axis=1)
    expected = lambda x: np.maximum(x @ w4.T + bias, 0) @ (t_codes * t_scales[:, None]).T  # noqa: E731
    return graph, expected


def test_float_twin_of_weight_only_layers(rng):
    from lowbit.runtime.passes import float_twin
    graph, expected = _int4_mlp(rng)
    twin = float_twin(graph)
    assert [n.op for n in twin.nodes] == ["Gemm", "Gemm"] and twin.nodes[0].attrs["activation"] == "relu"
    x = rng.standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_allclose(Session(twin).run({"x": x})["y"], expected(x), rtol=1e-4, atol=1e-4)
    # an int4 convolution's (ky, kx, c) columns become OIHW filters
    codes = rng.integers(-8, 8, (6, 3 * 3 * 4)).astype(np.int8)
    scales = (rng.random((6, 2)) + 0.1).astype(np.float32)
    node = Node("lowbit.Int4Conv", ["x", "c", "s"], ["y"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                            "group_size": 32}, "c4")
    conv = Graph([node], {"x": TensorSpec((None, 4, 5, 5))}, ["y"], {"c": codes, "s": scales}).validate()
    w = (codes * np.repeat(scales, 32, axis=1)[:, :36]).reshape(6, 3, 3, 4).transpose(0, 3, 1, 2)
    xc = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    got = Session(float_twin(conv)).run({"x": xc})["y"]
    np.testing.assert_allclose(got, _conv_ref(xc, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), rtol=1e-4, atol=1e-4)
    quantized = Session(conv, fallback=False).run({"x": xc})["y"]  # activations rounded to int8 per group
    assert np.abs(quantized - got).max() < 0.05 * np.abs(got).max()


def test_session_runs_the_twin_when_the_quantized_graph_is_slower(rng, monkeypatch):
    import lowbit.quantization.formats as formats
    graph, expected = _int4_mlp(rng)
    x = {"x": rng.standard_normal((8, 64)).astype(np.float32)}
    real = formats.kernels.gemm_int4_plan

    def slow_int4_plan(*args, **kwargs):
        plan = real(*args, **kwargs)

        def slow(x, out=None):
            time.sleep(2e-3)
            return plan(x, out=out)

        return slow

    monkeypatch.setattr(formats.kernels, "gemm_int4_plan", slow_int4_plan)
    monkeypatch.setattr("lowbit.runtime.session.RACE_ROUNDS", 3)
    monkeypatch.setattr(Session, "_faster", staticmethod(lambda kernel, ins, outs: kernel))  # no per-node escape
    session = Session(graph)
    rows = session.profile(x, repeat=1).rows
    assert [r.op for r in rows] == ["Gemm", "Gemm"] and all(r.precision == "float32" for r in rows)
    assert all(r.note.startswith("fell back to float: the quantized graph ") and " > its float twin " in r.note
               for r in rows)
    np.testing.assert_allclose(session.run(x)["y"], expected(x["x"]), rtol=1e-4, atol=1e-4)
    fixed = Session(graph, fallback=False).profile(x, repeat=1).rows  # never switches
    assert [r.precision for r in fixed] == ["int4", "ternary"]
    assert "fell back" not in fixed[0].note and "twin" not in fixed[0].note


def test_planned_buffers_start_on_cache_lines(rng):
    graph = _chain(rng, 3)
    session = Session(graph)
    session.run({"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)})
    ((lane,),) = session._lanes.values()
    (plan,) = lane.plans.values()
    assert all(out.ctypes.data % 64 == 0 for _, _, _, outs, _ in plan.steps for out in outs)


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("threads", [None, 2])
def test_batch_of_zero_runs_to_empty_outputs(precision, threads, rng):
    """A CNN (conv, pool, gemm) fed 0 images returns its outputs with a batch of 0, in float and in int8, node by
    node and in compiled chains."""
    from lowbit import quantize_model

    g = GraphBuilder({"x": TensorSpec((None, 3, 8, 8))})
    h = g.max_pool(g.relu(g.conv("x", rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0, 0.1, 8), pads=(1, 1, 1, 1))),
                   (2, 2))
    graph = g.build([g.gemm(g.flatten(h), rng.normal(0, 0.05, (10, 128)), np.zeros(10))])
    if precision == "int8":
        graph = quantize_model(graph, [rng.standard_normal((4, 3, 8, 8)).astype(np.float32)], {"precision": "int8"})
    session = Session(graph, threads=threads)
    (y,) = session.run({"x": np.zeros((0, 3, 8, 8), np.float32)}).values()
    assert y.shape == (0, 10) and y.dtype == np.float32
    assert session.run({"x": np.ones((2, 3, 8, 8), np.float32)})[graph.outputs[0]].shape == (2, 10)  # still fine
