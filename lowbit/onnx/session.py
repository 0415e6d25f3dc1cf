"""ONNX Runtime's Python API over lowbit: ``import lowbit.onnx as ort`` and keep the rest of the code.

:class:`InferenceSession` takes what ``onnxruntime.InferenceSession`` takes (a path or the model's
bytes, ``sess_options``, ``providers``) and answers the same calls: ``run(output_names, input_feed)``
returning a list of arrays, ``get_inputs()`` / ``get_outputs()`` (``name``, ``shape`` with symbols as
str, ``type`` as ``"tensor(float)"``), ``get_modelmeta()``, ``get_providers()``. Underneath, a
:class:`lowbit.Session` runs the imported graph with the quantized kernels always on (no race against a
float twin: quantized models give the quantized results, as in ONNX Runtime), prepared once per set of
input shapes (at most :data:`lowbit.runtime.session.MAX_SHAPES` kept).

Differences: 4-bit and 2-bit tensors are fed and returned as int8 / uint8 codes (one per byte); ``run_options``
is accepted and ignored; ``output_names`` may also name intermediate tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lowbit.onnx.importer import ValueInfo, import_model
from lowbit.runtime.profile import Profile
from lowbit.runtime.session import Session

PROVIDERS = ["CPUExecutionProvider"]
#: Session config entry: "0" runs node by node instead of chaining kernels into compiled functions.
COMPILED_CHAINS = "session.lowbit.compiled_chains"
#: Session config entry: "1" quantizes the activations of dynamic int8 products (DynamicQuantizeMatMul, as
#: ``quantize_dynamic`` writes them) per row, each token with its own range, instead of per tensor.
DYNAMIC_PER_TOKEN = "session.lowbit.dynamic_per_token"
#: At most this many checked feed signatures and output-name lists are remembered (then forgotten at once).
MEMO_SIZE = 256
SUB_BYTE = ("int4", "uint4", "int2", "uint2")  # ONNX types lowbit holds one code per byte


class GraphOptimizationLevel:
    """ONNX Runtime's levels: lowbit fuses Q/DQ patterns, folds constants and batch norms and fuses activations
    unless ``ORT_DISABLE_ALL``."""

    ORT_DISABLE_ALL = 0
    ORT_ENABLE_BASIC = 1
    ORT_ENABLE_EXTENDED = 2
    ORT_ENABLE_ALL = 99


class ExecutionMode:
    ORT_SEQUENTIAL = 0
    ORT_PARALLEL = 1


@dataclass
class SessionOptions:
    """The options of ``onnxruntime.SessionOptions`` that lowbit reads (the rest are accepted and kept).

    ``intra_op_num_threads``: threads of the kernels (0: all cores, nodes run one by one; n > 0: compiled chains
    of nodes, run by a team of n threads); ``graph_optimization_level``;
    ``enable_profiling``: record lowbit's per-node profile, written by
    :meth:`InferenceSession.end_profiling` to ``<profile_file_prefix>_<time>.json``. Config entry
    :data:`COMPILED_CHAINS` ``"0"``: run node by node (``lowbit.Session(..., compiled=False)``);
    :data:`DYNAMIC_PER_TOKEN` ``"1"``: dynamic int8 products quantize each token with its own range.
    """

    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    graph_optimization_level: int = GraphOptimizationLevel.ORT_ENABLE_ALL
    execution_mode: int = ExecutionMode.ORT_SEQUENTIAL
    enable_profiling: bool = False
    profile_file_prefix: str = "lowbit_profile"
    log_severity_level: int = 2
    log_verbosity_level: int = 0
    optimized_model_filepath: str = ""
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    use_deterministic_compute: bool = False
    config_entries: dict[str, str] = field(default_factory=dict)

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.config_entries[str(key)] = str(value)

    def get_session_config_entry(self, key: str) -> str:
        return self.config_entries[key]


class RunOptions:
    """Accepted for compatibility; lowbit has nothing to set per run."""

    log_severity_level: int = 2
    terminate: bool = False


@dataclass(frozen=True)
class NodeArg:
    """A graph input or output: ``name``, ``shape`` (ints, symbol names, None for unknown) and ``type``."""

    name: str
    shape: list[int | str | None]
    type: str


@dataclass(frozen=True)
class ModelMetadata:
    producer_name: str
    graph_name: str
    graph_description: str
    domain: str
    description: str
    version: int
    custom_metadata_map: dict[str, str]


def get_available_providers() -> list[str]:
    return list(PROVIDERS)


def get_device() -> str:
    return "CPU"


def _node_arg(info: ValueInfo) -> NodeArg:
    return NodeArg(info.name, list(info.shape) if info.shape is not None else None, info.type)


class InferenceSession:
    """Run an ONNX model (path, or the file's bytes) with lowbit's kernels, through ONNX Runtime's API."""

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, sess_options: SessionOptions | None = None,
                 providers: Sequence[Any] | None = None, provider_options: Sequence[dict] | None = None,
                 **kwargs: Any):
        options = sess_options if sess_options is not None else SessionOptions()
        if not isinstance(options, SessionOptions):
            raise TypeError(f"sess_options: expected a lowbit.onnx.SessionOptions, got {type(options).__name__}")
        threads = int(options.intra_op_num_threads)
        if threads < 0:
            raise ValueError(f"sess_options.intra_op_num_threads: expected >= 0 (0: all cores), got {threads}")
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in (providers or [])]
        if names and "CPUExecutionProvider" not in names:
            warnings.warn(f"providers {names} are not available in lowbit; running on CPUExecutionProvider",
                          stacklevel=2)
        # ORT_DISABLE_ALL runs the graph as written: no Q/DQ or dynamic fusion, folding, batch-norm folding
        optimize = options.graph_optimization_level != GraphOptimizationLevel.ORT_DISABLE_ALL
        imported = import_model(path_or_bytes, optimize=optimize,
                                per_token=options.config_entries.get(DYNAMIC_PER_TOKEN, "0") == "1")
        self._inputs = [_node_arg(i) for i in imported.inputs]
        self._outputs = [_node_arg(o) for o in imported.outputs]
        self._meta = ModelMetadata(**{k: imported.metadata[k] for k in ModelMetadata.__dataclass_fields__})
        self._options = options
        self._session = Session(imported.graph, threads=threads or None, fallback=False, optimize=optimize,
                                compiled=options.config_entries.get(COMPILED_CHAINS, "1") != "0")
        self._specs = dict(imported.graph.inputs)
        graph = self._session.graph
        self._rewritten = imported.tensors - {t for n in graph.nodes for t in n.outputs} - set(graph.inputs)
        self._profiled_feeds: dict[str, np.ndarray] | None = None
        # what earlier runs checked, so that repeated runs skip the checks: output_names (None or a tuple) -> the
        # names to fetch, and the (shape, dtype) of each input, in order, of feeds that passed as they were
        self._fetches: dict[tuple[str, ...] | None, list[str]] = {}
        self._passed: set[tuple] = set()

    # ---- ONNX Runtime's API ------------------------------------------------------------------------------------------

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[NodeArg]:
        return []

    def get_modelmeta(self) -> ModelMetadata:
        return self._meta

    def get_providers(self) -> list[str]:
        return list(PROVIDERS)

    def get_provider_options(self) -> dict[str, dict]:
        return {p: {} for p in PROVIDERS}

    def get_session_options(self) -> SessionOptions:
        return self._options

    def set_providers(self, providers: Sequence[Any] | None = None, provider_options: Any = None) -> None:
        """Accepted for compatibility: lowbit runs on the CPU."""

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
            run_options: RunOptions | None = None) -> list[np.ndarray]:
        """The outputs named by ``output_names`` (None or empty: all graph outputs), in that order, computed
        from ``input_feed`` (input name -> array)."""
        names = self._fetch(output_names)
        feeds = input_feed if self._signature(input_feed) in self._passed else self._feeds(input_feed)
        results = self._session.run(feeds, names)
        if self._options.enable_profiling:
            self._profiled_feeds = feeds
        return [results[n] for n in names]

    def run_with_ort_values(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("lowbit.onnx has no OrtValue; call run() with NumPy arrays")

    def end_profiling(self) -> str:
        """Write the per-node profile of the last run's inputs to ``<profile_file_prefix>_<time>.json``; its path."""
        if not self._options.enable_profiling:
            return ""
        if self._profiled_feeds is None:
            raise RuntimeError("end_profiling: no run was made since the session started")
        profile = self.profile(self._profiled_feeds)
        path = f"{self._options.profile_file_prefix}_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"total_ms": profile.total_ms, "nodes": [row.__dict__ for row in profile.rows]}, f, indent=1)
        return path

    # ---- lowbit's additions ----------------------------------------------------------------------------------------

    @property
    def graph(self):
        """The lowbit graph that runs (after Q/DQ fusion, constant folding and lowbit's own rewrites)."""
        return self._session.graph

    def profile(self, input_feed: dict[str, Any], repeat: int = 5) -> Profile:
        """Per-node times (best of ``repeat``) for these inputs: which kernel ran each node, in what precision."""
        return self._session.profile(self._feeds(input_feed), repeat)

    def _fetch(self, output_names: Sequence[str] | None) -> list[str]:
        """The names ``run`` fetches for ``output_names``, checked the first time they are asked for."""
        if isinstance(output_names, str):
            raise TypeError(f"output_names: expected a list of names or None, got the string {output_names!r}")
        key = None if not output_names else tuple(output_names)
        try:  # no context manager: this is every run's path
            return self._fetches[key]
        except (KeyError, TypeError):  # TypeError: unhashable entries, refused by the session
            pass
        names = [o.name for o in self._outputs] if not output_names else list(output_names)
        gone = [n for n in names if n in self._rewritten]
        if gone:
            raise ValueError(f"output_names: {gone} were fused or folded away by graph optimization; to fetch "
                             "intermediate tensors, set sess_options.graph_optimization_level = "
                             "GraphOptimizationLevel.ORT_DISABLE_ALL")
        with contextlib.suppress(TypeError):
            if len(self._fetches) >= MEMO_SIZE:
                self._fetches.clear()
            self._fetches[key] = names
        return names

    def _signature(self, input_feed: object) -> tuple | None:
        """The shapes and dtypes of ``input_feed``'s arrays in input order; None unless it holds exactly the inputs,
        as ndarrays."""
        if type(input_feed) is not dict or len(input_feed) != len(self._inputs):
            return None
        values = [input_feed.get(arg.name) for arg in self._inputs]
        if not all([type(v) is np.ndarray for v in values]):
            return None
        return tuple([(v.shape, v.dtype) for v in values])

    def _feeds(self, input_feed: dict[str, Any]) -> dict[str, np.ndarray]:
        """Check ``input_feed`` against the inputs' types and shapes, with errors naming the input (feeds that pass
        as they are join :attr:`_passed`)."""
        if not isinstance(input_feed, dict):
            raise TypeError(f"input_feed: expected a dict of input name -> array, got {type(input_feed).__name__}")
        unknown = [n for n in input_feed if n not in self._specs]
        if unknown:
            raise ValueError(f"input_feed: unknown inputs {unknown}; the model's inputs are "
                             f"{[i.name for i in self._inputs]}")
        feeds = {}
        for arg in self._inputs:
            spec = self._specs[arg.name]
            if arg.name not in input_feed:
                raise ValueError(f"input_feed: missing input {arg.name!r} ({arg.type}, shape {arg.shape})")
            value = input_feed[arg.name]
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.dtype.name in SUB_BYTE and arg.type == f"tensor({array.dtype.name})":
                array = array.astype(spec.dtype)  # ml_dtypes' sub-byte codes -> one code per byte
            if array.dtype != np.dtype(spec.dtype):
                raise TypeError(f"input {arg.name!r}: expected {arg.type} (numpy {spec.dtype}), got "
                                f"{array.dtype} ({type(value).__name__})")
            if array.ndim != len(spec.shape):
                raise ValueError(f"input {arg.name!r}: expected rank {len(spec.shape)} (shape {arg.shape}), got "
                                 f"shape {array.shape}")
            wrong = [(axis, d, s) for axis, (d, s) in enumerate(zip(spec.shape, array.shape))
                     if isinstance(d, int) and d != s]
            if wrong:
                axis, d, s = wrong[0]
                raise ValueError(f"input {arg.name!r}: dimension {axis} must be {d} (shape {arg.shape}), got "
                                 f"shape {array.shape}")
            feeds[arg.name] = array
        signature = self._signature(input_feed)
        if signature is not None and all(feeds[n] is input_feed[n] for n in feeds):
            if len(self._passed) >= MEMO_SIZE:  # varying shapes (sequence lengths) must not grow it for ever
                self._passed.clear()
            self._passed.add(signature)
        return feeds
