"""ONNX files in: a ``ModelProto`` (from a path, bytes or an object) becomes a :class:`lowbit.Graph`.

Node by node, the ONNX graph maps onto lowbit's IR, which is ONNX-shaped already: op types keep their
names (``"<domain>.<op_type>"`` outside the default domain), attributes become Python values,
initializers and ``Constant`` nodes become ``params``, symbolic dimensions (``"batch"``) stay symbols
until a run binds them. Then the graph is rewritten once: Q/DQ patterns fused into integer ops
(:func:`lowbit.runtime.qdq_fusion.fuse_qdq`), dynamic quantization chains fused into one op
(:func:`lowbit.runtime.dynamic_fusion.fuse_dynamic_matmul`), constant subgraphs folded
(:func:`lowbit.runtime.passes.fold_constants`), transformers' GELU, attention blocks and float MatMuls with their
bias fused (:func:`lowbit.runtime.transformer_fusion.fuse_transformer_ops`). The graph stays NCHW as ONNX wrote it (a
:class:`lowbit.Session` moves convolution chains channels-last when it runs it). A model lowbit cannot run fails
here, with every unsupported op listed, never halfway through a run.

Loading never executes code: protobuf is parsed into plain arrays and values. Tensors stored outside
the file (external data, models over 2 GB) are read from the model's folder only: a location that is
absolute or leads out of that folder (``..``, symbolic links) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.extras import require
from lowbit.graph.collector import paused
from lowbit.graph.ir import Graph, Node, TensorSpec
from lowbit.onnx.types import elem_name, numpy_dtype, type_string

#: Default-domain opsets lowbit reads; newer ones are refused until their changes are known.
MIN_OPSET = 10
#: ``lowbit``: lowbit's own ops, as :mod:`lowbit.onnx.quantization` writes them (``lowbit.DynamicQuantizeMatMul``).
DOMAINS = ("", "ai.onnx", "com.microsoft", "lowbit")
#: ONNX's 4-bit and 2-bit element types (uint4, int4, uint2, int2), held one code per byte.
SUB_BYTE_TYPES = (21, 22, 25, 26)
#: ONNX attribute types that hold a graph (control flow: If, Loop, Scan) or a sparse tensor.
_GRAPH_ATTRIBUTES = (5, 10, 11, 12)


class UnsupportedModelError(ValueError):
    """The model uses ops (or types) lowbit cannot run; ``unsupported`` lists them by op type."""

    def __init__(self, message: str, unsupported: dict[str, list[str]]):
        super().__init__(message)
        self.unsupported = unsupported


def onnx_module():
    """The ``onnx`` package, or an ImportError telling how to install it."""
    return require("onnx", "onnx", "lowbit.onnx")


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output as ONNX Runtime describes it: ``shape`` holds ints, symbols and None."""

    name: str
    shape: list[int | str | None]
    type: str  # "tensor(float)"


@dataclass
class Imported:
    """An imported model: the graph, and ONNX's view of its inputs, outputs and metadata."""

    graph: Graph
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: frozenset[str] = frozenset()  # every tensor the model's nodes compute, before lowbit's rewrites


# ---- reading the protobuf ------------------------------------------------------------------------------------------

def read_model(model: Any) -> tuple[Any, Path | None]:
    """``(ModelProto, folder of its external data or None)`` from a path, bytes or a ModelProto."""
    onnx = onnx_module()
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _parse(onnx, bytes(model), "the given bytes"), None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model: no file {str(path)!r}")
        return _parse(onnx, path.read_bytes(), str(path)), path.resolve().parent
    raise TypeError(f"model: expected a path, bytes or an onnx.ModelProto, got {type(model).__name__}")


def _parse(onnx, data: bytes, where: str):
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ValueError(f"{where} is not a valid ONNX model (protobuf: {error}); truncated or not ONNX?") from None
    if not proto.HasField("graph"):
        raise ValueError(f"{where} is not an ONNX model: it has no graph")
    return proto


def _external_bytes(tensor, folder: Path | None) -> bytes:
    """The bytes of a tensor stored outside the model file, read from inside ``folder`` only."""
    entries = {e.key: e.value for e in tensor.external_data}
    where = f"initializer {tensor.name!r}"
    if folder is None:
        raise ValueError(f"{where} is stored in an external file; load the model from its path so the file "
                         f"can be found beside it")
    location = entries.get("location", "")
    relative = Path(location)
    if not location or relative.is_absolute() or relative.drive:
        raise ValueError(f"{where}: external data location {location!r} must be a path relative to the model")
    file = (folder / relative).resolve()
    if not file.is_relative_to(folder):
        raise ValueError(f"{where}: external data location {location!r} leads out of the model's folder {folder}")
    if not file.is_file():
        raise ValueError(f"{where}: external data file {str(file)!r} does not exist")
    size = file.stat().st_size
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else size - offset
    except ValueError:
        raise ValueError(f"{where}: external data offset / length must be integers, got {entries}") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{where}: external data bytes {offset}..{offset + length} lie outside "
                         f"{str(file)!r} ({size} bytes)")
    with open(file, "rb") as f:
        f.seek(offset)
        return f.read(length)


