"""Compare lowbit's int4 and ternary products with ONNX Runtime MatMulNBits, NumPy and int8.

Run from the repository root, leaving OpenBLAS free to choose its best kernel::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.lowbit_gemm [--threads 1]
        [--shapes 1,11008,4096 ...] [--repeat N] [--dram-matrices 4] [--json PATH]

Per shape every contender runs interleaved in one loop (as ``bench.gemm``): each
round times each contender once (best of several calls) and each reports its best
round. Contenders: ``kernels.gemm_int4`` with groups of 32 and 128, ORT
MatMulNBits (4 bits, block_size 32 and 128, accuracy_level 4, same codes and
scales), NumPy float32 on the dequantized weights, ``kernels.gemm_ternary``
(per-channel scales), ``kernels.gemm_codebook`` (NF4 table, groups of 128) and
``kernels.gemm_int8`` (uint8 activations already quantized). The DRAM case cycles
several weight matrices, well beyond the L3, and reports effective GB/s (packed
weight bytes per call / time) next to NumPy's copy bandwidth (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

import numpy as np

import kernels
from bench.contenders import lowbit_threads
from bench.peers import Contender, numpy_float32, ort_matmul_nbits
from bench.timing import OPENBLAS_VARS, best_call, cell, interleave, parse_shape, print_table
from kernels.gemm.codebook import gemm_codebook
from kernels.gemm.int4 import gemm_int4
from kernels.gemm.ternary import gemm_ternary
from kernels.pack.codebook import pack_codebook_weights
from kernels.pack.int4 import pack_int4
from kernels.pack.ternary import pack_ternary
from lowbit.quantization.scheme import NF4

SHAPES = ((1, 4096, 4096), (1, 11008, 4096), (256, 4096, 4096))
BLOCKS = (32, 128)
DRAM_SHAPE = (1, 11008, 4096)
COPY_BYTES = 512 * 2**20


def _lowbit(name: str, fn: Callable, x: np.ndarray, packed, n: int, threads: int) -> Contender:
    out = np.empty((x.shape[0], n), np.float32)
    return Contender(name, lambda: fn(x, packed, out=out), lambda: lowbit_threads(threads))


def _int8(x: np.ndarray, w: np.ndarray, threads: int) -> Contender:
    """``gemm_int8`` on uint8 activations and int8 weights of the same shape (int32 out)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=x.shape, dtype=np.uint8)
    packed = kernels.pack_int8(rng.integers(-128, 128, size=w.shape, dtype=np.int8))
    out = np.empty((x.shape[0], w.shape[0]), np.int32)
    return Contender("int8", lambda: kernels.gemm_int8(a, packed, out=out), lambda: lowbit_threads(threads))


def measure_shape(shape, threads: int, rounds: int) -> dict:
    m, n, k = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    contenders, packs = [], {}
    for g in BLOCKS:
        packs[g] = pack_int4(w, g)
        contenders.append(_lowbit(f"int4-g{g}", gemm_int4, x, packs[g], n, threads))
        if (ort := ort_matmul_nbits(x, packs[g], threads)) is not None:
            contenders.append(ort)
    contenders.append(numpy_float32(x, packs[BLOCKS[-1]].dequantize(), threads))
    contenders.append(_lowbit("ternary", gemm_ternary, x, pack_ternary(w), n, threads))
    contenders.append(_lowbit("nf4-g128", gemm_codebook, x, pack_codebook_weights(w, NF4, 128), n, threads))
    contenders.append(_int8(x, w, threads))
    seconds, outputs = interleave(contenders, rounds, threads)
    errors = {}
    for g in BLOCKS:
        if f"ORT-g{g}" in outputs:
            ref = outputs[f"ORT-g{g}"]
            errors[f"g{g}"] = float(np.abs(outputs[f"int4-g{g}"] - ref).max() / np.abs(ref).max())
    return {"shape": list(shape), "threads": threads, "seconds": seconds, "rel_diff_vs_ort": errors}


