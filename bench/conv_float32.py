"""Compare ``kernels.conv2d_float32_plan`` (NCHW and NHWC) with ONNX Runtime's float32 Conv, layer by layer.

Run from the repository root, with OpenBLAS left to choose its own kernels::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m bench.conv_float32 [--json PATH] [--threads 1]
        [--repeat N] [--batches 32] [--layers NAME ...]

Layers: those of ResNet-18 at 224x224 and of MobileNetV2 at 96x96 (``lowbit.onnx.examples``,
``MOBILENET_V2_STAGES``), 'same' padding. Contenders, interleaved round by round (each
reports its best round, so ratios compare measurements taken at nearly the same moments):

* ``NCHW``, ``NHWC``: the plan in that layout (prepared once, as an ONNX Runtime session is),
  output preallocated, no bias or activation (as the peer);
* ``ORT``: ONNX Runtime ``Conv`` in a one-node model, input and output bound once. ORT
  runs it blocked by 16 channels (NCHWc), between a reorder of ``X`` and one of ``Y``,
  which a whole NCHWc network pays only at its ends. ``ORT core`` estimates the time
  without them: the one-node time minus half of each of two reorder round trips
  (``ReorderInput`` then ``ReorderOutput``, of ``X``'s shape, unless ``C`` is not a multiple
  of 4, a stem, which ORT reads in NCHW, and of ``Y``'s), timed in the same rounds;
* ``sgemm``: only the matrix product a BLAS-based convolution would make, NumPy's
  ``matmul`` of ``W [O', C' KH KW]`` by a prebuilt im2col ``[N, group, C' KH KW, OH OW]``
  (no im2col, no epilogue: the floor of that approach; not for depthwise layers nor
  for an im2col of more than 64 MB).

GFLOPS count a multiply-add as two, ``2 N O OH OW C' KH KW``; ``x/ORT`` is a time over
ONNX Runtime's (below 1 is faster), ``/core`` over ``ORT core``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import sys
from dataclasses import asdict

import numpy as np
from threadpoolctl import threadpool_limits

import kernels
from bench.contenders import lowbit_threads
from bench.conv import Layer
from bench.peers import (
    IR_VERSION,
    OPSET,
    Contender,
    _bound_session,
    blas_libraries,
    onnxruntime_conv_float,
)
from bench.timing import cell, interleave, print_table, save_json

SGEMM_MAX_BYTES = 64 << 20


def _layer(name: str, channels: int, size: int, filters: int, kernel: int, **options) -> Layer:
    """A float32 layer of :class:`bench.conv.Layer` (NCHW, padding ``kernel // 2``; batch set per measurement)."""
    return Layer(name, channels, size, filters, kernel, kind="float32", **options)


def _depthwise(channels: int, size: int, stride: int = 1) -> Layer:
    return _layer(f"dw3x3{'/2' if stride == 2 else ''} {channels}@{size}", channels, size, channels, 3, stride=stride,
                  group=channels)


LAYERS = (
    # ResNet-18 at 224x224
    _layer("r18 7x7/2 3->64@224", 3, 224, 64, 7, stride=2),
    _layer("r18 3x3 64@56", 64, 56, 64, 3),
    _layer("r18 3x3/2 64->128@56", 64, 56, 128, 3, stride=2),
    _layer("r18 1x1/2 64->128@56", 64, 56, 128, 1, stride=2),
    _layer("r18 3x3 128@28", 128, 28, 128, 3),
    _layer("r18 3x3/2 128->256@28", 128, 28, 256, 3, stride=2),
    _layer("r18 1x1/2 128->256@28", 128, 28, 256, 1, stride=2),
    _layer("r18 3x3 256@14", 256, 14, 256, 3),
    _layer("r18 3x3/2 256->512@14", 256, 14, 512, 3, stride=2),
    _layer("r18 1x1/2 256->512@14", 256, 14, 512, 1, stride=2),
    _layer("r18 3x3 512@7", 512, 7, 512, 3),
    # MobileNetV2 at 96x96: stem, then per stage the expand (1x1), depthwise (3x3) and project (1x1) shapes
    _layer("mv2 3x3/2 3->32@96", 3, 96, 32, 3, stride=2),
    _depthwise(32, 48),
    _layer("mv2 1x1 32->16@48", 32, 48, 16, 1),
    _layer("mv2 1x1 16->96@48", 16, 48, 96, 1),
    _depthwise(96, 48, 2),
    _layer("mv2 1x1 96->24@24", 96, 24, 24, 1),
    _layer("mv2 1x1 24->144@24", 24, 24, 144, 1),
    _depthwise(144, 24),
    _layer("mv2 1x1 144->24@24", 144, 24, 24, 1),
    _depthwise(144, 24, 2),
    _layer("mv2 1x1 144->32@12", 144, 12, 32, 1),
    _layer("mv2 1x1 32->192@12", 32, 12, 192, 1),
    _depthwise(192, 12),
    _layer("mv2 1x1 192->32@12", 192, 12, 32, 1),
    _depthwise(192, 12, 2),
    _layer("mv2 1x1 192->64@6", 192, 6, 64, 1),
    _layer("mv2 1x1 64->384@6", 64, 6, 384, 1),
    _depthwise(384, 6),
    _layer("mv2 1x1 384->64@6", 384, 6, 64, 1),
    _layer("mv2 1x1 384->96@6", 384, 6, 96, 1),
    _layer("mv2 1x1 96->576@6", 96, 6, 576, 1),
    _depthwise(576, 6),
    _layer("mv2 1x1 576->96@6", 576, 6, 96, 1),
    _depthwise(576, 6, 2),
    _layer("mv2 1x1 576->160@3", 576, 3, 160, 1),
    _layer("mv2 1x1 160->960@3", 160, 3, 960, 1),
    _depthwise(960, 3),
    _layer("mv2 1x1 960->160@3", 960, 3, 160, 1),
    _layer("mv2 1x1 960->320@3", 960, 3, 320, 1),
)
NAMES = ("NCHW", "NHWC", "ORT", "sgemm")


def operands(layer: Layer, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [N, C, H, W], w [O, C / group, KH, KW])``, float32."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, layer.channels, layer.size, layer.size), dtype=np.float32),
            rng.standard_normal((layer.filters, layer.channels // layer.group, layer.kernel, layer.kernel),
                                dtype=np.float32))


def _sgemm(layer: Layer, x: np.ndarray, w: np.ndarray, threads: int) -> Contender | None:
    """NumPy's batched ``matmul`` on a prebuilt im2col: the product alone."""
    n, g, o = x.shape[0], layer.group, layer.filters
    k = w[0].size
    p = layer.out_size**2
    if n * g * k * p * 4 > SGEMM_MAX_BYTES or layer.group == layer.channels == layer.filters:
        return None
    cols = np.random.default_rng(1).standard_normal((n, g, k, p), dtype=np.float32)
    wm = np.ascontiguousarray(w.reshape(g, o // g, k))
    out = np.empty((n, g, o // g, p), np.float32)
    return Contender("sgemm", lambda: np.matmul(wm, cols, out=out),
                     functools.partial(threadpool_limits, limits=threads, user_api="blas"))


def _ort_reorders(name: str, shape: tuple[int, ...], threads: int) -> Contender | None:
    """ONNX Runtime's NCHW -> NCHWc -> NCHW round trip of a ``shape`` tensor (``com.microsoft.nchwc`` ops)."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnx import TensorProto, helper

    domain = "com.microsoft.nchwc"
    nodes = [helper.make_node("ReorderInput", ["X"], ["T"], domain=domain),
             helper.make_node("ReorderOutput", ["T"], ["Y"], domain=domain, channels=shape[1])]
    graph = helper.make_graph(nodes, "reorders", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(domain, 1)])
    model.ir_version = IR_VERSION
    x = np.zeros(shape, np.float32)
    return Contender(name, _bound_session(model, threads, "X", x, np.empty(shape, np.float32)),
                     contextlib.nullcontext)


def _renamed(contender: Contender | None, name: str) -> Contender | None:
    return contender and dataclasses.replace(contender, name=name)


def contenders(layer: Layer, batch: int, threads: int) -> list[Contender]:
    """Every contender that applies to ``layer`` and is installed."""
    x, w = operands(layer, batch)
    attrs = {"pads": (layer.pad,) * 4, "strides": layer.stride, "group": layer.group}
    plan = kernels.conv2d_float32_plan(w, x.shape, **attrs)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    plan_nhwc = kernels.conv2d_float32_plan(w, x_nhwc.shape, layout="NHWC", **attrs)
    out, out_nhwc = np.empty(plan.out_shape, np.float32), np.empty(plan_nhwc.out_shape, np.float32)
    pinned = functools.partial(lowbit_threads, threads)
    found = [Contender("NCHW", lambda: plan(x, out), pinned),
             Contender("NHWC", lambda: plan_nhwc(x_nhwc, out_nhwc).transpose(0, 3, 1, 2), pinned),
             _renamed(onnxruntime_conv_float(x, w, plan.out_shape, layer.onnx_attributes, threads), "ORT"),
             # ORT reads a stem's few channels in NCHW, with no reorder (ReorderInput takes multiples of 4)
             _ort_reorders("ORT reorders X", x.shape, threads) if layer.channels % 4 == 0 else None,
             _ort_reorders("ORT reorders Y", plan.out_shape, threads),
             _sgemm(layer, x, w, threads)]
    return [c for c in found if c is not None]


def measure(layer: Layer, batch: int, threads: int, rounds: int) -> dict[str, float]:
    """Interleaved best-of-``rounds`` seconds per contender (and ``ORT core``), after checking both layouts
    against ONNX Runtime."""
    best, outputs = interleave(contenders(layer, batch, threads), rounds, threads)
    if "ORT" in outputs:
        theirs = outputs["ORT"]
        for name in ("NCHW", "NHWC"):
            if not np.allclose(outputs[name], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max()):
                raise RuntimeError(f"{layer.name}: lowbit {name} and ONNX Runtime Conv disagree")
        if "ORT reorders Y" in best:
            best["ORT core"] = best["ORT"] - (best.pop("ORT reorders X", 0.0) + best.pop("ORT reorders Y")) / 2
    return best


def rows_of(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        g, s = r["gflops"], r["seconds"]
        ort, core = s.get("ORT"), s.get("ORT core")
        rows.append([r["layer"]["name"], str(r["batch"]), str(r["threads"]),
                     *(cell(g.get(name), ".1f") for name in NAMES),
                     *(cell(s.get(name) and s[name] * 1e6, ".0f") for name in ("NCHW", "NHWC", "ORT", "ORT core")),
                     cell(ort and s["NCHW"] / ort, ".2f"), cell(ort and s["NHWC"] / ort, ".2f"),
                     cell(core and s["NHWC"] / core, ".2f")])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.conv_float32", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32], help="batch sizes (default: 32)")
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
    print_table(["layer", "N", "thr", *(f"{name} GFLOPS" for name in NAMES), "NCHW us", "NHWC us", "ORT us",
                 "ORT core us", "NCHW/ORT", "NHWC/ORT", "NHWC/core"], rows_of(results))
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
