"""Error metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lowbit
from lowbit.quantization import metrics


def test_known_values():
    r = np.array([3.0, 4.0])
    a = np.array([3.0, 3.0])
    got = lowbit.compare(r, a)
    assert got["mse"] == 0.5
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(12.5 / 0.5))
    assert got["cosine"] == pytest.approx(21 / (5 * math.sqrt(18)))
    assert got["max_abs"] == 1.0
    assert got["relative"] == pytest.approx(1 / 5)


def test_exact_and_zero_cases():
    r = np.arange(5.0)
    assert metrics.sqnr_db(r, r) == math.inf and metrics.mse(r, r) == 0
    z = np.zeros(3)
    assert metrics.cosine(z, z) == 1.0 and metrics.relative(z, z) == 0.0


def test_report_lists_every_tensor():
    r = np.linspace(-1, 1, 100)
    table = lowbit.report({"w1": (r, r + 0.01), "w2": (r, r)})
    lines = table.splitlines()
    assert lines[0].split() == ["tensor", *metrics.METRICS]
    assert [line.split()[0] for line in lines[2:]] == ["w1", "w2"]


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"approx: expected the reference's shape \(3,\), got \(4,\)"):
        metrics.mse(np.zeros(3), np.zeros(4))
