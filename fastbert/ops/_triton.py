"""Helpers the Triton-backed ops share. Nothing here imports triton."""
from __future__ import annotations

import torch


def philox_seed() -> int:
    """A fresh seed for a kernel's Philox dropout, drawn from torch's default CPU generator.

    The CPU generator needs no device sync, and ``torch.manual_seed`` makes the draws (so the
    dropout masks) reproducible; activation checkpointing restores its state, so a recomputed
    forward draws the same seed again.
    """
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
