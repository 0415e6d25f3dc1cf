"""Packed weights are read-only: compiled kernels index their arrays by their fields through raw pointers, so an
edited field would read or write outside the arrays. Each way the audit found to edit one is refused."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from lowbit.quantization.scheme import NF4


def _packed(rng):
    w8 = rng.integers(-127, 128, (64, 64), dtype=np.int8)
    wf = rng.standard_normal((64, 64)).astype(np.float32)
    filters = rng.integers(-127, 128, (8, 4, 3, 3), dtype=np.int8)
    return {
        "pack_int8": (kernels.pack_int8(w8), ("data", "n", "k", "col_sums", "plans")),
        "pack_int4": (kernels.pack_int4(wf, 32), ("data", "n", "k", "group_size", "scales", "panel_scales")),
        "pack_ternary": (kernels.pack_ternary(wf), ("data", "n", "k", "scales")),
        "pack_codebook_weights": (kernels.pack_codebook_weights(wf, NF4, 32), ("data", "n", "k", "group_size")),
        "pack_conv_int8": (kernels.pack_conv_int8(filters), ("groups", "weights", "group")),
        "pack_conv_int4": (kernels.pack_conv_int4(filters.astype(np.float32), group_size=32),
                           ("groups", "shape", "group")),
    }


@pytest.mark.parametrize("name", list(_packed(np.random.default_rng(0))))
def test_packed_fields_cannot_be_reassigned_or_deleted(rng, name):
    packed, fields = _packed(rng)[name]
    for field in fields:
        with pytest.raises(AttributeError, match=f"{field} is read-only: .*pack new weights instead"):
            setattr(packed, field, getattr(packed, field))
        with pytest.raises(AttributeError, match=f"{field} cannot be deleted"):
            delattr(packed, field)


def test_the_audits_reproducers_get_clear_errors(rng):
    w = rng.integers(-127, 128, (64, 64), dtype=np.int8)
    packed = kernels.pack_int8(w)
    with pytest.raises(AttributeError, match="PackedInt8.k is read-only"):
        packed.k = 1 << 20
    with pytest.raises(AttributeError, match="PackedInt8.data is read-only"):
        packed.data = packed.data[:10]
    conv = kernels.pack_conv_int8(rng.integers(-127, 128, (8, 4, 3, 3), dtype=np.int8))
    with pytest.raises(AttributeError, match="PackedConvInt8.groups is read-only"):
        conv.groups = ()
    signs = rng.choice(np.array([-1, 1], np.int8), (8, 64, 3, 3))
    x_bits = kernels.pack_bits(rng.choice(np.array([-1, 1], np.int8), (1, 6, 6, 64)), axis=-1)
    binary = kernels.pack_conv_binary(signs)
    for edited in (binary._replace(kernel_hw=(5, 5)), binary._replace(out_channels=200),
                   binary._replace(lanes=binary.lanes[:8]), binary._replace(tap_sums=binary.tap_sums[:1]),
                   binary._replace(in_channels=64, tap_words=2)):
        with pytest.raises(ValueError, match="w: packed binary weights whose fields do not match their arrays"):
            kernels.conv2d_binary(x_bits, edited, in_channels=64)
    assert kernels.conv2d_binary(x_bits, binary, in_channels=64, pads="same").shape == (1, 6, 6, 8)
