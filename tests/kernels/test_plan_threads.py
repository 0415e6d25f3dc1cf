"""Every plan kind called from many threads at once gives what sequential calls give (plans hold no per-call state
that another call could overwrite: scratch and row sums are the call's own)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kernels
from lowbit.quantization.scheme import NF4

THREADS = 8
CALLS = 64


def _u8(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _plans(rng):
    """name -> (plan call taking one input, a maker of inputs)."""
    w8 = rng.integers(-127, 128, (40, 72), dtype=np.int8)
    wf = _f32(rng, (40, 72)) * 0.1
    w_conv = rng.integers(-127, 128, (12, 6, 3, 3), dtype=np.int8)
    zp = rng.integers(-3, 4, 12).astype(np.int8)  # per-channel weight zero points: the conv's row-sum path
    conv = kernels.qlinear_conv2d_plan(w_conv, (2, 6, 9, 9), 0.02, 128, np.full(12, 0.01, np.float32), zp, 0.05, 128,
                                       pads=(1, 1, 1, 1))
    conv_int8 = kernels.conv2d_int8_plan(w_conv, (2, 6, 9, 9), x_zero_point=3, w_zero_point=zp, pads=(1, 1, 1, 1))
    attention = kernels.attention_plan((2, 16, 32), (2, 16, 32), (2, 16, 32), heads=4)
    plans = {
        "linear_int8": (kernels.linear_int8_plan(w8, a_scale=0.02, a_zero_point=128, w_scale=0.01, out_dtype=np.uint8,
                                                 out_scale=0.5, out_zero_point=128), lambda: _u8(rng, (9, 72))),
        "gemm_int8": (kernels.gemm_int8_plan(w8, a_zero_point=5, b_zero_point=zp.repeat(4)[:40]),
                      lambda: _u8(rng, (9, 72))),
        "linear_dynamic_int8 per row": (kernels.linear_dynamic_int8_plan(kernels.pack_int8(w8), np.full(40, 0.01,
                                        np.float32), per_row=True), lambda: _f32(rng, (9, 72))),
        "qlinear_conv2d": (conv, lambda: _u8(rng, (2, 6, 9, 9))),
        "conv2d_int8": (conv_int8, lambda: _u8(rng, (2, 6, 9, 9))),
        "gemm_int4": (kernels.gemm_int4_plan(kernels.pack_int4(wf, 32), 9), lambda: _f32(rng, (9, 72))),
        "gemm_ternary": (kernels.gemm_ternary_plan(kernels.pack_ternary(wf), 9), lambda: _f32(rng, (9, 72))),
        "gemm_codebook": (kernels.gemm_codebook_plan(kernels.pack_codebook_weights(wf, NF4, 32), 9),
                          lambda: _f32(rng, (9, 72))),
        "gemm_binary": (kernels.gemm_binary_plan(kernels.pack_bits(wf), 72, 9, multiplier=np.ones(40)),
                        lambda: kernels.pack_bits(_f32(rng, (9, 72)))),
        "linear_float32": (kernels.linear_float32_plan(np.ascontiguousarray(wf.T)), lambda: _f32(rng, (9, 72))),
        "layer_norm": (kernels.layer_norm_plan((9, 72), np.ones(72, np.float32)), lambda: _f32(rng, (9, 72))),
        "softmax": (kernels.softmax_plan((9, 72)), lambda: _f32(rng, (9, 72))),
        "max_pool2d": (kernels.max_pool2d_plan((2, 6, 9, 9), np.uint8, 2, strides=2),
                       lambda: _u8(rng, (2, 6, 9, 9))),
        "attention": (lambda qkv: attention(*qkv), lambda: tuple(_f32(rng, (2, 16, 32)) for _ in range(3))),
    }
    return plans


@pytest.mark.parametrize("name", list(_plans(np.random.default_rng(0))))
def test_a_plan_serves_many_threads(rng, name):
    plan, make = _plans(rng)[name]
    inputs = [make() for _ in range(4)]
    expected = [np.array(plan(x), copy=True) for x in inputs]
    jobs = [i % len(inputs) for i in range(CALLS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda j: np.array(plan(inputs[j]), copy=True), jobs))
    wrong = [j for j, got in zip(jobs, results) if not np.array_equal(got, expected[j])]
    assert not wrong, f"{name}: {len(wrong)} of {CALLS} concurrent calls differ from sequential ones"
