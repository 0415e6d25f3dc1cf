"""What ONNX quantization shares: ONNX Runtime's enums, calibration readers, the report and the model being
rewritten (:mod:`lowbit.onnx.quantization`)."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lowbit.graph.ir import fresh_name

#: Calibration batches kept to measure an accuracy target on (the first ones the reader gives).
EVALUATION_BATCHES = 8
#: Ops that only move or pick elements: quantized with their input's scale and zero point, they run on codes.
PASS_THROUGH = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
READ_OPTIONS = ("ActivationSymmetric", "WeightSymmetric", "CalibTensorRangeSymmetric", "CalibMovingAverage",
                "CalibMovingAverageConstant", "CalibPercentile", "CalibNumBins", "accuracy_level")


# ---- enums -----------------------------------------------------------------------------------------------------------

class _Named(Enum):
    """An enum printed by its member's name, as ONNX Runtime's are."""

    def __str__(self) -> str:
        return self.name


class QuantType(_Named):
    """Weight and activation types: ONNX Runtime's 8-bit and 4-bit ones, and lowbit's (NF4, Ternary, Binary)."""

    QInt8 = 0
    QUInt8 = 1
    QInt4 = 5
    QUInt4 = 6
    Int4 = 5  # an alias of QInt4
    NF4 = 100
    Ternary = 101
    Binary = 102

    @staticmethod
    def from_string(t: str) -> "QuantType":
        return _quant_type(t, "t")


class QuantFormat(_Named):
    QOperator = 0
    QDQ = 1

    @staticmethod
    def from_string(format: str) -> "QuantFormat":
        return _quant_format(format, "format")


class CalibrationMethod(_Named):
    """How activation ranges are calibrated: ONNX Runtime's methods and lowbit's MSE (the range of least expected
    quantization error). Distribution (ONNX Runtime's, for float8) is refused."""

    MinMax = 0
    Entropy = 1
    Percentile = 2
    Distribution = 3
    MSE = 100


_TYPES = {"qint8": QuantType.QInt8, "int8": QuantType.QInt8, "quint8": QuantType.QUInt8, "uint8": QuantType.QUInt8,
          "qint4": QuantType.QInt4, "int4": QuantType.QInt4, "quint4": QuantType.QUInt4, "uint4": QuantType.QUInt4,
          "nf4": QuantType.NF4, "ternary": QuantType.Ternary, "binary": QuantType.Binary}
_FORMATS = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}
_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution,
            "mse": CalibrationMethod.MSE}
_OBSERVERS = {CalibrationMethod.MinMax: "minmax", CalibrationMethod.Entropy: "entropy",
              CalibrationMethod.Percentile: "percentile", CalibrationMethod.MSE: "mse"}


def _member(value: Any, enum: type[Enum], names: dict[str, Enum], argument: str) -> Enum:
    """``value`` as a member of ``enum``: a member, another enum's member of a known ``.name`` (ONNX Runtime's), or
    a name as a string (any case, ``_`` / ``-`` ignored)."""
    if isinstance(value, enum):
        return value
    key = value if isinstance(value, str) else getattr(value, "name", None)
    if isinstance(key, str):
        found = names.get(key.strip().lower().replace("_", "").replace("-", ""))
        if found is not None:
            return found
    choices = ", ".join(dict.fromkeys(m.name for m in names.values()))
    raise ValueError(f"{argument}: expected a {enum.__name__} ({choices}; lowbit's or onnxruntime's member, or its "
                     f"name as a string such as {next(iter(names))!r}), got {value!r}")


def _quant_type(value: Any, argument: str) -> QuantType:
    return _member(value, QuantType, _TYPES, argument)


def _quant_format(value: Any, argument: str) -> QuantFormat:
    return _member(value, QuantFormat, _FORMATS, argument)


def _calibration_method(value: Any, argument: str) -> CalibrationMethod:
    method = _member(value, CalibrationMethod, _METHODS, argument)
    if method is CalibrationMethod.Distribution:
        raise ValueError(f"{argument}: CalibrationMethod.Distribution calibrates float8 types, which lowbit does "
                         "not write; pass MinMax, Entropy, Percentile or MSE")
    return method


# ---- calibration data ------------------------------------------------------------------------------------------------

class CalibrationDataReader(abc.ABC):
    """The source of calibration batches: ``get_next()`` returns one dict of input name -> ndarray per call, then
    None. Any object with a ``get_next`` method is accepted (and counts as a subclass). lowbit reads the batches once,
    in order, and keeps none of them (but the first ``EVALUATION_BATCHES`` with an ``accuracy_target``, to measure it
    on); ``rewind()``, if a reader offers it, is for the caller (lowbit never calls it).
    """

    @classmethod
    def __subclasshook__(cls, subclass: type) -> bool:
        if cls is CalibrationDataReader:
            return callable(getattr(subclass, "get_next", None)) or NotImplemented
        return NotImplemented

    @abc.abstractmethod
    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch (input name -> array), or None when there are no more."""

    def rewind(self) -> None:
        """Start over from the first batch (optional)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rewind")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


