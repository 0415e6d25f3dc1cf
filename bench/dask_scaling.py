"""Batch inference on Dask (``lowbit.dask.predict``): 1 and 2 worker processes against one process's session.

Run from the repository root (needs the ``[dask]`` extra)::

    python -m bench.dask_scaling [--samples 8192] [--chunk 256] [--repeat 3] [--json PATH]

Models, quantized to int8 by ``lowbit.onnx.quantization``: a ResNet (``lowbit.onnx.examples.resnet``, 3 stages
of 2 blocks, width 16, 32x32 images; static QDQ, calibrated on 4 batches) and a BERT encoder
(``examples.bert_encoder``, 2 layers, hidden 64, 64 tokens; dynamic, per token). Each runs over ``--samples``
inputs in chunks of ``--chunk``:

* ``session``: ``lowbit.onnx.InferenceSession`` (one kernel thread) over the chunks one after the other;
* ``1 worker`` / ``2 workers``: ``predict`` on a ``LocalCluster`` of that many one-thread worker processes
  (loopback). The inputs are made on the workers (``dask.array.random``), as a job reading its own shards would;
  ``client data`` runs the 2 workers on an array held by the client, whose chunks are serialized into the
  graph and sent to the workers.

Every figure is samples per second, the best of ``--repeat`` jobs after one warm job (which loads the model on each
worker). ``2w / 1w`` is the scaling (2.0 is linear); the overhead per chunk is what a worker spends beyond the
session's own time per chunk: scheduling, transfers and the task's Python (negative: the worker processes ran
the model faster than this one did).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

import kernels
from bench.timing import cell, print_table, save_json


class _Reader:
    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _models(folder: Path) -> dict[str, tuple[str, Callable]]:
    """name -> (int8 ONNX path, make(dask module, samples, chunk) -> the input collections)."""
    import onnx

    from lowbit.onnx import examples
    from lowbit.onnx.quantization import quantize_dynamic, quantize_static

    onnx.save(examples.resnet(image=32, width=16, blocks=2), folder / "resnet.onnx")
    quantize_static(str(folder / "resnet.onnx"), str(folder / "resnet.int8.onnx"),
                    _Reader([examples.image_feed(16, 32, seed=s) for s in range(4)]), per_channel=True)
    onnx.save(examples.bert_encoder(layers=2, hidden=64), folder / "bert.onnx")
    quantize_dynamic(str(folder / "bert.onnx"), str(folder / "bert.int8.onnx"))

    def images(da, samples, chunk):
        return da.random.default_rng(0).standard_normal((samples, 3, 32, 32), chunks=(chunk, 3, 32, 32),
                                                      dtype=np.float32)

    def tokens(da, samples, chunk):
        ids = da.random.default_rng(0).integers(0, 1000, (samples, 64), chunks=(chunk, 64), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": da.ones((samples, 64), dtype=np.int64, chunks=(chunk, 64))}

    return {"int8 ResNet": (str(folder / "resnet.int8.onnx"), images),
            "int8 BERT": (str(folder / "bert.int8.onnx"), tokens)}


def _best(job, repeat: int) -> float:
    job()  # warm: each worker loads the model
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - start)
    return best


def measure(path: str, make, samples: int, chunk: int, repeat: int) -> dict:
    """Seconds of the session and of 1 and 2 workers (and 2 workers on client data) over ``samples`` inputs."""
    import dask.array as da
    import distributed

    from lowbit.dask import predict
    from lowbit.onnx import InferenceSession, SessionOptions

    data = make(da, samples, chunk)
    local = {n: a.compute() for n, a in data.items()} if isinstance(data, dict) else data.compute()
    options = SessionOptions()
    options.intra_op_num_threads = 1
    session = InferenceSession(path, options)
    names = [i.name for i in session.get_inputs()]

    def one_process():
        for start in range(0, samples, chunk):
            feeds = {n: local[n][start:start + chunk] for n in names} if isinstance(local, dict) else \
                {names[0]: local[start:start + chunk]}
            session.run(None, feeds)

    seconds = {"session": _best(one_process, repeat)}
    held = ({n: da.from_array(a, chunks=(chunk, *a.shape[1:])) for n, a in local.items()}
            if isinstance(local, dict) else da.from_array(local, chunks=(chunk, *local.shape[1:])))
    for workers in (1, 2):
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=":0") as cluster, distributed.Client(cluster):
            seconds[f"{workers} worker{'s' * (workers > 1)}"] = _best(
                lambda: distributed.wait(_persisted(predict(path, data))), repeat)
            if workers == 2:
                seconds["client data"] = _best(lambda: distributed.wait(_persisted(predict(path, held))), repeat)
        print(f"  {workers} worker(s) measured", file=sys.stderr)
    return seconds


def _persisted(result):
    """The result's chunks computed and kept on the workers (not gathered: the job, not the transfer back)."""
    import distributed

    arrays = result.values() if isinstance(result, dict) else [result]
    return distributed.get_client().persist(list(arrays))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dask_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8192, help="inputs per job (default: 8192)")
    parser.add_argument("--chunk", type=int, default=256, help="inputs per task (default: 256)")
    parser.add_argument("--repeat", type=int, default=3, help="timed jobs per figure, best kept (default: 3)")
    parser.add_argument("--json", metavar="PATH", help="write every number, with kernels.cpu_info(), here")
    args = parser.parse_args(argv)
    info = kernels.cpu_info()
    print(f"cpu: {info['cpu']} ({info['active_level']}), {info['threads']} threads")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (path, make) in _models(Path(folder)).items():
            print(f"{name}:", file=sys.stderr)
            results[name] = measure(path, make, args.samples, args.chunk, args.repeat)
    rows = []
    for name, s in results.items():
        rate = {k: args.samples / v for k, v in s.items()}
        per_chunk = s["session"] / (args.samples / args.chunk)
        overhead = 2 * s["2 workers"] / (args.samples / args.chunk) - per_chunk
        rows.append([name, *(cell(rate[k], ".0f") for k in ("session", "1 worker", "2 workers", "client data")),
                     cell(rate["2 workers"] / rate["1 worker"], ".2f"),
                     cell(rate["2 workers"] / rate["session"], ".2f"), cell(1e3 * per_chunk, ".1f"),
                     cell(1e3 * overhead, ".1f")])
    print(f"\nsamples/s over {args.samples} inputs in chunks of {args.chunk} (best of {args.repeat} jobs)")
    print_table(["model", "session", "1 worker", "2 workers", "client data", "2w / 1w", "2w / session",
                 "chunk ms", "overhead ms/chunk"], rows)
    save_json(args.json, {"cpu_info": info, "samples": args.samples, "chunk": args.chunk, "seconds": results})


if __name__ == "__main__":
    main()
