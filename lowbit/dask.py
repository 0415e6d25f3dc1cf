"""Batch inference over a Dask cluster: ``predict(model, data)`` runs a model on every chunk of a large array.

The model (a ``.lowbit`` or ``.onnx`` file, or its bytes) is checked and run once on the client, so that a bad
path or an input that does not fit fails before any task is scheduled. The graph that Dask runs then carries
only the model's path (or, for bytes, one shared key holding them, moved to each worker once) and its content
hash: each worker process loads and prepares the model the first time one of its tasks needs it and keeps it
for every later task and job (:data:`LOADS` counts the loads of this process). Each chunk runs through
:meth:`lowbit.Session.run` / :meth:`lowbit.onnx.InferenceSession.run` with ``fallback=False``, so the result
does not depend on timing: for models whose kernels compute each sample on its own (integer products, static
quantization), the outputs are bit-identical to one run over the whole array, whatever the chunking.

Inputs: a ``dask.array`` chunked along the batch axis (other axes are joined into one chunk), a dict of them
for models with several inputs (same batch chunks), or a ``dask.dataframe`` for single-input models whose
rows are samples (the columns, in order, are a sample's values, flattened in C order). The kernel threads of
each task default to the worker's thread count, so nothing oversubscribes; ``threads_per_worker`` overrides it.
Kernels run on lowbit's own thread pool, not Numba's parallel layers, so worker threads may call them at once;
compiled kernels come from Numba's disk cache (the source tree, else the user's cache folder). Needs the
``[dask]`` extra (``dask[distributed,dataframe]``).
"""

from __future__ import annotations

import collections
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.extras import require

#: Loads of each model (by content hash) in this process: a worker loads a model once, whatever the tasks.
LOADS: collections.Counter[str] = collections.Counter()
_RUNNERS: dict[tuple[str, int], _Runner] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Source:
    """A model as tasks carry it: its path (None for bytes, which travel as a separate shared key), whether it is
    ONNX, and the SHA-256 of its content (the key of the per-process cache)."""

    path: str | None
    onnx: bool
    digest: str


def _source(model: Any) -> tuple[_Source, bytes | None]:
    """The model's :class:`_Source` and, for bytes, the bytes; clear errors for anything else."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        return _Source(None, not data.startswith(b"PK"), hashlib.sha256(data).hexdigest()), data
    if isinstance(model, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(model))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: no file {path!r} (every worker must be able to read it too)")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return _Source(path, path.lower().endswith(".onnx"), digest.hexdigest()), None
    raise TypeError(f"model: expected a path to a .lowbit or .onnx file, or its bytes, got {type(model).__name__}")


class _Runner:
    """A model loaded and prepared in this process: ``inputs`` (name -> (shape, dtype)), ``outputs`` (names) and
    ``run(feeds, names)``."""

    def __init__(self, source: _Source, data: bytes | None, threads: int):
        if source.onnx:
            from lowbit.onnx import InferenceSession, SessionOptions

            options = SessionOptions()
            options.intra_op_num_threads = threads
            session = InferenceSession(source.path if data is None else data, options)
            specs = session.graph.inputs
            self.inputs = {i.name: (tuple(i.shape), np.dtype(specs[i.name].dtype)) for i in session.get_inputs()}
            self.outputs = [o.name for o in session.get_outputs()]
            self._run = lambda feeds, names: session.run(names, feeds)
            return
        from lowbit.io import load
        from lowbit.runtime import Session

        if data is None:
            graph = load(source.path)
        else:
            with tempfile.TemporaryDirectory() as folder:  # lowbit.load reads a file; it is small
                path = os.path.join(folder, "model.lowbit")
                with open(path, "wb") as f:
                    f.write(data)
                graph = load(path)
        session = Session(graph, threads=threads, fallback=False)
        self.inputs = {name: (tuple(spec.shape), np.dtype(spec.dtype)) for name, spec in graph.inputs.items()}
        self.outputs = list(graph.outputs)
        self._run = lambda feeds, names: [session.run(feeds, names)[n] for n in names]

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        return self._run(feeds, names)


def _runner(source: _Source, data: bytes | None, threads: int) -> _Runner:
    """This process's runner of ``source`` with ``threads`` kernel threads, loaded on first use."""
    key = (source.digest, threads)
    with _LOCK:  # tasks of one worker run on several threads: one loads, the others wait for it
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _RUNNERS[key] = _Runner(source, data, threads)
            LOADS[source.digest] += 1
    return runner


def _task_threads(threads: int | None) -> int:
    """Kernel threads for a task: ``threads``, else the worker's thread count (1 outside a worker)."""
    if threads is not None:
        return threads
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def _predict_chunk(source: _Source, data: bytes | None, threads: int | None, names: list[str],
                   inputs: list[str], *arrays: np.ndarray) -> list[np.ndarray]:
    """One task: the outputs ``names`` of one chunk (``arrays``, in the order of ``inputs``)."""
    runner = _runner(source, data, _task_threads(threads))
    return runner.run(dict(zip(inputs, arrays)), names)


def _check_feeds(runner: _Runner, shapes: dict[str, tuple], dtypes: dict[str, np.dtype]) -> None:
    """Raise ValueError / TypeError, on the client, when the data cannot feed the model."""
    if set(shapes) != set(runner.inputs):
        raise ValueError(f"data: the model's inputs are {sorted(runner.inputs)}, got {sorted(shapes)}")
    for name, (shape, dtype) in runner.inputs.items():
        got = shapes[name]
        if len(got) != len(shape) or any(isinstance(d, int) and d != g for d, g in zip(shape[1:], got[1:])):
            raise ValueError(f"data[{name!r}]: expected shape {list(shape)} (batch first), got {list(got)}")
        if dtypes[name] != dtype:
            raise TypeError(f"data[{name!r}]: expected dtype {dtype}, got {dtypes[name]}; cast it with .astype")


