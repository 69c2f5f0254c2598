"""Shared input checks: each raises an error that names the argument and what was expected."""
from __future__ import annotations

import math
import os
from typing import Any

import torch


class DtypeError(TypeError, ValueError):
    """A tensor has the wrong dtype. A TypeError, and a ValueError for callers that catch bad input."""


def is_int(value: Any) -> bool:
    """A Python int, not a bool (which is one to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def debug_checks_enabled() -> bool:
    """``FASTBERT_DEBUG=1`` turns on value checks that need a GPU→host sync (ids in range, ...)."""
    return os.environ.get("FASTBERT_DEBUG", "0") == "1"


def value_checks_cheap(tensor: torch.Tensor) -> bool:
    """Value checks read the data: free on CPU tensors, a device sync on CUDA ones (debug only)."""
    return tensor.device.type == "cpu" or debug_checks_enabled()


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, tensor: torch.Tensor) -> None:
    check_tensor(name, tensor)
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise DtypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def check_mask_dtype(name: str, tensor: torch.Tensor) -> None:
    check_tensor(name, tensor)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise DtypeError(f"{name} must be bool or an integer dtype (1/True = real token), got {tensor.dtype}")


def check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, shape: bool = True) -> None:
    """Same device and dtype (and shape unless ``shape=False``)."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise DtypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; they must match")
    if shape and a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")
