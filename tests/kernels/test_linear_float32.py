"""kernels.linear_float32_plan: float32 x @ W + bias on panels of the register tile, against a float64 evaluation
within the module's bound, on odd shapes (ones, sizes around the 8-row tiles, 32-lane panels and 32-row blocks),
teams of every size (the same bits), the register tile at every height, and bad arguments."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.conv.float32 import MR, NR, register_tile
from tests.kernels.test_teams import TEAMS, _as_team

SHAPES = [(1, 1, 1), (7, 5, 3), (63, 64, 33), (65, 130, 32), (9, 384, 95), (130, 7, 65)]  # (M, K, N)


def _check(rng, m, k, n, with_bias):
    x = rng.standard_normal((2, m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    got = kernels.linear_float32_plan(w, bias)(x)
    want = x.astype(np.float64) @ w + (0.0 if bias is None else bias)
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w) + (0.0 if bias is None else np.abs(bias))
    bound = (k + 1) * 2.0 ** -24 * magnitude
    assert got.shape == (2, m, n) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_linear_float32_matches_oracle(rng, m, k, n, with_bias):
    _check(rng, m, k, n, with_bias)


@pytest.mark.parametrize("height", sorted({1, 2, 3, 8, MR}))
def test_register_tile_of_every_height(rng, height):
    """The tile's height follows the CPU's registers (MR: 8 with AVX-512, 2 with AVX2); every height computes the
    same block, whatever this CPU picks: full, a row short, and with fewer lanes than the panel."""
    tile = register_tile(lane_bias=True, height=height)

    @numba.njit
    def block(x, panel, table, bias, out, m, n):
        k = x.shape[1]
        tile(x.reshape(-1), 0, 1, k, panel.reshape(-1), 0, table, k, bias, 0, 0, np.ones(1, np.float32),
             out.reshape(-1), 0, out.shape[1], m, n, np.float32(-np.inf), np.float32(np.inf))

    k = 37
    x = rng.standard_normal((height, k)).astype(np.float32)
    panel = rng.standard_normal((k, NR)).astype(np.float32)
    bias = rng.standard_normal(NR).astype(np.float32)
    for m, n in ((height, NR), (max(1, height - 1), NR - 5)):
        out = np.full((height, NR), -7.0, np.float32)
        block(x, panel, np.arange(k) * NR, bias, out, m, n)
        want = x[:m].astype(np.float64) @ panel[:, :n] + bias[:n]
        bound = (k + 1) * 2.0 ** -24 * (np.abs(x[:m].astype(np.float64)) @ np.abs(panel[:, :n]) + np.abs(bias[:n]))
        assert np.all(np.abs(out[:m, :n] - want) <= bound)
        assert np.all(out[m:] == -7) and np.all(out[:, n:] == -7)  # nothing stored past m rows and n lanes


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 300), n=st.integers(1, 140), with_bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_linear_float32_of_any_shape_is_within_its_bound(m, k, n, with_bias, seed):
    _check(np.random.default_rng(seed), m, k, n, with_bias)


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_linear_float32_teams_give_the_same_bits(rng, m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    plan = kernels.linear_float32_plan(rng.standard_normal((k, n)).astype(np.float32),
                                       rng.standard_normal(n).astype(np.float32))
    want = plan(x)
    for nth in TEAMS:
        out = np.full((m, n), np.nan, np.float32)
        _as_team(plan.entry(), [x], [out], nth)
        np.testing.assert_array_equal(out, want)


def test_linear_float32_on_the_kernels_threads_gives_the_same_bits(rng):
    x = rng.standard_normal((256, 384)).astype(np.float32)
    plan = kernels.linear_float32_plan(rng.standard_normal((384, 512)).astype(np.float32))
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        alone = plan(x)
        kernels.set_num_threads(2)
        np.testing.assert_array_equal(plan(x), alone)
    finally:
        kernels.set_num_threads(before)


W = np.zeros((4, 3), np.float32)


@pytest.mark.parametrize("call, error, message", [
    (lambda: kernels.linear_float32_plan(W.astype(np.float64)), TypeError, "w: expected a float32"),
    (lambda: kernels.linear_float32_plan(W[0]), TypeError, "w: expected a float32 numpy.ndarray [K, N]"),
    (lambda: kernels.linear_float32_plan(W[:0]), ValueError, "w: expected K >= 1 and N >= 1"),
    (lambda: kernels.linear_float32_plan(W, np.zeros(4, np.float32)), ValueError, "bias: expected float32 [3]"),
    (lambda: kernels.linear_float32_plan(W)(np.zeros((2, 4))), TypeError, "x: expected a float32"),
    (lambda: kernels.linear_float32_plan(W)(np.zeros((2, 5), np.float32)), ValueError,
     "x: expected a last axis of K = 4"),
    (lambda: kernels.linear_float32_plan(W)(np.zeros((2, 4), np.float32), out=np.zeros((2, 4), np.float32)),
     ValueError, "out: expected shape (2, 3), got (2, 4)"),
    (lambda: kernels.linear_float32_plan(W)(np.zeros((2, 4), np.float32), out=np.zeros((3, 2), np.float32).T),
     ValueError, "out: expected a C-contiguous array"),
])
def test_linear_float32_rejects_bad_arguments(call, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call()


def test_linear_float32_of_no_rows_is_empty():
    assert kernels.linear_float32_plan(W)(np.zeros((0, 4), np.float32)).shape == (0, 3)
