"""Optional dependencies: import one, or say which of lowbit's extras installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """``module`` imported, or an ImportError saying that ``needed_by`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"{needed_by} needs {module.partition('.')[0]}: pip install 'lowbit[{extra}]'") from error
