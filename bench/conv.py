"""Compare lowbit's quantized convolutions with ONNX Runtime's QLinearConv and float Conv, layer by layer.

Run from the repository root::

    python -m bench.conv [--json PATH] [--threads 1] [--repeat N] [--layers NAME ...]

Contenders, interleaved round by round (each reports its best round, so ratios
compare measurements taken at nearly the same moments):

* ``lowbit``: ``kernels.qlinear_conv2d_plan`` on NCHW uint8 (prepared once, as an
  ONNX Runtime session is; output preallocated), ``kernels.conv2d_binary`` on packed bits, or ``kernels.conv2d_int4``
  on float32, by the layer's kind;
* ``lowbit NHWC``: the int8 convolution on NHWC arrays, without the layout copies;
* ``ORT int8``: ONNX Runtime ``QLinearConv`` (u8 x s8, NCHW), the same scales;
* ``ORT NHWC``: the same in NHWC (ORT's ``com.microsoft`` QLinearConv, ``channels_last``),
  to compare with ``lowbit NHWC``;
* ``ORT float``: ONNX Runtime float32 ``Conv`` at the same shape.

GOPS count a multiply-add as two operations (binary: an xor and a popcount per
bit), ``2 * N * OH * OW * O * KH * KW * C / group``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.contenders import lowbit_threads
from bench.peers import Contender, onnxruntime_conv_float, onnxruntime_qlinear_conv
from bench.timing import cell, interleave, print_table, save_json
from kernels.reference.conv import conv2d_ref
from kernels.reference.int8 import finish_ref

SCALES = (0.02, 128, 0.01, 8.0, 128)  # x_scale, x_zero_point, w_scale, y_scale, y_zero_point


@dataclass(frozen=True)
class Layer:
    """One convolution layer: NCHW input ``[batch, channels, size, size]``, 'same' padding."""

    name: str
    channels: int
    size: int
    filters: int
    kernel: int
    stride: int = 1
    group: int = 1
    kind: str = "int8"  # "int8", "binary" or "int4" (bench.conv), "float32" (bench.conv_float32)
    batch: int = 1

    @property
    def pad(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.pad - self.kernel) // self.stride + 1

    @property
    def ops(self) -> int:
        return 2 * self.batch * self.out_size**2 * self.filters * self.channels // self.group * self.kernel**2

    @property
    def onnx_attributes(self) -> dict:
        return {"pads": [self.pad] * 4, "strides": [self.stride] * 2, "group": self.group}


LAYERS = (
    Layer("3x3 64@56", 64, 56, 64, 3),
    Layer("3x3 256@14", 256, 14, 256, 3),
    Layer("1x1 128@28", 128, 28, 128, 1),
    Layer("3x3/2 128@28", 128, 28, 128, 3, stride=2),
    Layer("dw3x3 256@28", 256, 28, 256, 3, group=256),
    # 32 channels or fewer per group run kernels.dispatch's narrow (12 x 32) VNNI tiles
    Layer("3x3 32@64 b32", 32, 64, 32, 3, batch=32),
    Layer("stem 3x3/2 3->32@224 b8", 3, 224, 32, 3, stride=2, batch=8),
    # MobileNetV2's expand and project layers (96x96 input): 1x1 NHWC convolutions of few input channels run
    # as one GEMM over every image's pixels, where the requantizing epilogue costs as much as the products
    Layer("1x1 24->144@24 b32", 24, 24, 144, 1, batch=32),
    Layer("1x1 144->24@24 b32", 144, 24, 24, 1, batch=32),
    Layer("binary 3x3 256@14", 256, 14, 256, 3, kind="binary"),
    Layer("int4 3x3 256@14", 256, 14, 256, 3, kind="int4"),
)
NAMES = ("lowbit", "lowbit NHWC", "ORT int8", "ORT NHWC", "ORT float")


def _int8(layer: Layer, x: np.ndarray, w: np.ndarray, pinned) -> list[Contender]:
    """Plans prepared once (as an ONNX Runtime session is), called on preallocated outputs."""
    xs, xz, ws, ys, yz = SCALES
    packed = kernels.pack_conv_int8(w, group=layer.group)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    attrs = dict(pads=(layer.pad,) * 4, strides=(layer.stride,) * 2, group=layer.group)
    nchw = kernels.qlinear_conv2d_plan(packed, x.shape, xs, xz, ws, 0, ys, yz, **attrs)
    nhwc = kernels.qlinear_conv2d_plan(packed, x_nhwc.shape, xs, xz, ws, 0, ys, yz, layout="NHWC", **attrs)
    out, out_nhwc = np.empty(nchw.out_shape, np.uint8), np.empty(nhwc.out_shape, np.uint8)
    return [Contender("lowbit", lambda: nchw(x, out), pinned),
            Contender("lowbit NHWC", lambda: nhwc(x_nhwc, out_nhwc), pinned)]


def _binary(layer: Layer, x: np.ndarray, w: np.ndarray, pinned) -> list[Contender]:
    x_bits = kernels.pack_bits(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), axis=-1)
    packed = kernels.pack_conv_binary(w)
    out = np.empty((layer.batch, layer.out_size, layer.out_size, layer.filters), np.int32)
    # zero padding, as the float convolution it is compared with (pad_value=1 is cheaper still)
    return [Contender("lowbit", lambda: kernels.conv2d_binary(x_bits, packed, in_channels=layer.channels,
                                                              pads=(layer.pad,) * 4, pad_value=0, out=out), pinned)]


def _int4(layer: Layer, x: np.ndarray, w: np.ndarray, pinned) -> list[Contender]:
    packed = kernels.pack_conv_int4(w, group=layer.group, group_size=128)
    out = np.empty((layer.batch, layer.filters, layer.out_size, layer.out_size), np.float32)
    return [Contender("lowbit", lambda: kernels.conv2d_int4(x, packed, pads=(layer.pad,) * 4, out=out), pinned)]


def operands(layer: Layer, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x NCHW, w OIHW)``: uint8 / int8 for int8 layers, ±1 int8 for binary ones, float32 for int4 ones."""
    rng = np.random.default_rng(seed)
    x_shape = (layer.batch, layer.channels, layer.size, layer.size)
    w_shape = (layer.filters, layer.channels // layer.group, layer.kernel, layer.kernel)
    if layer.kind == "binary":
        signs = np.array([-1, 1], np.int8)
        return rng.choice(signs, size=x_shape), rng.choice(signs, size=w_shape)
    if layer.kind == "int4":
        return rng.standard_normal(x_shape, dtype=np.float32), rng.standard_normal(w_shape, dtype=np.float32)
    return (rng.integers(0, 256, size=x_shape, dtype=np.uint8), rng.integers(-128, 128, size=w_shape, dtype=np.int8))


def contenders(layer: Layer, threads: int) -> list[Contender]:
    """Every contender that applies to ``layer`` and is installed."""
    x, w = operands(layer)
    pinned = functools.partial(lowbit_threads, threads)
    ours = {"int8": _int8, "binary": _binary, "int4": _int4}[layer.kind](layer, x, w, pinned)
    out_shape = (layer.batch, layer.filters, layer.out_size, layer.out_size)
    peers = [onnxruntime_conv_float(x, w, out_shape, layer.onnx_attributes, threads)]
    if layer.kind == "int8":
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        nhwc_shape = (out_shape[0], *out_shape[2:], out_shape[1])
        peers[:0] = [onnxruntime_qlinear_conv(x, w, out_shape, layer.onnx_attributes, threads, SCALES),
                     onnxruntime_qlinear_conv(x_nhwc, w, nhwc_shape, layer.onnx_attributes, threads, SCALES, nhwc=True)]
    return ours + [p for p in peers if p is not None]


def requantized_reference(layer: Layer) -> np.ndarray:
    """An int8 layer's uint8 outputs (NCHW) by ``kernels.reference``: exact sums, then the kernels' requantization."""
    xs, xz, ws, ys, yz = SCALES
    x, w = operands(layer)
    sums = conv2d_ref(x, w, x_zero_point=xz, strides=(layer.stride,) * 2, pads=(layer.pad,) * 4, group=layer.group)
    rows = sums.transpose(0, 2, 3, 1).reshape(-1, layer.filters)  # output channels last, as finish_ref's N
    codes = finish_ref(rows, a_scale=xs, w_scale=ws, out_dtype=np.uint8, out_scale=ys, out_zero_point=yz)
    return codes.reshape(sums.shape[0], *sums.shape[2:], layer.filters).transpose(0, 3, 1, 2).astype(np.int32)


def measure(layer: Layer, threads: int, rounds: int) -> dict[str, float]:
    """Interleaved best-of-``rounds`` seconds per contender, after checking lowbit against the reference (and
    noting where ONNX Runtime is not exact: without VNNI its uint8 x int8 products saturate int16 pairs)."""
    best, outputs = interleave(contenders(layer, threads), rounds, threads)
    if layer.kind == "int8":
        expected = requantized_reference(layer)
        # ORT requantizes in float32, the reference in float64: a rounding tie may land one step apart
        for name in ("lowbit", "lowbit NHWC", "ORT int8", "ORT NHWC"):
            if name in outputs:
                nchw = outputs[name] if "NHWC" not in name else outputs[name].transpose(0, 3, 1, 2)
                if np.abs(nchw.astype(np.int32) - expected).max() <= 1:
                    continue
                if name.startswith("lowbit"):
                    raise RuntimeError(f"{layer.name}: {name} differs from kernels.reference")
                print(f"note: {layer.name}: {name} (ONNX Runtime QLinearConv) is not exact on this CPU; timed all "
                      "the same", file=sys.stderr)
    if layer.kind == "binary" and "ORT float" in outputs:
        if not np.array_equal(outputs["lowbit"].transpose(0, 3, 1, 2), outputs["ORT float"]):
            raise RuntimeError(f"{layer.name}: conv2d_binary and ONNX Runtime Conv disagree")
    return best


def rows_of(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        g = r["gops"]
        ours = g.get("lowbit")
        rows.append([r["layer"]["name"], str(r["threads"]), *(cell(g.get(n), ".0f") for n in NAMES),
                     cell(ours and g.get("ORT int8") and ours / g["ORT int8"], ".2f"),
                     cell(g.get("lowbit NHWC") and g.get("ORT int8") and g["lowbit NHWC"] / g["ORT int8"], ".2f"),
                     cell(g.get("lowbit NHWC") and g.get("ORT NHWC") and g["lowbit NHWC"] / g["ORT NHWC"], ".2f"),
                     cell(ours and g.get("ORT float") and ours / g["ORT float"], ".1f")])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.conv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement (default: 5)")
    parser.add_argument("--layers", nargs="+", default=[layer.name for layer in LAYERS],
                        choices=[layer.name for layer in LAYERS], metavar="NAME", help="layers (default: all)")
    args = parser.parse_args(argv)

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), features: {', '.join(info['features'])}")
    results = []
    for threads in args.threads:
        for layer in (layer for layer in LAYERS if layer.name in args.layers):
            seconds = measure(layer, threads, args.repeat)
            results.append({"layer": asdict(layer), "threads": threads, "seconds": seconds,
                            "gops": {name: layer.ops / s / 1e9 for name, s in seconds.items()}})
            print(f"measured {layer.name} on {threads} thread(s)", file=sys.stderr)

    print("\nConvolutions (GOPS = 2 * N * OH * OW * O * KH * KW * C / group / s; ORT float in GFLOP/s)")
    print_table(["layer", "thr", *NAMES, "lowbit/ORT int8", "NHWC/ORT int8", "NHWC/ORT NHWC", "lowbit/ORT float"],
                rows_of(results))
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
