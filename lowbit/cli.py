"""The ``lowbit`` command line: info, bench, demo, warmup, quantize, run, report, inspect.

``run``, ``bench`` and ``inspect`` take ONNX files (``MODEL.onnx``) as well as ``.lowbit`` ones."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np

import kernels
from kernels import dispatch
from lowbit.extras import require
from lowbit.quantization.formats import FORMATS


class UsageError(Exception):
    """A command given what it cannot use: printed as one line (``lowbit CMD: error: ...``), exit code 2."""


INFO_SHAPES = ((1, 4096, 4096), (8, 4096, 4096), (1024, 1024, 1024))  # decode, small batch, large GEMM


def _info(args: argparse.Namespace) -> int:
    from lowbit import __version__

    info = {"lowbit": __version__, **kernels.cpu_info()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    shapes = ", ".join("x".join(map(str, shape)) for shape in INFO_SHAPES)
    print(f"\nkernels chosen for M x N x K = {shapes}:")
    ops = sorted({variant.op for variant in dispatch.variants()})
    width = max(map(len, ops))
    for op in ops:
        kinds = [dispatch.choose(op, *shape).kind for shape in INFO_SHAPES]
        print(f"  {op:<{width}}  {', '.join(kinds)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.model:
        return _bench_model(args)
    from lowbit.benchmark import bench, table

    print(f"{kernels.cpu_info()['cpu']}, level {kernels.cpu_info()['active_level']}, "
          f"{args.threads or kernels.get_num_threads()} thread(s); ratio = NumPy float32 time / lowbit time")
    print(table(bench(threads=args.threads, progress=lambda line: print(line, file=sys.stderr, flush=True))))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lowbit.demo.digits import main as digits

    return digits(quick=args.quick, seed=args.seed)


def _warmup(args: argparse.Namespace) -> int:
    from lowbit.warmup import warmup

    print(f"loading or compiling every kernel for level {kernels.cpu_info()['active_level']}:")
    seconds, compiled = warmup()
    if compiled:
        print(f"done in {seconds:.1f} s: compiled {compiled} functions into the cache")
    else:
        print(f"done in {seconds:.1f} s: every kernel was already compiled (loaded from the cache)")
    return 0


def _dims(pairs: list[str] | None) -> dict[str, int]:
    """``--dim seq=128`` options as {symbol: size}."""
    dims = {}
    for pair in pairs or []:
        name, _, size = pair.partition("=")
        if not name or not size.isdigit():
            raise UsageError(f"--dim: expected NAME=SIZE (a symbolic dimension and its size), got {pair!r}")
        dims[name] = int(size)
    return dims


def _onnx_feeds(session, inputs: list[str] | None, batch: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """``--input NAME=file.npy`` (repeatable), one ``.npy`` for a single-input model or an ``.npz`` by name;
    example inputs for the rest."""
    from lowbit.onnx.tools import example_feeds

    if inputs and batch is not None:
        raise UsageError("--batch: the arrays of --input set the batch; give one or the other")
    feeds = example_feeds(session.get_inputs(), batch or 1, dims)
    declared = {i.name: np.dtype(np.float32) if i.type == "tensor(float)" else None for i in session.get_inputs()}
    for item in inputs or []:
        name, sep, path = item.rpartition("=")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                given = {n: data[n] for n in data.files}
        else:
            if not sep:
                if len(declared) != 1:
                    raise UsageError(f"--input: the model has inputs {list(declared)}: give NAME=file.npy for each")
                name = next(iter(declared))
            given = {name: np.load(path, allow_pickle=False)}
        feeds.update({n: _declared(n, v, declared.get(n), path) for n, v in given.items()})
    return feeds


def _run_onnx(args: argparse.Namespace) -> int:
    from lowbit.onnx import InferenceSession, SessionOptions

    options = SessionOptions()
    options.intra_op_num_threads = args.threads or 0
    session = InferenceSession(args.model, options)
    feeds = _onnx_feeds(session, args.input, args.batch, _dims(args.dim))
    session.run(None, feeds)  # prepare
    start = time.perf_counter()
    outputs = session.run(None, feeds)
    elapsed = time.perf_counter() - start
    for arg, value in zip(session.get_outputs(), outputs):
        print(f"{arg.name}: shape {value.shape}, dtype {value.dtype}, first values {value.reshape(-1)[:5]}")
    if args.output:
        np.savez(args.output, **{arg.name: value for arg, value in zip(session.get_outputs(), outputs)})
    print(f"ran in {elapsed * 1e3:.2f} ms")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lowbit.onnx.tools import inspect

    report, runs = inspect(args.model, args.batch, _dims(args.dim))
    print(report)
    return 0 if runs else 1


def _bench_model(args: argparse.Namespace) -> int:
    from lowbit.onnx.tools import bench

    threads = args.threads or 1
    info = kernels.cpu_info()
    print(f"{args.model}: batch {args.batch}, {threads} thread(s); {info['cpu']}, level {info['active_level']}")
    best = bench(args.model, args.batch, _dims(args.dim), threads, args.rounds)
    ours = best["lowbit"]
    line = f"lowbit {1e3 * ours:.3f} ms"
    if "onnxruntime" in best:
        line += f", onnxruntime {1e3 * best['onnxruntime']:.3f} ms: lowbit takes {ours / best['onnxruntime']:.2f}x " \
                f"ONNX Runtime's time"
    print(line)
    return 0


def _declared(name: str, value: np.ndarray, dtype: np.dtype, path: str) -> np.ndarray:
    """``value`` as the model declares input ``name``: float64 arrays (NumPy's default) cast to float32, with a note."""
    if value.dtype == np.float64 and dtype == np.float32:
        print(f"note: {path}: input {name!r} is float64, cast to float32", file=sys.stderr)
        return value.astype(np.float32)
    return value


def _feeds(graph, path: str | None, batch: int | None) -> dict[str, np.ndarray]:
    """The model's inputs: from an .npy / .npz file, else random data of the declared shapes (batch ``batch``)."""
    if path:
        if batch is not None:
            raise UsageError("--batch: the arrays of --input set the batch; give one or the other")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                feeds = {name: data[name] for name in data.files}
        elif len(graph.inputs) != 1:
            raise UsageError(f"--input: the model has inputs {list(graph.inputs)}: give an .npz holding an array for "
                             f"each (np.savez(path, name=array, ...))")
        else:
            feeds = {next(iter(graph.inputs)): np.load(path, allow_pickle=False)}
        return {n: _declared(n, v, np.dtype(graph.inputs[n].dtype), path) if n in graph.inputs else v
                for n, v in feeds.items()}
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal([(batch or 1) if d is None else d for d in spec.shape]).astype(spec.dtype)
            for name, spec in graph.inputs.items()}


