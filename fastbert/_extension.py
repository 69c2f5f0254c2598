"""Lazy access to the C++ extension ``fastbert._C`` (built from ``csrc/`` at install time)."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

BUILD_HINT = (
    "fastbert._C (the C++ extension in csrc/) is not built. Build it from the repository root with "
    "`pip install --no-build-isolation -e .` (torch must be installed first; a C++ compiler and ninja "
    "are needed)."
)


class ExtensionNotBuiltError(ImportError):
    """The C++ extension is missing; the message says how to build it."""


@functools.lru_cache(maxsize=None)
def _import() -> ModuleType | None:
    import torch  # noqa: F401  (loads libtorch, which the extension links against)

    try:
        return importlib.import_module("fastbert._C")
    except ImportError:
        return None


def is_available() -> bool:
    """True when ``fastbert._C`` is built and importable."""
    return _import() is not None


def load() -> ModuleType:
    """Return ``fastbert._C`` or raise :class:`ExtensionNotBuiltError` saying how to build it."""
    module = _import()
    if module is None:
        raise ExtensionNotBuiltError(BUILD_HINT)
    return module
