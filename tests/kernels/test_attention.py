"""kernels.attention: fused multi-head attention against a float64 evaluation of the ONNX ops it replaces, on odd
shapes (both value layouts: heads of whole tile rows read in place, others copied), every mask layout, teams of
every size (the same bits), and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.attention import CHUNK, ROWS
from tests.kernels.test_teams import TEAMS, _as_team


def _attention_ref(q, k, v, mask, heads, scale):
    """Reshape, Transpose, MatMul, Softmax, MatMul, Transpose in float64."""
    (b, sq, _), sk, dv = q.shape, k.shape[1], v.shape[2] // heads
    qh = q.astype(np.float64).reshape(b, sq, heads, -1).transpose(0, 2, 1, 3)
    kt = k.astype(np.float64).reshape(b, sk, heads, -1).transpose(0, 2, 3, 1)
    vh = v.astype(np.float64).reshape(b, sk, heads, dv).transpose(0, 2, 1, 3)
    s = scale * (qh @ kt) + (0.0 if mask is None else mask)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, sq, heads * dv), np.abs(s).max()


def _bound(k: np.ndarray, v: np.ndarray, heads: int, s_max: float) -> float:
    """The error bound of the module docstring: ``2^-22 (Sk + D + 8) max|v| (1 + max|s|)``."""
    sk, d = k.shape[1], k.shape[2] // heads
    return 2.0 ** -22 * (sk + d + 8) * np.abs(v).max() * (1 + s_max)


def _inputs(rng, b, sq, sk, heads, d, dv):
    return (rng.standard_normal((b, sq, heads * d), np.float32), rng.standard_normal((b, sk, heads * d), np.float32),
            rng.standard_normal((b, sk, heads * dv), np.float32))


# (B, Sq, Sk, H, D, Dv): ones, sizes around the ROWS / CHUNK / tile-lane blocks, value heads of 32 (read in place)
SHAPES = [(1, 1, 1, 1, 1, 1), (1, 7, 5, 1, 3, 3), (2, 65, 63, 3, 16, 8), (1, 63, 65, 2, 32, 32),
          (3, CHUNK + ROWS + 1, 33, 2, 7, 64), (2, 9, 130, 4, 40, 70)]


@pytest.mark.parametrize("b, sq, sk, heads, d, dv", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "keys", "per_query", "full"])
def test_attention_matches_oracle(rng, b, sq, sk, heads, d, dv, mask_kind):
    q, k, v = _inputs(rng, b, sq, sk, heads, d, dv)
    mask_shape = {"none": None, "keys": (b, 1, 1, sk), "per_query": (1, 1, sq, sk), "full": (b, heads, sq, sk)}[
        mask_kind]
    mask = None if mask_shape is None else np.where(rng.random(mask_shape) < 0.3, -1e4, 0).astype(np.float32)
    if mask is not None:
        mask[..., 0] = 0  # every row attends somewhere
    scale = 1 / np.sqrt(d)
    want, s_max = _attention_ref(q, k, v, mask, heads, scale)
    got = kernels.attention(q, k, v, mask, heads=heads)
    assert got.shape == (b, sq, heads * dv) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=_bound(k, v, heads, s_max))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), sq=st.integers(1, 80), sk=st.integers(1, 80), heads=st.integers(1, 4),
       d=st.integers(1, 40), dv=st.sampled_from([1, 5, 32, 33, 64]), mask_axes=st.sampled_from(["", "b", "bq", "bhq"]),
       scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**32 - 1))
def test_attention_of_any_shape_is_within_its_bound(b, sq, sk, heads, d, dv, mask_axes, scale, seed):
    """Random shapes, masks broadcast over any of batch / heads / queries, any scale: within the stated bound."""
    rng = np.random.default_rng(seed)
    q, k, v = _inputs(rng, b, sq, sk, heads, d, dv)
    shape = (b if "b" in mask_axes else 1, heads if "h" in mask_axes else 1, sq if "q" in mask_axes else 1, sk)
    mask = None if not mask_axes else (rng.standard_normal(shape) * 4).astype(np.float32)
    want, s_max = _attention_ref(q, k, v, mask, heads, scale)
    got = kernels.attention(q, k, v, mask, heads=heads, scale=scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=_bound(k, v, heads, s_max))


@pytest.mark.parametrize("b, sq, sk, heads, d, dv", SHAPES[2:])
def test_attention_teams_give_the_same_bits(rng, b, sq, sk, heads, d, dv):
    q, k, v = _inputs(rng, b, sq, sk, heads, d, dv)
    mask = np.where(rng.random((b, 1, 1, sk)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[..., 0] = 0
    plan = kernels.attention_plan(q.shape, k.shape, v.shape, heads=heads, scale=0.3, mask_shape=mask.shape)
    alone = plan(q, k, v, mask)
    for nth in TEAMS[1:]:
        out = np.full(plan.out_shape, np.nan, np.float32)
        _as_team(plan.entry(), [q, k, v, mask], [out], nth)
        np.testing.assert_array_equal(out, alone)
    out = np.empty((b, sq, heads, dv), np.float32)  # the entry writes any C-contiguous output of B Sq H Dv values
    plan.entry()([q, k, v, mask], [out])
    np.testing.assert_array_equal(out.reshape(plan.out_shape), alone)


def test_attention_on_the_kernels_threads_gives_the_same_bits(rng):
    q, k, v = _inputs(rng, 2, 128, 128, 4, 32, 32)
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        alone = kernels.attention(q, k, v, heads=4)
        kernels.set_num_threads(2)
        np.testing.assert_array_equal(kernels.attention(q, k, v, heads=4), alone)
    finally:
        kernels.set_num_threads(before)


def test_attention_of_a_wholly_masked_row_is_nan_and_out_is_written(rng):
    q, k, v = _inputs(rng, 1, 3, 4, 2, 4, 4)
    mask = np.zeros((1, 2, 3, 4), np.float32)
    mask[0, 1, 2] = -np.inf
    out = np.zeros((1, 3, 8), np.float32)
    assert kernels.attention(q, k, v, mask, heads=2, out=out) is out
    assert np.isnan(out[0, 2, 4:]).all() and np.isfinite(out[0, :2]).all() and np.isfinite(out[0, 2, :4]).all()


Q, K, V = (np.zeros((2, 5, 8), np.float32),) * 3


@pytest.mark.parametrize("call, error, message", [
    (lambda: kernels.attention(Q.astype(np.float64), K, V, heads=2), TypeError, "q: expected a float32"),
    (lambda: kernels.attention(Q, [[0.0]], V, heads=2), TypeError, "k: expected a float32 numpy.ndarray, got list"),
    (lambda: kernels.attention(Q[0], K, V, heads=2), ValueError, "q: expected shape [batch, sequence"),
    (lambda: kernels.attention(Q, K[:, :, :4], V, heads=2), ValueError, "k, v: expected k [2, Sk, 8]"),
    (lambda: kernels.attention(Q, K, V[:, :3], heads=2), ValueError, "k, v: expected k [2, Sk, 8]"),
    (lambda: kernels.attention(Q, K, V, heads=3), ValueError, "heads: 3 heads must divide"),
    (lambda: kernels.attention(Q, K, V, heads=0), ValueError, "heads: expected an int >= 1, got 0"),
    (lambda: kernels.attention(Q, K, V, heads=2, scale=np.nan), ValueError, "scale: expected a finite number"),
    (lambda: kernels.attention(Q[:, :0], K, V, heads=2), ValueError, "q, k, v: expected non-empty axes"),
    (lambda: kernels.attention(Q, K, V, np.zeros((2, 1, 1, 4), np.float32), heads=2), ValueError,
     "mask: its last axis must be the scores' (5)"),
    (lambda: kernels.attention(Q, K, V, np.zeros((3, 1, 1, 5), np.float32), heads=2), ValueError,
     "does not broadcast to the scores' (2, 2, 5, 5)"),
    (lambda: kernels.attention(Q, K, V, heads=2, out=np.zeros((2, 5, 4), np.float32)), ValueError,
     "out: expected shape (2, 5, 8)"),
    (lambda: kernels.attention(Q, K, V.copy(), heads=2, out=Q), ValueError, "out: must not overlap"),
])
def test_attention_rejects_bad_arguments(call, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call()


def test_attention_plan_checks_the_mask_it_was_made_for():
    plan = kernels.attention_plan(Q.shape, K.shape, V.shape, heads=2)
    with pytest.raises(ValueError, match="mask: not expected"):
        plan(Q, K, V, np.zeros((2, 1, 1, 5), np.float32))
    masked = kernels.attention_plan(Q.shape, K.shape, V.shape, heads=2, mask_shape=(2, 1, 1, 5))
    with pytest.raises(ValueError, match=r"mask: expected a float32 mask of shape \(2, 1, 1, 5\)"):
        masked(Q, K, V)
    with pytest.raises(ValueError, match="out: the array is read-only"):
        out = np.zeros((2, 5, 8), np.float32)
        out.flags.writeable = False
        plan(Q, K, V, out=out)


def test_attention_out_must_be_c_contiguous():
    """A strided out would be written through a copy: refused, not silently left unwritten."""
    with pytest.raises(ValueError, match="out: expected a C-contiguous array"):
        kernels.attention(Q, K, V.copy(), heads=2, out=np.zeros((2, 8, 5), np.float32).transpose(0, 2, 1))
