"""Calibration observers: streaming ranges, histogram searches, bounded memory, errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from lowbit.quantization import calibration, grid, metrics
from lowbit.quantization.calibration import (OBSERVERS, MinMax, MovingAverageMinMax, Percentile, StreamingHistogram,
                                             get_observer, observer_from_dict)
from lowbit.quantization.scheme import QScheme, int4, int8, ternary

HISTOGRAM_OBSERVERS = ("percentile", "mse", "entropy")
UINT8 = int8(signed=False, symmetric=False)


def stream(observer, batches):
    for batch in batches:
        observer.observe(batch)
    return observer


def quantization_mse(x, scheme, params):
    return metrics.mse(x, grid.dequantize(grid.quantize(x, scheme, params), scheme, params))


@pytest.fixture
def heavy(rng):
    """Heavy-tailed activations: Student-t with 3 degrees of freedom."""
    return rng.standard_t(3, 200_000).astype(np.float32)


def test_minmax_is_global_extremes(rng):
    batches = [rng.normal(i, 1 + i, size=(16, 7)) for i in range(10)]
    lo, hi = stream(MinMax(int8()), batches).range()
    assert lo.shape == hi.shape == ()
    everything = np.concatenate([b.ravel() for b in batches])
    assert lo == np.float32(everything.min()) and hi == np.float32(everything.max())


def test_minmax_qparams_match_fit(rng):
    x = rng.normal(size=(64, 32)).astype(np.float32)
    for scheme in (int8(), UINT8):
        got, want = MinMax(scheme).observe(x).qparams(), grid.fit(x, scheme)
        np.testing.assert_array_equal(got.scale, want.scale)
        np.testing.assert_array_equal(got.zero_point, want.zero_point)


def test_moving_average_formula(rng):
    batches = [rng.normal(size=100) * (i + 1) for i in range(5)]
    m = 0.8
    lo, hi = batches[0].min(), batches[0].max()
    for b in batches[1:]:
        lo, hi = m * lo + (1 - m) * b.min(), m * hi + (1 - m) * b.max()
    got = stream(MovingAverageMinMax(int8(), momentum=m), batches).range()
    np.testing.assert_allclose(got, (lo, hi), rtol=1e-6)


def test_moving_average_momentum_zero_keeps_last_batch(rng):
    batches = [rng.normal(size=50) for _ in range(3)]
    lo, hi = stream(MovingAverageMinMax(int8(), momentum=0.0), batches).range()
    assert (lo, hi) == (np.float32(batches[-1].min()), np.float32(batches[-1].max()))


# The estimate lies in the bin of the order statistic of rank ceil(q N), numpy's "inverted_cdf"
# percentile; the default (linear) one interpolates between neighbours, which in a sparse tail
# may lie bins apart.


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_symmetric_close_to_numpy(heavy, p):
    observer = stream(Percentile(int8(), percentile=p), np.split(heavy, 20))
    bin_width = observer.histogram.width[0]
    lo, hi = observer.range()
    assert abs(hi - np.percentile(np.abs(heavy), p, method="inverted_cdf")) <= bin_width
    assert hi == pytest.approx(np.percentile(np.abs(heavy), p), rel=0.02)
    assert lo == -hi


def test_percentile_asymmetric_tails_close_to_numpy(rng):
    x = rng.gamma(2.0, 1.0, 100_000) - 1.0  # skewed: a short left tail, a long right one
    observer = stream(Percentile(UINT8, percentile=99.9), np.split(x, 10))
    lo, hi = observer.range()
    bin_width = observer.histogram.width[0]
    assert abs(lo - np.percentile(x, 0.1, method="inverted_cdf")) <= bin_width
    assert abs(hi - np.percentile(x, 99.9, method="inverted_cdf")) <= bin_width


def test_percentile_100_is_minmax(rng):
    x = rng.normal(size=1000)
    everything = Percentile(UINT8, percentile=100).observe(x).range()
    np.testing.assert_array_equal(everything, MinMax(UINT8).observe(x).range())


def test_per_channel_features_axis(rng):
    scales = np.array([0.1, 1.0, 10.0, 3.0])
    batches = [rng.normal(size=(256, 4)) * scales for _ in range(8)]
    everything = np.concatenate(batches)
    scheme = int8(granularity="channel", axis=1)
    lo, hi = stream(MinMax(scheme), batches).range()
    assert lo.shape == hi.shape == (4,) == grid.param_shape(everything.shape, scheme)
    np.testing.assert_array_equal(lo, everything.min(0).astype(np.float32))
    np.testing.assert_array_equal(hi, everything.max(0).astype(np.float32))
    observer = stream(Percentile(scheme, percentile=99.0), batches)
    _, hi = observer.range()
    exact = np.percentile(np.abs(everything), 99.0, axis=0, method="inverted_cdf")
    np.testing.assert_array_less(np.abs(hi - exact), observer.histogram.width * (1 + 1e-9))


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_per_channel_nchw_matches_per_tensor_on_each_channel(rng, name):
    batches = [rng.standard_t(3, size=(4, 3, 5, 5)) * np.array([1.0, 5.0, 0.2])[:, None, None] for _ in range(6)]
    per_channel = stream(get_observer(name, int8(granularity="channel", axis=1)), batches)
    lo, hi = per_channel.range()
    params = per_channel.qparams()
    assert lo.shape == hi.shape == params.scale.shape == params.zero_point.shape == (3,)
    for c in range(3):
        alone = stream(get_observer(name, int8()), [b[:, c] for b in batches])
        np.testing.assert_allclose((lo[c], hi[c]), alone.range(), rtol=1e-6)


INT4 = QScheme(4, name="int4")


@pytest.mark.parametrize("name, scheme, size", [
    ("mse", int8(), 200_000), ("mse", UINT8, 200_000), ("mse", INT4, 200_000), ("entropy", INT4, 200_000),
    # KL matches distributions rather than minimising MSE, and clips hard (T ~ 20 here): with
    # int8's fine steps it beats MinMax only once the sample's max is extreme (~150 at 1M
    # values; at 200k MinMax usually wins).
    ("entropy", int8(), 1_000_000),
])
def test_clipping_beats_minmax_on_heavy_tails(rng, name, scheme, size):
    data = rng.standard_t(3, size).astype(np.float32)
    batches = np.split(data, 20)
    minmax = quantization_mse(data, scheme, stream(MinMax(scheme), batches).qparams())
    clipped = quantization_mse(data, scheme, stream(get_observer(name, scheme), batches).qparams())
    assert clipped < 0.8 * minmax


def test_mse_is_near_the_best_clip_on_the_data(heavy):
    """The histogram estimate picks a clip whose true MSE is within 2% of a fine search on the data."""
    scheme = int8()
    chosen = quantization_mse(heavy, scheme, stream(calibration.MSE(scheme), np.split(heavy, 10)).qparams())
    amax = np.abs(heavy).max()
    best = min(quantization_mse(heavy, scheme, grid.params_from_range(-t, t, scheme))
               for t in np.linspace(0.01, 1, 200) * amax)
    assert chosen <= 1.02 * best


def kl_threshold_loop(hist, width, levels):
    """TensorRT's steps as written (Migacz 2017), one candidate at a time: the oracle."""
    hist = np.asarray(hist, np.float64)
    last = np.flatnonzero(hist)[-1] + 1
    divergences = {}
    for i in range(levels, last + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        run = np.arange(i) * levels // i  # bin j joins run floor(j L / i)
        q = np.zeros(i)
        for g in range(levels):
            members = (run == g) & (hist[:i] > 0)
            q[members] = hist[:i][run == g].sum() / max(members.sum(), 1)
        q[(q == 0) & (p > 0)] = calibration.KL_SMOOTHING
        p, q = p / p.sum(), q / q.sum()
        divergences[i] = np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0]))
    return min(divergences, key=divergences.get) * width


