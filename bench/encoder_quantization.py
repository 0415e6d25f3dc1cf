"""Quantizing a trained transformer from its ONNX file: lowbit's quantizer against ONNX Runtime's, end to end.

Run from the repository root::

    python -m bench.encoder_quantization [--batches 1 32] [--threads 1 2] [--repeat 7] [--json PATH]

The model is ``lowbit.demo.encoder`` (8x8 digits, rows as tokens: 2 layers, hidden 64, 4 heads, FFN 128), trained
in NumPy once and cached. Each row quantizes that float file one way, then measures on the 360 held-out images:

* ``cos``: the smallest cosine, over the rows of each output (``last_hidden_state`` per token, ``embedding`` and
  ``logits`` per image), to ONNX Runtime's float outputs; ``acc``: test accuracy;
* ``bytes``: the ONNX file's size; ``quantize s``: the quantizer's time (calibration included);
* per thread count and batch size, ``xORT fp32`` = ONNX Runtime's float latency / this row's latency in its own
  runtime (above 1: faster than the float model in ONNX Runtime), interleaved round by round (``bench.timing``).

Rows: ONNX Runtime's ``quantize_dynamic`` (int8 per channel, per-tensor activations) run by ONNX Runtime; lowbit's
``quantize_dynamic`` per token (round to nearest, GPTQ, and SmoothQuant 0.5), NF4 in blocks of 32, and int4 (GPTQ,
blocks of 32) under ``accuracy_target=0.99``, run by lowbit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time

import numpy as np

import kernels
from bench.peers import Contender
from bench.timing import cell, interleave, print_table, run_arguments, save_json


class _Reader:
    def __init__(self, batch: int = 128):
        from lowbit.demo.encoder import digits_tokens, feeds

        self.batches = feeds(digits_tokens("train")[0], batch)

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


def _rows(fp32: str, folder: str) -> dict[str, tuple[str, str, float]]:
    """name -> (runtime, file, seconds the quantizer took)."""
    from onnxruntime import quantization as ort_quantization

    from lowbit.onnx.quantization import quantize_dynamic

    made = {"ORT fp32": ("ORT", fp32, 0.0)}
    jobs = {
        "ORT int8": ("ORT", lambda out: ort_quantization.quantize_dynamic(
            fp32, out, weight_type=ort_quantization.QuantType.QInt8, per_channel=True)),
        "lowbit int8 per token": ("lowbit", lambda out: quantize_dynamic(fp32, out)),
        "lowbit int8 per token, GPTQ": ("lowbit", lambda out: quantize_dynamic(
            fp32, out, method="gptq", calibration_data_reader=_Reader())),
        "lowbit int8 per token, SmoothQuant 0.5": ("lowbit", lambda out: quantize_dynamic(
            fp32, out, smoothquant=0.5, calibration_data_reader=_Reader())),
        "lowbit nf4 g32": ("lowbit", lambda out: quantize_dynamic(fp32, out, weight_type="nf4", block_size=32)),
        "lowbit int4 g32 GPTQ, target 0.99": ("lowbit", lambda out: quantize_dynamic(
            fp32, out, weight_type="int4", block_size=32, method="gptq", calibration_data_reader=_Reader(),
            accuracy_target=0.99)),
    }
    for i, (name, (runtime, job)) in enumerate(jobs.items()):
        out = os.path.join(folder, f"{i}.onnx")
        start = time.perf_counter()
        job(out)
        made[name] = (runtime, out, time.perf_counter() - start)
    return made


def _session(runtime: str, path: str, threads: int):
    if runtime == "ORT":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    import lowbit.onnx

    options = lowbit.onnx.SessionOptions()
    options.intra_op_num_threads = threads
    return lowbit.onnx.InferenceSession(path, options)


def _min_cosines(outputs: list[np.ndarray], reference: list[np.ndarray]) -> list[float]:
    found = []
    for y, r in zip(outputs, reference):
        y, r = y.reshape(-1, y.shape[-1]).astype(np.float64), r.reshape(-1, r.shape[-1]).astype(np.float64)
        found.append(float(((y * r).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(r, axis=1)).min()))
    return found


def _timings(made: dict, x: np.ndarray, batches: list[int], threads: int, repeat: int) -> dict[str, dict]:
    """Per row, ``ms`` and ``xORT fp32`` at each batch size on ``threads`` threads."""
    kernels.set_num_threads(threads)
    sessions = {name: _session(runtime, path, threads) for name, (runtime, path, _) in made.items()}
    found: dict[str, dict] = {name: {} for name in sessions}
    for batch in batches:
        feed = {"pixels": x[:batch]}
        contenders = []
        for name, session in sessions.items():
            session.run(None, feed)  # prepare (and compile) outside the timing
            contenders.append(Contender(name, lambda s=session: s.run(None, feed)[2], contextlib.nullcontext))
        best, _ = interleave(contenders, repeat, threads)
        for name in sessions:
            found[name][f"ms_batch_{batch}"] = 1e3 * best[name]
            found[name][f"x_ort_fp32_batch_{batch}"] = best["ORT fp32"] / best[name]
        print(f"timed batch {batch}, {threads} thread(s)", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.encoder_quantization",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes timed (default 1 32)")
    run_arguments(parser)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    from lowbit.demo.encoder import digits_tokens, encoder_model

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']})")
    fp32 = encoder_model()
    x, labels = digits_tokens("test")
    with tempfile.TemporaryDirectory(prefix="lowbit-encoder-") as folder:
        made = _rows(fp32, folder)
        reference = _session("ORT", fp32, 1).run(None, {"pixels": x})
        results = {}
        for name, (runtime, path, seconds) in made.items():
            outputs = _session(runtime, path, 1).run(None, {"pixels": x})
            results[name] = {"bytes": os.path.getsize(path), "quantize_seconds": seconds,
                             "min_cosine": _min_cosines(outputs, reference),
                             "accuracy": float((outputs[2].argmax(1) == labels).mean()), "threads": {}}
        for threads in args.threads:
            for name, timed in _timings(made, x, args.batches, threads, args.repeat).items():
                results[name]["threads"][threads] = timed
    header = ["quantizer / runtime", "cos hidden", "cos embedding", "cos logits", "acc", "bytes", "quantize s"]
    header += [f"xORT fp32 b{b} t{t}" for t in args.threads for b in args.batches]
    rows = []
    for name, r in results.items():
        rows.append([name, *(cell(c, ".5f") for c in r["min_cosine"]), cell(100 * r["accuracy"], ".1f"),
                     str(r["bytes"]), cell(r["quantize_seconds"], ".2f")]
                    + [cell(r["threads"][t][f"x_ort_fp32_batch_{b}"], ".2f")
                       for t in args.threads for b in args.batches])
    print_table(header, rows)
    print("xORT fp32: ONNX Runtime's float latency over this row's (above 1: faster than ORT fp32)")
    save_json(args.json, {"cpu_info": info, "results": results})


if __name__ == "__main__":
    main()
