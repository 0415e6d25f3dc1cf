"""The quant type table: ranges, storage round trips and golden bytes, row by row."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels.pack import subbyte
from kernels.qtypes import QTYPES

ROWS = list(QTYPES.values())
GOLDEN = {  # codes -> storage bytes, written out by hand from the layout in kernels.pack.subbyte
    "s4": ([1, -1, 7, -8, 3], [0xF1, 0x87, 0x03]),
    "u4": ([1, 15, 0, 9], [0xF1, 0x90]),
    "s2": ([1, -1, -2, 0, 1], [0b00101101, 0b01]),
    "u2": ([3, 0, 1, 2], [0b10010011]),
    "t2": ([1, -1, 0, 0, -1], [0b00001101, 0b11]),
    "b1": ([1, -1, -1, 1, 1, 1, 1, 1, -1], [0b00000110, 0b1]),
    "s8": ([-128, 127], [-128, 127]),
    "u8": ([0, 255], [0, 255]),
}


def test_every_row_has_golden_bytes():
    assert set(GOLDEN) == set(QTYPES)


@pytest.mark.parametrize("qt", ROWS, ids=lambda q: q.name)
def test_golden_bytes(qt):
    codes, stored = GOLDEN[qt.name]
    data = qt.pack(np.array(codes, qt.dtype))
    np.testing.assert_array_equal(data.astype(np.int64), stored)
    assert data.size == qt.nbytes(len(codes))
    np.testing.assert_array_equal(qt.unpack(data, len(codes)), codes)


@pytest.mark.parametrize("qt", ROWS, ids=lambda q: q.name)
@given(data=st.data())
def test_round_trip(qt, data):
    n = data.draw(st.integers(1, 200))
    values = [v for v in range(qt.qmin, qt.qmax + 1) if not (qt.name == "b1" and v == 0)]
    codes = np.array(data.draw(st.lists(st.sampled_from(values), min_size=n, max_size=n)), qt.dtype)
    stored = qt.pack(codes.reshape(-1, 1) if n % 2 else codes)  # any shape packs in C order
    np.testing.assert_array_equal(qt.unpack(stored, n), codes)


@pytest.mark.parametrize("bits", subbyte.WIDTHS)
def test_padding_fields_are_zero(bits):
    data = subbyte.pack(np.full(1, -1, np.int8), bits)
    assert data.size == 1 and data[0] == (1 << bits) - 1


def test_ranges():
    assert [(q.name, q.qmin, q.qmax, q.elems_per_byte) for q in ROWS] == [
        ("s8", -128, 127, 1), ("u8", 0, 255, 1), ("s4", -8, 7, 2), ("u4", 0, 15, 2),
        ("s2", -2, 1, 4), ("u2", 0, 3, 4), ("t2", -1, 1, 4), ("b1", -1, 1, 8)]


def test_bad_width_and_short_data():
    with pytest.raises(ValueError, match="bits: expected one of"):
        subbyte.pack(np.zeros(3, np.int8), 3)
    with pytest.raises(ValueError, match="data: 9 values of 4 bits need 5 bytes, got 4"):
        subbyte.unpack(np.zeros(4, np.uint8), 4, 9, signed=False)
