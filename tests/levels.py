"""The CPU levels kernel tests run under, and a fixture factory that forces each one."""

from __future__ import annotations

import pytest

from kernels import cpu, dispatch


#: ONNX Runtime's uint8 x int8 products on x86-64 CPUs without VNNI add pairs of products in int16 with
#: saturation (vpmaddubsw; its quantization guide advises reduce_range there): exact comparisons with it need VNNI
ORT_SATURATES_U8S8 = cpu.host_arch() == "x86_64" and not {"avx512vnni", "avxvnni"} & cpu.target_features()


def levels_for(*ops: str) -> list[cpu.Level]:
    """Levels this CPU supports that some variant of ``ops`` (any op if none) is written for.

    The portable level is always among them, so its kernels are tested on every machine.
    """
    wanted = {v.level for v in dispatch.variants() if not ops or v.op in ops}
    return [lv for lv in cpu.supported_levels() if lv in wanted]


def level_fixture(*ops: str):
    """A fixture that runs its test once per level of ``ops``, with ``LOWBIT_ISA`` forcing it."""

    @pytest.fixture(params=levels_for(*ops), ids=lambda lv: lv.name)
    def level(request, monkeypatch) -> cpu.Level:
        monkeypatch.setenv("LOWBIT_ISA", request.param.name)
        return request.param

    return level
