"""NCHW <-> NHWC conversion (``kernels.conv.layout``) against NumPy's transpose.

The conversions only move elements, so every result must equal NumPy's exactly.
Sizes straddle every block edge of both element sizes (side, tall, wide, panel);
surplus loads and stores are checked to stay inside the arrays, with guard pages
in a child process. The code is the same portable LLVM IR at every CPU level; one
test runs it under each ``LOWBIT_ISA``.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kernels import threads
from kernels.conv import layout
from kernels.conv.layout import nchw_to_nhwc, nhwc_to_nchw

DTYPES = (np.uint8, np.int8, np.int32, np.float32)
# below, at and past each block edge: side (16 bytes, 4 four-byte elements), wide (32, 8), tall (64, 16), panel (128, 32)
SIZES = (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200)
ROOT = Path(__file__).resolve().parents[2]


def _random(rng, shape, dtype):
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _hw(pixels: int) -> tuple[int, int]:
    """A (H, W) with H * W = ``pixels``, as square as the factors allow."""
    h = max(d for d in range(1, int(pixels**0.5) + 1) if pixels % d == 0)
    return h, pixels // h


def _nchw_shapes():
    """Every channel count by every pixel count, N cycling through 1, 2, 3."""
    for index, (c, p) in enumerate(itertools.product(SIZES, SIZES)):
        yield (1 + index % 3, c, *_hw(p))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_both_directions_match_numpy(rng, dtype):
    for shape in _nchw_shapes():
        x = _random(rng, shape, dtype)
        y = nchw_to_nhwc(x)
        np.testing.assert_array_equal(y, x.transpose(0, 2, 3, 1), err_msg=str(shape))
        assert y.flags.c_contiguous and y.dtype == x.dtype
        z = nhwc_to_nchw(y)
        np.testing.assert_array_equal(z, x, err_msg=str(shape))
        assert z.flags.c_contiguous


@pytest.mark.parametrize("dtype", (np.uint8, np.float32), ids=lambda d: np.dtype(d).name)
def test_writes_stay_inside_out(rng, dtype):
    """Blocks whose surplus stores overlap the next column must not spill past ``out``."""
    pad = 37  # also leaves ``out`` misaligned
    for shape in _nchw_shapes():
        x = _random(rng, shape, dtype)
        for convert, src, want in ((nchw_to_nhwc, x, x.transpose(0, 2, 3, 1)),
                                   (nhwc_to_nchw, np.ascontiguousarray(x.transpose(0, 2, 3, 1)), x)):
            buffer = np.full(x.size + 2 * pad, 7, dtype)
            out = buffer[pad : pad + x.size].reshape(want.shape)
            assert convert(src, out=out) is out
            np.testing.assert_array_equal(out, want, err_msg=str(shape))
            assert (buffer[:pad] == 7).all() and (buffer[pad + x.size :] == 7).all(), shape


def test_accesses_stay_inside_both_arrays():
    """Inputs and outputs that touch inaccessible pages: a load or store past either end would crash."""
    if sys.platform != "linux":
        pytest.skip("mprotect guard pages need Linux")
    script = textwrap.dedent(f"""
        import ctypes, itertools, mmap
        import numpy as np
        from kernels.conv.layout import nchw_to_nhwc, nhwc_to_nchw

        libc = ctypes.CDLL(None, use_errno=True)
        PAGE = mmap.PAGESIZE

        def guarded(nbytes, at_end):
            '''A writeable byte array of ``nbytes`` ending (or starting) at an inaccessible page.'''
            pages = -(-nbytes // PAGE) + 2
            region = mmap.mmap(-1, pages * PAGE)
            whole = np.frombuffer(region, np.uint8)
            for page in (0, pages - 1):
                assert libc.mprotect(ctypes.c_void_p(whole.ctypes.data + page * PAGE), PAGE, 0) == 0
            start = (pages - 1) * PAGE - nbytes if at_end else PAGE
            guarded.keep.append(region)
            return whole[start : start + nbytes]
        guarded.keep = []

        rng = np.random.default_rng(0)
        sizes = {SIZES!r}
        for dtype, at_end, (c, p) in itertools.product((np.uint8, np.int32), (True, False),
                                                         itertools.product(sizes, sizes)):
            shape = (2, c, 1, p)
            count = 2 * c * p
            x = guarded(count * np.dtype(dtype).itemsize, at_end).view(dtype).reshape(shape)
            x[...] = rng.integers(0, 100, shape)
            y = guarded(x.nbytes, at_end).view(dtype).reshape(2, 1, p, c)
            nchw_to_nhwc(x, out=y)
            assert np.array_equal(y, x.transpose(0, 2, 3, 1)), shape
            z = guarded(x.nbytes, not at_end).view(dtype).reshape(shape)
            nhwc_to_nchw(y, out=z)
            assert np.array_equal(z, x), shape
        print("checked")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "checked" in run.stdout, run.stderr[-2000:]


def test_non_contiguous_input(rng):
    x = _random(rng, (2, 33, 10, 17), np.uint8)
    strided = x[:, ::2, :, 1:]
    np.testing.assert_array_equal(nchw_to_nhwc(strided), strided.transpose(0, 2, 3, 1))
    fortran = np.asfortranarray(x)
    np.testing.assert_array_equal(nchw_to_nhwc(fortran), x.transpose(0, 2, 3, 1))
    nhwc = _random(rng, (2, 10, 17, 33), np.float32)
    as_nchw = nhwc.transpose(0, 3, 1, 2)  # NHWC data seen as NCHW: converting back is a plain copy
    np.testing.assert_array_equal(nchw_to_nhwc(as_nchw), nhwc)
    np.testing.assert_array_equal(nhwc_to_nchw(nhwc[:, ::3, :, ::2]), nhwc[:, ::3, :, ::2].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("dtype", (np.float64, np.uint64, np.int16, np.float16, np.bool_, np.complex64),
                         ids=lambda d: np.dtype(d).name)
def test_other_dtypes_fall_back_to_numpy(rng, dtype):
    x = (rng.standard_normal((2, 17, 5, 7)) * 10).astype(dtype)
    np.testing.assert_array_equal(nchw_to_nhwc(x), x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc_to_nchw(x), x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 5), (2, 3, 5, 0)])
