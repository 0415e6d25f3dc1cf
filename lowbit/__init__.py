"""lowbit: run quantized neural networks on a CPU from Python, fast, with numpy + numba + llvmlite."""

from __future__ import annotations

__version__ = "0.1.0"
