"""Teams of threads inside compiled code (kernels.sync) and the team entries built on them: every team size gives
the one-thread result bit for bit, a failing member releases the others."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import kernels
from kernels import sync, threads
from kernels.entry import In, Out
from kernels.quantize import dynamic_quantize_linear_entry
from tests.levels import level_fixture

level = level_fixture("gemm_int8")
TEAMS = [1, 2, 3]


@numba.njit(nogil=True)
def _rounds(slots, totals, rounds, ith, nth, state):
    """Each round: every member writes its slot, waits, sums all slots (a member that ran ahead would change
    them), waits again."""
    for r in range(rounds):
        slots[ith] = r * 10 + ith
        sync.barrier(state, nth)
        total = 0
        for j in range(nth):
            total += slots[j]
        totals[ith, r] = total
        sync.barrier(state, nth)


@pytest.mark.parametrize("nth", [2, 3, 4])
def test_barrier_holds_every_member_each_round(nth):
    rounds = 2000
    slots, totals, state = np.zeros(nth, np.int64), np.zeros((nth, rounds), np.int64), sync.new_sync()
    threads.run_ranges(lambda ith, _: _rounds(slots, totals, rounds, ith, nth, state),
                       [(i, i + 1) for i in range(nth)])
    want = np.arange(rounds) * 10 * nth + nth * (nth - 1) // 2
    np.testing.assert_array_equal(totals, np.broadcast_to(want, totals.shape))


@pytest.mark.parametrize("units", [0, 1, 7, 64])
def test_shares_cover_the_range_once(units):
    for nth in (1, 2, 3, 5):
        parts = [sync.share(units, ith, nth) for ith in range(nth)]
        assert [lo for lo, _ in parts[1:]] == [hi for _, hi in parts[:-1]]
        assert parts[0][0] == 0 and parts[-1][1] == units


def _as_team(entry, ins, outs, nth):
    """Run team ``entry`` on ``nth`` threads (a failing member aborts the others, as compiled chains do)."""
    args = [ins[a.index] if isinstance(a, In) else outs[a.index] if isinstance(a, Out) else a for a in entry.args]
    state = sync.new_sync()

    def member(ith, _):
        try:
            entry.fn(*args, ith, nth, state)
        except BaseException:
            sync.abort(state)
            raise

    threads.run_ranges(member, [(i, i + 1) for i in range(nth)])


SHAPES = [(1, 4, 7), (7, 64, 65), (63, 128, 130), (65, 96, 64)]  # (M, K, N): K a multiple of 4 (see entry)


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_dynamic_linear_team_entry_matches_the_plan(rng, level, m, k, n):
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    w_scale = rng.uniform(0.005, 0.02, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    plan = kernels.linear_dynamic_int8_plan(w, w_scale, 0, bias)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    codes, scale, zero = kernels.dynamic_quantize_linear(x)
    want, quantized = plan(x), plan.quantized(codes, scale, zero)
    for nth in TEAMS:
        out = np.zeros((m, n), np.float32)
        _as_team(plan.entry(m), [x], [out], nth)
        np.testing.assert_array_equal(out, want)
        out = np.zeros((m, n), np.float32)
        _as_team(plan.entry(m, quantized=True), [codes, np.array(scale), np.array(zero)], [out], nth)
        np.testing.assert_array_equal(out, quantized)
    out = np.zeros((m, n), np.float32)
    plan.entry(m)([x], [out])  # from Python: a team of one
    np.testing.assert_array_equal(out, want)


def test_dynamic_linear_entry_kinds(rng):
    w = rng.integers(-127, 128, (8, 12), dtype=np.int8)
    assert kernels.linear_dynamic_int8_plan(w, 0.01, 0).entry(4).team
    assert kernels.linear_dynamic_int8_plan(w, 0.01, 0, per_row=True).entry(4).rows == 4  # split by rows
    assert kernels.linear_dynamic_int8_plan(w, 0.01, 0, per_row=True).entry(0) is None
    assert kernels.linear_dynamic_int8_plan(w, 0.01, 3).entry(4) is None  # per tensor, weight zero points
    for per_row in (False, True):  # K % 4
        assert kernels.linear_dynamic_int8_plan(w[:, :10].copy(), 0.01, 0, per_row=per_row).entry(4) is None
    with pytest.raises(ValueError, match="m: expected a row count"):
        kernels.linear_dynamic_int8_plan(w, 0.01, 0).entry(-1)


@pytest.mark.parametrize("shape", [(1,), (7, 3), (2, 63, 65), (65, 1)])
def test_dynamic_quantize_team_entry_matches_the_function(rng, shape):
    x = (rng.standard_normal(shape) * 4 + 1).astype(np.float32)
    codes, scale, zero = kernels.dynamic_quantize_linear(x)
    for nth in TEAMS:
        outs = [np.zeros(shape, np.uint8), np.zeros((), np.float32), np.zeros((), np.uint8)]
        _as_team(dynamic_quantize_linear_entry(shape), [x], outs, nth)
        np.testing.assert_array_equal(outs[0], codes)
        assert outs[1] == scale and outs[2] == zero
    assert dynamic_quantize_linear_entry((0, 4)) is None


def test_a_failing_member_releases_the_team(rng):
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[50, 3] = np.nan  # in the last member's rows: the others wait for it at the barrier after the ranges
    outs = [np.zeros(x.shape, np.uint8), np.zeros((), np.float32), np.zeros((), np.uint8)]
    for nth in TEAMS:
        with pytest.raises(ValueError, match="NaN"):
            _as_team(dynamic_quantize_linear_entry(x.shape), [x], outs, nth)


def test_a_team_formed_while_another_runs_is_one_thread():
    seen = []
    inner = lambda ith, nth: seen.append((ith, nth))  # noqa: E731
    threads.run_team(lambda ith, nth: threads.run_team(inner, 2) if ith == 0 else None, 2)
    assert seen == [(0, 1)]


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("w_zero_point", [0, 3], ids=["symmetric", "zero-points"])
def test_per_row_split_entry_matches_the_plan(rng, level, m, k, n, w_zero_point):
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    plan = kernels.linear_dynamic_int8_plan(w, rng.uniform(0.005, 0.02, n).astype(np.float32), w_zero_point,
                                            rng.standard_normal(n).astype(np.float32), per_row=True)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    want, entry = plan(x), plan.entry(m)
    assert entry.rows == m and plan.entry(m, quantized=True) is None
    out = np.zeros((m, n), np.float32)
    entry([x], [out])
    np.testing.assert_array_equal(out, want)
    for nth in TEAMS[1:]:  # each member's rows, cut as a team chain cuts them (lowbit.runtime.compiled._cut)
        out = np.zeros((m, n), np.float32)
        args = [x if isinstance(a, In) else out if isinstance(a, Out) else a for a in entry.args]
        for ith in range(nth):
            lo, hi = sync.share(m, ith, nth)
            entry.fn(*[_rows_of(a, m, lo, hi) if c in entry.cut else a for c, a in enumerate(args)])
        np.testing.assert_array_equal(out, want)


def _rows_of(a: np.ndarray, rows: int, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``a`` viewed as ``[rows, -1]``, flat for a one-axis ``a``."""
    part = a.reshape(rows, a.size // rows)[lo:hi]
    return part.reshape(-1) if a.ndim == 1 else part



grouped_level = level_fixture("gemm_int4", "gemm_ternary", "gemm_codebook")
GROUPED = {  # format -> (pack w [N, K] float32, plan of m rows)
    "int4": (lambda w: kernels.pack_int4(w, group_size=32), kernels.gemm_int4_plan),
    "ternary": (lambda w: kernels.pack_ternary(w, group_size=64), kernels.gemm_ternary_plan),
    "codebook": (lambda w: kernels.pack_codebook_weights(w, np.linspace(-1, 1, 16), group_size=32),
                 kernels.gemm_codebook_plan),
}


@pytest.mark.parametrize("fmt", GROUPED)
@pytest.mark.parametrize("m, k, n", [(1, 64, 7), (7, 96, 65), (63, 128, 130), (65, 64, 256)])
def test_grouped_team_entry_matches_the_plan(rng, grouped_level, fmt, m, k, n):
    pack, plan_of = GROUPED[fmt]
    plan = plan_of(pack(rng.standard_normal((n, k)).astype(np.float32)), m)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want, entry = plan(x), plan.entry()
    assert entry.team
    for nth in TEAMS:
        out = np.full((1, m, n), np.nan, np.float32)  # any C-contiguous [..., N] of m rows
        _as_team(entry, [x.reshape(1, m, k)], [out], nth)
        np.testing.assert_array_equal(out[0], want)
