"""Saving and loading graphs: one zip file (suffix ``.lowbit``) of ``graph.json`` and one ``.npy`` per parameter.

``graph.json`` holds ``{"format": "lowbit", "format_version": 1, "inputs", "outputs",
"nodes", "params", "opset"}`` (``opset`` is optional: files without it read at the default
opset); each param entry names its file, dtype, shape and storage:

- ``"raw"``: the array itself;
- a ``kernels.qtypes`` code (``"s4"``, ``"u4"``, ``"t2"``, ``"b1"``, ...): the codes (input 1) of a
  weight-only op of a sub-byte format (``lowbit.quantization.formats``: Int4*, NF4Gemm,
  TernaryGemm, Binary*), stored packed as that format stores them (two, four or eight per
  byte), so the file is the model's real size.

Loading never unpickles (``np.load(allow_pickle=False)``) and checks everything it
reads: the zip's integrity, the format name and version, each parameter's presence,
dtype and shape, and the graph's structure.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from kernels.qtypes import QTYPES
from lowbit.graph.ir import Graph, Node, TensorSpec
from lowbit.quantization.formats import OPS

FORMAT = "lowbit"
FORMAT_VERSION = 1
#: The packed storage of input 1 (the codes) of the weight-only ops of sub-byte formats.
PACKED_CODES = {op: fmt.storage for op, (fmt, _) in OPS.items() if fmt.bits < 8}


def _storage(graph: Graph) -> dict[str, str]:
    """Storage code of every parameter: the packed format where its values allow, else ``"raw"``."""
    storage = {name: "raw" for name in graph.params}
    for node in graph.nodes:
        code = PACKED_CODES.get(node.op)
        name = node.inputs[1] if code and len(node.inputs) > 1 else ""
        value = graph.params.get(name)
        qtype = QTYPES.get(code)
        if value is None or qtype is None or value.dtype != qtype.dtype or value.size == 0:
            continue
        ok = np.all(np.abs(value) == 1) if code == "b1" else value.min() >= qtype.qmin and value.max() <= qtype.qmax
        if ok and storage[name] in ("raw", code):
            storage[name] = code
    return storage


def _stored(value: np.ndarray, code: str) -> np.ndarray:
    return value if code == "raw" else QTYPES[code].pack(value)


def model_size(graph: Graph) -> int:
    """Bytes of parameter data in the saved file (packed as :func:`save` packs; ~128-byte .npy headers excluded)."""
    storage = _storage(graph)
    return sum(QTYPES[storage[n]].nbytes(p.size) if storage[n] != "raw" else p.nbytes
               for n, p in graph.params.items())


def _json_value(value: Any, where: str) -> Any:
    """Attribute values as JSON: numbers, strings, booleans and (nested) lists; NumPy values converted."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: cannot save a {type(value).__name__} attribute (numbers, strings and lists only)")


def save(graph: Graph, path: str | os.PathLike) -> None:
    """Write ``graph`` to ``path`` as one zip file (see the module docstring)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph: expected a lowbit.graph.Graph, got {type(graph).__name__}")
    graph = graph.copy().validate()
    storage = _storage(graph)
    params = {name: {"file": f"params/{i}.npy", "dtype": value.dtype.str, "shape": list(value.shape),
                     "storage": storage[name]}
              for i, (name, value) in enumerate(graph.params.items())}
    bad = [n for n, v in graph.params.items() if v.dtype.hasobject]
    if bad:
        raise TypeError(f"graph.params: {bad} hold Python objects; only numeric arrays can be saved")
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "inputs": {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in graph.inputs.items()},
        "outputs": list(graph.outputs),
        "nodes": [{"op": n.op, "name": n.name, "inputs": n.inputs, "outputs": n.outputs,
                   "attrs": {k: _json_value(v, f"node {n.name!r} attr {k!r}") for k, v in n.attrs.items()}}
                  for n in graph.nodes],
        "params": params,
        "opset": dict(graph.opset),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("graph.json", json.dumps(header, indent=1))
        for name, value in graph.params.items():
            buffer = io.BytesIO()
            np.save(buffer, _stored(np.asarray(value, order="C"), storage[name]), allow_pickle=False)  # 0-d stays 0-d
            archive.writestr(params[name]["file"], buffer.getvalue())


def _read_param(archive: zipfile.ZipFile, name: str, entry: Any) -> np.ndarray:
    try:
        dtype, shape, code = np.dtype(entry["dtype"]), tuple(int(s) for s in entry["shape"]), entry["storage"]
        data = np.load(io.BytesIO(archive.read(entry["file"])), allow_pickle=False)
    except KeyError as error:
        raise ValueError(f"param {name!r}: missing from the file ({error})") from None
    except (TypeError, ValueError, EOFError) as error:
        raise ValueError(f"param {name!r}: unreadable ({error})") from None
    if code == "raw":
        value = data
    elif code in PACKED_CODES.values() and dtype == QTYPES[code].dtype and data.dtype == np.uint8:
        count = int(np.prod(shape, dtype=np.int64))
        if data.size != QTYPES[code].nbytes(count):
            raise ValueError(f"param {name!r}: {data.size} packed bytes, {shape} {code} codes need "
                             f"{QTYPES[code].nbytes(count)}")
        value = QTYPES[code].unpack(data, count).reshape(shape)
    else:
        raise ValueError(f"param {name!r}: unknown storage {code!r} for dtype {dtype}")
    if value.dtype != dtype or value.shape != shape:
        raise ValueError(f"param {name!r}: stored as {value.shape} {value.dtype}, declared {shape} {dtype}")
    return value


def _opset(header: dict) -> dict:
    """``{"opset": ...}`` for the Graph when the file records one, checked to be domain -> int."""
    opset = header.get("opset")
    if opset is None:
        return {}
    if not isinstance(opset, dict) or not all(isinstance(k, str) and type(v) is int for k, v in opset.items()):
        raise TypeError(f"opset must map domain names to ints, got {opset!r}")
    return {"opset": opset}


def load(path: str | os.PathLike) -> Graph:
    """The graph saved at ``path`` by :func:`save`, or imported from an ONNX file (suffix ``.onnx``, needs the
    onnx package: :func:`lowbit.onnx.load`); ``ValueError`` when the file is neither, or is inconsistent."""
    if os.fspath(path).lower().endswith(".onnx"):
        from lowbit.onnx import load as load_onnx

        return load_onnx(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise zipfile.BadZipFile("CRC mismatch")
            header = json.loads(archive.read("graph.json"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"{os.fspath(path)}: not a lowbit model file (format {header.get('format')!r})"
                                 if isinstance(header, dict) else f"{os.fspath(path)}: not a lowbit model file")
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"{os.fspath(path)}: format_version {version!r} is not supported "
                                 f"(this lowbit reads version {FORMAT_VERSION})")
            params = {name: _read_param(archive, name, entry) for name, entry in header["params"].items()}
    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{os.fspath(path)}: not a lowbit model file or truncated/corrupted ({error})") from None
    try:
        nodes = [Node(n["op"], list(n["inputs"]), list(n["outputs"]), dict(n["attrs"]), n["name"])
                 for n in header["nodes"]]
        inputs = {name: TensorSpec(tuple(s["shape"]), s["dtype"]) for name, s in header["inputs"].items()}
        graph = Graph(nodes, inputs, list(header["outputs"]), params, **_opset(header))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{os.fspath(path)}: malformed graph.json ({error!r})") from None
    return graph.validate()