class _CalibrationFiles:
    """Calibration batches read from ``--calibration`` one at a time (a reader: ``get_next()``), with a progress line.

    An ``.npz`` holds arrays by input name, an ``.npy`` the one input of a single-input model; either is cut into
    batches of ``batch_size`` along axis 0. A folder's ``.npz`` / ``.npy`` files (in name order) are one batch
    each, loaded when needed, so a large calibration set never sits in memory at once."""

    def __init__(self, path: str, declared: dict[str, np.dtype | None], batch_size: int):
        import os

        self.declared, self.inputs, self.batch_size, self.done = declared, list(declared), batch_size, 0
        if os.path.isdir(path):
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".npz", ".npy")))
            if not self.files:
                raise UsageError(f"--calibration: {path} holds no .npz or .npy files")
            self.total, self.pending = len(self.files), None
        else:
            whole = self._load(path)
            rows = len(next(iter(whole.values())))
            self.files, self.total = [], -(-rows // batch_size)
            self.pending = ({n: v[i:i + batch_size] for n, v in whole.items()} for i in range(0, rows, batch_size))

    def _load(self, path: str) -> dict[str, np.ndarray]:
        try:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as data:
                    feeds = {n: data[n] for n in data.files}
                if len(self.inputs) == 1 and list(feeds) == ["arr_0"]:
                    feeds = {self.inputs[0]: feeds["arr_0"]}
            else:
                if len(self.inputs) != 1:
                    raise UsageError(f"--calibration: the model has inputs {self.inputs}: give an .npz holding "
                                     f"an array for each (np.savez(path, name=array, ...))")
                feeds = {self.inputs[0]: np.load(path, allow_pickle=False)}
        except (OSError, ValueError) as error:
            raise UsageError(f"--calibration: cannot read {path}: {error}") from None
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise UsageError(f"--calibration: {path} has no array for the inputs {missing} (it holds {sorted(feeds)})")
        return {n: _declared(n, feeds[n], self.declared[n], path) for n in self.inputs}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pending is not None:
            batch = next(self.pending, None)
        else:
            batch = self._load(self.files[self.done]) if self.done < len(self.files) else None
        if batch is None:
            if self.done:
                print(file=sys.stderr)
            return None
        self.done += 1
        print(f"\rcalibration batch {self.done}/{self.total}", end="", file=sys.stderr, flush=True)
        return batch


def _quantize(args: argparse.Namespace) -> int:
    if args.model.lower().endswith(".onnx"):
        return _quantize_onnx(args)
    import lowbit
    from lowbit.io import model_size

    graph = lowbit.load(args.model)
    convs = [layer.name for layer in lowbit.ptq.find_layers(graph) if layer.node.op == "Conv"]
    if not args.calibration and (args.activations == "static" or (convs and args.weights == "int8")):
        why = "static activations need" if args.activations == "static" else \
            f"int8 convolutions ({', '.join(convs[:3])}{' ...' if len(convs) > 3 else ''}) are static and need"
        raise UsageError(f"lowbit quantize: {why} calibration data: --calibration FILE.npy / FILE.npz / FOLDER "
                         f"(inputs the model will see)"
                         + (", or --activations dynamic" if args.activations == "static" and not convs else ""))
    declared = {n: np.dtype(spec.dtype) for n, spec in graph.inputs.items()}
    reader = _CalibrationFiles(args.calibration, declared, args.batch) if args.calibration else None
    batches = [] if reader is None else list(iter(reader.get_next, None))
    quantizer = lowbit.ptq.Quantizer(graph, batches or None, {"precision": args.weights,
                                                               "activations": args.activations})
    quantized = quantizer.build()
    lowbit.save(quantized, args.output)
    print(quantizer.summary())
    print(f"{args.model} ({model_size(graph)} bytes) -> {args.output} ({model_size(quantized)} bytes)")
    return 0


def _quantize_onnx(args: argparse.Namespace) -> int:
    from lowbit.onnx import InferenceSession
    from lowbit.onnx.quantization import quantize_dynamic, quantize_static

    declared = {i.name: np.dtype(np.float32) if i.type == "tensor(float)" else None
                for i in InferenceSession(args.model).get_inputs()}
    reader = _CalibrationFiles(args.calibration, declared, args.batch) if args.calibration else None
    if args.activations == "static":
        if reader is None:
            raise UsageError("lowbit quantize: static activations need calibration data: --calibration FILE.npy / "
                             "FILE.npz / FOLDER (inputs the model will see), or --activations dynamic")
        if args.smoothquant is not None or args.bias_correction:
            raise UsageError("lowbit quantize: --smoothquant and --bias-correction apply to --activations dynamic")
        report = quantize_static(args.model, args.output, reader, weight_type=args.weights, per_channel=True,
                                 accuracy_target=args.accuracy_target)
    else:
        wanting = [option for option, given in (("--method", args.method != "rtn"),
                                                ("--accuracy-target", args.accuracy_target is not None),
                                                ("--smoothquant", args.smoothquant is not None),
                                                ("--bias-correction", args.bias_correction)) if given]
        if reader is None and wanting:
            raise UsageError(f"lowbit quantize: {wanting[0]} needs --calibration FILE.npy / FILE.npz / FOLDER "
                             f"(inputs the model will see)")
        report = quantize_dynamic(args.model, args.output, weight_type=args.weights, block_size=args.block_size,
                                  method=args.method, calibration_data_reader=reader,
                                  accuracy_target=args.accuracy_target, smoothquant=args.smoothquant,
                                  bias_correction=args.bias_correction)
    print(report)
    return 0


def _dask_client(address: str):
    """A Dask client: of a new local cluster (``local:N``, N one-thread worker processes, loopback only) or of
    the scheduler at ``address``."""
    distributed = require("distributed", "dask", "--dask")
    if address.startswith("local:"):
        workers = address.partition(":")[2]
        if not workers.isdigit() or int(workers) < 1:
            raise UsageError(f"--dask: expected local:N with N >= 1 worker processes, got {address!r}")
        cluster = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=":0")
        return distributed.Client(cluster)
    return distributed.Client(address)


