"""Compare lowbit's quantized elementwise kernels with ONNX Runtime's com.microsoft ops and NumPy float32.

Run from the repository root::

    python -m bench.elementwise [--json PATH] [--threads 1] [--repeat N] [--cases NAME ...]

Every case works on uint8 NCHW activations of batch 32 x 64 x 32 x 32 (2 M elements), as between the
convolutions of a quantized CNN. Contenders, interleaved round by round (each reports its best round,
so ratios compare measurements taken at nearly the same moments):

* ``lowbit``: ``kernels.qlinear_add`` / ``qlinear_mul`` / ``qlinear_lookup`` into a preallocated output;
* ``ORT``: a one-node ONNX Runtime model of com.microsoft QLinearAdd / QLinearMul / QLinearSigmoid
  (the second operand an initializer), input and output bound once;
* ``numpy``: the float formula in NumPy float32 (dequantize, op, quantize) into preallocated buffers;
* ``copy``: ``numpy.copyto`` of as many bytes as the op moves (read plus written): the copy bandwidth
  the op is measured against (``% copy`` = copy time / op time).

lowbit's codes are checked against ORT's: at most 1 apart, and the count of differing codes is printed
(0 expected for add and mul on x86, whose float32 formula lowbit reproduces).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import sys
from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.contenders import lowbit_threads
from bench.peers import Contender, _bound_session, _conv_model
from bench.timing import cell, interleave, print_table, save_json

SHAPE = (32, 64, 32, 32)
# (a_scale, a_zero_point, b_scale, b_zero_point, c_scale, c_zero_point); the lookup reads only a's and c's
SCALES = {"add": (0.02, 120, 0.03, 130, 0.05, 128), "mul": (0.02, 120, 0.03, 130, 0.01, 128),
          "sigmoid": (0.05, 128, None, None, 1 / 256, 0)}
NAMES = ("lowbit", "ORT", "numpy", "copy")


@dataclass(frozen=True)
class Case:
    """One op on ``a`` of :data:`SHAPE` and ``b`` of ``b_shape`` (None: a one-input lookup)."""

    name: str
    op: str  # "add", "mul" or "sigmoid"
    b_shape: tuple[int, ...] | None = SHAPE

    @property
    def elements(self) -> int:
        return int(np.prod(SHAPE))

    @property
    def bytes_moved(self) -> int:
        """Bytes read and written: ``a``, ``b`` and the output, one byte per code."""
        return 2 * self.elements + (int(np.prod(self.b_shape)) if self.b_shape is not None else 0)


CASES = (
    Case("add", "add"),
    Case("add per channel", "add", (64, 1, 1)),
    Case("add scalar", "add", (1,)),
    Case("mul", "mul"),
    Case("mul SE [N,C,1,1]", "mul", (32, 64, 1, 1)),
    Case("sigmoid", "sigmoid", None),
)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def operands(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    return a, (rng.integers(0, 256, case.b_shape, dtype=np.uint8) if case.b_shape is not None else None)


def _lowbit(case: Case, a: np.ndarray, b: np.ndarray | None, threads: int) -> Contender:
    sa, za, sb, zb, sc, zc = SCALES[case.op]
    out = np.empty(SHAPE, np.uint8)
    if case.op == "sigmoid":
        table = kernels.lookup_table(_sigmoid, sa, za, sc, zc, np.uint8, np.uint8)  # built once, as a session would
        call = functools.partial(kernels.qlinear_lookup, a, table, out=out)
    else:
        kernel = kernels.qlinear_add if case.op == "add" else kernels.qlinear_mul
        call = functools.partial(kernel, a, sa, za, b, sb, zb, sc, zc, out=out)
    return Contender("lowbit", call, functools.partial(lowbit_threads, threads))


def _numpy(case: Case, a: np.ndarray, b: np.ndarray | None) -> Contender:
    """Dequantize to float32, compute, quantize (half to even, saturated): NumPy's one-thread loops."""
    sa, za, sb, zb, sc, zc = (np.float32(v) if v is not None else None for v in SCALES[case.op])
    real, out = np.empty(SHAPE, np.float32), np.empty(SHAPE, np.uint8)
    other = np.empty(b.shape, np.float32) if b is not None else None

    def call() -> np.ndarray:
        np.multiply(np.subtract(a, za, out=real), sa, out=real)
        if case.op == "sigmoid":
            np.reciprocal(np.add(np.exp(np.negative(real, out=real), out=real), 1, out=real), out=real)
        else:
            np.multiply(np.subtract(b, zb, out=other), sb, out=other)
            (np.add if case.op == "add" else np.multiply)(real, other, out=real)
        np.clip(np.add(np.rint(np.divide(real, sc, out=real), out=real), zc, out=real), 0, 255, out=real)
        np.copyto(out, real, casting="unsafe")
        return out

    return Contender("numpy", call, contextlib.nullcontext)


