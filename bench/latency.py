"""Latency: what a call costs beyond its arithmetic, per kernel and per whole model, on one thread.

Run from the repository root::

    python -m bench.latency [--quick] [--models digits resnet_block mobilenet_block encoder] [--batches 1 8 64]

Kernels: each public low-bit kernel at a batch-1 size, called one-shot with a packed weight (the second call on,
as a backend calling the function would) and through its plan where it has one, next to NumPy's float32
``matmul`` of the same size; microseconds per call and the ratios ``one-shot / plan`` and ``plan / matmul``.

Models (``bench.onnx_models``' small ones, the same ONNX files for both runtimes): lowbit's
``InferenceSession`` with its compiled chains (the default) and node by node
(config entry ``session.lowbit.compiled_chains`` = "0"), against ONNX Runtime, one thread, interleaved rounds.
``ORT/lowbit`` above 1: lowbit is faster.

Time to the first result: a new Python process that imports the runtime, opens the digits model's ONNX file and
runs it once, lowbit (its kernel and graph caches warm, as after ``lowbit warmup`` or any earlier run, and Python's
byte code cached, as an install leaves it) against ONNX Runtime; lowbit also on the model saved by ``lowbit.save``,
which needs no ``onnx`` import.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import kernels
from bench.onnx_models import MODELS, model_file
from bench.peers import Contender
from bench.timing import best_call, cell, interleave, print_table, save_json

LATENCY_MODELS = {"digits": ("qop", "qdq"), "resnet_block": ("qdq",), "mobilenet_block": ("qdq",),
                  "encoder": ("fp32", "dynamic")}


# ---- kernels -------------------------------------------------------------------------------------------------------

def _kernel_calls(rng: np.random.Generator) -> list[tuple[str, tuple, object, object | None]]:
    """``(name, (M, N, K) or conv shape, one-shot call, plan call or None)`` for each kernel at batch 1."""
    m, n, k = 1, 64, 64
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w8 = rng.integers(-127, 128, (n, k), dtype=np.int8)
    packed8 = kernels.pack_int8(w8)
    quant = {"a_scale": 0.02, "a_zero_point": 128, "w_scale": 0.01}
    plan8 = kernels.linear_int8_plan(packed8, **quant)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    packed4 = kernels.pack_int4(w, group_size=32)
    packed3 = kernels.pack_ternary(w)
    bits_a, bits_w = kernels.pack_bits(x), kernels.pack_bits(w)
    xc = rng.integers(0, 256, (1, 16, 8, 8), dtype=np.uint8)
    wc = rng.integers(-127, 128, (16, 16, 3, 3), dtype=np.int8)
    packed_conv = kernels.pack_conv_int8(wc)
    qconv = (0.02, 128, packed_conv, 0.01, 0, 0.05, 128)
    conv_plan = kernels.qlinear_conv2d_plan(packed_conv, xc.shape, 0.02, 128, 0.01, 0, 0.05, 128, pads=(1, 1, 1, 1))
    raw_plan = kernels.conv2d_int8_plan(packed_conv, xc.shape, x_zero_point=128, pads=(1, 1, 1, 1))
    xf = rng.standard_normal((1, 32, 8, 8)).astype(np.float32)
    wf = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
    packed_conv4 = kernels.pack_conv_int4(wf, group_size=32)
    xb = kernels.pack_bits(np.ascontiguousarray(xf.transpose(0, 2, 3, 1)), axis=-1)  # NHWC sign bits
    packed_bin = kernels.pack_conv_binary(np.sign(wf) + (wf == 0))
    plan4, plan3 = kernels.gemm_int4_plan(packed4, m), kernels.gemm_ternary_plan(packed3, m)
    plan1 = kernels.gemm_binary_plan(bits_w, k, m)
    calls = [
        ("linear_int8", (m, n, k), lambda: kernels.linear_int8(a, packed8, **quant), lambda: plan8(a)),
        ("gemm_int4", (m, n, k), lambda: kernels.gemm_int4(x, packed4), lambda: plan4(x)),
        ("gemm_ternary", (m, n, k), lambda: kernels.gemm_ternary(x, packed3), lambda: plan3(x)),
        ("gemm_binary", (m, n, k), lambda: kernels.gemm_binary(bits_a, bits_w, k), lambda: plan1(bits_a)),
        ("conv2d_int8", (1, 16, 8, 8), lambda: kernels.conv2d_int8(xc, packed_conv, x_zero_point=128,
                                                                   pads=(1, 1, 1, 1)), lambda: raw_plan(xc)),
        ("qlinear_conv2d", (1, 16, 8, 8), lambda: kernels.qlinear_conv2d(xc, *qconv, pads=(1, 1, 1, 1)),
         lambda: conv_plan(xc)),
        ("conv2d_int4", (1, 32, 8, 8), lambda: kernels.conv2d_int4(xf, packed_conv4, pads=(1, 1, 1, 1)), None),
        ("conv2d_binary", (1, 32, 8, 8), lambda: kernels.conv2d_binary(xb, packed_bin, in_channels=32,
                                                                       pads=(1, 1, 1, 1)), None),
    ]
    return calls


def kernel_rows(calls: int) -> tuple[list[list[str]], list[dict]]:
    rng = np.random.default_rng(0)
    xa, wa = rng.standard_normal((1, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32).T
    matmul = best_call(lambda: np.matmul(xa, wa), calls)
    rows, results = [], []
    for name, shape, one_shot, plan in _kernel_calls(rng):
        one_shot(), plan and plan()  # compile, and fill any cache the first call fills
        t_one = best_call(one_shot, calls)
        t_plan = best_call(plan, calls) if plan else None
        results.append({"kernel": name, "shape": shape, "one_shot_s": t_one, "plan_s": t_plan, "matmul_s": matmul})
        rows.append([name, "x".join(map(str, shape)), cell(1e6 * t_one, ".2f"), cell(t_plan and 1e6 * t_plan, ".2f"),
                     cell(t_plan and t_one / t_plan, ".2f"), cell((t_plan or t_one) / matmul, ".1f")])
    return rows, results


# ---- models --------------------------------------------------------------------------------------------------------

def _ort(path: str, feeds: dict[str, np.ndarray]) -> Contender:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return Contender("ORT", lambda: session.run(None, feeds)[0], contextlib.nullcontext)


def _lowbit(path: str, feeds: dict[str, np.ndarray], compiled: bool) -> Contender:
    import lowbit.onnx

    options = lowbit.onnx.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry(lowbit.onnx.session.COMPILED_CHAINS, "1" if compiled else "0")
    session = lowbit.onnx.InferenceSession(path, options)
    session.run(None, feeds)  # prepare (and compile) outside the timing
    return Contender("lowbit" if compiled else "per node", lambda: session.run(None, feeds)[0],
                     contextlib.nullcontext)


def model_rows(names: list[str], batches: list[int], rounds: int) -> tuple[list[list[str]], list[dict]]:
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-latency-") as folder:
        for name in names:
            model = MODELS[name]
            for fmt in LATENCY_MODELS[name]:
                path = model_file(model, fmt, folder)
                for batch in batches:
                    feeds = model.feeds(batch)
                    best, _ = interleave([_lowbit(path, feeds, True), _lowbit(path, feeds, False),
                                          _ort(path, feeds)], rounds, 1)
                    ours, loop, theirs = best["lowbit"], best["per node"], best["ORT"]
                    results.append({"model": name, "format": fmt, "batch": batch, "seconds": best})
                    rows.append([model.label(batch), fmt, cell(1e3 * ours, ".3f"), cell(1e3 * loop, ".3f"),
                                 cell(1e3 * theirs, ".3f"), cell(theirs / ours, ".2f"), cell(ours / theirs, ".2f")])
                    print(f"measured {model.label(batch)} {fmt}", file=sys.stderr)
    return rows, results


FIRST_RESULT = {  # a fresh process: import the runtime, open the model file (sys.argv[1]), run it once on x
    "lowbit": "import lowbit.onnx as rt\no = rt.SessionOptions(); o.intra_op_num_threads = 1\n"
              "s = rt.InferenceSession(sys.argv[1], o); s.run(None, {s.get_inputs()[0].name: x})\n",
    "lowbit, saved": "import lowbit\ns = lowbit.Session(lowbit.load(sys.argv[1]), threads=1, fallback=False)\n"
                     "s.run({next(iter(s.graph.inputs)): x})\n",
    "ORT": "import onnxruntime as rt\no = rt.SessionOptions(); o.intra_op_num_threads = o.inter_op_num_threads = 1\n"
           "s = rt.InferenceSession(sys.argv[1], o); s.run(None, {s.get_inputs()[0].name: x})\n",
}


def _first_result_seconds(runtime: str, path: str, shape: tuple[int, ...]) -> float:
    """Wall seconds of a new Python process that imports ``runtime``, opens ``path`` and runs it once (the feed
    made inside: NumPy's import is in both)."""
    code = f"import sys\nimport numpy as np\nx = np.zeros({shape}, np.float32)\n{FIRST_RESULT[runtime]}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # byte code cached, as installed
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, path], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def first_result_rows(rounds: int) -> tuple[list[list[str]], list[dict]]:
    """Time to the first result in a new process: lowbit on the ONNX file and on the same model saved by
    ``lowbit.save`` (warm caches: after one such process each), against ORT on the ONNX file."""
    import lowbit
    import lowbit.onnx

    rows, results = [], []
    model = MODELS["digits"]
    shape = (1, model.channels, model.image, model.image)
    with tempfile.TemporaryDirectory(prefix="lowbit-latency-") as folder:
        for fmt in LATENCY_MODELS["digits"]:
            path = model_file(model, fmt, folder)
            saved = f"{path}.lowbit"
            lowbit.save(lowbit.onnx.InferenceSession(path).graph, saved)
            files = {"lowbit": path, "lowbit, saved": saved, "ORT": path}
            for runtime, file in files.items():
                _first_result_seconds(runtime, file, shape)  # fills lowbit's caches
            times = dict.fromkeys(files, math.inf)
            for _ in range(rounds):
                for runtime, file in files.items():
                    times[runtime] = min(times[runtime], _first_result_seconds(runtime, file, shape))
            results.append({"model": "digits", "format": fmt, "seconds": times})
            for runtime in ("lowbit", "lowbit, saved"):
                rows.append([model.label(1), fmt, runtime, cell(times[runtime], ".2f"), cell(times["ORT"], ".2f"),
                             cell(times[runtime] / times["ORT"], ".2f")])
    return rows, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(LATENCY_MODELS), choices=list(LATENCY_MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds per model (default: 7)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per kernel timing (default: 2000)")
    parser.add_argument("--quick", action="store_true", help="batch 1, 3 rounds, 200 calls")
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeat, args.calls = [1], 3, 200
    logging.getLogger().setLevel(logging.ERROR)
    kernels.set_num_threads(1)
    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), one thread")
    krows, kresults = kernel_rows(args.calls)
    print("\nKernels at batch 1 (us per call); one-shot with a packed weight, from the second call on")
    print_table(["kernel", "shape", "one-shot us", "plan us", "one-shot/plan", "vs matmul"], krows)
    mrows, mresults = model_rows(args.models, args.batches, args.repeat)
    print("\nWhole models (ms, best of interleaved rounds); lowbit: compiled chains, per node: node by node")
    print_table(["model", "format", "lowbit ms", "per node ms", "ORT ms", "ORT/lowbit", "lowbit/ORT"], mrows)
    frows, fresults = first_result_rows(args.repeat)
    print("\nA new process: import, open the ONNX file, run once (s, best of rounds; lowbit's caches warm)")
    print_table(["model", "format", "lowbit runs", "lowbit s", "ORT s", "lowbit/ORT"], frows)
    save_json(args.json, {"cpu_info": info, "kernels": kresults, "models": mresults, "first_result": fresults})


if __name__ == "__main__":
    main()