def _run_dask(args: argparse.Namespace) -> int:
    """``run --dask``: the model over a whole .npy (memory-mapped) or .parquet file, chunk by chunk on the
    cluster, with a progress line per finished chunk; the outputs saved to --output."""
    import dask.array as da
    import distributed

    from lowbit.dask import predict

    if not args.input or len(args.input) != 1 or not args.input[0].endswith((".npy", ".parquet")):
        raise UsageError("--dask: give one --input file, .npy (the model's only input) or .parquet (a row per "
                         "sample)")
    if not args.output:
        raise UsageError("--dask: give --output, an .npy (one output) or .npz file for the results")
    rows = args.batch or 256
    path = args.input[0]
    if path.endswith(".npy"):
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        data = da.from_array(data, chunks=(rows, *data.shape[1:]))
    else:
        import dask.dataframe as dd

        data = dd.read_parquet(path)
    with _dask_client(args.dask) as client:
        result = predict(args.model, data, batch_size=rows if path.endswith(".npy") else None,
                         threads_per_worker=args.threads)
        if isinstance(result, dict):
            outputs = result
        else:  # one output: an array, or a DataFrame from parquet
            outputs = {"output": result if isinstance(result, da.Array) else result.to_dask_array(lengths=True)}
        parts = {name: client.compute(list(array.to_delayed().reshape(-1))) for name, array in outputs.items()}
        total = sum(len(p) for p in parts.values())
        for done, _ in enumerate(distributed.as_completed([f for p in parts.values() for f in p]), 1):
            print(f"[{done}/{total}] chunks", file=sys.stderr, end="\r" if sys.stderr.isatty() else "\n")
        arrays = {name: np.concatenate([f.result() for f in p]) for name, p in parts.items()}
    if len(arrays) == 1:
        (value,) = arrays.values()
        np.save(args.output, value)
    else:
        np.savez(args.output, **arrays)
    for name, value in arrays.items():
        print(f"{name}: shape {value.shape}, dtype {value.dtype}, saved to {args.output}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.dask:
        return _run_dask(args)
    if args.model.lower().endswith(".onnx"):
        return _run_onnx(args)
    import lowbit
    from lowbit.runtime.session import Session

    graph = lowbit.load(args.model)
    session = Session(graph, threads=args.threads)
    feeds = _feeds(graph, args.input[-1] if args.input else None, args.batch)
    session.run(feeds)  # prepare and compile
    start = time.perf_counter()
    outputs = session.run(feeds)
    elapsed = time.perf_counter() - start
    for name, value in outputs.items():
        print(f"{name}: shape {value.shape}, dtype {value.dtype}, first values {value.reshape(-1)[:5]}")
        if args.output:
            np.save(args.output, value)
    print(f"ran in {elapsed * 1e3:.2f} ms")
    return 0


def _report(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.io import model_size
    from lowbit.quantization.metrics import sqnr_db
    from lowbit.runtime.session import Session

    graph = lowbit.load(args.model)
    feeds = _feeds(graph, args.input, args.batch)
    session = Session(graph, threads=args.threads)
    print(f"{args.model}: {len(graph.nodes)} nodes, {model_size(graph)} bytes of parameters")
    if args.reference:
        reference = Session(lowbit.load(args.reference), threads=args.threads)
        names = [n for n in graph.outputs]
        ours, theirs = session.run(feeds), reference.run(feeds)
        for name in names:
            print(f"output {name}: SQNR {sqnr_db(theirs[name], ours[name]):.1f} dB against {args.reference}")
    print(session.profile(feeds))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from lowbit import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="CPU features, active kernel level, versions, threads")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(run=_info)
    bench = sub.add_parser("bench", help="each kernel family against NumPy float32, one table; or, given an "
                                         "ONNX model, its latency against ONNX Runtime's")
    bench.add_argument("model", nargs="?", help="an .onnx file to time end to end (default: the kernels)")
    bench.add_argument("--threads", type=int, help="threads (default: all cores; 1 for a model)")
    bench.add_argument("--batch", type=int, default=1, help="batch of the model's example input")
    bench.add_argument("--dim", action="append", help="NAME=SIZE for a symbolic input dimension (repeatable)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    bench.set_defaults(run=_bench)
    inspect = sub.add_parser("inspect", help="an ONNX model's inputs, outputs, ops and the kernel of each node")
    inspect.add_argument("model", help="an .onnx file")
    inspect.add_argument("--batch", type=int, default=1, help="batch to prepare the nodes for")
    inspect.add_argument("--dim", action="append", help="NAME=SIZE for a symbolic input dimension (repeatable)")
    inspect.set_defaults(run=_inspect)
    demo = sub.add_parser("demo", help="train, quantize and run digit classifiers (needs scikit-learn)")
    demo.add_argument("--quick", action="store_true", help="fewer epochs (for a smoke test)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, weights and batch order")
    demo.set_defaults(run=_demo)
    warm = sub.add_parser("warmup", help="compile every kernel ahead into the on-disk cache")
    warm.set_defaults(run=_warmup)
    for name, helptext, handler in (("quantize", "quantize a float .lowbit model", _quantize),
                                    ("run", "run a .lowbit model on an input", _run),
                                    ("report", "per-node profile (and error against a reference model)", _report)):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("model", help="a .lowbit file (lowbit.save)" + (" or an .onnx file" if name == "run" else ""))
        cmd.add_argument("--batch", type=int, default=32 if name == "quantize" else None,
                         help="calibration rows per batch (default 32)" if name == "quantize" else
                         "batch of the random input when no --input is given (default 1)")
        cmd.set_defaults(run=handler)
        if name == "quantize":
            cmd.add_argument("-o", "--output", required=True, help="where to write the quantized model")
            cmd.add_argument("--calibration", metavar="FILE_OR_FOLDER",
                             help="inputs to calibrate on: an .npy (one input), an .npz (arrays by input name), cut "
                                  "into batches of --batch rows, or a folder of such files, one batch each")
            cmd.add_argument("--weights", "--precision", dest="weights", default="int8", choices=tuple(FORMATS),
                             help="weight format (lowbit.quantization.formats; default int8)")
            cmd.add_argument("--activations", default="static", choices=("static", "dynamic"),
                             help="static: calibrated int8 activations (needs --calibration); dynamic: quantized "
                                  "per call (ONNX: per token)")
            cmd.add_argument("--block-size", type=int, default=128, help="ONNX int4: weights per scale along K")
            cmd.add_argument("--method", default="rtn", choices=("rtn", "awq", "gptq"),
                             help="ONNX: how weights are rounded (awq / gptq read --calibration)")
            cmd.add_argument("--accuracy-target", type=float, metavar="MIN_COSINE",
                             help="ONNX: per layer, the cheapest of --weights / 8-bit / float (static: 8-bit / "
                                  "float) keeping the outputs' cosine to the float model's at least this on "
                                  "--calibration")
            cmd.add_argument("--smoothquant", type=float, metavar="ALPHA",
                             help="ONNX, dynamic: SmoothQuant's migration strength in [0, 1] (0.5 is usual)")
            cmd.add_argument("--bias-correction", action="store_true",
                             help="ONNX, dynamic: correct each bias for its rounded weights' mean error")
        else:
            cmd.add_argument("--input", action="append" if name == "run" else "store",
                             help=".npy (single input) or .npz (by name) input (default: random); ONNX: "
                                  "NAME=file.npy, repeatable")
            cmd.add_argument("--threads", type=int, help="threads (default: all cores)")
        if name == "run":
            cmd.add_argument("--output", help="save the (first) output here as .npy (ONNX: all outputs, .npz)")
            cmd.add_argument("--dim", action="append", help="ONNX: NAME=SIZE for a symbolic dimension (repeatable)")
            cmd.add_argument("--dask", metavar="ADDRESS", help="run over the whole --input on a Dask cluster: "
                             "tcp://scheduler:8786, or local:N for N local worker processes (--batch: rows per "
                             "chunk, default 256)")
        if name == "report":
            cmd.add_argument("--reference", help="a float .lowbit model to measure the output error against")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError, OSError, NotImplementedError, ImportError) as error:
        if args.debug:
            raise
        hint = "" if isinstance(error, UsageError) else " (--debug shows where)"
        print(f"lowbit {args.command}: error: {error}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
