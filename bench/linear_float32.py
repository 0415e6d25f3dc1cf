"""Float32 linear layers (``kernels.linear_float32_plan``) against NumPy float32 and ONNX Runtime's MatMul.

Run from the repository root (OpenBLAS's variables unset, as for every NumPy float32 baseline)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.linear_float32 [--threads 1 2] [--repeat N]

Shapes ``MxKxN`` are a MiniLM-sized encoder's (hidden 384, FFN 1536) at 128 and 1024 tokens: ``x [M, K] @ W [K, N]``,
W constant. Contenders, interleaved round by round (each reports its best round):

* ``lowbit``: the plan (W packed once) into a preallocated output;
* ``numpy``: ``numpy.matmul`` into a preallocated output (OpenBLAS, threads set with threadpoolctl);
* ``ORT``: a one-node ONNX Runtime MatMul with W an initializer (MLAS), input and output bound once.

``xPEER`` is the peer's time over lowbit's (above 1: lowbit is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import sys

import numpy as np

import kernels
from bench.contenders import lowbit_threads
from bench.peers import Contender, _bound_session, _conv_model, numpy_float32
from bench.timing import cell, interleave, print_table, run_arguments, save_json, sizes

SHAPES = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384), (1024, 384, 1536), (1024, 1536, 384)]
NAMES = ("lowbit", "numpy", "ORT")


def _contenders(x: np.ndarray, w: np.ndarray, threads: int) -> list[Contender]:
    plan, out = kernels.linear_float32_plan(w), np.empty((x.shape[0], w.shape[1]), np.float32)
    contenders = [Contender("lowbit", functools.partial(plan, x, out), functools.partial(lowbit_threads, threads)),
                  numpy_float32(x, np.ascontiguousarray(w.T), threads)]
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
        from onnx import TensorProto, numpy_helper

        model = _conv_model(["X", "w"], [numpy_helper.from_array(w, "w")], x, TensorProto.FLOAT, op="MatMul")
        contenders.append(Contender("ORT", _bound_session(model, threads, "X", x, np.empty_like(out)),
                                    contextlib.nullcontext))
    return contenders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_float32", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=sizes("MxKxN"), nargs="+", default=SHAPES, metavar="MxKxN")
    run_arguments(parser)
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']})")
    rng = np.random.default_rng(0)
    results, rows = [], []
    for threads in args.threads:
        for m, k, n in args.shapes:
            x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
            seconds, outputs = interleave(_contenders(x, w, threads), args.repeat, threads)
            difference = max(float(np.abs(y - outputs["lowbit"]).max()) for y in outputs.values())
            if difference > 1e-3 * np.sqrt(k):
                raise RuntimeError(f"{m}x{k}x{n}: lowbit differs from a peer by {difference}")
            gflops = 2 * m * k * n / seconds["lowbit"] / 1e9
            ms = [cell(seconds.get(c) and seconds[c] * 1e3, ".3f") for c in NAMES]
            ratios = [cell(seconds.get(c) and seconds[c] / seconds["lowbit"], ".2f") for c in NAMES[1:]]
            rows.append([f"{m}x{k}x{n}", str(threads), *ms, cell(gflops, ".0f"), *ratios])
            results.append({"shape": (m, k, n), "threads": threads, "seconds": seconds})
            print(f"measured {rows[-1][0]} on {threads} thread(s)", file=sys.stderr)
    print("\nFloat32 linear layers, x [M, K] @ W [K, N] (ms; xPEER = the peer's time / lowbit's)")
    print_table(["MxKxN", "thr", *(f"{c} ms" for c in NAMES), "GFLOPS", *(f"x{c}" for c in NAMES[1:])], rows)
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
