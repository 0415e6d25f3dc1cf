"""Fused multi-head attention (``kernels.attention``) against ONNX Runtime and NumPy, float32.

Run from the repository root::

    python -m bench.attention [--shapes 1x128x12x32 8x128x12x32 1x512x12x64] [--threads 1 2] [--repeat N] [--json PATH]

A shape is ``BxSxHxD``: batch, sequence (queries and keys), heads, head size; q, k, v are ``[B, S, H D]`` as the
projections of a transformer write them, with an additive mask ``[B, 1, 1, S]`` hiding a quarter of the keys.
Contenders, interleaved round by round (each reports its best round):

* ``lowbit``: ``kernels.attention`` into a preallocated output;
* ``ORT graph``: the attention block as torch.onnx writes it (Reshape and Transpose per input, MatMul, Div, Add,
  Softmax, MatMul, Transpose, Reshape), run by ONNX Runtime with its graph optimizations on: what a user's exported
  model gets;
* ``ORT MHA``: ONNX Runtime's fused ``com.microsoft.MultiHeadAttention`` on the same q, k, v (its attention bias must
  have a row per query, so it gets the mask broadcast to ``[B, 1, S, S]``);
* ``numpy``: the same block in NumPy float32 (BLAS for the two products, threads set with threadpoolctl).

``xPEER`` is the peer's time over lowbit's (above 1: lowbit is faster); ``GFLOPS`` counts lowbit's
``2 B H S^2 (D + D)`` multiply-adds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import sys

import numpy as np
from threadpoolctl import threadpool_limits

import kernels
from bench.contenders import lowbit_threads
from bench.peers import IR_VERSION, Contender
from bench.timing import cell, interleave, print_table, run_arguments, save_json, sizes

NAMES = ("lowbit", "ORT graph", "ORT MHA", "numpy")


def operands(b: int, s: int, h: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal((b, s, h * d), np.float32) for n in ("q", "k", "v")}
    feeds["mask"] = np.where(rng.random((b, 1, 1, s)) < 0.25, -10000.0, 0.0).astype(np.float32)
    feeds["mask"][..., 0] = 0.0
    return feeds


def _lowbit(feeds: dict, h: int, threads: int) -> Contender:
    q, k, v, mask = (feeds[n] for n in ("q", "k", "v", "mask"))
    plan = kernels.attention_plan(q.shape, k.shape, v.shape, heads=h, mask_shape=mask.shape)
    out = np.empty(plan.out_shape, np.float32)
    return Contender("lowbit", functools.partial(plan, q, k, v, mask, out), functools.partial(lowbit_threads, threads))


def _numpy(feeds: dict, h: int, threads: int) -> Contender:
    q, k, v, mask = (feeds[n] for n in ("q", "k", "v", "mask"))
    b, s, width = q.shape
    d = width // h
    scale = np.float32(1 / np.sqrt(d))

    def call() -> np.ndarray:
        scores = q.reshape(b, s, h, d).transpose(0, 2, 1, 3) @ k.reshape(b, s, h, d).transpose(0, 2, 3, 1)
        scores *= scale
        scores += mask
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return np.ascontiguousarray((scores @ v.reshape(b, s, h, d).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3))

    return Contender("numpy", lambda: call().reshape(b, s, width),
                     functools.partial(threadpool_limits, limits=threads, user_api="blas"))


def _ort(name: str, model, feeds: dict, threads: int) -> Contender:
    """``model`` in ONNX Runtime on ``threads`` threads, inputs and output bound once."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for x in session.get_inputs():
        binding.bind_cpu_input(x.name, feeds[x.name])
    out = np.empty(feeds["q"].shape, np.float32)
    binding.bind_output("y", "cpu", 0, out.dtype, out.shape, out.ctypes.data)

    def call() -> np.ndarray:
        session.run_with_iobinding(binding)
        return out

    return Contender(name, call, contextlib.nullcontext)


def _models(b: int, s: int, h: int, d: int) -> tuple:
    """The attention block as torch.onnx writes it, and the one MultiHeadAttention node."""
    from onnx import TensorProto, helper, numpy_helper

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    tensor = functools.partial(helper.make_tensor_value_info, elem_type=TensorProto.FLOAT, shape=None)
    nodes = [helper.make_node("Reshape", [x, "heads"], [f"{x}4"]) for x in ("q", "k", "v")]
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qh", "kt"], ["qk"]), helper.make_node("Div", ["qk", "root"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["c"]),
              helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merged"], ["y"])]
    initializers = [ints("heads", [b, s, h, d]), ints("merged", [b, s, h * d]),
                    numpy_helper.from_array(np.array(np.sqrt(d), np.float32), "root")]
    block = helper.make_graph(nodes, "attention", [tensor(name=n) for n in ("q", "k", "v", "mask")],
                              [tensor(name="y")], initializer=initializers)
    mha = helper.make_graph([helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["y"],
                                              domain="com.microsoft", num_heads=h)],
                            "mha", [tensor(name=n) for n in ("q", "k", "v", "bias")], [tensor(name="y")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    models = [helper.make_model(g, opset_imports=opsets) for g in (block, mha)]
    for m in models:
        m.ir_version = IR_VERSION
    return tuple(models)


def measure(shape: tuple[int, int, int, int], threads: int, rounds: int) -> tuple[dict[str, float], float]:
    """Best seconds per contender, and the largest difference of any peer's output from lowbit's."""
    b, s, h, d = shape
    feeds = operands(*shape)
    contenders = [_lowbit(feeds, h, threads), _numpy(feeds, h, threads)]
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
        block, mha = _models(*shape)
        biased = dict(feeds, bias=np.ascontiguousarray(np.broadcast_to(feeds["mask"], (b, 1, s, s))))
        contenders += [_ort("ORT graph", block, feeds, threads), _ort("ORT MHA", mha, biased, threads)]
    best, outputs = interleave(contenders, rounds, threads)
    differences = [float(np.abs(y - outputs["lowbit"]).max()) for y in outputs.values()]
    if max(differences) > 1e-4:
        raise RuntimeError(f"{shape}: lowbit's attention differs from a peer's by {max(differences)}")
    return best, max(differences)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=sizes("BxSxHxD"), nargs="+", default=[(1, 128, 12, 32), (8, 128, 12, 32),
                                                                     (1, 512, 12, 64)], metavar="BxSxHxD")
    run_arguments(parser)
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']})")
    results, rows = [], []
    for threads in args.threads:
        for shape in args.shapes:
            seconds, difference = measure(shape, threads, args.repeat)
            b, s, h, d = shape
            ms = {n: t * 1e3 for n, t in seconds.items()}
            flops = 2 * b * h * s * s * 2 * d
            rows.append(["x".join(map(str, shape)), str(threads), *(cell(ms.get(n), ".3f") for n in NAMES),
                         cell(flops / seconds["lowbit"] / 1e9, ".1f"),
                         *(cell(ms.get(n) and ms[n] / ms["lowbit"], ".2f") for n in NAMES[1:]), f"{difference:.1e}"])
            results.append({"shape": shape, "threads": threads, "seconds": seconds, "max_difference": difference})
            print(f"measured {rows[-1][0]} on {threads} thread(s)", file=sys.stderr)
    print("\nFused attention, float32 (ms; xPEER = the peer's time / lowbit's)")
    print_table(["BxSxHxD", "thr", *(f"{n} ms" for n in NAMES), "GFLOPS",
                 *(f"x{n}" for n in NAMES[1:]), "max |diff|"], rows)
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
