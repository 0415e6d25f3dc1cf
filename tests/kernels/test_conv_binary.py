"""Binary (XNOR-popcount) convolution: bit-exact against the NumPy oracle on every conv_binary level.

The oracle is ``kernels.reference.conv.conv2d_ref`` on the ±1 values (exact int64,
NCHW, border ``pad_value``); fused outputs are checked against NumPy float math and
against ``pack_bits`` of the thresholded oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels import cpu, dispatch
from kernels.conv.binary import conv2d_binary
from kernels.conv.geometry import resolve_pads
from kernels.gemm.popcount_lanes import CHUNK_WORDS
from kernels.pack.bits import pack_bits, word_count
from kernels.pack.conv_binary import PackedConvBinary, pack_conv_binary
from kernels.reference.conv import conv2d_ref
from tests.levels import level_fixture

level = level_fixture("conv_binary")
CHANNELS = (1, 7, 63, 64, 65, 130)
# kernel, strides, dilations, pads, pad_value, (batch, H, W), out channels: together every attribute
GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1), "same", 1, (1, 7, 9), 17),
    ((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 0, (2, 5, 4), 1),
    ((5, 5), (2, 2), (1, 1), (2, 1, 0, 3), 0, (1, 9, 8), 70),
    ((3, 1), (1, 2), (2, 1), (1, 0, 2, 1), -1, (2, 6, 5), 33),
    ((3, 3), (2, 1), (2, 2), "same_lower", 0, (1, 11, 7), 64),
    ((1, 1), (2, 2), (1, 1), 1, -1, (1, 5, 6), 16),
]


def _signs(rng, shape) -> np.ndarray:
    return rng.choice(np.array([-1, 1], np.int8), size=shape)


def _case(rng, channels, kernel_hw, batch_hw, out_channels):
    x = _signs(rng, (batch_hw[0], channels, *batch_hw[1:]))
    w = _signs(rng, (out_channels, channels, *kernel_hw))
    return x, w, pack_bits(x.transpose(0, 2, 3, 1), axis=-1)


def _reference(x, w, strides, pads, dilations, pad_value) -> np.ndarray:
    """The oracle in NHWC, int64."""
    resolved = resolve_pads(pads, x.shape[2:], w.shape[2:], strides, dilations)
    y = conv2d_ref(x, w, strides=strides, pads=resolved, dilations=dilations, pad_value=pad_value)
    return y.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0][0]}x{g[0][1]}-s{g[1][0]}{g[1][1]}-p{g[4]}")
@pytest.mark.parametrize("channels", CHANNELS)
def test_exact(level, rng, channels, geometry):
    kernel_hw, strides, dilations, pads, pad_value, batch_hw, out_channels = geometry
    x, w, x_bits = _case(rng, channels, kernel_hw, batch_hw, out_channels)
    y = conv2d_binary(x_bits, w, in_channels=channels, strides=strides, pads=pads, pad_value=pad_value,
                      dilations=dilations)
    assert y.dtype == np.int32 and y.flags.c_contiguous
    np.testing.assert_array_equal(y, _reference(x, w, strides, pads, dilations, pad_value))


@pytest.mark.parametrize("pad_value", [1, 0, -1])
def test_long_filters_and_packed_weights(level, rng, pad_value):
    """More words than one count of the eights allows (see popcount_lanes.CHUNK_WORDS), float weights."""
    channels = 64 * (2 * CHUNK_WORDS // 9 + 1)
    x, w, x_bits = _case(rng, channels, (3, 3), (1, 3, 4), 20)
    packed = pack_conv_binary(w.astype(np.float32))
    assert isinstance(packed, PackedConvBinary) and packed.words > 2 * CHUNK_WORDS
    y = conv2d_binary(x_bits, packed, in_channels=channels, pads=(1, 1), pad_value=pad_value)
    np.testing.assert_array_equal(y, _reference(x, w, (1, 1), (1, 1, 1, 1), (1, 1), pad_value))


def test_extreme_values(level):
    """All -1 against all +1 and all -1: the largest magnitudes, including the border."""
    x_bits = pack_bits(-np.ones((1, 4, 4, 70), np.int8), axis=-1)
    w = np.concatenate([np.ones((3, 70, 3, 3), np.int8), -np.ones((3, 70, 3, 3), np.int8)])
    x = -np.ones((1, 70, 4, 4), np.int8)
    for pad_value in (1, 0, -1):
        y = conv2d_binary(x_bits, w, in_channels=70, pads="same", pad_value=pad_value)
        np.testing.assert_array_equal(y, _reference(x, w, (1, 1), "same", (1, 1), pad_value))
    assert conv2d_binary(x_bits, w, in_channels=70, pads="same", pad_value=-1)[0, 1, 1, 3] == 9 * 70


def test_fused_multiplier_bias_clamp(level, rng):
    x, w, x_bits = _case(rng, 65, (3, 3), (2, 6, 7), 40)
    y = _reference(x, w, (1, 1), "same", (1, 1), 0).astype(np.float64)
    mult, bias = rng.uniform(-2, 2, 40), rng.uniform(-50, 50, 40)
    got = conv2d_binary(x_bits, w, in_channels=65, pads="same", pad_value=0, multiplier=mult, bias=bias)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (y * mult + bias).astype(np.float32))
    out = np.empty(got.shape, np.float32)
    got = conv2d_binary(x_bits, w, in_channels=65, pads="same", pad_value=0, multiplier=0.5, clamp=(-20, 30), out=out)
    assert got is out
    np.testing.assert_array_equal(out, np.clip(y * 0.5, -20, 30).astype(np.float32))
    np.testing.assert_array_equal(conv2d_binary(x_bits, w, in_channels=65, pads="same", pad_value=0, clamp=(0, 9)),
                                  np.clip(y, 0, 9).astype(np.float32))


@pytest.mark.parametrize("out_channels", [5, 64, 130])
def test_thresholds_give_packed_bits(level, rng, out_channels):
    x, w, x_bits = _case(rng, 63, (3, 3), (2, 5, 6), out_channels)
    y = _reference(x, w, (2, 1), (1, 1, 0, 2), (1, 1), 1)
    for thr in (rng.integers(-30, 30, out_channels), rng.uniform(-30, 30, out_channels), 0):
        got = conv2d_binary(x_bits, w, in_channels=63, strides=(2, 1), pads=(1, 1, 0, 2), thresholds=thr)
        assert got.dtype == np.uint64 and got.shape == y.shape[:3] + (word_count(out_channels),)
        np.testing.assert_array_equal(got, pack_bits(y - thr, axis=-1))
    out = np.full(got.shape, 2**64 - 1, np.uint64)  # stale bits must not survive
    assert conv2d_binary(x_bits, w, in_channels=63, strides=(2, 1), pads=(1, 1, 0, 2), thresholds=0, out=out) is out
    np.testing.assert_array_equal(out, pack_bits(y, axis=-1))


def test_int32_out_is_reused(level, rng):
    x, w, x_bits = _case(rng, 7, (3, 3), (1, 5, 5), 9)
    out = np.full((1, 5, 5, 9), 12345, np.int32)
    assert conv2d_binary(x_bits, pack_conv_binary(w), in_channels=7, pads="same", out=out) is out
    np.testing.assert_array_equal(out, _reference(x, w, (1, 1), "same", (1, 1), 1))


def test_several_blocks_and_list_attributes(level, rng):
    """An image whose output rows take more than one block of kernels.conv.binary_driver; lists as attributes."""
    x, w, x_bits = _case(rng, 1, (3, 3), (1, 90, 100), 8)
    y = _reference(x, w, (1, 1), (1, 2, 1, 0), (1, 1), 0)
    got = conv2d_binary(x_bits, w, in_channels=1, strides=[1, 1], pads=[1, 2, 1, 0], pad_value=0, dilations=[1, 1])
    np.testing.assert_array_equal(got, y)
    real = conv2d_binary(x_bits, w, in_channels=1, pads=(1, 2, 1, 0), pad_value=0, multiplier=0.25)
    np.testing.assert_array_equal(real, (y * 0.25).astype(np.float32))
    bits = conv2d_binary(x_bits, w, in_channels=1, pads=(1, 2, 1, 0), pad_value=0, thresholds=2)
    np.testing.assert_array_equal(bits, pack_bits(y - 2, axis=-1))


def test_threads_give_identical_results(rng, monkeypatch):
    splits = []
    run_ranges = kernels.threads.run_ranges
    monkeypatch.setattr(kernels.threads, "run_ranges",
                        lambda fn, ranges: (splits.append(ranges), run_ranges(fn, ranges)))
    monkeypatch.setattr(kernels.threads, "_setting", 3)
    monkeypatch.setattr(kernels.threads, "MIN_US_PER_THREAD", 1e-9)
    x, w, x_bits = _case(rng, 65, (3, 3), (2, 7, 6), 33)
    y = conv2d_binary(x_bits, w, in_channels=65, pads="same", pad_value=0)
    np.testing.assert_array_equal(y, _reference(x, w, (1, 1), "same", (1, 1), 0))
    bits = conv2d_binary(x_bits, w, in_channels=65, pads="same", thresholds=1)
    np.testing.assert_array_equal(bits, pack_bits(_reference(x, w, (1, 1), "same", (1, 1), 1) - 1, axis=-1))
    assert len(splits) == 2 and all(len(r) == 3 for r in splits)


def test_generic_level_chooses_the_portable_variant(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    assert dispatch.choose("conv_binary", 8, 8, 64).kind == "generic"
    monkeypatch.setenv("LOWBIT_ISA", cpu.host_level().name)
    fast = cpu.allows(cpu.AVX512_VNNI, cpu.host_level())
    assert dispatch.choose("conv_binary", 8, 8, 64).kind == ("avx512-vnni" if fast else "generic")


# --- bad inputs ----------------------------------------------------------------------------------------------------

X_BITS = np.zeros((1, 4, 4, 2), np.uint64)  # 65..128 channels
W = np.ones((3, 70, 3, 3), np.int8)


@pytest.mark.parametrize("x_bits,w,kw,error,match", [
    (X_BITS.astype(np.int64), W, {}, TypeError, "x_bits: expected dtype uint64"),
    (X_BITS[0], W, {}, ValueError, "x_bits: expected a 4-D"),
    (X_BITS[:, :, ::2], W, {}, ValueError, "x_bits: expected a C-contiguous"),
    (X_BITS, W, {"in_channels": 130}, ValueError, "x_bits: in_channels=130 needs 3 words"),
    (X_BITS, W, {"in_channels": 0}, ValueError, "in_channels: expected a positive int"),
    (X_BITS, W[:, :64], {"in_channels": 70}, ValueError, "w: expected 70 input channels"),
    (X_BITS, pack_conv_binary(W[:, :66]), {"in_channels": 70}, ValueError, "w: expected 70 input channels"),
    (X_BITS, W * 0, {}, ValueError, r"w: expected only -1 and \+1 values, got 0"),
    (X_BITS, W.astype(np.float64) * 0.5, {}, ValueError, r"w: expected only -1 and \+1"),
    (X_BITS, W.astype(bool), {}, TypeError, "w: expected a signed integer or float dtype"),
    (X_BITS, W.tolist(), {}, TypeError, "w: expected a numpy.ndarray"),
    (X_BITS, W[0], {}, ValueError, "w: expected a 4-D OIHW array"),
    (X_BITS, np.ones((3, 70, 5, 5), np.int8), {}, ValueError, "x_bits: a 4x4 input"),
    (X_BITS, W, {"pad_value": 2}, ValueError, "pad_value: expected -1, 0 or 1, got 2"),
    (X_BITS, W, {"pad_value": True}, ValueError, "pad_value: expected -1, 0 or 1"),
    (X_BITS, W, {"pads": "full"}, ValueError, "pads: expected"),
    (X_BITS, W, {"strides": 0}, ValueError, "strides: expected values >= 1"),
    (X_BITS, W, {"thresholds": np.zeros(4)}, ValueError, r"thresholds: expected a scalar or shape \(3,\)"),
    (X_BITS, W, {"thresholds": np.array(["a"])}, TypeError, "thresholds: expected a real"),
    (X_BITS, W, {"thresholds": 0, "bias": 1.0}, ValueError, "thresholds: bit-packed output cannot be combined"),
    (X_BITS, W, {"multiplier": np.ones(2)}, ValueError, r"multiplier: expected a scalar or shape \(3,\)"),
    (X_BITS, W, {"bias": "x"}, TypeError, "bias: expected a real"),
    (X_BITS, W, {"clamp": (3, 1)}, ValueError, "clamp: expected lo <= hi"),
    (X_BITS, W, {"clamp": 3}, TypeError, r"clamp: expected a pair of reals"),
    (X_BITS, W, {"out": np.zeros((1, 2, 2, 3), np.float32)}, TypeError, "out: expected dtype int32"),
    (X_BITS, W, {"out": np.zeros((1, 2, 2, 4), np.int32)}, ValueError, r"out: expected shape \(1, 2, 2, 3\)"),
    (X_BITS, W, {"thresholds": 0, "out": np.zeros((1, 2, 2, 3), np.uint64)}, ValueError,
     r"out: expected shape \(1, 2, 2, 1\)"),
])
def test_bad_inputs(x_bits, w, kw, error, match):
    kw = {"in_channels": 70, **kw}
    with pytest.raises(error, match=match):
        conv2d_binary(x_bits, w, **kw)


def test_set_padding_bits_are_refused():
    x_bits = kernels.pack_bits(np.ones((1, 3, 3, 65), np.int8), axis=-1)
    x_bits[0, 1, 1, 1] |= np.uint64(1) << np.uint64(5)  # a sign past channel 65
    w = np.ones((2, 65, 1, 1), np.int8)
    with pytest.raises(ValueError, match="x_bits: bits past the 65 signs of each row must be 0"):
        kernels.conv2d_binary(x_bits, w, in_channels=65)
    with pytest.raises(ValueError, match="a_bits: bits past the 65 signs"):
        kernels.gemm_binary(x_bits.reshape(9, 2), kernels.pack_bits(np.ones((2, 65), np.int8)), 65)
