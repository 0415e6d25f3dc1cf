"""linear_int8: the fused quantized layer against the oracle (bit for bit) and a float model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import reference
from kernels.gemm.driver import K_CHUNK
from kernels.gemm.int8 import gemm_int8_plan


def _layer(rng, m, n, k, a_dtype=np.uint8, w_dtype=np.int8):
    ai, wi = np.iinfo(a_dtype), np.iinfo(w_dtype)
    return dict(
        a=rng.integers(ai.min, ai.max, (m, k), endpoint=True, dtype=a_dtype),
        w=rng.integers(wi.min, wi.max, (n, k), endpoint=True, dtype=w_dtype),
        a_scale=np.float32(0.02),
        a_zero_point=int(rng.integers(ai.min, ai.max)),
        w_scale=rng.uniform(0.001, 0.01, n).astype(np.float32),
    )


def _both(**kw):
    args = dict(kw)
    a, w = args.pop("a"), args.pop("w")
    return kernels.linear_int8(a, w, **args), reference.linear_int8_ref(a, w, **args)


OUTPUTS = [
    dict(out_dtype=np.float32),
    dict(out_dtype=np.uint8, out_scale=0.05, out_zero_point=128),
    dict(out_dtype=np.int8, out_scale=0.03, out_zero_point=-5),
]


@pytest.mark.parametrize("a_dtype", [np.uint8, np.int8], ids=str)
@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: np.dtype(o["out_dtype"]).name)
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("bias", [None, "float", "int32"])
def test_linear_matches_oracle(level, rng, a_dtype, output, activation, bias):
    for m, n, k in [(1, 1, 1), (3, 65, 63), (9, 130, 257)]:
        layer = _layer(rng, m, n, k, a_dtype)
        if bias == "float":
            layer["bias"] = rng.normal(0, 2, n).astype(np.float32)
        elif bias == "int32":
            layer["bias"] = rng.integers(-5000, 5000, n, dtype=np.int32)
        got, want = _both(**layer, activation=activation, **output)
        assert got.dtype == np.dtype(output["out_dtype"]) and got.shape == (m, n)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("w_dtype", [np.int8, np.uint8], ids=str)
def test_linear_weight_zero_points(level, rng, w_dtype):
    layer = _layer(rng, 7, 70, 100, np.uint8, w_dtype)
    info = np.iinfo(w_dtype)
    for zw in (int(rng.integers(info.min, info.max)), rng.integers(info.min, info.max, 70)):
        got, want = _both(**layer, w_zero_point=zw, out_dtype=np.uint8, out_scale=0.2, out_zero_point=100)
        np.testing.assert_array_equal(got, want)


def test_linear_float_output_is_the_real_layer(rng):
    """Against dequantize -> float matmul -> bias -> relu6, computed independently in float64."""
    layer = _layer(rng, 17, 90, 300, np.int8)
    bias = rng.normal(0, 1, 90)
    got = kernels.linear_int8(**layer, bias=bias.astype(np.float32), activation="relu6")
    real_a = (layer["a"].astype(np.float64) - layer["a_zero_point"]) * float(layer["a_scale"])
    real_w = layer["w"].astype(np.float64) * layer["w_scale"][:, None].astype(np.float64)
    want = np.clip(real_a @ real_w.T + bias.astype(np.float32), 0, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_linear_long_k_is_exact(rng):
    """K past one int32 chunk: partial sums are added in int64, so nothing wraps."""
    k = K_CHUNK + 1001
    a = np.full((2, k), 255, np.uint8)
    a[1, ::3] = 0
    w = np.full((3, k), -128, np.int8)
    got = kernels.linear_int8(a, w, a_scale=1.0, a_zero_point=0, w_scale=1.0)
    np.testing.assert_array_equal(got, reference.gemm_int8_ref(a, w).astype(np.float32))
    assert got[0, 0] == -255 * 128 * k  # far beyond int32


def test_linear_packed_weights_and_out(rng):
    layer = _layer(rng, 5, 64, 64)
    packed = kernels.pack_int8(layer["w"])
    out = np.empty((5, 64), np.float32)
    got = kernels.linear_int8(layer["a"], packed, out=out, **{k: v for k, v in layer.items() if k not in "aw"})
    assert got is out
    np.testing.assert_array_equal(out, _both(**layer)[1])


def test_linear_float16_scales_follow_onnx(rng):
    """The multiplier a_scale * w_scale / out_scale is formed in float16, as ONNX does."""
    layer = _layer(rng, 4, 8, 16)
    scales = dict(a_scale=np.float16(0.0157), w_scale=np.float16(0.0039), out_scale=np.float16(0.0123))
    layer.update(a_scale=scales["a_scale"], w_scale=scales["w_scale"])
    got, want = _both(**layer, out_dtype=np.uint8, out_scale=scales["out_scale"], out_zero_point=7)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("out_dtype,lo,hi", [(np.uint8, 0, 255), (np.int8, -128, 127)])
def test_linear_saturates(out_dtype, lo, hi):
    a = np.array([[255, 0]], np.uint8)
    w = np.array([[127, 0], [-128, 0]], np.int8)
    got = kernels.linear_int8(a, w, a_scale=1.0, a_zero_point=0, w_scale=1.0, out_dtype=out_dtype, out_scale=1.0)
    np.testing.assert_array_equal(got, [[hi, lo]])


def test_linear_rounds_half_to_even():
    a = np.array([[1, 3, 5, 7]], np.uint8).T.copy()  # four rows, K = 1
    w = np.ones((1, 1), np.int8)
    got = kernels.linear_int8(a, w, a_scale=0.5, a_zero_point=0, w_scale=1.0, out_dtype=np.int8, out_scale=1.0)
    np.testing.assert_array_equal(got.ravel(), [0, 2, 2, 4])  # 0.5, 1.5, 2.5, 3.5


@pytest.mark.parametrize("activation,expected", [(None, [0, 0, 4]), ("relu", [0, 0, 4]), ("relu6", [0, 0, 2])])
def test_linear_activation_in_quantized_units(activation, expected):
    """Real outputs -2, 0, 10 with out_scale 2.5: relu6 clips 10 to 6, i.e. 2.4, which rounds to 2."""
    a = np.array([[0], [2], [12]], np.uint8)
    w = np.ones((1, 1), np.int8)
    got = kernels.linear_int8(a, w, a_scale=1.0, a_zero_point=2, w_scale=1.0, activation=activation,
                              out_dtype=np.uint8, out_scale=2.5)
    np.testing.assert_array_equal(got.ravel(), expected)


def test_all_modes_compile_for_each_level(level, rng):
    """One call per output dtype and weight form, so every driver specialisation is exercised."""
    layer = _layer(rng, 3, 5, 7)
    for output, packed in itertools.product(OUTPUTS, (False, True)):
        args = dict(layer, **output)
        if packed:
            args["w"] = kernels.pack_int8(args["w"])
        np.testing.assert_array_equal(kernels.linear_int8(**args), reference.linear_int8_ref(**dict(layer, **output)))


def test_with_codes_only_where_safe():
    """Integer code bounds for a shift-free quantized epilogue whose codes fit int32; anything else unchanged."""
    from kernels.epilogue import CODES_LIMIT, with_codes
    from kernels.gemm.int8 import fused_epilogue

    epi, _ = fused_epilogue(3, 0.02, 0.01, None, "relu6", np.uint8, 0.05, 100)
    codes = with_codes(epi, 10**6)
    assert (codes.qmin, codes.qmax) == (100, 220)  # rint(0 + 100), rint(6 / 0.05 + 100)
    assert isinstance(codes.qmin, int) and codes.mult is epi.mult
    largest = int(CODES_LIMIT / epi.mult[0]) + 1
    assert with_codes(epi, largest) is epi  # the rounded codes could leave int32
    float_bias = fused_epilogue(3, 0.02, 0.01, np.ones(3, np.float32), None, np.uint8, 0.05, 100)[0]
    assert with_codes(float_bias, 10) is float_bias  # a shift to add
    real = fused_epilogue(3, 0.02, 0.01, None, None, np.float32, None, None)[0]
    assert with_codes(real, 10) is real


@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8], ids=str)
@pytest.mark.parametrize("scales", [(0.02, 0.05), (50.0, 1e-4)], ids=["codes", "huge-multiplier"])
def test_linear_quantized_epilogues(level, rng, out_dtype, scales):
    """Both vector epilogues of a quantized output (integer-clamped codes, or clamps on doubles when a
    multiplier of 5e4 could push the codes past int32) match the oracle, relu6 and a zero point included."""
    a_scale, out_scale = scales
    layer = _layer(rng, 13, 70, 300)
    layer["a_scale"] = np.float32(a_scale)
    zp = 3 if out_dtype == np.uint8 else -3
    got, want = _both(**layer, bias=rng.integers(-10**4, 10**4, 70).astype(np.int32), activation="relu6",
                      out_dtype=out_dtype, out_scale=out_scale, out_zero_point=zp)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(scale_exp=st.integers(-6, 3), out_zp=st.integers(-128, 127), activation=st.sampled_from([None, "relu", "relu6"]),
       m=st.integers(1, 9), n=st.integers(1, 70), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_linear_codes_property(scale_exp, out_zp, activation, m, n, k, seed):
    """Power-of-two scales put many results exactly halfway between codes: the integer-clamped epilogue
    rounds and clamps them as the oracle does, for int8 outputs of every zero point and activation."""
    rng = np.random.default_rng(seed)
    layer = _layer(rng, m, n, k)
    layer["a_scale"] = np.float32(2.0**scale_exp)
    layer["w_scale"] = np.float32(0.5)
    got, want = _both(**layer, activation=activation, out_dtype=np.int8, out_scale=np.float32(4.0),
                      out_zero_point=out_zp)
    np.testing.assert_array_equal(got, want)


# ---- entries (kernels.entry) and the one-shot plans kept on the packed weight ----------------------------------------

ENTRY_LAYERS = [  # (a dtype, weight zero points, output): every epilogue, with and without the row-sum term
    (np.uint8, 0, dict(out_dtype=np.float32, activation="relu")),
    (np.int8, 0, dict(out_dtype=np.uint8, out_scale=0.05, out_zero_point=128)),
    (np.uint8, "per-channel", dict(out_dtype=np.int8, out_scale=0.03, out_zero_point=-5, activation="relu6")),
    (np.int8, 3, dict(out_dtype=np.float32, bias="float")),
]


def _entry_cases(rng):
    """``(plan, a, want)`` per layer, for M = 1 (a GEMV variant) and 7 and K = 63 (activations copied and padded)."""
    cases = []
    for a_dtype, zw, output in ENTRY_LAYERS:
        for m, n, k in [(1, 65, 64), (7, 33, 63)]:
            layer = _layer(rng, m, n, k, a_dtype)
            a, w = layer.pop("a"), layer.pop("w")
            layer["w_zero_point"] = rng.integers(-20, 20, n) if zw == "per-channel" else zw
            args = dict(output)
            if args.get("bias") == "float":
                args["bias"] = rng.normal(0, 1, n).astype(np.float32)
            plan = kernels.linear_int8_plan(kernels.pack_int8(w), a_dtype=a_dtype, **layer, **args)
            cases.append((plan, a, reference.linear_int8_ref(a, w, **layer, **args)))
        b = rng.integers(-128, 128, (9, 63), dtype=np.int8)
        gemm_plan = gemm_int8_plan(kernels.pack_int8(b), a_dtype=a_dtype, a_zero_point=2)  # int32 output
        cases.append((gemm_plan, a, reference.gemm_int8_ref(a, b, a_zero_point=2)))
    return cases


def test_linear_entry_is_the_plan(level, rng):
    for plan, a, want in _entry_cases(rng):
        out = np.empty(want.shape, plan.out_dtype)
        assert plan.entry(a.shape[0])([a], [out]) is None
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(plan(a), want)
        a.setflags(write=False)  # the entry reads its input only
        plan.entry(a.shape[0])([a], [out])
        np.testing.assert_array_equal(out, want)


def test_linear_entries_run_compiled(rng, tmp_path, monkeypatch):
    from kernels.entry import In
    from lowbit.runtime.compiled import CompiledSteps

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    cases = _entry_cases(rng)
    outs = [np.empty(want.shape, plan.out_dtype) for plan, _, want in cases]
    steps = [(plan.entry(a.shape[0]), [In(i)], [out]) for i, ((plan, a, _), out) in enumerate(zip(cases, outs))]
    got = CompiledSteps(steps, feeds=len(cases), fetch=outs)([a for _, a, _ in cases])
    for result, (_, _, want) in zip(got, cases):
        np.testing.assert_array_equal(result, want)


def test_one_shot_keeps_its_plans_on_the_packed_weight(rng):
    layer = _layer(rng, 3, 20, 30)
    a, packed = layer.pop("a"), kernels.pack_int8(layer.pop("w"))
    first = kernels.linear_int8(a, packed, **layer)
    assert len(packed.plans) == 1
    np.testing.assert_array_equal(kernels.linear_int8(a, packed, **layer), first)
    assert len(packed.plans) == 1  # found, not made again
    layer["w_scale"] = layer["w_scale"] * 2  # another array: another plan, and the result follows it
    np.testing.assert_allclose(kernels.linear_int8(a, packed, **layer), first * 2, rtol=1e-6)
    scale = layer["w_scale"]
    scale *= 2  # the same array changed in place: its contents key the plan
    np.testing.assert_allclose(kernels.linear_int8(a, packed, **layer), first * 4, rtol=1e-6)
    assert len(packed.plans) == 3
    for zp in range(20):  # bounded
        kernels.gemm_int8(a, packed, a_zero_point=zp)
    assert len(packed.plans) == packed.plans.size
