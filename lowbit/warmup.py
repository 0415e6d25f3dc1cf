"""Compile every kernel ahead into Numba's on-disk cache, so that a model's first run does not pay for it.

Each public kernel is called once on tiny inputs, in every output mode the
runtime uses, at the active CPU level (``LOWBIT_ISA`` included). Compiled code
is cached per CPU and per version of the ``kernels`` sources, so this runs once
after an install or upgrade; later processes load from the cache.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from numba.core import event

import kernels
from lowbit.quantization.formats import FORMATS


def _calls() -> list[tuple[str, Callable[[], object]]]:
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (1, 8, 6, 6), dtype=np.uint8)
    w8 = rng.integers(-128, 128, (8, 8, 3, 3), dtype=np.int8)
    dw = rng.integers(-128, 128, (8, 1, 3, 3), dtype=np.int8)
    a = rng.integers(0, 256, (9, 64), dtype=np.uint8)
    w = rng.integers(-128, 128, (64, 64), dtype=np.int8)
    xf = rng.standard_normal((9, 64), dtype=np.float32)
    wf = rng.standard_normal((64, 64), dtype=np.float32)
    signs = kernels.pack_bits(rng.choice(np.array([-1, 1], np.int8), (1, 6, 6, 64)), axis=-1)
    bits = kernels.pack_bits(rng.choice(np.array([-1, 1], np.int8), (9, 64)))
    wb = kernels.pack_conv_binary(rng.choice(np.array([-1, 1], np.int8), (8, 64, 3, 3)))
    calls = [
        ("gemm_int8", lambda: kernels.gemm_int8(a, w)),
        ("gemv_int8", lambda: kernels.gemm_int8(a[:1], w)),
        ("conv2d_int8", lambda: kernels.conv2d_int8(x8, w8, pads="same")),
        ("linear_float32", lambda: kernels.linear_float32_plan(wf)(xf)),
        ("attention", lambda: kernels.attention(xf[None], xf[None], xf[None], np.zeros((1, 1, 1, 9), np.float32),
                                                heads=2)),
        ("conv2d_binary", lambda: kernels.conv2d_binary(signs, wb, in_channels=64, pads="same",
                                                        multiplier=np.ones(8), bias=np.zeros(8))),
        ("conv2d_int4", lambda: kernels.conv2d_int4(x8.astype(np.float32),
                                                    kernels.pack_conv_int4(w8.astype(np.float32), group_size=32))),
        ("conv2d_float32", lambda: kernels.conv2d_float32(x8.astype(np.float32), w8.astype(np.float32), pads="same")),
        ("max_pool2d", lambda: kernels.max_pool2d(x8, 2, strides=2)),
        ("max_pool2d float32", lambda: kernels.max_pool2d(x8.astype(np.float32), 2, strides=2)),
        ("max_pool2d_bits", lambda: kernels.max_pool2d_bits(signs, 2, strides=2)),
        ("avg_pool2d", lambda: kernels.avg_pool2d(x8, 2, 0.1, 3, 0.1, 3, strides=2)),
        ("avg_pool2d_float32", lambda: kernels.avg_pool2d_float32(x8.astype(np.float32), 2, strides=2)),
        ("global_avg_pool2d", lambda: kernels.global_avg_pool2d(x8, 0.1, 3, 0.1, 3)),
        ("gemm_binary", lambda: kernels.gemm_binary(bits, bits, 64)),
        ("gemm_binary float32", lambda: kernels.gemm_binary(bits, bits, 64, multiplier=np.ones(9), bias=np.zeros(9))),
        ("gemm_binary_to_bits", lambda: kernels.gemm_binary_to_bits(bits, bits, 64, thresholds=np.zeros(9))),
        ("gemm_binary_int8", lambda: kernels.gemm_binary_int8(w[:9], bits, 64)),
        ("gemm_int4", lambda: kernels.gemm_int4(xf, kernels.pack_int4(wf, group_size=32))),
        ("gemm_ternary", lambda: kernels.gemm_ternary(xf, kernels.pack_ternary(wf))),
        ("gemm_codebook", lambda: kernels.gemm_codebook(xf, kernels.pack_codebook_weights(wf, np.linspace(-1, 1, 16),
                                                                                          group_size=32))),
        ("linear_dynamic_int8", lambda: kernels.linear_dynamic_int8(xf, kernels.pack_int8(w), w_scale=0.01)),
        ("quantize_linear", lambda: kernels.quantize_linear(xf, 0.1, 3)),
        ("quantize_linear_to_nhwc", lambda: kernels.quantize_linear_to_nhwc(x8.astype(np.float32), 0.1, 3)),
        ("dequantize_linear", lambda: kernels.dequantize_linear(a, 0.1, 3)),
        ("dynamic_quantize_linear", lambda: kernels.dynamic_quantize_linear(xf)),
        ("layer_norm", lambda: kernels.layer_norm(xf, wf[0], wf[1])),
        ("softmax", lambda: kernels.softmax(xf)),
        ("nchw_to_nhwc", lambda: kernels.nchw_to_nhwc(x8)),
        ("nhwc_to_nchw", lambda: kernels.nhwc_to_nchw(x8)),
        ("qlinear_lookup", lambda: kernels.qlinear_lookup(x8, np.arange(256, dtype=np.uint8))),
    ]
    for fmt in FORMATS.values():  # the weight-only products, as the runtime plans them
        if fmt.product is not None:
            codes, scales = fmt.quantize(wf)
            calls.append((f"gemm {fmt.name}", lambda f=fmt, c=codes, s=scales: f.plan(c, s, f.group_size(None), 9)(xf)))
    for x_dtype in (np.uint8, np.int8):  # both code types in, as ONNX Runtime's quantizer writes either
        xs = x8.astype(x_dtype)
        calls.append((f"qlinear_add {np.dtype(x_dtype)}", lambda xs=xs: kernels.qlinear_add(
            xs, 0.1, 3, xs, 0.2, 3, 0.3, np.uint8(3))))
        calls.append((f"qlinear_mul {np.dtype(x_dtype)}", lambda xs=xs: kernels.qlinear_mul(
            xs, 0.1, 3, xs[:, :, :1, :1], 0.2, 3, 0.3, np.int8(3))))
    for out_dtype, y_scale, y_zp in ((np.uint8, 0.5, 128), (np.int8, 0.5, 0), (np.float32, None, None)):
        calls.append((f"linear_int8 -> {np.dtype(out_dtype)}", lambda o=out_dtype, s=y_scale, z=y_zp: kernels.linear_int8(
            a, w, a_scale=0.1, a_zero_point=3, w_scale=0.01, out_dtype=o, out_scale=s, out_zero_point=z)))
        calls.append((f"qlinear_conv2d -> {np.dtype(out_dtype)}", lambda o=out_dtype, s=y_scale, z=y_zp: kernels.qlinear_conv2d(
            x8, 0.1, 3, w8, 0.01, 0, s, z, pads="same", activation="relu", out_dtype=o)))
        calls.append((f"depthwise -> {np.dtype(out_dtype)}", lambda o=out_dtype, s=y_scale, z=y_zp: kernels.qlinear_conv2d(
            x8, 0.1, 3, dw, 0.01, 0, s, z, pads="same", group=8, out_dtype=o)))
    return calls


def warmup(progress: Callable[[str], None] = print) -> tuple[float, int]:
    """Call every kernel once (compiling it or loading it from the cache); returns the seconds it took and how many
    functions Numba compiled (0: everything came from the cache)."""
    start = time.perf_counter()
    with event.install_recorder("numba:compile") as recorder:
        for name, call in _calls():
            t0 = time.perf_counter()
            call()
            progress(f"  {name:<28} {time.perf_counter() - t0:6.2f} s")
    compiled = sum(1 for _, ev in recorder.buffer if ev.is_start)
    return time.perf_counter() - start, compiled