def predict(model: Any, data: Any, *, input_name: str | None = None, output_names: list[str] | None = None,
            batch_size: int | None = None, threads_per_worker: int | None = None) -> Any:
    """The model's outputs over ``data``, lazily, as Dask collections (see the module docstring).

    Parameters
    ----------
    model : path to a ``.lowbit`` or ``.onnx`` file (readable by every worker), or the file's bytes
    data : dask.array.Array [N, ...] chunked along N; a dict of them (input name -> array); or a
        dask.dataframe.DataFrame whose rows are samples of a single-input model
    input_name : the input a single array feeds (default: the model's only input)
    output_names : outputs to compute (default: all, in the model's order)
    batch_size : rechunk the batch axis to this many samples per task (default: keep the chunks)
    threads_per_worker : kernel threads per task (default: the worker's thread count)

    Returns
    -------
    a dask.array.Array for a single output, else a dict name -> dask.array.Array (for a DataFrame: a
    dask.dataframe.DataFrame with a column per output value, ``name`` or ``name_j``).
    """
    dask = require("dask", "dask", "lowbit.dask")
    da = require("dask.array", "dask", "lowbit.dask")

    for name, value in (("batch_size", batch_size), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
    source, payload = _source(model)
    client_runner = _runner(source, payload, 1)  # fails here, before any task, on a bad model
    frame = _is_dataframe(data)
    if frame:
        if len(client_runner.inputs) != 1:
            raise ValueError(f"data: a DataFrame feeds single-input models; this one has inputs "
                             f"{sorted(client_runner.inputs)}: pass a dict of dask arrays")
        (only,) = client_runner.inputs
        shape, dtype = client_runner.inputs[only]
        rows = data.to_dask_array(lengths=True).astype(dtype)
        sample = shape[1:]
        if all(isinstance(d, int) for d in sample) and int(np.prod(sample)) == rows.shape[1] and len(sample) != 1:
            rows = rows.reshape(rows.shape[0], *sample)  # the columns are a sample's values, flattened in C order
        arrays = {only: rows}
    elif isinstance(data, dict):
        arrays = dict(data)
    elif isinstance(data, da.Array):
        if input_name is None and len(client_runner.inputs) != 1:
            raise ValueError(f"input_name: the model has inputs {sorted(client_runner.inputs)}; name the one the "
                             f"array feeds, or pass a dict")
        arrays = {input_name or next(iter(client_runner.inputs)): data}
    else:
        raise TypeError(f"data: expected a dask.array.Array, a dict of them or a dask.dataframe.DataFrame, got "
                        f"{type(data).__name__}")
    for name, array in arrays.items():
        if not isinstance(array, da.Array):
            raise TypeError(f"data[{name!r}]: expected a dask.array.Array, got {type(array).__name__}")
    _check_feeds(client_runner, {n: a.shape for n, a in arrays.items()}, {n: a.dtype for n, a in arrays.items()})
    names = list(output_names) if output_names is not None else list(client_runner.outputs)
    unknown = [n for n in names if n not in client_runner.outputs]
    if unknown:
        raise ValueError(f"output_names: {unknown} are not outputs of the model; it has {client_runner.outputs}")

    inputs = list(arrays)
    first = arrays[inputs[0]]
    chunks = batch_size if batch_size is not None else first.chunks[0]
    arrays = {n: a.rechunk({0: chunks, **{axis: -1 for axis in range(1, a.ndim)}}) for n, a in arrays.items()}
    if len({a.chunks[0] for a in arrays.values()}) != 1:
        raise ValueError("data: the arrays must have the same batch size and batch chunks")
    # one sample on the client: the outputs' shapes past the batch axis and their dtypes
    sample = client_runner.run({n: np.zeros((1, *a.shape[1:]), a.dtype) for n, a in arrays.items()}, names)
    shared = dask.delayed(payload, pure=True) if payload is not None else None  # bytes: one key, not one per task
    run = dask.delayed(_predict_chunk, pure=True, nout=len(names))
    blocks = {n: a.to_delayed().reshape(-1) for n, a in arrays.items()}
    columns: list[list[Any]] = [[] for _ in names]
    for index, rows in enumerate(arrays[inputs[0]].chunks[0]):
        results = run(source, shared, threads_per_worker, names, inputs, *(blocks[n][index] for n in inputs))
        for column, result, example in zip(columns, results, sample):
            column.append(da.from_delayed(result, (rows, *example.shape[1:]), dtype=example.dtype))
    outputs = {n: da.concatenate(column, axis=0) for n, column in zip(names, columns)}
    if frame:
        return _as_dataframe(outputs)
    return outputs[names[0]] if len(names) == 1 else outputs


def _is_dataframe(data: Any) -> bool:
    try:
        import dask.dataframe as dd
    except ImportError:  # pragma: no cover - dask without its dataframe extras
        return False
    return isinstance(data, dd.DataFrame)


def _as_dataframe(outputs: dict[str, Any]) -> Any:
    """Outputs ``[N, ...]`` as one DataFrame: a column per value of each sample's output."""
    import dask.array as da
    import dask.dataframe as dd

    flat = {n: a.reshape(a.shape[0], -1) for n, a in outputs.items()}
    columns = [n if a.shape[1] == 1 else f"{n}_{j}" for n, a in flat.items() for j in range(a.shape[1])]
    return dd.from_dask_array(da.concatenate(list(flat.values()), axis=1), columns=columns)
