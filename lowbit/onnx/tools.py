"""What the command line does with an ONNX file: example inputs, an inspection report, an end-to-end timing.

``lowbit run MODEL.onnx``, ``lowbit inspect MODEL.onnx`` and ``lowbit bench MODEL.onnx`` call these.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable

import numpy as np

from lowbit.onnx.importer import UnsupportedModelError, read_model
from lowbit.onnx.session import InferenceSession, NodeArg, SessionOptions
from lowbit.onnx.types import ELEM_TYPES

_NUMPY = {name: np.dtype(held) for name, held in ELEM_TYPES.values()}  # ONNX type name -> NumPy dtype


def example_feeds(inputs: list[NodeArg], batch: int = 1, dims: dict[str, int] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the declared shapes: symbols from ``dims`` (any other symbol or unknown dimension: ``batch``
    for the first axis, else 1); floats standard normal, integers and bools all ones (valid token ids and
    attention masks alike)."""
    rng, dims = np.random.default_rng(seed), dict(dims or {})
    feeds = {}
    for arg in inputs:
        shape = [d if isinstance(d, int) else dims.get(d, batch if axis == 0 else 1)
                 for axis, d in enumerate(arg.shape)]
        dtype = np.dtype(_NUMPY[arg.type[len("tensor("):-1]])
        feeds[arg.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                           else np.ones(shape, dtype))
    return feeds


def inspect(model, batch: int = 1, dims: dict[str, int] | None = None) -> tuple[str, bool]:
    """A report on an ONNX model: inputs and outputs, op counts, what lowbit runs each node as (prepared for
    ``batch`` and ``dims``) or, for a model lowbit cannot run, every unsupported op; and whether it runs."""
    proto, _ = read_model(model)
    counts = Counter((n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                     for n in proto.graph.node)
    opset = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    lines = [f"opsets: {opset}; {len(proto.graph.node)} nodes, {len(proto.graph.initializer)} initializers",
             "ops: " + ", ".join(f"{op} x{n}" for op, n in counts.most_common())]
    try:
        session = InferenceSession(proto)
    except UnsupportedModelError as error:
        return "\n".join(lines + [str(error)]), False
    for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        lines += [f"{kind} {a.name}: {a.type} {a.shape}" for a in args]
    feeds = example_feeds(session.get_inputs(), batch, dims)
    profile = session.profile(feeds, repeat=1)
    precision = Counter(row.precision for row in profile.rows)
    lines.append(f"after import (Q/DQ fused, constants folded, batch norms folded): {len(profile.rows)} nodes, "
                 + ", ".join(f"{n} {p}" for p, n in precision.most_common()))
    width = max([len(r.name) for r in profile.rows] + [4])
    ops = max([len(r.op) for r in profile.rows] + [2])
    lines.append(f"{'node':<{width}}  {'op':<{ops}}  {'precision':<9}  kernel")
    lines += [f"{r.name:<{width}}  {r.op:<{ops}}  {r.precision:<9}  {r.note}".rstrip() for r in profile.rows]
    return "\n".join(lines), True


def _best(run: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Best time of ``run`` over about ``seconds`` of calls (at least 3), and the number of calls."""
    best, calls, start = math.inf, 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return best, calls


def bench(path: str, batch: int = 1, dims: dict[str, int] | None = None, threads: int = 1, rounds: int = 5,
          seconds: float = 0.2, progress: Callable[[str], None] = print) -> dict[str, float]:
    """End-to-end latency of ``path`` in lowbit and, when it is installed, in ONNX Runtime on the same file
    and inputs: best seconds per call over ``rounds`` interleaved rounds of about ``seconds`` each."""
    options = SessionOptions()
    options.intra_op_num_threads = threads
    ours = InferenceSession(path, options)
    feeds = example_feeds(ours.get_inputs(), batch, dims)
    contenders = {"lowbit": lambda: ours.run(None, feeds)}
    try:
        import onnxruntime
    except ImportError:
        progress("onnxruntime is not installed: timing lowbit alone")
    else:
        ort_options = onnxruntime.SessionOptions()
        ort_options.intra_op_num_threads = threads
        theirs = onnxruntime.InferenceSession(path, ort_options, providers=["CPUExecutionProvider"])
        contenders["onnxruntime"] = lambda: theirs.run(None, feeds)
    for name, run in contenders.items():
        progress(f"warming up {name} ...")
        run()
    best = dict.fromkeys(contenders, math.inf)
    for r in range(rounds):
        for name, run in contenders.items():
            best[name] = min(best[name], _best(run, seconds)[0])
        progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in best.items()))
    return best
