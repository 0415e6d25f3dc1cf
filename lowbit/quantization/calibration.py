"""Calibration observers: clip ranges for activations, from a stream of batches.

An observer sees one batch at a time and keeps a bounded summary of it (running
extremes, or a histogram of ``2 * bins`` counts per channel), never the activations,
so its memory is O(bins * channels) however long the stream::

    observer = get_observer("entropy", int8())
    for batch in batches:
        observer.observe(batch)
    params = observer.qparams()        # grid.QParams, as grid.quantize takes them
    lo, hi = observer.range()          # the clip range those params cover

Observers (``OBSERVERS``): ``minmax``, ``moving_average``, ``percentile``, ``mse`` (the
range of least expected quantization MSE) and ``entropy`` (TensorRT's KL threshold).
Granularity ``tensor`` gives one range; ``channel`` one per index of ``scheme.axis`` of
the batch (1 for NCHW activations, -1 for [batch, features]). Only uniform grids.

Streaming histograms: a channel's histogram counts x in ``2 * bins`` equal bins over
``[-R, R]``, R starting at the first batch's max |x|. When a batch exceeds R, R doubles
until it covers the batch and each run of ``2**k`` bins merges into one. The new edges are
a subset of the old ones, so no count lands in a wrong bin: the result is exactly the
histogram built at the final R from all the data. Only resolution is lost: R may end up
twice the stream's max |x|, so bins may be twice as wide as a one-shot histogram's, and
the searches put each value at its bin's centre (percentiles interpolate within a bin).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, ClassVar

import numpy as np

from lowbit.quantization import grid
from lowbit.quantization.scheme import QScheme, get

EVAL_CHUNK = 1 << 21  # candidates x bins evaluated at once by the MSE search (16 MB of float64)
KL_CHUNK = 256  # KL candidates evaluated at once: [256, levels + 1] arrays, whatever the bin count
KL_SMOOTHING = 1e-4  # count put in an empty Q bin under a non-empty P bin (MXNet's and TVM's eps)


class Observer:
    """Base class: splits batches into per-channel rows, tracks the running extremes, and
    turns a clip range into parameters. Subclasses add ``_update`` and ``_clip_range``."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()  # constructor options besides the scheme, for to_dict

    def __init__(self, scheme: str | dict | QScheme):
        scheme = get(scheme)
        if scheme.grid != "uniform":
            raise ValueError(f"scheme: calibration observers need a uniform grid, got {scheme.grid!r}")
        if scheme.granularity == "group":
            raise NotImplementedError("scheme: calibration observers support granularity 'tensor' and "
                                      "'channel', not 'group' (group scales are fitted to weights, not calibrated)")
        self.scheme = scheme
        self.running_min: np.ndarray | None = None  # (channels,), None until the first batch
        self.running_max: np.ndarray | None = None

    def observe(self, x: np.ndarray) -> "Observer":
        """Update the summary with one batch (any shape); returns self."""
        rows = self._rows(x)
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError("x: the batch holds NaN or infinite values")
        first = self.running_min is None
        self.running_min = lo if first else np.minimum(self.running_min, lo)
        self.running_max = hi if first else np.maximum(self.running_max, hi)
        self._update(rows, lo, hi)
        return self

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """The clip range (lo, hi), float32 arrays of ``grid.param_shape``: () or (channels,)."""
        if self.running_min is None:
            raise RuntimeError(f"{type(self).__name__}: no batch observed yet; call observe(x) first")
        lo, hi = self._clip_range()
        shape = () if self.scheme.granularity == "tensor" else self.running_min.shape
        return np.asarray(lo, np.float32).reshape(shape), np.asarray(hi, np.float32).reshape(shape)

    def qparams(self) -> grid.QParams:
        """Scale and zero point of the scheme covering ``range()`` (``grid.params_from_range``)."""
        return grid.params_from_range(*self.range(), self.scheme)

    def to_dict(self) -> dict:
        """The configuration (not the observed state) as plain data; see ``observer_from_dict``."""
        return {"observer": self.name, "scheme": self.scheme.to_dict(),
                **{option: getattr(self, option) for option in self.options}}

    def _rows(self, x: np.ndarray) -> np.ndarray:
        """The batch as [channels, values] (one row for granularity 'tensor')."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu" or x.size == 0:
            raise ValueError(f"x: expected a non-empty real array, got dtype {x.dtype}, shape {x.shape}")
        if self.scheme.granularity == "tensor":
            return x.reshape(1, -1)
        if not -x.ndim <= self.scheme.axis < x.ndim:
            raise ValueError(f"x: channel axis {self.scheme.axis} is out of range for shape {x.shape}")
        axis = self.scheme.axis % x.ndim
        if self.running_min is not None and x.shape[axis] != len(self.running_min):
            raise ValueError(f"x: expected {len(self.running_min)} channels on axis {axis}, got shape {x.shape}")
        return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)

    def _update(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Fold one batch (rows and their per-channel extremes) into the summary."""

    def _clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class MinMax(Observer):
    """``lo = min x``, ``hi = max x`` over every batch seen: no value is ever clipped."""

    name = "minmax"

    def _clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        return self.running_min, self.running_max