def test_empty_arrays(shape):
    x = np.zeros(shape, np.uint8)
    assert nchw_to_nhwc(x).shape == (shape[0], shape[2], shape[3], shape[1])
    assert nhwc_to_nchw(x).shape == (shape[0], shape[3], shape[1], shape[2])


def test_threaded_split_matches(rng, monkeypatch):
    """Large enough for the thread pool: units are split between two threads."""
    monkeypatch.setattr(threads, "_setting", 2)
    x = _random(rng, (3, 65, 70, 60), np.float32)  # 3.3 MB
    assert x.nbytes >= layout.THREAD_BYTES
    y = nchw_to_nhwc(x)
    np.testing.assert_array_equal(y, x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc_to_nchw(y), x)
    b = _random(rng, (1, 200, 130, 130), np.uint8)  # one matrix: split by column panels
    np.testing.assert_array_equal(nchw_to_nhwc(b), b.transpose(0, 2, 3, 1))


def test_same_kernels_at_every_level(level, rng):
    """No CPU-specific code: every ``LOWBIT_ISA`` level runs (and agrees on) the same conversion."""
    for dtype in (np.uint8, np.float32):
        x = _random(rng, (2, 67, 9, 15), dtype)
        np.testing.assert_array_equal(nchw_to_nhwc(x), x.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(nhwc_to_nchw(x), x.transpose(0, 3, 1, 2))


def test_out_is_checked(rng):
    x = _random(rng, (2, 5, 3, 4), np.int8)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 4, 5\), got \(2, 5, 3, 4\)"):
        nchw_to_nhwc(x, out=np.empty((2, 5, 3, 4), np.int8))
    with pytest.raises(TypeError, match="out: expected dtype int8, got uint8"):
        nchw_to_nhwc(x, out=np.empty((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="out: expected a C-contiguous array"):
        nchw_to_nhwc(x, out=np.empty((2, 3, 4, 10), np.int8)[..., ::2])
    read_only = np.empty((2, 3, 4, 5), np.int8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        nchw_to_nhwc(x, out=read_only)
    with pytest.raises(TypeError, match="out: expected a numpy.ndarray"):
        nchw_to_nhwc(x, out=[0] * 120)
    square = _random(rng, (1, 4, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="out: must not overlap the input x"):
        nchw_to_nhwc(square, out=square.reshape(1, 2, 2, 4))
    with pytest.raises(ValueError, match="out: must not overlap the input y"):
        nhwc_to_nchw(square, out=square.reshape(1, 2, 4, 2))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray, got list"):
        nchw_to_nhwc([[[[1]]]])
    with pytest.raises(ValueError, match=r"x: expected a 4-D NCHW array, got shape \(3, 4, 5\)"):
        nchw_to_nhwc(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"y: expected a 4-D NHWC array, got shape \(1, 2, 3, 4, 5\)"):
        nhwc_to_nchw(np.zeros((1, 2, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="y: expected a numeric dtype .*, got object"):
        nhwc_to_nchw(np.zeros((1, 2, 3, 4), object))


def test_layout_plans_and_entries(rng, tmp_path, monkeypatch):
    from kernels.conv.layout import nchw_to_nhwc_plan, nhwc_to_nchw_plan
    from tests.kernels.test_int4 import check_entries

    cases = []
    for shape in [(1, 3, 5, 7), (2, 17, 20, 21), (1, 1, 4, 4), (2, 65, 1, 1)]:
        for dtype in (np.uint8, np.float32):
            x = rng.integers(-100, 100, shape).astype(dtype)
            cases += [(nchw_to_nhwc_plan(shape, dtype), x, np.ascontiguousarray(x.transpose(0, 2, 3, 1))),
                      (nhwc_to_nchw_plan(shape, dtype), x, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))]
    check_entries(cases, tmp_path, monkeypatch)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.float32], ids=str)
def test_read_only_input(rng, dtype):
    x = rng.integers(-100, 100, (2, 17, 20, 21)).astype(dtype)
    x.setflags(write=False)
    np.testing.assert_array_equal(nchw_to_nhwc(x), x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc_to_nchw(x), x.transpose(0, 3, 1, 2))
