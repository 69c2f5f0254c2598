"""``gelu(x + bias)`` with the exact erf GELU (HF "gelu"), and its torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert._validation import check_floating


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)``, exact erf form. x: (..., n) float; bias: (n,). Returns x's shape and dtype."""
    check_floating("x", x)
    check_floating("bias", bias)
    if x.dim() < 1 or bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},) to match x's last dimension, "
                         f"got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    # No Triton kernel yet: under FASTBERT_BACKEND=triton this raises a clear error.
    backend.use_triton("bias_gelu", x, has_kernel=False)
    return bias_gelu_reference(x, bias)
