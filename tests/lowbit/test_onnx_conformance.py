"""ONNX's own node tests (``shared/conformance/onnx-node``), each run whole through ``lowbit.onnx.InferenceSession``.

Every test of the folder is an op of the import's lists, and the ``_expanded`` twins run the op's
function body of primitive ops (ReduceMean, Exp, Cast, Where ...), so both the dedicated kernels and
the NumPy evaluators are checked. Integer outputs must be equal; float outputs within ONNX's own runner
tolerance (rtol 1e-3, atol 1e-7). Cases whose tensors have a type lowbit does not hold (8-bit and 4-bit
floats, 16-bit integer codes) are skipped with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import conformance

#: Element types of the manifest that lowbit holds no kernels for, with the reason.
UNHELD = {"FLOAT8E4M3FN": "8-bit floats", "FLOAT8E4M3FNUZ": "8-bit floats", "FLOAT8E5M2": "8-bit floats",
          "FLOAT8E5M2FNUZ": "8-bit floats", "FLOAT8E8M0": "8-bit floats", "FLOAT4E2M1": "4-bit floats",
          "BFLOAT16": "bfloat16"}
#: Q/DQ with 16-bit integer codes: lowbit's quant types are 8 bits and below.
UINT16_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _skip_reason(entry: dict) -> str | None:
    types = {t["elem_type"] for t in entry["inputs"] + entry["outputs"]}
    unheld = sorted(types & set(UNHELD))
    if unheld:
        return f"{UNHELD[unheld[0]]} ({unheld[0]}): not a lowbit type"
    if entry["op"] in UINT16_QDQ and types & {"INT16", "UINT16"}:
        return "16-bit quantization codes: not a lowbit quant type"
    return None


def _params():
    entries = conformance.entries(expanded=True)
    if not entries:
        return conformance.params()
    marks = {e["test"]: _skip_reason(e) for e in entries}
    return [pytest.param(e["test"], id=e["test"],
                         marks=[pytest.mark.skip(reason=marks[e["test"]])] if marks[e["test"]] else [])
            for e in entries]


def _arrays(folder, stem):
    import onnx
    from onnx import numpy_helper

    return [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in conformance._sorted_pbs(folder, stem)]


@pytest.mark.parametrize("name", _params())
def test_node(name):
    pytest.importorskip("onnx")
    import lowbit.onnx as ort

    folder = conformance.conformance_dir() / name
    session = ort.InferenceSession(str(folder / "model.onnx"))
    data = folder / "test_data_set_0"
    feeds = dict(zip([i.name for i in session.get_inputs()], _arrays(data, "input")))
    expected = _arrays(data, "output")
    got = session.run(None, feeds)
    assert len(got) == len(expected)
    for output, want, have in zip(session.get_outputs(), expected, got):
        if want.dtype.name in ("int4", "uint4", "int2", "uint2"):  # lowbit: one code per byte
            want = want.astype(np.int8 if want.dtype.name.startswith("int") else np.uint8)
        assert have.shape == want.shape, f"{output.name}: shape {have.shape}, expected {want.shape}"
        assert have.dtype == want.dtype, f"{output.name}: dtype {have.dtype}, expected {want.dtype}"
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(have, want, rtol=1e-3, atol=1e-7, err_msg=output.name)
        else:
            np.testing.assert_array_equal(have, want, err_msg=output.name)
