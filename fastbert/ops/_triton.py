"""What the ops' Triton paths share: the lazy kernel import and the Philox dropout seed.

Nothing here imports triton at import time; :func:`kernel_module` does, the first time a Triton path
runs, so ``import fastbert`` stays free of triton and CUDA.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from fastbert.kernels.limits import SEED_LIMIT  # triton-free



def kernel_module(name: str) -> ModuleType:
    """``fastbert.kernels.<name>``, imported on first use (this is what imports triton).

    Callers look launchers up on the returned module at every call, so tests can monkeypatch them.
    """
    return importlib.import_module(f"fastbert.kernels.{name}")


def philox_seed() -> int:
    """A fresh seed for a kernel's Philox dropout, drawn from torch's default CPU generator.

    The CPU generator means no device sync, and ``torch.manual_seed`` reproduces the run. A kernel
    derives each element's random number from (seed, element position), so its backward regenerates
    the same mask from the same seed instead of storing it.
    """
    return int(torch.randint(0, SEED_LIMIT, (1,), dtype=torch.int64).item())
