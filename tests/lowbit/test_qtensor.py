"""QTensor: packing, sizes, dequantization and the file format."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import lowbit
from lowbit.io import ModelFileError
from lowbit.qtensor import QTensor
from lowbit.quantization import grid
from lowbit.quantization.scheme import PRESETS

PRESET_SCHEMES = [f() for f in PRESETS.values()] + [lowbit.int4(symmetric=False, signed=False)]


@pytest.mark.parametrize("scheme", PRESET_SCHEMES, ids=lambda s: s.name)
def test_quantize_matches_grid_and_packs(rng, scheme):
    x = rng.normal(size=(33, 257)).astype(np.float32)
    qt = lowbit.quantize(x, scheme)
    params = grid.fit(x, scheme)
    np.testing.assert_array_equal(qt.codes(), grid.quantize(x, scheme, params))
    np.testing.assert_array_equal(qt.dequantize(), grid.dequantize(qt.codes(), scheme, params))
    assert qt.data.size == scheme.qtype.nbytes(x.size)
    assert qt.nbytes == qt.data.nbytes + qt.scale.nbytes + (0 if qt.zero_point is None else qt.zero_point.nbytes)
    assert scheme.bits <= qt.bits_per_weight < scheme.bits + 1


def test_bits_per_weight_of_int4_g128():
    qt = lowbit.quantize(np.ones((4096, 4096), np.float32), lowbit.int4(group_size=128))
    assert qt.bits_per_weight == pytest.approx(4 + 32 / 128)  # codes plus one float32 scale per group


def test_calibrated_params_are_used(rng):
    x = rng.normal(size=(8, 16)).astype(np.float32)
    params = grid.QParams(np.float32(0.5), np.int32(0))
    np.testing.assert_array_equal(lowbit.quantize(x, "int8", params=params).codes(),
                                  np.clip(np.rint(x / 0.5), -128, 127))


@pytest.mark.parametrize("scheme", PRESET_SCHEMES, ids=lambda s: s.name)
def test_save_load_round_trip(tmp_path, rng, scheme):
    qt = lowbit.quantize(rng.normal(size=(5, 130)).astype(np.float32), scheme)
    path = tmp_path / "w.npz"
    qt.save(path)
    back = QTensor.load(path)
    assert back.scheme == qt.scheme and back.shape == qt.shape
    np.testing.assert_array_equal(back.data, qt.data)
    np.testing.assert_array_equal(back.dequantize(), qt.dequantize())


def _rewrite(path, **changes):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())
    for key, value in changes.items():
        if key in header:
            header[key] = value
        elif value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


def test_load_rejects_bad_files(tmp_path, rng):
    good = tmp_path / "good.npz"
    lowbit.quantize(rng.normal(size=(4, 64)).astype(np.float32), lowbit.int4(group_size=32)).save(good)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a lowbit QTensor file .*, or a damaged one"):
        QTensor.load(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a lowbit QTensor file .*, or a damaged one"):
        QTensor.load(garbage)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, header=np.array([{"format": "lowbit.qtensor"}], dtype=object))
    with pytest.raises(ModelFileError, match="holds Python objects; .*never unpickles") as refused:
        QTensor.load(pickled)  # object arrays would need unpickling: refused
    assert "allow_pickle" not in str(refused.value)

    for name, change, match in [
        ("version", dict(version=99), "format version 99; this lowbit reads 1"),
        ("format", dict(format="other"), "not a lowbit QTensor file"),
        ("shape", dict(shape=[4, 65]), "data: 260 s4 codes take 130 bytes, got 128"),
        ("scale", dict(scale=np.ones((4, 3), np.float32)), r"scale: expected shape \(4, 2\)"),
        ("missing", dict(data=None), "incomplete QTensor file"),
    ]:
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(raw)
        _rewrite(bad, **change)
        with pytest.raises(ValueError, match=match):
            QTensor.load(bad)
    assert zipfile.is_zipfile(good)


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="x: expected a float array, got dtype int64"):
        lowbit.quantize(np.arange(4), "int8")
    with pytest.raises(ValueError, match="x: expected a non-empty array"):
        lowbit.quantize(np.zeros((0, 3), np.float32), "int8")
    with pytest.raises(ValueError, match="zero_point: expected None"):
        QTensor(np.zeros(4, np.int8), np.float32(1), np.zeros((), np.int8), lowbit.int8(), (4,))
