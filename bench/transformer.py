"""A BERT-style sentence encoder, lowbit against ONNX Runtime, float and quantized, on the same ONNX files.

Run from the repository root::

    python -m bench.transformer [--tokens 1x128 8x128 32x128] [--threads 1 2] [--repeat N] [--json PATH]

The model is ``bench.onnx_models``' ``bert`` (``lowbit.onnx.examples.bert_encoder``: 6 layers, hidden 384, 12
heads, FFN 1536, vocabulary 30522, opset 17, seeded random weights), written once in three files:

* ``fp32``: the float model;
* ``int8``: ONNX Runtime's ``quantize_dynamic`` (int8 weights per channel, uint8 activations quantized per
  tensor at run time); lowbit runs it as written and, a second contender, with each token quantized by its own
  range (config entry ``session.lowbit.dynamic_per_token``);
* ``int4``: every MatMul with a constant weight as ``com.microsoft.MatMulNBits`` (4 bits, blocks of 32 along K,
  round to nearest, symmetric: zero point 8), written here; ``accuracy_level`` 4 (int8 activations).

Each file runs in both runtimes with the same feeds, threads (ORT: ``inter_op_num_threads`` 1) and
``run(None, feeds)``, interleaved round by round (``bench.timing.interleave``). ``ORT/lowbit`` above 1: lowbit
is faster. ``cos``: the smallest cosine, over the tokens, between that run's output and ONNX Runtime's fp32 output.
The per-op profile of lowbit's int8 run at the first size follows the table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile

import numpy as np

import kernels
from bench.onnx_models import MODELS, model_file
from bench.peers import Contender
from bench.timing import cell, interleave, print_table, save_json

BLOCK = 32  # MatMulNBits' block along K
#: contender -> (runtime, file, per-token dynamic quantization)
CONTENDERS = {"lowbit fp32": ("lowbit", "fp32", False), "ORT fp32": ("ORT", "fp32", False),
              "lowbit int8": ("lowbit", "int8", False), "lowbit int8 per token": ("lowbit", "int8", True),
              "ORT int8": ("ORT", "int8", False), "lowbit int4": ("lowbit", "int4", False),
              "ORT int4": ("ORT", "int4", False)}
#: the table's rows: lowbit's contender and ONNX Runtime's on the same file
ROWS = [("lowbit fp32", "ORT fp32"), ("lowbit int8", "ORT int8"), ("lowbit int8 per token", "ORT int8"),
        ("lowbit int4", "ORT int4")]


def _int4_file(fp32: str, path: str) -> str:
    """``fp32``'s MatMuls with constant [K, N] weights as 4-bit MatMulNBits (see the module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(fp32)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or w.ndim != 2 or w.shape[0] % BLOCK:
            nodes.append(node)
            continue
        k, n = w.shape
        blocks = w.T.reshape(n, k // BLOCK, BLOCK)
        scales = np.abs(blocks).max(axis=2) / 7
        scales[scales == 0] = 1
        codes = (np.clip(np.rint(blocks / scales[..., None]), -8, 7) + 8).astype(np.uint8)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two codes a byte, the first in the low nibble
        stem = node.input[1]
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{stem}.q4"),
                                        numpy_helper.from_array(scales.astype(np.float32).reshape(-1),
                                                                f"{stem}.q4_scales")])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{stem}.q4", f"{stem}.q4_scales"],
                                      list(node.output), name=f"{node.name}_q4", domain="com.microsoft", K=k, N=n,
                                      bits=4, block_size=BLOCK, accuracy_level=4))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, path)
    return path


def model_files(folder: str) -> dict[str, str]:
    """The three files of the module docstring, written into ``folder``."""
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = MODELS["bert"]
    fp32 = model_file(model, "fp32", folder)
    prepared, int8 = os.path.join(folder, "bert.pre.onnx"), os.path.join(folder, "bert.int8.onnx")
    if not os.path.exists(prepared):
        quant_pre_process(fp32, prepared, auto_merge=True)
    quantization.quantize_dynamic(prepared, int8, weight_type=quantization.QuantType.QInt8, per_channel=True)
    return {"fp32": fp32, "int8": int8, "int4": _int4_file(fp32, os.path.join(folder, "bert.int4.onnx"))}


def _session(runtime: str, path: str, threads: int, per_token: bool = False):
    if runtime == "ORT":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only: the optimizer's notes on removed initializers are noise
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    import lowbit.onnx

    options = lowbit.onnx.SessionOptions()
    options.intra_op_num_threads = threads
    if per_token:
        options.add_session_config_entry(lowbit.onnx.session.DYNAMIC_PER_TOKEN, "1")
    return lowbit.onnx.InferenceSession(path, options)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def profile_rows(path: str, feeds: dict[str, np.ndarray], threads: int) -> list[list[str]]:
    """lowbit's per-op time on ``path`` (summed over the nodes of each op and note), largest first."""
    profile = _session("lowbit", path, threads).profile(feeds, repeat=3)
    total, count = collections.Counter(), collections.Counter()
    for row in profile.rows:
        key = (row.op, row.note.split(";")[0])
        total[key] += row.ms
        count[key] += 1
    whole = sum(total.values())
    return [[op, note, str(count[op, note]), cell(ms, ".2f"), cell(100 * ms / whole, ".1f")]
            for (op, note), ms in total.most_common(12)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transformer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", default=["1x128", "8x128"], help="batch x sequence (default: 1x128 "
                        "8x128; the issue's third size is 32x128)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']})")
    rows, results = [], []
    model = MODELS["bert"]
    with tempfile.TemporaryDirectory(prefix="lowbit-transformer-") as folder:
        files = model_files(folder)
        first = None
        for tokens in args.tokens:
            batch, seq = (int(v) for v in tokens.split("x"))
            feeds = dataclasses.replace(model, seq=seq).feeds(batch)
            first = first or feeds
            for threads in args.threads:
                kernels.set_num_threads(threads)
                contenders = []
                for name, (runtime, fmt, per_token) in CONTENDERS.items():
                    session = _session(runtime, files[fmt], threads, per_token)
                    session.run(None, feeds)  # prepare (and compile) outside the timing
                    contenders.append(Contender(name, lambda s=session: s.run(None, feeds)[0],
                                                contextlib.nullcontext))
                best, outputs = interleave(contenders, args.repeat, threads)
                cosines = {name: _min_cosine(y, outputs["ORT fp32"]) for name, y in outputs.items()}
                results.append({"tokens": tokens, "threads": threads, "seconds": best, "min_cosine": cosines})
                for ours, theirs in ROWS:
                    rows.append([tokens, str(threads), ours.removeprefix("lowbit "), cell(1e3 * best[ours], ".1f"),
                                 cell(1e3 * best[theirs], ".1f"), cell(best[theirs] / best[ours], ".2f"),
                                 cell(cosines[ours], ".4f"), cell(cosines[theirs], ".4f")])
                print(f"measured {tokens}, {threads} thread(s)", file=sys.stderr)
        print_table(["tokens", "threads", "lowbit", "lowbit ms", "ORT ms", "ORT/lowbit", "lowbit cos", "ORT cos"],
                    rows)
        kernels.set_num_threads(args.threads[0])
        print(f"\nlowbit int8 per op, {args.tokens[0]} tokens, {args.threads[0]} thread(s)")
        print_table(["op", "note", "nodes", "ms", "%"], profile_rows(files["int8"], first, args.threads[0]))
    save_json(args.json, {"cpu_info": info, "results": results})


if __name__ == "__main__":
    main()