def tensor_array(tensor, folder: Path | None = None, where: str = "") -> np.ndarray:
    """A TensorProto as an ndarray (4-bit and 2-bit codes unpacked into int8 / uint8)."""
    onnx = onnx_module()
    where = where or f"tensor {tensor.name!r}"
    dtype = numpy_dtype(tensor.data_type, where)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = _external_bytes(tensor, folder)
        tensor = inline
    if any(d < 0 for d in tensor.dims):
        raise ValueError(f"{where}: negative dimension in {list(tensor.dims)}")
    try:
        array = onnx.numpy_helper.to_array(tensor)
    except Exception as error:  # the protobuf's sizes disagree with its dims, or its data is corrupt
        raise ValueError(f"{where}: its data does not match its shape {list(tensor.dims)} and type "
                         f"{elem_name(tensor.data_type)} ({error})") from None
    return np.asarray(array, dtype, order="C")  # keeps 0-d scalars 0-d, unlike ascontiguousarray


# ---- attributes, value infos, constants ----------------------------------------------------------------------------

def _attribute(attribute, folder: Path | None, where: str) -> Any:
    onnx = onnx_module()
    if attribute.type in _GRAPH_ATTRIBUTES:
        raise _Unsupported(f"attribute {attribute.name!r} holds a subgraph or sparse tensor")
    if attribute.ref_attr_name:
        raise _Unsupported(f"attribute {attribute.name!r} refers to a function attribute")
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return tensor_array(value, folder, f"{where}: attribute {attribute.name!r}")
    if isinstance(value, list):
        if value and isinstance(value[0], onnx.TensorProto):
            raise _Unsupported(f"attribute {attribute.name!r} holds a list of tensors")
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in value]
    return value


class _Unsupported(Exception):
    """A node that cannot be imported; collected and reported with all the others."""


def _constant(attrs: dict[str, Any], where: str) -> np.ndarray:
    """The value of a Constant node from whichever of its attributes is set."""
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    raise _Unsupported(f"{where}: Constant with attributes {sorted(attrs)} (string or sparse values)")


def _value_info(value) -> tuple[ValueInfo, int]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ValueError(f"graph input / output {value.name!r}: only tensors are supported, got a {kind}")
    tensor = value.type.tensor_type
    dims: list[int | str | None] = None
    if tensor.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return ValueInfo(value.name, dims, type_string(tensor.elem_type)), tensor.elem_type


# ---- the graph -----------------------------------------------------------------------------------------------------

def _opsets(proto) -> dict[str, int]:
    onnx = onnx_module()
    opset = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in proto.opset_import}
    if "" not in opset:
        raise ValueError("model: it imports no default-domain opset (opset_import has no '' / 'ai.onnx' entry)")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset[""] <= newest:
        raise ValueError(f"model: default-domain opset {opset['']} is outside {MIN_OPSET}..{newest} (the newest "
                         f"the installed onnx knows); convert it with onnx.version_converter.convert_version")
    return opset


def _op_name(node) -> str:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return f"{domain}.{node.op_type}" if domain else node.op_type


def _topological(nodes: list[Node], defined: set[str]) -> list[Node]:
    """``nodes`` in an order where each reads only tensors defined before it (ONNX files should already be)."""
    known, ordered, waiting = set(defined), [], list(nodes)
    while waiting:
        progress, later = False, []
        for node in waiting:
            if all(not t or t in known for t in node.inputs):
                ordered.append(node)
                known.update(node.outputs)
                progress = True
            else:
                later.append(node)
        if not progress:
            missing = sorted({t for n in later for t in n.inputs if t and t not in known})
            raise ValueError(f"model: nodes {[n.name for n in later][:10]} read tensors no node computes before "
                             f"them ({missing[:10]}): a cycle, or an undefined tensor")
        waiting = later
    return ordered


def _unique_names(nodes) -> list[str]:
    names, seen = [], set()
    for i, node in enumerate(nodes):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        names.append(name)
    return names


