"""Whole ONNX models: ``lowbit.onnx.InferenceSession`` against ``onnxruntime.InferenceSession`` on the same file.

Run from the repository root::

    python -m bench.onnx_models [--quick] [--models NAME ...] [--formats fp32 qdq qop dynamic]
                                [--batches 1 32] [--threads 1 2] [--repeat N] [--json PATH]

Models (``lowbit.onnx.examples``, seeded random weights, float32; sized so that a batch-32 run takes well under a
second on one core of this 2-core machine):

* ``resnet``: basic-block ResNet at 64x64, 3x3 stem, width 32, 3 stages of 2 blocks (32 / 64 / 128 channels,
  64x64 / 32x32 / 16x16), 1000 classes: about 0.9 GFLOP per image;
* ``mobilenet_v2``: torchvision's MobileNetV2 (width 1.0, all seven stages, 1280-channel head, 1000 classes) at
  96x96: about 0.1 GFLOP per image;
* ``bert``: a MiniLM-L6-sized BERT encoder (hidden 384, 12 heads, FFN 1536, 6 layers, vocabulary 30522), opset
  17 (LayerNormalization nodes), at batch x seq 1x128 and 8x128: about 2.9 GFLOP per 128 tokens.
* ``resnet18`` (only with ``--models resnet18``): torchvision's ResNet-18 layout (7x7 / 2 stem and max pool, 64 to
  512 channels) at 224x224, 1000 classes: about 1.8 GFLOP per image.
* on request too, the small models of ``bench.latency``, where per-node overhead decides: ``digits`` (a CNN for
  8x8 one-channel images, :func:`lowbit.onnx.examples.digits_cnn`), ``resnet_block`` (one basic block per stage,
  one stage, 16x16), ``mobilenet_block`` (MobileNetV2's first two stages at 32x32), ``encoder`` (two layers of
  the ``bert`` encoder at sequence 32).

Formats: ``fp32`` (the builder's model), and after ``quant_pre_process`` (batch norms folded), ONNX Runtime's
quantizer: ``qdq`` and ``qop`` (``quantize_static``, QDQ / QOperator, uint8 activations, int8 per-channel
weights, min-max calibration on 4 random batches), ``dynamic`` (``quantize_dynamic``, int8 per-tensor weights).
Both runtimes get the same file, ``intra_op_num_threads`` threads (ORT: ``inter_op_num_threads`` 1) and the same
feeds through ``run(None, feeds)``; they are timed interleaved, round by round (``bench.timing.interleave``), and
each reports its best round. ``ORT/lowbit`` is ORT's time over lowbit's: above 1, lowbit is faster. ``diff``: the
largest ``|lowbit - ORT|`` of the first output over its largest ``|ORT|``; on quantized models it exceeds float
noise where a rounding tie went the other way in an early layer and grew downstream (random weights amplify it;
``tests/lowbit/test_onnx_models.py`` checks the one-code agreement node by node). A model lowbit cannot load or
run gets ``-`` and the reason in ``note``.

``--quick``: batch 1, one thread, two rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

import kernels
from bench.peers import Contender
from bench.timing import cell, interleave, print_table, save_json

CALIBRATION_BATCHES = 4
FORMATS = ("fp32", "qdq", "qop", "dynamic")


def _build(name: str):
    """The float ModelProto of benchmark model ``name``."""
    from lowbit.onnx import examples

    builders = {
        "digits": lambda: examples.digits_cnn(),
        "resnet": lambda: examples.resnet(image=64, width=32, blocks=2, classes=1000),
        "resnet18": lambda: examples.resnet(image=224, width=64, blocks=2, stages=4, imagenet_stem=True,
                                            classes=1000),
        "resnet_block": lambda: examples.resnet(image=16, width=16, blocks=1, stages=1, classes=10),
        "mobilenet_v2": lambda: examples.mobilenet_v2(image=96, stages=examples.MOBILENET_V2_STAGES, last=1280,
                                                      classes=1000),
        "mobilenet_block": lambda: examples.mobilenet_v2(image=32, stages=examples.MOBILENET_V2_STAGES[:2], last=64,
                                                         classes=10),
        "bert": lambda: examples.bert_encoder(vocab=30522, hidden=384, heads=12, ffn=1536, layers=6, opset=17),
        "encoder": lambda: examples.bert_encoder(vocab=30522, hidden=384, heads=12, ffn=1536, layers=2, opset=17),
    }
    return builders[name]()


@dataclass(frozen=True)
class Model:
    """One benchmark model: its name (see :func:`_build`), its default batches, and its feeds."""

    name: str
    batches: tuple[int, ...]
    seq: int | None = None  # the encoder's sequence length
    image: int | None = None
    channels: int = 3

    def build(self):
        return _build(self.name)

    def feeds(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        from lowbit.onnx import examples

        if self.seq is not None:
            return examples.token_feed(batch, self.seq, vocab=30522, seed=seed)
        return examples.image_feed(batch, self.image, seed, self.channels)

    def label(self, batch: int) -> str:
        return f"{self.name} {batch}x{self.seq}" if self.seq else f"{self.name} b{batch}"


MODELS = {m.name: m for m in (Model("resnet", (1, 32), image=64), Model("mobilenet_v2", (1, 32), image=96),
                              Model("bert", (1, 8), seq=128), Model("resnet18", (1, 32), image=224),
                              Model("digits", (1, 64), image=8, channels=1),
                              Model("resnet_block", (1, 64), image=16), Model("mobilenet_block", (1, 64), image=32),
                              Model("encoder", (1, 8), seq=32))}
DEFAULT_MODELS = ("resnet", "mobilenet_v2", "bert")  # resnet18 (1.8 GFLOP per image) and the small ones on request


class _Reader:
    """A calibration data reader over random feeds: ``get_next`` is all ONNX Runtime's min-max calibration calls."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def model_file(model: Model, fmt: str, folder: str) -> str:
    """The path of ``model`` in format ``fmt`` (one of :data:`FORMATS`), written into ``folder`` once."""
    import onnx
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared, path = (os.path.join(folder, f"{model.name}{suffix}.onnx") for suffix in ("", ".pre", f".{fmt}"))
    if not os.path.exists(source):
        onnx.save(model.build(), source)
    if fmt == "fp32":
        return source
    if os.path.exists(path):
        return path
    if not os.path.exists(prepared):
        quant_pre_process(source, prepared, auto_merge=True)  # auto_merge: the encoder's shape inference needs it
    if fmt == "dynamic":
        quantization.quantize_dynamic(prepared, path, weight_type=quantization.QuantType.QInt8)
    else:
        reader = _Reader([model.feeds(2, seed) for seed in range(1, CALIBRATION_BATCHES + 1)])
        quantization.quantize_static(prepared, path, reader, per_channel=True,
                                     quant_format={"qdq": quantization.QuantFormat.QDQ,
                                                   "qop": quantization.QuantFormat.QOperator}[fmt],
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8)
    return path


