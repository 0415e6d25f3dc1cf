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
dtype and shape, and the graph's structure. It is bounded by the file: before a member
is inflated, its declared size is checked against what the header says it holds and
against :data:`LIMITS` (a compressed member may not inflate more than
``LIMITS["ratio"]`` times; ``save`` stores members uncompressed), each member is
inflated once (its CRC checked as it is read), and every problem is a
:class:`ModelFileError` (a ``ValueError``) naming the file, the member and the problem.
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
#: What reading a model file may inflate, in bytes: ``header`` (graph.json), ``total`` (all members), and ``ratio``,
#: the most a compressed member may inflate per stored byte. Raise them for larger files: ``lowbit.io.LIMITS[...] = ``.
LIMITS = {"header": 64 << 20, "total": 64 << 30, "ratio": 64}
NPY_HEADER = 4096  # a .npy file's bytes beyond its data: magic, version and the header dict, padded


class ModelFileError(ValueError):
    """A file that is not a readable model (or quantized tensor) file: the message names the file, the member and
    the problem."""


def read_member(archive: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    """Member ``name`` of ``archive``, inflated only if its declared size is at most ``limit`` and, compressed, at
    most ``LIMITS["ratio"]`` times its stored size; ModelFileError otherwise (``where``: the file, for messages)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ModelFileError(f"{where}: member {name!r} is missing") from None
    if info.file_size > limit:
        raise ModelFileError(f"{where}: member {name!r} declares {info.file_size} bytes, more than the "
                             f"{limit} it can hold (lowbit.io.LIMITS)")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > LIMITS["ratio"] * max(info.compress_size, 1024):
        raise ModelFileError(f"{where}: member {name!r} inflates {info.file_size} bytes from {info.compress_size}, "
                             f"more than {LIMITS['ratio']} times (lowbit.io.LIMITS['ratio']): a zip bomb?")
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as error:
        raise ModelFileError(f"{where}: member {name!r} is corrupted ({error})") from None
    if len(data) > limit:
        raise ModelFileError(f"{where}: member {name!r} holds more than its declared {limit} bytes")
    return data
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


def _why(error: Exception) -> str:
    """``error``'s message, but for NumPy's refusal of object arrays, whose advice (unpickling) lowbit never takes."""
    if "allow_pickle" in str(error):
        return "it holds Python objects; lowbit files hold numeric arrays only, and loading never unpickles"
    return str(error)


def _param_bytes(name: str, entry: Any, where: str) -> tuple[np.dtype, tuple[int, ...], str, int]:
    """``(dtype, shape, storage, bytes stored)`` of a param entry of graph.json, checked before anything is read."""
    try:
        dtype, shape, code = np.dtype(entry["dtype"]), tuple(int(s) for s in entry["shape"]), entry["storage"]
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise ModelFileError(f"{where}: param {name!r}: malformed entry ({error!r})") from None
    if dtype.hasobject or any(s < 0 for s in shape):
        raise ModelFileError(f"{where}: param {name!r}: dtype {dtype} / shape {shape} cannot be stored")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if code == "raw":
        return dtype, shape, code, count * dtype.itemsize
    if code in PACKED_CODES.values():
        return dtype, shape, code, QTYPES[code].nbytes(count)
    raise ModelFileError(f"{where}: param {name!r}: unknown storage {code!r} for dtype {dtype}")


def _read_param(archive: zipfile.ZipFile, name: str, entry: Any, where: str) -> np.ndarray:
    dtype, shape, code, nbytes = _param_bytes(name, entry, where)
    member = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(member, str):
        raise ModelFileError(f"{where}: param {name!r}: no file named in graph.json")
    try:
        data = np.load(io.BytesIO(read_member(archive, member, nbytes + NPY_HEADER, where)), allow_pickle=False)
    except (TypeError, ValueError, EOFError) as error:
        if isinstance(error, ModelFileError):
            raise
        raise ModelFileError(f"{where}: param {name!r}: unreadable ({_why(error)})") from None
    if code == "raw":
        value = data
    elif dtype == QTYPES[code].dtype and data.dtype == np.uint8:
        if data.size != nbytes:
            raise ModelFileError(f"{where}: param {name!r}: {data.size} packed bytes, {shape} {code} codes need "
                                 f"{nbytes}")
        value = QTYPES[code].unpack(data, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    else:
        raise ModelFileError(f"{where}: param {name!r}: unknown storage {code!r} for dtype {dtype}")
    if value.dtype != dtype or value.shape != shape:
        raise ModelFileError(f"{where}: param {name!r}: stored as {value.shape} {value.dtype}, declared {shape} "
                             f"{dtype}")
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
    where = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            header = json.loads(read_member(archive, "graph.json", LIMITS["header"], where))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ModelFileError(f"{where}: not a lowbit model file (format {header.get('format')!r})"
                                     if isinstance(header, dict) else f"{where}: not a lowbit model file")
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise ModelFileError(f"{where}: format_version {version!r} is not supported "
                                     f"(this lowbit reads version {FORMAT_VERSION})")
            entries = header.get("params")
            if not isinstance(entries, dict):
                raise ModelFileError(f"{where}: malformed graph.json (params is not a mapping)")
            total = sum(_param_bytes(name, entry, where)[3] for name, entry in entries.items())
            if total > LIMITS["total"]:
                raise ModelFileError(f"{where}: the params declare {total} bytes, more than LIMITS['total'] = "
                                     f"{LIMITS['total']} (lowbit.io.LIMITS)")
            params = {name: _read_param(archive, name, entry, where) for name, entry in entries.items()}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError, json.JSONDecodeError, UnicodeDecodeError,
            RecursionError, AttributeError) as error:
        raise ModelFileError(f"{where}: not a lowbit model file or truncated/corrupted ({error!r})") from None
    try:
        nodes = [Node(n["op"], list(n["inputs"]), list(n["outputs"]), dict(n["attrs"]), n["name"])
                 for n in header["nodes"]]
        inputs = {name: TensorSpec(tuple(s["shape"]), s["dtype"]) for name, s in header["inputs"].items()}
        graph = Graph(nodes, inputs, list(header["outputs"]), params, **_opset(header))
        return graph.validate()
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
        raise ModelFileError(f"{where}: malformed graph.json ({error!r})") from None
