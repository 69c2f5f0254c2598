"""One static case: a call of an op's forward and backward launchers, as a kernel module declares it.

Kernel modules import this (it imports torch only) to declare ``static_cases(case_set)`` and build
their inputs with :func:`cuda_tensor`, which the capture turns into meta tensors that say "cuda".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Every set a module answers for: smoke (seconds: GELU only), quick (one case per op), default (the CI
# subset), full (the whole sweep).
CASE_SETS = ("smoke", "quick", "default", "full")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class StaticCase:
    """dtype "mix" is the autocast mix: bf16 activations with fp32 residual and weights (LayerNorm),
    bf16 input with an fp32 bias (GELU). Fields an op does not use stay at their defaults and are left
    out of the label (the report's ``shape`` column, the compare tool's key)."""

    op: str  # attention | layer_norm | bias_gelu | mlm_loss
    dtype: str  # bf16 | fp16 | fp32 | mix
    hidden: int = 0
    head_dim: int = 0  # attention only
    layout: str = ""  # attention: padded | padded+mask | varlen; mlm_loss: [no]grad[+smooth][+nobias]
    dropout: bool | None = None  # None: the op has no dropout
    vocab: int = 0  # mlm_loss only

    @property
    def label(self) -> str:
        parts = [self.op, self.dtype, f"V{self.vocab}" if self.vocab else f"N{self.hidden}"]
        if self.head_dim:
            parts.append(f"D{self.head_dim}")
        if self.layout:
            parts.append(self.layout)
        if self.dropout is not None:
            parts.append("drop" if self.dropout else "nodrop")
        return " ".join(parts)


def cuda_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor on "cuda": under the capture, a meta tensor that reports cuda:0."""
    return torch.empty(shape, dtype=dtype, device="cuda")


def check_case_set(name: str) -> None:
    if name not in CASE_SETS:
        raise ValueError(f"unknown case set {name!r}: choose {', '.join(CASE_SETS)}")