def _check_reader(reader: Any, argument: str, what: str) -> None:
    if reader is None:
        raise ValueError(f"{argument}: {what} needs calibration data; pass a CalibrationDataReader (an object whose "
                         "get_next() returns a dict of input name -> numpy array per batch, then None)")
    if not callable(getattr(reader, "get_next", None)):
        raise TypeError(f"{argument}: expected a CalibrationDataReader (an object with a get_next() method), got "
                        f"{type(reader).__name__}")


def _batches(reader: Any, argument: str) -> Iterator[dict[str, np.ndarray]]:
    """The reader's batches, checked; ValueError when there are none."""
    count = 0
    while True:
        batch = reader.get_next()
        if batch is None:
            break
        if not isinstance(batch, dict) or not batch:
            raise TypeError(f"{argument}: get_next() must return a dict of input name -> numpy array (or None at the "
                            f"end), got {type(batch).__name__}" + (" (empty)" if isinstance(batch, dict) else ""))
        wrong = {k: type(v).__name__ for k, v in batch.items() if not isinstance(k, str) or
                 not isinstance(v, np.ndarray)}
        if wrong:
            raise TypeError(f"{argument}: get_next() must return a dict of input name -> numpy array; batch {count} "
                            f"has {wrong}")
        count += 1
        yield batch
    if not count:
        raise ValueError(f"{argument}: get_next() returned None at once, so there is nothing to calibrate on; pass "
                         "a reader that yields at least one batch")


def _run_float(proto: Any, reader: Any, fetch: list[str], visit: Callable[[str, np.ndarray], None],
               argument: str) -> int:
    """Run the float model on each of the reader's batches, calling ``visit(name, value)`` for each tensor of
    ``fetch``; nothing is kept between batches. The number of batches."""
    from lowbit.onnx.importer import import_model
    from lowbit.runtime.session import Session

    graph = import_model(proto, optimize=False).graph
    session = Session(graph, optimize=False)
    computed = [t for t in dict.fromkeys(fetch) if t not in graph.inputs]
    count = 0
    for count, batch in enumerate(_batches(reader, argument), start=1):
        try:
            results = session.run(batch, computed) if computed else {}
        except (ValueError, TypeError) as error:
            raise type(error)(f"{argument}: batch {count - 1} does not fit the model: {error}") from None
        for name in dict.fromkeys(fetch):
            visit(name, batch[name] if name in graph.inputs else results[name])
        del results, batch
    return count


class _Held:
    """A reader passing its batches through, keeping the first ``keep`` of them in ``held``."""

    def __init__(self, reader: Any, keep: int, held: list):
        self.reader, self.keep, self.held = reader, keep, held

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = self.reader.get_next()
        if isinstance(batch, dict) and len(self.held) < self.keep:
            self.held.append(batch)
        return batch


def _search(model: _Model, held: list[dict[str, np.ndarray]], sizes: dict[str, int], ladder: list[str],
            nbytes: Callable[[str, str], int], write: Callable[[dict[str, str]], Any], target: Any,
            report: QuantizationReport) -> dict[str, str]:
    """A precision per layer (name -> one of ``ladder``, cheapest first) keeping the model within ``target`` on the
    ``held`` batches (:func:`lowbit.onnx.accuracy.choose_precisions`), each candidate ``write(assignment)`` run by
    lowbit's quantized kernels (never a float twin); the choices and the metric reached go into the report's notes.
    ``sizes``: the weights of each layer, for the share in each precision."""
    from lowbit.onnx.accuracy import choose_precisions
    from lowbit.onnx.importer import import_model
    from lowbit.runtime.session import Session

    def outputs(proto: Any) -> list[list[np.ndarray]]:
        session = Session(import_model(proto).graph, fallback=False)
        return [[r[name] for name in model.outputs] for r in (session.run(batch) for batch in held)]

    references = outputs(model.proto)
    choices, value = choose_precisions(list(sizes), ladder, nbytes,
                                       lambda assignment: target.measure(outputs(write(assignment)), references),
                                       target)
    weights = {p: sum(sizes[n] for n, c in choices.items() if c.precision == p) for p in ladder}
    share = ", ".join(f"{100 * weights[p] / max(sum(weights.values()), 1):.0f}% {p}" for p in ladder if weights[p])
    report.notes.append(f"accuracy target {target}: reached {value:.6g} on {len(held)} calibration batch(es); "
                        f"weights {share}; {sum(c.nbytes for c in choices.values())} bytes")
    for name, choice in choices.items():
        alone = "" if choice.alone_loss is None else f"; {ladder[0]} alone costs {choice.alone_loss:.3g}"
        report.notes.append(f"{name}: {choice.precision} ({choice.nbytes} bytes){alone}")
    return {n: c.precision for n, c in choices.items()}


