"""Loader for the ONNX node conformance tests in ``shared/conformance/onnx-node``.

Each test is a folder holding ``model.onnx`` (one node) and ``test_data_set_0`` with
``input_N.pb`` / ``output_N.pb`` (serialized TensorProtos); ``manifest.json`` lists
them with their op. The folder is ``shared/conformance/onnx-node`` beside the project
root, or ``$LOWBIT_CONFORMANCE_DIR`` when that is set.

Importing this module needs neither onnx nor the data. Typical use in a test module::

    from tests import conformance

    @pytest.mark.parametrize("name", conformance.params("QuantizeLinear"))
    def test_quantize(name):
        case = conformance.load_case(name)     # skips without onnx or data
        ...  case.attributes, case.inputs, case.outputs

``params`` yields one skipped placeholder when the folder is missing, so the module
collects and reports a clear skip instead of failing.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

ENV_VAR = "LOWBIT_CONFORMANCE_DIR"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "onnx-node"
_INDEX = re.compile(r"_(\d+)\.pb$")


class Case(NamedTuple):
    """One loaded node test."""

    name: str
    op: str
    attributes: dict[str, Any]  # node attributes (bytes decoded to str, tensors to arrays)
    inputs: list[np.ndarray | None]  # in node-input order; None for an empty optional input
    outputs: list[np.ndarray]  # expected outputs, in node-output order
    model: Any  # the onnx.ModelProto


def conformance_dir() -> Path:
    """The onnx-node folder: ``$LOWBIT_CONFORMANCE_DIR`` if set, else the default beside the project."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else DEFAULT_DIR


def available() -> bool:
    """Whether the folder and its manifest.json exist."""
    return (conformance_dir() / "manifest.json").is_file()


@functools.lru_cache(maxsize=None)
def _manifest(path: Path) -> dict:
    with open(path / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def manifest() -> dict:
    """The parsed manifest.json (cached per folder); skips the calling test if it is missing."""
    require_data()
    return _manifest(conformance_dir())


def entries(*ops: str, expanded: bool = False) -> list[dict]:
    """Manifest entries for the given op types (all ops if none given), sorted by test name.

    ``expanded`` variants (the op written out as its function body) are left out
    unless ``expanded=True``. Empty when the folder is missing.
    """
    if not available():
        return []
    tests = _manifest(conformance_dir())["tests"]
    chosen = [t for t in tests if (not ops or t["op"] in ops) and (expanded or not t.get("expanded", False))]
    return sorted(chosen, key=lambda t: t["test"])


def cases(*ops: str, expanded: bool = False) -> list[str]:
    """Names of the tests for the given op types (see :func:`entries`)."""
    return [t["test"] for t in entries(*ops, expanded=expanded)]


def params(*ops: str, expanded: bool = False) -> list:
    """``pytest.param`` per test name (id = name), for ``@pytest.mark.parametrize``.

    When the folder is missing, or holds no test for ``ops``, this is a single
    skipped placeholder with the reason, rather than an empty parameter set.
    """
    names = cases(*ops, expanded=expanded)
    if names:
        return [pytest.param(n, id=n) for n in names]
    if not available():
        reason = f"ONNX conformance data not found at {conformance_dir()} (set ${ENV_VAR})"
    else:
        reason = f"no conformance tests for {', '.join(ops) or 'any op'}"
    return [pytest.param(None, id="no-conformance-data", marks=pytest.mark.skip(reason=reason))]


def require_data() -> None:
    """Skip the calling test when the conformance folder is missing."""
    if not available():
        pytest.skip(f"ONNX conformance data not found at {conformance_dir()} (set ${ENV_VAR})")


def require_module() -> None:
    """Skip the whole calling module unless onnx and the conformance folder are both there."""
    pytest.importorskip("onnx")
    if not available():
        pytest.skip(f"ONNX conformance data not found at {conformance_dir()} (set ${ENV_VAR})",
                    allow_module_level=True)


def _sorted_pbs(folder: Path, stem: str) -> list[Path]:
    files = [p for p in folder.glob(f"{stem}_*.pb") if _INDEX.search(p.name)]
    return sorted(files, key=lambda p: int(_INDEX.search(p.name).group(1)))


def _attribute(value: Any) -> Any:
    from onnx import TensorProto, numpy_helper

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_attribute(v) for v in value]
    return value


def load_case(name: str, data_set: int = 0) -> Case:
    """Load test ``name``: node attributes, inputs in node-input order, expected outputs.

    Skips the calling test when onnx or the conformance folder is missing. The
    model must be a single node (the non-expanded tests all are).
    """
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    require_data()
    folder = conformance_dir() / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no conformance test folder {folder}")
    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    if len(graph.node) != 1:
        raise ValueError(f"{name}: expected a single-node model, got {len(graph.node)} nodes")
    node = graph.node[0]

    ds = folder / f"test_data_set_{data_set}"
    xs = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in _sorted_pbs(ds, "input")]
    ys = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in _sorted_pbs(ds, "output")]

    # input_N.pb line up with the graph inputs that are not initializers.
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in init]
    if len(xs) != len(graph_inputs):
        raise ValueError(f"{name}: {len(xs)} input files for graph inputs {graph_inputs}")
    values = {**init, **dict(zip(graph_inputs, xs))}
    inputs = [values[n] if n else None for n in node.input]

    # output_N.pb line up with the graph outputs; return them in node-output order.
    graph_outputs = [o.name for o in graph.output]
    if len(ys) != len(graph_outputs):
        raise ValueError(f"{name}: {len(ys)} output files for graph outputs {graph_outputs}")
    by_name = dict(zip(graph_outputs, ys))
    outputs = [by_name[n] for n in node.output if n in by_name]

    attributes = {a.name: _attribute(helper.get_attribute_value(a)) for a in node.attribute}
    return Case(name, node.op_type, attributes, inputs, outputs, model)