@pytest.mark.parametrize("levels", [8, 16])
def test_kl_threshold_matches_the_plain_algorithm(rng, levels):
    for sample in (np.abs(rng.standard_t(3, 5000)), np.maximum(rng.normal(size=5000), 0), rng.exponential(size=300)):
        hist, _ = np.histogram(sample, bins=100, range=(0, sample.max()))
        assert calibration.kl_threshold(hist, 0.5, levels) == kl_threshold_loop(hist, 0.5, levels)


def test_kl_threshold_keeps_uniform_data_whole():
    """Nothing to gain from clipping a uniform distribution: the threshold is its end."""
    hist = np.zeros(2048)
    hist[:1000] = 50
    assert calibration.kl_threshold(hist, 0.5, 128) == pytest.approx(500.0)


@pytest.mark.parametrize("name", ["minmax", *HISTOGRAM_OBSERVERS])
def test_streaming_matches_one_batch(rng, name):
    """Extremes are exact; histogram ranges agree within the resolution that widening costs."""
    data = rng.standard_t(3, 100_000)
    one = get_observer(name, int8()).observe(data)
    many = stream(get_observer(name, int8()), np.split(data, 100))
    if name == "minmax":
        np.testing.assert_array_equal(many.range(), one.range())
    elif name == "entropy":  # KL's threshold moves with the bin width, which widening may double
        np.testing.assert_allclose(many.range(), one.range(), rtol=0.25)
    else:
        np.testing.assert_allclose(many.range(), one.range(), rtol=0.05)
        streamed, at_once = (quantization_mse(data, int8(), o.qparams()) for o in (many, one))
        assert streamed <= 1.02 * at_once


