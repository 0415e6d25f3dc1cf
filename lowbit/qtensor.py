"""Quantized tensors: packed codes, their scales and zero points, the scheme and the shape.

``quantize(x, scheme)`` fits parameters to ``x`` (or takes calibrated ones),
computes the codes and packs them in the scheme's storage format
(``kernels.qtypes``); ``QTensor.dequantize`` inverts it. ``QTensor.save`` writes
one ``.npz`` file of plain arrays with a JSON header, and ``QTensor.load`` reads
it back without unpickling anything.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from lowbit.quantization import grid
from lowbit.quantization.scheme import QScheme, get

FORMAT = "lowbit.qtensor"
VERSION = 1


class QTensor:
    """A quantized tensor.

    Attributes
    ----------
    data : uint8 / int8 [nbytes], the packed codes in C order (``scheme.qtype``)
    scale : float32 array of ``grid.param_shape(shape, scheme)``
    zero_point : int8 / uint8 array of the same shape for asymmetric uniform grids, else
        None (symmetric grids' zero points follow from the scheme)
    scheme : the QScheme
    shape : the logical shape
    """

    __slots__ = ("data", "scale", "zero_point", "scheme", "shape")

    def __init__(self, data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, scheme: QScheme,
                 shape: tuple[int, ...]):
        shape = tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        want = scheme.qtype.nbytes(size)
        if np.asarray(data).size != want:
            raise ValueError(f"data: {size} {scheme.qtype.name} codes take {want} bytes, got {np.asarray(data).size}")
        pshape = grid.param_shape(shape, scheme)
        if np.shape(scale) != pshape:
            raise ValueError(f"scale: expected shape {pshape} for {shape} under {scheme.name}, got {np.shape(scale)}")
        stored = scheme.grid == "uniform" and not scheme.symmetric
        if (zero_point is None) == stored or (zero_point is not None and np.shape(zero_point) != pshape):
            raise ValueError(f"zero_point: expected {'shape ' + str(pshape) if stored else None} for "
                             f"{scheme.name}, got {None if zero_point is None else np.shape(zero_point)}")
        self.data = np.asarray(data).reshape(-1)
        self.scale = np.asarray(scale, np.float32)
        self.zero_point = None if zero_point is None else np.asarray(zero_point, np.int8 if scheme.signed else np.uint8)
        self.scheme = scheme
        self.shape = shape

    @classmethod
    def from_codes(cls, codes: np.ndarray, scheme: QScheme, params: grid.QParams) -> "QTensor":
        """Pack integer ``codes`` (any shape) with the parameters that produced them.

        Zero points are kept only for asymmetric uniform grids; the others follow
        from the scheme.
        """
        codes = np.asarray(codes)
        zero = params.zero_point if scheme.grid == "uniform" and not scheme.symmetric else None
        return cls(scheme.qtype.pack(codes.astype(scheme.qtype.dtype)), params.scale, zero, scheme, codes.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def params(self) -> grid.QParams:
        """Scales and zero points as ``lowbit.quantization.grid`` takes them."""
        zero = self.zero_point
        if zero is None and self.scheme.grid == "uniform":  # symmetric: the scheme's fixed zero point
            zero = grid.params_from_range(np.zeros(self.scale.shape), np.ones(self.scale.shape), self.scheme).zero_point
        return grid.QParams(self.scale, None if zero is None else zero.astype(np.int32))

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points together."""
        return self.data.nbytes + self.scale.nbytes + (0 if self.zero_point is None else self.zero_point.nbytes)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per element, scales and zero points included."""
        return 8 * self.nbytes / max(1, self.size)

    def codes(self) -> np.ndarray:
        """The integer codes, unpacked, in the logical shape."""
        return self.scheme.qtype.unpack(self.data, self.size).reshape(self.shape)

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        """The values the codes stand for (see ``lowbit.quantization.grid.dequantize``)."""
        return grid.dequantize(self.codes(), self.scheme, self.params, dtype)

    def __repr__(self) -> str:
        return (f"QTensor(shape={self.shape}, scheme={self.scheme.name}, nbytes={self.nbytes}, "
                f"bits_per_weight={self.bits_per_weight:.3f})")

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (an ``.npz``): the arrays, and a JSON header with format, version, scheme, shape."""
        header = {"format": FORMAT, "version": VERSION, "scheme": self.scheme.to_dict(), "shape": list(self.shape)}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8), "data": self.data,
                  "scale": self.scale}
        if self.zero_point is not None:
            arrays["zero_point"] = self.zero_point
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QTensor":
        """Read a file written by :meth:`save`; never unpickles.

        Raises ValueError for a file that is not one, an unknown version, or
        arrays inconsistent with the header.
        """
        from lowbit.io import LIMITS, ModelFileError, _why, read_member

        where = os.fspath(path)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if sum(info.file_size for info in archive.infolist()) > LIMITS["total"]:
                    raise ModelFileError(f"{where}: the members declare more than LIMITS['total'] = "
                                         f"{LIMITS['total']} bytes (lowbit.io.LIMITS)")
                arrays = {n.removesuffix(".npy"): np.load(io.BytesIO(read_member(archive, n, LIMITS["total"], where)),
                                                          allow_pickle=False) for n in names}
            header = json.loads(arrays.pop("header").tobytes())
        except ModelFileError:
            raise
        except (zipfile.BadZipFile, ValueError, KeyError, EOFError, UnicodeDecodeError, RecursionError) as e:
            raise ModelFileError(f"{where}: not a lowbit QTensor file (an .npz written by QTensor.save), or a "
                                 f"damaged one ({type(e).__name__}: {_why(e)})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ModelFileError(f"{where}: not a lowbit QTensor file")
        if header.get("version") != VERSION:
            raise ModelFileError(f"{where}: QTensor format version {header.get('version')!r}; this lowbit reads "
                                 f"{VERSION}")
        try:
            return cls(arrays["data"], arrays["scale"], arrays.get("zero_point"), QScheme.from_dict(header["scheme"]),
                       tuple(header["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{where}: incomplete QTensor file ({e!r} missing or malformed)") from None


def quantize(x: np.ndarray, scheme: str | dict | QScheme = "int8", *, params: grid.QParams | None = None,
             rng: np.random.Generator | None = None) -> QTensor:
    """Quantize ``x`` under ``scheme`` (a QScheme, a preset name or a dict).

    ``params`` (from a calibration observer) replaces fitting to ``x`` itself; ``rng``
    drives stochastic rounding.
    """
    scheme = get(scheme)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x: expected a float array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"x: expected a non-empty array, got shape {x.shape}")
    if params is None:
        params = grid.fit(x, scheme)
    return QTensor.from_codes(grid.quantize(x, scheme, params, rng), scheme, params)
