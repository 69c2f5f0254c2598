"""Where a job runs and in which precision: the one place that turns ``--device`` and ``--precision``
into a torch device, an autocast context and a GradScaler (pre-training, fine-tuning, DDP all call it).

Nothing here queries CUDA at import time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DEVICES_HELP = "auto | cpu | cuda | cuda:N"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_HELP = "auto: bf16 autocast on a GPU that has it, fp16 + GradScaler on one that has not, fp32 on the CPU"

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` = the GPU when torch sees one, else the CPU; a bare ``cuda`` takes ``local_rank``'s GPU
    (one process per GPU under torchrun). ValueError for a name torch does not know or a missing GPU."""
    if not isinstance(name, str):
        raise TypeError(f"device must be a string ({DEVICES_HELP}), got {type(name).__name__}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be {DEVICES_HELP}, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {DEVICES_HELP}, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


@dataclass(frozen=True)
class Precision:
    """A resolved ``--precision``: ``name`` is bf16, fp16 or fp32 (never auto)."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None = plain fp32."""
        return _DTYPES[self.name]

    def autocast(self):
        """A fresh context for one forward pass (nullcontext under fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
        """A GradScaler, enabled under fp16 only (CUDA or CPU alike): bf16 and fp32 need no scaling, and a
        disabled scaler passes the loss, the gradients and the optimizer step through unchanged."""
        return torch.amp.GradScaler(self.device_type, init_scale=init_scale, enabled=self.name == "fp16")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto`` = bf16 on a GPU that has it, fp16 (with loss scaling) on an older GPU, fp32 on the CPU.
    bf16 and fp16 are allowed on the CPU too (autocast and GradScaler support it; slow, for tests)."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    return Precision(requested, device.type)