def _convert(proto, folder: Path | None) -> Imported:
    onnx_graph = proto.graph
    opset = _opsets(proto)
    params: dict[str, np.ndarray] = {}
    for tensor in onnx_graph.initializer:
        params[tensor.name] = tensor_array(tensor, folder, f"initializer {tensor.name!r}")
    if len(onnx_graph.sparse_initializer):
        raise UnsupportedModelError("model: sparse initializers are not supported", {"sparse_initializer": []})
    inputs, input_infos, sub_byte = {}, [], {}
    for value in onnx_graph.input:
        if value.name in params:  # an initializer also listed as an input (IR < 4): a constant here
            continue
        info, elem = _value_info(value)
        dtype = numpy_dtype(elem, f"graph input {value.name!r}")
        if info.shape is None:
            raise ValueError(f"graph input {value.name!r}: its rank is unknown; lowbit needs the input's rank")
        inputs[value.name] = TensorSpec(tuple(info.shape), dtype.name)
        input_infos.append(info)
        if elem in SUB_BYTE_TYPES:
            sub_byte[value.name] = elem_name(elem)
    output_infos = [_value_info(value)[0] for value in onnx_graph.output]

    nodes, unsupported = [], {}
    for name, node in zip(_unique_names(onnx_graph.node), onnx_graph.node):
        op, where = _op_name(node), f"node {name!r} ({_op_name(node)})"
        domain = op.rpartition(".")[0]
        try:
            if domain not in DOMAINS:
                raise _Unsupported(f"domain {domain!r}")
            attrs = {a.name: _attribute(a, folder, where) for a in node.attribute}
            if op == "Constant":
                params[node.output[0]] = _constant(attrs, where)
                continue
        except _Unsupported as why:
            unsupported.setdefault(op, []).append(f"{name} ({why})")
            continue
        outputs = list(node.output)
        while outputs and not outputs[-1]:  # omitted trailing optional outputs
            outputs.pop()
        outputs = [t or f"{name}:unused{k}" for k, t in enumerate(outputs)]
        nodes.append(Node(op, list(node.input), outputs, attrs, name))
    for tensor in onnx_graph.initializer:  # 4-bit zero points: QuantizeLinear saturates to their range
        if tensor.data_type in SUB_BYTE_TYPES:
            sub_byte[tensor.name] = elem_name(tensor.data_type)
    for node in nodes:
        zero = node.inputs[2] if node.op == "QuantizeLinear" and len(node.inputs) > 2 else ""
        if zero in sub_byte:
            node.attrs["output_dtype_name"] = sub_byte[zero]
        elif node.op == "QuantizeLinear" and "output_dtype" in node.attrs:
            node.attrs["output_dtype_name"] = elem_name(int(node.attrs["output_dtype"]))

    if unsupported:  # nodes are missing: report them with every node that has no kernel either
        _check_supported(Graph(nodes, inputs, [], params, opset), unsupported)
    graph = Graph(_topological(nodes, set(inputs) | set(params)), inputs, [o.name for o in output_infos], params,
                  opset)
    graph.validate()
    metadata = {"producer_name": proto.producer_name, "producer_version": proto.producer_version,
                "domain": proto.domain, "description": proto.doc_string, "version": proto.model_version,
                "graph_name": onnx_graph.name, "graph_description": onnx_graph.doc_string,
                "custom_metadata_map": {p.key: p.value for p in proto.metadata_props}}
    return Imported(graph, input_infos, output_infos, metadata)


def _check_supported(graph: Graph, unsupported: dict[str, list[str]]) -> None:
    """Raise one :class:`UnsupportedModelError` listing every node lowbit has no kernel for."""
    from lowbit.runtime.registry import PREPARERS
    from lowbit.runtime.session import OP_MODULES  # noqa: F401  (registers every preparer)

    for node in graph.nodes:
        if node.op not in PREPARERS:
            unsupported.setdefault(node.op, []).append(node.name)
    if unsupported:
        lines = [f"  {op} (opset {graph.opset_of(op)}): {len(names)} node(s): {', '.join(names[:8])}"
                 + (" ..." if len(names) > 8 else "") for op, names in sorted(unsupported.items())]
        raise UnsupportedModelError(f"model: {sum(map(len, unsupported.values()))} node(s) of "
                                    f"{len(unsupported)} op type(s) cannot run in lowbit:\n" + "\n".join(lines),
                                    unsupported)


@paused()
def import_model(model: Any, *, optimize: bool = True, per_token: bool = False) -> Imported:
    """Read and convert ``model`` (path, bytes or ModelProto); with ``optimize``, fuse patterns and fold constants
    (``per_token``: the fused dynamic int8 products quantize each token, see ``fuse_dynamic_matmul``)."""
    from lowbit.runtime.dynamic_fusion import fuse_dynamic_matmul
    from lowbit.runtime.passes import fold_constants, split_constant_bias
    from lowbit.runtime.qdq_fusion import fuse_qdq
    from lowbit.runtime.transformer_fusion import fuse_transformer_ops

    proto, folder = read_model(model)
    imported = _convert(proto, folder)
    imported.tensors = frozenset(t for node in imported.graph.nodes for t in node.outputs)
    if optimize:  # fused patterns (Q/DQ, dynamic products, GELU, attention, biased MatMuls), folded constants
        imported.graph = fuse_transformer_ops(split_constant_bias(fold_constants(fuse_dynamic_matmul(
            fuse_qdq(imported.graph), per_token=per_token))))
    _check_supported(imported.graph, {})
    return imported


def load(model: Any, *, optimize: bool = True) -> Graph:
    """The :class:`lowbit.Graph` of an ONNX model: a path, the file's bytes, or an ``onnx.ModelProto``.

    Raises :class:`UnsupportedModelError` (a ValueError) listing every op lowbit cannot run, ValueError for
    a malformed file (truncated protobuf, data that disagrees with its shape, external data outside the
    model's folder, a cycle), and ImportError when onnx is not installed.
    """
    return import_model(model, optimize=optimize).graph


