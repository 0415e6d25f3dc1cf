"""Compare ``kernels.conv2d_float32_plan`` with ONNX Runtime's float32 Conv, layer by layer, at batch 1 and 32.

Run from the repository root, with OpenBLAS left to choose its own kernels::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.conv_float32 [--json PATH] [--threads 1]
        [--repeat N] [--batches 1 32] [--layers NAME ...]

Contenders, interleaved round by round (each reports its best round, so ratios
compare measurements taken at nearly the same moments):

* ``lowbit``: the plan (prepared once, as an ONNX Runtime session is), NCHW float32,
  output preallocated, no bias or activation (as the peer);
* ``ORT``: ONNX Runtime ``Conv`` in a one-node model, input and output bound once;
* ``sgemm``: only the matrix product a BLAS-based convolution would make, NumPy's
  ``matmul`` of ``W [O', C' KH KW]`` by a prebuilt im2col ``[N, group, C' KH KW, OH OW]``,
  one product per image and group (no im2col, no epilogue: the floor of that approach;
  not for depthwise layers).

GFLOPS count a multiply-add as two, ``2 N O OH OW C' KH KW``; ``time/ORT`` is lowbit's
time over ONNX Runtime's (below 1 is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from dataclasses import asdict

import numpy as np
from threadpoolctl import threadpool_limits

import kernels
from bench.contenders import lowbit_threads
from bench.conv import Layer
from bench.peers import Contender, blas_libraries, onnxruntime_conv_float
from bench.timing import cell, interleave, print_table, save_json


def _layer(name: str, channels: int, size: int, filters: int, kernel: int, **options) -> Layer:
    """A float32 layer of :class:`bench.conv.Layer` (NCHW, padding ``kernel // 2``; batch set per measurement)."""
    return Layer(name, channels, size, filters, kernel, kind="float32", **options)


LAYERS = (
    _layer("3x3 3->16@32", 3, 32, 16, 3),  # a stem
    _layer("3x3 16@32", 16, 32, 16, 3),  # ResNet stages
    _layer("3x3 32@16", 32, 16, 32, 3),
    _layer("3x3 64@8", 64, 8, 64, 3),
    _layer("3x3/2 16->32@32", 16, 32, 32, 3, stride=2),
    _layer("1x1/2 16->32@32", 16, 32, 32, 1, stride=2),  # a projection shortcut
    _layer("1x1 64@8", 64, 8, 64, 1),
    _layer("1x1 16->96@16", 16, 16, 96, 1),  # MobileNetV2 expand / project
    _layer("1x1 96->24@16", 96, 16, 24, 1),
    _layer("1x1 192->64@8", 192, 8, 64, 1),
    _layer("dw3x3 96@16", 96, 16, 96, 3, group=96),
    _layer("dw3x3/2 96@16", 96, 16, 96, 3, stride=2, group=96),
    _layer("dw3x3 144@16", 144, 16, 144, 3, group=144),
    _layer("dw3x3 192@8", 192, 8, 192, 3, group=192),
    _layer("dw3x3/2 192@16", 192, 16, 192, 3, stride=2, group=192),
    _layer("dw3x3 384@6", 384, 6, 384, 3, group=384),  # MobileNetV2 at 96x96: the small planes
    _layer("dw3x3 576@6", 576, 6, 576, 3, group=576),
    _layer("dw3x3/2 576@6", 576, 6, 576, 3, stride=2, group=576),
    _layer("dw3x3 960@3", 960, 3, 960, 3, group=960),
)
NAMES = ("lowbit", "ORT", "sgemm")


def operands(layer: Layer, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [N, C, H, W], w [O, C / group, KH, KW])``, float32."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, layer.channels, layer.size, layer.size), dtype=np.float32),
            rng.standard_normal((layer.filters, layer.channels // layer.group, layer.kernel, layer.kernel),
                                dtype=np.float32))


def _sgemm(layer: Layer, x: np.ndarray, w: np.ndarray, threads: int) -> Contender:
    """NumPy's batched ``matmul`` on a prebuilt im2col: the product alone."""
    n, g, o = x.shape[0], layer.group, layer.filters
    k = w[0].size
    p = layer.out_size**2
    cols = np.random.default_rng(1).standard_normal((n, g, k, p), dtype=np.float32)
    wm = np.ascontiguousarray(w.reshape(g, o // g, k))
    out = np.empty((n, g, o // g, p), np.float32)
    return Contender("sgemm", lambda: np.matmul(wm, cols, out=out),
                     functools.partial(threadpool_limits, limits=threads, user_api="blas"))


def _renamed(contender: Contender | None, name: str) -> Contender | None:
    return contender and dataclasses.replace(contender, name=name)


def contenders(layer: Layer, batch: int, threads: int) -> list[Contender]:
    """Every contender that applies to ``layer`` and is installed."""
    x, w = operands(layer, batch)
    plan = kernels.conv2d_float32_plan(w, x.shape, pads=(layer.pad,) * 4, strides=layer.stride, group=layer.group)
    out = np.empty(plan.out_shape, np.float32)
    found = [Contender("lowbit", lambda: plan(x, out), functools.partial(lowbit_threads, threads)),
             _renamed(onnxruntime_conv_float(x, w, plan.out_shape, layer.onnx_attributes, threads), "ORT")]
    if not layer.group == layer.channels == layer.filters:
        found.append(_sgemm(layer, x, w, threads))
    return [c for c in found if c is not None]


def measure(layer: Layer, batch: int, threads: int, rounds: int) -> dict[str, float]:
    """Interleaved best-of-``rounds`` seconds per contender, after checking lowbit against ONNX Runtime."""
    best, outputs = interleave(contenders(layer, batch, threads), rounds, threads)
    if "ORT" in outputs:
        ours, theirs = outputs["lowbit"], outputs["ORT"]
        if not np.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max()):
            raise RuntimeError(f"{layer.name}: lowbit and ONNX Runtime Conv disagree")
    return best


def rows_of(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        g, s = r["gflops"], r["seconds"]
        ratio = s.get("ORT") and s["lowbit"] / s["ORT"]
        rows.append([r["layer"]["name"], str(r["batch"]), str(r["threads"]),
                     *(cell(g.get(name), ".1f") for name in NAMES), cell(s["lowbit"] * 1e6, ".0f"),
                     cell(s.get("ORT") and s["ORT"] * 1e6, ".0f"), cell(ratio, ".2f")])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.conv_float32", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement (default: 5)")
    parser.add_argument("--layers", nargs="+", default=[layer.name for layer in LAYERS],
                        choices=[layer.name for layer in LAYERS], metavar="NAME", help="layers (default: all)")
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    blas = ", ".join(f"{lib['internal_api']} {lib['version']} ({lib.get('architecture')})" for lib in blas_libraries())
    print(f"cpu: {info['cpu']} ({info['active_level']}), BLAS: {blas}")
    results = []
    for threads in args.threads:
        for batch in args.batches:
            for layer in (layer for layer in LAYERS if layer.name in args.layers):
                seconds = measure(layer, batch, threads, args.repeat)
                results.append({"layer": asdict(layer), "batch": batch, "threads": threads, "seconds": seconds,
                                "gflops": {name: dataclasses.replace(layer, batch=batch).ops / t / 1e9
                                           for name, t in seconds.items()}})
                print(f"measured {layer.name} batch {batch} on {threads} thread(s)", file=sys.stderr)

    print("\nFloat32 convolutions (GFLOPS = 2 N OH OW O C' KH KW / s)")
    print_table(["layer", "N", "thr", *(f"{name} GFLOPS" for name in NAMES), "lowbit us", "ORT us", "time/ORT"],
                rows_of(results))
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
