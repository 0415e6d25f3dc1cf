"""CPU levels, LOWBIT_ISA, dispatch order and cpu_info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kernels
from kernels import cpu, dispatch
from kernels.gemm.grouped_microkernels import BASES
from kernels.gemm.microkernels import TILES


def test_generic_always_supported():
    assert cpu.supported_levels()[0] is cpu.GENERIC
    assert cpu.host_level() in cpu.supported_levels()


@pytest.mark.parametrize("arch, features, size", [
    ("x86_64", {"avx512f", "avx2", "avx"}, 32 * 64), ("x86_64", {"avx2", "avx", "fma"}, 16 * 32),
    ("x86_64", {"sse4.2"}, 16 * 16), ("aarch64", {"neon"}, 32 * 16)])
def test_vector_register_bytes_follow_the_features(monkeypatch, arch, features, size):
    """What the register tiles size themselves by (kernels.conv.float32.MR and PIXEL_ROWS)."""
    monkeypatch.setattr(cpu, "target_features", lambda: frozenset(features))
    monkeypatch.setattr(cpu, "host_arch", lambda: arch)
    assert cpu.vector_register_bytes.__wrapped__() == size


def test_levels_rank_within_architecture():
    x86 = [lv for lv in cpu.LEVELS.values() if lv.arch == "x86_64"]
    assert [lv.name for lv in sorted(x86, key=lambda lv: lv.rank)] == ["avx2", "avx-vnni", "avx512-vnni",
                                                                             "avx512-vpopcntdq", "amx"]


@pytest.mark.parametrize("value", ["sse9", "AVX512", "avx512vnni", "generic2"])
def test_unknown_isa_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("LOWBIT_ISA", value)
    with pytest.raises(ValueError, match="LOWBIT_ISA=.*not a known level.*generic"):
        cpu.active_level()


def test_isa_is_case_insensitive(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", " GENERIC ")
    assert cpu.active_level() is cpu.GENERIC


def test_unsupported_isa_is_a_clear_error(monkeypatch):
    missing = [lv for lv in cpu.LEVELS.values() if lv not in cpu.supported_levels()]
    if not missing:
        pytest.skip("this CPU supports every level")
    monkeypatch.setenv("LOWBIT_ISA", missing[0].name)
    with pytest.raises(ValueError, match="not supported by this CPU"):
        cpu.active_level()


def test_every_op_has_a_portable_variant_last():
    for op in {v.op for v in dispatch.variants()}:
        assert dispatch.variants(op)[-1].level is cpu.GENERIC


def test_variant_table_matches_micro_kernels():
    """Every variant names a micro-kernel, and every micro-kernel is reachable."""
    assert {v.kind for v in dispatch.variants("gemm_int8")} == set(TILES)
    assert all(v.rows == TILES[v.kind].rows for v in dispatch.variants("gemm_int8"))
    for op in ("gemm_int4", "gemm_ternary"):
        assert {v.kind for v in dispatch.variants(op)} == set(BASES)
        assert all(v.rows == BASES[v.kind][0] for v in dispatch.variants(op))


def test_choose_honours_level_and_shape(level):
    chosen = dispatch.choose("gemm_int8", 1, 64, 64)
    assert cpu.allows(chosen.level, level)
    if level is cpu.GENERIC:
        assert chosen.kind == "generic"
    elif level is cpu.AVX2:
        assert chosen.kind == "avx2"
    elif level is cpu.AVX512_VNNI:
        assert chosen.kind == "avx512-vnni-gemv"
        assert dispatch.choose("gemm_int8", dispatch.GEMV_MAX_ROWS + 1, 64, 64).kind == "avx512-vnni"


def test_choose_unknown_op():
    with pytest.raises(ValueError, match="no kernel variant for op 'conv9d'"):
        dispatch.choose("conv9d", 1, 1, 1)


def test_cpu_info_keys(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    info = kernels.cpu_info()
    assert info["active_level"] == "generic"
    assert info["host_level"] == cpu.host_level().name
    assert set(info) >= {"cpu", "arch", "features", "supported_levels", "threads", "numba", "llvmlite", "numpy"}
    json.dumps(info)


def test_isa_env_in_fresh_process_selects_portable_code():
    code = (
        "import numpy as np, kernels; from kernels import dispatch;"
        "a = np.arange(12, dtype=np.uint8).reshape(3, 4); b = np.ones((5, 4), np.int8);"
        "assert (kernels.gemm_int8(a, b) == a.astype(int) @ b.astype(int).T).all();"
        "print(kernels.cpu_info()['active_level'], dispatch.choose('gemm_int8', 3, 5, 4).kind)"
    )
    env = {**os.environ, "LOWBIT_ISA": "generic"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["generic", "generic"]


def test_thread_setting(monkeypatch):
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        assert kernels.get_num_threads() == 1
    finally:
        kernels.set_num_threads(before)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="positive integer"):
            kernels.set_num_threads(bad)
