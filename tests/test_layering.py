"""The layers stay visible: kernels depends on numpy/numba/llvmlite only, and CPU checks live in one place."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").rglob("*.py"))
THIRD_PARTY_ALLOWED = {"numpy", "numba", "llvmlite"}
CPU_READERS = {"kernels/__init__.py", "kernels/dispatch.py", "kernels/cpu.py", "kernels/threads.py"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_only_numpy_numba_llvmlite(path):
    for name in _imports(path):
        top = name.split(".")[0]
        assert top != "lowbit", f"{path.name} imports {name}: kernels must never depend on lowbit"
        assert top in THIRD_PARTY_ALLOWED | {"kernels", "__future__"} or top in sys.stdlib_module_names, \
            f"{path.name} imports {name}"


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_dispatch_reads_cpu_level(path):
    rel = str(path.relative_to(ROOT))
    if rel in CPU_READERS:
        return
    reads = {n for n in _imports(path) if n in ("kernels.cpu", "kernels._env")}
    assert not reads, f"{rel} imports {reads}: choose kernels in kernels/dispatch.py instead"


def test_no_hard_coded_fastmath():
    """Integer-rounding kernels must match the oracle bit for bit: no fastmath anywhere."""
    for path in KERNELS:
        assert "fastmath" not in path.read_text().replace("``fastmath``", ""), path.name