# ---- the report ------------------------------------------------------------------------------------------------------

@dataclass
class NodeQuantization:
    """One node of the report: its name and op, what was written for it, and how or why."""

    name: str
    op: str
    action: str  # what the node became, or "float"
    detail: str = ""


@dataclass
class QuantizationReport:
    """What :func:`quantize_dynamic` / :func:`quantize_static` did, node by node (``str()``: a table)."""

    model_output: str
    mode: str
    nodes: list[NodeQuantization] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batches: int = 0  # calibration batches read

    def add(self, node: Any, action: str, detail: str = "") -> None:
        op = node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}.{node.op_type}"
        self.nodes.append(NodeQuantization(node.name, op, action, detail))

    @property
    def quantized(self) -> list[NodeQuantization]:
        return [n for n in self.nodes if n.action != "float"]

    @property
    def kept_float(self) -> list[NodeQuantization]:
        return [n for n in self.nodes if n.action == "float"]

    def __str__(self) -> str:
        rows = [("node", "op", "written as", "how / why")] + [(n.name, n.op, n.action, n.detail) for n in self.nodes]
        widths = [min(48, max(len(r[i]) for r in rows)) for i in range(3)]
        lines = [f"{self.mode} -> {self.model_output}: {len(self.quantized)} node(s) quantized, "
                 f"{len(self.kept_float)} kept float" + (f", {self.batches} calibration batch(es)"
                                                          if self.batches else "")]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 9)
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(line.rstrip() for line in lines)


# ---- the model being rewritten ---------------------------------------------------------------------------------------

