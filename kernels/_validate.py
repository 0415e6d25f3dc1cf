"""Argument checks run before any compiled code sees an array.

Compiled kernels index raw memory without bounds checks, so every public entry
point validates type, dtype, rank, shape and contiguity here first and raises an
error that names the argument, what was expected and what was given.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def _names(dtypes: Iterable[np.dtype]) -> str:
    return " or ".join(str(np.dtype(d)) for d in dtypes)


def array(name: str, x: object, dtypes: Iterable[type | np.dtype], ndim: int) -> np.ndarray:
    """Check that ``x`` is a C-contiguous ``ndim``-D ndarray of one of ``dtypes``."""
    if isinstance(x, np.ndarray) and x.dtype in dtypes and x.ndim == ndim and x.flags.c_contiguous:
        return x  # the common case, checked once
    dtypes = tuple(np.dtype(d) for d in dtypes)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of {_names(dtypes)}, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array; pass numpy.ascontiguousarray({name})")
    return x


def float32_input(name: str, x: object, shape: tuple[int, ...]) -> np.ndarray:
    """A prepared float32 input: ``x`` of exactly ``shape``, returned C-contiguous (a strided one copied once)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"{name}: expected a float32 numpy.ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (as prepared), got {x.shape}")
    return np.ascontiguousarray(x)


def out(x: object, shape: tuple[int, ...], dtype: np.dtype, /, **reads: np.ndarray) -> np.ndarray:
    """Check a caller's ``out=`` array: exact shape and dtype, C-contiguous, writeable, and overlapping none of the
    input arrays ``reads`` (by name, see :func:`disjoint`)."""
    x = array("out", x, (dtype,), len(shape))
    if x.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {x.shape}")
    if not x.flags.writeable:
        raise ValueError("out: the array is read-only")
    for name, read in reads.items():
        disjoint(x, name, read)
    return x


def disjoint(out: np.ndarray, name: str, x: np.ndarray) -> None:
    """Raise ValueError when ``out`` overlaps the input ``x`` (called ``name``): kernels write their output while
    still reading their inputs. Cheap bounds first (``may_share_memory``), the exact test only when they meet."""
    if np.may_share_memory(out, x) and np.shares_memory(out, x):
        raise ValueError(f"out: must not overlap the input {name}; pass a separate array")


def per_channel(name: str, x: object, n: int, dtype: type | np.dtype) -> np.ndarray:
    """A scalar or a length-``n`` vector, returned as a contiguous ``[n]`` array of ``dtype``.

    Integer targets accept only integer input: a float zero point is a mistake, not
    something to round silently.
    """
    v = np.asarray(x)
    if v.dtype.kind not in "biuf" or (np.dtype(dtype).kind in "iu" and v.dtype.kind == "f"):
        raise TypeError(f"{name}: expected {'an integer' if np.dtype(dtype).kind in 'iu' else 'a real'} "
                        f"scalar or [{n}] array, got dtype {v.dtype}")
    if v.ndim == 1 and v.shape[0] == 1:
        v = v.reshape(())
    if v.ndim == 0:
        return np.full(n, v, dtype=dtype)
    if v.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or shape ({n},), got shape {v.shape}")
    return np.ascontiguousarray(v, dtype=dtype)


def integer_in(name: str, x: object, lo: int, hi: int) -> None:
    """Check that every value of ``x`` lies in ``[lo, hi]``."""
    v = np.asarray(x)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"{name}: values must lie in [{lo}, {hi}], got range [{v.min()}, {v.max()}]")
