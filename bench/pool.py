"""Compare the pooling kernels of ``kernels.conv.pool`` with ONNX Runtime, one node at a time.

Run from the repository root::

    python -m bench.pool [--json PATH] [--threads 1] [--repeat N] [--cases NAME ...]

Each case is one pool of a real model at batch 32. Contenders, interleaved round by
round (each reports its best round, so ratios compare measurements taken at nearly
the same moments):

* ``lowbit``: the kernel, output preallocated (``out=``);
* ``ORT``: ONNX Runtime running the same pool as a one-node model (input and output
  bound once): ``MaxPool`` / ``AveragePool`` on float32 or int8 NCHW, and
  ``com.microsoft.QLinearGlobalAveragePool`` (``channels_last``) for the quantized
  global pools. Float NHWC pools have no ORT counterpart (ORT's NHWC pools take
  8-bit codes only); they are timed alone.

``time/ORT`` is lowbit's time over ONNX Runtime's (below 1 is faster). Before timing,
the two outputs are compared (equal, or within one code for the requantizing pools).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

import kernels
from bench.contenders import lowbit_threads
from bench.peers import Contender, _bound_session, _conv_model
from bench.timing import cell, interleave, print_table, save_json
from kernels.conv.pool import avg_pool2d_float32

QUANT = (0.05, 128, 0.04, 120)  # x_scale, x_zero_point, y_scale, y_zero_point of the quantized pools


@dataclass(frozen=True)
class Case:
    """One pool: ``op`` ("max", "avg" or "global_avg"), input shape in ``layout``, dtype and attributes."""

    name: str
    op: str
    shape: tuple[int, int, int, int]
    dtype: str
    layout: str = "NCHW"
    attributes: dict = field(default_factory=dict)  # kernel_shape, strides, pads (ONNX order), count_include_pad


STEM = dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
CASES = (
    Case("resnet18 stem max f32", "max", (32, 64, 112, 112), "float32", attributes=STEM),
    Case("resnet18 stem max f32 NHWC", "max", (32, 112, 112, 64), "float32", "NHWC", STEM),
    Case("resnet18 stem max u8", "max", (32, 64, 112, 112), "uint8", attributes=STEM),
    Case("max 2x2/2 f32 @28", "max", (32, 128, 28, 28), "float32",
         attributes=dict(kernel_shape=(2, 2), strides=(2, 2))),
    Case("max 3x3/1 f32 @14", "max", (32, 256, 14, 14), "float32",
         attributes=dict(kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1))),
    Case("avg 3x3/1 f32 @28 incl", "avg", (32, 192, 28, 28), "float32",
         attributes=dict(kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), count_include_pad=1)),
    Case("avg 2x2/2 f32 @56", "avg", (32, 64, 56, 56), "float32", attributes=dict(kernel_shape=(2, 2), strides=(2, 2))),
    Case("avg 3x3/2 f32 NHWC", "avg", (32, 56, 56, 64), "float32", "NHWC", STEM),
    Case("mobilenet_v2 qgap", "global_avg", (32, 3, 3, 1280), "uint8", "NHWC"),
    Case("resnet18 qgap", "global_avg", (32, 7, 7, 512), "uint8", "NHWC"),
)


def operand(case: Case, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if case.dtype == "float32":
        return rng.standard_normal(case.shape, dtype=np.float32)
    return rng.integers(0, 256, case.shape, dtype=np.uint8)


def _pool_options(case: Case) -> dict:
    a = case.attributes
    options = dict(strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)), layout=case.layout)
    if case.op == "avg":
        options["count_include_pad"] = bool(a.get("count_include_pad", 0))
    return options


def lowbit(case: Case, x: np.ndarray, threads: int) -> Contender:
    """The kernel of ``case`` writing into a preallocated output."""
    if case.op == "global_avg":
        fn = functools.partial(kernels.global_avg_pool2d, x, *QUANT, layout=case.layout)
    elif case.op == "max":
        fn = functools.partial(kernels.max_pool2d, x, case.attributes["kernel_shape"], **_pool_options(case))
    else:
        fn = functools.partial(avg_pool2d_float32, x, case.attributes["kernel_shape"], **_pool_options(case))
    out = fn()
    return Contender("lowbit", lambda: fn(out=out), functools.partial(lowbit_threads, threads))


def onnxruntime(case: Case, x: np.ndarray, out_shape: tuple, threads: int) -> Contender | None:
    """The same pool in ONNX Runtime, or None when it has no such node (or is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None or (case.dtype == "float32" and case.layout == "NHWC"):
        return None
    from onnx import TensorProto, numpy_helper

    elem = TensorProto.FLOAT if case.dtype == "float32" else TensorProto.UINT8
    if case.op == "global_avg":
        scales = [numpy_helper.from_array(np.asarray(v, dtype), name) for v, dtype, name in
                  zip(QUANT, (np.float32, np.uint8, np.float32, np.uint8), ("xs", "xz", "ys", "yz"))]
        model = _conv_model(["X", "xs", "xz", "ys", "yz"], scales, x, elem, op="QLinearGlobalAveragePool",
                            domain="com.microsoft", channels_last=int(case.layout == "NHWC"))
    else:
        model = _conv_model(["X"], [], x, elem, op="MaxPool" if case.op == "max" else "AveragePool",
                            **case.attributes)
    return Contender("ORT", _bound_session(model, threads, "X", x, np.empty(out_shape, x.dtype)),
                     contextlib.nullcontext)


def _check(case: Case, ours: np.ndarray, theirs: np.ndarray) -> None:
    if case.dtype == "float32":
        ok = np.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    else:
        ok = np.abs(ours.astype(np.int64) - theirs).max() <= (0 if case.op == "max" else 1)
    if not ok:
        raise RuntimeError(f"{case.name}: lowbit and ONNX Runtime disagree")


def measure(case: Case, threads: int, rounds: int) -> dict[str, float]:
    """Interleaved best-of-``rounds`` seconds per contender, after checking lowbit against ONNX Runtime."""
    x = operand(case)
    ours = lowbit(case, x, threads)
    theirs = onnxruntime(case, x, ours.call().shape, threads)
    best, outputs = interleave([c for c in (ours, theirs) if c is not None], rounds, threads)
    if "ORT" in outputs:
        _check(case, outputs["lowbit"], outputs["ORT"])
    return best


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds per measurement (default: 7)")
    parser.add_argument("--cases", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES],
                        metavar="NAME", help="cases (default: all)")
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']})")
    results, rows = [], []
    for threads in args.threads:
        for case in (c for c in CASES if c.name in args.cases):
            seconds = measure(case, threads, args.repeat)
            results.append({"case": asdict(case), "threads": threads, "seconds": seconds})
            ratio = seconds.get("ORT") and seconds["lowbit"] / seconds["ORT"]
            rows.append([case.name, case.layout, str(threads), cell(seconds["lowbit"] * 1e3, ".3f"),
                         cell(seconds.get("ORT") and seconds["ORT"] * 1e3, ".3f"), cell(ratio, ".2f")])
            print(f"measured {case.name} on {threads} thread(s)", file=sys.stderr)
    print("\nPools at batch 32")
    print_table(["case", "layout", "thr", "lowbit ms", "ORT ms", "time/ORT"], rows)
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
