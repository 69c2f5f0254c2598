"""Which implementation runs an op: the Triton kernels or the torch reference.

``FASTBERT_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``:

* ``auto``   — Triton for CUDA tensors when triton is installed and the op has a kernel that supports
  the input; the torch reference otherwise.
* ``triton`` — always Triton; an error if it cannot run (no CUDA tensor and no ``TRITON_INTERPRET=1``,
  triton not installed, or an op without a kernel).
* ``torch``  — always the torch reference.

``TRITON_INTERPRET=1`` (set before triton is imported) runs the kernels on the CPU, for tests.
Nothing here imports triton or touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import torch

from fastbert.kernels.limits import interpreter_enabled  # triton-free

BACKENDS = ("auto", "triton", "torch")

_override = threading.local()


class BackendUnavailableError(RuntimeError):
    """The Triton path was asked for explicitly but cannot run here."""


def current() -> str:
    """The selected backend name: an active :func:`use` block, else ``FASTBERT_BACKEND``, else auto."""
    name = getattr(_override, "name", None)
    if name is None:
        name = os.environ.get("FASTBERT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTBERT_BACKEND must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Select a backend for the calls inside this block (this thread only)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


_triton_found: bool | None = None


def triton_installed() -> bool:
    # A plain module-level cache (not functools.lru_cache, which torch.compile's tracer warns about).
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def triton_can_run_on(tensor: torch.Tensor) -> bool:
    """Can a Triton kernel take this tensor at all (CUDA, or CPU under the interpreter)?"""
    if not triton_installed():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())


def use_triton(op: str, tensor: torch.Tensor, *, supported: bool = True, unsupported_reason: str = "") -> bool:
    """Decide whether ``op`` (an op with a Triton kernel) runs that kernel on ``tensor``.

    ``supported``: this particular input is within the kernel's limits (``unsupported_reason`` says why not). Under ``auto`` an unsupported
    input quietly takes the torch path; under ``triton`` it is an error naming the reason.
    """
    name = current()
    if name == "torch":
        return False
    if name == "auto":
        # Auto never uses the interpreter: it is a test tool, far too slow for real work.
        return supported and tensor.is_cuda and triton_installed()
    if not triton_installed():
        raise BackendUnavailableError("FASTBERT_BACKEND=triton, but triton is not installed (pip install triton)")
    if not triton_can_run_on(tensor):
        raise BackendUnavailableError(
            f"FASTBERT_BACKEND=triton, but {op!r} got a {tensor.device.type} tensor: Triton needs CUDA "
            "tensors, or TRITON_INTERPRET=1 (set before triton is imported) to run on the CPU"
        )
    if not supported:
        raise ValueError(f"{op}: the Triton kernel does not support this input: {unsupported_reason}")
    return True
