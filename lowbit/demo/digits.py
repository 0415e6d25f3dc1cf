"""``lowbit demo``: handwritten digits, from float training to int8, int4, ternary and binary networks.

Trains, in NumPy (``lowbit.demo.train``), a small CNN and an MLP on scikit-learn's
8x8 digits (1797 images, a stratified 80/20 split), then builds:

- int8 and int4 versions of both by post-training quantization
  (``lowbit.quantize_model`` with calibration batches of training images);
- a ternary MLP (TWN weights, float activations; quantization-aware training,
  exported as ``lowbit.TernaryGemm``: the runtime has no ternary convolution);
- a binary CNN (float first convolution, then XNOR-Net binary convolutions on
  sign activations, float classifier; quantization-aware training, exported as
  ``lowbit.BinaryConv``).

Every model runs through ``lowbit.runtime.Session``. Its row gives the test
accuracy, the size of its parameters as saved (``lowbit.io.model_size``) and its
ratio to the float network of the same architecture, and the latency of a batch
of 64 (best of N, timed interleaved with that float network) with the speed-up.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lowbit.demo import train as nn
from lowbit.graph import Graph
from lowbit.io import load, model_size, save
from lowbit.ptq import quantize_model
from lowbit.runtime.session import Session

BATCH = 64
COLUMNS = ("model", "precision", "accuracy", "size", "size_ratio", "latency_ms", "speedup")


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train, x_test, y_train, y_test``: images ``[N, 1, 8, 8]`` float32 in [0, 1] (pixel / 16),
    labels int64; a stratified 80/20 split with ``random_state=seed``."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError('the digits demo needs scikit-learn: pip install "lowbit[demo]"') from error
    digits = sklearn_digits()
    x = (digits.images / 16).astype(np.float32)[:, None]
    return tuple(train_test_split(x, digits.target, test_size=0.2, stratify=digits.target, random_state=seed))


# ---------------------------------------------------------------------------- architectures

def cnn(rng: np.random.Generator) -> nn.Sequential:
    """conv 1->16, conv 16->32, max pool, conv 32->32 (3x3, pad 1, each with BN and ReLU), linear 512->10."""
    return nn.Sequential([
        nn.Conv2d(1, 16, rng=rng), nn.BatchNorm(16), nn.ReLU(),
        nn.Conv2d(16, 32, rng=rng), nn.BatchNorm(32), nn.ReLU(), nn.MaxPool2d(),
        nn.Conv2d(32, 32, rng=rng), nn.BatchNorm(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10, rng=rng),
    ])


def mlp(rng: np.random.Generator, weights: str | None = None) -> nn.Sequential:
    """64-128-64-10 with ReLU; with ``weights="twn"`` every layer is ternary and BN precedes each ReLU."""
    bn = (lambda n: [nn.BatchNorm(n)]) if weights else (lambda n: [])
    return nn.Sequential([
        nn.Flatten(),
        nn.Linear(64, 128, rng=rng, weights=weights), *bn(128), nn.ReLU(),
        nn.Linear(128, 64, rng=rng, weights=weights), *bn(64), nn.ReLU(),
        nn.Linear(64, 10, rng=rng, weights=weights),
    ])


def binary_cnn(rng: np.random.Generator) -> nn.Sequential:
    """Float conv 1->32 + BN; binary convs 32->32 and 32->64, each + BN + max pool; float linear 256->10.

    No ReLU before a binary convolution: its sign would turn every activation into +1.
    The second pooling keeps the float classifier (most of the bytes) small.
    """
    binary = {"weights": "xnor", "inputs": "ste_sign", "bias": False}
    return nn.Sequential([
        nn.Conv2d(1, 32, rng=rng), nn.BatchNorm(32),
        nn.Conv2d(32, 32, rng=rng, **binary), nn.BatchNorm(32), nn.MaxPool2d(),
        nn.Conv2d(32, 64, rng=rng, **binary), nn.BatchNorm(64), nn.MaxPool2d(),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 10, rng=rng),
    ])


# ---------------------------------------------------------------------------- measuring

def _accuracy(session: Session, graph: Graph, x: np.ndarray, y: np.ndarray) -> float:
    return float((session.run({"x": x})[graph.outputs[0]].argmax(axis=1) == y).mean())


def _latencies(sessions: list[Session], x: np.ndarray, repeat: int) -> list[float]:
    """Best-of-``repeat`` seconds per ``run`` of each session, the sessions interleaved so that noise hits all."""
    feeds = {"x": x}
    for session in sessions:
        session.run(feeds)  # prepare, compile
    best = [np.inf] * len(sessions)
    for _ in range(repeat):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(feeds)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _row(model: str, precision: str, graph: Graph, reference: Graph, data: tuple, repeat: int,
         progress: Callable[[str], None]) -> dict:
    """One table row: ``graph`` measured against ``reference``, the float graph of the same architecture."""
    _, x_test, _, y_test = data
    progress(f"  timing the {model}, {precision}, at batch {BATCH} ({repeat} runs)")
    session = Session(graph)
    times = _latencies([session] if graph is reference else [session, Session(reference)], x_test[:BATCH], repeat)
    seconds, float_seconds = times[0], times[-1]
    size = model_size(graph)
    return {"model": model, "precision": precision, "accuracy": _accuracy(session, graph, x_test, y_test),
            "size": size, "size_ratio": model_size(reference) / size, "latency_ms": 1e3 * seconds,
            "speedup": float_seconds / seconds}


def table(rows: list[dict]) -> str:
    """The rows as aligned text: accuracy in %, size in bytes and as float size / size, ms per batch of 64."""
    header = ("model", "precision", "test acc", "size (B)", "smaller", f"ms/batch {BATCH}", "speed-up")
    lines = [(r["model"], r["precision"], f"{100 * r['accuracy']:.1f}%", f"{r['size']:,}", f"{r['size_ratio']:.1f}x",
              f"{r['latency_ms']:.3f}", f"{r['speedup']:.2f}x") for r in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in [header, *lines])


# ---------------------------------------------------------------------------- the demo

def run(*, quick: bool = False, seed: int = 0, progress: Callable[[str], None] = print) -> list[dict]:
    """Train, quantize, measure; returns one dict per model with keys ``COLUMNS``
    (accuracy a fraction, size in bytes, size_ratio = float size / size, latency in ms per
    batch of 64, speedup = float latency / latency) and reports progress through ``progress``.

    ``quick`` trains for an epoch or two and times fewer runs (a smoke test, not a result).
    """
    if not callable(progress):
        raise TypeError(f"progress: expected a callable taking a string, got {type(progress).__name__}")
    started = time.perf_counter()
    data = x_train, x_test, y_train, y_test = load_digits(seed)
    epochs = {"cnn": 1, "mlp": 2, "binary": 1} if quick else {"cnn": 8, "mlp": 30, "binary": 10}
    repeat = 5 if quick else 30
    rng = np.random.default_rng(seed)
    progress(f"digits: {len(x_train)} training and {len(x_test)} test images, 8x8, 10 classes")
    progress("(a first run compiles each kernel into Numba's disk cache as it is first used: steps then take "
             "seconds longer, later runs load them)")

    def trained(name: str, model: nn.Sequential, epochs: int) -> nn.Sequential:
        nn.fit(model, x_train, y_train, epochs=epochs, seed=seed, validation=(x_test, y_test), progress=progress,
               name=name)
        return model

    rows = []
    calibration = [x_train[i:i + BATCH] for i in range(0, min(len(x_train), 8 * BATCH), BATCH)]
    int8_cnn = None
    for name, model in (("CNN", trained("CNN", cnn(rng), epochs["cnn"])),
                        ("MLP", trained("MLP", mlp(rng), epochs["mlp"]))):
        graph = nn.export(model)
        rows.append(_row(name, "float32", graph, graph, data, repeat, progress))
        for precision in ("int8", "int4"):
            progress(f"  quantizing the {name} to {precision}")
            quantized = quantize_model(graph, calibration, {"precision": precision})
            rows.append(_row(name, precision, quantized, graph, data, repeat, progress))
            if name == "CNN" and precision == "int8":
                int8_cnn = quantized
    ternary = trained("ternary MLP", mlp(rng, weights="twn"), epochs["mlp"])
    rows.append(_row("MLP", "ternary", nn.export(ternary), nn.export(ternary, quantized=False), data, repeat,
                     progress))
    binary = trained("binary CNN", binary_cnn(rng), epochs["binary"])
    rows.append(_row("binary CNN", "binary", nn.export(binary), nn.export(binary, quantized=False), data, repeat,
                     progress))

    progress("\n" + table(rows))
    progress("saving, loading and rerunning the int8 CNN")
    _check_save_load(int8_cnn, x_test[:BATCH], progress)
    progress(f"\nprofile of the int8 CNN, batch {BATCH}:\n{Session(int8_cnn).profile({'x': x_test[:BATCH]})}")
    progress(f"\ndone in {time.perf_counter() - started:.1f} s")
    return rows


def _check_save_load(graph: Graph, x: np.ndarray, progress: Callable[[str], None]) -> None:
    """Save, load back and compare outputs bit for bit; raises ``RuntimeError`` if they differ."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cnn-int8.lowbit"
        save(graph, path)
        loaded = load(path)
        file_size = path.stat().st_size
    before = Session(graph, fallback=False).run({"x": x})[graph.outputs[0]]  # bit for bit: no timing choices
    after = Session(loaded, fallback=False).run({"x": x})[loaded.outputs[0]]
    if not np.array_equal(before, after):
        raise RuntimeError("save/load: the loaded int8 CNN computes different outputs")
    progress(f"save/load: identical ({file_size:,} bytes on disk)")


def main(*, quick: bool = False, seed: int = 0) -> int:
    """``lowbit demo``: run the demo, printing progress and the table."""
    run(quick=quick, seed=seed)
    return 0