def _onnxruntime(case: Case, a: np.ndarray, b: np.ndarray | None, threads: int) -> Contender | None:
    """The com.microsoft op on ``a`` bound as input ``X`` (``b`` an initializer). None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnx import TensorProto, numpy_helper

    sa, za, sb, zb, sc, zc = SCALES[case.op]
    values = {"as": np.float32(sa), "az": np.uint8(za), "cs": np.float32(sc), "cz": np.uint8(zc)}
    names = ["as", "az", "cs", "cz"]
    if b is not None:
        values.update(B=b, bs=np.float32(sb), bz=np.uint8(zb))
        names[2:2] = ["B", "bs", "bz"]
    op = {"add": "QLinearAdd", "mul": "QLinearMul", "sigmoid": "QLinearSigmoid"}[case.op]
    model = _conv_model(["X", *names], [numpy_helper.from_array(np.asarray(values[n]), n) for n in names], a,
                        TensorProto.UINT8, op=op, domain="com.microsoft")
    return Contender("ORT", _bound_session(model, threads, "X", a, np.empty(SHAPE, np.uint8)), contextlib.nullcontext)


def _copy(case: Case) -> Contender:
    """A copy moving the op's bytes: half of them read, half written."""
    src = np.ones(case.bytes_moved // 2, np.uint8)
    dst = np.empty_like(src)

    def call() -> np.ndarray:
        np.copyto(dst, src)
        return dst

    return Contender("copy", call, contextlib.nullcontext)


def measure(case: Case, threads: int, rounds: int) -> tuple[dict[str, float], int | None]:
    """Interleaved best-of-``rounds`` seconds per contender, and how many of lowbit's codes differ from ORT's."""
    a, b = operands(case)
    peers = [_onnxruntime(case, a, b, threads), _numpy(case, a, b), _copy(case)]
    best, outputs = interleave([_lowbit(case, a, b, threads), *(p for p in peers if p is not None)], rounds, threads)
    if "ORT" not in outputs:
        return best, None
    difference = np.abs(outputs["lowbit"].astype(np.int32) - outputs["ORT"])
    if difference.max() > 1:
        raise RuntimeError(f"{case.name}: lowbit and ONNX Runtime differ by {difference.max()} codes")
    return best, int(np.count_nonzero(difference))


def rows_of(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        s = {name: seconds * 1e3 for name, seconds in r["seconds"].items()}
        ours = s["lowbit"]
        rows.append([r["case"]["name"], str(r["threads"]), *(cell(s.get(n), ".3f") for n in NAMES),
                     cell(r["bytes_moved"] / ours / 1e6, ".1f"), cell(s["copy"] / ours * 100, ".0f"),
                     cell(s.get("ORT") and s["ORT"] / ours, ".2f"), cell(s["numpy"] / ours, ".1f"),
                     cell(r["codes_differing_from_ort"], "d")])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.elementwise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds per measurement (default: 7)")
    parser.add_argument("--cases", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES],
                        metavar="NAME", help="cases (default: all)")
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), features: {', '.join(info['features'])}")
    results = []
    for threads in args.threads:
        for case in (c for c in CASES if c.name in args.cases):
            seconds, differing = measure(case, threads, args.repeat)
            results.append({"case": asdict(case), "threads": threads, "bytes_moved": case.bytes_moved,
                            "seconds": seconds, "codes_differing_from_ort": differing})
            print(f"measured {case.name} on {threads} thread(s)", file=sys.stderr)

    print(f"\nQuantized elementwise ops on uint8 {'x'.join(map(str, SHAPE))} (ms; GB/s = bytes read and written "
          f"/ lowbit's time; % copy = copy time / lowbit's; xORT, xnumpy = their time / lowbit's)")
    print_table(["case", "thr", *(f"{n} ms" for n in NAMES), "GB/s", "% copy", "xORT", "xnumpy", "codes != ORT"],
                rows_of(results))
    save_json(args.json, {"cpu_info": info, "shape": SHAPE, "scales": SCALES, "repeat": args.repeat,
                       "results": results})


if __name__ == "__main__":
    main()
