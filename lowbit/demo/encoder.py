"""A small transformer encoder trained in NumPy on scikit-learn's 8x8 digits, exported to ONNX.

The model is :func:`lowbit.onnx.examples.patch_encoder` with trained weights: the ONNX ops torch.onnx writes for a
BERT-style (post-LN) encoder, which lowbit fuses into ``LayerNormalization``, ``lowbit.Attention``,
``lowbit.Linear`` and ``com.microsoft.BiasGelu``. Its purpose is a real (trained, not random) transformer to
measure quantization end to end, against ONNX Runtime on the same file.

Tokens: each image ``[8, 8]`` (pixel / 16, in [0, 1]) cut into ``patch = (ph, pw)`` patches, row-major, each
flattened row-major: ``(1, 8)`` (the default) gives its 8 rows as 8 tokens of 8 features, ``(2, 2)`` 16 tokens
of 4. The network, for ``x`` ``[batch, seq, features]``::

    h = LN(x W_p + b_p + P)                                      P: a learned [seq, hidden] position table
    per layer:  h = LN(h + attention(h));  h = LN(h + W_2 gelu(W_1 h + b_1) + b_2)   (exact erf GELU)
    embedding = mean of h over the tokens;  logits = embedding W_c' + b_c

with ``attention(h) = concat_heads(softmax(q k' / sqrt(d)) v) W_o + b_o`` and LayerNorm's epsilon 1e-12, as the
ONNX graph computes it (which adds a zero ``attention.mask`` to the scores, BERT's place for a padding mask, so
that lowbit's attention fusion applies). Default: 8 row tokens, hidden 64, 4 heads, FFN 128, 2 layers, 10 classes.

Training: hand-written backward passes, softmax cross entropy, AdamW (weight decay 0.01 on the matrices) with a
short linear warm-up then cosine decay, mini-batches of 32 for 30 epochs, one BLAS thread; everything from one seed
(NumPy's ``default_rng``), in float32. Seed 0 reaches 97.8% on the 360 test images in under 10 s on one core
(seeds 1-4: 96.4-98.1%).

API:

- :func:`digits_tokens` -- a split's images as float32 tokens ``[N, seq, features]`` and int64 labels;
  :func:`feeds` cuts tokens into ``{"pixels": batch}`` dicts for calibration or evaluation;
- :func:`train_encoder` -- train; returns ``(onnx.ModelProto, TrainedEncoder)``;
- :func:`encoder_model` -- the ONNX file's path, trained once and cached (keyed by seed, configurations, opset and
  the sources that make it);
- :func:`params_from_onnx`, :func:`config_from_onnx`, :func:`model_metadata` -- what an exported file holds;
- :func:`forward`, :func:`backward`, :func:`loss_and_grads`, :func:`init_params`, :func:`export_onnx` -- the
  NumPy model and its export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.demo.train import softmax_cross_entropy

EPS = 1e-12  # LayerNorm's epsilon, as lowbit.onnx.examples writes it
INPUT = "pixels"
OUTPUTS = ("last_hidden_state", "embedding", "logits")
CACHE_ENV = "LOWBIT_CACHE_DIR"  # where encoder_model caches its files; default: <tempdir>/lowbit-cache


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture: ``patch`` (rows, columns of each token's pixels, dividing 8), ``hidden`` (divisible by
    ``heads``), ``ffn`` (the feed-forward width), ``layers``, ``classes``."""

    patch: tuple[int, int] = (1, 8)
    hidden: int = 64
    heads: int = 4
    ffn: int = 128
    layers: int = 2
    classes: int = 10
    image: int = 8

    def __post_init__(self):
        ph, pw = self.patch
        if self.image % ph or self.image % pw:
            raise ValueError(f"patch: expected divisors of the image size {self.image}, got {self.patch}")
        if self.hidden % self.heads:
            raise ValueError(f"heads: expected a divisor of hidden = {self.hidden}, got {self.heads}")

    @property
    def seq(self) -> int:
        return (self.image // self.patch[0]) * (self.image // self.patch[1])

    @property
    def features(self) -> int:
        return self.patch[0] * self.patch[1]


@dataclass(frozen=True)
class TrainingConfig:
    """Training settings: epochs, batch size, peak learning rate (reached after ``warmup`` of the steps, then a
    cosine to 0), decoupled weight decay on the matrices (AdamW) and the digits split's ``random_state``."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    split_seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, batch_size: expected positive ints, got {self.epochs}, {self.batch_size}")


@dataclass
class TrainedEncoder:
    """What :func:`train_encoder` returns beside the ONNX model."""

    config: EncoderConfig
    training: TrainingConfig
    seed: int
    params: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)  # per epoch: loss, train_acc, seconds
    test_accuracy: float = float("nan")
    train_seconds: float = float("nan")

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return forward(self.params, x, self.config)


# ---- data --------------------------------------------------------------------------------------------------------

def to_tokens(images: np.ndarray, patch: tuple[int, int] = (1, 8)) -> np.ndarray:
    """Images ``[N, 1, H, W]`` (or ``[N, H, W]``) -> float32 tokens ``[N, (H / ph) (W / pw), ph pw]``: patches in
    row-major order, each flattened row-major."""
    images = np.asarray(images, np.float32)
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    ph, pw = patch
    x = images.reshape(n, h // ph, ph, w // pw, pw).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(x.reshape(n, (h // ph) * (w // pw), ph * pw))


def digits_tokens(split: str = "test", patch: tuple[int, int] = (1, 8), split_seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, labels)`` of the digits ``split`` ("train": 1437 images, "test": 360; stratified 80/20 with
    ``random_state=split_seed``, ``lowbit.demo.digits.load_digits``): float32 ``[N, seq, features]`` and int64
    ``[N]``."""
    from lowbit.demo.digits import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    x_train, x_test, y_train, y_test = load_digits(split_seed)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return to_tokens(x, patch), np.asarray(y, np.int64)


def feeds(tokens: np.ndarray, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """``tokens`` cut into ``{"pixels": batch}`` feeds (the last one shorter): calibration or evaluation data."""
    return [{INPUT: tokens[i:i + batch_size]} for i in range(0, len(tokens), batch_size)]


# ---- the NumPy model ---------------------------------------------------------------------------------------------

def _layer_names(i: int) -> list[str]:
    stem = f"encoder.layer.{i}."
    return [stem + n for n in ("attention.query", "attention.key", "attention.value", "attention.output",
                               "intermediate", "output")]


def init_params(config: EncoderConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Initial weights, named as the ONNX initializers: matrices ``N(0, 1 / fan_in)`` (``[in, out]``; the
    classifier ``[classes, hidden]`` as torch's Linear), biases 0, LayerNorm 1 / 0, positions ``N(0, 0.02)``."""
    rng = np.random.default_rng(seed)
    h, f, c = config.hidden, config.features, config.classes
    p: dict[str, np.ndarray] = {}

    def linear(stem: str, fan_in: int, fan_out: int) -> None:
        p[f"{stem}.weight"] = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
        p[f"{stem}.bias"] = np.zeros(fan_out)

    def norm(stem: str) -> None:
        p[f"{stem}.weight"], p[f"{stem}.bias"] = np.ones(h), np.zeros(h)

    linear("embeddings.patch", f, h)
    p["embeddings.position"] = rng.standard_normal((config.seq, h)) * 0.02
    norm("embeddings.norm")
    for i in range(config.layers):
        query, key, value, output, intermediate, ffn_output = _layer_names(i)
        for stem in (query, key, value, output):
            linear(stem, h, h)
        norm(f"encoder.layer.{i}.attention.norm")
        linear(intermediate, h, config.ffn)
        linear(ffn_output, config.ffn, h)
        norm(f"encoder.layer.{i}.output.norm")
    p["classifier.weight"] = rng.standard_normal((c, h)) / math.sqrt(h)
    p["classifier.bias"] = np.zeros(c)
    return {n: v.astype(dtype) for n, v in p.items()}


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # scikit-learn's dependency: there with the digits
    except ImportError:  # pragma: no cover
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return erf(x).astype(x.dtype, copy=False)


def _linear(x, p, stem):
    return x @ p[f"{stem}.weight"] + p[f"{stem}.bias"]


def _linear_backward(dy, x, p, g, stem):
    """Adds ``dW``, ``db`` to ``g``; returns ``dx``."""
    g[f"{stem}.weight"] = x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    g[f"{stem}.bias"] = dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    return dy @ p[f"{stem}.weight"].T


def _norm(x, p, stem, tape):
    mu = x.mean(axis=-1, keepdims=True)
    c = x - mu
    rstd = 1.0 / np.sqrt((c * c).mean(axis=-1, keepdims=True) + np.asarray(EPS, x.dtype))
    n = c * rstd
    tape[stem] = (n, rstd)
    return n * p[f"{stem}.weight"] + p[f"{stem}.bias"]


def _norm_backward(dy, p, g, stem, tape):
    n, rstd = tape[stem]
    g[f"{stem}.weight"] = (dy * n).reshape(-1, n.shape[-1]).sum(axis=0)
    g[f"{stem}.bias"] = dy.reshape(-1, n.shape[-1]).sum(axis=0)
    dn = dy * p[f"{stem}.weight"]
    return rstd * (dn - dn.mean(axis=-1, keepdims=True) - n * (dn * n).mean(axis=-1, keepdims=True))


def _heads(x, heads):
    """``[B, S, H D]`` -> ``[B, H, S, D]``."""
    b, s, hidden = x.shape
    return x.reshape(b, s, heads, hidden // heads).transpose(0, 2, 1, 3)


def _merge(x):
    """``[B, H, S, D]`` -> ``[B, S, H D]``."""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _attention(x, p, config, i, tape):
    query, key, value, output = _layer_names(i)[:4]
    q, k, v = (_heads(_linear(x, p, stem), config.heads) for stem in (query, key, value))
    scale = np.asarray(1.0 / math.sqrt(config.hidden // config.heads), x.dtype)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    context = _merge(probs @ v)
    tape[f"attention{i}"] = (x, q, k, v, probs, context, scale)
    return _linear(context, p, output)


def _attention_backward(dy, p, g, config, i, tape):
    query, key, value, output = _layer_names(i)[:4]
    x, q, k, v, probs, context, scale = tape[f"attention{i}"]
    dcontext = _heads(_linear_backward(dy, context, p, g, output), config.heads)
    dprobs = dcontext @ v.transpose(0, 1, 3, 2)
    dv = probs.transpose(0, 1, 3, 2) @ dcontext
    dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) * scale
    dq, dk = dscores @ k, dscores.transpose(0, 1, 3, 2) @ q
    return sum(_linear_backward(_merge(d), x, p, g, stem) for d, stem in ((dq, query), (dk, key), (dv, value)))


def forward(params: dict[str, np.ndarray], x: np.ndarray, config: EncoderConfig,
            tape: dict | None = None) -> dict[str, np.ndarray]:
    """The network on tokens ``x`` ``[batch, seq, features]`` in ``params``' dtype: ``last_hidden_state``,
    ``embedding`` and ``logits``, as the ONNX model computes them. ``tape`` (a dict) records what
    :func:`backward` needs."""
    p = params
    tape = {} if tape is None else tape
    dtype = p["classifier.weight"].dtype
    x = np.asarray(x, dtype)
    tape["x"] = x
    h = _norm(_linear(x, p, "embeddings.patch") + p["embeddings.position"], p, "embeddings.norm", tape)
    for i in range(config.layers):
        intermediate, ffn_output = _layer_names(i)[4:]
        h = _norm(h + _attention(h, p, config, i, tape), p, f"encoder.layer.{i}.attention.norm", tape)
        pre = _linear(h, p, intermediate)
        cdf = 0.5 * (1 + _erf(pre * np.asarray(1 / math.sqrt(2), dtype)))
        act = pre * cdf
        tape[f"ffn{i}"] = (h, pre, cdf, act)
        h = _norm(h + _linear(act, p, ffn_output), p, f"encoder.layer.{i}.output.norm", tape)
    embedding = h.mean(axis=1)
    tape["embedding"] = embedding
    logits = embedding @ p["classifier.weight"].T + p["classifier.bias"]
    return {"last_hidden_state": h, "embedding": embedding, "logits": logits}


def backward(dlogits: np.ndarray, params: dict[str, np.ndarray], config: EncoderConfig,
             tape: dict) -> dict[str, np.ndarray]:
    """The gradients of every parameter for ``dL/dlogits``, from :func:`forward`'s ``tape``."""
    p, g = params, {}
    embedding = tape["embedding"]
    g["classifier.weight"] = dlogits.T @ embedding
    g["classifier.bias"] = dlogits.sum(axis=0)
    seq = tape["x"].shape[1]
    dh = np.repeat((dlogits @ p["classifier.weight"])[:, None, :] / np.asarray(seq, dlogits.dtype), seq, axis=1)
    for i in reversed(range(config.layers)):
        intermediate, ffn_output = _layer_names(i)[4:]
        h_in, pre, cdf, act = tape[f"ffn{i}"]
        dsum = _norm_backward(dh, p, g, f"encoder.layer.{i}.output.norm", tape)
        dact = _linear_backward(dsum, act, p, g, ffn_output)
        pdf = np.exp(-0.5 * pre * pre) * np.asarray(1 / math.sqrt(2 * math.pi), pre.dtype)
        dh = dsum + _linear_backward(dact * (cdf + pre * pdf), h_in, p, g, intermediate)
        dsum = _norm_backward(dh, p, g, f"encoder.layer.{i}.attention.norm", tape)
        dh = dsum + _attention_backward(dsum, p, g, config, i, tape)
    dsum = _norm_backward(dh, p, g, "embeddings.norm", tape)
    g["embeddings.position"] = dsum.sum(axis=0)
    _linear_backward(dsum, tape["x"], p, g, "embeddings.patch")
    return g


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, config: EncoderConfig
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross entropy of the batch and its gradient for each parameter."""
    tape: dict = {}
    loss, dlogits = softmax_cross_entropy(forward(params, x, config, tape)["logits"], y)
    return loss, backward(dlogits, params, config, tape)


def predict(params: dict[str, np.ndarray], x: np.ndarray, config: EncoderConfig, batch_size: int = 512
            ) -> np.ndarray:
    return np.concatenate([forward(params, x[i:i + batch_size], config)["logits"].argmax(axis=1)
                           for i in range(0, len(x), batch_size)])


# ---- training ----------------------------------------------------------------------------------------------------

class _AdamW:
    """Adam (bias-corrected moments) with decoupled weight decay on the matrices (AdamW)."""

    def __init__(self, params: dict[str, np.ndarray], weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
        self.m = {n: np.zeros_like(v) for n, v in params.items()}
        self.v = {n: np.zeros_like(v) for n, v in params.items()}
        self.decay = {n for n, v in params.items() if v.ndim == 2 and n != "embeddings.position"}
        self.weight_decay, self.betas, self.eps, self.t = weight_decay, betas, eps, 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for n, p in params.items():
            g, m, v = grads[n], self.m[n], self.v[n]
            m += (1 - b1) * (g - m)
            v += (1 - b2) * (g * g - v)
            if n in self.decay:
                p *= p.dtype.type(1 - lr * self.weight_decay)
            p -= (lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(p.dtype)


def _blas_threads(threads: int | None):
    """A context limiting BLAS to ``threads`` (threadpoolctl, scikit-learn's dependency; None: no limit). The
    matrices are small: more threads only contend, badly so on a busy machine."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(threads, user_api="blas")


def train_encoder(seed: int = 0, config: EncoderConfig | None = None, training: TrainingConfig | None = None, *,
                  opset: int = 17, progress=None, threads: int | None = 1):
    """Train the encoder on the digits' training split with ``seed`` (initial weights, batch order); returns
    ``(model, trained)``: the float32 ONNX model (:func:`export_onnx`; its metadata holds the test accuracy) and a
    :class:`TrainedEncoder` (weights, per-epoch history, test accuracy, training seconds). ``progress``: a callable
    given one line per epoch; ``threads``: BLAS threads while training (None: BLAS's default)."""
    config, training = config or EncoderConfig(), training or TrainingConfig()
    with _blas_threads(threads):
        return _train(seed, config, training, opset, progress)


def _train(seed: int, config: EncoderConfig, training: TrainingConfig, opset: int, progress):
    x, y = digits_tokens("train", config.patch, training.split_seed)
    x_test, y_test = digits_tokens("test", config.patch, training.split_seed)
    params = init_params(config, seed)
    rng = np.random.default_rng([seed, 1])
    optimizer = _AdamW(params, training.weight_decay)
    steps_per_epoch = -(-len(x) // training.batch_size)
    total, warmup = training.epochs * steps_per_epoch, max(1, int(training.warmup * training.epochs * steps_per_epoch))
    history, step, start = [], 0, time.perf_counter()
    for epoch in range(training.epochs):
        order, losses, correct = rng.permutation(len(x)), 0.0, 0
        for i in range(0, len(x), training.batch_size):
            batch = order[i:i + training.batch_size]
            lr = training.lr * (step + 1) / warmup if step < warmup else \
                training.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            tape: dict = {}
            logits = forward(params, x[batch], config, tape)["logits"]
            loss, dlogits = softmax_cross_entropy(logits, y[batch])
            optimizer.step(params, backward(dlogits, params, config, tape), lr)
            losses += loss * len(batch)
            correct += int((logits.argmax(axis=1) == y[batch]).sum())
            step += 1
        history.append({"epoch": epoch + 1, "loss": losses / len(x), "train_acc": correct / len(x),
                        "seconds": time.perf_counter() - start})
        if progress is not None:
            row = history[-1]
            progress(f"epoch {epoch + 1}/{training.epochs}: loss {row['loss']:.4f}, "
                     f"train acc {100 * row['train_acc']:.1f}%, {row['seconds']:.1f} s")
    seconds = time.perf_counter() - start
    accuracy = float((predict(params, x_test, config) == y_test).mean())
    trained = TrainedEncoder(config, training, seed, params, history, accuracy, seconds)
    return export_onnx(params, config, opset, metadata_props=_metadata(trained)), trained


def _metadata(trained: TrainedEncoder) -> dict[str, str]:
    return {"lowbit.demo.encoder.seed": str(trained.seed),
            "lowbit.demo.encoder.config": json.dumps(dataclasses.asdict(trained.config)),
            "lowbit.demo.encoder.training": json.dumps(dataclasses.asdict(trained.training)),
            "lowbit.demo.encoder.test_accuracy": repr(trained.test_accuracy),
            "lowbit.demo.encoder.train_seconds": f"{trained.train_seconds:.2f}"}


# ---- ONNX --------------------------------------------------------------------------------------------------------

def export_onnx(params: dict[str, np.ndarray], config: EncoderConfig, opset: int = 17, *, batch: int | str = "batch",
                metadata_props: dict[str, str] | None = None):
    """The ONNX model (:func:`lowbit.onnx.examples.patch_encoder`) with these weights, float32: input ``pixels``
    ``[batch, seq, features]``, outputs ``last_hidden_state``, ``embedding``, ``logits``."""
    from lowbit.onnx.examples import patch_encoder

    model = patch_encoder(batch, config.seq, config.features, config.hidden, config.heads, config.ffn,
                          config.layers, config.classes, opset, params=params)
    for key, value in (metadata_props or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def params_from_onnx(model) -> dict[str, np.ndarray]:
    """The weights of an exported model (a ModelProto or a path) by name, as :func:`forward` takes them."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name != "attention.mask"}


def config_from_onnx(model) -> EncoderConfig:
    """The :class:`EncoderConfig` recorded in an exported model's metadata."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    values = json.loads({p.key: p.value for p in model.metadata_props}["lowbit.demo.encoder.config"])
    return EncoderConfig(**{**values, "patch": tuple(values["patch"])})


def model_metadata(model) -> dict[str, str]:
    """An exported model's ``metadata_props`` as a dict (test accuracy, seed, configurations)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    return {p.key: p.value for p in model.metadata_props}


def cache_dir() -> Path:
    """``$LOWBIT_CACHE_DIR``, else ``<tempdir>/lowbit-cache``."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "lowbit-cache")


def _key(seed: int, config: EncoderConfig, training: TrainingConfig, opset: int) -> str:
    here = Path(__file__).parent  # the sources that make the file: this module, the data, the loss, the ONNX builder
    source = b"".join(f.read_bytes() for f in (here / "encoder.py", here / "digits.py", here / "train.py",
                                                 here.parent / "onnx" / "examples.py"))
    text = json.dumps({"seed": seed, "config": dataclasses.asdict(config),
                       "training": dataclasses.asdict(training), "opset": opset,
                       "source": hashlib.sha256(source).hexdigest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encoder_model(path: str | os.PathLike | None = None, seed: int = 0, config: EncoderConfig | None = None,
                  training: TrainingConfig | None = None, *, opset: int = 17, progress=None) -> str:
    """The path of the trained encoder's ONNX file, training it only when the file is missing or was made with
    other settings (its metadata holds the cache key: seed, configurations, opset and the sources of this module,
    ``lowbit.demo.digits``, ``lowbit.demo.train`` and ``lowbit.onnx.examples``).

    ``path`` None: ``cache_dir() / digits_encoder-<key>.onnx``. The file is written to a temporary name and
    renamed, so concurrent callers never read half a file."""
    import onnx
    from google.protobuf.message import DecodeError

    config, training = config or EncoderConfig(), training or TrainingConfig()
    key = _key(seed, config, training, opset)
    path = Path(path) if path is not None else cache_dir() / f"digits_encoder-{key}.onnx"
    if path.exists():
        try:
            if model_metadata(path).get("lowbit.demo.encoder.key") == key:
                return str(path)
        except (OSError, ValueError, DecodeError):  # an unreadable or foreign file is retrained
            pass
    model, _ = train_encoder(seed, config, training, opset=opset, progress=progress)
    entry = model.metadata_props.add()
    entry.key, entry.value = "lowbit.demo.encoder.key", key
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    onnx.save(model, str(partial))
    os.replace(partial, path)
    return str(path)


if __name__ == "__main__":  # python -m lowbit.demo.encoder: train (or find) the default model, print its path
    print(encoder_model(progress=print))