def test_histogram_rebinning_is_exact(rng):
    """Widening by powers of two merges bins without moving any count: streaming with a
    growing range gives the histogram built directly at the final range."""
    batches = [rng.normal(size=(2, 500)) * 4.0 ** i for i in range(4)]
    streamed = StreamingHistogram(64)
    for b in batches:
        streamed.add(b, np.abs(b).max(axis=1))
    assert (streamed.radius > np.abs(batches[-1]).max(axis=1) / 2).all()  # widened, by powers of two
    direct = StreamingHistogram(64)
    direct.counts, direct.radius = np.zeros_like(streamed.counts), streamed.radius.copy()
    everything = np.concatenate(batches, axis=1)
    direct.add(everything, np.abs(everything).max(axis=1))
    assert streamed.counts.sum() == everything.size
    # Equal but for values within rounding of an edge: x / w and x / (w 2**k) may floor apart.
    assert np.abs(direct.counts - streamed.counts).sum() <= 1e-3 * everything.size


def test_histogram_starts_from_zeros(rng):
    observer = Percentile(int8(), percentile=100).observe(np.zeros(10)).observe(rng.normal(size=1000))
    assert observer.histogram.counts.sum() == 1010
    assert observer.range()[1] > 0


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_memory_is_bounded(name):
    """200 batches of 100k float64 values (160 MB) are observed with a few MB at most."""
    rng = np.random.default_rng(3)
    observer = get_observer(name, int8())
    batches, size = 200, 100_000
    tracemalloc.start()
    try:
        for _ in range(batches):
            observer.observe(rng.standard_t(3, size))  # made inside the loop, so nothing keeps it
        observer.qparams()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = batches * size * 8
    assert peak < total / 20


def test_registry_and_dict_round_trip():
    for name, cls in OBSERVERS.items():
        observer = get_observer(name, int8(granularity="channel", axis=1))
        assert type(observer) is cls and observer.name == name
        again = observer_from_dict(observer.to_dict())
        assert type(again) is cls and again.to_dict() == observer.to_dict()
    assert get_observer("percentile", "int8", percentile=99.0).to_dict()["percentile"] == 99.0


def test_get_observer_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="observer: expected one of .*'minmax'.*'entropy'"):
        get_observer("max", int8())


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_errors_scheme_grid_and_granularity(name):
    with pytest.raises(ValueError, match="scheme: .*uniform grid"):
        get_observer(name, ternary())
    with pytest.raises(NotImplementedError, match="scheme: .*'group'"):
        get_observer(name, int4(group_size=32))


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_errors_before_any_batch(name):
    observer = get_observer(name, int8())
    with pytest.raises(RuntimeError, match="no batch observed yet"):
        observer.qparams()
    with pytest.raises(RuntimeError, match="no batch observed yet"):
        observer.range()


@pytest.mark.parametrize("percentile", [50, 0, -1, 100.5, 1000])
def test_errors_bad_percentile(percentile):
    with pytest.raises(ValueError, match="percentile: expected a value in"):
        Percentile(int8(), percentile=percentile)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_errors_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum: expected a value in"):
        MovingAverageMinMax(int8(), momentum=momentum)


def test_errors_bad_batches():
    observer = MinMax(int8(granularity="channel", axis=1)).observe(np.ones((2, 3)))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        observer.observe(np.ones((2, 4)))
    with pytest.raises(ValueError, match="x: channel axis 1 is out of range"):
        observer.observe(np.ones(3))
    with pytest.raises(ValueError, match="x: .*NaN or infinite"):
        MinMax(int8()).observe(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="x: expected a non-empty real array"):
        MinMax(int8()).observe(np.zeros(0))
    with pytest.raises(ValueError, match="bins: "):
        get_observer("entropy", int8(), bins=128)
    with pytest.raises(ValueError, match="bins: "):
        Percentile(int8(), bins=0)
    with pytest.raises(ValueError, match="candidates: "):
        get_observer("mse", int8(), candidates=1)


def test_observers_accept_any_uniform_scheme_form():
    assert MinMax("int8").scheme == int8()
    assert MinMax(int8().to_dict()).scheme == int8()
    assert isinstance(MinMax(QScheme(bits=4)).observe(np.arange(5.0)).qparams(), grid.QParams)
