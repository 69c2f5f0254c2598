"""Model FLOPs of a BERT pre-training step (useful work only), for MFU and TFLOP/s figures.

6·tokens·(per-layer weight params)·layers  (fwd + bwd GEMMs over real tokens)
+ 12·layers·hidden·Σ Lᵢ²                   (attention scores and weighted sum, fwd + bwd)
+ 6·masked·(hidden² + hidden·vocab)        (MLM head, on masked tokens only)
"""
from __future__ import annotations

import os

import torch

from fastbert.config import BertConfig

# Dense bf16 ceilings measured with PyTorch GEMMs (../shared/docs/GPU.md); FASTBERT_PEAK_TFLOPS overrides.
MEASURED_PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}


def training_flops(config: BertConfig, attention_mask: torch.Tensor, num_masked: int | torch.Tensor,
                   cu_seqlens: torch.Tensor | None = None) -> float:
    """``cu_seqlens`` (packed batches): sequence lengths come from it, not from the rows."""
    h, layers = config.hidden_size, config.num_hidden_layers
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    else:
        lengths = attention_mask.sum(1).double()
    tokens = float(lengths.sum())
    per_layer_weights = 4 * h * h + 2 * h * config.intermediate_size
    encoder = 6 * tokens * layers * per_layer_weights
    attention = 12 * layers * h * float((lengths**2).sum())
    head = 6 * float(num_masked) * (h * h + h * config.vocab_size)
    return encoder + attention + head


def peak_tflops(device: torch.device) -> float | None:
    """The GEMM ceiling MFU is measured against, or None when unknown (MFU is then not reported)."""
    override = os.environ.get("FASTBERT_PEAK_TFLOPS")
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in MEASURED_PEAK_TFLOPS.items() if k in name), None)