class MovingAverageMinMax(Observer):
    """Exponential moving averages of each batch's extremes, momentum ``m`` in [0, 1)::

        lo_1 = min x_1,  lo_t = m * lo_{t-1} + (1 - m) * min x_t     (hi likewise with max)

    As TensorFlow's ``MovingAverageQuantize`` and PyTorch's ``MovingAverageMinMaxObserver``
    (``averaging_constant = 1 - m``); ``m = 0`` keeps only the last batch.
    """

    name, options = "moving_average", ("momentum",)

    def __init__(self, scheme: str | dict | QScheme, momentum: float = 0.9):
        super().__init__(scheme)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.average_min = self.average_max = None  # (channels,) float64 after the first batch

    def _update(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        if self.average_min is None:  # the first batch initialises
            self.average_min, self.average_max = lo.astype(np.float64), hi.astype(np.float64)
        else:
            m = self.momentum
            self.average_min = m * self.average_min + (1 - m) * lo
            self.average_max = m * self.average_max + (1 - m) * hi

    def _clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        return self.average_min, self.average_max


class StreamingHistogram:
    """Counts of x per channel in ``2 * bins`` equal bins over ``[-radius, radius]``.

    Bin j covers ``[(j - bins) w, (j - bins + 1) w)`` with ``w = radius / bins``, so 0 is
    an edge and folding the two halves gives the histogram of |x| over ``[0, radius]``.
    ``radius`` only grows, by powers of two (see the module docstring).
    """

    def __init__(self, bins: int):
        if int(bins) != bins or bins < 1:
            raise ValueError(f"bins: expected a positive integer, got {bins!r}")
        self.bins = int(bins)
        self.counts: np.ndarray | None = None  # int64 [channels, 2 * bins]
        self.radius: np.ndarray | None = None  # [channels]; 0 while only zeros were seen

    @property
    def width(self) -> np.ndarray:
        return np.where(self.radius > 0, self.radius, 1.0) / self.bins

    def add(self, rows: np.ndarray, amax: np.ndarray) -> None:
        channels = len(rows)
        if self.counts is None:
            self.counts = np.zeros((channels, 2 * self.bins), np.int64)
            self.radius = np.zeros(channels)
        for c in np.flatnonzero(amax > self.radius):
            self._widen(c, float(amax[c]))
        index = np.floor(rows / self.width[:, None]).astype(np.int64)
        index += self.bins
        np.clip(index, 0, 2 * self.bins - 1, out=index)  # x = +radius lands in the last bin
        index += (np.arange(channels, dtype=np.int64) * (2 * self.bins))[:, None]
        self.counts += np.bincount(index.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def _widen(self, c: int, amax: float) -> None:
        if self.radius[c] == 0:  # only zeros so far: they stay in the bin starting at 0 for any radius
            self.radius[c] = amax
            return
        factor = 1
        while self.radius[c] * factor < amax:
            factor *= 2
        self.radius[c] *= factor
        half = self.bins
        outward_negative = self.counts[c, :half][::-1]  # ordered from 0 outwards, like the positive half
        self.counts[c, half:] = _merge_runs(self.counts[c, half:], factor)
        self.counts[c, :half] = _merge_runs(outward_negative, factor)[::-1]

    def magnitude_counts(self) -> np.ndarray:
        """Histogram of |x|: [channels, bins] over ``[0, radius]``."""
        return self.counts[:, self.bins:] + self.counts[:, :self.bins][:, ::-1]


def _merge_runs(counts: np.ndarray, factor: int) -> np.ndarray:
    """Sum runs of ``factor`` bins (counted from the start) into one, zero-padded to the same length."""
    merged = np.zeros_like(counts)
    factor = min(factor, len(counts))  # a run as long as the array gathers everything in bin 0
    runs = -(-len(counts) // factor)
    padded = np.zeros(runs * factor, counts.dtype)
    padded[: len(counts)] = counts
    merged[:runs] = padded.reshape(runs, factor).sum(axis=1)
    return merged


class _HistogramObserver(Observer):
    """An observer whose clip range is computed from a :class:`StreamingHistogram`."""

    def __init__(self, scheme: str | dict | QScheme, bins: int = 2048):
        super().__init__(scheme)
        self.histogram = StreamingHistogram(bins)
        self.bins = self.histogram.bins

    def _update(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        self.histogram.add(rows, np.maximum(-lo, hi))

    def _within_seen(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clip ranges never need to reach past the values seen."""
        return np.maximum(lo, self.running_min), np.minimum(hi, self.running_max)


class Percentile(_HistogramObserver):
    """Clip at a percentile ``p`` of the streamed values::

        symmetric:   T = quantile(|x|, p / 100),  range [-T, T]
        asymmetric:  range [quantile(x, 1 - p / 100), quantile(x, p / 100)]

    from the histogram, linearly within a bin: within a bin width (at most ``2 max|x| / bins``)
    of the value of rank ceil(q N). ``p`` in (50, 100]; 100 gives min / max. As in McKinstry
    et al., "Discovering Low-Precision Networks Close to Full-Precision Networks" (2019).
    """

    name, options = "percentile", ("percentile", "bins")

    def __init__(self, scheme: str | dict | QScheme, percentile: float = 99.99, bins: int = 2048):
        super().__init__(scheme, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        h, q = self.histogram, self.percentile / 100
        lo, hi, magnitudes = np.empty(len(h.radius)), np.empty(len(h.radius)), h.magnitude_counts()
        for c, width in enumerate(h.width):
            if self.scheme.symmetric:
                hi[c] = _histogram_quantile(magnitudes[c], 0.0, width, q)
                lo[c] = -hi[c]
            else:
                start = -h.bins * width
                lo[c] = _histogram_quantile(h.counts[c], start, width, 1 - q)
                hi[c] = _histogram_quantile(h.counts[c], start, width, q)
        return self._within_seen(lo, hi)


def _histogram_quantile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """The value below which a fraction ``q`` of the counted values lie (linear within a bin)."""
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    j = min(int(np.searchsorted(cumulative, target, side="left")), len(counts) - 1)
    before = cumulative[j - 1] if j else 0
    inside = (target - before) / counts[j] if counts[j] else 1.0
    return start + (j + inside) * width


class MSE(_HistogramObserver):
    """The clip range minimising the expected quantization MSE, estimated on the histogram::

        E(lo', hi') = sum_j n_j (c_j - dequantize(quantize(c_j)))^2 / sum_j n_j

    over bin centres ``c_j`` with counts ``n_j``, under the scheme's grid for ``[lo', hi']``:
    clipping error outside the range plus rounding error inside. Symmetric schemes search
    ``T = f max|x|`` (range [-T, T]), asymmetric ones ``lo' = a min x``, ``hi' = b max x``
    (alternating a and b); each 1-D search tries ``f = k / candidates``, then refines within
    a step of the best. As NVIDIA pytorch-quantization's MSE calibrator; Banner et al. (ACIQ,
    NeurIPS 2019) derive the same clipping / rounding trade-off analytically.
    """

    name, options = "mse", ("candidates", "bins")

    def __init__(self, scheme: str | dict | QScheme, bins: int = 2048, candidates: int = 64):
        super().__init__(scheme, bins)
        if int(candidates) != candidates or candidates < 2:
            raise ValueError(f"candidates: expected an integer of at least 2, got {candidates!r}")
        self.candidates = int(candidates)
        # Evaluated with one scale per candidate (rows), and deterministic rounding.
        self._per_candidate = self.scheme.with_(granularity="channel", axis=0, rounding="half_even")

    def _clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        h = self.histogram
        lo, hi = np.empty(len(h.radius)), np.empty(len(h.radius))
        for c in range(len(h.radius)):
            occupied = h.counts[c] > 0  # empty bins add no error: leave them out of the search
            centres = ((np.arange(2 * h.bins) - h.bins + 0.5) * h.width[c])[occupied]
            error = partial(self._expected_errors, centres, h.counts[c][occupied].astype(np.float64))
            vmin, vmax = float(self.running_min[c]), float(self.running_max[c])
            if self.scheme.symmetric:
                amax = max(-vmin, vmax)
                f = self._best_fraction(lambda f: error(-amax * f, amax * f))
                lo[c], hi[c] = -amax * f, amax * f
            else:
                a = b = 1.0
                for _ in range(2):  # the two tails interact only through the span; two rounds settle
                    a = self._best_fraction(lambda f: error(vmin * f, np.full_like(f, vmax * b)))
                    b = self._best_fraction(lambda f: error(np.full_like(f, vmin * a), vmax * f))
                lo[c], hi[c] = vmin * a, vmax * b
        return self._within_seen(lo, hi)

    def _best_fraction(self, error: Callable[[np.ndarray], np.ndarray]) -> float:
        step = 1.0 / self.candidates
        coarse = np.arange(1, self.candidates + 1) * step
        best = coarse[np.argmin(error(coarse))]
        fine = np.linspace(best - step, best + step, 2 * self.candidates + 1)
        fine = fine[(fine > 0) & (fine <= 1)]
        return float(fine[np.argmin(error(fine))])

    def _expected_errors(self, centres: np.ndarray, counts: np.ndarray, lo: np.ndarray,
                         hi: np.ndarray) -> np.ndarray:
        scheme, total = self._per_candidate, counts.sum()
        errors = np.empty(len(lo))
        chunk = max(1, EVAL_CHUNK // len(centres))
        for s in range(0, len(lo), chunk):
            params = grid.params_from_range(lo[s:s + chunk], hi[s:s + chunk], scheme)
            values = np.broadcast_to(centres, (len(params.scale), len(centres)))
            approx = grid.dequantize(grid.quantize(values, scheme, params), scheme, params, np.float64)
            errors[s:s + chunk] = ((approx - centres) ** 2) @ counts / total
        return errors


class Entropy(_HistogramObserver):
    """The |x| threshold T minimising KL(P || Q), as TensorRT calibrates (Migacz, "8-bit
    Inference with TensorRT", GTC 2017). On the histogram of |x| (``bins`` bins of width w),
    for every i from L (the number of levels) up to the last non-empty bin::

        P = hist[:i] with sum(hist[i:]) added to P[i-1]        (outliers folded in)
        Q = hist[:i] merged into L runs, each run's count spread evenly over its non-empty bins
        T = i * w for the i minimising KL(P || Q) = sum P log(P / Q)   (P, Q normalised)

    ``L = 2**(bits-1)`` (128 for int8: codes 0 .. 127 cover [0, T]). For asymmetric
    schemes on data of one sign (after a ReLU) the whole code range covers [0, T], so
    ``L = 2**bits``; on data of both signs the symmetric L is used and the range is
    ``[max(min x, -T), min(max x, T)]``, an approximation. Empty Q bins under non-empty P
    bins get a count of 1e-4 (as MXNet and TVM smooth them). Needs ``bins >= 2**bits``.
    """

    name, options = "entropy", ("bins",)

    def __init__(self, scheme: str | dict | QScheme, bins: int = 2048):
        super().__init__(scheme, bins)
        if self.bins < 2 ** self.scheme.bits:
            raise ValueError(f"bins: the KL search needs at least {2 ** self.scheme.bits} bins for "
                             f"{self.scheme.bits}-bit codes, got {bins}")

    def _clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        h = self.histogram
        magnitudes = h.magnitude_counts()
        thresholds = np.empty(len(h.radius))
        for c, width in enumerate(h.width):
            one_sign = self.running_min[c] >= 0 or self.running_max[c] <= 0
            levels = 2 ** (self.scheme.bits - (0 if one_sign and not self.scheme.symmetric else 1))
            thresholds[c] = kl_threshold(magnitudes[c], width, levels)
        return self._within_seen(-thresholds, thresholds)


def kl_threshold(hist: np.ndarray, width: float, levels: int) -> float:
    """TensorRT's entropy threshold for a histogram of |x| (see :class:`Entropy`).

    All candidates at once, from prefix sums. With p, q the unnormalised P and Q,
    ``KL = A / sum p + log(sum q / sum p)`` where ``A = sum p (log p - log q)``. Bins before
    the last take p = h, and within run g q = rc_g / ro_g (the run's count over its
    non-empty bins), so their part of A is ``sum_g (sum_run h log h - rc_g log(rc_g / ro_g))``;
    the last bin's term is then replaced by the one with the outliers folded in.
    """
    h = np.asarray(hist, np.float64)
    nonempty = np.flatnonzero(h)
    if len(nonempty) == 0:
        return 0.0
    last = int(nonempty[-1]) + 1  # thresholds past the last value would only waste levels
    if last <= levels:
        return last * width

    def prefix(values: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(values)])

    counts, occupied = prefix(h), prefix(h > 0)
    h_log_h = prefix(h * np.log(np.where(h > 0, h, 1.0)))

    def divergences(ends: np.ndarray) -> np.ndarray:  # candidate i: P and Q span bins [0, i)
        # Run g of candidate i holds bins j with floor(j L / i) = g: it starts at ceil(g i / L).
        bounds = -(-np.arange(levels + 1) * ends[:, None] // levels)
        run_count, run_occupied, run_h_log_h = (np.diff(c[bounds], axis=1) for c in (counts, occupied, h_log_h))
        per_bin = run_count / np.where(run_occupied > 0, run_occupied, 1.0)  # q in a run's non-empty bins
        safe = np.where(run_count > 0, per_bin, 1.0)
        a = np.sum(run_h_log_h - run_count * np.log(safe), axis=1)
        h_last = h[ends - 1]
        a -= np.where(h_last > 0, h_last * (np.log(np.where(h_last > 0, h_last, 1.0)) - np.log(safe[:, -1])), 0.0)
        q_last = np.where(h_last > 0, per_bin[:, -1], KL_SMOOTHING)  # outliers folded into an empty last bin
        p_last = h_last + (counts[-1] - counts[ends])
        a += p_last * (np.log(p_last) - np.log(q_last))
        total_q = counts[ends] + np.where(h_last > 0, 0.0, KL_SMOOTHING)
        return a / counts[-1] + np.log(total_q / counts[-1])

    ends = np.arange(levels, last + 1)
    kl = np.concatenate([divergences(ends[s:s + KL_CHUNK]) for s in range(0, len(ends), KL_CHUNK)])
    return int(ends[np.argmin(kl)]) * width


OBSERVERS: dict[str, type[Observer]] = {c.name: c for c in (MinMax, MovingAverageMinMax, Percentile, MSE, Entropy)}


def get_observer(name: str, scheme: str | dict | QScheme, **options) -> Observer:
    """A new observer by registry name, e.g. ``get_observer("percentile", int8(), percentile=99.9)``."""
    if name not in OBSERVERS:
        raise ValueError(f"observer: expected one of {list(OBSERVERS)}, got {name!r}")
    return OBSERVERS[name](scheme, **options)


def observer_from_dict(d: dict) -> Observer:
    """A new (empty) observer from ``Observer.to_dict()`` output."""
    d = dict(d)
    return get_observer(d.pop("observer"), QScheme.from_dict(d.pop("scheme")), **d)