class _Model:
    """A copy of the input ModelProto (external data read in), with its constants, producers and consumers."""

    def __init__(self, model_input: Any, argument: str = "model_input"):
        from lowbit.onnx.importer import _unique_names, onnx_module, read_model

        onnx = self.onnx = onnx_module()
        if not isinstance(model_input, (str, os.PathLike, onnx.ModelProto)):
            raise TypeError(f"{argument}: expected a path or an onnx.ModelProto, got {type(model_input).__name__}")
        source, folder = read_model(model_input)
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        self.proto, self.graph = proto, proto.graph
        for tensor in self.graph.initializer:  # external data read in (from inside the model's folder only)
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.CopyFrom(onnx.numpy_helper.from_array(self._read(tensor, folder), tensor.name))
        for node, name in zip(self.graph.node, _unique_names(self.graph.node)):
            node.name = name
        self.nodes = list(self.graph.node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.nodes
                               if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1}
        self.outputs = [o.name for o in self.graph.output]
        self.inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self._index()
        self.taken = (set(self.initializers) | set(self.inputs) | set(self.producer) | {n.name for n in self.nodes}
                      | set(self.outputs))
        self.opset = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}
        self._values: dict[str, np.ndarray | None] = {}
        self.new_initializers: list[Any] = []

    @staticmethod
    def _read(tensor: Any, folder: Path | None) -> np.ndarray:
        from lowbit.onnx.importer import tensor_array

        return tensor_array(tensor, folder, f"initializer {tensor.name!r}")

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node's output, else None."""
        if name not in self._values:
            value = None
            if name in self.initializers:
                value = self._read(self.initializers[name], None)
            elif name in self.constant_nodes:
                attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in self.constant_nodes[name].attribute}
                if "value" in attrs:
                    value = self._read(attrs["value"], None)
                elif "value_float" in attrs or "value_floats" in attrs:
                    value = np.asarray(attrs.get("value_float", attrs.get("value_floats")), np.float32)
                elif "value_int" in attrs or "value_ints" in attrs:
                    value = np.asarray(attrs.get("value_int", attrs.get("value_ints")), np.int64)
            self._values[name] = value
        return self._values[name]

    def fresh(self, stem: str) -> str:
        return fresh_name(stem, self.taken)

    def add(self, stem: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``; its name."""
        name = self.fresh(stem)
        self.new_initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def private(self, tensor: str) -> Any | None:
        """The only reader of ``tensor`` when it has exactly one and is not a graph output, else None."""
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def float_weight(self, name: str, ndim: int | None = None) -> tuple[np.ndarray | None, str]:
        """``(value, "")`` of a constant float32 weight, else ``(None, why not)``."""
        value = self.constant(name) if name else None
        if value is None:
            return None, f"its weight {name!r} is computed at run time (not a constant)"
        if value.dtype != np.float32:
            return None, f"its weight {name!r} is {value.dtype}, not float32"
        if ndim is not None and value.ndim != ndim:
            return None, f"its weight {name!r} is {value.ndim}-D, not {ndim}-D"
        return value, ""

    def selection(self, nodes_to_quantize: Any, nodes_to_exclude: Any) -> Callable[[Any], str]:
        """A function telling why a node is not selected ("" when it is), after checking the names given."""
        names = {n.name for n in self.nodes}
        sets = []
        for argument, given in (("nodes_to_quantize", nodes_to_quantize), ("nodes_to_exclude", nodes_to_exclude)):
            if given is None:
                sets.append(None)
                continue
            if isinstance(given, str) or not all(isinstance(n, str) for n in given):
                raise TypeError(f"{argument}: expected a list of node names, got {given!r}")
            unknown = sorted(set(given) - names)
            if unknown:
                some = sorted(names)[:12]
                raise ValueError(f"{argument}: no node is named {unknown}; the model's nodes include {some}"
                                 + (" ..." if len(names) > 12 else ""))
            sets.append(set(given))
        keep, drop = sets

        def why(node: Any) -> str:
            if drop is not None and node.name in drop:
                return "listed in nodes_to_exclude"
            if keep is not None and node.name not in keep:
                return "not listed in nodes_to_quantize"
            return ""

        return why

    def commit(self, nodes: list[Any]) -> None:
        """Make ``nodes`` (and the initializers added so far) the proto's, and index them again."""
        self.nodes = list(nodes)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(self.new_initializers)
        self.initializers.update((t.name, t) for t in self.new_initializers)
        self.new_initializers = []
        self._index()

    def _index(self) -> None:
        """Each tensor's producer and readers, from :attr:`nodes`."""
        self.producer = {t: n for n in self.nodes for t in n.output if t}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for t in dict.fromkeys(node.input):
                if t:
                    self.consumers.setdefault(t, []).append(node)

    def assemble(self, nodes: list[Any], domains: set[str]) -> Any:
        """A new ModelProto of these nodes: what nothing reads dropped, ``domains`` imported (the model unchanged)."""
        onnx = self.onnx
        read = {t for n in nodes for t in n.input if t} | set(self.outputs)
        changed = True
        while changed:  # DequantizeLinear / QuantizeLinear / Constant nodes left without a reader
            kept = [n for n in nodes if n.op_type not in ("DequantizeLinear", "QuantizeLinear", "Constant")
                    or any(t in read for t in n.output)]
            changed = len(kept) != len(nodes)
            nodes = kept
            read = {t for n in nodes for t in n.input if t} | set(self.outputs)
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        graph = proto.graph
        del graph.node[:]
        graph.node.extend(nodes)
        initializers = [t for t in list(self.graph.initializer) + self.new_initializers if t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        present = {t.name for t in initializers}
        inputs = [i for i in graph.input if i.name in self.inputs or i.name in present]
        del graph.input[:]
        graph.input.extend(inputs)
        defined = present | set(self.inputs) | {t for n in nodes for t in n.output}
        infos = [v for v in graph.value_info if v.name in defined]
        del graph.value_info[:]
        graph.value_info.extend(infos)
        for domain in sorted(domains - set(self.opset)):
            proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))
        return proto

    def write(self, nodes: list[Any], path: Any, use_external_data_format: bool, domains: set[str]) -> None:
        """Save the model of these nodes (:meth:`assemble`) to ``path``."""
        self.save(self.assemble(nodes, domains), path, use_external_data_format)

    def save(self, proto: Any, path: Any, use_external_data_format: bool) -> None:
        """Save ``proto`` to ``path`` (its tensors in ``<name>.data`` beside it with ``use_external_data_format``)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"model_output: expected a path, got {type(path).__name__}")
        path = Path(path)
        if use_external_data_format:
            self.onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                 location=f"{path.name}.data", size_threshold=1024)
        else:
            self.onnx.save_model(proto, str(path))

    def node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", *,
             replacing: bool = False, **attrs: Any):
        """A new NodeProto (trailing absent inputs dropped) named ``name``: as is when it replaces the node of that
        name, else a fresh name from it."""
        while inputs and not inputs[-1]:
            inputs = inputs[:-1]
        return self.onnx.helper.make_node(op_type, inputs, outputs, name=name if replacing else self.fresh(name),
                                          domain=domain or None, **attrs)


def _op_types(given: Any, default: tuple[str, ...]) -> set[str]:
    if given is None:
        return set(default)
    if isinstance(given, str) or not all(isinstance(op, str) for op in given):
        raise TypeError(f"op_types_to_quantize: expected a list of op types such as {list(default)}, got {given!r}")
    return set(given)


def _ignored(report: QuantizationReport, options: dict) -> None:
    ignored = sorted(k for k in options if k not in READ_OPTIONS)
    if ignored:
        report.notes.append(f"extra_options not read by lowbit (ignored): {ignored}")