def _ort(path: str, feeds: dict[str, np.ndarray], threads: int) -> Contender:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return Contender("ORT", lambda: session.run(None, feeds)[0], contextlib.nullcontext)


def _lowbit(path: str, feeds: dict[str, np.ndarray], threads: int) -> Contender:
    import lowbit.onnx

    options = lowbit.onnx.SessionOptions()
    options.intra_op_num_threads = threads
    session = lowbit.onnx.InferenceSession(path, options)
    return Contender("lowbit", lambda: session.run(None, feeds)[0], contextlib.nullcontext)


def measure(model: Model, fmt: str, batch: int, threads: int, rounds: int, folder: str) -> dict:
    """Best seconds of lowbit and ORT on one model file and batch (lowbit's entry None, and a note, on failure)."""
    path = model_file(model, fmt, folder)
    feeds = model.feeds(batch)
    result = {"model": model.name, "format": fmt, "batch": batch, "seq": model.seq, "threads": threads,
              "seconds": {}, "diff": None, "note": ""}
    contenders = [_ort(path, feeds, threads)]
    try:
        ours = _lowbit(path, feeds, threads)
        ours.call()  # prepares (and compiles) once, outside the timing
        contenders.insert(0, ours)
    except Exception as error:  # noqa: BLE001 - the table reports any failure of lowbit's, and goes on
        missing = getattr(error, "unsupported", None)  # lowbit.onnx.UnsupportedModelError: op type -> nodes
        result["note"] = (f"lowbit lacks {', '.join(sorted(missing))}" if missing else
                          f"lowbit: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    best, outputs = interleave(contenders, rounds, threads)
    result["seconds"] = best
    if "lowbit" in outputs:
        theirs = outputs["ORT"]
        result["diff"] = float(np.abs(outputs["lowbit"] - theirs).max() / max(np.abs(theirs).max(), 1e-30))
    return result


def rows_of(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        ours, theirs = r["seconds"].get("lowbit"), r["seconds"].get("ORT")
        rows.append([MODELS[r["model"]].label(r["batch"]), r["format"], str(r["threads"]),
                     cell(ours and 1e3 * ours, ".2f"), cell(theirs and 1e3 * theirs, ".2f"),
                     cell(ours and theirs and theirs / ours, ".2f"), cell(r["diff"], ".1e"), r["note"]])
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print and optionally save the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.onnx_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS), metavar="NAME",
                        help=f"models (default: {', '.join(DEFAULT_MODELS)}; also "
                             f"{', '.join(m for m in MODELS if m not in DEFAULT_MODELS)})")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="formats (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1 and 32; the encoder 1 and 8)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement (default: 5)")
    parser.add_argument("--quick", action="store_true", help="batch 1, one thread, 2 rounds")
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.threads, args.repeat = [1], [1], 2
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice on pre-processing, already followed

    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), features: {', '.join(info['features'])}")
    results = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as folder:
        for name in args.models:
            model = MODELS[name]
            for fmt in args.formats:
                for batch in args.batches or model.batches:
                    for threads in args.threads:
                        results.append(measure(model, fmt, batch, threads, args.repeat, folder))
                        print(f"measured {model.label(batch)} {fmt} on {threads} thread(s)", file=sys.stderr)

    print("\nWhole models, best of interleaved rounds (ms); ORT/lowbit > 1: lowbit is faster")
    print_table(["model", "format", "thr", "lowbit ms", "ORT ms", "ORT/lowbit", "diff", "note"], rows_of(results))
    save_json(args.json, {"cpu_info": info, "repeat": args.repeat, "results": results})


if __name__ == "__main__":
    main()