def copy_bandwidth() -> float:
    """NumPy copy of ``COPY_BYTES`` (beyond any cache): (read + written bytes) / best time."""
    src = np.ones(COPY_BYTES // 8)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_call(lambda: np.copyto(dst, src), 5) / 1e9


def measure_dram(count: int, threads: int, rounds: int) -> dict:
    """GEMV cycling ``count`` weight matrices per format; effective GB/s of the packed bytes."""
    m, n, k = DRAM_SHAPE
    rng = np.random.default_rng(2)
    x = rng.standard_normal((m, k), dtype=np.float32)
    int4, ternary = [], []
    for i in range(2 * count):  # ternary has half the bytes: twice the matrices
        w = rng.standard_normal((n, k), dtype=np.float32)
        ternary.append(pack_ternary(w))
        if i < count:
            int4.append(pack_int4(w, 128))
    out = np.empty((m, n), np.float32)

    def cycling(name, items, call_one):
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % len(items)
            return call_one(items[state["i"]])
        return Contender(name, call, lambda: lowbit_threads(threads))

    contenders = [cycling("int4-g128", int4, lambda p: gemm_int4(x, p, out=out)),
                  cycling("ternary", ternary, lambda p: gemm_ternary(x, p, out=out))]
    sessions = [ort_matmul_nbits(x, p, threads) for p in int4]
    if sessions[0] is not None:
        contenders.append(cycling("ORT-g128", sessions, lambda s: s.call()))
    seconds, _ = interleave(contenders, rounds)
    nbytes = {"int4-g128": int4[0].data.nbytes, "ORT-g128": int4[0].data.nbytes, "ternary": ternary[0].data.nbytes}
    return {"matrices": count, "threads": threads, "seconds": seconds,
            "gb_per_s": {name: nbytes[name] / s / 1e9 for name, s in seconds.items()},
            "working_set_mb": {"int4": count * int4[0].data.nbytes / 2**20,
                               "ternary": len(ternary) * ternary[0].data.nbytes / 2**20},
            "copy_gb_per_s": copy_bandwidth()}


def report(results: list[dict], dram: list[dict]) -> None:
    names = list(results[0]["seconds"])
    print("\nTime per call (ms), best interleaved round; numpy is float32 on the dequantized weights")
    rows = [[label(r["shape"]), str(r["threads"]), *(cell(r["seconds"].get(c, math.nan) * 1e3, ".3f") for c in names)]
            for r in results]
    print_table(["shape", "thr", *names], rows)

    print("\nRatios (time ratios below 1: lowbit faster; GOPS ratio above 1: lowbit faster)")
    rows = []
    for r in results:
        s = r["seconds"]
        gops = {c: 2 * math.prod(r["shape"]) / t / 1e9 for c, t in s.items()}
        rows.append([label(r["shape"]), str(r["threads"]),
                     *(cell(s[f"int4-g{g}"] / s[f"ORT-g{g}"] if f"ORT-g{g}" in s else None, ".2f") for g in BLOCKS),
                     *(cell(gops[f"int4-g{g}"], ".0f") for g in BLOCKS),
                     *(cell(gops.get(f"ORT-g{g}"), ".0f") for g in BLOCKS),
                     cell(s["ternary"] / s["int8"], ".2f"), cell(s["int4-g128"] / s["numpy"], ".2f"),
                     " ".join(f"{key}:{v:.1e}" for key, v in r["rel_diff_vs_ort"].items())])
    print_table(["shape", "thr", "t int4/ORT g32", "t int4/ORT g128", "GOPS int4-g32", "GOPS int4-g128",
                  "GOPS ORT-g32", "GOPS ORT-g128", "t ternary/int8", "t int4-g128/numpy", "max|d|/max|ORT|"], rows)

    for d in dram:
        print(f"\nDRAM-bound GEMV {label(DRAM_SHAPE)}, {d['threads']} thread(s), cycling {d['matrices']} int4 "
              f"({d['working_set_mb']['int4']:.0f} MB) / {2 * d['matrices']} ternary matrices "
              f"({d['working_set_mb']['ternary']:.0f} MB); NumPy copy {d['copy_gb_per_s']:.1f} GB/s (read + write)")
        rows = [[name, cell(d["seconds"][name] * 1e3, ".3f"), cell(d["gb_per_s"][name], ".1f")]
                for name in d["seconds"]]
        print_table(["contender", "ms", "GB/s"], rows)


def label(shape) -> str:
    return "x".join(map(str, shape))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lowbit_gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), metavar="M,N,K")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--dram-matrices", type=int, default=4, help="int4 matrices cycled in the DRAM case (0: skip)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), numpy {info['numpy']}, numba {info['numba']}")
    for var in OPENBLAS_VARS:
        if var in os.environ:
            print(f"WARNING: {var} is set; rerun with env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE")
    results, dram = [], []
    for threads in args.threads:
        for shape in args.shapes:
            results.append(measure_shape(shape, threads, args.repeat))
            print(f"measured {label(shape)} on {threads} thread(s)", file=sys.stderr)
        if args.dram_matrices:
            dram.append(measure_dram(args.dram_matrices, threads, args.repeat))
    report(results, dram)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_info": info, "results": results, "dram": dram}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
