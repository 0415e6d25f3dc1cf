"""The quantized ops' preparers against NumPy references, and their float fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.reference.conv import conv2d_ref
from kernels.reference.int4 import gemm_int4_ref
from kernels.reference.int8 import finish_ref, linear_int8_ref
from kernels.reference.ternary import gemm_ternary_ref
from lowbit.graph.ir import Graph, Node
from lowbit.quantization.formats import FORMATS
from lowbit.quantization.qdq import dequantize_linear, dynamic_quantize_linear, quantize_linear
from lowbit.runtime.registry import prepare

CONV = {"strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 1], "group": 1}


def run(op: str, x: np.ndarray, params: list, attrs: dict | None = None, *, fallback: bool = False):
    """Prepare a one-node graph of ``op`` on ``x`` and ``params`` (None = absent input) and call it."""
    names = [f"p{i}" if p is not None else "" for i, p in enumerate(params)]
    graph = Graph([], {"x": None}, [], {n: p for n, p in zip(names, params) if n})
    node = Node(op, ["x", *names], ["y"], dict(attrs or {}), "node")
    kernel = prepare(node, graph, [(x.shape, x.dtype)])
    if fallback:
        assert kernel.fallback is not None and kernel.fallback.precision == "float32"
        assert kernel.fallback.outputs == kernel.outputs
        kernel = kernel.fallback
    outs = [np.empty(shape, dtype) for shape, dtype in kernel.outputs]
    return kernel([x], outs)[0], kernel


def qconv_params(rng, o=6, c=4, k=3, group=1):
    w = rng.integers(-127, 128, (o, c // group, k, k)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, o).astype(np.float32)
    bias = rng.integers(-2000, 2000, o).astype(np.int32)
    return w, w_scale, bias


def test_quantize_dequantize_linear_match_onnx(rng):
    x = rng.normal(0, 3, (2, 3, 5, 5)).astype(np.float32)
    for zero in (np.uint8(128), np.int8(-3)):
        scale = np.float32(0.05)
        q, kernel = run("QuantizeLinear", x, [scale, zero])
        assert q.dtype == zero.dtype and kernel.precision == "int8"
        np.testing.assert_array_equal(q, quantize_linear(x, scale, zero))
        back, _ = run("DequantizeLinear", q, [scale, zero])
        np.testing.assert_array_equal(back, dequantize_linear(q, scale, zero))


def test_quantize_linear_rejects_per_axis_scales_and_bad_dtypes(rng):
    x = rng.normal(size=(2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="per tensor"):
        run("QuantizeLinear", x, [np.ones(3, np.float32), np.uint8(0)])
    with pytest.raises(ValueError, match="positive"):
        run("QuantizeLinear", x, [np.float32(0), np.uint8(0)])
    with pytest.raises(ValueError, match="is uint8 but the zero point is int8"):
        run("DequantizeLinear", np.zeros((2, 3), np.uint8), [np.float32(1), np.int8(0)])


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_qlinear_conv_is_bit_exact(rng, activation):
    x = rng.integers(0, 256, (2, 4, 7, 6)).astype(np.uint8)
    w, w_scale, bias = qconv_params(rng)
    xs, xz, ys, yz = np.float32(0.02), np.uint8(120), np.float32(0.05), np.uint8(10)
    attrs = {**CONV, "kernel_shape": [3, 3], **({"activation": activation} if activation else {})}
    y, kernel = run("QLinearConv", x, [xs, xz, w, w_scale, np.int8(0), ys, yz, bias], attrs)
    acc = conv2d_ref(x, w, x_zero_point=120, strides=(2, 1), pads=(1, 0, 1, 1))
    n, o, oh, ow = acc.shape
    rows = acc.transpose(0, 2, 3, 1).reshape(-1, o)
    want = finish_ref(rows, a_scale=xs, w_scale=w_scale, bias=bias, activation=activation, out_dtype=np.uint8,
                      out_scale=ys, out_zero_point=yz).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(y, want)
    assert kernel.precision == "int8" and kernel.ops == 2 * y.size * 4 * 9
    fb, _ = run("QLinearConv", x, [xs, xz, w, w_scale, np.int8(0), ys, yz, bias], attrs, fallback=True)
    assert np.abs(fb.astype(int) - want.astype(int)).max() <= 1


def test_qlinear_conv_grouped_and_int8_input(rng):
    x = rng.integers(-128, 128, (1, 4, 5, 5)).astype(np.int8)
    w, w_scale, _ = qconv_params(rng, o=4, c=4, group=2)
    y, _ = run("QLinearConv", x, [np.float32(0.1), np.int8(-5), w, w_scale, None, np.float32(0.5), np.int8(0)],
               {"group": 2, "pads": [1, 1, 1, 1]})
    acc = conv2d_ref(x, w, x_zero_point=-5, pads=(1, 1, 1, 1), group=2)
    real = acc * (np.float64(np.float32(0.1) * w_scale) / np.float64(0.5)).reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(y, np.clip(np.rint(real), -128, 127).astype(np.int8))


def test_qlinear_conv_errors(rng):
    x = rng.integers(0, 256, (1, 4, 5, 5)).astype(np.uint8)
    w, w_scale, _ = qconv_params(rng)
    base = [np.float32(0.1), np.uint8(0), w, w_scale, None, np.float32(0.1), np.uint8(0)]
    with pytest.raises(ValueError, match="kernel_shape"):
        run("QLinearConv", x, base, {"kernel_shape": [1, 1]})
    with pytest.raises(ValueError, match="activation"):
        run("QLinearConv", x, base, {"activation": "gelu"})
    with pytest.raises(ValueError, match="weights must be int8"):
        run("QLinearConv", x, base[:2] + [w.astype(np.float32)] + base[3:])
    with pytest.raises(ValueError, match="must be 4-D"):
        run("QLinearConv", x[0], base)


@pytest.mark.parametrize("quantized_out", [True, False])
def test_qgemm_matches_linear_int8_reference(rng, quantized_out):
    x = rng.integers(0, 256, (5, 40)).astype(np.uint8)
    w = rng.integers(-127, 128, (12, 40)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, 12).astype(np.float32)
    bias = rng.normal(size=12).astype(np.float32)
    out = [np.float32(0.03), np.uint8(7)] if quantized_out else ["", ""]
    params = [np.float32(0.02), np.uint8(128), w, w_scale, np.int8(0), *out, bias]
    params = [None if isinstance(p, str) else p for p in params]
    y, kernel = run("lowbit.QGemm", x, params, {"activation": "relu"})
    want = linear_int8_ref(x, w, a_scale=np.float32(0.02), a_zero_point=128, w_scale=w_scale, bias=bias,
                           activation="relu", out_dtype=np.uint8 if quantized_out else np.float32,
                           out_scale=np.float32(0.03) if quantized_out else None,
                           out_zero_point=7 if quantized_out else None)
    if quantized_out:
        np.testing.assert_array_equal(y, want)
    else:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert kernel.ops == 2 * 5 * 12 * 40 and kernel.precision == "int8"
    fb, _ = run("lowbit.QGemm", x, params, {"activation": "relu"}, fallback=True)
    np.testing.assert_allclose(fb.astype(np.float32), want.astype(np.float32), atol=1.0 if quantized_out else 1e-4)


def test_dynamic_qgemm(rng):
    x = rng.normal(size=(3, 20)).astype(np.float32)
    w = rng.integers(-127, 128, (8, 20)).astype(np.int8)
    w_scale = np.full(8, 0.01, np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    y, _ = run("lowbit.DynamicQGemm", x, [w, w_scale, None, bias])
    codes, scale, zero = dynamic_quantize_linear(x)
    want = linear_int8_ref(codes, w, a_scale=scale, a_zero_point=int(zero), w_scale=w_scale, bias=bias)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, x @ (w * w_scale[:, None]).T + bias, atol=0.05)
    fb, _ = run("lowbit.DynamicQGemm", x, [w, w_scale, None, bias], fallback=True)
    np.testing.assert_allclose(fb, x @ (w * w_scale[:, None]).T + bias, rtol=1e-5, atol=1e-5)


def test_int4_gemm_matches_reference(rng):
    x = rng.normal(size=(3, 70)).astype(np.float32)
    codes = rng.integers(-8, 8, (16, 70)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (16, 3)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    y, kernel = run("lowbit.Int4Gemm", x, [codes, scales, bias], {"group_size": 32, "activation": "relu6"})
    want = np.clip(gemm_int4_ref(x, codes, scales, group_size=32) + bias, 0, 6)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    assert kernel.precision == "int4"
    with pytest.raises(ValueError, match="group_size"):
        run("lowbit.Int4Gemm", x, [codes, scales, bias], {"group_size": 16})
    with pytest.raises(ValueError, match="scales must have shape"):
        run("lowbit.Int4Gemm", x, [codes, scales[:, :2], bias], {"group_size": 32})


def test_int4_conv_matches_float_conv_of_dequantized_codes(rng):
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    o, group, k = 6, 2, 3
    codes = rng.integers(-8, 8, (o, k * k * 4 // group)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (o, 1)).astype(np.float32)
    attrs = {"kernel_shape": [k, k], "pads": [1, 1, 1, 1], "group": group, "group_size": 32}
    y, kernel = run("lowbit.Int4Conv", x, [codes, scales, None], attrs)
    fb, _ = run("lowbit.Int4Conv", x, [codes, scales, None], attrs, fallback=True)
    assert y.shape == (2, 6, 6, 6) and kernel.precision == "int4"
    # fallback: exact float conv of codes * scale in (ky, kx, c) column order
    w = (codes * scales).reshape(o, k, k, 4 // group).transpose(0, 3, 1, 2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros_like(y)
    for g in range(group):
        for ky in range(k):
            for kx in range(k):
                ref[:, g * 3:(g + 1) * 3] += np.einsum("nchw,oc->nohw", xp[:, g * 2:(g + 1) * 2, ky:ky + 6, kx:kx + 6],
                                                       w[g * 3:(g + 1) * 3, :, ky, kx])
    np.testing.assert_allclose(fb, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def test_ternary_gemm_matches_reference(rng):
    x = rng.normal(size=(4, 50)).astype(np.float32)
    codes = rng.integers(-1, 2, (10, 50)).astype(np.int8)
    scales = rng.uniform(0.1, 1, 10).astype(np.float32)
    y, kernel = run("lowbit.TernaryGemm", x, [codes, scales, None], {"activation": "relu"})
    np.testing.assert_allclose(y, np.maximum(gemm_ternary_ref(x, codes, scales[:, None]), 0), rtol=1e-6, atol=1e-6)
    assert kernel.precision == "ternary"
    with pytest.raises(ValueError, match=r"values -1..1 \(ternary\), got int8 of shape \(10, 50\) with values -2..2"):
        run("lowbit.TernaryGemm", x, [codes * 2, scales, None])


@pytest.mark.parametrize("name", [f for f, fmt in FORMATS.items() if fmt.product is not None])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5)])
def test_weight_only_gemm_of_every_format(rng, name, lead):
    """Each weight-only Gemm op of the format table on x [..., K]: within the row's tolerance of x @ W.T on its own
    dequantized weights, its float fallback within float rounding; the bias and activation applied after."""
    fmt = FORMATS[name]
    k, n = 65, 63  # neither a multiple of a group nor of a panel
    w = rng.normal(0, 0.1, (n, k)).astype(np.float32)
    codes, scales = fmt.quantize(w)
    bias = rng.normal(size=n).astype(np.float32)
    x = rng.normal(size=(*lead, k)).astype(np.float32)
    attrs = {"activation": "relu"} | ({"group_size": fmt.group_size(None)} if fmt.grouped else {})
    y, kernel = run(fmt.ops["Gemm"], x, [codes, scales, bias], attrs)
    fb, _ = run(fmt.ops["Gemm"], x, [codes, scales, bias], attrs, fallback=True)
    w_q = fmt.dequantize(codes, scales, fmt.group_size(None)).astype(np.float64)
    want = np.maximum((sign(x) if fmt.binarizes_input else x) @ w_q.T + bias, 0)
    assert y.shape == (*lead, n) and kernel.precision == name
    np.testing.assert_allclose(fb, want, rtol=1e-5, atol=1e-5)
    assert np.abs(y - want).max() <= fmt.tolerance * np.abs(want).max()


@pytest.mark.parametrize("name", [f for f, fmt in FORMATS.items() if fmt.product is not None])
def test_weight_only_gemm_errors(rng, name):
    fmt = FORMATS[name]
    codes, scales = fmt.quantize(rng.normal(size=(8, 64)).astype(np.float32))
    attrs = {"group_size": fmt.group_size(None)} if fmt.grouped else {}
    x = np.ones((2, 64), np.float32)
    bad = codes.astype(np.int16)
    with pytest.raises(ValueError, match=f"codes must be {fmt.qtype.dtype}"):
        run(fmt.ops["Gemm"], x, [bad, scales, None], attrs)
    with pytest.raises(ValueError, match="scales must have shape"):
        run(fmt.ops["Gemm"], x, [codes, scales.reshape(8, -1)[:, :1].repeat(3, axis=1), None], attrs)
    with pytest.raises(ValueError, match=r"input x has 32 features"):
        run(fmt.ops["Gemm"], x[:, :32], [codes, scales, None], attrs)
    with pytest.raises(ValueError, match=r"input x must be float32 \[..., K\]"):
        run(fmt.ops["Gemm"], x[0], [codes, scales, None], attrs)
    if fmt.grouped:
        with pytest.raises(ValueError, match="attribute group_size is required"):
            run(fmt.ops["Gemm"], x, [codes, scales, None], {})


def sign(x):
    return np.where(x < 0, -1.0, 1.0)


def test_binary_gemm_is_exact(rng):
    x = rng.normal(size=(3, 100)).astype(np.float32)
    x[0, :5] = 0  # sign(0) = +1
    w = np.where(rng.random((9, 100)) < 0.5, -1, 1).astype(np.int8)
    alpha = rng.uniform(0.1, 1, 9).astype(np.float32)
    bias = rng.normal(size=9).astype(np.float32)
    y, kernel = run("lowbit.BinaryGemm", x, [w, alpha, bias], {"activation": "relu"})
    want = np.maximum((sign(x) @ w.T) * alpha.astype(np.float64) + bias, 0).astype(np.float32)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert kernel.precision == "binary"
    fb, _ = run("lowbit.BinaryGemm", x, [w, alpha, bias], {"activation": "relu"}, fallback=True)
    np.testing.assert_allclose(fb, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="-1 and \\+1"):
        run("lowbit.BinaryGemm", x, [np.zeros_like(w), alpha, bias])


@pytest.mark.parametrize("pad_value", [0, 1, -1])
def test_binary_conv_is_exact(rng, pad_value):
    x = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    w = np.where(rng.random((4, 5, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    alpha = rng.uniform(0.1, 1, 4).astype(np.float32)
    attrs = {**CONV, "kernel_shape": [3, 3], "pad_value": pad_value}
    y, kernel = run("lowbit.BinaryConv", x, [w, alpha, None], attrs)
    dots = conv2d_ref(sign(x).astype(np.int64), w, strides=(2, 1), pads=(1, 0, 1, 1), pad_value=pad_value)
    want = (dots * alpha.astype(np.float64).reshape(1, -1, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert kernel.precision == "binary"
    fb, _ = run("lowbit.BinaryConv", x, [w, alpha, None], attrs, fallback=True)
    np.testing.assert_allclose(fb, want, rtol=1e-5, atol=1e-4)


def test_binary_conv_errors(rng):
    x = rng.normal(size=(1, 4, 5, 5)).astype(np.float32)
    w = np.ones((4, 2, 3, 3), np.int8)
    with pytest.raises(ValueError, match="group 1"):
        run("lowbit.BinaryConv", x, [w, np.ones(4, np.float32), None], {"group": 2})
    with pytest.raises(ValueError, match="pad_value"):
        run("lowbit.BinaryConv", x, [np.ones((4, 4, 3, 3), np.int8), np.ones(4, np.float32), None],
            {"pad_value": 2})


def test_weights_must_be_parameters(rng):
    x = rng.normal(size=(2, 8)).astype(np.float32)
    graph = Graph([], {}, [], {"s": np.ones(4, np.float32)})
    node = Node("lowbit.TernaryGemm", ["x", "w", "s"], ["y"], {}, "t")
    with pytest.raises(ValueError, match="must be a parameter"):
        prepare(node, graph, [(x.shape, x.dtype)])


def test_split_constant_bias_keeps_the_values_and_gives_the_product_an_entry(rng):
    """A weight-only product's constant bias moves into an Add after it: same values, and the product (which has a
    compiled entry only without its bias) and the Add chain."""
    from lowbit.graph.ir import TensorSpec
    from lowbit.runtime.passes import split_constant_bias
    from lowbit.runtime.session import Session

    fmt = FORMATS["int4"]
    codes, scales = fmt.quantize(rng.normal(size=(24, 64)).astype(np.float32))
    params = {"c": codes, "s": scales, "b": rng.normal(size=24).astype(np.float32)}
    nodes = [Node(fmt.ops["Gemm"], ["x", "c", "s", "b"], ["y"], {"group_size": fmt.group_size(None)}, "q"),
             Node(fmt.ops["Gemm"], ["x", "c", "s", "b"], ["z"], {"group_size": 32, "activation": "relu"}, "r")]
    graph = Graph(nodes, {"x": TensorSpec((None, 64))}, ["y", "z"], params).validate()
    split = split_constant_bias(graph)
    assert [(n.op, n.inputs) for n in split.nodes] == [(fmt.ops["Gemm"], ["x", "c", "s"]), ("Add", ["y_unbiased", "b"]),
                                                       (fmt.ops["Gemm"], ["x", "c", "s", "b"])]
    x = {"x": rng.normal(size=(3, 64)).astype(np.float32)}
    before, after = (Session(g, fallback=False, threads=1).run(x) for g in (graph, split))
    np.testing.assert_array_equal(before["y"], after["y"])
    np.testing.assert_array_equal(before["z"], after["z"])
