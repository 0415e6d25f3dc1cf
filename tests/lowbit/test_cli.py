"""The lowbit command line."""

from __future__ import annotations

import json

from lowbit.cli import main


def test_info_json(capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active_level"] == "generic"


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "active_level" in out and "kernels chosen" in out
    assert all(op in out for op in ("gemm_int8", "gemm_int4", "gemm_ternary", "gemm_binary"))


def test_demo_small(capsys):
    assert main(["demo", "-m", "8", "-n", "64", "-k", "96", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "GOPS" in out and "max error" in out
